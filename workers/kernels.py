"""The score kernels a task runs: both pair scores of a group of head slices, on the
task's device (MKL on CPU, cuBLAS on a worker's GPU with TF32 off).

For each slice, with Î_reg = Î + λ and stored signed per-sample gradients g:
  interference M[i, j] = Σ_p g_i[p]² / Î_reg[p] · |g_j[p]|   = (g²/Î_reg) · |g|ᵀ
  alignment    A[i, j] = Σ_p g_i[p] g_j[p] / Î_reg[p]         = (g/√Î_reg) · (g/√Î_reg)ᵀ
`weighted_scores` holds the formulas; everything else moves operands to the device.
"""
from __future__ import annotations

import threading

import numpy as np

from qkov.pipeline import schema

from .device import one_thread_in_worker, resolve_device


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

    dev = _kernel_device(device)
    acc = _accumulate_dtype(dev, accumulate)
    op = _operands_dtype(encoding, dev, accumulate)
    same = gj is gi  # a diagonal chunk pair handed over as one block
    a_all = _device_tensor(gi[0], encoding, dev, op)
    b_all = a_all if same else _device_tensor(gj[0], encoding, dev, op)
    sw_all = torch.as_tensor(np.asarray(inv)[0], device=dev).sqrt().to(op)
    return device_scores(a_all, b_all, sw_all, acc).cpu().numpy()[:, None]


def direct_pair_kernel(layer: np.ndarray, heads: np.ndarray, inv: np.ndarray, rows_i: np.ndarray, rows_j: np.ndarray, *,
                       side: tuple, reader, weights: tuple | None = None, accumulate: str = "auto", device: str = "auto",
                       encoding: str | None = None):
    """`pair_kernel` reading its own operands: the rows `rows_i` / `rows_j` (store sample
    indices) of heads `heads` of layer `layer[0]`, straight from the gradient chunk files
    (`reader`, a qkov.pipeline.store.DirectChunks) into one reused host buffer per thread —
    pinned on a GPU, so the host→device copy runs at full speed — with no Dask
    concatenation or transpose copies on the way. Returns (`pair_kernel`'s output,
    `side_parts` of the tile), `side` = (pos_i, pos_j, other): the tile's pooled positions
    and the diagnostics' task-mean weights, reduced from what is already on the device.
    With `weights` = (the stats weight rows, n_a), the side parts also hold the tile's
    stats `sums` (as `direct_tile_reduce`), so the stats stage need not read the scores back."""
    a_all, scores = _tile_scores(layer, heads, inv, rows_i, rows_j, reader, accumulate, device, encoding)
    pos_i, pos_j, other = side
    r0, c0 = int(pos_i[0]), int(pos_j[0])
    out = side_parts(a_all, scores, other, r0, c0)
    if weights is not None:
        out["sums"] = _tile_sums(scores, *weights, r0, c0)
    return scores.cpu().numpy()[:, None], out


def _tile_scores(layer, heads, inv, rows_i, rows_j, reader, accumulate: str, device: str, encoding: str | None):
    """Read a tile's rows (`direct_pair_kernel`) and score them: (row operands, (2, Hc, ci, cj)
    float32 [interference, alignment]), both on the task's device."""
    import torch

    dev = _kernel_device(device)
    acc = _accumulate_dtype(dev, accumulate)
    op = _operands_dtype(encoding, dev, accumulate)
    same = rows_i.shape == rows_j.shape and bool(np.array_equal(rows_i, rows_j))
    l, hs = int(layer[0]), [int(h) for h in heads]
    a_all = _to_device(_read_rows(reader, l, hs, rows_i, "a", pinned=(dev == "cuda")), encoding, dev, op)
    b_all = a_all if same else _to_device(_read_rows(reader, l, hs, rows_j, "b", pinned=(dev == "cuda")), encoding, dev, op)
    sw_all = torch.as_tensor(np.asarray(inv)[0], device=dev).sqrt().to(op)
    return a_all, device_scores(a_all, b_all, sw_all, acc)


