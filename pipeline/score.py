"""The score stage: all pair scores per (block, layer, head) as one Dask graph.

For each slice, with Î_reg = Î + λ and the stored signed per-sample gradients g:
  interference M[i, j] = Σ_p g_i[p]² / Î_reg[p] · |g_j[p]|   = (g²/Î_reg) · |g|ᵀ
  alignment    A[i, j] = Σ_p g_i[p] g_j[p] / Î_reg[p]         = (g/√Î_reg) · (g/√Î_reg)ᵀ
Both are matmuls over the slice's entries (`da.matmul`, the summed axis in one
chunk), batched over (layer, head). Only the pooled (A∪B)×(A∪B) matrices are stored,
once per block head (K/V: per KV head); `interference`/`alignment` (their A×B block)
and the per-query-head K/V are views made at read time (`store.scores_view`).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable

import dask.array as da
import numpy as np
import xarray as xr

from qkov.workers.fisher import inverse_damped_fisher
from qkov.workers.kernels import direct_pair_kernel, direct_tile_reduce, pair_kernel, sketch_pair_kernel

from . import schema
from .spec import JobSpec
from .store import RunStore, decoded, provenance, scores_view

DEFAULT_SAMPLE_CHUNK = 512


TASK_BYTES = 256 * 2**20  # input bytes per score task: heads of a layer are batched up to this


def heads_per_task(n_heads: int, chunk: int, width: int, itemsize: int) -> int:
    """How many heads of a layer one score task takes: as many as fit TASK_BYTES (at least 1),
    so small slices share a task (fewer, larger reads and kernel calls) and large ones do not
    blow up a worker's memory."""
    return int(max(1, min(n_heads, TASK_BYTES // max(1, chunk * width * itemsize))))


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


def _pair_task(layer, heads, inv, rows_i, rows_j, pos_i, pos_j, *, n: int, n_a: int, stats_args: tuple | None = None,
               **kw) -> dict:
    """One tile of `direct_block_scores` (runs in the task): its scores and, beside them, the
    diagnostics' partials (`qkov.workers.kernels.side_parts`) and, with `stats_args`, the stats sums."""
    from .diagnostics import _other_weights
    from .stats_stage import _weights

    is_a = np.arange(n) < n_a
    weights = None if stats_args is None else (_weights(is_a.tobytes(), *stats_args), n_a)
    scores, side = direct_pair_kernel(layer, heads, inv, rows_i, rows_j, side=(pos_i, pos_j, _other_weights(is_a)),
                                      weights=weights, **kw)
    align = scores[1]
    if len(pos_i) == len(pos_j) == n:  # the whole slice: its alignment leaves the task folded, as stored
        align = schema.fold_symmetric(align)
    return {"inter": scores[0], "align": align, **side}


def _reduce_task(layer, heads, inv, rows_i, rows_j, pos_i, pos_j, *, n: int, n_a: int, stats_args: tuple, **kw) -> dict:
    """One tile of `reduced_block_scores` (runs in the task): the stats weights of the run's
    seed, regenerated (and cached) on the worker as the stats stage does, then the kernel."""
    from .diagnostics import _other_weights
    from .stats_stage import _weights

    is_a = np.arange(n) < n_a
    return direct_tile_reduce(layer, heads, inv, rows_i, rows_j, pos_i, pos_j, weights=_weights(is_a.tobytes(), *stats_args),
                              other=_other_weights(is_a), n_a=n_a, **kw)


def _tile_tasks(task, reader, rows: np.ndarray, inv, chunk: int, **kw) -> da.Array:
    """One `task` per (layer, head group, row chunk, column chunk) tile of a block, each
    returning a dict; the arrays made from its parts (`_side_arrays` and the callers) share
    the tile tasks, which have several dependents and so are never fused into one of them."""
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


def _sum_part(parts, *, key: str, s: int | None = None, scale=None):
    """The sum over the tiles handed in (nested lists of tile dicts) of one part."""
    total = sum(d[key] if s is None else d[key][s] for d in _flat(parts))
    return (total * scale if scale is not None else total)[None]


def _first_part(parts, *, key: str):
    return next(d[key] for d in _flat(parts) if key in d)[None]


SIDE_PARTS = ("sq", "orows", "ocols", "odiag")  # what `_side_arrays` returns


def _side_arrays(tiles: da.Array) -> dict[str, da.Array]:
    """The diagnostics' parts from the tiles' `side_parts`, under qkov.pipeline.diagnostics' names:
    `sq` (sample, layer, head) Σ g², `orows`/`ocols` (sample, layer, head, 2) the
    interference's means over each task, `odiag` (sample, layer, head) the alignment diagonal."""
    m3, m4 = np.empty((0,) * 3, np.float64), np.empty((0,) * 4, np.float64)
    f64 = dict(dtype=np.float64, concatenate=False)
    return {
        "sq": da.blockwise(_first_part, "lhi", tiles, "lhij", key="norms", meta=m3, **f64).transpose(2, 0, 1),
        "odiag": da.blockwise(_first_part, "lhi", tiles, "lhij", key="diag", meta=m3, **f64).transpose(2, 0, 1),
        "orows": da.blockwise(_sum_part, "lhit", tiles, "lhij", new_axes={"t": 2}, key="rows", meta=m4,
                              **f64).transpose(2, 0, 1, 3),
        "ocols": da.blockwise(_sum_part, "lhjt", tiles, "lhij", new_axes={"t": 2}, key="cols", meta=m4,
                              **f64).transpose(2, 0, 1, 3),
    }


def _mirrored(a: np.ndarray) -> np.ndarray:
    """(…, N, N) whole slices with the strict lower triangle replaced by the mirror of the upper
    one (one task per slice: done tile by tile in the graph it took 5x the scoring of small tiles)."""
    n = a.shape[-1]
    return np.where(np.arange(n)[:, None] <= np.arange(n)[None, :], a, np.swapaxes(a, -1, -2))


def _get_part(tile: dict, key: str) -> np.ndarray:
    return tile[key]


def direct_block_scores(reader, rows: np.ndarray, inv, chunk: int, n_a: int, accumulate: str = "auto",
                        device: str = "auto", encoding: str | None = None, stats=None) -> tuple[da.Array, da.Array, dict]:
    """`block_scores` with tasks that read their own operands from the gradient chunk files
    (`reader`: a qkov.pipeline.store.DirectChunks; `rows`: the store samples taken, in order, the
    first `n_a` of task A): no gradient bytes pass through the Dask graph, so a slice's read,
    host→device copy and kernel are one task, and tasks of different slices overlap on the
    worker's threads. The alignment is returned folded (`schema.fold_symmetric`) where a
    task holds a whole slice, else as N×N tiles. Also returns the diagnostics' parts the same tasks reduce from the
    rows and tiles they hold (`_side_arrays`: no second read of gradients or scores) and,
    with `stats` (a StatsSpec), the statistics' sums of both scores (`_sums_arrays`), so
    the stats stage of this run does not read the N×N scores back."""
    stats_args = None if stats is None else (stats.n_permutations, stats.n_bootstrap, stats.seed)
    tiles = _tile_tasks(_pair_task, reader, rows, inv, chunk, n_a=n_a, stats_args=stats_args, accumulate=accumulate,
                        device=device, encoding=encoding)
    meta = np.empty((0,) * 4, np.float32)
    inter = tiles.map_blocks(_get_part, key="inter", dtype=np.float32, meta=meta)
    # a whole slice per task: the alignment comes folded (schema.fold_symmetric), as stored
    whole = len(tiles.chunks[2]) == 1
    fold_chunks = tuple((s,) for s in schema.folded_shape(len(rows))) if whole else tiles.chunks[2:]
    align = tiles.map_blocks(_get_part, key="align", chunks=tiles.chunks[:2] + fold_chunks, dtype=np.float32, meta=meta)
    parts = _side_arrays(tiles)
    if stats is not None:
        parts.update(_sums_arrays(tiles, len(rows), n_a, stats))
    return inter, align, parts


def _sums_arrays(tiles: da.Array, n: int, n_a: int, stats) -> dict[str, da.Array]:
    """`sums_<score>` (layer, head, width): the tiles' stats sums added over the slice and
    scaled as `stats_stage.slice_statistics` scales its own."""
    from .stats_stage import sums_scale

    scale = sums_scale(n_a, n - n_a, stats.n_permutations, stats.n_bootstrap)
    return {f"sums_{name}": da.blockwise(_sum_part, "lhw", tiles, "lhij", new_axes={"w": scale.size}, key="sums", s=s,
                                         scale=scale, meta=np.empty((0,) * 3, np.float64), dtype=np.float64,
                                         concatenate=False)
            for s, name in enumerate(schema.SCORES)}


def _merge_tops(parts, *, s: int, k: int, largest: bool) -> np.ndarray:
    """The k best of the tiles' candidates per head (value, row in A, column in B), best first."""
    cand = np.concatenate([d["top"][s] for d in _flat(parts)], axis=-1)  # (Hc, 3, tiles·k)
    return np.stack([_best_k(c, k, largest) for c in cand])[None]


def reduced_block_scores(reader, rows: np.ndarray, inv, chunk: int, n_a: int, stats, top_k: int,
                         accumulate: str = "auto", device: str = "auto", encoding: str | None = None) -> dict:
    """`keep_pairs = "top" | "none"` with direct reads: one task per tile reads its rows,
    computes both scores and reduces them on its device (`qkov.workers.kernels.direct_tile_reduce`);
    no N×N array leaves the device or enters the graph. Returns lazy arrays: per score
    (`interference`, `alignment`) the stats sums (layer, head, width) and, with top_k, the
    top pairs (layer, head, 3, k); and the diagnostics' parts (`_side_arrays`)."""
    tiles = _tile_tasks(_reduce_task, reader, rows, inv, chunk, n_a=n_a,
                        stats_args=(stats.n_permutations, stats.n_bootstrap, stats.seed),
                        top_k=top_k, accumulate=accumulate, device=device, encoding=encoding)
    out = {**_side_arrays(tiles), **_sums_arrays(tiles, len(rows), n_a, stats)}
    for s, name in enumerate(schema.SCORES):
        if top_k:
            out[f"top_{name}"] = da.blockwise(_merge_tops, "lhck", tiles, "lhij", new_axes={"c": 3, "k": top_k}, s=s,
                                              k=top_k, largest=(s == 0), meta=np.empty((0,) * 4, np.float64),
                                              dtype=np.float64, concatenate=False)
    return out


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


DIRECT_TASK_BYTES = 2**30  # rows one direct-read score task holds: read by the task itself, never through Dask


def auto_sample_chunk(n: int, width: int, itemsize: int, direct: bool = False) -> int:
    """Samples per score chunk: all of them when one head's whole slice fits a task (each
    chunk then travels to the worker, and its GPU, once per slice instead of once per chunk
    pair), else DEFAULT_SAMPLE_CHUNK. `direct` (tasks read their own rows from a local
    store): the fewest equal chunks whose rows fit DIRECT_TASK_BYTES, since each of the k
    row chunks is read k times (a slice of 8000 samples in 512-sample tiles was read 16
    times over, 1.3 TB for a 3-layer run of SmolLM2)."""
    if n * width * itemsize <= TASK_BYTES:
        return n
    if not direct:
        return DEFAULT_SAMPLE_CHUNK
    k = math.ceil(n * width * itemsize / DIRECT_TASK_BYTES)
    return max(DEFAULT_SAMPLE_CHUNK, math.ceil(n / k))


def _tile_top(block: np.ndarray, *, n_a: int, k: int, largest: bool, block_info=None) -> np.ndarray:
    """One tile's k best A×B pairs [1, 1, ci, cj] -> [1, 1, 1, 1, 3, k]: (value, row in A,
    column in B), NaN-padded when the tile holds fewer A×B pairs."""
    (r0, _), (c0, _) = block_info[0]["array-location"][2:4]
    sub = block[0, 0, : max(0, n_a - r0), max(0, n_a - c0):]
    out = np.full((3, k), np.nan)
    if sub.size:
        flat = sub.ravel().astype(np.float64)
        key = -flat if largest else flat
        take = np.argpartition(key, k - 1)[:k] if flat.size > k else np.arange(flat.size)
        i, j = np.unravel_index(take, sub.shape)
        out[:, : take.size] = flat[take], r0 + i, max(0, n_a - c0) + c0 - n_a + j
    return out[None, None, None, None]


def _merge_top(cand: np.ndarray, *, k: int, largest: bool) -> np.ndarray:
    """The k best of every tile's candidates [1, 1, ti, tj, 3, k] -> [1, 1, 3, k], best first."""
    return _best_k(np.moveaxis(cand[0, 0], -2, 0).reshape(3, -1), k, largest)[None, None]


def _best_k(c: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The k best candidates (3, M) (value, row, column; NaN values are padding) -> (3, k), best first."""
    c = c[:, ~np.isnan(c[0])]
    order = np.argsort(-c[0] if largest else c[0], kind="stable")[:k]
    out = np.full((3, k), np.nan)
    out[:, : order.size] = c[:, order]
    return out


def top_pairs_lazy(arr: da.Array, n_a: int, k: int, largest: bool) -> da.Array:
    """(L, H, 3, k) lazily: per slice the k best A×B pairs of a pooled (L, H, N, N) score array."""
    cand = arr.map_blocks(_tile_top, n_a=n_a, k=k, largest=largest, new_axis=[4, 5],
                          chunks=arr.chunks[:2] + ((1,) * len(arr.chunks[2]), (1,) * len(arr.chunks[3]), (3,), (k,)),
                          dtype=np.float64, meta=np.empty((0,) * 6, np.float64))
    cand = cand.rechunk({2: -1, 3: -1})
    return cand.map_blocks(_merge_top, k=k, largest=largest, drop_axis=[2, 3], chunks=arr.chunks[:2] + ((3,), (k,)),
                           dtype=np.float64, meta=np.empty((0,) * 4, np.float64))


def compact_scores(grads: xr.Dataset, fisher: xr.Dataset, *, sample_chunk: int | None = None,
                   accumulate: str = "auto", device: str = "auto", scores_dtype: str = "float32",
                   keep_pairs: str = "all", top_k: int = 100, stats=None, readers: dict | None = None,
                   side: dict | None = None) -> xr.Dataset:
    """The lazy `scores` dataset as stored: per block and score, the pooled (A∪B)×(A∪B)
    matrices on the block's own heads (`pooled_<score>_<block>`, K/V per KV head), nothing
    else; `RunStore.open_scores` / `scores_view` derive the per-query-head and A×B views.
    `scores_dtype = "bfloat16"` stores them rounded to bf16 (bits as uint16).
    `keep_pairs = "top" | "none"`: no N×N matrix; each tile is reduced as it leaves the kernel
    to the statistics' sums for `stats` (a StatsSpec: the permutations and bootstrap draws of
    its seed, `stats_stage.slice_statistics`) and, with "top", the `top_k` A×B pairs per slice
    (interference highest, alignment most negative: what `qkov query` lists). With "all"
    and float32 (and `stats`), the same sums are reduced from the tiles as they are written
    (in the score tasks themselves with direct reads), so the stats stage of the run reads
    no N×N score back (other settings, or bf16 scores, read the matrices).

    `grads` may be decoded (float32) or raw (`open_gradients(..., decode=False)`: bf16 bits
    as uint16, decoded inside the kernel — on a GPU after the transfer, at half the bytes).
    `readers` {block: DirectChunks} lets the score tasks read the raw chunks themselves;
    then `side`, a dict if given, receives what those tasks compute on the side for the
    diagnostics, under `qkov.pipeline.diagnostics`' part names: `sq_<block>` (sample, layer,
    head) Σ g², the interference's marginals `orows_`/`ocols_<block>` and the alignment
    diagonal `odiag_<block>` (`_side_arrays`)."""
    n_a = int(grads.attrs[schema.ATTR_N_A])
    finite = np.asarray(grads[schema.FINITE].values, dtype=bool)
    keep = np.flatnonzero(finite)  # samples skipped for non-finite gradients take no part
    n_a_kept = int(finite[:n_a].sum())
    n = keep.size
    if n_a_kept == 0 or n == n_a_kept:
        raise ValueError("no usable samples left in task A or task B (all skipped for non-finite gradients)")
    ids = grads[schema.SAMPLE_ID].values[keep].astype(object)
    kv_of = np.asarray(grads[schema.KV_HEAD_OF].values)
    sketched = grads.attrs.get(schema.ATTR_MODE) == "sketch"  # gradients holds {B}_u/v/w sketches, not g
    blocks = [b for b in schema.BLOCKS if (schema.sketch_var(b, "u") if sketched else b) in grads]
    if sample_chunk is None:
        widest = max((grads[schema.sketch_var(b, "u") if sketched else b] for b in blocks), key=lambda v: v.shape[-1])
        direct = not sketched and all(b in (readers or {}) for b in blocks)
        sample_chunk = auto_sample_chunk(n, widest.shape[-1], 4 if sketched else widest.dtype.itemsize, direct)
    c = min(n, sample_chunk)
    n_kv = int(kv_of.max()) + 1
    data = {}
    for b in blocks:
        direct = False  # score tasks read their own rows (set below)
        if sketched:
            u, v, w = (decoded(grads[schema.sketch_var(b, p)]).data[keep].rechunk((c, 1, 1, -1))
                       for p in schema.SKETCH_PARTS)
            inter, align = sketch_block_scores(u, v, w, accumulate, device)
        else:
            var = grads[b]
            raw = var.dtype == np.uint16  # bf16 bits, not yet decoded
            encoding = var.attrs.get(schema.ATTR_ENCODING) if raw else None
            reader = (readers or {}).get(b)
            direct = reader is not None and (raw or var.dtype == reader.dtype) and reader.shape == var.shape
            if direct and keep_pairs != "all":  # reduced on the device, tile by tile: nothing N×N leaves it
                dims = (schema.LAYER, schema.head_dim(b))
                k = min(top_k, n_a_kept * (n - n_a_kept)) if keep_pairs == "top" else 0
                red = reduced_block_scores(reader, keep, inverse_damped_fisher(fisher, b), c, n_a_kept, stats, k,
                                           accumulate, device, encoding=encoding)
                for name in ("interference", "alignment"):
                    data[schema.stat_sums_name(name, b)] = xr.Variable(dims + (schema.STAT,), red[f"sums_{name}"])
                    if k:
                        for i, (part, dt) in enumerate((("value", np.float32), ("a", np.int32), ("b", np.int32))):
                            data[schema.top_name(name, part, b)] = xr.Variable(dims + (schema.RANK,),
                                                                               red[f"top_{name}"][:, :, i].astype(dt))
                if side is not None:
                    side.update({f"{key}_{b}": red[key] for key in SIDE_PARTS})
                continue
            if direct:
                # the stats sums of the run's settings too, from the float32 tiles the tasks hold (a
                # bf16 store's statistics come from the stored, rounded values: read back)
                in_task = stats if scores_dtype == "float32" else None
                inter, align, parts = direct_block_scores(reader, keep, inverse_damped_fisher(fisher, b), c, n_a_kept,
                                                          accumulate, device, encoding=encoding, stats=in_task)
                if side is not None:
                    side.update({f"{key}_{b}": parts[key] for key in SIDE_PARTS})
                if in_task is not None:
                    for name in schema.SCORES:
                        data[schema.stat_sums_name(name, b)] = xr.Variable((schema.LAYER, schema.head_dim(b), schema.STAT),
                                                                           parts[f"sums_{name}"])
            else:
                g = (var.data if keep.size == var.shape[0] else var.data[keep]).rechunk((c, 1, 1, -1))
                inter, align = block_scores(g, inverse_damped_fisher(fisher, b), accumulate, device, encoding=encoding)
        dims = (schema.LAYER, schema.head_dim(b), schema.SAMPLE_I, schema.SAMPLE_J)
        if not direct:  # whole slices, mirrored: the same symmetric values for the sums, top pairs and store
            align = align.rechunk((1, 1, n, n)).map_blocks(_mirrored, dtype=align.dtype)
        for name, arr in (("interference", inter), ("alignment", align)):
            if name == "interference" or (direct and arr.shape[-2:] == (n, n)):  # (not folded in the score tasks)
                arr = arr.rechunk((1, 1, c, c))
            sums_here = stats is not None and (keep_pairs != "all" or scores_dtype == "float32")
            if sums_here and schema.stat_sums_name(name, b) not in data:  # from the tiles in the graph, as they are written
                from .stats_stage import slice_statistics

                sums = slice_statistics(arr[None], np.arange(n) < n_a_kept, stats.n_permutations, stats.n_bootstrap, stats.seed)[0]
                data[schema.stat_sums_name(name, b)] = xr.Variable(dims[:2] + (schema.STAT,), sums)
            if keep_pairs != "all":
                if keep_pairs == "top":
                    top = top_pairs_lazy(arr, n_a_kept, min(top_k, n_a_kept * (n - n_a_kept)), largest=(name == "interference"))
                    for i, (part, dt) in enumerate((("value", np.float32), ("a", np.int32), ("b", np.int32))):
                        data[schema.top_name(name, part, b)] = xr.Variable(dims[:2] + (schema.RANK,), top[:, :, i].astype(dt))
                continue
            attrs, stored_dims = {}, dims
            if name == "alignment":  # symmetric: its upper triangle once (the kernel mirrors diagonal tiles)
                rows, cols = schema.folded_shape(n)
                if arr.numblocks[-1] == 1 and arr.shape[-1] == n:  # whole slices: one fold per slice
                    arr = arr.map_blocks(schema.fold_symmetric, chunks=arr.chunks[:2] + ((rows,), (cols,)), dtype=arr.dtype)
                elif arr.shape[-2:] != (rows, cols):  # tiles (direct reads, slices over 1 GiB): Dask folds them
                    arr = schema.fold_symmetric(arr)
                arr = arr.rechunk((1, 1, rows, cols) if c >= n else (1, 1, c, min(c, cols)))
                attrs, stored_dims = {schema.ATTR_FOLDED: n}, dims[:2] + (schema.FOLD_ROW, schema.FOLD_COL)
            if scores_dtype == "bfloat16":  # rounded per chunk as it leaves the kernel
                arr = arr.map_blocks(schema.encode, "bfloat16", dtype=np.uint16)
                attrs[schema.ATTR_ENCODING] = "bfloat16"
            data[schema.stored_pooled_name(name, b)] = xr.Variable(stored_dims, arr, attrs=attrs)
    coords = {
        schema.BLOCK: np.array(blocks, dtype=object),
        schema.LAYER: grads[schema.LAYER].values,
        schema.HEAD: grads[schema.HEAD].values,
        schema.KV_HEAD: np.arange(n_kv, dtype=np.int32),
        schema.KV_HEAD_OF: (schema.HEAD, kv_of.astype(np.int32)),
        schema.SAMPLE_I: ids,
        schema.IS_A: (schema.SAMPLE_I, np.arange(n) < n_a_kept),
        schema.SAMPLE_J: ids,
    }
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({schema.ATTR_N_A: n_a_kept, schema.ATTR_N_B: n - n_a_kept, schema.ATTR_TASK_A: grads.attrs.get(schema.ATTR_TASK_A),
                     schema.ATTR_TASK_B: grads.attrs.get(schema.ATTR_TASK_B), schema.ATTR_SCORES_LAYOUT: schema.SCORES_LAYOUT,
                     schema.ATTR_SCORES_DTYPE: scores_dtype, schema.ATTR_KEEP_PAIRS: keep_pairs},
                    sample_chunk=c)
    if any(v.startswith(schema.stat_sums_name("")) for v in data):  # what the stored sums were reduced for
        from .stats_stage import sums_settings

        ds.attrs[schema.ATTR_SUMS_SETTINGS] = sums_settings(stats)
    return ds


def score_dataset(grads: xr.Dataset, fisher: xr.Dataset, *, sample_chunk: int | None = None,
                  accumulate: str = "auto", device: str = "auto", scores_dtype: str = "float32") -> xr.Dataset:
    """The lazy logical `scores` dataset (pooled matrices and their A×B blocks, per query head)
    that `run_score` stores compactly and `RunStore.open_scores` reads back."""
    return scores_view(compact_scores(grads, fisher, sample_chunk=sample_chunk, accumulate=accumulate,
                                      device=device, scores_dtype=scores_dtype))


def run_score(store: RunStore, job: JobSpec, executor, *, sample_chunk: int | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> xr.Dataset:
    """The score stage: compute and write `scores` from the run's `gradients` and `fisher`;
    `on_progress(done, total)` follows the graph's tasks (reads, kernels, writes)."""
    from .errors import corrupt_chunk_error
    from .extract import checksummed, require_intact_gradients

    store.require(schema.GRADIENTS, "scoring")
    store.require(schema.FISHER, "scoring")
    require_intact_gradients(store)  # a missing chunk would read as NaN: refused, never scored
    grads = store.open_gradients(decode=False)
    readers = store.direct_chunks(schema.GRADIENTS)
    fisher = store.open_fisher()
    ds = compact_scores(grads, fisher, sample_chunk=sample_chunk,
                        accumulate="auto", device=job.score.device, scores_dtype=job.score.scores_dtype,
                        keep_pairs=job.score.keep_pairs, top_k=job.score.top_k, stats=job.stats, readers=readers,
                        side=(side := {}))
    ds.attrs.update(provenance(job.config_dict(), job.config_hash(), stage="score", sample_chunk=ds.attrs["sample_chunk"]))
    ds.attrs[schema.ATTR_COMPLETE] = False
    encoding = {v: {"chunks": tuple(c[0] for c in ds[v].data.chunks), "compressors": checksummed(v.startswith("pooled_"))}
                for v in ds.data_vars}
    # numerical health and per-sample diagnostics (no model pass), in the same graph as the score
    # writes: from the parts the score tasks reduce from their rows and tiles (`side`), else from
    # the tiles or the operands (pipeline/diagnostics.py). Written before the scores are marked
    # complete, so complete scores always come with them.
    from .diagnostics import compute_with_diagnostics, write_diagnostics

    t0 = time.perf_counter()
    try:
        writes = store.write_dataset(ds, schema.SCORES_GROUP, encoding=encoding, compute=False)
        diag = compute_with_diagnostics(executor, writes, grads, fisher, ds, readers, job.score.device, side, on_progress)
    except ValueError as e:
        raise corrupt_chunk_error(e, store.path) or e
    t1 = time.perf_counter()
    write_diagnostics(store, diag, job.config_dict(), job.config_hash())
    # where the stage's time went (seconds), for users and the benchmarks: part of the provenance
    # (like its timestamp), so runs that agree in every result still compare equal
    attrs = store.root("r+")[schema.SCORES_GROUP].attrs
    attrs[schema.ATTR_PROVENANCE] = {**dict(attrs.get(schema.ATTR_PROVENANCE) or {}), schema.ATTR_STAGE_SECONDS: {
        "scores_and_diagnostics": round(t1 - t0, 3), "diagnostics_write": round(time.perf_counter() - t1, 3)}}
    store.mark_complete(schema.SCORES_GROUP)
    return store.open_scores()


def top_pairs(scores: xr.Dataset, layer: int, head: int, block: str = "Q", n: int = 10,
              score: str = "interference") -> list[dict]:
    """The head's n highest-scoring (sample_a, sample_b) pairs with the users' sample ids.
    A run with keep_pairs = "top" lists its stored top pairs (interference highest, alignment
    most negative first); "none" has no pairs to list."""
    a_ids, b_ids = scores[schema.SAMPLE_A].values, scores[schema.SAMPLE_B].values
    if score not in scores:
        from .errors import UsageError

        keep = scores.attrs.get(schema.ATTR_KEEP_PAIRS, "all")
        if schema.top_name(score) not in scores:
            if keep == "none":
                return []
            raise UsageError(f"scores has no {score!r} pairs")
        sel = dict(block=block, layer=layer, head=head)
        v, ia, ib = (scores[schema.top_name(score, p)].sel(**sel).values for p in ("value", "a", "b"))
        if n > v.size:
            raise UsageError(f"this run kept the top {v.size} pairs per slice (keep_pairs = 'top', top_k); ask for at most {v.size}")
        return [{"sample_a": str(a_ids[i]), "sample_b": str(b_ids[j]), score: float(x)} for x, i, j in zip(v[:n], ia[:n], ib[:n])]
    m = scores[score].sel(block=block, layer=layer, head=head).values
    order = np.argsort(m, axis=None)[::-1][:n]
    ia, ib = np.unravel_index(order, m.shape)
    return [{"sample_a": str(a_ids[i]), "sample_b": str(b_ids[j]), score: float(m[i, j])} for i, j in zip(ia, ib)]
