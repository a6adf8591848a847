"""The score stage: all pair scores per (block, layer, head) as one Dask graph.

For each slice, with Î_reg = Î + λ and the stored signed per-sample gradients g:
  interference M[i, j] = Σ_p g_i[p]² / Î_reg[p] · |g_j[p]|   = (g²/Î_reg) · |g|ᵀ
  alignment    A[i, j] = Σ_p g_i[p] g_j[p] / Î_reg[p]         = (g/√Î_reg) · (g/√Î_reg)ᵀ
Both are matmuls over the slice's entries (`da.matmul`, the summed axis in one
chunk), batched over (layer, head). The pooled (A∪B)×(A∪B) matrices are kept for
the permutation null (stats stage); `interference`/`alignment` are their A×B block.
K/V are computed once per KV head and shown per query head (coordinate kv_head).
"""
from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from . import schema
from .store import mark_complete, open_root, provenance, require_complete, zarr_store

DEFAULT_SAMPLE_CHUNK = 512


def open_gradients(run: str, storage_options: dict | None = None, decode: bool = True) -> xr.Dataset:
    """The `gradients` group as a lazy dataset; bfloat16 storage decoded to float32."""
    ds = xr.open_zarr(zarr_store(run, storage_options, read_only=True), group=schema.GRADIENTS, consolidated=False)
    if decode:  # every encoded variable: the blocks' gradients, or their sketches in sketch mode
        for b in list(ds.data_vars):
            ds[b] = _decoded(ds[b])
    return ds


def _decoded(var: xr.DataArray) -> xr.DataArray:
    """A `gradients` variable as float32 whether or not it was opened decoded."""
    if var.dtype != np.uint16:
        return var
    enc = var.attrs[schema.ATTR_ENCODING]
    return var.copy(data=var.data.map_blocks(schema.decode, enc, dtype=np.float32))


def open_fisher(run: str, storage_options: dict | None = None) -> xr.Dataset:
    return xr.open_zarr(zarr_store(run, storage_options, read_only=True), group=schema.FISHER, consolidated=False)


def inverse_damped_fisher(fisher: xr.Dataset, block: str) -> da.Array:
    """1/(Î+λ) per (layer, head, param) in float64, lazily from the stored Fisher (one chunk
    per (layer, head), so no large array is embedded in the graph); 0 where Î+λ is 0."""
    from workers.fisher import inverse_regularised

    f = fisher[block].data
    f = (f if isinstance(f, da.Array) else da.from_array(f)).rechunk((1, 1, -1))
    lam = np.asarray(fisher["damping"].sel(block=block).values, dtype=np.float64)[:, None, None]
    return da.map_blocks(inverse_regularised, f, da.from_array(lam, chunks=(1, 1, 1)), dtype=np.float64)


def slice_scores(a, b, inv):
    """Interference and alignment of one slice: rows of `a` (samples i) against rows of `b`
    (samples j), torch tensors (n, P) with inv (P,) = 1/Î_reg, in the tensors' dtype
    (`qkov check` calls this; the stage kernel calls `weighted_scores` with √inv formed once)."""
    import torch

    return weighted_scores(a, b, torch.sqrt(inv))


def weighted_scores(a, b, sw, out_dtype=None):
    """The score formulas, in one place: with w = g·sw (sw = 1/√Î_reg),
    interference = (w_a²) @ |b|ᵀ and alignment = w_a @ w_bᵀ. g²/Î_reg is formed as
    (g/√Î_reg)² so that tiny gradients do not underflow in float32. `out_dtype` float32
    with bf16 operands keeps the fp32 accumulator's result (cuBLAS `out_dtype`) instead of
    rounding it back to bf16. Pass b = a for a diagonal block (w is formed once)."""
    import torch

    def mm(x, y):
        return x @ y.T if out_dtype in (None, x.dtype) else torch.mm(x, y.T, out_dtype=out_dtype)

    wa = a * sw
    wb = wa if b is a else b * sw
    return mm(wa * wa, b.abs()), mm(wa, wb)


