"""The score stage: all pair scores per (block, layer, head), written as one Dask graph.

Only the pooled (A∪B)×(A∪B) matrices are stored, once per block head (K/V: per KV head);
`interference`/`alignment` (their A×B block) and the per-query-head K/V are views made at
read time (`store.scores_view`). `compact_scores` chooses, per block, one of the graphs of
`score_graph` (by mode, direct reads and `keep_pairs`) and lays out what it stores: the
pooled matrices, or the statistics' sums and top pairs reduced from them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import dask.array as da
import numpy as np
import xarray as xr

from qkov.workers.fisher import inverse_damped_fisher
from qkov.workers.parts import DiagnosticParts

from . import codec, schema
from .diagnostics import compute_with_diagnostics, write_diagnostics
from .errors import corrupt_chunk_error
from .score_graph import BlockParts, block_scores, direct_block_scores, mirrored, reduced_block_scores, sketch_block_scores
from .slice_reductions import sketched_interference, slice_statistics, sums_settings, top_pairs_lazy
from .spec import JobSpec
from .store import RunStore, decoded, has_scalars, provenance, scores_view
from .tiling import auto_sample_chunk

_TOP_PARTS = (("value", np.float32), ("a", np.int32), ("b", np.int32))  # the stored top pairs, per score


@dataclass(frozen=True)
class _Plan:
    """What every block of one `compact_scores` call shares: the kept samples and the settings."""
    keep: np.ndarray  # the store rows scored, A then B
    n_a: int  # of them in task A
    chunk: int  # samples per score chunk
    keep_pairs: str
    top_k: int
    scores_dtype: str
    stats: object  # a StatsSpec, or None
    accumulate: str
    device: str

    @property
    def n(self) -> int:
        return self.keep.size

    @property
    def k(self) -> int:
        """Top pairs kept per slice (0: none)."""
        return min(self.top_k, self.n_a * (self.n - self.n_a)) if self.keep_pairs == "top" else 0

    @property
    def sums_in_graph(self) -> bool:
        """The stats sums are reduced from the tiles as they are made: always when no pairs are
        kept; with pairs, for float32 scores only (a bf16 store's statistics come from the
        stored, rounded values: read back)."""
        return self.stats is not None and (self.keep_pairs != "all" or self.scores_dtype == "float32")


@dataclass(frozen=True)
class _Built:
    """One block's lazy scores: per score, the pooled matrices (none when reduced in the tasks),
    whether direct tasks made them (tiles, the alignment folded for whole slices), and what
    those tasks reduced beside them."""
    pooled: dict[str, da.Array]
    direct: bool
    parts: BlockParts | None


def _kept_samples(grads: xr.Dataset) -> tuple[np.ndarray, int]:
    """The store rows that take part (samples skipped for non-finite gradients do not) and how
    many of them are task A's."""
    n_a = int(grads.attrs[schema.ATTR_N_A])
    finite = np.asarray(grads[schema.FINITE].values, dtype=bool)
    keep = np.flatnonzero(finite)
    n_a_kept = int(finite[:n_a].sum())
    if n_a_kept == 0 or keep.size == n_a_kept:
        raise ValueError("no usable samples left in task A or task B (all skipped for non-finite gradients)")
    return keep, n_a_kept


def _operand(grads: xr.Dataset, b: str, sketched: bool):
    """The variable a block's scores are made from (sketch mode: its `u` sketch)."""
    return grads[schema.sketch_var(b, "u") if sketched else b]


