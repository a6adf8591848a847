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

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from . import schema as S
from . import stats as st
from .errors import StatsStageError, UsageError, corrupt_chunk_error, option, param
from .schema import LAYER_COMBINE, STATS_VAR_DOCS as _VAR_DOCS, effect_attrs as _effect_attrs, stats_var_attrs as _var_attrs
from .slice_reductions import moment_statistics, slice_statistics, sums_settings
from .spec import StatsSpec, config_hash
from .store import RunStore, provenance

SETTINGS_KEYS: tuple[str, ...] = tuple(StatsSpec.model_fields)
# statistics made from per-sample moments (answers, sketch mode): what they compute exactly, what approximately
ANSWERS_EXACT = ("every point estimate (mean, effect, sharing and its two directions, transfer, cosine where "
                 "defined) and the transfer test (transfer_p_value, transfer_q_value, transfer_direction)")
ANSWERS_PROJECTION = ("label permutations of the A x B mean's first-order (Hajek) projection, a test exact in level "
                      "for that projection; null_mean is its permutation mean")
ANSWERS_SKETCHED = ("label permutations of the A x B mean of the sketched {score} (k = {k}; the pair scores "
                    "estimated from sketched operands), as are its top pairs")
ANSWERS_CIS = ("the CIs and cosine_norm_z: the same two-way bootstrap resamples applied to each mean's "
               "first-order expansion in the resample weights")


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
    obs, perms, boot, margins = S.stat_sums_parts(settings.n_permutations, settings.n_bootstrap)
    pairs = values[:, boot].reshape(-1, 1 + settings.n_bootstrap, 4)
    return values[:, obs.start], values[:, perms].T, pairs, values[:, margins]


