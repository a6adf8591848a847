"""The stats stage: permutation null, BH-FDR, max-T and bootstrap CIs per attention slice.

Reads only the `scores` group of a run, writes only `stats` (or `stats_<name>`).
Per slice chunk, one Dask task computes every weighted cross sum it needs in one pass
over the pooled matrix (see `qkov.pipeline.stats`): row 0 = the observed labelling, rows
1..K = the shared permutations, then B bootstrap rows on the A×B block. Only this small
(F × (1+K+B)) matrix comes back to the client, where exceedance counts, BH and max-T
are computed over the family. Sample-chunked score matrices are fine: the cross sums
of the chunks add up.

Family: each unique (block, layer, head) slice once — Q/O per query head, K/V per KV
head (the first query head of each KV group stands for it). BH and max-T run over the
family, separately per score. Duplicated K/V query-head entries repeat their KV head's
values and carry `in_family = False`.
"""
from __future__ import annotations

import functools
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from . import schema as S
from . import stats as st
from .errors import StatsStageError, UsageError, corrupt_chunk_error, option, param
from .spec import StatsSpec, config_hash
from .store import RunStore, provenance

SETTINGS_KEYS: tuple[str, ...] = tuple(StatsSpec.model_fields)

# The labels-null test's variables (score dim): the docs as (description, question, units,
# direction); `question`, `units`, `direction` are stored as attrs on every variable, as on
# the effect sizes below and the logical scores (schema.SCORE_DOCS).
_SCORE_UNITS = "units of the score (see the `units` attr of that score in qkov.open_scores)"
_VAR_DOCS: dict[str, tuple[str, str, str, str]] = {
    "mean": ("T = mean over i in A, j in B of the score",
             "How large is the score between the tasks' samples in this slice? (mean over the A x B pairs)",
             _SCORE_UNITS, "as the score: interference larger = heavier overlap; alignment < 0 conflict, > 0 synergy"),
    "null_mean": ("mean of T over the label permutations (what chance gives); mean above it = more than chance",
                  "What would the A x B mean be if the task labels were random? (Monte Carlo mean over the "
                  "label permutations)", _SCORE_UNITS, "the chance level: mean above it = more than chance"),
    "p_value": ("permutation p-value, (1 + #exceedances) / (1 + n_permutations)",
                "How often do random task labels give an A x B mean at least as extreme as the observed one? "
                "(labels null, attr alternative of the group)", "1 (probability)",
                "small = evidence that the tasks differ from chance in this slice"),
    "q_value": ("Benjamini-Hochberg q-value over the family (per score)",
                "What is the smallest false discovery rate at which this slice counts as differing from chance? "
                "(BH over the family, per score)", "1 (rate)", "<= alpha: significant"),
    "significant": ("q_value <= alpha", "Does this slice differ from chance at the group's alpha (q_value <= alpha)?",
                    "1 (boolean)", "True = differs from chance, in the direction of `direction`"),
    "p_fwer": ("Westfall-Young single-step max-T adjusted p-value over the family (per score)",
               "Could a slice this extreme arise by chance anywhere in the family? (max-T family-wise adjusted "
               "p-value, per score)", "1 (probability)", "<= alpha: significant with family-wise error control"),
    "ci_low": ("two-way bootstrap percentile CI of T, lower bound",
               "Lower bound of the two-way bootstrap percentile CI of mean (level: attr ci_level)", _SCORE_UNITS,
               "as mean"),
    "ci_high": ("two-way bootstrap percentile CI of T, upper bound",
                "Upper bound of the two-way bootstrap percentile CI of mean (level: attr ci_level)", _SCORE_UNITS,
                "as mean"),
    "in_family": ("False for K/V query-head entries that repeat their KV head",
                  "Is this (block, head) entry its own member of the multiple-testing family? (K/V entries of "
                  "query heads that share a KV head repeat it)", "1 (boolean)",
                  "True = counted once in BH and max-T; False = a copy of its KV head's values"),
}


def _var_attrs(var: str) -> dict[str, Any]:
    description, question, units, direction = _VAR_DOCS[var]
    return {"description": description, "question": question, "units": units, "direction": direction}