def _build_block(grads: xr.Dataset, fisher: xr.Dataset, b: str, plan: _Plan, sketched: bool, reader,
                 write_to: dict | None = None) -> _Built:
    """One block's graph: sketches through Dask; else the score tasks read their own rows
    (`reader`, when it fits the variable) and keep the pairs (written by the tasks themselves
    where `write_to` allows, `_task_targets`) or reduce them on the device; else the gradients
    through Dask."""
    n, c, acc, dev = plan.n, plan.chunk, plan.accumulate, plan.device
    if sketched:
        u, v, w = (decoded(grads[schema.sketch_var(b, p)]).data[plan.keep].rechunk((c, 1, 1, -1))
                   for p in schema.SKETCH_PARTS)
        inter, align = sketch_block_scores(u, v, w, acc, dev)
        return _Built({"interference": inter, "alignment": _whole_mirrored(align, n)}, False, None)
    var = grads[b]
    raw = var.dtype == np.uint16  # bf16 bits, not yet decoded
    encoding = var.attrs.get(schema.ATTR_ENCODING) if raw else None
    inv = inverse_damped_fisher(fisher, b)
    if reader is not None and (raw or var.dtype == reader.dtype) and reader.shape == var.shape:
        if plan.keep_pairs != "all":  # reduced on the device, tile by tile: nothing N×N leaves it
            parts = reduced_block_scores(reader, plan.keep, inv, c, plan.n_a, plan.stats, plan.k, acc, dev, encoding=encoding)
            return _Built({}, True, parts)
        in_task = plan.stats if plan.sums_in_graph else None
        targets = _task_targets(write_to, b, plan)
        inter, align, parts = direct_block_scores(reader, plan.keep, inv, c, plan.n_a, acc, dev, encoding=encoding,
                                                  stats=in_task, write_to=targets)
        return _Built({} if targets else {"interference": inter, "alignment": align}, True, parts)
    g = (var.data if plan.keep.size == var.shape[0] else var.data[plan.keep]).rechunk((c, 1, 1, -1))
    inter, align = block_scores(g, inv, acc, dev, encoding=encoding)
    return _Built({"interference": inter, "alignment": _whole_mirrored(align, n)}, False, None)


def _task_targets(write_to: dict | None, b: str, plan: _Plan) -> tuple | None:
    """(interference, alignment, first layer, encoding) for the score tasks of block `b` to
    write their slices into themselves, or None (then the scores go through the graph):
    `write_to` = {"arrays": the stored `scores` group's `DirectChunks` by name, "first": the
    group's first layer index in them} (`qkov.pipeline.layer_groups`, whose templates exist
    before its graphs are made), whole slices per task and per chunk, pairs kept."""
    if write_to is None or plan.keep_pairs != "all" or plan.chunk < plan.n:
        return None
    arrays = write_to["arrays"]
    inter, align = (arrays.get(schema.stored_pooled_name(name, b)) for name in schema.SCORES)
    if inter is None or align is None or inter.chunks[2:] != (plan.n, plan.n) \
            or align.chunks[2:] != schema.folded_shape(plan.n) or inter.chunks[:2] != (1, 1) or align.chunks[:2] != (1, 1):
        return None
    return inter, align, int(write_to["first"]), codec.BFLOAT16 if plan.scores_dtype == "bfloat16" else None


def _whole_mirrored(align: da.Array, n: int) -> da.Array:
    """Whole slices, mirrored: the same symmetric values for the sums, top pairs and store."""
    return align.rechunk((1, 1, n, n)).map_blocks(mirrored, dtype=align.dtype)


def _top_vars(name: str, b: str, top: da.Array) -> dict[str, xr.Variable]:
    dims = (schema.LAYER, schema.head_dim(b), schema.RANK)
    return {schema.top_name(name, part, b): xr.Variable(dims, top[:, :, i].astype(dt)) for i, (part, dt) in enumerate(_TOP_PARTS)}


def _sums_var(b: str, sums: da.Array) -> xr.Variable:
    return xr.Variable((schema.LAYER, schema.head_dim(b), schema.STAT), sums)


def _stored_pooled(name: str, b: str, arr: da.Array, plan: _Plan) -> xr.Variable:
    """A pooled score as stored: the alignment's upper triangle once (symmetric; the kernel
    mirrors diagonal tiles), bf16 scores rounded per chunk as they leave the kernel."""
    n, c = plan.n, plan.chunk
    attrs, dims = {}, (schema.LAYER, schema.head_dim(b), schema.SAMPLE_I, schema.SAMPLE_J)
    if name == "alignment":
        rows, cols = schema.folded_shape(n)
        if arr.numblocks[-1] == 1 and arr.shape[-1] == n:  # whole slices: one fold per slice
            arr = arr.map_blocks(schema.fold_symmetric, chunks=arr.chunks[:2] + ((rows,), (cols,)), dtype=arr.dtype)
        elif arr.shape[-2:] != (rows, cols):  # tiles (direct reads, slices over 1 GiB): Dask folds them
            arr = schema.fold_symmetric(arr)
        arr = arr.rechunk((1, 1, rows, cols) if c >= n else (1, 1, c, min(c, cols)))
        attrs, dims = {schema.ATTR_FOLDED: n}, dims[:2] + (schema.FOLD_ROW, schema.FOLD_COL)
    if plan.scores_dtype == "bfloat16":
        arr = arr.map_blocks(codec.encode, codec.BFLOAT16, dtype=np.uint16)
        attrs[schema.ATTR_ENCODING] = codec.BFLOAT16
    return xr.Variable(dims, arr, attrs=attrs)


