"""The run store's schema, in one place.

A run is one Zarr v3 group with sub-groups per stage. Every name a stage reads or
writes comes from here, so that readers and writers cannot drift apart.
"""
from __future__ import annotations

import re
from collections import namedtuple
from typing import Any

SCHEMA_VERSION = 1

BLOCKS: tuple[str, ...] = ("Q", "K", "V", "O")
SCORES: tuple[str, ...] = ("interference", "alignment")
# what each pair score answers, as the `scores` variables' attrs (question, units, direction)
SCORE_DOCS: dict[str, tuple[str, str, str]] = {
    "interference": ("How heavily does sample j's gradient land on the weights sample i's loss depends on, in this "
                     "slice? M[i, j] = sum_p g_i[p]^2 / (I[p] + lambda) * |g_j[p]| (Fisher-normalised; asymmetric)",
                     "gradient units: g_i^2 / (I + lambda) is unitless, times |g_j|",
                     ">= 0; larger = j's gradient lands more heavily on the weights i depends on"),
    "alignment": ("Does a natural-gradient step on sample j's loss, in this slice, lower or raise sample i's loss? "
                  "A[i, j] = sum_p g_i[p] * g_j[p] / (I[p] + lambda) (symmetric)",
                  "minus the first-order change of i's loss per unit natural-gradient step on j's loss",
                  "negative = conflict (the step raises i's loss), positive = synergy, 0 = orthogonal"),
}

# groups
GRADIENTS = "gradients"
FISHER = "fisher"
SCORES_GROUP = "scores"
STATS = "stats"
CHECKS = "checks"
WORK = "_work"  # bookkeeping: completed-shard records, Fisher partial sums
LOCK_GROUP = "_lock"  # the ownership lock: a group whose metadata document names the owner

# dimension names
SAMPLE = "sample"
LAYER = "layer"
HEAD = "head"
KV_HEAD = "kv_head"
PARAM = "param"
SAMPLE_A = "sample_a"
SAMPLE_B = "sample_b"
SAMPLE_I = "sample_i"  # pooled (A then B) score matrices used by the statistics
SAMPLE_J = "sample_j"
BLOCK = "block"
SCORE = "score"
CHECK = "check"  # one row per sanity check in `checks`
PREDICTION_SLICE = "prediction_slice"  # `checks`: the prediction check's per-slice variables
PREDICTION_ETA = "prediction_eta"  # `checks`: the step sizes (η, η/2, −η/2) it measured at
SKETCH = "sketch"  # sketch mode: the projected dimension replacing `param` in `gradients`

# coordinate / variable names in `gradients`
SAMPLE_ID = "sample_id"
TASK = "task"
N_TOKENS = "n_tokens"
LOSS = "loss"
TEXT = "text"  # the start of each sample's text (for `qkov query`)
FINITE = "finite"  # False for samples skipped for non-finite gradients (extract.nonfinite = "skip")
KV_HEAD_OF = "kv_head_of"  # per query head, its KV head (GQA/MQA)

# `fisher` group: λ per (block, layer)
DAMPING = "damping"

# `scores` group: task-A membership of the pooled rows
IS_A = "is_a"

# `diagnostics` group (written by the score stage; pipeline/diagnostics.py): numerical health
# per (block, layer, head) and per-sample diagnostics per (block, layer, head, sample_i)
DIAGNOSTICS = "diagnostics"
FISHER_MIN = "fisher_min"
FISHER_MEDIAN = "fisher_median"
FISHER_MAX = "fisher_max"
DAMPED_SHARE = "damped_share"  # share of the slice's entries where λ > Î
EFFECTIVE_DIM = "effective_dim"  # Σ Î/(Î+λ) over the slice
N_PARAMS = "n_params"  # entries per slice, per block
ILL_CONDITIONED = "ill_conditioned"
GRAD_NORM = "grad_norm"  # ‖g_i‖ over the slice
FISHER_NORM = "fisher_norm"  # √A_ii, from the pooled alignment diagonal
ROW_MEAN = "interference_row_mean"  # mean over the other task's k of M[i, k]
COL_MEAN = "interference_col_mean"  # mean over the other task's k of M[k, i]
OUTLIER_SCORE = "outlier_score"
OUTLIER = "outlier"
ATTR_EXCLUDED = "excluded_samples"  # `stats` attr: sample ids left out by `qkov stats --exclude`
ATTR_EXCLUDED_TASKS = "excluded_tasks"  # the task of each excluded id (ids may repeat across tasks)