def _family_results(values: np.ndarray, settings: StatsSpec, is_a: np.ndarray, moments: bool = False) -> dict[str, np.ndarray]:
    """Tests over the family rows of values [F, width]. moments=True (answers mode): the sums
    came from per-sample moments, whose labelling rows are T's first-order projection; the
    mean is then the exact A×B sum's, not the projection's."""
    t_obs, t_null, pairs, _ = _split(values, settings)
    t_boot = pairs[:, 1:, 0].T / (is_a.sum() * (~is_a).sum())
    p = st.p_values(t_obs, t_null, settings.alternative)
    q = st.bh_qvalues(p)
    lo, hi = st.percentile_interval(t_boot, settings.ci_level)
    return {
        "mean": pairs[:, 0, 0] / (is_a.sum() * (~is_a).sum()) if moments else t_obs,
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


@dataclass(frozen=True)
class _Family:
    """The multiple-testing family of a scores dataset: each unique (block, layer, head) slice once."""
    blocks: list[str]
    kv_head: np.ndarray
    rep: np.ndarray  # per query head, the query head standing for its KV group
    in_fam: np.ndarray  # [block, head]
    groups: list  # (block indices, head indices): Q/O all heads, K/V one head per KV group
    fam3: np.ndarray  # [block, layer, head]
    layer_keys: np.ndarray  # the (block, layer) groups of the family rows, flat
    layer_of: np.ndarray  # per family row (in the order full[fam3] lists them), its (block, layer) group

    @classmethod
    def of(cls, scores: xr.Dataset) -> "_Family":
        blocks = [str(b) for b in scores[S.BLOCK].values]
        n_head, n_layer = scores.sizes[S.HEAD], scores.sizes[S.LAYER]
        kv_head = scores[S.KV_HEAD].values if S.KV_HEAD in scores.coords else np.arange(n_head)
        rep = family_heads(kv_head)
        in_fam = family_mask(blocks, kv_head)
        groups = [
            (np.array([i for i, b in enumerate(blocks) if S.head_dim(b) == S.HEAD]), np.arange(n_head)),
            (np.array([i for i, b in enumerate(blocks) if S.head_dim(b) == S.KV_HEAD]), np.flatnonzero(rep == np.arange(n_head))),
        ]
        fam3 = np.broadcast_to(in_fam[:, None, :], (len(blocks), n_layer, n_head))
        fam_b, fam_l, _ = np.nonzero(fam3)
        layer_keys, layer_of = np.unique(fam_b * n_layer + fam_l, return_inverse=True)
        return cls(blocks, kv_head, rep, in_fam, [(bi, hi) for bi, hi in groups if bi.size], fam3, layer_keys, layer_of)


def _present_scores(scores: xr.Dataset) -> list[str]:
    """The scores with pooled matrices or stored sums to test, their dims checked."""
    present = [s for s in S.SCORES if any(v(s) in scores for v in (S.pooled_name, S.stat_sums_name, S.moments_name))]
    if not present:
        raise StatsStageError(
            f"scores has none of {[S.pooled_name(s) for s in S.SCORES]}; the label-permutation null needs the pooled matrices"
        )
    dims = (S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_I, S.SAMPLE_J)
    for s in (s for s in present if S.pooled_name(s) in scores):
        if scores[S.pooled_name(s)].dims != dims:
            raise StatsStageError(f"{S.pooled_name(s)} has dims {scores[S.pooled_name(s)].dims}, expected {dims}")
    return present


def _lazy_sums(scores: xr.Dataset, score: str, settings: StatsSpec, groups: list, is_a: np.ndarray) -> list:
    """One score's sums per family group: those the score tasks reduced for these settings
    (keep_pairs = "top" | "none", and float32 runs that kept their pairs: no N×N score is read
    back), else reduced from the pooled matrices; in answers mode from the per-sample moments
    (for any settings: they hold no permutation or resample)."""
    if S.moments_name(score) in scores:
        mom = scores[S.moments_name(score)].data
        out = [moment_statistics(mom[bi][:, :, hi], is_a, settings.n_permutations, settings.n_bootstrap, settings.seed,
                                 labelled=score == "interference") for bi, hi in groups]
        source = _labels_source(scores, score, settings)  # the labels rows of sketched pair scores instead
        if source is not None:
            cut = S.stat_sums_parts(settings.n_permutations, settings.n_bootstrap)[1].stop
            if source == "pooled":  # sketch mode, keep_pairs = "all": any settings
                arr = scores[S.pooled_name(score)].data
                sk = [slice_statistics(arr[bi][:, :, hi], is_a, settings.n_permutations, settings.n_bootstrap, settings.seed)
                      for bi, hi in groups]
            else:  # reduced by the score stage for these settings
                sk = [scores[S.stat_sums_name(score)].data[bi][:, :, hi] for bi, hi in groups]
            out = [da.concatenate([k[..., :cut], m[..., cut:]], axis=-1) for k, m in zip(sk, out)]
        return out
    if S.pooled_name(score) not in scores or (S.stat_sums_name(score) in scores and _sums_match(scores, settings)):
        sums = scores[S.stat_sums_name(score)].data
        return [sums[bi][:, :, hi] for bi, hi in _sums_groups(scores, settings, groups)]
    arr = scores[S.pooled_name(score)].data
    arr = arr if isinstance(arr, da.Array) else da.from_array(arr, chunks=(1, 1, 1, -1, -1))
    return [slice_statistics(arr[bi][:, :, hi], is_a, settings.n_permutations, settings.n_bootstrap, settings.seed)
            for bi, hi in groups]


def _approximate(scores: xr.Dataset, settings: StatsSpec, present: list[str]) -> str:
    """What the statistics of a run with per-sample moments compute approximately, per score's labels test."""
    k = scores.attrs.get("sketch_dim", "sketch_dim")
    labels = []
    for score in present:
        if _labels_source(scores, score, settings) is not None:
            labels.append(f"{score}'s p_value, q_value, p_fwer, direction and layer tests: {ANSWERS_SKETCHED.format(k=k, score=score)}")
        elif score == "interference":
            labels.append(f"interference's p_value, q_value, p_fwer, direction and layer tests: {ANSWERS_PROJECTION}")
        else:
            labels.append("the alignment's labels-null test needs pair scores: NaN (its answer is the transfer test)")
    return ANSWERS_CIS + "; " + "; ".join(labels)


def _labels_source(scores: xr.Dataset, score: str, settings: StatsSpec) -> str | None:
    """Where the labels test of a score with per-sample moments comes from, when not from the
    moments' projection: "sums" (the sketched pair scores as the score stage reduced them for
    these settings: sketch mode, or answers mode with keep_pairs = "top"), else "pooled"
    (sketch mode's stored sketched matrices, for other settings), else None."""
    if S.moments_name(score) not in scores:
        return None
    if S.stat_sums_name(score) in scores and _sums_match(scores, settings):  # no N×N score read back
        return "sums"
    return "pooled" if S.pooled_name(score) in scores else None


def _results(computed: list, present: list[str], fam: _Family, settings: StatsSpec,
             is_a: np.ndarray, from_moments: bool = False) -> tuple[dict[str, np.ndarray], ...]:
    """The tests and effects of every present score from the computed family-group sums:
    (the tests per score and head, the effects per score and head, per score and layer, per
    head of one score only), K/V query heads repeating their KV head."""
    n_block, n_layer, n_head = fam.fam3.shape
    shape = (len(present), n_block, n_layer, n_head)
    fam3, n_groups = fam.fam3, len(fam.groups)
    out = {v: np.full(shape, np.nan) for v in _VAR_DOCS if v != "in_family"}
    head_out: dict[str, np.ndarray] = {}  # (score, block, layer, head)
    layer_out: dict[str, np.ndarray] = {}  # (score, block, layer)
    own_out: dict[str, np.ndarray] = {}  # (block, layer, head), one score's effects
    for si, score in enumerate(present):
        full = np.full((n_block, n_layer, n_head, computed[0].shape[-1]), np.nan)
        for (bi, hi), res in zip(fam.groups, computed[si * n_groups : (si + 1) * n_groups]):
            full[np.ix_(bi, np.arange(n_layer), hi)] = res
        res = _family_results(full[fam3], settings, is_a, moments=from_moments)
        head, layer, own = _effect_results(score, full[fam3], res, fam.layer_of, settings, is_a)
        for var, vals in res.items():
            out[var][si][fam3] = vals
        for var, vals in head.items():
            head_out.setdefault(var, _blank(shape, vals))[si][fam3] = vals
        for var, vals in layer.items():
            layer_out.setdefault(var, _blank(shape[:3], vals))[si].flat[fam.layer_keys] = vals
        for var, vals in own.items():
            own_out.setdefault(var, _blank(shape[1:], vals))[fam3] = vals
        for d in (out, head_out):  # duplicated K/V query heads repeat their KV head
            for var in d:
                d[var][si] = np.where(fam3, d[var][si], d[var][si][:, :, fam.rep])
    for var in own_out:
        own_out[var] = np.where(fam3, own_out[var], own_out[var][:, :, fam.rep])
    out["significant"] = out["significant"].astype(bool)
    return out, head_out, layer_out, own_out


def compute_stats(scores: xr.Dataset, settings: StatsSpec, executor=None) -> xr.Dataset:
    """The stats dataset (loaded) from an opened `scores` dataset; no I/O besides reading it.

    Runs its Dask graph on `executor` if given, else on whatever Dask scheduler is current.
    """
    present = _present_scores(scores)
    is_a = _pooled_mask(scores)
    fam = _Family.of(scores)
    lazy = [x for s in present for x in _lazy_sums(scores, s, settings, fam.groups, is_a)]
    if executor is None:
        import dask

        computed = dask.compute(*lazy)
    else:
        computed = executor.compute(*lazy)
    from_moments = any(S.moments_name(s) in scores for s in present)
    tests, per_head, per_layer, own = _results(computed, present, fam, settings, is_a, from_moments)
    vdims = (S.SCORE, S.BLOCK, S.LAYER, S.HEAD)
    data_vars = {v: (vdims, a, _var_attrs(v)) for v, a in tests.items()}
    data_vars["in_family"] = ((S.BLOCK, S.HEAD), fam.in_fam, _var_attrs("in_family"))
    data_vars.update({v: (vdims, a, _effect_attrs(v)) for v, a in per_head.items()})
    data_vars.update({v: ((S.SCORE, S.BLOCK, S.LAYER), a, _effect_attrs(v)) for v, a in per_layer.items()})
    data_vars.update({v: ((S.BLOCK, S.LAYER, S.HEAD), a, _effect_attrs(v)) for v, a in own.items()})
    coords = {
        S.SCORE: present,
        S.BLOCK: fam.blocks,
        S.LAYER: scores[S.LAYER].values,
        S.HEAD: scores[S.HEAD].values,
        S.KV_HEAD: (S.HEAD, np.asarray(fam.kv_head)),
    }
    attrs = _stats_attrs(scores, settings, int(fam.fam3.sum()), is_a)
    if from_moments:
        attrs.update(mode=scores.attrs.get(S.ATTR_MODE, "answers"), exact=ANSWERS_EXACT,
                     approximate=_approximate(scores, settings, present))
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _stats_attrs(scores: xr.Dataset, settings: StatsSpec, family_size: int, is_a: np.ndarray) -> dict[str, Any]:
    """The stats group's attrs: its settings, how it was computed, and the provenance."""
    cfg = settings.model_dump(mode="json")
    attrs: dict[str, Any] = dict(cfg)
    attrs.update({
        "family_size": family_size,
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
    return attrs


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
    if "null_mean" in ds and "approximate" not in ds.attrs:  # the pooled scores (A∪B) enter every permutation's statistic
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
        from .exclude import resolve_samples, without_samples

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
