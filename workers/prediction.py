"""Does alignment predict a real loss change? The model-touching core of the prediction check.

For a slice s = (block, layer, head), qkov's `transfer` is the mean over A×B of the
alignment, which is bilinear, so

    transfer_s = Σ_{p∈s} ḡ_A[p] · ḡ_B[p] / (Î[p] + λ)

with ḡ_T the gradient of task T's mean loss. A natural-gradient step on task B's mean loss
restricted to the slice, Δθ_s = −η (Î_s + λ)⁻¹ ḡ_{B,s}, changes task A's mean loss by

    ΔL_A = ḡ_Aᵀ Δθ_s + ½ Δθ_sᵀ H_A Δθ_s + … = −η · transfer_s + O(η²).

The check compares the two sides with two code paths that share nothing but the model
and the loss definition:

* prediction (the pipeline's path): per-sample gradients from activations
  (`qkov.workers.grads.per_sample_backward`), per-head slices from the layout's index tables
  (`qkov.workers.slicing.slice_block`), the Fisher from the unrolled EMA weights
  (`qkov.workers.fisher.stream_weights`), per-tensor damping (`qkov.workers.fisher.damping`,
  `inverse_regularised`), and transfer as the mean of the A×B alignment matrix;
* step (independent): each sample's gradient by plain autograd, one sample at a time,
  the EMA written as its recursion F_t = βF_{t−1} + (1−β)·mean_batch g², Î = F_T/(1−β^T),
  λ from the whole block tensor, and — for split projections (Llama, Mistral, Qwen,
  Gemma, OPT, BERT, …) — the head's entries from what a head is (rows h·d…(h+1)·d of
  q/k/v, the same columns of o), not from the index tables. Other layouts (fused,
  interleaved) take the head's entries from the layout.

The measurement applies Δθ_s to that slice only, in a float64 copy of the model, and
runs a real forward pass over task A's samples, with the loss in float64, at η, η/2 and
−η/2. `float64_forward` keeps that pass float64 throughout: transformers' modules cast to
float32 on purpose (RMSNorm's `.to(torch.float32)`, eager attention's
`softmax(dtype=torch.float32)`), and those islands' rounding moves with the weights, so a
`.double()` model alone measures ΔL only to ~1e-9 (tiny Phi-3/Llama: 1e-9 against ΔL ≈ 4e-6
at η = 1e-6, 2e-4 of it, as large as the O(η²) term; halving ratios 1.04–1.64 on correct
models). With them promoted the residual is ~1e-13.

Three measurements per slice give three figures, each against the prediction:

* relative error at η: the prediction holds at this step (≤ REL_ERROR_MAX);
* first-order error: the measured slope −(ΔL(η/2) − ΔL(−η/2))/η (central difference, no η²
  term) against transfer — a wrong Fisher, slice or sign is a first-order discrepancy;
* noise: 3ΔL(η/2) − ΔL(η) + ΔL(−η/2) cancels every term up to η², so it measures what
  a quadratic in η does not explain (rounding, a ReLU kink crossed by the step — tiny OPT:
  1.5e-9 — or O(η³) when η is too large). Predictions
  must stand NOISE_FACTOR× above it, and the halving test err(η)/err(η/2) ≈ 2 is applied
  where the O(η²) term stands RESOLVE_FACTOR× above it and the prediction's precision; where
  it does not, it cannot be resolved and the first-order error alone shows agreement.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qkov.pipeline.errors import UsageError
from qkov.workers.fisher import damping, inverse_regularised, stream_weights
from qkov.workers.grads import per_sample_backward
from qkov.workers.layouts import AttentionLayout
from qkov.workers.losses import (CausalLMLoss, SequenceClassificationLoss, attention_mask_of, completion_labels,
                                 model_inputs, pad_batch)
from qkov.workers.slicing import slice_block

BLOCKS = ("Q", "K", "V", "O")

# Defaults of the check (README "Does it predict forgetting?"). η is dimensionless: under a
# loss scaled by c, Î ×c², ḡ ×c, Δθ ×1/c and ΔL_A is unchanged. The step (Î+λ)⁻¹ḡ_B is
# largest on entries of small Fisher, where the loss is curved well beyond what Î says, so η
# must be small: on SmolLM2-135M (10 slices, 3+3 samples) the median relative error was 136 %
# at η = 1e-4, 41 % at 3e-5 and 19 % at 1e-5 (the O(η²) term, some signs flipped at 1e-4);
# 1e-6 was chosen from those figures, before measuring at it.
DEFAULT_ETA = 1e-6
DEFAULT_N_SLICES = 60
RHO_MIN = 0.95  # Spearman ρ(predicted, measured) over the slices
REL_ERROR_MAX = 0.05  # median relative error at η over slices above the noise floor
# median |measured first-order slope / transfer − 1| over slices above the noise floor. The
# NOISE_FACTOR bound keeps its noise under √2/(2·NOISE_FACTOR) = 0.7 % per slice; the mutations
# of tests/test_prediction.py are O(1); a correct tiny model ~1e-6 (float32 gradients).
FIRST_ORDER_MAX = 0.02
HALVING_RANGE = (1.6, 2.4)  # median per-slice err(η)/err(η/2): 2 when the O(η²) term dominates
NOISE_FACTOR = 100.0  # a prediction counts when |prediction at η/2| > NOISE_FACTOR · measurement noise
RESOLVE_FACTOR = 10.0  # the halving test uses slices whose error at η/2 > RESOLVE_FACTOR · (noise + the prediction's precision)


@dataclass(frozen=True, order=True)
class Slice:
    layer: int
    block: str
    head: int  # query head for Q/O, KV head for K/V

    def __str__(self) -> str:
        return f"{self.block}{self.head}@L{self.layer}"


# ---------------------------------------------------------------- choosing slices


def choose_slices(layout: AttentionLayout, n: int, seed: int = 0) -> list[Slice]:
    """`n` slices spread over every (block, layer) of the layout: one head of each in turn
    (keys in a seeded order each round, heads in a seeded order per key), sorted."""
    keys = sorted(layout.blocks, key=lambda k: (k[1], BLOCKS.index(k[0])))
    if n < 1 or not keys:
        raise UsageError(f"need n >= 1 slices and a non-empty layout (n={n}, {len(keys)} blocks)")
    rng = np.random.default_rng(seed)
    heads = {k: list(rng.permutation(layout.blocks[k].n_heads)) for k in keys}
    out: list[Slice] = []
    while len(out) < n and any(heads.values()):
        for i in rng.permutation(len(keys)):
            k = keys[i]
            if heads[k] and len(out) < n:
                out.append(Slice(k[1], k[0], int(heads[k].pop(0))))
    return sorted(out)


# ---------------------------------------------------------------- batching


def batches(input_ids, labels, batch_size: int, device):
    for s in range(0, len(input_ids), batch_size):
        yield pad_batch(input_ids[s : s + batch_size], None if labels is None else labels[s : s + batch_size], device)


# ---------------------------------------------------------------- prediction: the pipeline's path


@dataclass
class Transfer:
    """Per-slice transfer from the pipeline's code path, and what it was computed from."""

    transfer: dict[Slice, float]
    lam: dict[tuple[str, int], float]  # λ per (block, layer)
    inv: dict[Slice, np.ndarray] = field(repr=False)  # 1/(Î+λ) of the slice, float64