# completed-shard records in `_work`; sketch mode runs two passes, each with its own record
DONE = "done"
DONE_FISHER = "done_fisher"  # sketch mode pass 1: the shard's Fisher partial sum is written
SKETCH_PARTS: tuple[str, ...] = ("u", "v", "w")  # g²/Î_reg, |g|, g/√Î_reg
ATTR_PLAN = "plan"  # `_work` attr: fingerprint of the extraction plan (resume must match it)
ATTR_WEIGHTS_HASH = "weights_hash"
ATTR_CHECKPOINT = "checkpoint_fingerprint"  # `_work` attr: the weight files the run started from (resume must match)
ATTR_SKIPPED = "skipped"  # `_work` attr: ids of samples skipped for non-finite gradients
ATTR_SKIPPED_SAMPLES = "skipped_samples"  # the same list, on `gradients` and `fisher`
ATTR_N_A = "n_a"
ATTR_N_B = "n_b"
ATTR_TASK_A = "task_a"  # task names, on `gradients` and `scores`
ATTR_TASK_B = "task_b"
ATTR_MODE = "mode"  # `gradients`: exact | sketch | answers
ATTR_SKETCH_PROJECTION = "sketch_projection"  # `gradients` in sketch mode: how projections are drawn


ATTR_TASKS = "tasks"  # `gradients` of a run of more than two tasks: the task names, in store order
ATTR_TASK_SIZES = "task_sizes"  # ... and each task's sample count (its rows follow the previous task's)
# Runs of more than two tasks: one sub-run per unordered task pair under `pairs/<x>-<y>`, laid out
# as a two-task run (its own scores, statistics, diagnostics and checks; gradients from the root,
# the Fisher from the root, or its own under fisher.source = "pair")
PAIRS = "pairs"
ATTR_PAIR = "pair"  # a pair sub-run's root: [key of its task A, key of its task B]


def pair_id(key_a: str, key_b: str) -> str:
    """A task pair's name (task keys are lower-case identifiers, so '-' is unambiguous)."""
    return f"{key_a}-{key_b}"


def pair_group(key_a: str, key_b: str) -> str:
    return f"{PAIRS}/{pair_id(key_a, key_b)}"


# ---- answers mode (score.mode = "answers") ----------------------------------
# No per-sample gradient is stored: pass 1 sums each task's g, |g| and g² per parameter
# (`_work` partials per shard, consolidated to TASK_SUMS), pass 2 reduces each sample's
# gradient against them to a few scalars per slice, stored in `gradients` as {B} (sample,
# layer, head, part). The score stage turns the two tasks' parts into each score's
# per-sample moments (`moments_<score>_<block>` in `scores`), which every answer is made of.
PART = "part"  # `gradients` in answers mode: the per-sample scalars of a slice
MOMENT = "moment"  # `scores` in answers mode: a score's per-sample moments
TASK_SUM_KINDS: tuple[str, ...] = ("g", "abs", "sq")  # Σ g, Σ |g|, Σ g² per task and parameter
TASK_SUMS = "task_sums"  # `_work` group: the consolidated per-task sums, per block (task, kind, layer, head, param)
# the parts of each sample's scalars: Σg², A_ii = Σ g²w, M_ii = Σ |g|³w, then per task key k
# ⟨g_i, Σ_k g⟩_w, ⟨u_i, Σ_k |g|⟩ and ⟨Σ_k u, |g_i|⟩ (w = 1/(Î+λ), u = g²w)
ANSWER_SELF_PARTS: tuple[str, ...] = ("sq", "a_ii", "m_ii")
ANSWER_TASK_PARTS: tuple[str, ...] = ("a", "mr", "mc")
# per score, its moments for the two tasks A, B of a (sub-)run: the diagonal S_ii, then the
# row sums over A and B (Σ_k∈A S_ik, Σ_k∈B S_ik) and the column sums (Σ_k∈A S_ki, …); the
# symmetric alignment's columns are its rows
MOMENTS: tuple[str, ...] = ("diag", "row_a", "row_b", "col_a", "col_b")


