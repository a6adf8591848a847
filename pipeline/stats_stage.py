"""The stats stage: permutation null, BH-FDR, max-T and bootstrap CIs per attention slice.

Reads only the `scores` group of a run, writes only `stats` (or `stats_<name>`).
Per slice chunk, one Dask task computes every weighted cross sum it needs in one pass
over the pooled matrix (see `pipeline.stats`): row 0 = the observed labelling, rows
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
import re
import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

from pipeline import schema as S
from pipeline import stats as st
from pipeline.spec import StatsSpec, config_hash
from pipeline.store import provenance, zarr_store

IS_A = "is_a"  # bool coord on sample_i marking task-A samples in the pooled matrices
ATTR_N_A = "n_a"
ATTR_N_B = "n_b"
SETTINGS_KEYS: tuple[str, ...] = tuple(StatsSpec.model_fields)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_VAR_DOCS = {
    "mean": "T = mean over i in A, j in B of the score",
    "null_mean": "mean of T over the label permutations (what chance gives); mean above it = more than chance",
    "p_value": "permutation p-value, (1 + #exceedances) / (1 + n_permutations)",
    "q_value": "Benjamini-Hochberg q-value over the family (per score)",
    "significant": "q_value <= alpha",
    "p_fwer": "Westfall-Young single-step max-T adjusted p-value over the family (per score)",
    "ci_low": "two-way bootstrap percentile CI of T, lower bound",
    "ci_high": "two-way bootstrap percentile CI of T, upper bound",
    "in_family": "False for K/V query-head entries that repeat their KV head",
}


class StatsStageError(RuntimeError):
    """The stats stage cannot run as asked; the message says what to do."""


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

    Returns (left [1+K, N], right [1+K, N], boot_a [B, N], boot_b [B, N]); row 0 of
    left/right is the observed labelling so T_obs and T^π come from the same matmul
    (a permutation equal to the observed labelling then ties exactly). Bootstrap
    weights sit at the A (resp. B) positions, zero elsewhere.
    """
    is_a = np.frombuffer(is_a_bytes, dtype=bool)
    n_a, n_b = int(is_a.sum()), int((~is_a).sum())
    ind_a, ind_b = st.permutation_indicators(n_a, n_b, n_perm, seed)
    left = np.vstack([is_a.astype(np.float64), ind_a])
    right = np.vstack([(~is_a).astype(np.float64), ind_b])
    w_a, w_b = st.bootstrap_weights(n_a, n_b, n_boot, seed)
    boot_a = np.zeros((n_boot, is_a.size))
    boot_b = np.zeros((n_boot, is_a.size))
    boot_a[:, is_a] = w_a
    boot_b[:, ~is_a] = w_b
    for a in (left, right, boot_a, boot_b):
        a.flags.writeable = False
    return left, right, boot_a, boot_b


def _chunk_sums(block: np.ndarray, *, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int, block_info=None) -> np.ndarray:
    """Unnormalised cross sums of one chunk [b, l, h, ni, nj] -> [b, l, h, 1, 1, 1+K+B]."""
    (r0, r1), (c0, c1) = block_info[0]["array-location"][3:5]
    left, right, boot_a, boot_b = _weights(np.ascontiguousarray(is_a, dtype=bool).tobytes(), n_perm, n_boot, seed)
    perm = st.cross_sums(block, left[:, r0:r1], right[:, c0:c1])
    # bootstrap only touches the A×B part of the chunk: a 4× smaller matmul for A/B halves
    rows = r0 + np.flatnonzero(is_a[r0:r1])
    cols = c0 + np.flatnonzero(~is_a[c0:c1])
    sub = block[..., rows - r0, :][..., cols - c0]
    boot = st.cross_sums(sub, boot_a[:, rows], boot_b[:, cols])
    return np.concatenate([perm, boot], axis=-1)[..., None, None, :]


def slice_statistics(pooled: da.Array, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int) -> da.Array:
    """Lazy [b, l, h, 1+K+B]: T_obs, the K null T^π, then B bootstrap T* per slice."""
    is_a = np.asarray(is_a, dtype=bool)
    n_a, n_b = int(is_a.sum()), int((~is_a).sum())
    width = 1 + n_perm + n_boot
    chunks = pooled.chunks[:3] + ((1,) * len(pooled.chunks[3]), (1,) * len(pooled.chunks[4]), (width,))
    sums = pooled.map_blocks(
        _chunk_sums, is_a=is_a, n_perm=n_perm, n_boot=n_boot, seed=seed,
        new_axis=5, chunks=chunks, dtype=np.float64, meta=np.empty((0,) * 6, np.float64),
    )
    return sums.sum(axis=(3, 4)) / (n_a * n_b)


