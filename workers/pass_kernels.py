"""The answers passes' reductions of one gradient slice batch as single-read kernels (Triton,
on CUDA), with the torch forms they replace as the reference and the CPU path.

Both passes are bound by memory traffic, not arithmetic: at 8B one batch's attention slices
are 4 × 1.34 G float32 entries, and the torch forms read each slice 4–6 times (a bf16 round
trip, three norms per run of rows, the Fisher's squares; pass 2's squares, |g| and four
split-K GEMMs) and write as many temporaries: ~130 bytes per entry and sample on an H100,
0.21 s of each pass's 0.34 s per batch. A kernel here reads each entry once and keeps every
sum in registers until it adds it to its accumulator (pass 1) or writes one partial per
block of entries (pass 2), which torch then adds in float64: deterministic (no atomics).
Measured at 8B on an H100 against the torch forms in the same run (benchmarks/results/
2026-12-07-h100-issue28-session4.json): pass 1's reductions 0.130 -> 0.064 s per batch of 4,
pass 2's with the sketches 0.353 -> 0.237 s (the benchmark then timed the sketches in torch,
sketch_layer: most of that time was their random gathers); with
the sketch projections made run-local (workers/sketch.py), a whole pass 2 with its sketches went
from 0.327 to 0.224 s per batch in one run (2026-12-07-h100-issue28-session5.json).

The bf16 rounding exact mode stores with is applied in the kernel as integer arithmetic
(round to nearest even), which Triton's interpreter and a GPU do alike; the CPU tests run
these kernels under Triton's interpreter (TRITON_INTERPRET=1, QKOV_PASS_KERNELS=interpret)
against the torch forms.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BLOCK = 1024  # entries per program: 4 KB per row read, a partial per 1024 entries in pass 2
BLOCK1 = 512  # pass 1's entries per program: SmolLM2's 331,776-entry slices in 648 programs (4 warps each), 8B's in 32,768
ROWS = 4  # rows per program in pass 2 and the sketches: SmolLM2's 9 heads × 36 blocks × 64 rows in 5184 programs, not 324


@functools.cache
def available() -> bool:
    """Whether the kernels can run here: Triton importable (the CUDA builds of torch ship it)."""
    if os.environ.get("QKOV_PASS_KERNELS", "1") == "0":  # the torch forms, for a same-run baseline
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(t: torch.Tensor) -> bool:
    """The kernels for a CUDA tensor where Triton is importable and builds and runs them on its
    device (`_runs_on`); for a CPU tensor only under Triton's interpreter, asked for
    (QKOV_PASS_KERNELS=interpret with TRITON_INTERPRET=1: the tests)."""
    if t.is_cuda:
        return available() and _runs_on(t.device)
    return os.environ.get("QKOV_PASS_KERNELS") == "interpret" and os.environ.get("TRITON_INTERPRET") == "1" and available()


@functools.cache
def _runs_on(device: torch.device) -> bool:
    """Whether this Triton builds and runs every kernel variant the passes launch on `device`,
    tried once per process on small inputs (a Triton too old or too new for these kernels, or a
    device it cannot target): where not, the passes keep their torch forms, with a warning,
    instead of failing a job partway through a pass."""
    return _tried(device, "the answers passes' Triton kernels", "using their torch forms", _try_kernels)


def _tried(device: torch.device, what: str, instead: str, trial) -> bool:
    """Whether `trial(device)` (kernel launches on small inputs) runs there; where not, a warning
    naming `what` fails and what runs `instead`."""
    try:
        trial(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # (launch errors surface here)
        return True
    except Exception as e:  # noqa: BLE001 (whatever this Triton raises: the fallback does the same work)
        import warnings

        warnings.warn(f"qkov: {what} do not run on {device} ({type(e).__name__}: {str(e)[:200]}); {instead}",
                      RuntimeWarning, stacklevel=3)
        return False


def _try_kernels(device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    t = torch.randn((3, 2, BLOCK + 5), generator=g, device=device)
    acc = torch.zeros((3, 2, 2, BLOCK + 5), device=device)
    fisher = torch.zeros((1, 2, BLOCK + 5), dtype=torch.float64, device=device)
    for rounding in (False, True):
        for k, cw in ((0, (1.0,)), (1, None), (None, (0.5,))):
            _pass1_launch(t, [(0, 3, k, cw)], acc, fisher, rounding, None)
        _pass2_launch(t, torch.ones_like(t[0]), acc, rounding)
    for dtype in (torch.float32, torch.bfloat16):
        for cw in ((1.0,), None):
            _pass1_launch(t, [(0, 3, None, cw)], None, fisher, False, (torch.empty((1, 2, 4, BLOCK + 5), dtype=dtype,
                                                                                 device=device), 0, 1))
    from .sketch import layer_projection

    proj = layer_projection(BLOCK + 5, 256, 0, "Q", 0, 2, 1, device)
    for parts in (("u", "v"), ("u", "v", "w")):
        for rounding in (False, True):
            _sketch_launch(t, torch.ones_like(t[0]), proj, parts, rounding)


def _kernels():
    """The Triton kernels (compiled on first use; triton imported only where they run)."""
    from . import _pass_triton

    return _pass_triton.pass1, _pass_triton.pass2, _pass_triton.sketch


def task_sums_update(acc: torch.Tensor, t: torch.Tensor, runs) -> None:
    """Add one batch to the per-task sums: acc (3, tasks, H, P) float32 in TASK_SUM_KINDS order
    (Σ g, Σ |g|, Σ g²; float32, as the partials are written: at 8B two tasks' sums are 32 GB of
    device memory, not 64), t (B, H, P) the batch's gradient slice (float32; rows of skipped
    samples already zero), runs `row_runs` of the rows' tasks. Each run's rows are a
    view, reduced over samples by one sum and two vector norms that read t once each and
    accumulate in float32: no |t| or t² copy. The issue's bound is memory traffic; as one-hot
    GEMMs (2 × B × 1.3 G at 8B) with copies of |t| and t², the sums were ~70 % of an 8B first pass."""
    for k, r0, r1 in runs:
        x = t[r0:r1].float()  # (no copy for float32 t)
        acc[0, k] += x.sum(0)
        acc[1, k] += torch.linalg.vector_norm(x, 1, dim=0)
        acc[2, k] += torch.linalg.vector_norm(x, 2, dim=0).square_()


def squares_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the rows (samples) of t², float32, reading t once (a 2-norm, squared)."""
    return torch.linalg.vector_norm(t, 2, dim=0, dtype=torch.float32).square_()


