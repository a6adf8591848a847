"""The run store's schema, in one place.

A run is one Zarr v3 group with sub-groups per stage. Every name a stage reads or
writes comes from here, so that readers and writers cannot drift apart.
"""
from __future__ import annotations

import re

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
ATTR_MODE = "mode"  # `gradients`: exact | sketch
ATTR_SKETCH_PROJECTION = "sketch_projection"  # `gradients` in sketch mode: how projections are drawn


def fisher_partial(block: str) -> str:
    """`_work` array holding each shard's Fisher partial sum of one block."""
    return f"fisher_{block}"


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
    Works on numpy and dask arrays (numpy's functions dispatch to dask's)."""
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


# keep_gradients = false: the run proceeds in layer groups, each extracted into its own
# sub-run under `_work/r<k>`, scored into the run's `scores`, then deleted
ATTR_LAYER_GROUPS = "layer_groups"  # `_work` attr: the layers of each group, fixed when the run starts
ATTR_GROUPS_DONE = "layer_groups_done"  # `_work` attr: groups whose scores and Fisher are written
ATTR_GRADIENTS_DROPPED = "gradients_dropped"  # `gradients` attr: only its coordinates are kept


def layer_group_path(k: int) -> str:
    """Where layer group k's sub-run lives inside the run (under `_work`, removed on success)."""
    return f"{WORK}/r{k}"


def dropped_group_path(k: int | str) -> str:
    """Where a finished layer group's sub-run is moved to be deleted in the background
    (k = "*": the pattern of all of them)."""
    return f"{WORK}/dropping-r{k}"


# keep_pairs = "top" | "none": no N×N matrices; per block and score, the statistics' sums
# (stats_stage.slice_statistics of the pooled matrix, reduced on the workers for the run's
# [stats] n_permutations, n_bootstrap and seed) and, with "top", the top_k A×B pairs per slice
ATTR_KEEP_PAIRS = "keep_pairs"  # on `scores`: all | top | none (absent: all)
ATTR_SUMS_SETTINGS = "stat_sums_settings"  # on `scores`: the settings the sums were reduced for
STAT = "stat"  # dimension of the sums
RANK = "rank"  # dimension of the top pairs


def stat_sums_width(n_permutations: int, n_bootstrap: int, n_samples: int) -> int:
    """Length of one slice's sums along `stat`: the observed labelling and each permutation
    (1 + K), four bootstrap cross sums per resample and the original (4 (1 + B)), then one
    per sample (N). Writers, templates and the plan all size the sums from this."""
    return 1 + n_permutations + 4 * (1 + n_bootstrap) + n_samples


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
# raw 16-bit patterns (uint16) with this attr (qkov.workers.writer.to_stored rounds to
# them); `decode` turns them back into float32 exactly (bf16 ⊂ f32).
ATTR_ENCODING = "qkov_encoding"


def stored_dtype(storage_dtype: str) -> str:
    return {"float32": "float32", "bfloat16": "uint16"}[storage_dtype]


def decode(arr, encoding: str | None):
    """Stored representation → float32 numpy (works on numpy blocks inside dask)."""
    import numpy as np

    if encoding in (None, "float32"):
        return np.asarray(arr, dtype=np.float32)
    if encoding != "bfloat16":
        raise ValueError(f"unknown gradient encoding {encoding!r}")
    bits = np.asarray(arr, dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def encode(arr, encoding: str | None):
    """float32 numpy → the stored representation: bfloat16 by round-to-nearest-even (as torch
    rounds), kept as its 16-bit pattern (uint16); NaN stays NaN. Inverse of `decode` on bf16 values."""
    import numpy as np

    x = np.ascontiguousarray(arr, dtype=np.float32)
    if encoding in (None, "float32"):
        return x
    if encoding != "bfloat16":
        raise ValueError(f"unknown encoding {encoding!r}")
    bits = x.view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


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