# ---------------------------------------------------------------- assembling the dataset


def _pooled_mask(scores: xr.Dataset) -> np.ndarray:
    n = scores.sizes[S.SAMPLE_I]
    if IS_A in scores.coords:
        is_a = np.asarray(scores[IS_A].values, dtype=bool)
    else:  # store order is A then B
        is_a = np.arange(n) < int(scores.attrs[ATTR_N_A])
    for key, want in ((ATTR_N_A, int(is_a.sum())), (ATTR_N_B, int((~is_a).sum()))):
        if key in scores.attrs and int(scores.attrs[key]) != want:
            raise StatsStageError(f"scores attr {key}={scores.attrs[key]} disagrees with coord {IS_A} ({want})")
    if is_a.all() or not is_a.any():
        raise StatsStageError(f"need samples of both tasks in the pooled scores, got n_a={is_a.sum()}, n_b={(~is_a).sum()}")
    return is_a


def _family_results(values: np.ndarray, settings: StatsSpec) -> dict[str, np.ndarray]:
    """Tests over the family rows of values [F, 1+K+B]."""
    k = settings.n_permutations
    t_obs, t_null, t_boot = values[:, 0], values[:, 1 : 1 + k].T, values[:, 1 + k :].T
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


def compute_stats(scores: xr.Dataset, settings: StatsSpec, *, client=None) -> xr.Dataset:
    """The stats dataset (loaded) from an opened `scores` dataset; no I/O besides reading it.

    Runs on `client` if given, else on whatever Dask scheduler is current.
    """
    present = [s for s in S.SCORES if S.pooled_name(s) in scores]
    if not present:
        raise StatsStageError(
            f"scores has none of {[S.pooled_name(s) for s in S.SCORES]}; the label-permutation null needs the pooled matrices"
        )
    dims = (S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_I, S.SAMPLE_J)
    for s in present:
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
        arr = scores[S.pooled_name(s)].data
        arr = arr if isinstance(arr, da.Array) else da.from_array(arr, chunks=(1, 1, 1, -1, -1))
        lazy += [slice_statistics(arr[bi][:, :, hi], *args) for bi, hi in groups]
    computed = dask.compute(*lazy, scheduler=client) if client is not None else dask.compute(*lazy)

    n_block, n_layer = len(blocks), scores.sizes[S.LAYER]
    shape = (len(present), n_block, n_layer, n_head)
    out = {v: np.full(shape, np.nan) for v in _VAR_DOCS if v != "in_family"}
    fam3 = np.broadcast_to(in_fam[:, None, :], (n_block, n_layer, n_head))
    for si in range(len(present)):
        full = np.full((n_block, n_layer, n_head, 1 + settings.n_permutations + settings.n_bootstrap), np.nan)
        for (bi, hi), res in zip(groups, computed[si * len(groups) : (si + 1) * len(groups)]):
            full[np.ix_(bi, np.arange(n_layer), hi)] = res
        for var, vals in _family_results(full[fam3], settings).items():
            out[var][si][fam3] = vals
        # duplicated K/V query heads repeat their KV head
        for var in out:
            out[var][si] = np.where(fam3, out[var][si], out[var][si][:, :, rep])
    out["significant"] = out["significant"].astype(bool)

    vdims = (S.SCORE, S.BLOCK, S.LAYER, S.HEAD)
    data_vars = {v: (vdims, out[v], {"description": _VAR_DOCS[v]}) for v in out}
    data_vars["in_family"] = ((S.BLOCK, S.HEAD), in_fam, {"description": _VAR_DOCS["in_family"]})
    cfg = settings.model_dump(mode="json")
    attrs: dict[str, Any] = dict(cfg)
    attrs.update({
        "family_size": int(fam3.sum()),
        "family": "unique (block, layer, head) slices, K/V once per KV head; BH and max-T per score",
        ATTR_N_A: int(is_a.sum()),
        ATTR_N_B: int((~is_a).sum()),
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


# ---------------------------------------------------------------- store I/O


def stats_group_name(name: str | None = None) -> str:
    if name is None:
        return S.STATS
    if not _NAME_RE.match(name):
        raise StatsStageError(f"stats name {name!r} must be letters, digits, '_', '.', '-' (it becomes group 'stats_<name>')")
    return f"{S.STATS}_{name}"


def _group_attrs(run: str, group: str, storage_options) -> dict | None:
    """The group's own attrs (not consolidated copies, which may be stale), or None if absent."""
    try:
        g = zarr.open_group(zarr_store(run, storage_options, read_only=True), path=group, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, KeyError):
        return None
    return dict(g.attrs)


def open_scores(run: str, *, storage_options=None) -> xr.Dataset:
    """The run's `scores` group, lazily; refuses a missing, incomplete or foreign-schema one."""
    attrs = _group_attrs(run, S.SCORES_GROUP, storage_options)
    if attrs is None:
        raise StatsStageError(f"{run} has no '{S.SCORES_GROUP}' group: run the score stage first (qkov run JOB.toml)")
    if attrs.get(S.ATTR_COMPLETE) is not True:
        raise StatsStageError(
            f"'{S.SCORES_GROUP}' in {run} is not marked complete ({S.ATTR_COMPLETE} != True): "
            "the score stage was interrupted; finish it (qkov run JOB.toml --resume) before running stats"
        )
    version = attrs.get(S.ATTR_SCHEMA, S.SCHEMA_VERSION)
    if version != S.SCHEMA_VERSION:
        raise StatsStageError(f"'{S.SCORES_GROUP}' in {run} has store schema version {version}; this qkov reads {S.SCHEMA_VERSION}")
    return xr.open_zarr(zarr_store(run, storage_options, read_only=True), group=S.SCORES_GROUP, consolidated=False)


def _check_target(run: str, group: str, settings: StatsSpec, replace: bool, storage_options) -> None:
    attrs = _group_attrs(run, group, storage_options)
    if attrs is None or replace or attrs.get(S.ATTR_COMPLETE) is not True:
        return  # absent, explicitly replaced, or an interrupted write: overwrite
    old = {k: attrs.get(k) for k in SETTINGS_KEYS}
    new = settings.model_dump(mode="json")
    if old != new:
        diff = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in SETTINGS_KEYS if old[k] != new[k])
        raise StatsStageError(
            f"group '{group}' in {run} holds statistics with different settings ({diff}); "
            "pass replace=True (--replace) to overwrite it, or a name (--name) to write 'stats_<name>' beside it"
        )


def _write(ds: xr.Dataset, run: str, group: str, storage_options) -> None:
    store = zarr_store(run, storage_options)
    with warnings.catch_warnings():
        # str coords (block, score) have no Zarr v3 spec dtype yet (the scores group has the
        # same); consolidated metadata is a zarr-python extension, used as xarray does
        warnings.filterwarnings("ignore", category=zarr.errors.UnstableSpecificationWarning)
        warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning, message="Consolidated metadata")
        ds.to_zarr(store, group=group, mode="w", consolidated=False, zarr_format=3)
        g = zarr.open_group(store, path=group, mode="r+", use_consolidated=False)
        g.attrs[S.ATTR_COMPLETE] = True  # last, so a crash mid-write leaves it unmarked
        if zarr.open_group(store, mode="r").metadata.consolidated_metadata is not None:
            # keep the root's consolidated view (used by open_datatree) in step with the new group
            zarr.consolidate_metadata(store)