def answer_parts(task_keys) -> list[str]:
    """The `part` coordinate of answers-mode `gradients` for a run's task keys."""
    return [*ANSWER_SELF_PARTS, *(f"{p}.{k}" for k in task_keys for p in ANSWER_TASK_PARTS)]


def moment_parts(score: str, key_a: str, key_b: str) -> list[str]:
    """The `gradients` parts one score's moments (MOMENTS order) are made of, for tasks key_a, key_b."""
    if score == "interference":
        return ["m_ii", f"mr.{key_a}", f"mr.{key_b}", f"mc.{key_a}", f"mc.{key_b}"]
    return ["a_ii", f"a.{key_a}", f"a.{key_b}", f"a.{key_a}", f"a.{key_b}"]


def moments_name(score: str, block: str | None = None) -> str:
    """A score's per-sample moments in answers mode (logical: block, layer, head, sample_i, moment)."""
    return f"moments_{score}" + (f"_{block}" if block else "")


def task_sum_partial(block: str, task: int) -> str:
    """`_work` array of each shard's Σ g, Σ |g|, Σ g² (TASK_SUM_KINDS) of one block and task (answers mode)."""
    return f"task_sums_{block}_{task}"


def fisher_partial(block: str, stream: int = 0) -> str:
    """`_work` array holding each shard's Fisher partial sum of one block (of one Fisher stream:
    fisher.source = "pair" sums one per task pair)."""
    return f"fisher_{block}" if stream == 0 else f"fisher_{block}_{stream}"


_STATS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def stats_group(name: str | None = None) -> str:
    """The group of a statistics run: `stats`, or `stats_<name>` for named ones."""
    if name is None:
        return STATS
    if not _STATS_NAME.match(name):
        from .errors import UsageError

        raise UsageError(f"stats name {name!r} must be letters, digits, '_', '.', '-' (it becomes group 'stats_<name>')")
    return f"{STATS}_{name}"


def sketch_var(block: str, part: str) -> str:
    """`gradients` variable holding one block's sketched operand in sketch mode (e.g. `Q_u`)."""
    if part not in SKETCH_PARTS:
        raise ValueError(f"unknown sketch part {part!r}; expected one of {SKETCH_PARTS}")
    return f"{block}_{part}"

# attrs
ATTR_SCHEMA = "qkov_schema_version"
ATTR_PROVENANCE = "qkov_provenance"
ATTR_COMPLETE = "qkov_complete"  # set last, when a group is fully written
ATTR_RUN = "qkov_run"  # on the root: this folder is a qkov run (only such folders are ever removed)
ATTR_LOCK = "qkov_lock"  # on `_lock`: the owner record


def head_dim(block: str) -> str:
    """Name of the head dimension of a block: K/V live on KV heads (GQA/MQA)."""
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")
    return KV_HEAD if block in ("K", "V") else HEAD


def pooled_name(score: str) -> str:
    """Variable holding the pooled (A∪B)×(A∪B) matrix of a score, for the permutation null."""
    return f"pooled_{score}"


# ---- compact `scores` storage ----------------------------------------------
# The score stage stores each block's pooled matrices once, on the block's own heads
# (K/V: KV heads, not once per query head), as `pooled_<score>_<block>` (layer, head or
# kv_head, sample_i, sample_j). `RunStore.open_scores` shows the logical dataset: the
# (block, layer, head, …) `pooled_<score>` and the A×B `<score>` as views of them.
# compact-v2: the symmetric alignment holds its upper triangle once (`fold_symmetric`,
# dims fold_row × fold_col, attr ATTR_FOLDED = N), and the pooled matrices' chunks are
# compressed losslessly (SCORES_COMPRESSION; compact-v1 stores, read as they are, had neither).
ATTR_SCORES_LAYOUT = "scores_layout"  # on `scores`: absent = the logical dataset as stored (before 2026-11-29)
SCORES_LAYOUT = "compact-v2"
COMPACT_LAYOUTS = ("compact-v1", SCORES_LAYOUT)
FOLD_ROW, FOLD_COL = "fold_row", "fold_col"  # dims of a folded symmetric matrix
ATTR_FOLDED = "symmetric_fold_of"  # on a stored variable: it holds folded N×N symmetric matrices, N = the value
# blosc with bit shuffling (float exponents and signs share bit planes) and lz4: on the demo's
# SmolLM2 scores 0.80x (interference) and 0.88x (folded alignment) of the raw bytes, at
# ~1 GB/s per thread to compress (zstd: the same ratios at a fifth of the speed)
SCORES_COMPRESSION = {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}