# Effect sizes and layer → head tests (issue 16): what each answers, in which unit, and
# how to read it; stored as attrs `question`, `units`, `direction` on every variable.
_EFFECT_DOCS: dict[str, tuple[str, str, str]] = {  # name: (question, units, direction)
    "effect": ("How far is the A x B mean from what random task labels give? (mean - the exact mean over "
               "all label permutations; null_mean is its Monte Carlo estimate)",
               "units of the score", "+ above chance, - below chance; 0 = chance"),
    "direction": ("Is the slice significantly above or below chance (labels null, q_value <= alpha)?",
                  "1", "+1 above chance, -1 below chance, 0 not significant"),
    "q_value_hier": ("Is this head significant within a layer-block that was itself selected "
                     "(Benjamini-Bogomolov layer -> head FDR at alpha)?",
                     "1", "<= alpha: significant; 1 where the layer-block was not selected"),
    "significant_hier": ("Is the head a discovery of the layer -> head procedure?", "1", "True = discovery"),
    "layer_p_value": ("Does any head of this block of this layer differ from chance (same permutations, "
                      "Fisher combination of the heads' permutation p-values)?", "1", "small = evidence"),
    "layer_q_value": ("BH q-value of layer_p_value over the (block, layer) family of the score", "1", "<= alpha: selected"),
    "layer_significant": ("Is this layer-block selected (layer_q_value <= alpha)?", "1", "True = the layer-block carries an effect"),
    "sharing": ("Do the two tasks load the same weights of this slice, whatever the size of their gradients? "
                "(geometric mean sqrt(sharing_ab * sharing_ba) of the interference ratios of both directions, per "
                "bootstrap resample alike: each task's gradient size cancels)",
                "unitless ratio, independent of either task's gradient scale",
                "1 = the tasks spread their gradients over the weights alike (as one task would); -> 0 = disjoint "
                "weights (separated); typically in [0, 1]"),
    "sharing_ab": ("How heavily do task B's gradients land on the weights task A's loss depends on (B onto A), "
                   "relative to A's own other samples? (interference: mean over A x B / mean over i != i' in A; "
                   "direction-specific)",
                   "ratio that scales with B's gradient size relative to A's (x c when B's gradients are x c): "
                   "partly a ratio of the tasks' gradient sizes; `sharing` is the size-free answer",
                   "larger = B's gradients land more heavily on A's weights; 1 = as heavily as A's own samples'"),
    "sharing_ba": ("How heavily do task A's gradients land on the weights task B's loss depends on (A onto B), "
                   "relative to B's own other samples? (interference: mean over B x A / mean over j != j' in B; "
                   "direction-specific)",
                   "ratio that scales with A's gradient size relative to B's (x 1/c when B's gradients are x c): "
                   "partly a ratio of the tasks' gradient sizes; `sharing` is the size-free answer",
                   "larger = A's gradients land more heavily on B's weights; 1 = as heavily as B's own samples'"),
    "transfer": ("Does a natural-gradient step on task B's mean loss, restricted to this slice, lower or "
                 "raise task A's mean loss? (alignment: mean over A x B = <g_A, g_B> in the (I+lambda)^-1 metric)",
                 "minus the first-order change of A's loss per unit natural-gradient step on B",
                 "negative = conflict (B's step raises A's loss), positive = synergy"),
    "transfer_p_value": ("Is transfer different from 0? (two-sample U-statistic, Hoeffding variance, "
                         "Welch t, two-sided)", "1", "small = evidence"),
    "transfer_q_value": ("BH q-value of transfer_p_value over the alignment family", "1", "<= alpha: significant"),
    "transfer_direction": ("Do the tasks conflict or help each other in this slice (transfer_q_value <= alpha)?",
                           "1", "-1 conflict, +1 synergy, 0 not significant"),
    "cosine": ("Do the task-mean gradients point the same way, whatever their size? (transfer / the "
               "unbiased norms of the task means, in the same metric; NaN = no direction: a task-mean norm not "
               "distinguishable from 0, see attrs cosine_rule and cosine_min_z)",
               "cosine", "-1 opposite (conflict), 0 orthogonal, +1 same direction; NaN = no direction"),
    "cosine_norm_z": ("How clearly are both task-mean gradients distinguishable from 0 in this slice? (the smaller "
                      "of the two tasks' squared-norm estimates over its bootstrap standard error)",
                      "standard errors", "cosine is defined where this is >= cosine_min_z; larger = clearer"),
}
_CI_OF = ("effect", "sharing", "sharing_ab", "sharing_ba", "transfer", "cosine")  # these get _ci_low / _ci_high
_FLAGS = {"direction": "below_chance not_significant above_chance", "transfer_direction": "conflict not_significant synergy"}
_SCORE_OF = {"sharing": "interference", "cosine_norm_z": "alignment", "sharing_ab": "interference", "sharing_ba": "interference", "transfer": "alignment",
             "transfer_p_value": "alignment", "transfer_q_value": "alignment", "transfer_direction": "alignment",
             "cosine": "alignment"}