def _operands_dtype(encoding: str | None, dev: str, accumulate: str):
    """The dtype the matmul operands are formed in: the accumulation dtype, except bf16
    operands (float32 accumulation) for bf16-stored gradients on a GPU, as cuBLAS runs
    them at full tensor-core rate."""
    import torch

    from workers.grads import has_bmm_out_dtype

    if (dev == "cuda" and encoding == "bfloat16" and accumulate in ("auto", "float32")
            and has_bmm_out_dtype(torch.device("cuda"))):
        return torch.bfloat16
    return _accumulate_dtype(dev, accumulate)


def _accumulate_dtype(dev: str, accumulate: str):
    import torch

    return torch.float32 if accumulate == "auto" else getattr(torch, accumulate)


def one_thread_in_worker() -> None:
    """Inside a Dask worker, CPU score tasks use one torch thread each: the concurrency comes
    from the worker's threads and processes, and torch's own pool on top would oversubscribe
    the cores (16 single-threaded workers × 16 torch threads each on a 16-core machine)."""
    import torch

    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _device_tensor(x: np.ndarray, encoding: str | None, dev: str, dtype):
    """A stored block (float32, or bf16 bit patterns as uint16) as a torch tensor of `dtype`
    on `dev`. bf16 bits travel to the device as they are (half the bytes) and are
    reinterpreted there; on CPU they are widened exactly to float32 first."""
    import torch

    x = np.asarray(x)
    if encoding == "bfloat16":
        if dev == "cpu":
            return torch.from_numpy(schema.decode(x, encoding)).to(dtype)
        t = torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).to(dev, non_blocking=True).view(torch.bfloat16)
        return t.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(x)).to(dev).to(dtype)


def pair_kernel(gi: np.ndarray, gj: np.ndarray, inv: np.ndarray, accumulate: str = "auto", device: str = "auto",
                encoding: str | None = None) -> np.ndarray:
    """Both scores for one layer, a group of its heads, and one pair of sample chunks.

    gi: (1, Hc, ci, P), gj: (1, Hc, cj, P) stored gradients (float32, or bf16 bit patterns
    as uint16 when `encoding` is "bfloat16"); inv: (1, Hc, P) = 1/Î_reg.
    Returns (2, 1, Hc, ci, cj) float32: [interference, alignment]. torch runs the matmuls
    (MKL on CPU, cuBLAS on a worker's GPU with TF32 off), accumulating in `accumulate`
    ("auto": float32, the DESIGN's floor; "float64" for references). On a GPU, bf16-stored
    gradients are multiplied as bf16 operands with float32 accumulation. The elementwise
    operands are formed here, one head at a time, so the (N, P) arrays u, |g| and g/√Î are
    never materialised for the whole run.
    """
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    # decided where the task runs (the client may have no GPU)
    acc = _accumulate_dtype(dev, accumulate)
    op = _operands_dtype(encoding, dev, accumulate)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact-mode scores: no 10-bit mantissa products
    else:
        one_thread_in_worker()
    same = gj is gi  # a diagonal chunk pair handed over as one block
    a_all = _device_tensor(gi[0], encoding, dev, op)
    b_all = a_all if same else _device_tensor(gj[0], encoding, dev, op)
    sw_all = torch.as_tensor(np.asarray(inv)[0], device=dev).sqrt().to(op)
    return device_scores(a_all, b_all, sw_all, acc).cpu().numpy()[:, None]


def device_scores(a_all, b_all, sw_all, acc):
    """Both scores of Hc slices from operands already on one device: a_all (Hc, ci, P),
    b_all (Hc, cj, P) gradients, sw_all (Hc, P) = 1/√Î_reg, all in the operand dtype.
    Returns (2, Hc, ci, cj) float32 [interference, alignment] on that device. One head at
    a time, so the temporaries are one slice's (the benchmarks call this directly)."""
    import torch

    hc, ci, cj = a_all.shape[0], a_all.shape[1], b_all.shape[1]
    out = torch.empty((2, hc, ci, cj), dtype=torch.float32, device=a_all.device)
    for h in range(hc):
        a = a_all[h]
        out[0, h], out[1, h] = weighted_scores(a, a if b_all is a_all else b_all[h], sw_all[h], acc)
    return out


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


