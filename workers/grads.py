"""Exact per-sample gradients of chosen Linear/Conv1D parameters, from activations.

For a linear map y = x Wᵀ + b applied to a sample's tokens, the gradient of
that sample's loss is ∇W = Σ_t ∂ℓ/∂y_tᵀ x_t and ∇b = Σ_t ∂ℓ/∂y_t. Backpropagating
L = Σ_i ℓ_i gives every sample its own ∂ℓ_i/∂y (samples only meet in the sum),
so one forward with hooks that keep each module's input and output, one
`autograd.grad(L, outputs)` and one batched matmul per module give all B
per-sample gradients at about the cost of a normal backward. No parameter .grad
is computed: parameters are frozen and only activations carry gradients.
"""
from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from qkov.workers.losses import LossTask, attention_mask_of


@dataclass(frozen=True)
class PerSampleResult:
    losses: Tensor  # (B,) float32, each sample's own loss
    grads: dict[str, Tensor]  # param name -> (B, *param.shape) float32
    n_tokens: Tensor  # (B,) int64, real (attention_mask = 1) tokens of each sample


@dataclass(frozen=True)
class _Call:
    """One call of a hooked module: its input and output, with their in-place version stamps."""

    x: Tensor
    y: Tensor
    x_version: int
    y_version: int


def per_sample_grads(
    model: nn.Module, batch: dict[str, Tensor], param_names: Sequence[str], loss_task: LossTask
) -> PerSampleResult:
    """Per-sample gradients g_i = ∇θ ℓ_i of `param_names` (weights/biases of nn.Linear or Conv1D modules).

    The batch must be right-padded; results do not depend on the batch's size,
    composition or padding. The model runs in eval mode (no dropout) for the
    call; its training flags, requires_grad flags and hooks are restored
    afterwards, also on errors. A module called several times per forward (or a
    parameter shared by several modules) gets the sum of its uses' gradients.
    """
    lazy = per_sample_backward(model, batch, param_names, loss_task)
    return PerSampleResult(losses=lazy.losses, grads=lazy.grads(lazy.names), n_tokens=lazy.n_tokens)