LAYER_COMBINE = "fisher"


def _effect_attrs(var: str) -> dict[str, Any]:
    base, bound = var, None
    for suffix in ("_ci_low", "_ci_high"):
        if var.endswith(suffix):
            base, bound = var[: -len(suffix)], suffix[4:]
    question, units, direction = _EFFECT_DOCS[base]
    attrs: dict[str, Any] = {"question": question, "units": units, "direction": direction}
    attrs["description"] = question
    if bound:
        attrs["description"] = f"two-way bootstrap percentile CI of {base}, {bound} bound (level: attr ci_level)"
    if var in _FLAGS:
        attrs.update(flag_values=[-1, 0, 1], flag_meanings=_FLAGS[var])
    if base in _SCORE_OF:
        attrs["score"] = _SCORE_OF[base]
    if base in ("cosine", "cosine_norm_z"):  # the no-direction rule, on the bounds too
        attrs.update(cosine_rule=st.COSINE_RULE, cosine_min_z=st.COSINE_MIN_Z)
    return attrs


# ---------------------------------------------------------------- family


def family_heads(kv_head: np.ndarray) -> np.ndarray:
    """For each query head, the query head that represents its KV group (its first member)."""
    kv_head = np.asarray(kv_head)
    first: dict[Any, int] = {}
    for h, g in enumerate(kv_head.tolist()):
        first.setdefault(g, h)
    return np.array([first[g] for g in kv_head.tolist()], dtype=np.int64)


def family_mask(blocks: list[str], kv_head: np.ndarray) -> np.ndarray:
    """in_family[block, head]: Q/O every head; K/V only the representative of each KV group."""
    rep = family_heads(kv_head)
    own = rep == np.arange(rep.size)
    return np.array([own if S.head_dim(b) == S.KV_HEAD else np.ones_like(own) for b in blocks], dtype=bool)


# ---------------------------------------------------------------- per-chunk kernel


@functools.lru_cache(maxsize=4)
def _weights(is_a_bytes: bytes, n_perm: int, n_boot: int, seed: int) -> tuple[np.ndarray, ...]:
    """Weight rows, regenerated from the seed on each worker (cached) instead of shipped.

    Returns (left [1+K, N], right [1+K, N], wa [1+B, N], wb [1+B, N]); row 0 of
    left/right is the observed labelling so T_obs and T^π come from the same matmul
    (a permutation equal to the observed labelling then ties exactly). wa/wb are
    `st.effect_weights`: row 0 every sample once, then the bootstrap resamples at the A
    (resp. B) positions, zero elsewhere.
    """
    is_a = np.frombuffer(is_a_bytes, dtype=bool)
    n_a, n_b = int(is_a.sum()), int((~is_a).sum())
    ind_a, ind_b = st.permutation_indicators(n_a, n_b, n_perm, seed)
    left = np.vstack([is_a.astype(np.float64), ind_a])
    right = np.vstack([(~is_a).astype(np.float64), ind_b])
    wa, wb = st.effect_weights(is_a, n_boot, seed)
    for a in (left, right, wa, wb):
        a.flags.writeable = False
    return left, right, wa, wb


