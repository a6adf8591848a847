"""The score kernels a task runs: both pair scores of a group of head slices, on the
task's device (MKL on CPU, cuBLAS on a worker's GPU with TF32 off).

For each slice, with Î_reg = Î + λ and stored signed per-sample gradients g:
  interference M[i, j] = Σ_p g_i[p]² / Î_reg[p] · |g_j[p]|   = (g²/Î_reg) · |g|ᵀ
  alignment    A[i, j] = Σ_p g_i[p] g_j[p] / Î_reg[p]         = (g/√Î_reg) · (g/√Î_reg)ᵀ
`weighted_scores` holds the formulas; everything else moves operands to the device. What the
direct tasks reduce their tiles to is `qkov.workers.reductions`', returned as one
`qkov.workers.parts.TileParts`.
"""
from __future__ import annotations

import threading

import numpy as np

from qkov.pipeline import schema
from qkov.pipeline.codec import decode_torch, to_device

from .device import one_thread_in_worker, resolve_device
from .parts import TileParts
from .reductions import side_parts, sq_norms, tile_sums, tile_top_t


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
    rounding it back to bf16. Pass b = a for a diagonal block (w is formed once, and the
    alignment is made exactly symmetric from its upper triangle)."""
    import torch

    def mm(x, y):
        return x @ y.T if out_dtype in (None, x.dtype) else torch.mm(x, y.T, out_dtype=out_dtype)

    wa = a * sw
    if b is a:  # a diagonal block: the alignment exactly symmetric, its upper triangle mirrored
        align = mm(wa, wa)  # (the store keeps the upper triangle once: qkov.pipeline.schema.fold_symmetric)
        return mm(wa * wa, a.abs()), torch.triu(align) + torch.triu(align, 1).transpose(0, 1)
    return mm(wa * wa, b.abs()), mm(wa, b * sw)


def _operands_dtype(encoding: str | None, dev: str, accumulate: str):
    """The dtype the matmul operands are formed in: the accumulation dtype, except bf16
    operands (float32 accumulation) for bf16-stored gradients on a GPU, as cuBLAS runs
    them at full tensor-core rate."""
    import torch

    from .grads import has_bmm_out_dtype

    if (dev == "cuda" and encoding == "bfloat16" and accumulate in ("auto", "float32")
            and has_bmm_out_dtype(torch.device("cuda"))):
        return torch.bfloat16
    return _accumulate_dtype(dev, accumulate)


def _kernel_device(device: str) -> str:
    """The task's device, set up for a score kernel: on a GPU, float32 matmuls without TF32
    (exact-mode scores: no 10-bit mantissa products); on CPU, one torch thread per task."""
    import torch

    dev = resolve_device(device)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        one_thread_in_worker()
    return dev


def _accumulate_dtype(dev: str, accumulate: str):
    import torch

    return torch.float32 if accumulate == "auto" else getattr(torch, accumulate)


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

    dev = _kernel_device(device)
    acc = _accumulate_dtype(dev, accumulate)
    op = _operands_dtype(encoding, dev, accumulate)
    same = gj is gi  # a diagonal chunk pair handed over as one block
    a_all = to_device(gi[0], encoding, dev, op)
    b_all = a_all if same else to_device(gj[0], encoding, dev, op)
    sw_all = torch.as_tensor(np.asarray(inv)[0], device=dev).sqrt().to(op)
    return device_scores(a_all, b_all, sw_all, acc).cpu().numpy()[:, None]


def direct_pair_kernel(layer: np.ndarray, heads: np.ndarray, inv: np.ndarray, rows_i: np.ndarray, rows_j: np.ndarray, *,
                       side: tuple, reader, weights: tuple | None = None, accumulate: str = "auto", device: str = "auto",
                       encoding: str | None = None, fold: bool = False, write_to: tuple | None = None) -> TileParts:
    """`pair_kernel` reading its own operands: the rows `rows_i` / `rows_j` (store sample
    indices) of heads `heads` of layer `layer[0]`, straight from the gradient chunk files
    (`reader`, a qkov.pipeline.store.DirectChunks) into one reused host buffer per thread —
    pinned on a GPU, so the host→device copy runs at full speed — with no Dask
    concatenation or transpose copies on the way. Returns the tile's `TileParts`: its
    scores (1, Hc, ci, cj) and, reduced from what is already on the device, its diagnostics'
    parts (`side` = (pos_i, pos_j, other): the tile's pooled positions and the diagnostics'
    task-mean weights) and, with `weights` = (the stats weight rows, n_a), its stats sums
    (as `direct_tile_reduce`), so the stats stage need not read the scores back. With `fold`
    (a whole slice), the alignment comes folded (`schema.fold_symmetric`), as stored.
    `write_to` = (interference, alignment, layer index, scores encoding): the task writes its
    whole slices into those arrays' chunks itself (`qkov.pipeline.store.DirectChunks`, one
    chunk per (layer, head)) and returns no scores (`score_graph.direct_block_scores` says when)."""
    a_all, scores = _tile_scores(layer, heads, inv, rows_i, rows_j, reader, accumulate, device, encoding)
    pos_i, pos_j, other = side
    r0, c0 = int(pos_i[0]), int(pos_j[0])
    diagnostics = side_parts(a_all, scores, other, r0, c0)
    sums = None if weights is None else tile_sums(scores, *weights, r0, c0)
    # folded where the scores are (`fold`: the tile is a whole slice): on a GPU the copy to the
    # host, which the task makes while it holds the device, carries half the alignment's bytes
    align = schema.fold_symmetric(scores[1]) if fold else scores[1]
    if write_to is not None:
        inter_out, align_out, at_layer, stored = write_to
        for name, t, target in (("inter", scores[0], inter_out), ("align", align, align_out)):
            host = _to_host(name, t, stored)
            for hi, h in enumerate(heads):
                target.write((int(at_layer), int(h), 0, 0), host[hi][None, None])
        return TileParts(diagnostics, sums=sums)
    return TileParts(diagnostics, sums=sums, interference=scores[0].cpu().numpy()[None], alignment=align.cpu().numpy()[None])


def _to_host(role: str, t, encoding: str | None) -> np.ndarray:
    """t (float32, any device) in the stored representation (`codec.encoded_on_device`: bf16
    bits rounded where t is), in this thread's reused host buffer for `role` — pinned on a GPU:
    the copy runs at the link's speed (4x a pageable copy, measured on an H100), and no fresh
    host memory is faulted in per slice. Valid until this thread's next call for `role`."""
    from qkov.pipeline.codec import encoded_on_device

    stored = encoded_on_device(t, encoding)
    dtype = np.float32 if stored is t else np.uint16
    t = stored
    host, pinned = _host_buffer(f"out-{role}", tuple(t.shape), np.dtype(dtype), t.device.type == "cuda")
    if pinned is None:
        host[...] = t.cpu().numpy().view(dtype)
    else:
        pinned[: host.nbytes].view(t.dtype).view(t.shape).copy_(t)  # (blocking: the buffer is read next)
    return host


