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
            if ds[b].attrs.get(schema.ATTR_ENCODING, "float32") != "float32":
                enc = ds[b].attrs[schema.ATTR_ENCODING]
                ds[b] = ds[b].copy(data=ds[b].data.map_blocks(schema.decode, enc, dtype=np.float32))
    return ds


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
    (samples j), torch tensors (n, P) with inv (P,) = 1/Î_reg, in the tensors' dtype.
    The one place the score formulas live (stage kernel and `qkov check` both call it)."""
    import torch

    sw = torch.sqrt(inv)
    return (a * a * inv) @ b.abs().T, (a * sw) @ (b * sw).T


def pair_kernel(gi: np.ndarray, gj: np.ndarray, inv: np.ndarray, accumulate: str = "float64", device: str = "auto") -> np.ndarray:
    """Both scores for one (layer, head) and one pair of sample chunks.

    gi: (1, 1, ci, P), gj: (1, 1, cj, P) gradients; inv: (1, 1, P) = 1/Î_reg.
    Returns (2, 1, 1, ci, cj) float32: [interference, alignment]. torch runs the
    matmuls (MKL on CPU, cuBLAS on a worker's GPU without TF32), accumulating in
    `accumulate` ("auto": float32 on a GPU, float64 on CPU); the elementwise terms are formed here, per block, so the
    (N, P) operands u, |g| and g/√Î are never materialised for the whole run.
    """
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    # decided where the task runs (the client may have no GPU): float32 on a GPU, float64 on CPU
    dt = getattr(torch, accumulate) if accumulate != "auto" else (torch.float32 if dev == "cuda" else torch.float64)
    a = torch.as_tensor(np.asarray(gi)[0, 0], device=dev).to(dt)
    b = a if gj is gi else torch.as_tensor(np.asarray(gj)[0, 0], device=dev).to(dt)
    w = torch.as_tensor(np.asarray(inv)[0, 0], device=dev).to(dt)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact-mode scores: no 10-bit mantissa products
    interference, alignment = slice_scores(a, b, w)
    out = torch.stack([interference, alignment]).to(torch.float32).cpu().numpy()
    return out[:, None, None]


def block_scores(g: da.Array, inv, accumulate: str = "float64", device: str = "auto") -> tuple[da.Array, da.Array]:
    """Pooled interference and alignment for one block.

    g: (sample, layer, head, param) dask array with param in one chunk;
    inv: (layer, head, param) 1/Î_reg. Returns two (layer, head, sample, sample) arrays.
    """
    gt = g.transpose(1, 2, 0, 3)  # (L, H, N, P)
    inv_d = (inv if isinstance(inv, da.Array) else da.from_array(inv)).rechunk((1, 1, -1))
    both = da.blockwise(
        pair_kernel, "slhij",
        gt, "lhip", gt, "lhjp", inv_d, "lhp",
        new_axes={"s": 2}, concatenate=True, dtype=np.float32, accumulate=accumulate, device=device,
    )
    return both[0], both[1]


def sketch_pair_kernel(ui: np.ndarray, vj: np.ndarray, wi: np.ndarray, wj: np.ndarray, accumulate: str = "float64",
                       device: str = "auto") -> np.ndarray:
    """Sketch-mode scores for one (layer, head) and one pair of sample chunks: interference
    S(u_i)·S(v_j) and alignment S(w_i)·S(w_j) from the stored sketches (1, 1, c, k)
    (workers.sketch; the Fisher is already in u and w). Same output and dtype rules as
    `pair_kernel`."""
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dt = getattr(torch, accumulate) if accumulate != "auto" else (torch.float32 if dev == "cuda" else torch.float64)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    u, v, w, w2 = (torch.as_tensor(np.asarray(x)[0, 0], device=dev).to(dt) for x in (ui, vj, wi, wj))
    out = torch.stack([u @ v.T, w @ w2.T]).to(torch.float32).cpu().numpy()
    return out[:, None, None]


def sketch_block_scores(u: da.Array, v: da.Array, w: da.Array, accumulate: str = "float64",
                        device: str = "auto") -> tuple[da.Array, da.Array]:
    """`block_scores` for sketch mode: u, v, w (sample, layer, head, sketch) with the sketch
    axis in one chunk. Returns two (layer, head, sample, sample) arrays."""
    ut, vt, wt = (x.transpose(1, 2, 0, 3) for x in (u, v, w))  # (L, H, N, k)
    both = da.blockwise(
        sketch_pair_kernel, "slhij",
        ut, "lhik", vt, "lhjk", wt, "lhik", wt, "lhjk",
        new_axes={"s": 2}, concatenate=True, dtype=np.float32, accumulate=accumulate, device=device,
    )
    return both[0], both[1]


def score_dataset(grads: xr.Dataset, fisher: xr.Dataset, *, sample_chunk: int = DEFAULT_SAMPLE_CHUNK,
                  accumulate: str = "float64", device: str = "auto") -> xr.Dataset:
    """The lazy `scores` dataset (pooled matrices and their A×B blocks) for every block present."""
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
    c = min(n, sample_chunk)
    pooled = {s: [] for s in schema.SCORES}
    for b in blocks:
        if sketched:
            u, v, w = (grads[schema.sketch_var(b, p)].data[keep].rechunk((c, 1, 1, -1)) for p in schema.SKETCH_PARTS)
            inter, align = sketch_block_scores(u, v, w, accumulate, device)
        else:
            g = grads[b].data[keep].rechunk((c, 1, 1, -1))
            inter, align = block_scores(g, inverse_damped_fisher(fisher, b), accumulate, device)
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
    ds.attrs.update(n_a=n_a_kept, n_b=n - n_a_kept, task_a=grads.attrs.get("task_a"), task_b=grads.attrs.get("task_b"))
    return ds


def run_score(job, executor, *, sample_chunk: int = DEFAULT_SAMPLE_CHUNK) -> xr.Dataset:
    """Compute and write the `scores` group from a run's `gradients` and `fisher` groups."""
    run, so = job.output.path, job.output.storage_options
    root = open_root(run, so, mode="r")
    require_complete(root, schema.GRADIENTS, "scoring")
    require_complete(root, schema.FISHER, "scoring")
    ds = score_dataset(open_gradients(run, so), open_fisher(run, so), sample_chunk=sample_chunk,
                       accumulate="auto", device=job.extract.device)
    ds.attrs.update(provenance(job.config_dict(), job.config_hash(), stage="score", sample_chunk=sample_chunk))
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