def pass1_update(t: torch.Tensor, runs, acc: torch.Tensor | None, fisher: torch.Tensor | None,
                 round_bf16: bool, store: tuple | None = None) -> torch.Tensor:
    """Add one slice batch to pass 1's sums, reading t once: t (B, H, P) float32; runs [(r0, r1,
    task or None, stream weights (S,) or None)] of rows that share a task and Fisher weights
    (with `store`, covering every row); acc (3, tasks, H, P) float32 task sums (Σ g, Σ |g|, Σ g²
    of t rounded to bf16 where `round_bf16`), fisher (S, H, P) float64 += weight · Σ t²
    (unrounded) per stream; store (buf (L, H, n, P) float32 or bf16, layer, first sample): the
    rows written as exact mode stores them (bf16: rounded to nearest even), in the same read.
    Returns a device flag (int32, > 0: t held a non-finite value), not synchronised."""
    if not use_kernels(t):
        return _pass1_torch(t, runs, acc, fisher, round_bf16, store)
    return _pass1_launch(t, runs, acc, fisher, round_bf16, store)


@functools.lru_cache(maxsize=256)
def _on_device(values: tuple, device: torch.device) -> torch.Tensor:
    """A run's Fisher stream weights as a float64 device tensor, made once: a copy from the host
    per slice would synchronise the device 120 times a batch (SmolLM2); the weights repeat."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def _pass1_launch(t, runs, acc, fisher, round_bf16, store) -> torch.Tensor:
    import triton

    bad = torch.zeros((), dtype=torch.int32, device=t.device)
    kernel = _kernels()[0]
    t2 = t.contiguous().view(t.shape[0], -1)
    n_cols = t2.shape[1]
    dummy64 = _on_device((0.0,), t.device)  # (read by no variant: HAS_FISHER false)
    if store is not None:
        buf, li, start = store
        out, P = buf[li], buf.shape[-1]
        assert out.stride(1) == P and out.stride(2) == 1 and out.dtype in (torch.float32, torch.bfloat16)
    for r0, r1, k, cw in runs:
        has_acc = acc is not None and k is not None
        has_f = fisher is not None and cw is not None
        a = acc[:, k] if has_acc else None
        kernel[(triton.cdiv(n_cols, BLOCK1),)](
            t2, n_cols, r0, r1 - r0,
            a[0] if has_acc else t2, a.stride(0) if has_acc else 0,
            fisher if has_f else dummy64, fisher.stride(0) if has_f else 0,
            _on_device(tuple(cw), t.device) if has_f else dummy64,
            len(cw) if has_f else 0, bad,
            out if store is not None else t2, out.stride(0) if store is not None else 0,
            start if store is not None else 0, P if store is not None else 1,
            ROUND=round_bf16, HAS_ACC=has_acc, HAS_FISHER=has_f,
            STORE=0 if store is None else 2 if out.dtype == torch.bfloat16 else 1, BLOCK=BLOCK1)
    return bad


def _pass1_torch(t, runs, acc, fisher, round_bf16, store=None):
    """The torch form: per run, the Fisher's Σ t² and the task sums' three reductions; the rows stored."""
    bad = (~torch.isfinite(t)).any().to(torch.int32)
    for r0, r1, k, cw in runs:
        x = t[r0:r1]
        if fisher is not None and cw is not None:
            sq = squares_sum(x)
            for s, c in enumerate(cw):
                if c:
                    fisher[s].add_(sq, alpha=float(c))
        if acc is not None and k is not None:
            task_sums_update(acc, x.to(torch.bfloat16).float() if round_bf16 else x, [(k, 0, r1 - r0)])
    if store is not None:
        buf, li, start = store
        buf[li, :, start : start + t.shape[0]] = t.to(buf.dtype).transpose(0, 1)
    return bad


def pass2_scalars(t: torch.Tensor, inv: torch.Tensor, sums: torch.Tensor, round_bf16: bool) -> torch.Tensor:
    """Each sample's scalars of one slice batch in `schema.answer_parts` order (see
    `qkov.workers.answers.sample_scalars`, their torch form, which callers run where
    `use_kernels` is false): t (B, H, P) float32, inv (H, P), sums (3, tasks, H, P) float32 ->
    (B, H, 3 + 3·tasks) float64, reading t once (rounded to bf16 first where asked)."""
    return _pass2_launch(t, inv, sums, round_bf16)


def _pass2_launch(t, inv, sums, round_bf16) -> torch.Tensor:
    import triton

    B, H, P = t.shape
    n_tasks = sums.shape[1]
    n_blocks = triton.cdiv(P, BLOCK)
    t, inv = t.contiguous(), inv.contiguous()
    if sums.stride(3) != 1 or sums.stride(2) != P:  # each (H, P) sum read in place (8B: a copy is 0.4 GB per block)
        sums = sums.contiguous()
    out = torch.empty((B, H, n_blocks, 3 + 3 * n_tasks), dtype=torch.float32, device=t.device)
    _kernels()[1][(n_blocks, H, triton.cdiv(B, ROWS))](t, inv, sums, out, P, B, n_tasks, n_blocks, H, sums.stride(0),
                                                         sums.stride(1), ROUND=round_bf16, ROWS=ROWS, BLOCK=BLOCK)
    return out.sum(2, dtype=torch.float64)


def sketch_kernel_fits(dim: int) -> bool:
    """The sketch kernel's buckets: a power of two up to 8192 (a reshape of its chunks); other dims use the torch form."""
    return dim & (dim - 1) == 0 and 1 <= dim <= 8192