def pipeline_transfer(model: nn.Module, layout: AttentionLayout, input_ids, labels, n_a: int, loss_task,
                      fisher_source: str, beta: float, fisher_batch: int, rel: float, abs_: float,
                      slices: Sequence[Slice], batch_size: int = 8,
                      slicer: Callable = slice_block) -> Transfer:
    """transfer_s = mean over i∈A, j∈B of A_ij = Σ_p g_i[p] g_j[p] / (Î[p]+λ), with the pipeline's
    per-sample gradients, slicing, EMA Fisher weights and damping. Samples are A then B.

    `slicer(block_slicing, full_grads) -> (B, heads, P)` is the pipeline's slicer; tests
    replace it to show a wrong slicing is caught."""
    n = len(input_ids)
    w = stream_weights(n_a, n - n_a, fisher_source, fisher_batch, beta)
    keys = sorted({(s.block, s.layer) for s in slices}, key=lambda k: (k[1], BLOCKS.index(k[0])))
    layers = sorted({l for _, l in keys})
    names_of = {l: [p for p in layout.param_names if p in {pt.param for b, ll in keys if ll == l
                                                          for pt in layout.blocks[(b, l)].parts}] for l in layers}
    params = [p for l in layers for p in names_of[l]]
    fisher = {k: None for k in keys}
    rows = {s: [] for s in slices}  # per-sample slice rows (float64), A then B
    device = next(model.parameters()).device
    for start, batch in zip(range(0, n, batch_size), batches(input_ids, labels, batch_size, device)):
        lazy = per_sample_backward(model, batch, params, loss_task)
        wb = torch.as_tensor(w[start : start + batch["input_ids"].shape[0]], dtype=torch.float64)
        for l in layers:
            full = lazy.grads(names_of[l])
            for b, ll in keys:
                if ll != l:
                    continue
                g = slicer(layout.blocks[(b, l)], full).detach().to("cpu", torch.float64)  # (B, H, P)
                f = torch.einsum("i,ihp->hp", wb, g * g)
                fisher[(b, l)] = f if fisher[(b, l)] is None else fisher[(b, l)] + f
                for s in slices:
                    if (s.block, s.layer) == (b, l):
                        rows[s].append(g[:, s.head])
            del full
        del lazy
    out = Transfer({}, {}, {})
    for (b, l), f in fisher.items():
        fn = f.numpy()
        lam = float(damping(fn[None], rel, abs_)[0])
        inv = inverse_regularised(fn, lam)
        out.lam[(b, l)] = lam
        for s in slices:
            if (s.block, s.layer) == (b, l):
                g = torch.cat(rows[s]).numpy()  # (N, P)
                align = (g[:n_a] * inv[s.head]) @ g[n_a:].T  # (n_A, n_B): the alignment scores A_ij
                out.transfer[s] = float(align.mean())
                out.inv[s] = inv[s.head]
    return out