def folded_shape(n: int) -> tuple[int, int]:
    """The shape of `fold_symmetric` of an n×n matrix."""
    k = (n + 1) // 2
    return (2 * k + 1, k)


def fold_symmetric(a):
    """[..., N, N] symmetric → [..., 2k+1, k], k = ⌈N/2⌉: its upper triangle, each value once,
    in a rectangle (LAPACK's rectangular full packed arrangement). With A padded to 2k and cut
    into k×k blocks [[A11, A12], [A12ᵀ, A22]], the rows are A12 then T, (k+1)×k, where
    T[i, c] = A22[i, c] for i ≤ c and A11[c, i-1] for i > c. Exact: only values are moved.
    Works on numpy and dask arrays (numpy's functions dispatch to dask's) and on torch tensors
    (where a score task folds on its device before the copy to the host: half the bytes)."""
    if type(a).__module__.startswith("torch"):
        return _fold_symmetric_torch(a)
    import numpy as np

    n = a.shape[-1]
    k = (n + 1) // 2
    if n % 2:
        a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, 1), (0, 1)])
    a11, a12, a22 = a[..., :k, :k], a[..., :k, k:], a[..., k:, k:]
    upper = np.arange(k + 1)[:, None] <= np.arange(k)[None, :]
    below = np.concatenate([a22, a22[..., :1, :]], axis=-2)  # row k: never taken (i ≤ c fails)
    above = np.concatenate([a11[..., :1, :], np.swapaxes(a11, -1, -2)], axis=-2)  # row 0: never taken
    return np.concatenate([a12, np.where(upper, below, above)], axis=-2)


def _fold_symmetric_torch(a):
    """`fold_symmetric` in torch's words, the same values in the same places."""
    import torch

    n = a.shape[-1]
    k = (n + 1) // 2
    if n % 2:
        a = torch.nn.functional.pad(a, (0, 1, 0, 1))
    a11, a12, a22 = a[..., :k, :k], a[..., :k, k:], a[..., k:, k:]
    upper = torch.arange(k + 1, device=a.device)[:, None] <= torch.arange(k, device=a.device)[None, :]
    below = torch.cat([a22, a22[..., :1, :]], dim=-2)
    above = torch.cat([a11[..., :1, :], a11.transpose(-1, -2)], dim=-2)
    return torch.cat([a12, torch.where(upper, below, above)], dim=-2)


def unfold_symmetric(f, n: int):
    """The N×N symmetric matrices (N = n) that `fold_symmetric` folded into f [..., 2k+1, k]."""
    import numpy as np

    k = f.shape[-1]
    a12, t0, t1 = f[..., :k, :], f[..., k : 2 * k, :], f[..., k + 1 :, :]
    upper = np.arange(k)[:, None] <= np.arange(k)[None, :]
    a22 = np.where(upper, t0, np.swapaxes(t0, -1, -2))
    a11 = np.where(upper, np.swapaxes(t1, -1, -2), t1)
    full = np.concatenate([np.concatenate([a11, a12], axis=-1), np.concatenate([np.swapaxes(a12, -1, -2), a22], axis=-1)],
                          axis=-2)
    return full[..., :n, :n]
ATTR_STAGE_SECONDS = "stage_seconds"  # in a group's provenance: {part: seconds} of the stage that wrote it
ATTR_SCORES_DTYPE = "scores_dtype"  # on `scores`: float32 | bfloat16 (bf16 bits as uint16 + ATTR_ENCODING)
ATTR_SAMPLE_CHUNK = "sample_chunk"  # on `scores` (and its provenance): the pooled matrices' chunk along sample_i/j