def _block_vars(b: str, built: _Built, plan: _Plan) -> dict[str, xr.Variable]:
    """The stored variables of one block: what its tasks reduced, then per pooled score the
    sums and top pairs reduced in the graph (where the tasks did not) or the matrix itself."""
    out: dict[str, xr.Variable] = {}
    given = built.parts
    for name in schema.SCORES if given is not None else ():
        if given.sums is not None:
            out[schema.stat_sums_name(name, b)] = _sums_var(b, given.sums[name])
        if given.top is not None:
            out.update(_top_vars(name, b, given.top[name]))
    for name, arr in built.pooled.items():
        if name == "interference" or (built.direct and arr.shape[-2:] == (plan.n, plan.n)):  # (not folded in the tasks)
            arr = arr.rechunk((1, 1, plan.chunk, plan.chunk))
        if plan.sums_in_graph and (given is None or given.sums is None):  # from the tiles, as they are written
            s = plan.stats
            sums = slice_statistics(arr[None], np.arange(plan.n) < plan.n_a, s.n_permutations, s.n_bootstrap, s.seed)[0]
            out[schema.stat_sums_name(name, b)] = _sums_var(b, sums)
        if plan.keep_pairs == "top":
            out.update(_top_vars(name, b, top_pairs_lazy(arr, plan.n_a, plan.k, largest=(name == "interference"))))
        elif plan.keep_pairs == "all":
            out[schema.stored_pooled_name(name, b)] = _stored_pooled(name, b, arr, plan)
    return out


def compact_scores(grads: xr.Dataset, fisher: xr.Dataset, *, sample_chunk: int | None = None,
                   accumulate: str = "auto", device: str = "auto", scores_dtype: str = "float32",
                   keep_pairs: str = "all", top_k: int = 100, stats=None, readers: dict | None = None,
                   side: dict | None = None, write_to: dict | None = None) -> xr.Dataset:
    """The lazy `scores` dataset as stored: per block and score, the pooled (A∪B)×(A∪B)
    matrices on the block's own heads (`pooled_<score>_<block>`, K/V per KV head), nothing
    else; `RunStore.open_scores` / `scores_view` derive the per-query-head and A×B views.
    `scores_dtype = "bfloat16"` stores them rounded to bf16 (bits as uint16).
    `keep_pairs = "top" | "none"`: no N×N matrix; each tile is reduced as it leaves the kernel
    to the statistics' sums for `stats` (a StatsSpec: the permutations and bootstrap draws of
    its seed, `slice_reductions.slice_statistics`) and, with "top", the `top_k` A×B pairs per
    slice (interference highest, alignment most negative: what `qkov query` lists). With "all"
    and float32 (and `stats`), the same sums are reduced from the tiles as they are written
    (in the score tasks themselves with direct reads), so the stats stage of the run reads
    no N×N score back (other settings, or bf16 scores, read the matrices).

    `grads` may be decoded (float32) or raw (`open_gradients(..., decode=False)`: bf16 bits
    as uint16, decoded inside the kernel — on a GPU after the transfer, at half the bytes).
    `readers` {block: DirectChunks} lets the score tasks read the raw chunks themselves;
    then `side`, a dict if given, receives per such block the `workers.parts.DiagnosticParts`
    those tasks reduce on the side for the diagnostics. `write_to` (`_task_targets`): where
    the stored arrays allow, the score tasks write the pooled matrices themselves, and the
    dataset returned leaves them out (its other variables are written as usual)."""
    keep, n_a = _kept_samples(grads)
    sketched = grads.attrs.get(schema.ATTR_MODE) == "sketch"  # gradients holds {B}_u/v/w sketches, not g
    blocks = [b for b in schema.BLOCKS if (schema.sketch_var(b, "u") if sketched else b) in grads]
    if sample_chunk is None:
        widest = max((_operand(grads, b, sketched) for b in blocks), key=lambda v: v.shape[-1])
        direct = not sketched and all(b in (readers or {}) for b in blocks)
        sample_chunk = auto_sample_chunk(keep.size, widest.shape[-1], 4 if sketched else widest.dtype.itemsize, direct)
    plan = _Plan(keep, n_a, min(keep.size, sample_chunk), keep_pairs, top_k, scores_dtype, stats, accumulate, device)
    data = {}
    for b in blocks:
        built = _build_block(grads, fisher, b, plan, sketched, (readers or {}).get(b), write_to)
        if side is not None and built.parts is not None:
            side[b] = built.parts.diagnostics
        data.update(_block_vars(b, built, plan))
    return _scores_dataset(data, grads, blocks, plan)