def transfer_all(model: nn.Module, layout: AttentionLayout, input_ids, labels, n_a: int, loss_task,
                 fisher_source: str, beta: float, fisher_batch: int, rel: float, abs_: float,
                 batch_size: int = 8) -> dict[tuple[str, int], np.ndarray]:
    """transfer of every head of every (block, layer) of `layout`: {(block, layer): (heads,)} float64.

    The same pipeline path as `pipeline_transfer`, but as ḡ_A·(Î+λ)⁻¹·ḡ_B from running sums
    (the A×B mean of the bilinear alignment, without holding per-sample slices), so a whole
    model fits in memory."""
    n = len(input_ids)
    w = stream_weights(n_a, n - n_a, fisher_source, fisher_batch, beta)
    keys = sorted(layout.blocks, key=lambda k: (k[1], BLOCKS.index(k[0])))
    fisher: dict = {}
    sums: dict = {}  # (b, l) -> [Σ_A g, Σ_B g]
    device = next(model.parameters()).device
    for start, batch in zip(range(0, n, batch_size), batches(input_ids, labels, batch_size, device)):
        nb = batch["input_ids"].shape[0]
        lazy = per_sample_backward(model, batch, layout.param_names, loss_task)
        wb = torch.as_tensor(w[start : start + nb], dtype=torch.float64, device=device)
        is_a = torch.as_tensor([start + r < n_a for r in range(nb)], device=device)
        for l in layout.layers:
            names = sorted({p.param for (b, ll), bs in layout.blocks.items() if ll == l for p in bs.parts})
            full = lazy.grads(names)
            for b in BLOCKS:
                if (b, l) not in layout.blocks:
                    continue
                g = slice_block(layout.blocks[(b, l)], full).double()  # (B, H, P)
                f = torch.einsum("i,ihp->hp", wb, g * g)
                sa, sb = g[is_a].sum(0), g[~is_a].sum(0)
                if (b, l) in fisher:
                    fisher[(b, l)] += f
                    sums[(b, l)][0] += sa
                    sums[(b, l)][1] += sb
                else:
                    fisher[(b, l)], sums[(b, l)] = f, [sa, sb]
            del full
        del lazy
    out = {}
    for key in keys:
        fn = fisher[key].cpu().numpy()
        inv = inverse_regularised(fn, float(damping(fn[None], rel, abs_)[0]))
        ga = sums[key][0].cpu().numpy() / n_a
        gb = sums[key][1].cpu().numpy() / (n - n_a)
        out[key] = (ga * inv * gb).sum(axis=1)
    return out


# ---------------------------------------------------------------- the step: an independent path


def head_entries(model: nn.Module, layout: AttentionLayout, s: Slice) -> list[tuple[str, np.ndarray]]:
    """(parameter, flat indices) of the slice's head, from head semantics for split projections
    (q/k/v: the head's output rows and bias entries; o: its input columns), else from the layout."""
    bs = layout.blocks[(s.block, s.layer)]
    params = dict(model.named_parameters())
    if layout.kind != "split":
        return [(p.param, p.index[s.head]) for p in bs.parts]
    from transformers.pytorch_utils import Conv1D

    out = []
    d = layout.v_head_dim if s.block in ("V", "O") else layout.head_dim  # o's inputs are the heads' values
    for name in dict.fromkeys(p.param for p in bs.parts):
        shape = tuple(params[name].shape)
        feats = np.arange(s.head * d, (s.head + 1) * d)
        if len(shape) == 1:  # a q/k/v bias (an o bias belongs to no head and is in no slice)
            idx = feats
        else:
            grid = np.arange(int(np.prod(shape))).reshape(shape)
            transposed = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Conv1D)
            head_axis = (1 if s.block == "O" else 0) ^ int(transposed)  # o: input columns; q/k/v: output rows
            idx = np.take(grid, feats, axis=head_axis).ravel()
        out.append((name, np.sort(idx)))
    return out