def sketch_pair_kernel(ui: np.ndarray, vj: np.ndarray, wi: np.ndarray, wj: np.ndarray, accumulate: str = "auto",
                       device: str = "auto") -> np.ndarray:
    """Sketch-mode scores for one layer, a group of heads and one pair of sample chunks:
    interference S(u_i)·S(v_j) and alignment S(w_i)·S(w_j) from the stored sketches
    (1, Hc, c, k) (workers.sketch; the Fisher is already in u and w). Same output and dtype
    rules as `pair_kernel`."""
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dt = _accumulate_dtype(dev, accumulate)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        one_thread_in_worker()
    u, v, w, w2 = (_device_tensor(x[0], None, dev, dt) for x in (ui, vj, wi, wj))
    out = torch.stack([u @ v.transpose(1, 2), w @ w2.transpose(1, 2)]).to(torch.float32).cpu().numpy()
    return out[:, None]


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


def auto_sample_chunk(n: int, width: int, itemsize: int) -> int:
    """Samples per score chunk: all of them when one head's whole slice fits a task (each
    chunk then travels to the worker, and its GPU, once per slice instead of once per chunk
    pair), else DEFAULT_SAMPLE_CHUNK."""
    return n if n * width * itemsize <= TASK_BYTES else DEFAULT_SAMPLE_CHUNK


def score_dataset(grads: xr.Dataset, fisher: xr.Dataset, *, sample_chunk: int | None = None,
                  accumulate: str = "auto", device: str = "auto") -> xr.Dataset:
    """The lazy `scores` dataset (pooled matrices and their A×B blocks) for every block present.

    `grads` may be decoded (float32) or raw (`open_gradients(..., decode=False)`: bf16 bits
    as uint16, decoded inside the kernel — on a GPU after the transfer, at half the bytes)."""
    n_a = int(grads.attrs["n_a"])
    finite = np.asarray(grads["finite"].values, dtype=bool)
    keep = np.flatnonzero(finite)  # samples skipped for non-finite gradients take no part
    n_a_kept = int(finite[:n_a].sum())
    n = keep.size
    if n_a_kept == 0 or n == n_a_kept:
        raise ValueError("no usable samples left in task A or task B (all skipped for non-finite gradients)")
    ids = grads[schema.SAMPLE_ID].values[keep].astype(object)
    kv_of = np.asarray(grads["kv_head_of"].values)
    sketched = grads.attrs.get("mode") == "sketch"  # gradients holds {B}_u/v/w sketches, not g
    blocks = [b for b in schema.BLOCKS if (schema.sketch_var(b, "u") if sketched else b) in grads]
    if sample_chunk is None:
        widest = max((grads[schema.sketch_var(b, "u") if sketched else b] for b in blocks), key=lambda v: v.shape[-1])
        sample_chunk = auto_sample_chunk(n, widest.shape[-1], 4 if sketched else widest.dtype.itemsize)
    c = min(n, sample_chunk)
    pooled = {s: [] for s in schema.SCORES}
    for b in blocks:
        if sketched:
            u, v, w = (_decoded(grads[schema.sketch_var(b, p)]).data[keep].rechunk((c, 1, 1, -1))
                       for p in schema.SKETCH_PARTS)
            inter, align = sketch_block_scores(u, v, w, accumulate, device)
        else:
            var = grads[b]
            raw = var.dtype == np.uint16  # bf16 bits, not yet decoded
            g = var.data[keep].rechunk((c, 1, 1, -1))
            inter, align = block_scores(g, inverse_damped_fisher(fisher, b), accumulate, device,
                                        encoding=var.attrs.get(schema.ATTR_ENCODING) if raw else None)
        for name, arr in (("interference", inter), ("alignment", align)):
            if schema.head_dim(b) == schema.KV_HEAD:  # shown per query head
                arr = arr[:, kv_of]
            pooled[name].append(arr.rechunk((1, 1, c, c)))
    layer = grads[schema.LAYER].values
    coords = {
        schema.BLOCK: np.array(blocks, dtype=object),
        schema.LAYER: layer,
        schema.HEAD: grads[schema.HEAD].values,
        schema.KV_HEAD: (schema.HEAD, kv_of.astype(np.int32)),
        schema.SAMPLE_I: ids,
        "is_a": (schema.SAMPLE_I, np.arange(n) < n_a_kept),
        schema.SAMPLE_A: ids[:n_a_kept],
        schema.SAMPLE_B: ids[n_a_kept:],
    }
    data = {}
    ca, cb = min(n_a_kept, sample_chunk), min(n - n_a_kept, sample_chunk)
    for name in schema.SCORES:
        full = da.stack(pooled[name])  # (block, L, H, N, N)
        data[schema.pooled_name(name)] = ((schema.BLOCK, schema.LAYER, schema.HEAD, schema.SAMPLE_I, schema.SAMPLE_J), full)
        data[name] = (
            (schema.BLOCK, schema.LAYER, schema.HEAD, schema.SAMPLE_A, schema.SAMPLE_B),
            full[:, :, :, :n_a_kept, n_a_kept:].rechunk((1, 1, 1, ca, cb)),
        )
    ds = xr.Dataset(data, coords=coords)
    ds[schema.SAMPLE_J] = ids  # same samples as sample_i, as the column dimension
    ds.attrs.update(n_a=n_a_kept, n_b=n - n_a_kept, task_a=grads.attrs.get("task_a"), task_b=grads.attrs.get("task_b"),
                    sample_chunk=c)
    return ds