def _chunk_sums(block: np.ndarray, *, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int, block_info=None) -> np.ndarray:
    """Unnormalised sums of one chunk [b, l, h, ni, nj] -> [b, l, h, 1, 1, width]: the
    1+K permutation cross sums, the (1+B) × 4 effect block sums (`st.pair_sums`; their
    A×B column is also the bootstrap of T) and the N A×B margins (`st.ab_margins`)."""
    (r0, r1), (c0, c1) = block_info[0]["array-location"][3:5]
    left, right, wa, wb = _weights(np.ascontiguousarray(is_a, dtype=bool).tobytes(), n_perm, n_boot, seed)
    from qkov.workers.device import resolve_device

    if resolve_device("auto") == "cuda":  # a GPU worker: the same sums as a few float64 matmuls on its device
        from qkov.workers.kernels import stat_sums

        return stat_sums(block, left, right, wa, wb, is_a, (r0, c0), "cuda")[..., None, None, :]
    perm = st.cross_sums(block, left[:, r0:r1], right[:, c0:c1])
    pairs = st.pair_sums(block, wa, wb, is_a, (r0, c0))
    margins = st.ab_margins(block, is_a, (r0, c0))
    flat = pairs.reshape(*pairs.shape[:-2], -1)
    return np.concatenate([perm, flat, margins], axis=-1)[..., None, None, :]


def slice_statistics(pooled: da.Array, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int) -> da.Array:
    """Lazy [b, l, h, 1+K + 4(1+B) + N] per slice: T_obs and the K null T^π (means), then
    the raw effect sums and the A×B margins (see `_chunk_sums`; split by `_split`)."""
    is_a = np.asarray(is_a, dtype=bool)
    scale = sums_scale(int(is_a.sum()), int((~is_a).sum()), n_perm, n_boot)
    chunks = pooled.chunks[:3] + ((1,) * len(pooled.chunks[3]), (1,) * len(pooled.chunks[4]), (scale.size,))
    sums = pooled.map_blocks(
        _chunk_sums, is_a=is_a, n_perm=n_perm, n_boot=n_boot, seed=seed,
        new_axis=5, chunks=chunks, dtype=np.float64, meta=np.empty((0,) * 6, np.float64),
    )
    return sums.sum(axis=(3, 4)) * scale


def sums_scale(n_a: int, n_b: int, n_perm: int, n_boot: int) -> np.ndarray:
    """The factor that turns a slice's summed `_chunk_sums` into what `_split` reads, one per
    entry (1+K + 4(1+B) + N of them): the K+1 cross sums become means; the effect sums and
    margins stay raw."""
    scale = np.ones(1 + n_perm + 4 * (1 + n_boot) + n_a + n_b)
    scale[: 1 + n_perm] = 1.0 / (n_a * n_b)
    return scale


# ---------------------------------------------------------------- assembling the dataset


def _pooled_mask(scores: xr.Dataset) -> np.ndarray:
    n = scores.sizes[S.SAMPLE_I]
    if S.IS_A in scores.coords:
        is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    else:  # store order is A then B
        is_a = np.arange(n) < int(scores.attrs[S.ATTR_N_A])
    for key, want in ((S.ATTR_N_A, int(is_a.sum())), (S.ATTR_N_B, int((~is_a).sum()))):
        if key in scores.attrs and int(scores.attrs[key]) != want:
            raise StatsStageError(f"scores attr {key}={scores.attrs[key]} disagrees with coord {S.IS_A} ({want})")
    if is_a.all() or not is_a.any():
        raise StatsStageError(f"need samples of both tasks in the pooled scores, got n_a={is_a.sum()}, n_b={(~is_a).sum()}")
    return is_a


def _split(values: np.ndarray, settings: StatsSpec) -> tuple[np.ndarray, ...]:
    """values [F, width] -> t_obs [F], t_null [K, F], pair sums [F, 1+B, 4], margins [F, N]."""
    k, b = settings.n_permutations, settings.n_bootstrap
    pairs = values[:, 1 + k : 1 + k + 4 * (1 + b)].reshape(-1, 1 + b, 4)
    return values[:, 0], values[:, 1 : 1 + k].T, pairs, values[:, 1 + k + 4 * (1 + b) :]