def _tile_scores(layer, heads, inv, rows_i, rows_j, reader, accumulate: str, device: str, encoding: str | None):
    """Read a tile's rows (`direct_pair_kernel`) and score them: (row operands, (2, Hc, ci, cj)
    float32 [interference, alignment]), both on the task's device."""
    import torch

    dev = _kernel_device(device)
    acc = _accumulate_dtype(dev, accumulate)
    op = _operands_dtype(encoding, dev, accumulate)
    same = rows_i.shape == rows_j.shape and bool(np.array_equal(rows_i, rows_j))
    l, hs = int(layer[0]), [int(h) for h in heads]
    a_all = _rows(reader, l, hs, rows_i, "a", encoding, dev, op)
    b_all = a_all if same else _rows(reader, l, hs, rows_j, "b", encoding, dev, op)
    sw_all = torch.as_tensor(np.asarray(inv)[0], device=dev).sqrt().to(op)
    return a_all, device_scores(a_all, b_all, sw_all, acc)


def direct_sq_norms(layer: np.ndarray, heads: np.ndarray, rows: np.ndarray, *, reader, encoding: str | None = None,
                    device: str = "auto") -> np.ndarray:
    """Σ_p g[p]² of the rows `rows` of heads `heads` of layer `layer[0]` (float64, (1, Hc, n)),
    read from the chunk files like `direct_pair_kernel` (the diagnostics' gradient norms)."""
    import torch

    dev = _kernel_device(device)
    return sq_norms(_rows(reader, int(layer[0]), [int(h) for h in heads], rows, "a", encoding, dev, torch.float32))[None]


def _rows(reader, layer: int, heads: list[int], rows: np.ndarray, role: str, encoding: str | None, dev: str, dtype):
    """(Hc, len(rows), P) operands on `dev` as `dtype`: from the chunk files through a reused host
    buffer, or on the fused path (`qkov.workers.resident.ResidentRows`) from where extraction
    left them, the same stored values."""
    if hasattr(reader, "rows_on_device"):
        return reader.rows_on_device(layer, heads, rows, dev).to(dtype)
    return _to_device(_read_rows(reader, layer, heads, rows, role, pinned=(dev == "cuda")), encoding, dev, dtype)


_BUFFERS = threading.local()  # per score thread: reused host buffers (pinned on a GPU), by role