def side_parts(a_all, scores, other: np.ndarray, r0: int, c0: int) -> dict:
    """What the diagnostics need of one tile, partials that add up over the slice's tiles:
      norms (Hc, ci)     Σ g² of the tile's rows (a_all: its row operands on the device)
      rows  (Hc, ci, 2)  Σ_j M[i, j]·other[j] over the tile's columns (other = (N, 2)
                         task-A / task-B mean weights: the interference's marginals)
      cols  (Hc, cj, 2)  Σ_i M[i, j]·other[i] over the tile's rows
      diag  (Hc, ci)     the alignment diagonal A_ii, on diagonal tiles (r0 = c0) only
    scores: (2, Hc, ci, cj) [interference, alignment] at pooled position (r0, c0)."""
    import torch

    ci, cj = scores.shape[2:]
    w = torch.as_tensor(np.asarray(other, dtype=np.float64), device=scores.device)
    inter = scores[0].double()
    out = {"norms": _sq_norms(a_all), "rows": (inter @ w[c0 : c0 + cj]).cpu().numpy(),
           "cols": (inter.transpose(1, 2) @ w[r0 : r0 + ci]).cpu().numpy()}
    if r0 == c0 and ci == cj:
        out["diag"] = scores[1].diagonal(dim1=1, dim2=2).double().cpu().numpy()
    return out


def _sq_norms(x, rows_per_step: int = 1024) -> np.ndarray:
    """Σ_p x[h, i, p]² in float64 (Hc, n), a block of rows at a time (bf16 and float32 widen
    exactly; the float64 copy of a whole slice would be 4x the operands' bytes)."""
    import torch

    out = torch.empty(x.shape[:2], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[1], rows_per_step):
        out[:, i : i + rows_per_step] = (x[:, i : i + rows_per_step].double() ** 2).sum(-1)
    return out.cpu().numpy()


def direct_sq_norms(layer: np.ndarray, heads: np.ndarray, rows: np.ndarray, *, reader, encoding: str | None = None,
                    device: str = "auto") -> np.ndarray:
    """Σ_p g[p]² of the rows `rows` of heads `heads` of layer `layer[0]` (float64, (1, Hc, n)),
    read from the chunk files like `direct_pair_kernel` (the diagnostics' gradient norms)."""
    import torch

    dev = _kernel_device(device)
    host = _read_rows(reader, int(layer[0]), [int(h) for h in heads], rows, "a", pinned=(dev == "cuda"))
    return _sq_norms(_to_device(host, encoding, dev, torch.float32))[None]


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
    """`_device_tensor` for a (numpy view, pinned tensor) pair: a pinned buffer goes to the
    device asynchronously as raw bits (the result's .cpu() orders the next reuse after it)."""
    import torch

    arr, pinned = host
    if pinned is None or dev == "cpu":
        return _device_tensor(arr, encoding, dev, dtype)
    t = pinned[: arr.nbytes].to(dev, non_blocking=True)
    if encoding == "bfloat16":
        return t.view(torch.bfloat16).view(arr.shape).to(dtype)
    return t.view(torch.float32).view(arr.shape).to(dtype)


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
    u, v, w, w2 = (_device_tensor(x[0], None, dev, dt) for x in (ui, vj, wi, wj))
    out = torch.stack([u @ v.transpose(1, 2), w @ w2.transpose(1, 2)]).to(torch.float32).cpu().numpy()
    return out[:, None]


_WEIGHTS_ON_DEVICE: dict = {}  # (id of the host weights, device) -> (host weights kept alive, device copies)
_WEIGHTS_LOCK = threading.Lock()