class LazyPerSampleGrads:
    """One batch's forward and backward done, the per-sample gradients not yet formed.

    Holds each hooked module's inputs and output gradients (activation-sized); `grads(names)`
    forms only the named parameters' (B, *shape) gradients, so a caller can go module by
    module and free each before the next (all of a 7B model's at once: 8.6 GB per sample).
    """

    def __init__(self, model, names, owners, losses, n_tokens, calls, n, seq_len):
        self.model, self.names, self._owners = model, names, owners
        self.losses, self.n_tokens = losses, n_tokens
        self._calls = calls  # id(module) -> [(x, go)]
        self._n, self._seq_len = n, seq_len

    def _needed(self, names) -> dict[int, tuple[nn.Module, set[str]]]:
        need: dict[int, tuple[nn.Module, set[str]]] = {}
        for name in names:
            if name not in self._owners:
                raise KeyError(f"{name} was not among the parameters of this backward pass")
            for m, attr in self._owners[name]:
                need.setdefault(id(m), (m, set()))[1].add(attr)
        return need

    def activations(self, name: str) -> tuple[Tensor, Tensor] | None:
        """(x (B, T, in), ∂ℓ/∂y (B, T, out)) of the one nn.Linear call whose weight is `name`, from
        which a kernel can form the per-sample gradient g_b = Σ_t ∂ℓ/∂y_btᵀ x_bt itself
        (qkov.workers.pass_kernels' fused passes); None where the parameter is shared, a bias,
        a Conv1D's, or its module ran more than once (the sum of calls is `grads`' job)."""
        uses = self._owners.get(name, [])
        if len(uses) != 1 or uses[0][1] != "weight" or type(uses[0][0]) is not nn.Linear:
            return None
        calls = self._calls[id(uses[0][0])]
        if len(calls) != 1:
            return None
        x, go = calls[0]
        return x.reshape(self._n, -1, x.shape[-1]), go.reshape(self._n, -1, go.shape[-1])

    def grads(self, names: Sequence[str]) -> dict[str, Tensor]:
        """(B, *param.shape) float32 per-sample gradients of `names`."""
        per_module: dict[int, dict[str, Tensor]] = {}
        for key, (m, attrs) in self._needed(names).items():
            acc = per_module.setdefault(key, {})
            for x, go in self._calls[key]:
                contrib = _module_grads(m, x, go, self._n, self._seq_len, attrs)
                for attr, t in contrib.items():
                    acc[attr] = t if attr not in acc else acc[attr] + t
        out = {}
        for name in names:
            parts = [per_module[id(m)][attr] for m, attr in self._owners[name]]
            out[name] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        return out

    def finite(self, names: Sequence[str]) -> Tensor:
        """(B,) bool: whether every per-sample gradient entry of `names` is finite, found without
        forming the gradients: a weight gradient Σ_t go_tᵀ x_t (float32 accumulation) is finite
        when go and x are and T·max|go|·max|x| cannot overflow; only samples failing that bound
        get their gradients formed and checked. Decided before any layer is consumed, so a
        sample skipped as non-finite never enters any layer's Fisher sum."""
        dev = self.losses.device
        modules = list(self._needed(names).items())
        maxima: dict[tuple, Tensor] = {}  # max |·| per sample of one activation (q, k and v share their input)

        def amax(t: Tensor) -> Tensor:
            t3 = t.detach().reshape(self._n, -1, t.shape[-1])
            sig = (t3.data_ptr(), tuple(t3.shape), t3.stride(), t3.dtype)
            if sig not in maxima:
                maxima[sig] = t3.abs().amax(dim=(1, 2))
            return maxima[sig]

        ax, ag, coef, owner = [], [], [], []
        for i, (key, (_, attrs)) in enumerate(modules):
            for x, go in self._calls[key]:
                T = go.reshape(self._n, -1, go.shape[-1]).shape[1]
                ax.append(amax(x))
                ag.append(amax(go))
                coef.append((T if "weight" in attrs else 0.0, T if "bias" in attrs else 0.0))
                owner.append(i)
        if not ax:
            return torch.ones(self._n, dtype=torch.bool, device=dev)
        # every module at once, float64 (a few small ops per batch, not a dozen per module)
        ax = torch.stack([a.to(torch.float64) for a in ax])  # (calls, B)
        ag = torch.stack([a.to(torch.float64) for a in ag])
        ok = (torch.isfinite(ax) & torch.isfinite(ag)).all(dim=0)
        ax, ag = torch.nan_to_num(ax, posinf=0.0), torch.nan_to_num(ag, posinf=0.0)
        c = torch.tensor(coef, dtype=torch.float64, device=dev)
        per_call = c[:, :1] * ag * ax + c[:, 1:] * ag
        bound = torch.zeros((len(modules), self._n), dtype=torch.float64, device=dev)
        bound.index_add_(0, torch.tensor(owner, device=dev), per_call)
        # one read for every module's flag (a read per module synchronised the device 120 times a batch)
        unsure = (ok[None] & ~(bound < _OVERFLOW_LIMIT)).any(dim=1).tolist()  # NaN bounds are already not ok
        for (key, _), flag in zip(modules, unsure):
            if flag:  # only samples failing the bound get their gradients formed and checked
                g = self.grads([n for n in self.names if any(id(mm) == key for mm, _ in self._owners[n])])
                for t in g.values():
                    ok &= torch.isfinite(t.reshape(self._n, -1)).all(dim=1)
        return ok


_OVERFLOW_LIMIT = torch.finfo(torch.float32).max / 4  # bound on Σ_t |go||x| below which no overflow is possible