def _family_results(values: np.ndarray, settings: StatsSpec, is_a: np.ndarray) -> dict[str, np.ndarray]:
    """Tests over the family rows of values [F, width]."""
    t_obs, t_null, pairs, _ = _split(values, settings)
    t_boot = pairs[:, 1:, 0].T / (is_a.sum() * (~is_a).sum())
    p = st.p_values(t_obs, t_null, settings.alternative)
    q = st.bh_qvalues(p)
    lo, hi = st.percentile_interval(t_boot, settings.ci_level)
    return {
        "mean": t_obs,
        "null_mean": t_null.mean(axis=0),
        "p_value": p,
        "q_value": q,
        "significant": q <= settings.alpha,
        "p_fwer": st.maxt_pvalues(t_obs, t_null, settings.alternative),
        "ci_low": lo,
        "ci_high": hi,
    }


def _effect_results(score: str, values: np.ndarray, res: dict[str, np.ndarray], layer_of: np.ndarray,
                    settings: StatsSpec, is_a: np.ndarray) -> tuple[dict[str, np.ndarray], ...]:
    """Effect sizes and layer → head tests over one score's family rows: (per head with a
    score dim, per layer-block, per head of this score only)."""
    t_obs, t_null, pairs, margins = _split(values, settings)
    eff = st.effect_summary(score, pairs, margins, is_a, settings.n_bootstrap, settings.seed, settings.ci_level)
    lt = st.layer_head_tests(t_obs, t_null, layer_of, res["p_value"], settings.alternative, settings.alpha, LAYER_COMBINE)
    head = {k: eff[k] for k in ("effect", "effect_ci_low", "effect_ci_high")}
    head["direction"] = st.direction(eff["effect"], res["significant"])
    head.update({k: lt[k] for k in ("q_value_hier", "significant_hier")})
    layer = {k: lt[k] for k in ("layer_p_value", "layer_q_value", "layer_significant")}
    own = {k: v for k, v in eff.items() if not k.startswith("effect")}
    if score == "alignment":
        own["transfer_q_value"] = st.bh_qvalues(own["transfer_p_value"])
        own["transfer_direction"] = st.direction(own["transfer"], own["transfer_q_value"] <= settings.alpha)
    return head, layer, own