def _device_weights(left, right, wa, wb, device: str) -> tuple:
    """The stats weight rows as float64 tensors on `device`, copied once per worker process:
    they are the same for every chunk of a run (stats_stage._weights caches the host arrays,
    so their identity is the key), and re-sending ~100 MB of them per chunk cost more than
    the chunk's sums."""
    import torch

    key = (id(left), id(right), id(wa), id(wb), device)
    with _WEIGHTS_LOCK:
        hit = _WEIGHTS_ON_DEVICE.get(key)
        if hit is None:
            if len(_WEIGHTS_ON_DEVICE) >= 4:
                _WEIGHTS_ON_DEVICE.pop(next(iter(_WEIGHTS_ON_DEVICE)))
            hit = ((left, right, wa, wb), tuple(torch.from_numpy(np.array(x, dtype=np.float64)).to(device)
                                                for x in (left, right, wa, wb)))  # a copy: the host rows are read-only
            _WEIGHTS_ON_DEVICE[key] = hit
    return hit[1]


def stat_sums(block: np.ndarray, left: np.ndarray, right: np.ndarray, wa: np.ndarray, wb: np.ndarray,
              is_a: np.ndarray, offset: tuple[int, int], device: str) -> np.ndarray:
    """The stats stage's sums of one pooled-score chunk on `device`, float64 throughout:
    block [..., n, m] at pooled position `offset`; left/right [1+K, N] permutation
    indicator rows, wa/wb [1+B, N] effect weight rows (qkov.pipeline.stats_stage._weights).
    Returns [..., (1+K) + 4(1+B) + N]: the cross sums Σ left·S·right, the effect block sums
    (ab, ba, aa, bb, without the diagonal) and the A×B margins — the same quantities as
    qkov.pipeline.stats' cross_sums, pair_sums and ab_margins, each of which is a few matmuls
    that a GPU runs in milliseconds where CPU threads take seconds per slice."""
    import torch

    S = torch.as_tensor(np.ascontiguousarray(block), device=torch.device(device))
    lead = S.shape[:-2]
    out = _stat_sums_t(S.reshape(-1, *S.shape[-2:]), _device_weights(left, right, wa, wb, device), is_a, offset)
    return out.cpu().numpy().reshape(*lead, -1)


def _stat_sums_t(S, weights, is_a: np.ndarray, offset: tuple[int, int]):
    """`stat_sums` on a (g, n, m) tensor of chunks (any float dtype) with the weights already
    on its device; returns a (g, width) float64 tensor there."""
    import torch

    dev, f64 = S.device, torch.float64
    L, R, WA, WB = weights
    idx = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64), device=dev)  # noqa: E731  (small index vectors)
    S = S.to(f64)
    n, m = S.shape[-2:]
    r0, c0 = offset
    is_a = np.asarray(is_a, dtype=bool)
    rows = np.arange(r0, r0 + n)
    ra, rb = rows[is_a[rows]], rows[~is_a[rows]]

    def bilinear(rows_sel, lw, rights):  # Σ_ij lw[k, i] S[i, j] right[k, j] over rows_sel, left product shared
        if rows_sel.size == 0:
            return [torch.zeros((S.shape[0], lw.shape[0]), dtype=f64, device=dev) for _ in rights]
        if rows_sel.size == n:  # every row of the chunk: slices, no gather
            prod = lw[:, r0 : r0 + n] @ S
        else:
            prod = lw.index_select(1, idx(rows_sel)) @ S.index_select(1, idx(rows_sel - r0))  # (g, K, m)
        return [(prod * r[:, c0 : c0 + m]).sum(-1) for r in rights]

    (perm,) = bilinear(rows, L, [R])
    ab, aa = bilinear(ra, WA, [WB, WA])
    ba, bb = bilinear(rb, WB, [WA, WB])
    diag = np.arange(max(r0, c0), min(r0 + n, c0 + m))
    for part, w, sel in ((aa, WA, diag[is_a[diag]]), (bb, WB, diag[~is_a[diag]])):
        if sel.size:
            part -= S[:, idx(sel - r0), idx(sel - c0)] @ (w.index_select(1, idx(sel)) ** 2).T
    pairs = torch.stack([ab, ba, aa, bb], dim=-1).reshape(S.shape[0], -1)
    ra_m = torch.as_tensor(is_a[r0 : r0 + n], dtype=f64, device=dev)
    cb_m = torch.as_tensor(~is_a[c0 : c0 + m], dtype=f64, device=dev)
    margins = torch.zeros((S.shape[0], is_a.size), dtype=f64, device=dev)
    margins[:, r0 : r0 + n] += (S @ cb_m) * ra_m
    margins[:, c0 : c0 + m] += (ra_m @ S) * cb_m
    return torch.cat([perm, pairs, margins], dim=-1)


