"""The reductions of pooled score slices that the score graphs and the stats stage share:
the statistics' weight rows and sums, the top A×B pairs, the diagnostics' other-task weights.
The arithmetic itself is the workers' (qkov.workers.reductions, numpy and torch side by
side); this module draws the weights from the run's seed and lays the reductions out over
Dask chunks. It imports no stage, so every stage and reader may use it.
"""
from __future__ import annotations

import functools

import dask.array as da
import numpy as np

from qkov.workers.reductions import best_k, stat_sums, stat_sums_np, tile_top

from . import schema
from . import stats as st
from .spec import StatsSpec
from .tiling import TASK_BYTES, sketched_heads_per_task


@functools.lru_cache(maxsize=4)
def stats_weights(is_a_bytes: bytes, n_perm: int, n_boot: int, seed: int) -> tuple[np.ndarray, ...]:
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


def sums_settings(settings: StatsSpec) -> dict:
    """What stored stats sums depend on (`schema.ATTR_SUMS_SETTINGS`): alpha and the
    alternative act later, on the sums."""
    return {"n_permutations": settings.n_permutations, "n_bootstrap": settings.n_bootstrap, "seed": settings.seed}


def sums_scale(n_a: int, n_b: int, n_perm: int, n_boot: int) -> np.ndarray:
    """The factor that turns a slice's summed chunk sums into what the stats stage reads, one
    per entry (1+K + 4(1+B) + N of them): the K+1 cross sums become means; the effect sums and
    margins stay raw."""
    obs, perms, _, _ = schema.stat_sums_parts(n_perm, n_boot)
    scale = np.ones(schema.stat_sums_width(n_perm, n_boot, n_a + n_b))
    scale[obs.start : perms.stop] = 1.0 / (n_a * n_b)
    return scale


def _stat_sums_at(block: np.ndarray, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int,
                  offset: tuple[int, int]) -> np.ndarray:
    """(runs in the task) Unnormalised stats sums of pooled scores [..., n, m] at pooled `offset`
    (`qkov.workers.reductions.stat_sums_np`), on a GPU worker's device where it has one."""
    from qkov.workers.device import resolve_device

    weights = stats_weights(np.ascontiguousarray(is_a, dtype=bool).tobytes(), n_perm, n_boot, seed)
    if resolve_device("auto") == "cuda":  # a GPU worker: the same sums as a few float64 matmuls on its device
        return stat_sums(block, weights, is_a, offset, "cuda")
    return stat_sums_np(block, weights, is_a, offset)


def chunk_sums(block: np.ndarray, *, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int, block_info=None) -> np.ndarray:
    """Unnormalised stats sums of one chunk [b, l, h, ni, nj] -> [b, l, h, 1, 1, width] (`_stat_sums_at`)."""
    (r0, _), (c0, _) = block_info[0]["array-location"][3:5]
    return _stat_sums_at(block, is_a, n_perm, n_boot, seed, (r0, c0))[..., None, None, :]


def slice_statistics(pooled: da.Array, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int) -> da.Array:
    """Lazy [b, l, h, 1+K + 4(1+B) + N] per slice: T_obs and the K null T^π (means), then
    the raw effect sums and the A×B margins (see `chunk_sums`)."""
    is_a = np.asarray(is_a, dtype=bool)
    scale = sums_scale(int(is_a.sum()), int((~is_a).sum()), n_perm, n_boot)
    chunks = pooled.chunks[:3] + ((1,) * len(pooled.chunks[3]), (1,) * len(pooled.chunks[4]), (scale.size,))
    sums = pooled.map_blocks(
        chunk_sums, is_a=is_a, n_perm=n_perm, n_boot=n_boot, seed=seed,
        new_axis=5, chunks=chunks, dtype=np.float64, meta=np.empty((0,) * 6, np.float64),
    )
    return sums.sum(axis=(3, 4)) * scale


def _moment_chunk(block: np.ndarray, *, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int, labelled: bool) -> np.ndarray:
    """`stats.moment_sums` of a chunk of moments [b, l, h, N, 5] -> [b, l, h, width]."""
    left, _, wa, wb = stats_weights(np.ascontiguousarray(is_a, dtype=bool).tobytes(), n_perm, n_boot, seed)
    return st.moment_sums(block, is_a, left, wa, wb, labelled)


def moment_statistics(moments: da.Array, is_a: np.ndarray, n_perm: int, n_boot: int, seed: int,
                      labelled: bool = True) -> da.Array:
    """Answers mode: lazy [b, l, h, 1+K + 4(1+B) + N] per slice from its per-sample moments
    [b, l, h, N, 5] (`stats.moment_sums`; labelled=False: no labels-null rows), laid out as
    `slice_statistics` lays out its sums."""
    is_a = np.asarray(is_a, dtype=bool)
    width = schema.stat_sums_width(n_perm, n_boot, is_a.size)
    moments = moments.rechunk({3: -1, 4: -1})
    return moments.map_blocks(_moment_chunk, is_a=is_a, n_perm=n_perm, n_boot=n_boot, seed=seed, labelled=labelled, drop_axis=4,
                              chunks=moments.chunks[:3] + ((width,),), dtype=np.float64,
                              meta=np.empty((0,) * 4, np.float64))


