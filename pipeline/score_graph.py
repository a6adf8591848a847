"""The score stage's Dask graphs: both pair scores of one block, tile by tile.

For each slice, with Î_reg = Î + λ and the stored signed per-sample gradients g:
  interference M[i, j] = Σ_p g_i[p]² / Î_reg[p] · |g_j[p]|   = (g²/Î_reg) · |g|ᵀ
  alignment    A[i, j] = Σ_p g_i[p] g_j[p] / Î_reg[p]         = (g/√Î_reg) · (g/√Î_reg)ᵀ
Four builders, one per way of getting the operands and of what leaves the tasks:
`block_scores` (gradients through Dask), `sketch_block_scores` (sketch mode),
`direct_block_scores` (tasks read their own rows, scores kept) and `reduced_block_scores`
(tasks read their own rows and reduce the scores on the device). The direct tasks return
`qkov.workers.parts.TileParts`; the functions here add their partials up per slice.
"""
from __future__ import annotations

import warnings
from operator import attrgetter
from typing import NamedTuple

import dask.array as da
import numpy as np

from qkov.workers.kernels import direct_pair_kernel, direct_tile_reduce, pair_kernel, sketch_pair_kernel
from qkov.workers.parts import DiagnosticParts, TileParts
from qkov.workers.reductions import best_k

from . import schema
from .slice_reductions import other_weights, stats_weights, sums_scale
from .tiling import heads_per_task


class BlockParts(NamedTuple):
    """What the direct score tasks of one block reduce beside (or instead of) its scores."""
    diagnostics: DiagnosticParts  # lazy, samples first (`workers.parts.DiagnosticParts`)
    sums: dict[str, da.Array] | None  # per score (schema.SCORES): (layer, head, width) stats sums, scaled
    top: dict[str, da.Array] | None  # per score: (layer, head, 3, k) top A×B pairs (value, row in A, column in B)


def block_scores(g: da.Array, inv, accumulate: str = "auto", device: str = "auto",
                 encoding: str | None = None, chunk: int | None = None) -> tuple[da.Array, da.Array]:
    """Pooled interference and alignment for one block.

    g: (sample, layer, head, param) dask array of stored gradients (float32, or bf16 bits
    with `encoding="bfloat16"`); inv: (layer, head, param) 1/Î_reg. Samples are taken in
    chunks of `chunk` (default: g's own sample chunks) and heads in groups that fit a task.
    Returns two (layer, head, sample, sample) arrays.
    """
    c = chunk or g.chunks[0][0]
    hc = heads_per_task(g.shape[2], c, g.shape[3], g.dtype.itemsize)
    gt = g.transpose(1, 2, 0, 3).rechunk((1, hc, c, -1))  # (L, H, N, P)
    inv_d = (inv if isinstance(inv, da.Array) else da.from_array(inv)).rechunk((1, hc, -1))
    both = da.blockwise(
        pair_kernel, "slhij",
        gt, "lhip", gt, "lhjp", inv_d, "lhp",
        new_axes={"s": 2}, concatenate=True, dtype=np.float32, accumulate=accumulate, device=device,
        encoding=encoding,
    )
    return both[0], both[1]


def sketch_block_scores(u: da.Array, v: da.Array, w: da.Array, accumulate: str = "auto",
                        device: str = "auto") -> tuple[da.Array, da.Array]:
    """`block_scores` for sketch mode: u, v, w (sample, layer, head, sketch) with the sketch
    axis in one chunk. Returns two (layer, head, sample, sample) arrays."""
    c = u.chunks[0][0]
    hc = heads_per_task(u.shape[2], c, u.shape[3], 4 * 3)  # three operands per task
    ut, vt, wt = (x.transpose(1, 2, 0, 3).rechunk((1, hc, c, -1)) for x in (u, v, w))  # (L, H, N, k)
    both = da.blockwise(
        sketch_pair_kernel, "slhij",
        ut, "lhik", vt, "lhjk", wt, "lhik", wt, "lhjk",
        new_axes={"s": 2}, concatenate=True, dtype=np.float32, accumulate=accumulate, device=device,
    )
    return both[0], both[1]


def mirrored(a: np.ndarray) -> np.ndarray:
    """(…, N, N) whole slices with the strict lower triangle replaced by the mirror of the upper
    one (one task per slice: done tile by tile in the graph it took 5x the scoring of small tiles)."""
    n = a.shape[-1]
    return np.where(np.arange(n)[:, None] <= np.arange(n)[None, :], a, np.swapaxes(a, -1, -2))


# ---------------------------------------------------------------- tasks that read their own rows