def _host_buffer(role: str, shape: tuple[int, ...], dtype: np.dtype, pinned: bool):
    """A reused (numpy view, torch tensor or None) of `shape`: pinned allocations cost
    milliseconds each, so every thread keeps its own and grows it when needed."""
    import torch

    have = getattr(_BUFFERS, role, None)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if have is None or have[1] < n or have[2] != pinned:
        t = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        have = (t, n, pinned)
        setattr(_BUFFERS, role, have)
    t = have[0][:n]
    return t.numpy().view(dtype).reshape(shape), (t if pinned else None)


def _read_rows(reader, layer: int, heads: list[int], rows: np.ndarray, role: str, pinned: bool):
    """(Hc, len(rows), P) rows of one layer's heads, read chunk by chunk; a chunk wholly
    wanted, in order, is read straight into its place in the buffer."""
    cs, p = reader.chunks[0], reader.shape[3]
    out, tensor = _host_buffer(role, (len(heads), len(rows), p), reader.dtype, pinned)
    rows = np.asarray(rows, dtype=np.int64)  # ascending and distinct (kept sample indices)
    chunks, first = np.unique(rows // cs, return_index=True)
    spans = [(int(k), a, b) for k, a, b in zip(chunks, first, [*first[1:], rows.size])]
    tmp = None
    for hi, h in enumerate(heads):
        for k, a, b in spans:  # rows[a:b] lie in chunk k
            if b - a == cs:  # the whole chunk, in order
                reader.read_into((k, layer, h, 0), out[hi, a:b])
                continue
            if tmp is None:
                tmp = np.empty(reader.chunks, dtype=reader.dtype)
            reader.read_into((k, layer, h, 0), tmp)
            out[hi, a:b] = tmp[rows[a:b] - k * cs, 0, 0]
    return out, tensor


def _to_device(host, encoding: str | None, dev: str, dtype):
    """`to_device` for a (numpy view, pinned tensor) pair: a pinned buffer goes to the
    device asynchronously as raw bits (the result's .cpu() orders the next reuse after it)."""
    import torch

    arr, pinned = host
    if pinned is None or dev == "cpu":
        return to_device(arr, encoding, dev, dtype)
    bits = pinned[: arr.nbytes].to(dev, non_blocking=True)
    return decode_torch(bits.view(torch.int16 if arr.dtype == np.uint16 else torch.float32).view(arr.shape), encoding, dtype)


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


def sketch_pair_kernel(ui: np.ndarray, vj: np.ndarray, wi: np.ndarray, wj: np.ndarray, accumulate: str = "auto",
                       device: str = "auto") -> np.ndarray:
    """Sketch-mode scores for one layer, a group of heads and one pair of sample chunks:
    interference S(u_i)·S(v_j) and alignment S(w_i)·S(w_j) from the stored sketches
    (1, Hc, c, k) (qkov.workers.sketch; the Fisher is already in u and w). Same output and dtype
    rules as `pair_kernel`."""
    import torch

    dev = _kernel_device(device)
    dt = _accumulate_dtype(dev, accumulate)
    u, v, w, w2 = (to_device(x[0], None, dev, dt) for x in (ui, vj, wi, wj))
    out = torch.stack([u @ v.transpose(1, 2), w @ w2.transpose(1, 2)]).to(torch.float32).cpu().numpy()
    return out[:, None]




def direct_tile_reduce(layer: np.ndarray, heads: np.ndarray, inv: np.ndarray, rows_i: np.ndarray, rows_j: np.ndarray,
                       pos_i: np.ndarray, pos_j: np.ndarray, *, reader, weights: tuple, other: np.ndarray, n_a: int,
                       top_k: int, accumulate: str = "auto", device: str = "auto", encoding: str | None = None) -> TileParts:
    """`direct_pair_kernel` for `score.keep_pairs = "top" | "none"`: the tile's scores never
    leave the device; the task returns the `TileParts` the statistics, `qkov query` and the
    diagnostics need of them: the stats sums of both scores (`weights` = the stats stage's
    (left, right, wa, wb) rows), with `top_k` the tile's k best A×B pairs, and the
    diagnostics' parts. `pos_i`/`pos_j` are the tile's pooled positions (rows_i/rows_j its store rows)."""
    a_all, scores = _tile_scores(layer, heads, inv, rows_i, rows_j, reader, accumulate, device, encoding)
    r0, c0 = int(pos_i[0]), int(pos_j[0])
    diagnostics, sums = side_parts(a_all, scores, other, r0, c0), tile_sums(scores, weights, n_a, r0, c0)
    top = None
    if top_k:
        top = np.stack([tile_top_t(scores[s], n_a, (r0, c0), top_k, largest=(s == 0)) for s in (0, 1)])
    return TileParts(diagnostics, sums=sums, top=top)