def _tile_top(block: np.ndarray, *, n_a: int, k: int, largest: bool, block_info=None) -> np.ndarray:
    """One chunk's k best A×B pairs [1, 1, ci, cj] -> [1, 1, 1, 1, 3, k] (`tile_top`)."""
    (r0, _), (c0, _) = block_info[0]["array-location"][2:4]
    return tile_top(block[0, 0], n_a, (r0, c0), k, largest)[None, None, None, None]


def _merge_top(cand: np.ndarray, *, k: int, largest: bool) -> np.ndarray:
    """The k best of every tile's candidates [1, 1, ti, tj, 3, k] -> [1, 1, 3, k], best first."""
    return best_k(np.moveaxis(cand[0, 0], -2, 0).reshape(3, -1), k, largest)[None, None]


def top_pairs_lazy(arr: da.Array, n_a: int, k: int, largest: bool) -> da.Array:
    """(L, H, 3, k) lazily: per slice the k best A×B pairs of a pooled (L, H, N, N) score array."""
    cand = arr.map_blocks(_tile_top, n_a=n_a, k=k, largest=largest, new_axis=[4, 5],
                          chunks=arr.chunks[:2] + ((1,) * len(arr.chunks[2]), (1,) * len(arr.chunks[3]), (3,), (k,)),
                          dtype=np.float64, meta=np.empty((0,) * 6, np.float64))
    cand = cand.rechunk({2: -1, 3: -1})
    return cand.map_blocks(_merge_top, k=k, largest=largest, drop_axis=[2, 3], chunks=arr.chunks[:2] + ((3,), (k,)),
                           dtype=np.float64, meta=np.empty((0,) * 4, np.float64))


def _sketched_chunk(u: np.ndarray, v: np.ndarray, moments: np.ndarray, *, is_a: np.ndarray, n_perm: int, n_boot: int,
                    seed: int, k: int) -> np.ndarray:
    """(runs in the task) One chunk of heads' sketched interference, whole slices: u, v [1, hc, N, dim],
    moments [1, hc, N, 5] -> [1, hc, width + 3k], each slice's stats sums (scaled as
    `slice_statistics` scales them) then its k best A×B pairs (value, row in A, column in B), from
    S̃ = `stats.margin_corrected`(u·vᵀ, moments). The matmul and the sums on a GPU worker's device."""
    from qkov.workers.device import resolve_device

    on_gpu = resolve_device("auto") == "cuda"
    if on_gpu:
        import torch

        s = torch.matmul(*(torch.as_tensor(np.ascontiguousarray(x), device="cuda") for x in (u, np.swapaxes(v, -1, -2))))
        pairs = s.cpu().numpy()
    else:
        pairs = np.matmul(u, np.swapaxes(v, -1, -2))
    pairs = st.margin_corrected(pairs, moments.astype(pairs.dtype))
    n_a = int(is_a.sum())
    sums = _stat_sums_at(pairs, is_a, n_perm, n_boot, seed, (0, 0)) * sums_scale(n_a, is_a.size - n_a, n_perm, n_boot)
    top = np.stack([best_k(tile_top(p, n_a, (0, 0), k, True), k, True) for p in pairs[0]])[None]  # [1, hc, 3, k]
    return np.concatenate([sums, top.reshape(*top.shape[:2], 3 * k)], axis=-1)


def sketched_interference(u: da.Array, v: da.Array, moments: da.Array, is_a: np.ndarray, n_perm: int, n_boot: int,
                          seed: int, k: int, group_bytes: int = TASK_BYTES) -> tuple[da.Array, da.Array]:
    """Answers mode with the interference sketched: per slice its stats sums (L, H, width) and its
    k best A×B pairs (L, H, 3, k), from u, v (L, H, N, dim) and the exact moments (L, H, N, 5), one
    task per group of heads (`_sketched_chunk`): as `slice_statistics` and `top_pairs_lazy` of
    `stats.margin_corrected`(u·vᵀ) give them, where those, chained op by op, made ~40 Dask tasks a
    slice (a 32-layer 256 + 256 job of 8B's head layout: 107,937 tasks)."""
    is_a = np.asarray(is_a, dtype=bool)
    n = is_a.size
    hc = sketched_heads_per_task(u.shape[1], n, group_bytes)
    u, v = (x.rechunk((1, hc, -1, -1)) for x in (u, v))
    moments = moments.rechunk((1, hc, -1, -1))
    width = schema.stat_sums_width(n_perm, n_boot, n)
    both = da.blockwise(_sketched_chunk, "lhw", u, "lhid", v, "lhjd", moments, "lhim", new_axes={"w": width + 3 * k},
                        concatenate=True, dtype=np.float64, meta=np.empty((0,) * 3, np.float64),
                        is_a=is_a, n_perm=n_perm, n_boot=n_boot, seed=seed, k=k)
    return both[..., :width], both[..., width:].reshape(*both.shape[:2], 3, k)


def other_weights(is_a: np.ndarray) -> np.ndarray:
    """(N, 2): column 0 averages over task A, column 1 over task B (the diagnostics' other-task means)."""
    is_a = np.asarray(is_a, dtype=bool)
    return np.stack([is_a / max(1, is_a.sum()), ~is_a / max(1, (~is_a).sum())], 1).astype(np.float64)