def sketch_parts(t: torch.Tensor, inv: torch.Tensor, proj, parts, round_bf16: bool) -> dict[str, torch.Tensor]:
    """`qkov.workers.sketch.sketch_layer`'s operands (float32) of t (B, H, P) float32 rounded to
    bf16 first where asked, inv (H, P), proj a LayerProjection -> {part: (B, H, dim)}: on the
    kernel, every part from one gathered read of t (and of the projection), where `use_kernels`
    and the dim `sketch_kernel_fits`; else `sketch_layer`."""
    if use_kernels(t) and sketch_kernel_fits(proj.dim):
        return _sketch_launch(t, inv, proj, parts, round_bf16)
    from .sketch import sketch_layer

    return sketch_layer(t.to(torch.bfloat16).float() if round_bf16 else t, inv, proj, parts=tuple(parts))


def _sketch_launch(t, inv, proj, parts, round_bf16) -> dict[str, torch.Tensor]:
    import triton

    B, H, P = t.shape
    nnz, dim = proj.order.shape[0], proj.dim
    chunk = max(dim, BLOCK)
    rows = ROWS if chunk <= BLOCK else 1  # (rows × chunk entries in registers: one row of a 4096-bucket sketch)
    groups = triton.cdiv(B, rows)
    # up to 8 chunks per program (1/8 the partials) while ~2048 programs remain (8B: 8; SmolLM2: 1)
    n_sub = max(1, min(8, triton.cdiv(P, chunk) * H * groups // 2048))
    n_progs = triton.cdiv(P, chunk * n_sub)
    t, inv = t.contiguous(), inv.to(torch.float32).contiguous()  # (as sketch_layer's inv.to(float32))
    names = [p for p in ("u", "v", "w") if p in parts]  # the kernel's order
    acc = torch.empty((len(names), B, H, n_progs, dim), dtype=torch.float32, device=t.device)
    _kernels()[2][(n_progs, H, groups)](t, inv, proj.order, proj.signs, acc, acc.stride(0), P, B, H, nnz, n_progs,
                                        float(nnz) ** -0.5, ROUND=round_bf16, DO_U="u" in parts, DO_V="v" in parts,
                                        DO_W="w" in parts, DIM=dim, CHUNK=chunk, N_SUB=n_sub, ROWS=rows,
                                        num_warps=4 if chunk <= BLOCK else 8)
    sums = acc.sum(3, dtype=torch.float64).float()
    return {name: sums[k] for k, name in enumerate(names)}


# ---- the passes fused with the per-sample gradients' formation ----
# Where a block's head slices are segments of one nn.Linear weight's rows, the kernels form each
# sample's tile g_b = Σ_t ∂ℓ/∂y_btᵀ x_bt themselves (tl.dot) and reduce it in registers: the
# (B, out, in) float32 gradients are never written to device memory and read back (at 8B,
# 21 GB per batch of 4 and pass, formed, sliced and then read by the kernels above).

@dataclass(frozen=True)
class FusedSlice:
    """How one block's head slices lie in its weight (out, in): head h's entry p = r·C + c
    (r < R, c < C) is weight entry ((first + h·head_stride) // in + r, (first + h·head_stride) % in + c)."""

    n_heads: int
    R: int
    C: int
    first: int
    head_stride: int
    out: int
    inp: int


def fused_slice(bs) -> FusedSlice | None:
    """`bs` (a workers.slicing.BlockSlicing) as a `FusedSlice`, or None: one weight part whose heads'
    rows are each a segment of a weight row (Llama's Q/K/V rows, O's columns; not fused QKV with
    biases, Conv1D or gathered layouts, which keep the unfused passes)."""
    if len(bs.parts) != 1 or len(bs.parts[0].shape) != 2:
        return None
    part = bs.parts[0]
    st = part.strides()
    if st is None:
        return None
    first, hs, R, S, C = st
    out, inp = part.shape
    if S == C and C % inp == 0 and first % inp == 0:  # adjacent rows (Q/K/V: a head is whole weight rows)
        R, S, C = R * C // inp, inp, inp
    if S != inp or any((first + h * hs) % inp + C > inp for h in range(part.n_heads)):
        return None
    return FusedSlice(part.n_heads, R, C, first, hs, out, inp)


def fusion_on(device) -> bool:
    """Whether the fused passes run on `device`: asked for with QKOV_PASS_FUSED=1 in the workers'
    environment. Off by default: on an H100 at 8B (benchmarks/results/2026-12-07-h100-issue28-
    session5.json) they took 0.273 and 0.380 s per batch of 4 where forming the gradients and
    running the kernels above took 0.224 and 0.224 s (tiles of 64 × 64 and 32 × 256 with K = 256
    reach ~26 TFLOP/s, and pass 2's per-sample reductions and gathers cost more than the bytes
    they save). Kept, tested, for tuning."""
    if os.environ.get("QKOV_PASS_FUSED", "0") != "1":
        return False
    probe = torch.empty(0, device=device)
    return use_kernels(probe) and (not probe.is_cuda or _fused_runs_on(probe.device))


def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, 1 << max(0, (n - 1).bit_length())))