def run_stats(
    run: str,
    settings: StatsSpec,
    *,
    client=None,
    name: str | None = None,
    replace: bool = False,
    storage_options=None,
) -> xr.Dataset:
    """Compute the statistics of a run's scores and write them to `stats` (or `stats_<name>`).

    Same settings as an existing group: recomputed and overwritten. Different settings:
    an error unless `replace` or a new `name`. Returns the (loaded) dataset.
    """
    group = stats_group_name(name)
    scores = open_scores(run, storage_options=storage_options)
    _check_target(run, group, settings, replace, storage_options)
    ds = compute_stats(scores, settings, client=client)
    _write(ds, run, group, storage_options)
    ds.attrs[S.ATTR_COMPLETE] = True  # as stored
    return ds


def open_stats(run: str, name: str | None = None, *, storage_options=None) -> xr.Dataset:
    """A written stats group, loaded; refuses a missing or incomplete one."""
    group = stats_group_name(name)
    attrs = _group_attrs(run, group, storage_options)
    if attrs is None or attrs.get(S.ATTR_COMPLETE) is not True:
        state = "no" if attrs is None else "an incomplete"
        raise StatsStageError(f"{run} has {state} '{group}' group: run the stats stage (qkov stats {run})")
    return xr.open_zarr(zarr_store(run, storage_options, read_only=True), group=group, consolidated=False).load()