# keep_gradients = false: the run proceeds in layer groups, each extracted into its own
# sub-run under `_work/r<k>`, scored into the run's `scores`, then deleted
ATTR_LAYER_GROUPS = "layer_groups"  # `_work` attr: the layers of each group, fixed when the run starts
ATTR_GROUPS_DONE = "layer_groups_done"  # `_work` attr: groups whose scores and Fisher are written
# the fused path (`[output] gradients_in`): where a group's gradients wait for its scores, and why
ATTR_GRADIENTS_IN = "gradients_in"  # `_work` attr: {"where": "device" | "disk", "why": ...} of the latest call
ATTR_RESIDENT = "resident"  # a sub-run's `_work` attr: its gradients were held in a worker's memory, never written
ATTR_GRADIENTS_DROPPED = "gradients_dropped"  # `gradients` attr: only its coordinates are kept
ATTR_VALUES_DROPPED = "values_dropped"  # `fisher` attr in answers mode: its P-sized arrays are deleted
REPLACING = "_replacing"  # `--overwrite` in progress: the old run's entries, moved here and deleted last
ATTR_TEMPLATES = "layer_group_templates"  # `_work` attr: the run's gradients/fisher/scores templates are written


def layer_group_path(k: int) -> str:
    """Where layer group k's sub-run lives inside the run (under `_work`, removed on success)."""
    return f"{WORK}/r{k}"


def dropped_group_path(k: int | str) -> str:
    """Where a finished layer group's sub-run is moved to be deleted in the background
    (k = "*": the pattern of all of them)."""
    return f"{WORK}/dropping-r{k}"


# keep_pairs = "top" | "none": no N×N matrices; per block and score, the statistics' sums
# (slice_reductions.slice_statistics of the pooled matrix, reduced on the workers for the run's
# [stats] n_permutations, n_bootstrap and seed) and, with "top", the top_k A×B pairs per slice
ATTR_KEEP_PAIRS = "keep_pairs"  # on `scores`: all | top | none (absent: all)
ATTR_SUMS_SETTINGS = "stat_sums_settings"  # on `scores`: the settings the sums were reduced for
STAT = "stat"  # dimension of the sums
RANK = "rank"  # dimension of the top pairs


def stat_sums_parts(n_permutations: int, n_bootstrap: int) -> tuple[slice, slice, slice, slice]:
    """Where each part of one slice's sums sits along `stat`: the observed labelling (1), each
    permutation (K), four bootstrap cross sums per resample and the original (4 (1 + B)), then
    one margin per sample (N, to the end)."""
    k, b = n_permutations, n_bootstrap
    return slice(0, 1), slice(1, 1 + k), slice(1 + k, 1 + k + 4 * (1 + b)), slice(1 + k + 4 * (1 + b), None)


def stat_sums_width(n_permutations: int, n_bootstrap: int, n_samples: int) -> int:
    """Length of one slice's sums along `stat` (see `stat_sums_parts`). Writers, templates, the
    plan and the stats stage all size and split the sums from these two."""
    return stat_sums_parts(n_permutations, n_bootstrap)[3].start + n_samples


def stat_sums_name(score: str, block: str | None = None) -> str:
    """The statistics' sums of one score (logical: block, layer, head, stat), stored per block."""
    return f"stat_sums_{score}" + (f"_{block}" if block else "")


def top_name(score: str, part: str = "value", block: str | None = None) -> str:
    """Top pairs of one score: part value | a | b (the pair's positions in sample_a / sample_b)."""
    return f"top_{score}" + ("" if part == "value" else f"_{part}") + (f"_{block}" if block else "")


def stored_pooled_name(score: str, block: str) -> str:
    """Stored variable of one block's pooled matrices in the compact `scores` layout."""
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")
    return f"{pooled_name(score)}_{block}"


# ---- gradient storage dtypes ----------------------------------------------
# Zarr v3 has no bfloat16 data type, so bfloat16 gradients are stored as their
# raw 16-bit patterns (uint16) with this attr; the one codec (`qkov.pipeline.codec`) rounds
# to them and turns them back into float32 exactly (bf16 ⊂ f32).
ATTR_ENCODING = "qkov_encoding"