@dataclass
class Steps:
    """Natural-gradient step directions (Î+λ)⁻¹ ḡ_B per slice, from the independent path."""

    direction: dict[Slice, list[tuple[str, Tensor, Tensor]]]  # slice -> [(param, flat idx, float64 values)]
    lam: dict[tuple[str, int], float]
    grad_b_norm: dict[Slice, float]
    self_b: dict[Slice, float]  # ḡ_Bᵀ(Î+λ)⁻¹ḡ_B on the slice: the step's squared length in the Fisher metric per η²
    transfer: dict[Slice, float] = field(default_factory=dict)  # ḡ_A·(Î+λ)⁻¹ḡ_B by this path: the prediction's float precision


def _own_loss(model, loss_task, ids, label, device) -> Tensor:
    batch = pad_batch([ids], None if label is None else [label], device)
    return loss_task.per_sample_loss(model, batch)[0]


def independent_steps(model: nn.Module, layout: AttentionLayout, input_ids, labels, n_a: int, loss_task,
                      fisher_source: str, beta: float, fisher_batch: int, rel: float, abs_: float,
                      slices: Sequence[Slice]) -> Steps:
    """(Î+λ)⁻¹ ḡ_B on each slice's entries: per-sample gradients by plain autograd, the EMA as
    its recursion, λ = max(λ_abs, λ_rel · mean Î over the block's whole region)."""
    device = next(model.parameters()).device
    n = len(input_ids)
    entries = {s: head_entries(model, layout, s) for s in slices}
    keys = sorted({(s.block, s.layer) for s in slices})
    # the whole block: the union of every head's entries (for split projections: the whole tensors)
    block_entries: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for b, l in keys:
        acc: dict[str, list[np.ndarray]] = {}
        for h in range(layout.blocks[(b, l)].n_heads):
            for name, idx in head_entries(model, layout, Slice(l, b, h)):
                acc.setdefault(name, []).append(idx)
        block_entries[(b, l)] = {name: np.unique(np.concatenate(v)) for name, v in acc.items()}
    names = sorted({name for e in block_entries.values() for name in e})
    params = dict(model.named_parameters())
    stream = {"pooled": list(range(n)), "a": list(range(n_a)), "b": list(range(n_a, n))}[fisher_source]
    in_stream = set(stream)
    F_ = {name: torch.zeros(params[name].numel(), dtype=torch.float64) for name in names}
    batch_sq = {name: torch.zeros_like(F_[name]) for name in names}
    g_b = {name: torch.zeros_like(F_[name]) for name in names}
    g_a = {name: torch.zeros_like(F_[name]) for name in names}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    T, in_batch = 0, 0
    stream_pos = {i: k for k, i in enumerate(stream)}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            params[name].requires_grad_(True)
        # go through samples in stream order first, then any not in the stream (only ḡ_B needs them)
        order = stream + [i for i in range(n) if i not in in_stream]
        for i in order:
            with torch.enable_grad():
                loss = _own_loss(model, loss_task, input_ids[i], None if labels is None else labels[i], device)
                grads = torch.autograd.grad(loss, [params[nm] for nm in names])
            for nm, g in zip(names, grads):
                g = g.detach().reshape(-1).to("cpu", torch.float64)
                if i >= n_a:
                    g_b[nm] += g / (n - n_a)
                else:
                    g_a[nm] += g / n_a
                if i in in_stream:
                    batch_sq[nm] += g * g
            if i in in_stream:
                in_batch += 1
                last = stream_pos[i] == len(stream) - 1
                if in_batch == fisher_batch or last:
                    for nm in names:
                        F_[nm].mul_(beta).add_(batch_sq[nm] / in_batch, alpha=1.0 - beta)
                        batch_sq[nm].zero_()
                    T, in_batch = T + 1, 0
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    fisher = {nm: f / (1.0 - beta**T) for nm, f in F_.items()}
    lam = {}
    for key, e in block_entries.items():
        vals = torch.cat([fisher[nm][torch.as_tensor(idx)] for nm, idx in e.items()])
        lam[key] = max(abs_, rel * float(vals.mean()))
    out = Steps({}, lam, {}, {})
    for s in slices:
        lam_s = lam[(s.block, s.layer)]
        parts, sq, sbb, tab = [], 0.0, 0.0, 0.0
        for nm, idx in entries[s]:
            it = torch.as_tensor(idx)
            reg = fisher[nm][it] + lam_s
            d = torch.where(reg > 0, g_b[nm][it] / torch.where(reg > 0, reg, 1.0), 0.0)
            parts.append((nm, it, d))
            sq += float((g_b[nm][it] ** 2).sum())
            sbb += float((g_b[nm][it] * d).sum())
            tab += float((g_a[nm][it] * d).sum())
        out.direction[s] = parts
        out.grad_b_norm[s] = math.sqrt(sq)
        out.self_b[s] = sbb
        out.transfer[s] = tab
    return out