def _blank(shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
    if like.dtype == bool or like.dtype == np.int8:
        return np.zeros(shape, like.dtype)
    return np.full(shape, np.nan)


def sums_settings(settings: StatsSpec) -> dict:
    """What stored stats sums depend on (`schema.ATTR_SUMS_SETTINGS`): alpha and the
    alternative act later, on the sums."""
    return {"n_permutations": settings.n_permutations, "n_bootstrap": settings.n_bootstrap, "seed": settings.seed}


def _sums_match(scores: xr.Dataset, settings: StatsSpec) -> bool:
    """The stored sums (the score stage reduced each tile for the run's permutations and
    bootstrap draws) are those `settings` asks for."""
    return dict(scores.attrs.get(S.ATTR_SUMS_SETTINGS) or {}) == sums_settings(settings)


def _sums_groups(scores: xr.Dataset, settings: StatsSpec, groups: list) -> list:
    """`groups`, once the stored sums are known to be those of `settings` (keep_pairs = "top" |
    "none": no pair scores to compute others from)."""
    if not _sums_match(scores, settings):
        made, want = dict(scores.attrs.get(S.ATTR_SUMS_SETTINGS) or {}), sums_settings(settings)
        raise StatsStageError(
            f"this run kept no pair scores (keep_pairs = {scores.attrs.get(S.ATTR_KEEP_PAIRS)!r}): its score stage reduced them "
            f"to the statistics of {made}, and {want} asks for others. Use those settings (alpha and alternative may "
            "change), or rerun the job with [score] keep_pairs = \"all\" to keep the pair scores.")
    return groups


def compute_stats(scores: xr.Dataset, settings: StatsSpec, executor=None) -> xr.Dataset:
    """The stats dataset (loaded) from an opened `scores` dataset; no I/O besides reading it.

    Runs its Dask graph on `executor` if given, else on whatever Dask scheduler is current.
    """
    present = [s for s in S.SCORES if S.pooled_name(s) in scores or S.stat_sums_name(s) in scores]
    if not present:
        raise StatsStageError(
            f"scores has none of {[S.pooled_name(s) for s in S.SCORES]}; the label-permutation null needs the pooled matrices"
        )
    dims = (S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_I, S.SAMPLE_J)
    for s in (s for s in present if S.pooled_name(s) in scores):
        if scores[S.pooled_name(s)].dims != dims:
            raise StatsStageError(f"{S.pooled_name(s)} has dims {scores[S.pooled_name(s)].dims}, expected {dims}")
    is_a = _pooled_mask(scores)
    blocks = [str(b) for b in scores[S.BLOCK].values]
    n_head = scores.sizes[S.HEAD]
    kv_head = scores[S.KV_HEAD].values if S.KV_HEAD in scores.coords else np.arange(n_head)
    rep = family_heads(kv_head)
    in_fam = family_mask(blocks, kv_head)  # [block, head]
    reps = np.flatnonzero(rep == np.arange(n_head))
    groups = [  # (block indices, head indices): Q/O all heads, K/V one head per KV group
        (np.array([i for i, b in enumerate(blocks) if S.head_dim(b) == S.HEAD]), np.arange(n_head)),
        (np.array([i for i, b in enumerate(blocks) if S.head_dim(b) == S.KV_HEAD]), reps),
    ]
    groups = [(bi, hi) for bi, hi in groups if bi.size]
    args = (is_a, settings.n_permutations, settings.n_bootstrap, settings.seed)
    lazy = []
    for s in present:
        # sums the score tasks reduced for these settings (keep_pairs = "top" | "none", and float32
        # runs that kept their pairs): no N×N score is read back; other settings read the pairs
        if S.pooled_name(s) not in scores or (S.stat_sums_name(s) in scores and _sums_match(scores, settings)):
            sums = scores[S.stat_sums_name(s)].data
            lazy += [sums[bi][:, :, hi] for bi, hi in _sums_groups(scores, settings, groups)]
            continue
        arr = scores[S.pooled_name(s)].data
        arr = arr if isinstance(arr, da.Array) else da.from_array(arr, chunks=(1, 1, 1, -1, -1))
        lazy += [slice_statistics(arr[bi][:, :, hi], *args) for bi, hi in groups]
    if executor is None:
        import dask

        computed = dask.compute(*lazy)
    else:
        computed = executor.compute(*lazy)

    n_block, n_layer = len(blocks), scores.sizes[S.LAYER]
    shape = (len(present), n_block, n_layer, n_head)
    out = {v: np.full(shape, np.nan) for v in _VAR_DOCS if v != "in_family"}
    fam3 = np.broadcast_to(in_fam[:, None, :], (n_block, n_layer, n_head))
    fam_b, fam_l, _ = np.nonzero(fam3)  # family rows, in the order full[fam3] lists them
    layer_keys, layer_of = np.unique(fam_b * n_layer + fam_l, return_inverse=True)  # one group per (block, layer)
    width = computed[0].shape[-1]
    head_out: dict[str, np.ndarray] = {}  # (score, block, layer, head)
    layer_out: dict[str, np.ndarray] = {}  # (score, block, layer)
    own_out: dict[str, np.ndarray] = {}  # (block, layer, head), one score's effects
    for si, score in enumerate(present):
        full = np.full((n_block, n_layer, n_head, width), np.nan)
        for (bi, hi), res in zip(groups, computed[si * len(groups) : (si + 1) * len(groups)]):
            full[np.ix_(bi, np.arange(n_layer), hi)] = res
        res = _family_results(full[fam3], settings, is_a)
        for var, vals in res.items():
            out[var][si][fam3] = vals
        head, layer, own = _effect_results(score, full[fam3], res, layer_of, settings, is_a)
        for var, vals in head.items():
            head_out.setdefault(var, _blank(shape, vals))[si][fam3] = vals
        for var, vals in layer.items():
            layer_out.setdefault(var, _blank(shape[:3], vals))[si].flat[layer_keys] = vals
        for var, vals in own.items():
            own_out.setdefault(var, _blank(shape[1:], vals))[fam3] = vals
        # duplicated K/V query heads repeat their KV head
        for d in (out, head_out):
            for var in d:
                d[var][si] = np.where(fam3, d[var][si], d[var][si][:, :, rep])
    for var in own_out:
        own_out[var] = np.where(fam3, own_out[var], own_out[var][:, :, rep])
    out["significant"] = out["significant"].astype(bool)

    vdims = (S.SCORE, S.BLOCK, S.LAYER, S.HEAD)
    data_vars = {v: (vdims, out[v], _var_attrs(v)) for v in out}
    data_vars["in_family"] = ((S.BLOCK, S.HEAD), in_fam, _var_attrs("in_family"))
    data_vars.update({v: (vdims, a, _effect_attrs(v)) for v, a in head_out.items()})
    data_vars.update({v: ((S.SCORE, S.BLOCK, S.LAYER), a, _effect_attrs(v)) for v, a in layer_out.items()})
    data_vars.update({v: ((S.BLOCK, S.LAYER, S.HEAD), a, _effect_attrs(v)) for v, a in own_out.items()})
    cfg = settings.model_dump(mode="json")
    attrs: dict[str, Any] = dict(cfg)
    attrs.update({
        "family_size": int(fam3.sum()),
        "family": "unique (block, layer, head) slices, K/V once per KV head; BH and max-T per score",
        "effects": "sums over A x B, B x A and within each task (pairs of different samples) of the pooled "
                   "scores, with the same two-way bootstrap resamples as ci_low/ci_high; effect uses the exact "
                   "mean over all label permutations (null_mean is its Monte Carlo estimate)",
        "transfer_test": "two-sample U-statistic variance (row and column means of the A x B block), Welch t, "
                         "two-sided; BH over the alignment family",
        "layer_test": f"per (block, layer): nonparametric combination ({LAYER_COMBINE}) of the family heads' "
                      "permutation p-values over the same permutations; layer -> head: Benjamini & Bogomolov "
                      "(2014) at alpha",
        S.ATTR_N_A: int(is_a.sum()),
        S.ATTR_N_B: int((~is_a).sum()),
    })
    attrs.update(provenance(cfg, config_hash(cfg), stage="stats", scores_provenance=scores.attrs.get(S.ATTR_PROVENANCE)))
    coords = {
        S.SCORE: present,
        S.BLOCK: blocks,
        S.LAYER: scores[S.LAYER].values,
        S.HEAD: scores[S.HEAD].values,
        S.KV_HEAD: (S.HEAD, np.asarray(kv_head)),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


# ---------------------------------------------------------------- the stage


def _check_target(store: RunStore, group: str, settings: StatsSpec, replace: bool,
                  excluded: list[str] | None = None) -> None:
    attrs = store.group_attrs(group)
    if attrs is None or replace or attrs.get(S.ATTR_COMPLETE) is not True:
        return  # absent, explicitly replaced, or an interrupted write: overwrite
    old = {k: attrs.get(k) for k in SETTINGS_KEYS}
    new = settings.model_dump(mode="json")
    # the samples left out (`--exclude`) are a setting too: never silently swapped
    old[S.ATTR_EXCLUDED], new[S.ATTR_EXCLUDED] = sorted(attrs.get(S.ATTR_EXCLUDED) or []), sorted(excluded or [])
    if old != new:
        diff = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in (*SETTINGS_KEYS, S.ATTR_EXCLUDED) if old[k] != new[k])
        raise StatsStageError(
            f"group '{group}' in {store.path} holds statistics with different settings ({diff}); "
            f"pass {option('replace')} to overwrite it, or {option('name', 'NAME')} to write 'stats_NAME' beside it"
        )


def _require_finite(store: RunStore, ds: xr.Dataset) -> None:
    """Scores hold only kept samples (declared skipped ones are left out), so a non-finite score
    means a damaged store (a missing chunk reads as NaN): refused before anything is written.
    Every score of a slice enters its mean, so the means show it at no extra cost."""
    fam = ds["in_family"].broadcast_like(ds["mean"]).values.astype(bool)
    bad = fam & ~np.isfinite(ds["mean"].values)
    if "null_mean" in ds:  # the pooled scores (A∪B) enter every permutation's statistic
        bad |= fam & ~np.isfinite(ds["null_mean"].transpose(*ds["mean"].dims).values)
    if bad.any():
        where = [f"{sc}/{b} layer {int(l)} head {int(h)}" for sc, b, l, h in zip(*(
            ds[d].values[i] for d, i in zip(ds["mean"].dims, np.nonzero(bad))))][:5]
        raise StatsStageError(
            f"{store.path}: the scores of {int(bad.sum())} slice(s) are not finite (e.g. {', '.join(where)}); the run's "
            "gradients or scores are damaged (a missing or corrupted chunk). `qkov run JOB.toml --resume` recomputes missing "
            "chunks; otherwise rerun with --overwrite."
        )


def run_stats(store: RunStore, settings: StatsSpec, executor=None, *, name: str | None = None,
              replace: bool = False, exclude: "list[str] | None" = None) -> xr.Dataset:
    """The stats stage: statistics of a run's scores into `stats` (or `stats_<name>`).

    Same settings as an existing group: recomputed and overwritten. Different settings:
    an error unless `replace` or a new `name`. The caller holds the run's lock (`run_job`,
    `rerun_stats`). Returns the (loaded) dataset.
    """
    group = S.stats_group(name)
    scores = full = store.open_dataset(S.SCORES_GROUP, "the statistics")
    dropped = np.zeros(0, dtype=np.int64)
    if exclude:  # `--exclude`: the stored scores without those samples' rows and columns (Fisher unchanged)
        from .diagnostics import resolve_samples, without_samples

        dropped = resolve_samples(full, exclude)
        scores = without_samples(full, dropped)
    excluded = [str(x) for x in full[S.SAMPLE_I].values[dropped]]
    task_of = np.where(np.asarray(full[S.IS_A].values, dtype=bool), str(full.attrs.get(S.ATTR_TASK_A)),
                       str(full.attrs.get(S.ATTR_TASK_B)))
    _check_target(store, group, settings, replace, excluded)
    try:
        ds = compute_stats(scores, settings, executor)
    except ValueError as e:
        raise corrupt_chunk_error(e, store.path) or e
    _require_finite(store, ds)
    ds.attrs[S.ATTR_EXCLUDED] = excluded  # always recorded, [] when every sample took part
    ds.attrs[S.ATTR_EXCLUDED_TASKS] = [str(t) for t in task_of[dropped]]
    store.write_dataset(ds, group, complete=True)
    ds.attrs[S.ATTR_COMPLETE] = True  # as stored
    return ds


def stats_settings(store: RunStore, name: str | None = None, **overrides: Any) -> StatsSpec:
    """The settings of the statistics `stats` (or `stats_<name>`) with `overrides` (None = keep)
    applied and validated: the group's own settings where it holds finished statistics, else the
    run's [stats] settings. So a rerun of a named group changes only what is passed, and its
    refusal names only those differences. Errors name the option (`--n-permutations`)."""
    from pydantic import ValidationError

    base = dict(store.config().get("stats", {}))
    held = store.group_attrs(S.stats_group(name))
    if held is not None and held.get(S.ATTR_COMPLETE) is True:
        base.update({k: held[k] for k in SETTINGS_KEYS if k in held})
    unknown = sorted(set(overrides) - set(SETTINGS_KEYS))
    if unknown:
        raise UsageError(f"unknown statistics settings {unknown}; known: {list(SETTINGS_KEYS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return StatsSpec(**{**base, **given})
    except ValidationError as e:
        raise UsageError("; ".join(f"{param('_'.join(str(x) for x in er['loc']))}: {er['msg']}"
                                   for er in e.errors())) from None


def rerun_stats(store: RunStore, executor=None, *, name: str | None = None, replace: bool = False,
                exclude: "list[str] | None" = None, **overrides: Any) -> xr.Dataset:
    """`qkov stats`: rerun the statistics of an existing run with new settings (the stored ones,
    `overrides` applied), holding the run's lock so that it never writes beside a running
    `qkov run`. The CLI and `qkov.run_stats` both call this. What the file system refuses (a
    full disk, a read-only mount) is a StoreError naming the fix, for the API as for the CLI."""
    from .errors import os_error

    store.require(S.SCORES_GROUP, "the statistics")
    settings = stats_settings(store, name, **overrides)
    try:
        with store.lock():
            return run_stats(store, settings, executor, name=name, replace=replace, exclude=exclude)
    except OSError as e:
        refused = os_error(e, store.path)
        if refused is None:
            raise
        raise refused from None