def stored_dtype(storage_dtype: str) -> str:
    return {"float32": "float32", "bfloat16": "uint16"}[storage_dtype]


def param_dims(sizes: dict[str, int]) -> dict[str, str]:
    """The `param` dimension name per block. One shared `param` dimension when every
    block's slices have the same length (the usual case); per-block names
    (`param_Q`, …) when they differ (e.g. with biases: Q/K/V carry a bias part, O not).
    """
    if len(set(sizes.values())) <= 1:
        return {b: PARAM for b in sizes}
    return {b: f"{PARAM}_{b}" for b in sizes}


# on every group `RunStore.write_dataset` writes: per array [data_type, shape, chunk_shape, codec names] as
# written, so that an array's zarr.json edited or damaged afterwards is refused instead of believed
ATTR_ARRAYS = "qkov_arrays"


# ---- `stats` group: its variables, their names and docs ----------------------
# Every stored name once: the docs below, the stats stage and the readers key by them
# (STATS_VARS.p_value == "p_value"); iterating STATS_VARS gives every name.
CI_BOUNDS = ("low", "high")


def ci_name(var: str, bound: str) -> str:
    """The variable holding one bound (low | high) of `var`'s bootstrap CI (`transfer_ci_low`)."""
    return f"{var}_ci_{bound}"


def _with_ci(*names: str) -> tuple[str, ...]:
    return tuple(n for name in names for n in (name, *(ci_name(name, b) for b in CI_BOUNDS)))


# the labels-null test, per (score, block, layer, head); `in_family` per (block, head)
LABELS_NULL_VARS = ("mean", "null_mean", "p_value", "q_value", "significant", "p_fwer", "ci_low", "ci_high", "in_family")
HEAD_EFFECT_VARS = (*_with_ci("effect"), "direction", "q_value_hier", "significant_hier")  # per (score, block, layer, head)
LAYER_VARS = ("layer_p_value", "layer_q_value", "layer_significant")  # per (score, block, layer)
OWN_VARS: dict[str, tuple[str, ...]] = {  # one score's own effect sizes, per (block, layer, head)
    "interference": _with_ci("sharing", "sharing_ab", "sharing_ba"),
    "alignment": (*_with_ci("transfer"), "transfer_p_value", "transfer_q_value", "transfer_direction", *_with_ci("cosine"),
                  "cosine_norm_z"),
}
_ALL_STATS_VARS = (*LABELS_NULL_VARS, *HEAD_EFFECT_VARS, *LAYER_VARS, *(v for vs in OWN_VARS.values() for v in vs))
STATS_VARS = namedtuple("StatsVars", _ALL_STATS_VARS)(*_ALL_STATS_VARS)
_V = STATS_VARS

# The cosine's no-direction rule, stored as attrs on the cosine variables (qkov.pipeline.stats applies it).
# Cosine is a ratio with the task-mean norms below it: where a norm is noise, so is the
# ratio (unbiased norm estimates can even undershoot |transfer| and give |ratio| > 1).
COSINE_MIN_Z = 2.0
COSINE_RULE = ("NaN (no direction) unless each task's squared mean-gradient norm, estimated without bias "
               "(within-task mean over pairs i != i'), is at least cosine_min_z standard errors above 0; the "
               "standard error is the sd of the same estimate over the two-way bootstrap resamples of the CIs "
               "(fewer than 2 defined resamples: no direction). Where both pass, the ratio is clipped to [-1, 1] "
               "(the unbiased norms may undershoot) and each bootstrap replicate needs positive norms.")