def per_sample_backward(
    model: nn.Module, batch: dict[str, Tensor], param_names: Sequence[str], loss_task: LossTask
) -> LazyPerSampleGrads:
    """The forward and backward of `per_sample_grads`; gradients are formed on request."""
    names = list(dict.fromkeys(param_names))
    if not names:
        raise ValueError("param_names is empty: name at least one parameter")
    owners = _owners(model, names)
    modules = list({id(m): m for uses in owners.values() for m, _ in uses}.values())

    device = next(model.parameters()).device
    # checked where the batch was built: a host batch's check reads no device memory, and its copy
    # (pinned, non-blocking) does not wait for the device either, so the host prepares this batch
    # while the device still works on the previous one (8B: each wait idled it ~20 ms a batch)
    _check_right_padded(attention_mask_of(batch))
    batch = {k: _to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}
    mask = attention_mask_of(batch)
    n, seq_len = batch["input_ids"].shape

    calls: dict[int, list[_Call]] = {id(m): [] for m in modules}
    with _prepared(model, modules, calls), torch.enable_grad():
        losses = loss_task.per_sample_loss(model, batch)
    if losses.shape != (n,):
        raise ValueError(f"loss task {loss_task.name!r} returned shape {tuple(losses.shape)}, expected ({n},)")

    order = [(m, c) for m in modules for c in calls[id(m)]]
    uncalled = [_name_of(model, m) for m in modules if not calls[id(m)]]
    if uncalled:
        raise RuntimeError(f"modules {uncalled} were not called during the forward, so their parameters have no gradient here")
    for m, c in order:
        if not c.y.requires_grad:
            raise RuntimeError(
                f"the output of {_name_of(model, m)} does not require grad (is gradient checkpointing on, "
                "or does the model run this module under no_grad?)"
            )
    go = torch.autograd.grad(losses.float().sum(), [c.y for _, c in order], allow_unused=True)

    saved: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for m in modules}
    for (m, c), g in zip(order, go):
        if c.x._version != c.x_version or c.y._version != c.y_version:
            raise RuntimeError(f"the input or output of {_name_of(model, m)} was modified in place after the call; its gradient cannot be read from activations")
        saved[id(m)].append((c.x, torch.zeros_like(c.y) if g is None else g))
    del order, go, calls  # the graph and the outputs are no longer needed: only x and ∂ℓ/∂y are kept
    return LazyPerSampleGrads(model, names, owners, losses.detach().float(), mask.sum(dim=1).long(), saved, n, seq_len)


def weight_grad(x: Tensor, go: Tensor, transposed: bool) -> Tensor:
    """Per-sample Σ_t go[i,t]ᵀ x[i,t]: (B, out, in), or (B, in, out) for a transposed (Conv1D) weight.

    x: (B, T, in), go: (B, T, out); float32 result with float32 accumulation.
    """
    if transposed:
        return _bmm_f32(x.transpose(1, 2), go)
    return _bmm_f32(go.transpose(1, 2), x)


def bias_grad(go: Tensor) -> Tensor:
    """Per-sample Σ_t go[i,t]: (B, out) float32."""
    return go.sum(dim=1, dtype=torch.float32)


def _module_grads(m: nn.Module, x: Tensor, go: Tensor, n: int, seq_len: int, attrs=("weight", "bias")) -> dict[str, Tensor]:
    # Inputs are (B, ..., in), or (B·T, in) where a model flattens the tokens (OPT's MLP).
    flat_tokens = x.dim() == 2 and x.shape[0] == n * seq_len
    if x.shape[0] != n and not flat_tokens:
        raise RuntimeError(
            f"{type(m).__name__} saw input of shape {tuple(x.shape)}: per-sample gradients need the batch "
            f"dimension ({n}) first, or flattened tokens ({n}·{seq_len})"
        )
    x3 = x.reshape(n, -1, x.shape[-1])
    go3 = go.reshape(n, -1, go.shape[-1])
    out = {}
    if "weight" in attrs:
        out["weight"] = weight_grad(x3, go3, transposed=isinstance(m, Conv1D))
    if m.bias is not None and "bias" in attrs:
        out["bias"] = bias_grad(go3)
    return out


