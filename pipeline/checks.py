"""`qkov check`: sanity checks of the scores on the job's real model (DESIGN §4).

A small in-memory copy of the pipeline runs on the first `n_samples` of each task:
per-sample gradients (qkov.workers.grads) → per-head slices (qkov.workers.slicing) → EMA
Fisher from the stream weights (qkov.workers.fisher) → per-tensor damping → pair scores
(the formulas of qkov.pipeline.score.block_scores as numpy matmuls), all in float64. Each
check perturbs one thing (the loss scale, the parameterisation, the weights, the task
order) and compares against what the math says must happen:

* additivity: Σ_h of the per-head scores equals the score of the whole block,
  computed from the full gradient tensors by separate code (boolean masks built from
  the module shapes and the block's meaning, not from the per-head index tables).
  It catches slicings that drop or duplicate entries or misplace the Fisher. It
  cannot see a slicing that partitions the right entries into the wrong heads (every
  partition sums to the same total): the ablation check catches those.
* scale: the loss ×c. With the Fisher recomputed from the scaled loss (what a job
  with a scaled loss computes) interference scales by c and alignment by 1; with the
  Fisher held at the unscaled one, interference scales by c³ and alignment by c².
  DESIGN §4 says "c (interference) and c² (alignment)", which matches neither
  convention; this check tests what the math gives and says so in its detail.
* reparameterisation: V rows of one KV head ×α and the O columns of its query
  heads ×1/α. The model's function is unchanged; undamped alignment is invariant
  (to float noise); the per-tensor damping moves it slightly (reported);
  interference (M, asymmetric by construction) is not invariant (its ranking ρ is reported).
* ablation: the layout's O columns of some heads are zeroed; their Q/K/V gradients
  (and scores) must then be exactly 0 and every other head's nonzero. Because the
  zeroed entries come from the layout's O index table, an O block sliced on the
  wrong axis fails here.
* symmetry: tasks swapped (gradients recomputed in the order B, A; Fisher held
  fixed): alignment is transposed; the rank correlation of the per-head mean
  interference AB vs BA is reported.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import xarray as xr

from qkov.workers.fisher import damping, inverse_regularised, stream_weights
from qkov.workers.grads import per_sample_grads
from qkov.workers.kernels import slice_scores
from qkov.workers.layouts import AttentionLayout, discover_layout
from qkov.workers.losses import loss_task_for
from qkov.workers import prediction as pred
from qkov.workers.slicing import QUERY_BLOCKS, slice_all

from . import schema
from .errors import StoreError, UsageError
from .spec import JobSpec, LayoutSpec

CHECK_DIM = schema.CHECK
CHECK_NAMES = ("additivity", "scale", "reparameterisation", "ablation", "symmetry")
PREDICTION = "prediction"  # the prediction check's row (run_checks(prediction=True); `qkov check` runs it)
PREDICTION_SLICE = schema.PREDICTION_SLICE  # its per-slice variables' dimension in `checks`
PREDICTION_ETA = schema.PREDICTION_ETA  # (η, η/2, −η/2)

SCALE_C = 3.0
REPARAM_ALPHA = 2.0
FUNCTION_RTOL = 1e-5  # model outputs after the reparameterisation, relative to max |logit|
ADDITIVITY_TOL = 1e-10  # same float32 gradients, two float64 code paths: only summation order differs
# Checks that recompute gradients differ by the model dtype's rounding of the backward pass.
# Measured on tiny models: float32 ~1e-6, float16 ~4e-3, bfloat16 ~4e-2 (8-bit mantissa).
FLOAT_NOISE_TOL = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 2e-2}


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    value: float  # the measured figure
    tolerance: float
    detail: str
    rank_correlation: float = float("nan")  # Spearman ρ where the check reports one


# ---------------------------------------------------------------- pure math


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ (average ranks for ties); NaN when either side has no spread."""
    from scipy.stats import rankdata

    rx, ry = rankdata(np.ravel(x)), rankdata(np.ravel(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def discordant_pairs(x: np.ndarray, y: np.ndarray, rtol: float) -> int:
    """Pairs ordered one way in x (by more than rtol relative) and not the same way in y.

    A ranking check that ignores near-ties, whose order float rounding may flip.
    """
    x, y = np.ravel(x), np.ravel(y)
    gap = rtol * np.maximum(np.abs(x)[:, None], np.abs(x)[None, :])
    clearly_less = (x[None, :] - x[:, None]) > gap  # x_u < x_v clearly
    return int((clearly_less & ~(y[:, None] < y[None, :])).sum())


def scaled_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| / max |want| per leading index (head), the largest over heads; 0 for 0 vs 0."""
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    want = np.asarray(want, dtype=np.float64).reshape(len(want), -1)
    err = np.abs(got - want).max(axis=1)
    scale = np.abs(want).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), np.where(err > 0, np.inf, 0.0))
    return float(rel.max()) if rel.size else 0.0


def pair_scores(g: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled interference and alignment (heads, N, N) of one block, with the stage's own
    formulas (`qkov.workers.kernels.slice_scores`) in float64. g: (N, heads, P), inv: (heads, P)."""
    gt = torch.from_numpy(np.ascontiguousarray(g, dtype=np.float64))
    it = torch.from_numpy(np.asarray(inv, dtype=np.float64))
    out = [slice_scores(gt[:, h], gt[:, h], it[h]) for h in range(gt.shape[1])]
    return np.stack([m.numpy() for m, _ in out]), np.stack([a.numpy() for _, a in out])


def whole_scores(g: np.ndarray, w: np.ndarray, rel: float, abs_: float) -> tuple[np.ndarray, np.ndarray]:
    """Interference and alignment (N, N) of a whole block from its flat entries g (N, P),
    written directly from DESIGN §1 (Fisher, per-tensor damping, sums over entries)."""
    fisher = np.einsum("i,ip->p", w, g * g)
    lam = max(abs_, rel * float(fisher.mean())) if fisher.size else abs_
    inv = inverse_regularised(fisher, lam)
    return (g * g * inv) @ np.abs(g).T, (g * inv) @ g.T


# ---------------------------------------------------------------- block regions from semantics

def qkv_output_mask(kind: str, block: str, n_out: int, n_heads: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """Which output features of a fused QKV projection belong to `block` (bool [n_out])."""
    mask = np.zeros(n_out, dtype=bool)
    k = "QKV".index(block)
    if kind == "fused":  # [Q (H·hd) | K (KV·hd) | V (the rest)]
        bounds = (0, n_heads * head_dim, (n_heads + n_kv_heads) * head_dim, n_out)
        mask[bounds[k] : bounds[k + 1]] = True
    elif kind == "interleaved":  # per head [q | k | v]
        mask.reshape(n_heads, 3, -1)[:, k] = True
    elif kind == "grouped":  # per KV group [its G query heads | k | v]
        g = n_heads // n_kv_heads
        view = mask.reshape(n_kv_heads, g + 2, -1)
        view[:, (slice(0, g), g, g + 1)[k]] = True
    else:
        raise ValueError(f"not a fused layout kind: {kind!r}")
    return mask


def _output_axis(model: torch.nn.Module, param: str, declared: LayoutSpec | None) -> int:
    """Axis of a 2-D weight that indexes output features: 0 for nn.Linear [out, in], 1 for Conv1D [in, out]."""
    if declared is not None and declared.weight_layout != "auto":
        return 0 if declared.weight_layout == "out_in" else 1
    from transformers.pytorch_utils import Conv1D

    return 1 if isinstance(model.get_submodule(param.rsplit(".", 1)[0]), Conv1D) else 0


def block_region(model: torch.nn.Module, layout: AttentionLayout, block: str, layer: int, kind: str,
                 declared: LayoutSpec | None = None) -> list[tuple[str, np.ndarray]]:
    """The entries of (block, layer) as (param, bool mask of the param's shape), from block semantics.

    The tensors are the ones the layout names; which of their entries belong to the
    block comes from what the block is (O and split Q/K/V: the whole tensor; fused
    Q/K/V: their output features), never from the per-head index tables.
    """
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out = []
    for name in dict.fromkeys(p.param for p in layout.blocks[(block, layer)].parts):
        shape = shapes[name]
        if block == "O" or kind == "split":
            mask = np.ones(shape, dtype=bool)
        else:
            axis = 0 if len(shape) == 1 else _output_axis(model, name, declared)
            feats = qkv_output_mask(kind, block, shape[axis], layout.n_heads, layout.n_kv_heads, layout.head_dim)
            mask = feats if len(shape) == 1 else np.broadcast_to(np.expand_dims(feats, 1 - axis), shape)
        out.append((name, mask))
    return out


def region_entries(grads: dict[str, torch.Tensor], region: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """(N, entries) float64: the region's entries of each sample's full gradient tensors."""
    cols = []
    for name, mask in region:
        g = grads[name]
        cols.append(g.reshape(g.shape[0], -1)[:, torch.from_numpy(np.ascontiguousarray(mask).ravel())].double().numpy())
    return np.concatenate(cols, axis=1)


# ---------------------------------------------------------------- the in-memory pipeline


class ScaledLoss:
    """A loss task whose per-sample losses are multiplied by c."""

    def __init__(self, inner, c: float):
        self.inner, self.c, self.name = inner, c, f"{inner.name}×{c:g}"

    def per_sample_loss(self, model, batch):
        return self.c * self.inner.per_sample_loss(model, batch)


@dataclass
class Scores:
    """Pooled scores per (block, layer): (heads, N, N); the inverse damped Fisher (heads, P) and λ."""

    interference: dict
    alignment: dict
    inv: dict
    lam: dict
    binding_abs: bool = False  # λ_abs > λ_rel·mean(Î) somewhere

    def head_means(self, n_a: int, keys) -> np.ndarray:
        """Per-head mean interference over i∈A, j∈B (the statistic T), concatenated over keys."""
        return np.concatenate([self.interference[k][:, :n_a, n_a:].mean(axis=(1, 2)) for k in keys])


def score_slices(slices: dict, weights: np.ndarray, rel: float, abs_: float, inv: dict | None = None) -> Scores:
    """Scores of every (block, layer) slice stack (N, heads, P) float64; Fisher from `weights` unless `inv` is given."""
    out = Scores({}, {}, {}, {})
    for key, g in slices.items():
        if inv is None:
            fisher = np.einsum("i,ihp->hp", weights, g * g)
            lam = float(damping(fisher[None], rel, abs_)[0])
            out.binding_abs |= abs_ > rel * float(fisher.mean())
            out.inv[key], out.lam[key] = inverse_regularised(fisher, lam), lam
        else:
            out.inv[key] = inv[key]
        out.interference[key], out.alignment[key] = pair_scores(g, out.inv[key])
    return out


@dataclass
class _Session:
    """The model, its layouts and the samples the checks run on."""

    job: JobSpec
    model: torch.nn.Module
    layout: AttentionLayout  # scored blocks and layers (include_bias as the job)
    edit_layout: AttentionLayout  # same layers, biases included: what to edit in the weights
    input_ids: list[tuple[int, ...]]  # A then B
    labels: list[int | None]
    n_a: int
    sample_ids: list[str]
    device: str
    loss_task: object = None
    weights: np.ndarray | None = None
    base_logits: list = field(default_factory=list)  # the unedited model's outputs, from the base pass

    @property
    def n(self) -> int:
        return len(self.input_ids)

    @property
    def keys(self) -> list:
        return sorted(self.layout.blocks, key=lambda k: (k[1], "QKVO".index(k[0])))

    def grads(self, loss_task=None, order: Sequence[int] | None = None, logits: list | None = None) -> dict[str, torch.Tensor]:
        """Full per-sample gradients (N, *shape) float32 on CPU, in `order` (default A then B).

        With `logits` (a list), the model's outputs at every real token are appended to it, taken
        from the same forward pass (for the function-preservation check, at no extra cost).
        """
        from qkov.workers.losses import pad_batch

        order = list(range(self.n)) if order is None else list(order)
        bs = self.job.extract.batch_size
        parts: dict[str, list[torch.Tensor]] = {}
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            batch = pad_batch([self.input_ids[i] for i in idx], [self.labels[i] for i in idx], self.device)
            with _captured_outputs(self.model, batch["attention_mask"], logits):
                res = per_sample_grads(self.model, batch, self.layout.param_names, loss_task or self.loss_task)
            for name, g in res.grads.items():
                parts.setdefault(name, []).append(g.detach().float().cpu())
        return {name: torch.cat(ts) for name, ts in parts.items()}

    def slices(self, grads: dict[str, torch.Tensor]) -> dict:
        return {k: t.double().numpy() for k, t in slice_all(self.layout, grads).items()}

    def scores(self, slices: dict, inv: dict | None = None, weights: np.ndarray | None = None) -> Scores:
        f = self.job.fisher
        return score_slices(slices, self.weights if weights is None else weights, f.damping_rel, f.damping_abs, inv)


@contextmanager
def _captured_outputs(model: torch.nn.Module, mask: torch.Tensor, into: list | None) -> Iterator[None]:
    """Append the model's logits (real tokens only for token-level outputs) to `into` on each forward."""
    if into is None:
        yield
        return

    def hook(_m, _args, out):
        logits = out.logits.detach().float().cpu()
        into.append(logits[mask.cpu().bool()] if logits.dim() == 3 else logits)

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def edited_weights(model: torch.nn.Module, edits: dict[str, list[tuple[np.ndarray, float]]]) -> Iterator[None]:
    """Multiply flat entries of parameters by factors for the duration; the originals are restored exactly."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in edits}
    try:
        with torch.no_grad():
            for name, changes in edits.items():
                p = params[name]
                flat = p.detach().flatten().clone()
                for idx, factor in changes:
                    flat[torch.as_tensor(idx, device=flat.device)] *= factor
                p.copy_(flat.view_as(p))
        yield
    finally:
        with torch.no_grad():
            for name, t in saved.items():
                params[name].copy_(t)


def head_edits(layout: AttentionLayout, block: str, heads, factor: float, edits: dict | None = None) -> dict:
    """Edits multiplying the `heads` slices of `block` (every part, every layer of `layout`) by `factor`."""
    edits = {} if edits is None else edits
    heads = np.atleast_1d(np.asarray(heads, dtype=np.int64))
    for (b, _), bs in layout.blocks.items():
        if b != block:
            continue
        for part in bs.parts:
            edits.setdefault(part.param, []).append((part.index[heads].ravel(), factor))
    return edits


# ---------------------------------------------------------------- the checks


def check_additivity(s: _Session, grads: dict, base: Scores, kind: str) -> CheckResult:
    worst, counts = 0.0, []
    f = s.job.fisher
    for key in s.keys:
        b, l = key
        region = block_region(s.model, s.layout, b, l, kind, s.job.model.layout)
        whole_m, whole_a = whole_scores(region_entries(grads, region), s.weights, f.damping_rel, f.damping_abs)
        worst = max(worst, scaled_error(base.interference[key].sum(0)[None], whole_m[None]),
                    scaled_error(base.alignment[key].sum(0)[None], whole_a[None]))
        bs = s.layout.blocks[key]
        counts.append((bs.n_heads * bs.size, int(sum(m.sum() for _, m in region))))
    mismatched = sum(a != r for a, r in counts)
    detail = (
        f"Σ over heads (K/V: over KV heads) of the per-head M and A vs the whole block scored from full gradient "
        f"tensors with masks from the {kind!r} layout semantics ({len(counts)} block×layer); max relative error "
        f"{worst:.2e}; {mismatched} block(s) whose head slices hold a different number of entries than the block "
        f"(blind to right entries grouped into the wrong heads: the ablation check covers that)"
    )
    return CheckResult("additivity", worst <= ADDITIVITY_TOL and mismatched == 0, worst, ADDITIVITY_TOL, detail)


def check_scale(s: _Session, base: Scores, tol: float) -> CheckResult:
    c = SCALE_C
    scaled = s.slices(s.grads(ScaledLoss(s.loss_task, c)))
    refit = s.scores(scaled)  # Fisher recomputed from the scaled loss: Î ×c², λ_rel·mean ×c²
    fixed = s.scores(scaled, inv=base.inv)  # Fisher held at the unscaled loss's
    errs = {
        "fixed-Fisher M×c³": max(scaled_error(fixed.interference[k], c**3 * base.interference[k]) for k in s.keys),
        "fixed-Fisher A×c²": max(scaled_error(fixed.alignment[k], c**2 * base.alignment[k]) for k in s.keys),
    }
    exact_refit = not (base.binding_abs or refit.binding_abs)
    if exact_refit:  # with λ_abs binding, λ does not scale with Î, so ×c and ×1 are not exact
        errs["refit-Fisher M×c"] = max(scaled_error(refit.interference[k], c * base.interference[k]) for k in s.keys)
        errs["refit-Fisher A×1"] = max(scaled_error(refit.alignment[k], base.alignment[k]) for k in s.keys)
    t0 = base.head_means(s.n_a, s.keys)
    rho = min(rank_correlation(t0, refit.head_means(s.n_a, s.keys)), rank_correlation(t0, fixed.head_means(s.n_a, s.keys)))
    flips = discordant_pairs(t0, refit.head_means(s.n_a, s.keys), tol) + discordant_pairs(t0, fixed.head_means(s.n_a, s.keys), tol)
    worst = max(errs.values())
    detail = (
        f"loss ×{c:g}: g ×c. Fisher recomputed from the scaled loss (Î ×c², λ_rel·mean(Î) ×c²): M ×c, A ×1; "
        f"Fisher held at the unscaled one: M ×c³, A ×c². "
        + ("" if exact_refit else "λ_abs binds (λ_abs > λ_rel·mean Î), so the refit-Fisher factors are not exact and are not tested. ")
        + "max relative errors: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        + f"; per-head mean interference rankings: Spearman ρ = {rho:.6f}, {flips} order flip(s) beyond rounding"
    )
    return CheckResult("scale", worst <= tol and flips == 0, worst, tol, detail, rho)


def check_reparameterisation(s: _Session, base_slices: dict, base: Scores, tol: float) -> CheckResult:
    """V rows of KV head 0 ×α and O columns of its query heads ×1/α, in every checked layer.

    Gradients go ×1/α (V) and ×α (O), the Fisher ×1/α² and ×α², so g_i g_j / Î is unchanged
    entry by entry: undamped alignment must not move beyond float noise. λ = λ_rel·mean(Î) is
    per tensor, not rescaled entry-wise, so damped alignment moves by O(λ/Î) (reported).
    """
    alpha = REPARAM_ALPHA
    group = np.flatnonzero(s.layout.kv_head_of == 0)
    edits = head_edits(s.edit_layout, "V", [0], alpha)
    edits = head_edits(s.edit_layout, "O", group, 1.0 / alpha, edits)
    out: list[torch.Tensor] = []
    with edited_weights(s.model, edits):
        slices = s.slices(s.grads(logits=out))
    ref = s.base_logits
    scale = max(float(t.abs().max()) for t in ref)
    fdiff = max(float((a - b).abs().max()) for a, b in zip(ref, out)) / (scale or 1.0)
    # The edit took effect when KV head 0's V gradients went ×1/α (the chain rule for θ_V ×α).
    v_keys = [k for k in s.keys if k[0] == "V"]
    cov_err = max(scaled_error(slices[k][:, 0][None], base_slices[k][:, 0][None] / alpha) for k in v_keys)
    undamped = [score_slices(x, s.weights, 0.0, 0.0) for x in (base_slices, slices)]
    exact_err = max(scaled_error(undamped[1].alignment[k], undamped[0].alignment[k]) for k in s.keys)
    damped = s.scores(slices)
    damped_err = max(scaled_error(damped.alignment[k], base.alignment[k]) for k in s.keys)
    inter_err = max(scaled_error(damped.interference[k], base.interference[k]) for k in s.keys)
    rho = rank_correlation(base.head_means(s.n_a, s.keys), damped.head_means(s.n_a, s.keys))
    detail = (
        f"V rows of KV head 0 ×{alpha:g}, O columns of query heads {group.tolist()} ×1/{alpha:g} in layers "
        f"{list(s.layout.layers)}: outputs change by {fdiff:.2e} of max |logit| (limit {FUNCTION_RTOL:g}); V "
        f"gradients of KV head 0 match ×1/{alpha:g} to {cov_err:.2e}; undamped "
        f"alignment moves by {exact_err:.2e} relative (must be float noise); with the job's damping it moves by "
        f"{damped_err:.2e} (λ = λ_rel·mean(Î) per tensor does not rescale with the entries). Interference (M) "
        f"is NOT invariant to this reparameterisation: it moves by {inter_err:.2e} relative (V head ×1/α, "
        f"O heads ×α), and its per-head ranking has Spearman ρ = {rho:.4f} before vs after"
    )
    passed = fdiff <= FUNCTION_RTOL and cov_err <= tol and exact_err <= tol
    return CheckResult("reparameterisation", passed, exact_err, tol, detail, rho)


def fully_ablated_kv(kv_head_of: np.ndarray, heads) -> list[int]:
    """KV heads all of whose query heads are in `heads` (their K/V gradients must vanish)."""
    kv_head_of = np.asarray(kv_head_of)
    return [int(k) for k in np.unique(kv_head_of) if np.isin(np.flatnonzero(kv_head_of == k), heads).all()]


def _ablation_case(s: _Session, heads: np.ndarray) -> tuple[float, float, list[str]]:
    """Ablate query heads `heads` (O columns) in every checked layer.

    Returns (max |g| and |score| over slices that must be 0, smallest max |g| over slices that
    must be nonzero, descriptions of failures).
    """
    dead_kv = fully_ablated_kv(s.layout.kv_head_of, heads)
    with edited_weights(s.model, head_edits(s.edit_layout, "O", heads, 0.0)):
        slices = s.slices(s.grads())
    sc = s.scores(slices)
    zero_max, alive_min, bad = 0.0, np.inf, []
    for key in s.keys:
        b, l = key
        if b == "O":
            continue
        n_heads = slices[key].shape[1]
        dead = set(int(h) for h in heads) if b in QUERY_BLOCKS else set(dead_kv)
        for h in range(n_heads):
            gmax = float(np.abs(slices[key][:, h]).max())
            if h in dead:
                smax = max(float(np.abs(sc.interference[key][h]).max()), float(np.abs(sc.alignment[key][h]).max()))
                zero_max = max(zero_max, gmax, smax)
                if gmax > 0 or smax > 0:
                    bad.append(f"{b}{h}@L{l} not zero ({gmax:.1e})")
            else:
                alive_min = min(alive_min, gmax)
                if gmax == 0:
                    bad.append(f"{b}{h}@L{l} zero")
    return zero_max, alive_min, bad


def ablation_cases(kv_head_of: np.ndarray) -> list[np.ndarray]:
    """Sets of query heads to ablate together, covering both halves of the GQA rule in few passes.

    KV group 0 whole (its K/V must die) plus, where a group has several heads, one head of
    another group alone (its K/V must live). MQA has one group, so the lone head needs its own pass.
    """
    kv_head_of = np.asarray(kv_head_of)
    group0 = np.flatnonzero(kv_head_of == 0)
    n_kv = int(kv_head_of.max()) + 1
    if len(group0) == 1:  # MHA: every head is its own group
        return [group0]
    if n_kv > 1:  # GQA: group 0 whole and the first head of group 1 alone, in one pass
        return [np.concatenate([group0, np.flatnonzero(kv_head_of == 1)[:1]])]
    return [group0, np.array([0])]  # MQA


def check_ablation(s: _Session) -> CheckResult:
    cases = {
        f"query heads {h.tolist()} ablated (KV heads {fully_ablated_kv(s.layout.kv_head_of, h)} fully)": h
        for h in ablation_cases(s.layout.kv_head_of)
    }
    zero_max, alive_min, parts, bad = 0.0, np.inf, [], []
    for label, heads in cases.items():
        z, a, b = _ablation_case(s, heads)
        zero_max, alive_min = max(zero_max, z), min(alive_min, a)
        parts.append(f"{label}: max |g|,|M|,|A| on ablated Q/K/V slices {z:.1e}")
        bad += [f"[{label}] {x}" for x in b]
    alive = "n/a" if not np.isfinite(alive_min) else f"{alive_min:.2e}"
    detail = (
        "O columns (from the layout) zeroed in layers " + str(list(s.layout.layers)) + "; Q of ablated heads and K/V of "
        "fully ablated KV groups must be exactly 0, every other head nonzero. " + "; ".join(parts)
        + f"; smallest max |g| over the heads that must stay nonzero: {alive}"
        + ("" if not bad else "; FAILED: " + ", ".join(bad[:12]) + (" ..." if len(bad) > 12 else ""))
    )
    return CheckResult("ablation", not bad, zero_max, 0.0, detail)


def check_symmetry(s: _Session, base: Scores, tol: float) -> CheckResult:
    n_a, n = s.n_a, s.n
    order = list(range(n_a, n)) + list(range(n_a))
    swapped = s.scores(s.slices(s.grads(order=order)), inv=base.inv)
    err = max(scaled_error(swapped.alignment[k][:, : n - n_a, n - n_a :],
                           base.alignment[k][:, :n_a, n_a:].transpose(0, 2, 1)) for k in s.keys)
    rho = rank_correlation(base.head_means(n_a, s.keys), swapped.head_means(n - n_a, s.keys))
    detail = (
        f"tasks swapped (gradients recomputed in the order B, A; Fisher held fixed, since a pooled EMA over several "
        f"batches weights samples by stream position): alignment BA vs (AB)ᵀ max relative error {err:.2e}; "
        f"per-head mean interference AB vs BA: Spearman ρ = {rho:.4f} (interference is asymmetric by construction)"
    )
    return CheckResult("symmetry", err <= tol, err, tol, detail, rho)


# ---------------------------------------------------------------- entry points


def _first_samples(spec, tokenizer, max_length: int, label: str, n: int):
    from qkov.workers.tasks import load_task

    rows = sum(1 for line in Path(spec.path).read_text(encoding="utf-8").splitlines() if line.strip()) if Path(spec.path).is_file() else n
    limit = min(n, rows, spec.limit or n)
    return load_task(spec.model_copy(update={"limit": max(1, limit)}), tokenizer, max_length, label)


def _session(job: JobSpec, n_samples: int, layers) -> _Session:
    from qkov.workers.models import load_model, load_tokenizer
    from qkov.workers.device import resolve_device

    if n_samples < 1:
        raise UsageError(f"n_samples must be >= 1, got {n_samples}")
    device = resolve_device(job.extract.device)
    model = load_model(job.model, device=device)
    tokenizer = load_tokenizer(job.model)
    a = _first_samples(job.tasks.a, tokenizer, job.model.max_length, "a", n_samples)
    b = _first_samples(job.tasks.b, tokenizer, job.model.max_length, "b", n_samples)
    layers = job.score.layers if layers is None else layers
    layout = discover_layout(model, declared=job.model.layout, include_bias=job.score.include_bias).subset(layers=layers)
    edit_layout = discover_layout(model, declared=job.model.layout, include_bias=True).subset(layers=layout.layers)
    samples = list(a) + list(b)
    f = job.fisher
    return _Session(
        job=job, model=model, layout=layout, edit_layout=edit_layout,
        input_ids=[x.input_ids for x in samples], labels=[x.targets if x.targets is not None else x.label for x in samples], n_a=len(a),
        sample_ids=[x.id for x in samples], device=device, loss_task=loss_task_for(model),
        weights=stream_weights(len(a), len(b), f.source, f.batch_size, f.beta),
    )


def check_prediction(s: _Session, n_slices: int, eta: float) -> tuple[CheckResult, xr.Dataset]:
    """Does transfer predict a real loss change? (qkov.workers.prediction): per slice, the change of task
    A's mean loss under a natural-gradient step on B in that slice alone, measured by a float64
    forward pass at η, η/2 and −η/2, against −η·transfer; Spearman ρ, median relative error, the
    first-order error of the measured slope, and err(η)/err(η/2) where the O(η²) term stands above the noise."""
    f = s.job.fisher
    labels = s.labels if any(x is not None for x in s.labels) else None
    r = pred.prediction_check(
        s.model, s.layout, s.input_ids, labels, s.n_a, s.loss_task, fisher_source=f.source, beta=f.beta,
        fisher_batch=f.batch_size, damping_rel=f.damping_rel, damping_abs=f.damping_abs, n_slices=n_slices, eta=eta,
        batch_size=s.job.extract.batch_size,
    )
    d, e = PREDICTION_SLICE, PREDICTION_ETA
    per_slice = xr.Dataset(
        {
            "prediction_block": (d, np.array([x.block for x in r.slices], dtype=object)),
            "prediction_layer": (d, np.array([x.layer for x in r.slices], dtype=np.int64)),
            "prediction_head": (d, np.array([x.head for x in r.slices], dtype=np.int64)),
            "prediction_transfer": (d, r.transfer),
            "prediction_transfer_step_path": (d, r.transfer_indep),  # the same, by the step's independent path
            "prediction_predicted": ((d, e), np.stack([r.predicted(k) for k in range(len(r.etas))], axis=1)),
            "prediction_measured": ((d, e), r.measured),
            "prediction_above_noise": (d, r.above_noise),
            "prediction_slope": (d, r.slope),  # measured −dΔL_A/dη, central difference: transfer when it holds
            "prediction_first_order_error": (d, r.first_order_error),
        },
        coords={e: np.array(r.etas, dtype=np.float64)},
    )
    per_slice["prediction_predicted"].attrs["meaning"] = "−η·transfer (pipeline path): predicted change of task A's mean loss"
    per_slice["prediction_measured"].attrs["meaning"] = "L_A(θ + Δθ_s) − L_A(θ), float64 forward pass, Δθ_s = −η(Î_s+λ)⁻¹ḡ_B,s"
    for v in ("prediction_predicted", "prediction_measured"):
        per_slice[v].attrs.update(units="task A's mean-loss units (nats for a causal LM / cross-entropy)",
                                  direction="negative: task A's loss falls under the step on B; positive: it rises")
    per_slice["prediction_predicted"].attrs["question"] = "how much should task A's loss change under the step?"
    per_slice["prediction_measured"].attrs["question"] = "how much did task A's loss change under the step?"
    per_slice["prediction_slope"].attrs.update(
        question="what first-order change of task A's mean loss per unit η did the measurement find?",
        units="task A's loss units per unit η (η dimensionless); compare with prediction_transfer",
        direction="positive: a step on B lowers A's loss (transfer); negative: raises it (conflict)")
    per_slice["prediction_first_order_error"].attrs.update(
        question="how far is the measured first-order slope from transfer?",
        units="relative: |slope / transfer − 1| (dimensionless)",
        direction=f"lower is better; the check needs the median ≤ {pred.FIRST_ORDER_MAX:g}")
    summary = {"eta": r.eta, "rho": r.rho, "median_rel_error": r.median_rel_error,
               "median_rel_error_half_eta": r.median_rel_error_at(1), "halving_ratio": r.halving_ratio,
               "halving_tested": r.halving_tested, "median_first_order_error": r.median_first_order_error,
               "base_loss": r.base_loss, "noise": r.noise, "noise_summation_order": r.noise_reorder,
               "calls_below_float64": r.downcasts, "n_slices": len(r.slices),
               "n_above_noise": int(r.above_noise.sum()), "n_resolved": int(r.resolved.sum()),
               "median_precision": float(np.median(r.precision))}
    per_slice.attrs["prediction"] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in summary.items()}
    return CheckResult(PREDICTION, r.passed, r.median_rel_error, pred.REL_ERROR_MAX, r.detail(), r.rho), per_slice


def checks_dataset(results: Sequence[CheckResult]) -> xr.Dataset:
    """One row per check: passed, value, tolerance, rank_correlation, detail."""
    return xr.Dataset(
        {
            "passed": (CHECK_DIM, np.array([r.passed for r in results], dtype=bool)),
            "value": (CHECK_DIM, np.array([r.value for r in results], dtype=np.float64)),
            "tolerance": (CHECK_DIM, np.array([r.tolerance for r in results], dtype=np.float64)),
            "rank_correlation": (CHECK_DIM, np.array([r.rank_correlation for r in results], dtype=np.float64)),
            "detail": (CHECK_DIM, np.array([r.detail for r in results], dtype=object)),
        },
        coords={CHECK_DIM: np.array([r.name for r in results], dtype=object)},
    )


def run_checks(job: JobSpec, *, n_samples: int = 4, write: bool = True, layers=None, prediction: bool = False,
               prediction_slices: int = pred.DEFAULT_N_SLICES, prediction_eta: float = pred.DEFAULT_ETA,
               progress=None):
    """The checks of `_run_checks` on a two-task job; on a job of more than two tasks, on each
    task pair's two-task job (`JobSpec.pair_job`), each written to that pair's sub-run, and
    returned as {pair id: dataset}."""
    kw = dict(n_samples=n_samples, write=write, layers=layers, prediction=prediction, prediction_slices=prediction_slices,
              prediction_eta=prediction_eta, progress=progress)
    if job.n_tasks <= 2:
        return _run_checks(job, **kw)
    return {schema.pair_id(x, y): _run_checks(job.pair_job(x, y), into=(job, (x, y)), **kw) for x, y in job.tasks.pairs()}


def _run_checks(job: JobSpec, *, n_samples: int = 4, write: bool = True, layers=None, prediction: bool = False,
                prediction_slices: int = pred.DEFAULT_N_SLICES, prediction_eta: float = pred.DEFAULT_ETA,
                progress=None, into=None) -> xr.Dataset:
    """Run the DESIGN §4 sanity checks on the first `n_samples` of each task.

    `layers` (default: the job's score.layers, else every layer) limits the layers
    checked; all four blocks are checked whatever score.blocks says. Memory: the full
    per-sample gradients of the checked layers' projections, ~2·n_samples copies.
    With `write`, the result goes to the run's `checks` group (the run's root is
    created if needed; no other group is touched). With `prediction` (on in `qkov check`), the
    prediction check runs too: `prediction_slices` slices at step size `prediction_eta`, its
    per-slice figures stored along `prediction_slice`.
    """
    from qkov.workers.models import model_identity

    steps = ["loading the model and the per-sample gradients", "head additivity", "loss scaling",
             "per-head reparameterisation", "head ablation", "swapping the tasks"] + (["prediction"] if prediction else [])
    done = iter(range(len(steps) + 1))

    def step() -> None:  # `progress(what, k, n)` before each step: `qkov check` shows it
        k = next(done)
        if progress is not None:
            progress(steps[k] if k < len(steps) else "done", k, len(steps))

    step()
    s = _session(job, n_samples, layers)
    tol = FLOAT_NOISE_TOL[job.model.dtype]
    kind = s.layout.kind  # how Q/K/V share their projection outputs, as discovered (or declared)
    grads = s.grads(logits=s.base_logits)
    base_slices = s.slices(grads)
    base = s.scores(base_slices)
    step()
    results = [check_additivity(s, grads, base, kind)]
    del grads  # the full tensors are only needed by the additivity reference
    step()
    results.append(check_scale(s, base, tol))
    step()
    results.append(check_reparameterisation(s, base_slices, base, tol))
    step()
    results.append(check_ablation(s))
    step()
    results.append(check_symmetry(s, base, tol))
    per_slice = None
    if prediction:
        step()
        res, per_slice = check_prediction(s, prediction_slices, prediction_eta)
        results.append(res)
    step()
    ds = checks_dataset(results)
    if per_slice is not None:
        ds = ds.merge(per_slice, combine_attrs="override")  # the per-slice variables keep their attrs
        ds.attrs["prediction"] = per_slice.attrs["prediction"]
    from .store import provenance

    ds.attrs.update(provenance(
        job.config_dict(), job.config_hash(), stage="check", model=model_identity(job.model, s.model),
        n_samples=n_samples, layers=list(s.layout.layers), sample_ids=s.sample_ids, scale_c=SCALE_C,
        reparam_alpha=REPARAM_ALPHA,
    ))
    ds.attrs["all_passed"] = bool(ds["passed"].all())
    if write:
        write_checks(ds, *(into or (job,)))
    return ds


def check_checks_output(job: JobSpec) -> None:
    """Refuse, before any model work, an output.path that `write_checks` would refuse."""
    from .store import RunStore

    store = RunStore.of(job)
    if not store.is_run() and store.entries():
        raise StoreError(f"output {store.path} exists, is not empty and is not a qkov run; refusing to write "
                         "the checks into it. Choose a new or empty output.path.")


def write_checks(ds: xr.Dataset, job: JobSpec, pair: tuple[str, str] | None = None) -> None:
    """Write (replace) the `checks` group (of one task pair's sub-run: `pair`), holding the run's
    lock; creates the run's root when the output does not exist yet, and refuses a folder that
    holds something other than a run."""
    from .store import RunStore

    store = RunStore.of(job)
    with store.lock():
        if not store.is_run():
            if store.entries():  # never stamp a user's folder as a run: `--overwrite` would then delete it
                raise StoreError(f"output {store.path} exists, is not empty and is not a qkov run; refusing to write "
                                 "the checks into it. Choose a new or empty output.path.")
            store.create_run(job.config_dict(), job.config_hash(), stage="check")
        if pair is not None:
            store.create_pairs(job.config_dict(), job.config_hash())
            store = store.pair(*pair)
        out = ds.copy()
        out.attrs = {k: (json.loads(json.dumps(v, default=str)) if not isinstance(v, (str, int, float, bool)) else v)
                     for k, v in ds.attrs.items()}
        out.attrs[schema.ATTR_COMPLETE] = False
        store.write_dataset(out, schema.CHECKS, complete=True)


def open_checks(run, storage_options: dict | None = None) -> xr.Dataset:
    from .store import RunStore

    return RunStore.coerce(run, storage_options).open_checks()


def format_checks(ds: xr.Dataset):
    """A rich table of the checks (for `qkov check`)."""
    from rich.table import Table

    table = Table(title="qkov sanity checks", show_lines=True)
    for col, kw in (("check", {}), ("result", {}), ("value", {"justify": "right"}), ("tolerance", {"justify": "right"}),
                    ("ρ", {"justify": "right"}), ("detail", {"ratio": 1})):
        table.add_column(col, **kw)
    for name in ds[CHECK_DIM].values:
        row = ds.sel({CHECK_DIM: name})
        ok = bool(row["passed"])
        rho = float(row["rank_correlation"])
        table.add_row(
            str(name), "[green]PASS[/]" if ok else "[bold red]FAIL[/]", f"{float(row['value']):.3g}",
            f"{float(row['tolerance']):.3g}", "" if np.isnan(rho) else f"{rho:.4f}", str(row["detail"].values),
        )
    return table