# The labels-null test's variables (score dim): the docs as (description, question, units,
# direction); `question`, `units`, `direction` are stored as attrs on every variable, as on
# the effect sizes below and the logical scores (schema.SCORE_DOCS).
STATS_SCORE_UNITS = "units of the score (see the `units` attr of that score in qkov.open_scores)"
STATS_VAR_DOCS: dict[str, tuple[str, str, str, str]] = {
    _V.mean: ("T = mean over i in A, j in B of the score",
              "How large is the score between the tasks' samples in this slice? (mean over the A x B pairs)",
              STATS_SCORE_UNITS, "as the score: interference larger = heavier overlap; alignment < 0 conflict, > 0 synergy"),
    _V.null_mean: ("mean of T over the label permutations (what chance gives); mean above it = more than chance",
                   "What would the A x B mean be if the task labels were random? (Monte Carlo mean over the "
                   "label permutations)", STATS_SCORE_UNITS, "the chance level: mean above it = more than chance"),
    _V.p_value: ("permutation p-value, (1 + #exceedances) / (1 + n_permutations)",
                 "How often do random task labels give an A x B mean at least as extreme as the observed one? "
                 "(labels null, attr alternative of the group)", "1 (probability)",
                 "small = evidence that the tasks differ from chance in this slice"),
    _V.q_value: ("Benjamini-Hochberg q-value over the family (per score)",
                 "What is the smallest false discovery rate at which this slice counts as differing from chance? "
                 "(BH over the family, per score)", "1 (rate)", "<= alpha: significant"),
    _V.significant: ("q_value <= alpha", "Does this slice differ from chance at the group's alpha (q_value <= alpha)?",
                     "1 (boolean)", "True = differs from chance, in the direction of `direction`"),
    _V.p_fwer: ("Westfall-Young single-step max-T adjusted p-value over the family (per score)",
                "Could a slice this extreme arise by chance anywhere in the family? (max-T family-wise adjusted "
                "p-value, per score)", "1 (probability)", "<= alpha: significant with family-wise error control"),
    _V.ci_low: ("two-way bootstrap percentile CI of T, lower bound",
                "Lower bound of the two-way bootstrap percentile CI of mean (level: attr ci_level)", STATS_SCORE_UNITS,
                "as mean"),
    _V.ci_high: ("two-way bootstrap percentile CI of T, upper bound",
                 "Upper bound of the two-way bootstrap percentile CI of mean (level: attr ci_level)", STATS_SCORE_UNITS,
                 "as mean"),
    _V.in_family: ("False for K/V query-head entries that repeat their KV head",
                   "Is this (block, head) entry its own member of the multiple-testing family? (K/V entries of "
                   "query heads that share a KV head repeat it)", "1 (boolean)",
                   "True = counted once in BH and max-T; False = a copy of its KV head's values"),
}


def stats_var_attrs(var: str) -> dict[str, Any]:
    description, question, units, direction = STATS_VAR_DOCS[var]
    return {"description": description, "question": question, "units": units, "direction": direction}