def _upcast(x: torch.Tensor) -> bool:
    # float32 operands always; bf16 under Triton's interpreter too (its tl.dot multiplies bf16 wrongly)
    return x.dtype == torch.float32 or not x.is_cuda


def sketch_tile(fs: FusedSlice, dim: int) -> tuple[int, int] | None:
    """(BM, BN) of a fused pass-2 tile that holds whole runs of `dim` entries (the sketch's
    run-local permutation: a tile row of BN = a multiple of dim, or whole rows of C = BN
    entries making whole runs), ≤ 8192 entries; None where none fits (the unfused passes run)."""
    if not sketch_kernel_fits(dim) or not 16 <= dim <= 512:
        return None
    if fs.C % dim == 0:
        bn = dim
    elif dim % fs.C == 0 and fs.C >= 16:  # (C a power of two: it divides dim)
        bn = fs.C
    else:
        return None
    return max(16, dim // bn, min(8192 // bn, _pow2(fs.R, 16, 128))), bn


def fused_pass1(fs: FusedSlice, x: torch.Tensor, go: torch.Tensor, runs, acc, fisher, round_bf16: bool) -> torch.Tensor:
    """`pass1_update` of one block's slices with each sample's gradient formed in the kernel from
    x (B, T, in) and go (B, T, out) (`LazyPerSampleGrads.activations`); the same arguments
    otherwise (runs of rows, acc (3, tasks, H, P), fisher (S, H, P)). Returns the device flag."""
    import triton

    kernel = _kernels_fused()[0]
    bad = torch.zeros((), dtype=torch.int32, device=x.device)
    x, go = x.contiguous(), go.contiguous()
    bm, bn = _pow2(fs.R), _pow2(fs.C)
    n_ct = triton.cdiv(fs.C, bn)
    grid = (triton.cdiv(fs.R, bm) * n_ct, fs.n_heads)
    dummy64 = _on_device((0.0,), x.device)
    for r0, r1, k, cw in runs:
        has_acc = acc is not None and k is not None
        has_f = fisher is not None and cw is not None
        a = acc[:, k] if has_acc else None
        kernel[grid](x, go, x.shape[1], fs.inp, fs.out, fs.R, fs.C, fs.first, fs.head_stride, n_ct, r0, r1 - r0,
                     a[0] if has_acc else dummy64, a.stride(0) if has_acc else 0,
                     fisher if has_f else dummy64, fisher.stride(0) if has_f else 0,
                     _on_device(tuple(cw), x.device) if has_f else dummy64, len(cw) if has_f else 0, bad,
                     ROUND=round_bf16, HAS_ACC=has_acc, HAS_FISHER=has_f, UPCAST=_upcast(x), BM=bm, BN=bn, BK=32,
                     num_warps=8)
    return bad


def fused_pass2(fs: FusedSlice, x: torch.Tensor, go: torch.Tensor, inv, sums, round_bf16: bool, proj=None):
    """`pass2_scalars` (and, with `proj`, `sketch_parts` of u, v) of one block's slices, each
    sample's gradient formed in the kernel: -> (scalars (B, H, 3 + 3·tasks) float64, {"u", "v":
    (B, H, dim) float32} or None). `proj` must fit a tile (`sketch_tile`)."""
    import triton

    B, T = x.shape[:2]
    n_tasks = sums.shape[1]
    if sums.stride(3) != 1 or sums.stride(2) != fs.R * fs.C:
        sums = sums.contiguous()
    x, go, inv = x.contiguous(), go.contiguous(), inv.to(torch.float32).contiguous()
    if proj is not None:
        bm, bn = sketch_tile(fs, proj.dim)
        dim, order, signs, nnz = proj.dim, proj.order, proj.signs, proj.order.shape[0]
    else:
        bm, bn = _pow2(fs.R), _pow2(fs.C)
        dim, order, signs, nnz = bm * bn, inv, inv, 0  # (unread: SKETCH false)
    n_ct = triton.cdiv(fs.C, bn)
    n_tiles = triton.cdiv(fs.R, bm) * n_ct
    out = torch.empty((B, fs.n_heads, n_tiles, 3 + 3 * n_tasks), dtype=torch.float32, device=x.device)
    sk = torch.empty((2, B, fs.n_heads, n_tiles, dim) if proj is not None else (1,), dtype=torch.float32, device=x.device)
    _kernels_fused()[1][(n_tiles, fs.n_heads)](
        x, go, T, fs.inp, fs.out, fs.R, fs.C, fs.first, fs.head_stride, n_ct, B, fs.n_heads, inv, sums,
        sums.stride(0), sums.stride(1), n_tasks, out, n_tiles, order, signs, sk, sk.stride(0) if proj is not None else 0,
        nnz, float(max(nnz, 1)) ** -0.5, ROUND=round_bf16, SKETCH=proj is not None, UPCAST=_upcast(x), DIM=dim,
        BM=bm, BN=bn, BK=32, num_warps=8)
    scalars = out.sum(2, dtype=torch.float64)
    if proj is None:
        return scalars, None
    parts = sk.sum(3, dtype=torch.float64).float()
    return scalars, {"u": parts[0], "v": parts[1]}


def _kernels_fused():
    from . import _pass_triton

    return _pass_triton.fused_pass1, _pass_triton.fused_pass2


@functools.cache
def _fused_runs_on(device: torch.device) -> bool:
    """`_runs_on` for the fused kernels (tl.dot, tl.gather: a Triton too old for them keeps the unfused kernels)."""
    return _tried(device, "the fused answers passes", "forming per-sample gradients before the kernels", _try_fused)


def _try_fused(device: torch.device) -> None:
    from .sketch import layer_projection

    g = torch.Generator(device=device).manual_seed(0)
    fs = FusedSlice(n_heads=2, R=32, C=256, first=0, head_stride=32 * 256, out=64, inp=256)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn((3, 17, 256), generator=g, device=device).to(dtype)
        go = torch.randn((3, 17, 64), generator=g, device=device).to(dtype)
        acc = torch.zeros((3, 2, 2, 32 * 256), device=device)
        fisher = torch.zeros((1, 2, 32 * 256), dtype=torch.float64, device=device)
        for rounding in (False, True):
            fused_pass1(fs, x, go, [(0, 3, 0, (1.0,)), (0, 3, 1, None)], acc, fisher, rounding)
            fused_pass2(fs, x, go, torch.ones((2, 32 * 256), device=device), acc, rounding)
            fused_pass2(fs, x, go, torch.ones((2, 32 * 256), device=device), acc, rounding,
                        layer_projection(32 * 256, 256, 0, "Q", 0, 2, 1, device))