def _scores_dataset(data: dict, grads: xr.Dataset, blocks: list[str], plan: _Plan) -> xr.Dataset:
    """The stored variables with the scores' coordinates and attrs."""
    n, n_a = plan.n, plan.n_a
    ids = grads[schema.SAMPLE_ID].values[plan.keep].astype(object)
    kv_of = np.asarray(grads[schema.KV_HEAD_OF].values)
    coords = {
        schema.BLOCK: np.array(blocks, dtype=object),
        schema.LAYER: grads[schema.LAYER].values,
        schema.HEAD: grads[schema.HEAD].values,
        schema.KV_HEAD: np.arange(int(kv_of.max()) + 1, dtype=np.int32),
        schema.KV_HEAD_OF: (schema.HEAD, kv_of.astype(np.int32)),
        schema.SAMPLE_I: ids,
        schema.IS_A: (schema.SAMPLE_I, np.arange(n) < n_a),
        schema.SAMPLE_J: ids,
    }
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({schema.ATTR_N_A: n_a, schema.ATTR_N_B: n - n_a, schema.ATTR_TASK_A: grads.attrs.get(schema.ATTR_TASK_A),
                     schema.ATTR_TASK_B: grads.attrs.get(schema.ATTR_TASK_B), schema.ATTR_SCORES_LAYOUT: schema.SCORES_LAYOUT,
                     schema.ATTR_SCORES_DTYPE: plan.scores_dtype, schema.ATTR_KEEP_PAIRS: plan.keep_pairs},
                    sample_chunk=plan.chunk)
    if any(v.startswith(schema.stat_sums_name("")) for v in data):  # what the stored sums were reduced for
        ds.attrs[schema.ATTR_SUMS_SETTINGS] = sums_settings(plan.stats)
    return ds


def _moment_vars(grads: xr.Dataset, keep: np.ndarray, n_a: int, key_a: str, key_b: str, side: dict) -> dict:
    """Each score's per-sample moments per block (`moments_<score>_<block>`: layer, head,
    sample_i, moment in `schema.MOMENTS` order) from the scalars extraction stored for tasks
    key_a (A) and key_b (B); `side` receives each block's `DiagnosticParts` (the same scalars:
    ‖g_i‖², A_ii and the interference's other-task row and column means)."""
    n_b = keep.size - n_a
    parts = [str(p) for p in grads[schema.PART].values]
    data = {}
    for b in (b for b in schema.BLOCKS if b in grads):
        x = grads[b].data[keep]  # (N, L, H_b, parts): a few KB per sample
        for score in schema.SCORES:
            m = x[..., [parts.index(p) for p in schema.moment_parts(score, key_a, key_b)]]
            data[schema.moments_name(score, b)] = xr.Variable((schema.LAYER, schema.head_dim(b), schema.SAMPLE_I, schema.MOMENT),
                                                              m.transpose(1, 2, 0, 3).rechunk(-1))
        part = lambda name: x[..., parts.index(name)]  # noqa: E731
        side[b] = DiagnosticParts(sq=part("sq"), diag=part("a_ii"),
                                  rows=da.stack([part(f"mr.{key_a}") / n_a, part(f"mr.{key_b}") / n_b], -1),
                                  cols=da.stack([part(f"mc.{key_a}") / n_a, part(f"mc.{key_b}") / n_b], -1))
    return data