def _tile_sums(scores, weights: tuple, n_a: int, r0: int, c0: int) -> np.ndarray:
    """The stats sums (2, Hc, width) float64 of a (2, Hc, ci, cj) score tile at pooled (r0, c0),
    computed where the tile is; `weights` = the stats stage's (left, right, wa, wb) rows."""
    hc, ci, cj = scores.shape[1:]
    is_a = np.arange(weights[0].shape[1]) < n_a
    return _stat_sums_t(scores.reshape(2 * hc, ci, cj), _device_weights(*weights, str(scores.device)), is_a,
                        (r0, c0)).reshape(2, hc, -1).cpu().numpy()


def _tile_top_t(tile, n_a: int, offset: tuple[int, int], k: int, largest: bool):
    """A score tile's k best A×B pairs per head, tile (hc, n, m) at pooled `offset`:
    (hc, 3, k) float64 numpy (value, row in A, column in B), NaN-padded, best first."""
    import torch

    r0, c0 = offset
    hc, n, m = tile.shape
    out = np.full((hc, 3, k), np.nan)
    sub = tile[:, : max(0, min(n, n_a - r0)), max(0, n_a - c0):]
    if sub.numel():
        kk = min(k, sub.shape[1] * sub.shape[2])
        vals, where = torch.topk(sub.reshape(hc, -1), kk, dim=1, largest=largest)
        where = where.cpu().numpy()
        out[:, 0, :kk] = vals.double().cpu().numpy()
        out[:, 1, :kk] = r0 + where // sub.shape[2]
        out[:, 2, :kk] = c0 + max(0, n_a - c0) + where % sub.shape[2] - n_a
    return out


def direct_tile_reduce(layer: np.ndarray, heads: np.ndarray, inv: np.ndarray, rows_i: np.ndarray, rows_j: np.ndarray,
                       pos_i: np.ndarray, pos_j: np.ndarray, *, reader, weights: tuple, other: np.ndarray, n_a: int,
                       top_k: int, accumulate: str = "auto", device: str = "auto", encoding: str | None = None) -> dict:
    """`direct_pair_kernel` for `score.keep_pairs = "top" | "none"`: the tile's scores never
    leave the device; the task returns what the statistics, `qkov query` and the diagnostics
    need of them, each a partial that adds up (or merges) over the slice's tiles:
      sums  (2, Hc, width)  the stats sums of both scores (`stat_sums`; `weights` = the
                            stats stage's (left, right, wa, wb) rows)
      top   (2, Hc, 3, k)   the tile's k best A×B pairs (interference highest, alignment lowest)
    and the diagnostics' `side_parts` (norms, rows, cols, diag).
    `pos_i`/`pos_j` are the tile's pooled positions (rows_i/rows_j its store rows)."""
    a_all, scores = _tile_scores(layer, heads, inv, rows_i, rows_j, reader, accumulate, device, encoding)
    r0, c0 = int(pos_i[0]), int(pos_j[0])
    out = side_parts(a_all, scores, other, r0, c0)
    out["sums"] = _tile_sums(scores, weights, n_a, r0, c0)
    if top_k:
        out["top"] = np.stack([_tile_top_t(scores[s], n_a, (r0, c0), top_k, largest=(s == 0)) for s in (0, 1)])
    return out