def _pair_task(layer, heads, inv, rows_i, rows_j, pos_i, pos_j, *, n: int, n_a: int, stats_args: tuple | None = None,
               write_to: tuple | None = None, **kw) -> TileParts:
    """One tile of `direct_block_scores` (runs in the task): its scores and, beside them, the
    diagnostics' parts and, with `stats_args`, the stats sums. `write_to` = (interference,
    alignment, first layer, encoding): the task writes its whole slices there itself (their
    layer: the first layer plus the tile's)."""
    is_a = np.arange(n) < n_a
    weights = None if stats_args is None else (stats_weights(is_a.tobytes(), *stats_args), n_a)
    if write_to is not None:
        inter, align, first, encoding = write_to
        write_to = (inter, align, first + int(layer[0]), encoding)
    # the whole slice: its alignment leaves the task folded, as stored
    return direct_pair_kernel(layer, heads, inv, rows_i, rows_j, side=(pos_i, pos_j, other_weights(is_a)),
                              weights=weights, fold=len(pos_i) == len(pos_j) == n, write_to=write_to, **kw)


def _reduce_task(layer, heads, inv, rows_i, rows_j, pos_i, pos_j, *, n: int, n_a: int, stats_args: tuple,
                 **kw) -> TileParts:
    """One tile of `reduced_block_scores` (runs in the task): the stats weights of the run's
    seed, regenerated (and cached) on the worker as the stats stage does, then the kernel."""
    is_a = np.arange(n) < n_a
    return direct_tile_reduce(layer, heads, inv, rows_i, rows_j, pos_i, pos_j, weights=stats_weights(is_a.tobytes(), *stats_args),
                              other=other_weights(is_a), n_a=n_a, **kw)


def _tile_tasks(task, reader, rows: np.ndarray, inv, chunk: int, **kw) -> da.Array:
    """One `task` per (layer, head group, row chunk, column chunk) tile of a block, each
    returning a `TileParts`; the arrays made from its parts share the tile tasks, which have
    several dependents and so are never fused into one of them."""
    n_l, n_h, p = reader.shape[1], reader.shape[2], reader.shape[3]
    hc = heads_per_task(n_h, chunk, p, reader.dtype.itemsize)
    inv_d = (inv if isinstance(inv, da.Array) else da.from_array(inv)).rechunk((1, hc, -1))
    ids = da.from_array(np.asarray(rows, dtype=np.int64), chunks=chunk)
    pos = da.arange(len(rows), chunks=chunk)
    with warnings.catch_warnings():  # "increasing the number of chunks": the tiles, by design
        warnings.simplefilter("ignore", da.PerformanceWarning)
        return da.blockwise(
            task, "lhij",
            da.arange(n_l, chunks=1), "l", da.arange(n_h, chunks=hc), "h", inv_d, "lhp", ids, "i", ids, "j", pos, "i", pos, "j",
            concatenate=True, dtype=np.float64, meta=np.empty((0,) * 4, np.float64), reader=reader, n=len(rows), **kw)


def _flat(parts) -> list:
    return [x for p in parts for x in _flat(p)] if isinstance(parts, list) else [parts]


def _sum_part(tiles, *, get, s: int | None = None, scale=None):
    """The sum over the tiles handed in (nested lists of `TileParts`) of the part `get` picks."""
    total = sum(get(t) if s is None else get(t)[s] for t in _flat(tiles))
    return (total * scale if scale is not None else total)[None]


def _first_part(tiles, *, get):
    """The first tile's part that `get` finds (the diagonal tile's, for the alignment diagonal)."""
    return next(x for x in map(get, _flat(tiles)) if x is not None)[None]


def _merge_tops(tiles, *, s: int, k: int, largest: bool) -> np.ndarray:
    """The k best of the tiles' candidates per head (value, row in A, column in B), best first."""
    cand = np.concatenate([t.top[s] for t in _flat(tiles)], axis=-1)  # (Hc, 3, tiles·k)
    return np.stack([best_k(c, k, largest) for c in cand])[None]


def _diagnostic_arrays(tiles: da.Array) -> DiagnosticParts:
    """The block's `DiagnosticParts` (samples first) from its tiles' own."""
    m3, m4 = np.empty((0,) * 3, np.float64), np.empty((0,) * 4, np.float64)
    f64 = dict(dtype=np.float64, concatenate=False)

    def first(field: str) -> da.Array:  # one per row chunk: the slice's rows are in every tile of it
        return da.blockwise(_first_part, "lhi", tiles, "lhij", get=attrgetter(field), meta=m3, **f64).transpose(2, 0, 1)

    def summed(field: str, index: str) -> da.Array:  # added up over the other axis' tiles
        return da.blockwise(_sum_part, f"lh{index}t", tiles, "lhij", new_axes={"t": 2}, get=attrgetter(field), meta=m4,
                            **f64).transpose(2, 0, 1, 3)

    return DiagnosticParts(sq=first("diagnostics.sq"), rows=summed("diagnostics.rows", "i"),
                           cols=summed("diagnostics.cols", "j"), diag=first("diagnostics.diag"))