# Effect sizes and layer → head tests (issue 16): what each answers, in which unit, and
# how to read it; stored as attrs `question`, `units`, `direction` on every variable.
EFFECT_DOCS: dict[str, tuple[str, str, str]] = {  # name: (question, units, direction)
    _V.effect: ("How far is the A x B mean from what random task labels give? (mean - the exact mean over "
                "all label permutations; null_mean is its Monte Carlo estimate)",
                "units of the score", "+ above chance, - below chance; 0 = chance"),
    _V.direction: ("Is the slice significantly above or below chance (labels null, q_value <= alpha)?",
                   "1", "+1 above chance, -1 below chance, 0 not significant"),
    _V.q_value_hier: ("Is this head significant within a layer-block that was itself selected "
                      "(Benjamini-Bogomolov layer -> head FDR at alpha)?",
                      "1", "<= alpha: significant; 1 where the layer-block was not selected"),
    _V.significant_hier: ("Is the head a discovery of the layer -> head procedure?", "1", "True = discovery"),
    _V.layer_p_value: ("Does any head of this block of this layer differ from chance (same permutations, "
                       "Fisher combination of the heads' permutation p-values)?", "1", "small = evidence"),
    _V.layer_q_value: ("BH q-value of layer_p_value over the (block, layer) family of the score", "1", "<= alpha: selected"),
    _V.layer_significant: ("Is this layer-block selected (layer_q_value <= alpha)?", "1", "True = the layer-block carries an effect"),
    _V.sharing: ("Do the two tasks load the same weights of this slice, whatever the size of their gradients? "
                 "(geometric mean sqrt(sharing_ab * sharing_ba) of the interference ratios of both directions, per "
                 "bootstrap resample alike: each task's gradient size cancels)",
                 "unitless ratio, independent of either task's gradient scale",
                 "1 = the tasks spread their gradients over the weights alike (as one task would); -> 0 = disjoint "
                 "weights (separated); typically in [0, 1]"),
    _V.sharing_ab: ("How heavily do task B's gradients land on the weights task A's loss depends on (B onto A), "
                    "relative to A's own other samples? (interference: mean over A x B / mean over i != i' in A; "
                    "direction-specific)",
                    "ratio that scales with B's gradient size relative to A's (x c when B's gradients are x c): "
                    "partly a ratio of the tasks' gradient sizes; `sharing` is the size-free answer",
                    "larger = B's gradients land more heavily on A's weights; 1 = as heavily as A's own samples'"),
    _V.sharing_ba: ("How heavily do task A's gradients land on the weights task B's loss depends on (A onto B), "
                    "relative to B's own other samples? (interference: mean over B x A / mean over j != j' in B; "
                    "direction-specific)",
                    "ratio that scales with A's gradient size relative to B's (x 1/c when B's gradients are x c): "
                    "partly a ratio of the tasks' gradient sizes; `sharing` is the size-free answer",
                    "larger = A's gradients land more heavily on B's weights; 1 = as heavily as B's own samples'"),
    _V.transfer: ("Does a natural-gradient step on task B's mean loss, restricted to this slice, lower or "
                  "raise task A's mean loss? (alignment: mean over A x B = <g_A, g_B> in the (I+lambda)^-1 metric)",
                  "minus the first-order change of A's loss per unit natural-gradient step on B",
                  "negative = conflict (B's step raises A's loss), positive = synergy"),
    _V.transfer_p_value: ("Is transfer different from 0? (two-sample U-statistic, Hoeffding variance, "
                          "Welch t, two-sided)", "1", "small = evidence"),
    _V.transfer_q_value: ("BH q-value of transfer_p_value over the alignment family", "1", "<= alpha: significant"),
    _V.transfer_direction: ("Do the tasks conflict or help each other in this slice (transfer_q_value <= alpha)?",
                            "1", "-1 conflict, +1 synergy, 0 not significant"),
    _V.cosine: ("Do the task-mean gradients point the same way, whatever their size? (transfer / the "
                "unbiased norms of the task means, in the same metric; NaN = no direction: a task-mean norm not "
                "distinguishable from 0, see attrs cosine_rule and cosine_min_z)",
                "cosine", "-1 opposite (conflict), 0 orthogonal, +1 same direction; NaN = no direction"),
    _V.cosine_norm_z: ("How clearly are both task-mean gradients distinguishable from 0 in this slice? (the smaller "
                       "of the two tasks' squared-norm estimates over its bootstrap standard error)",
                       "standard errors", "cosine is defined where this is >= cosine_min_z; larger = clearer"),
}
EFFECT_FLAGS = {_V.direction: "below_chance not_significant above_chance",
                _V.transfer_direction: "conflict not_significant synergy"}
EFFECT_SCORE_OF = {v: score for score, vs in OWN_VARS.items() for v in vs}  # a score's own effects name it
LAYER_COMBINE = "fisher"


def effect_attrs(var: str) -> dict[str, Any]:
    base, bound = var, None
    for b in CI_BOUNDS:
        if var.endswith(ci_name("", b)):
            base, bound = var[: -len(ci_name("", b))], b
    question, units, direction = EFFECT_DOCS[base]
    attrs: dict[str, Any] = {"question": question, "units": units, "direction": direction}
    attrs["description"] = question
    if bound:
        attrs["description"] = f"two-way bootstrap percentile CI of {base}, {bound} bound (level: attr ci_level)"
    if var in EFFECT_FLAGS:
        attrs.update(flag_values=[-1, 0, 1], flag_meanings=EFFECT_FLAGS[var])
    if base in EFFECT_SCORE_OF:
        attrs["score"] = EFFECT_SCORE_OF[base]
    if base in (_V.cosine, _V.cosine_norm_z):  # the no-direction rule, on the bounds too
        attrs.update(cosine_rule=COSINE_RULE, cosine_min_z=COSINE_MIN_Z)
    return attrs