def moments_scores(grads: xr.Dataset, key_a: str, key_b: str, side: dict, stats=None, top_k: int = 0) -> xr.Dataset:
    """Answers mode: the lazy `scores` dataset of each score's per-sample moments (`_moment_vars`).
    Where extraction also sketched the interference's operands (keep_pairs = "top"), its
    sketched pooled matrices are reduced to the statistics' sums for `stats` (a StatsSpec; the
    stats stage takes their labels rows) and the top_k A×B pairs."""
    keep, n_a = _kept_samples(grads)
    n_b = keep.size - n_a
    blocks = [b for b in schema.BLOCKS if b in grads]
    data = _moment_vars(grads, keep, n_a, key_a, key_b, side)
    for b in blocks:
        if schema.sketch_var(b, "u") in grads and stats is not None:
            u, v = (decoded(grads[schema.sketch_var(b, p)]).data[keep].transpose(1, 2, 0, 3).rechunk((1, 1, -1, -1))
                    for p in ("u", "v"))
            # sketched M = S(u_i)·S(v_j), its diagonal, row and column sums made exact from the scalars
            # (only the pairs' interaction stays sketched), reduced to the stats sums and top pairs in one task per head group
            sums, top = sketched_interference(u, v, data[schema.moments_name("interference", b)].data,
                                              np.arange(keep.size) < n_a, stats.n_permutations, stats.n_bootstrap,
                                              stats.seed, min(top_k, n_a * n_b))
            data[schema.stat_sums_name("interference", b)] = _sums_var(b, sums)
            data.update(_top_vars("interference", b, top))
    sketched = any(v.startswith(schema.stat_sums_name("")) for v in data)
    plan = _Plan(keep, n_a, keep.size, "top" if sketched else "none", top_k, "float32", stats, "auto", "auto")
    ds = _scores_dataset(data, grads, blocks, plan).assign_coords({schema.MOMENT: list(schema.MOMENTS)})
    ds.attrs[schema.ATTR_MODE] = "answers"
    if sketched:
        ds.attrs["sketch_dim"] = grads.attrs.get("sketch_dim")
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
    from .store import checksummed
    from .store.work import require_intact_gradients

    store.require(schema.GRADIENTS, "scoring")
    store.require(schema.FISHER, "scoring")
    require_intact_gradients(store)  # a missing chunk would read as NaN: refused, never scored
    grads = store.open_gradients(decode=False)
    fisher = store.open_fisher()
    if grads.attrs.get(schema.ATTR_MODE) == "answers":  # no pair scores: each score's per-sample moments
        readers, side = {}, {}
        ds = moments_scores(grads, *store.pair_tasks(), side, stats=job.stats, top_k=job.score.top_k)
    else:
        readers = store.direct_chunks(schema.GRADIENTS)
        ds = compact_scores(grads, fisher, sample_chunk=sample_chunk,
                            accumulate="auto", device=job.score.device, scores_dtype=job.score.scores_dtype,
                            keep_pairs=job.score.keep_pairs, top_k=job.score.top_k, stats=job.stats, readers=readers,
                            side=(side := {}))
        if has_scalars(grads):  # sketch mode: every answer but the labels tests and top pairs exact, from the scalars
            keep, n_a = _kept_samples(grads)
            ds = ds.assign(_moment_vars(grads, keep, n_a, *store.pair_tasks(), side)).assign_coords(
                {schema.MOMENT: list(schema.MOMENTS)})
            ds.attrs.update({schema.ATTR_MODE: "sketch", "sketch_dim": grads.attrs.get("sketch_dim")})
    ds.attrs.update(provenance(job.config_dict(), job.config_hash(), stage="score", sample_chunk=ds.attrs["sample_chunk"]))
    ds.attrs[schema.ATTR_COMPLETE] = False
    encoding = {v: {"chunks": tuple(c[0] for c in ds[v].data.chunks), "compressors": checksummed(v.startswith("pooled_"))}
                for v in ds.data_vars}
    # numerical health and per-sample diagnostics (no model pass), in the same graph as the score
    # writes: from the parts the score tasks reduce from their rows and tiles (`side`), else from
    # the tiles or the operands (pipeline/diagnostics.py). Written before the scores are marked
    # complete, so complete scores always come with them.
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