def _sums_arrays(tiles: da.Array, n: int, n_a: int, stats) -> dict[str, da.Array]:
    """Per score, (layer, head, width): the tiles' stats sums added over the slice and scaled
    as `slice_reductions.slice_statistics` scales its own."""
    scale = sums_scale(n_a, n - n_a, stats.n_permutations, stats.n_bootstrap)
    return {name: da.blockwise(_sum_part, "lhw", tiles, "lhij", new_axes={"w": scale.size}, get=attrgetter("sums"), s=s,
                               scale=scale, meta=np.empty((0,) * 3, np.float64), dtype=np.float64, concatenate=False)
            for s, name in enumerate(schema.SCORES)}


def direct_block_scores(reader, rows: np.ndarray, inv, chunk: int, n_a: int, accumulate: str = "auto",
                        device: str = "auto", encoding: str | None = None,
                        stats=None, write_to: tuple | None = None) -> tuple[da.Array | None, da.Array | None, BlockParts]:
    """`block_scores` with tasks that read their own operands from the gradient chunk files
    (`reader`: a qkov.pipeline.store.DirectChunks; `rows`: the store samples taken, in order, the
    first `n_a` of task A): no gradient bytes pass through the Dask graph, so a slice's read,
    host→device copy and kernel are one task, and tasks of different slices overlap on the
    worker's threads. The alignment is returned folded (`schema.fold_symmetric`) where a
    task holds a whole slice, else as N×N tiles. Also returns the `BlockParts` the same tasks
    reduce from the rows and tiles they hold (no second read of gradients or scores): the
    diagnostics' and, with `stats` (a StatsSpec), the statistics' sums of both scores, so
    the stats stage of this run does not read the N×N scores back.
    `write_to` = (interference, alignment, first layer, scores encoding), the stored pooled
    arrays' `DirectChunks` with one whole slice per chunk (chunk ≥ N): each task writes its
    slices' chunks itself, from reused pinned host buffers, and no score enters the graph;
    then (None, None, parts) is returned, the parts' arrays being what runs the tasks."""
    stats_args = None if stats is None else (stats.n_permutations, stats.n_bootstrap, stats.seed)
    tiles = _tile_tasks(_pair_task, reader, rows, inv, chunk, n_a=n_a, stats_args=stats_args, accumulate=accumulate,
                        device=device, encoding=encoding, write_to=write_to)
    sums = None if stats is None else _sums_arrays(tiles, len(rows), n_a, stats)
    if write_to is not None:
        return None, None, BlockParts(_diagnostic_arrays(tiles), sums, None)
    meta = np.empty((0,) * 4, np.float32)
    inter = tiles.map_blocks(attrgetter("interference"), dtype=np.float32, meta=meta)
    # a whole slice per task: the alignment comes folded (schema.fold_symmetric), as stored
    whole = len(tiles.chunks[2]) == 1
    fold_chunks = tuple((s,) for s in schema.folded_shape(len(rows))) if whole else tiles.chunks[2:]
    align = tiles.map_blocks(attrgetter("alignment"), chunks=tiles.chunks[:2] + fold_chunks, dtype=np.float32, meta=meta)
    return inter, align, BlockParts(_diagnostic_arrays(tiles), sums, None)


def reduced_block_scores(reader, rows: np.ndarray, inv, chunk: int, n_a: int, stats, top_k: int,
                         accumulate: str = "auto", device: str = "auto", encoding: str | None = None) -> BlockParts:
    """`keep_pairs = "top" | "none"` with direct reads: one task per tile reads its rows,
    computes both scores and reduces them on its device (`qkov.workers.kernels.direct_tile_reduce`);
    no N×N array leaves the device or enters the graph. Returns the lazy `BlockParts`: the
    diagnostics', the stats sums and, with top_k, the top pairs."""
    tiles = _tile_tasks(_reduce_task, reader, rows, inv, chunk, n_a=n_a,
                        stats_args=(stats.n_permutations, stats.n_bootstrap, stats.seed),
                        top_k=top_k, accumulate=accumulate, device=device, encoding=encoding)
    top = None
    if top_k:
        top = {name: da.blockwise(_merge_tops, "lhck", tiles, "lhij", new_axes={"c": 3, "k": top_k}, s=s, k=top_k,
                                  largest=(s == 0), meta=np.empty((0,) * 4, np.float64), dtype=np.float64,
                                  concatenate=False)
               for s, name in enumerate(schema.SCORES)}
    return BlockParts(_diagnostic_arrays(tiles), _sums_arrays(tiles, len(rows), n_a, stats), top)