# ---------------------------------------------------------------- measurement in float64

_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_TO_DOUBLE = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)


class _Float64(TorchFunctionMode):
    """Every float dtype a torch call asks for becomes float64 (`x.to(torch.float32)`,
    `softmax(dtype=torch.float32)`, `x.float()`, …); `downcasts` counts the calls that still
    turned a float64 input into a lower precision (what this could not reach)."""

    def __init__(self):
        super().__init__()
        self.downcasts = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TO_DOUBLE:
            func = torch.Tensor.double
        elif func is not torch.Tensor.view:  # view(dtype) reinterprets bits: leave it
            # `type(a) is torch.dtype` first: `tensor in (dtypes)` would compare tensors
            if any(type(a) is torch.dtype for a in args):
                args = tuple(torch.float64 if type(a) is torch.dtype and a in _LOW_FLOATS else a for a in args)
            if any(type(v) is torch.dtype for v in kwargs.values()):
                kwargs = {k: (torch.float64 if type(v) is torch.dtype and v in _LOW_FLOATS else v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        if (isinstance(out, Tensor) and out.dtype in _LOW_FLOATS
                and any(isinstance(a, Tensor) and a.dtype == torch.float64 for a in args)):
            self.downcasts += 1
        return out


@contextmanager
def float64_forward():
    """Within it, a float64 model computes in float64 throughout (see the module docstring)."""
    with _Float64() as mode:
        yield mode


def _per_sample_loss64(model64: nn.Module, batch: dict[str, Tensor], loss_task) -> Tensor:
    """Each sample's own loss in float64 (the pipeline's definitions, `qkov.workers.losses`, without its float32 cast)."""
    causal = isinstance(loss_task, CausalLMLoss)
    if not causal and not isinstance(loss_task, SequenceClassificationLoss):
        raise UsageError(f"the prediction check measures causal-LM and sequence-classification losses, not {loss_task.name!r}")
    logits = model64(**model_inputs(batch), **({"use_cache": False} if causal else {})).logits.double()
    if not causal:
        return F.cross_entropy(logits, batch["labels"], reduction="none")
    mask, labels = attention_mask_of(batch), completion_labels(batch)
    sup = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    sup = (sup if labels is None else sup & (labels[:, 1:] != -100)).double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1),
                          reduction="none").view(sup.shape)
    return (nll * sup).sum(1) / sup.sum(1)


def mean_loss64(model64: nn.Module, input_ids, labels, loss_task, batch_size: int = 8) -> float:
    """Task A's mean loss (mean over samples of each sample's own loss), all in float64."""
    device = next(model64.parameters()).device
    total = 0.0
    with torch.no_grad():
        for batch in batches(input_ids, labels, batch_size, device):
            total += float(_per_sample_loss64(model64, batch, loss_task).sum())
    return total / len(input_ids)


def decoder_layers(model: nn.Module, layout: AttentionLayout) -> list[nn.Module] | None:
    """The modules holding each layer's attention (its parent), when they are the consecutive items
    0..L-1 of one ModuleList (every listed architecture); else None."""
    parents = [p.rsplit(".", 1)[0] if "." in p else "" for p in layout.attention_modules]
    if not parents or any("." not in p for p in parents):
        return None
    lists = {p.rsplit(".", 1)[0] for p in parents}
    idx = [p.rsplit(".", 1)[1] for p in parents]
    if len(lists) != 1 or idx != [str(i) for i in range(len(parents))]:
        return None
    container = model.get_submodule(lists.pop())
    if not isinstance(container, nn.ModuleList) or len(container) < len(parents):
        return None
    return [container[i] for i in range(len(parents))]


