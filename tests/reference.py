"""Test-only reference code, written independently of the package's slicing, gradient and
scoring code: the definitions the package must reproduce, in their plainest form.

* `per_sample_grads_loop` — per-sample gradients by a loop: one unpadded sample at a time,
  transformers' own loss (`labels=`), `loss.backward()`, `param.grad`.
* `reference_head_slice` — head h's entries of a projection weight, straight from the
  transformers `_split_heads` formulas, for a support-matrix entry (`qkov.testing.SUPPORTED`).
"""
from __future__ import annotations

from typing import Iterable

import torch


def per_sample_grads_loop(model, samples: Iterable[torch.Tensor], names: Iterable[str] | None = None,
                          labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{param: [n_samples, *shape]} gradients, one sample (a 1-D tensor of token ids) at a time.

    Causal LMs use `labels = input_ids`; a sequence classifier takes `labels` [n_samples].
    `names` defaults to every parameter that gets a gradient. requires_grad flags are left as found.
    """
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    out: dict[str, list[torch.Tensor]] = {}
    wanted = None if names is None else list(names)
    for i, ids in enumerate(samples):
        model.zero_grad(set_to_none=True)
        x = torch.as_tensor(ids).reshape(1, -1)
        lab = x if labels is None else labels[i : i + 1]
        model(input_ids=x, labels=lab).loss.backward()
        for n in wanted if wanted is not None else [n for n, p in params.items() if p.grad is not None]:
            out.setdefault(n, []).append(params[n].grad.detach().clone())
    model.zero_grad(set_to_none=True)
    assert flags == {n: p.requires_grad for n, p in params.items()}
    return {n: torch.stack(v) for n, v in out.items()}


def reference_head_slice(arch, block: str, W: torch.Tensor, h: int) -> torch.Tensor:
    """Head h's entries of `block`'s weight W (as stored) for the support-matrix entry `arch`.

    Q/K/V: the head's output features; O: its input features. `arch.weight_layout` says
    whether W is stored [out, in] (nn.Linear) or [in, out] (GPT-2's Conv1D); entries come
    out in the stored tensor's row-major order.
    """
    H, KV, hd, kind = arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.kind
    G = H // KV
    if arch.weight_layout == "in_out":  # Conv1D [in, out]: output features are columns
        def outputs(start: int, stop: int) -> torch.Tensor:
            return W[:, start:stop]

        def inputs(start: int, stop: int) -> torch.Tensor:
            return W[start:stop, :]
    else:
        def outputs(start: int, stop: int) -> torch.Tensor:
            return W[start:stop]

        def inputs(start: int, stop: int) -> torch.Tensor:
            return W[:, start:stop]

    if block == "O":
        return inputs(h * hd, (h + 1) * hd).reshape(-1)
    k = "QKV".index(block)
    if kind == "split":
        return outputs(h * hd, (h + 1) * hd).reshape(-1)
    if kind == "fused":  # [Q (H·hd) | K (KV·hd) | V (KV·hd)]; GPT-2: c_attn(x).split(E, dim=2)
        start = (0, H * hd, (H + KV) * hd)[k] + h * hd
        return outputs(start, start + hd).reshape(-1)
    if kind == "interleaved":  # view(..., H, 3, hd)
        start = (h * 3 + k) * hd
        return outputs(start, start + hd).reshape(-1)
    if kind == "grouped":  # view(..., KV, G + 2, hd): the group's queries, then its K, then its V
        start = ((h // G) * (G + 2) + h % G) * hd if block == "Q" else (h * (G + 2) + G + k - 1) * hd
        return outputs(start, start + hd).reshape(-1)
    raise AssertionError(f"unknown kind {kind!r}")
