"""The score kernels a task runs: both pair scores of a group of head slices, on the
task's device (MKL on CPU, cuBLAS on a worker's GPU with TF32 off).

For each slice, with Î_reg = Î + λ and stored signed per-sample gradients g:
  interference M[i, j] = Σ_p g_i[p]² / Î_reg[p] · |g_j[p]|   = (g²/Î_reg) · |g|ᵀ
  alignment    A[i, j] = Σ_p g_i[p] g_j[p] / Î_reg[p]         = (g/√Î_reg) · (g/√Î_reg)ᵀ
`weighted_scores` holds the formulas; everything else moves operands to the device.
"""
from __future__ import annotations

import numpy as np

from pipeline import schema

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

    from .grads import has_bmm_out_dtype

    if (dev == "cuda" and encoding == "bfloat16" and accumulate in ("auto", "float32")
            and has_bmm_out_dtype(torch.device("cuda"))):
        return torch.bfloat16
    return _accumulate_dtype(dev, accumulate)


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

    dev = resolve_device(device)
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


def sketch_pair_kernel(ui: np.ndarray, vj: np.ndarray, wi: np.ndarray, wj: np.ndarray, accumulate: str = "auto",
                       device: str = "auto") -> np.ndarray:
    """Sketch-mode scores for one layer, a group of heads and one pair of sample chunks:
    interference S(u_i)·S(v_j) and alignment S(w_i)·S(w_j) from the stored sketches
    (1, Hc, c, k) (workers.sketch; the Fisher is already in u and w). Same output and dtype
    rules as `pair_kernel`."""
    import torch

    dev = resolve_device(device)
    dt = _accumulate_dtype(dev, accumulate)
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        one_thread_in_worker()
    u, v, w, w2 = (_device_tensor(x[0], None, dev, dt) for x in (ui, vj, wi, wj))
    out = torch.stack([u @ v.transpose(1, 2), w @ w2.transpose(1, 2)]).to(torch.float32).cpu().numpy()
    return out[:, None]