class _Replay:
    """Layers before a slice's layer do not see its step: their outputs are recorded once by the
    base pass and replayed (the layer's `forward` is swapped on the instance, so the model's own
    loop, masks and attributes are untouched). Layer ℓ onwards run for real."""

    def __init__(self, layers: list[nn.Module] | None):
        self.layers = layers
        self.outputs: list[list] = []  # [batch][layer] -> that layer's output object
        self._batch = 0

    def record(self, fn: Callable[[], float]) -> float:
        if self.layers is None:
            return fn()
        handles = []
        self.outputs = []
        current: dict[int, object] = {}

        def hook(i):
            def h(_m, _a, out):
                current[i] = out
                if i == len(self.layers) - 1:
                    self.outputs.append([current[k] for k in range(len(self.layers))])
            return h

        try:
            handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.layers)]
            return fn()
        finally:
            for h in handles:
                h.remove()

    def from_layer(self, layer: int, fn: Callable[[], float]) -> float:
        """fn() with layers < `layer` replayed from the record (batches in the recorded order)."""
        if self.layers is None or layer == 0 or not self.outputs:
            return fn()
        self._batch = 0
        swapped = self.layers[:layer]
        last = len(swapped) - 1

        def replay(i):
            def forward(*_a, **_k):
                out = self.outputs[self._batch][i]
                if i == last:
                    self._batch += 1
                return out
            return forward

        try:
            for i, m in enumerate(swapped):
                m.forward = replay(i)
            return fn()
        finally:
            for m in swapped:
                del m.forward  # back to the class's forward


def measure(model64: nn.Module, steps: Steps, slices: Sequence[Slice], etas: Sequence[float], input_ids, labels,
            loss_task, batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
            layers: list[nn.Module] | None = None) -> tuple[float, np.ndarray]:
    """(L_A(θ), ΔL_A[slice, eta]) with Δθ = −η·direction applied to one slice at a time; restored exactly.
    With `layers` (`decoder_layers`), layers before the slice's are replayed from the base pass."""
    params = dict(model64.named_parameters())
    rep = _Replay(layers)

    def loss() -> float:
        return mean_loss64(model64, input_ids, labels, loss_task, batch_size)

    base = rep.record(loss)
    out = np.zeros((len(slices), len(etas)))
    for k, s in enumerate(slices):
        saved = [(nm, it, params[nm].detach().view(-1)[it].clone()) for nm, it, _ in steps.direction[s]]
        try:
            for e, eta in enumerate(etas):
                with torch.no_grad():
                    for (nm, it, d), (_, _, orig) in zip(steps.direction[s], saved):
                        params[nm].view(-1)[it] = orig - eta * d
                out[k, e] = rep.from_layer(s.layer, loss) - base
        finally:
            with torch.no_grad():
                for nm, it, orig in saved:
                    params[nm].view(-1)[it] = orig
        if progress is not None:
            progress(k + 1, len(slices))
    return base, out