def _bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.dtype in (torch.bfloat16, torch.float16) and has_bmm_out_dtype(a.device):
        # Half-precision tensor-core matmul with float32 accumulation and output.
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


@functools.cache
def has_bmm_out_dtype(device: torch.device) -> bool:
    """Whether this torch multiplies half-precision operands on `device` with float32 output
    (`out_dtype=`; added to bmm and mm together, from torch 2.8). Probed, not version-parsed;
    the score kernel (qkov.pipeline.score) asks this too."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(1, 1, 1, device=device, dtype=torch.bfloat16)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):  # builds without bmm(out_dtype=) raise one of these
        return False


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # a pageable copy synchronises the stream
    return t.to(device)


# The owners of each name set, per model: finding them walks every module (~5 ms of host time
# a batch for 30 layers). Reused while each name still resolves to the parameter it did (a module
# or parameter replaced since is found anew; a module's own walk is a few attribute lookups).
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _owners(model: nn.Module, names: list[str]) -> dict[str, list[tuple[nn.Module, str]]]:
    """For each parameter name, every distinct (module, attribute) that holds that parameter."""
    known = _OWNERS.setdefault(model, {})
    hit = known.get(tuple(names))
    if hit is not None and all(_get_parameter(model, n) is p for n, p in hit[1]):
        return hit[0]
    out = _find_owners(model, names)
    known[tuple(names)] = (out, [(n, _get_parameter(model, n)) for n in names])
    return out


def _get_parameter(model: nn.Module, name: str):
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _find_owners(model: nn.Module, names: list[str]) -> dict[str, list[tuple[nn.Module, str]]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"parameters not in the model: {missing}")
    holders: dict[int, dict[int, tuple[nn.Module, str]]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for attr, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), {})[id(m)] = (m, attr)
    out = {}
    for name in names:
        uses = list(holders[id(params[name])].values())
        bad = [f"{_name_of(model, m)} ({type(m).__name__}.{attr})" for m, attr in uses if not _supported(m, attr)]
        if bad:
            raise ValueError(f"{name}: per-sample gradients need the parameter to be the weight or bias of nn.Linear or transformers Conv1D modules only; it is held by {bad}")
        out[name] = uses
    return out


def _supported(m: nn.Module, attr: str) -> bool:
    return isinstance(m, (nn.Linear, Conv1D)) and attr in ("weight", "bias")


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


def _check_right_padded(mask: Tensor) -> None:
    # Left padding would shift absolute positions of real tokens, so results would depend on the batch.
    if mask.dim() != 2 or bool((mask[:, 0] == 0).any()) or bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("the batch must be right-padded: every attention_mask row must be 1…1 0…0 with at least one real token")


@contextmanager
def _prepared(model: nn.Module, modules: list[nn.Module], calls: dict[int, list[_Call]]) -> Iterator[None]:
    """Frozen parameters, eval mode, and hooks that record the modules' calls; all undone on exit."""
    # only what differs is changed and restored: a worker's model is frozen and in eval mode
    # already, and setting every flag of every module cost ~10 ms of host time a batch (30 layers, profiled)
    flags = [p for p in model.parameters() if p.requires_grad]
    modes = [m for m in model.modules() if m.training]
    handles = []
    try:
        for p in flags:
            p.requires_grad_(False)
        for m in modes:
            m.training = False
        emb = model.get_input_embeddings()
        # With every parameter frozen the graph starts at the embeddings' output.
        handles.append(emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_() if not out.requires_grad else out))
        for m in modules:
            handles.append(m.register_forward_hook(functools.partial(_record, calls[id(m)])))
        yield
    finally:
        for h in handles:
            h.remove()
        for p in flags:
            p.requires_grad_(True)
        for m in modes:
            m.training = True


def _record(store: list[_Call], _module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    x = args[0].detach()
    store.append(_Call(x=x, y=out, x_version=x._version, y_version=out._version))
    # The model gets a copy: in-place ops downstream (Falcon's `mlp_output += ...`) then leave
    # the recorded output intact, and its gradient is the gradient of this call's output.
    return out.clone()