def run_score(job, executor, *, sample_chunk: int | None = None) -> xr.Dataset:
    """Compute and write the `scores` group from a run's `gradients` and `fisher` groups."""
    run, so = job.output.path, job.output.storage_options
    root = open_root(run, so, mode="r")
    require_complete(root, schema.GRADIENTS, "scoring")
    require_complete(root, schema.FISHER, "scoring")
    ds = score_dataset(open_gradients(run, so, decode=False), open_fisher(run, so), sample_chunk=sample_chunk,
                       accumulate="auto", device=job.extract.device)
    ds.attrs.update(provenance(job.config_dict(), job.config_hash(), stage="score", sample_chunk=ds.attrs["sample_chunk"]))
    ds.attrs[schema.ATTR_COMPLETE] = False
    encoding = {v: {"chunks": tuple(c[0] for c in ds[v].data.chunks)} for v in ds.data_vars}
    delayed = ds.to_zarr(zarr_store(run, so), group=schema.SCORES_GROUP, mode="w", compute=False,
                         encoding=encoding, zarr_format=3, consolidated=False)
    executor.compute(delayed)
    mark_complete(open_root(run, so, mode="r+"), schema.SCORES_GROUP)
    return open_scores(run, so)


def open_scores(run: str, storage_options: dict | None = None) -> xr.Dataset:
    root = open_root(run, storage_options, mode="r")
    require_complete(root, schema.SCORES_GROUP, "reading scores")
    return xr.open_zarr(zarr_store(run, storage_options, read_only=True), group=schema.SCORES_GROUP, consolidated=False)


def top_pairs(scores: xr.Dataset, layer: int, head: int, block: str = "Q", n: int = 10,
              score: str = "interference") -> list[dict]:
    """The head's n highest-scoring (sample_a, sample_b) pairs with the users' sample ids."""
    m = scores[score].sel(block=block, layer=layer, head=head).values
    order = np.argsort(m, axis=None)[::-1][:n]
    ia, ib = np.unravel_index(order, m.shape)
    a_ids, b_ids = scores[schema.SAMPLE_A].values, scores[schema.SAMPLE_B].values
    return [{"sample_a": str(a_ids[i]), "sample_b": str(b_ids[j]), score: float(m[i, j])} for i, j in zip(ia, ib)]