def noise_floor(model64: nn.Module, input_ids, labels, loss_task, batch_size: int, base: float) -> float:
    """Summation-order rounding of L_A: recomputed with another batching (another summation
    order and padding) it differs from `base` by rounding only; floor at 64 float64 ulps of L_A.
    (Rounding that moves with the weights is measured by `quadratic_residual`.)"""
    other = mean_loss64(model64, list(input_ids)[::-1], None if labels is None else list(labels)[::-1], loss_task,
                        max(1, batch_size // 2 + 1))
    return max(abs(other - base), 64 * np.finfo(np.float64).eps * max(1.0, abs(base)))


def quadratic_residual(measured: np.ndarray) -> np.ndarray:
    """Per slice, 3ΔL(η/2) − ΔL(η) + ΔL(−η/2): zero for any ΔL = bη + aη² (the base loss is
    shared), so what is left is rounding noise (its s.d. √20·σ for independent noise σ on each
    of the four losses) plus −¾·cη³ when the cubic term of the loss matters."""
    return 3 * measured[:, 1] - measured[:, 0] + measured[:, 2]


def residual_noise(measured: np.ndarray) -> float:
    """σ of one measured loss from the quadratic residuals: a robust s.d. (median |r| / 0.6745) / √20."""
    return float(np.median(np.abs(quadratic_residual(measured)))) / 0.6745 / math.sqrt(20.0)


# ---------------------------------------------------------------- the check


@dataclass
class PredictionResult:
    slices: list[Slice]
    transfer: np.ndarray  # pipeline path, per slice
    etas: tuple[float, ...]  # (η, η/2, −η/2)
    measured: np.ndarray  # (slice, eta) ΔL_A
    base_loss: float
    noise: float  # σ of a measured loss: max(summation-order rounding, the quadratic residual's)
    lam_mismatch: float  # max relative difference of λ between the two paths (float32 gradients: ~1e-6)
    transfer_indep: np.ndarray | None = None  # transfer by the step's path: |difference| = the prediction's precision
    noise_reorder: float = 0.0  # summation-order rounding alone (`noise_floor`)
    downcasts: int = 0  # calls of the measured forward passes left below float64 (`float64_forward`)

    @property
    def eta(self) -> float:
        return self.etas[0]

    def predicted(self, e: int = 0) -> np.ndarray:
        return -self.etas[e] * self.transfer

    def rel_error(self, e: int = 0) -> np.ndarray:
        p = self.predicted(e)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(self.measured[:, e] - p) / np.abs(p)

    @property
    def above_noise(self) -> np.ndarray:
        """Slices whose prediction, even at the smallest η, is well above the measurement noise."""
        return np.abs(self.predicted(1)) > NOISE_FACTOR * self.noise

    @property
    def enough(self) -> int:
        return max(3, len(self.slices) // 2)

    @property
    def rho(self) -> float:
        from scipy.stats import spearmanr

        return float(spearmanr(self.predicted(0), self.measured[:, 0]).statistic)

    @property
    def median_rel_error(self) -> float:
        """Median relative error at η over the slices above the noise (over every slice when none is)."""
        return self.median_rel_error_at(0)

    def median_rel_error_at(self, e: int) -> float:
        m = self.above_noise if self.above_noise.any() else np.ones(len(self.slices), dtype=bool)
        return float(np.median(self.rel_error(e)[m]))

    @property
    def slope(self) -> np.ndarray:
        """Per slice, the measured first-order coefficient −dΔL_A/dη by central difference
        (ΔL(η/2) − ΔL(−η/2))/η: no η² term, so it is transfer plus O(η²) plus noise √2σ/η."""
        h = self.etas[1]
        return -(self.measured[:, 1] - self.measured[:, 2]) / (2 * h)

    @property
    def first_order_error(self) -> np.ndarray:
        """Per slice, |measured slope / transfer − 1|: the first-order discrepancy."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(self.slope / self.transfer - 1.0)

    @property
    def median_first_order_error(self) -> float:
        m = self.above_noise if self.above_noise.any() else np.ones(len(self.slices), dtype=bool)
        return float(np.median(self.first_order_error[m]))

    @property
    def precision(self) -> np.ndarray:
        """Per slice, the prediction's own relative precision: |transfer by the pipeline's path −
        transfer by the step's path| / |transfer| (float32 gradients, two summation orders)."""
        if self.transfer_indep is None:
            return np.zeros(len(self.slices))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(self.transfer - self.transfer_indep) / np.abs(self.transfer)

    @property
    def resolved(self) -> np.ndarray:
        """Slices whose error at η/2 stands well above the measurement noise and the prediction's
        precision, so that the O(η²) term, not rounding, is what halving η halves."""
        p = np.abs(self.predicted(1))
        err = np.abs(self.measured[:, 1] - self.predicted(1))
        return self.above_noise & (err > RESOLVE_FACTOR * (self.noise + self.precision * p))

    @property
    def halving_ratio(self) -> float:
        """Median over the resolved slices of err(η)/err(η/2) (2 when the η² term dominates)."""
        m = self.resolved
        if not m.any():
            return float("nan")
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.rel_error(0)[m] / self.rel_error(1)[m]
        return float(np.median(r))

    @property
    def halving_tested(self) -> bool:
        """The O(η²) term is resolved on enough slices for err(η)/err(η/2) to mean something."""
        return bool(self.resolved.sum() >= self.enough)

    @property
    def passed(self) -> bool:
        lo, hi = HALVING_RANGE
        return bool(self.rho >= RHO_MIN and self.above_noise.sum() >= self.enough
                    and self.median_rel_error <= REL_ERROR_MAX and self.median_first_order_error <= FIRST_ORDER_MAX
                    and (not self.halving_tested or lo <= self.halving_ratio <= hi))

    def detail(self) -> str:
        n_blocks = len({(s.block, s.layer) for s in self.slices})
        layers = sorted({s.layer for s in self.slices})
        lo, hi = HALVING_RANGE
        n_res = int(self.resolved.sum())
        if self.halving_tested:
            halving = (f"err(η)/err(η/2) median {self.halving_ratio:.2f} (second order: 2; accepted {lo}–{hi}) over the "
                       f"{n_res} slices whose error at η/2 exceeds {RESOLVE_FACTOR:g}× (noise + the prediction's precision)")
        else:
            halving = (f"halving not tested: the O(η²) term stands {RESOLVE_FACTOR:g}× above the noise and the "
                       f"prediction's precision on {n_res} of {len(self.slices)} slices (need {self.enough}), so the "
                       f"first-order error alone shows agreement")
        few = self.above_noise.sum() < self.enough
        return (
            f"{len(self.slices)} slices over {n_blocks} block×layer (layers {layers}): step Δθ_s = −η(Î_s+λ)⁻¹ḡ_B,s on one "
            f"slice at a time (Fisher, λ and head entries from an independent plain-autograd path), task A's mean loss "
            f"measured at η, η/2 and −η/2 by a float64 forward pass (L_A = {self.base_loss:.6f}; noise σ = "
            f"{self.noise:.1e} from what a quadratic in η leaves, summation order alone {self.noise_reorder:.1e}; "
            f"{self.downcasts} calls below float64) vs the prediction −η·transfer_s (pipeline path). η = {self.eta:g}: "
            f"Spearman ρ = {self.rho:.4f} (≥ {RHO_MIN}); over the {int(self.above_noise.sum())} slices with |prediction "
            f"at η/2| > {NOISE_FACTOR:g}σ: median relative error {self.median_rel_error:.2%} (≤ {REL_ERROR_MAX:.0%}; "
            f"η/2: {self.median_rel_error_at(1):.2%}), first-order error |slope/transfer − 1| median "
            f"{self.median_first_order_error:.1e} (≤ {FIRST_ORDER_MAX:.0%}; slope = (ΔL(η/2) − ΔL(−η/2))/η); {halving}; "
            f"prediction precision median {float(np.median(self.precision)):.1e} (transfer by the two paths); λ of the "
            f"two paths agree to {self.lam_mismatch:.1e}"
            + ("" if not few else
               f"; too few slices stand above the noise (need {self.enough}): if the median relative error at η over "
               f"all slices ({float(np.median(self.rel_error(0))):.1%}) is small, η is too small for this model's "
               f"rounding (raise η); if it is large, the O(η³) term is what a quadratic leaves (lower η)")
        )


def prediction_check(model: nn.Module, layout: AttentionLayout, input_ids, labels, n_a: int, loss_task, *,
                     fisher_source: str = "pooled", beta: float = 0.99, fisher_batch: int = 16,
                     damping_rel: float = 1e-6, damping_abs: float = 0.0, n_slices: int = DEFAULT_N_SLICES,
                     eta: float = DEFAULT_ETA, seed: int = 0, batch_size: int = 8,
                     slices: Sequence[Slice] | None = None, slicer: Callable = slice_block,
                     progress: Callable[[int, int], None] | None = None,
                     measure_in: Callable = float64_forward) -> PredictionResult:
    """Predict (pipeline path) and measure (independent step, float64 forward) ΔL_A for slices of
    `layout`, at η, η/2 and −η/2. Samples: `input_ids` = task A's `n_a` then task B's.
    `measure_in()` is the context of the measured passes (tests replace it to show what float32
    islands do)."""
    if not 0 < n_a < len(input_ids):
        raise UsageError(f"need samples of both tasks (n_a={n_a}, n={len(input_ids)})")
    slices = sorted(slices) if slices is not None else choose_slices(layout, n_slices, seed)
    args = (input_ids, labels, n_a, loss_task, fisher_source, beta, fisher_batch, damping_rel, damping_abs, slices)
    tr = pipeline_transfer(model, layout, *args, batch_size=batch_size, slicer=slicer)
    steps = independent_steps(model, layout, *args)
    lam_mismatch = max(abs(tr.lam[k] - steps.lam[k]) / max(abs(steps.lam[k]), 1e-300) for k in steps.lam)
    model64 = copy.deepcopy(model).double().eval()
    a_ids = list(input_ids[:n_a])
    a_labels = None if labels is None else list(labels[:n_a])
    etas = (eta, eta / 2, -eta / 2)
    try:
        with measure_in() as mode:
            base, measured = measure(model64, _to_device(steps, next(model64.parameters()).device), slices, etas,
                                     a_ids, a_labels, loss_task, batch_size, progress, decoder_layers(model64, layout))
            reorder = noise_floor(model64, a_ids, a_labels, loss_task, batch_size, base)
    finally:
        del model64
    return PredictionResult(list(slices), np.array([tr.transfer[s] for s in slices]), etas, measured, base,
                            max(reorder, residual_noise(measured)), lam_mismatch,
                            np.array([steps.transfer[s] for s in slices]), reorder, int(getattr(mode, "downcasts", 0)))


def _to_device(steps: Steps, device) -> Steps:
    return Steps({s: [(nm, it.to(device), d.to(device)) for nm, it, d in parts] for s, parts in steps.direction.items()},
                 steps.lam, steps.grad_b_norm, steps.self_b, steps.transfer)
