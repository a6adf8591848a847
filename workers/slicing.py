"""Per-head slices of attention projection tensors, and their inverse.

A layout (see `workers.layouts`) describes, for every (block, layer), which
parameter entries belong to which head as explicit flat-index tables. Slicing is
then one gather per parameter and reassembly one scatter, whatever the layout
(fused, interleaved, transposed Conv1D, GQA), so there is no per-architecture
slicing code to get wrong downstream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

QUERY_BLOCKS = ("Q", "O")  # live on query heads; K and V live on KV heads


@dataclass(frozen=True, eq=False)
class ParamPart:
    """The entries of one parameter that belong to a (block, layer), per head.

    `index[h]` holds flat indices into `param.flatten()`, in a canonical order
    (row-major over the head's sub-tensor). Every head has the same count.
    """

    param: str  # name in model.named_parameters()
    shape: tuple[int, ...]  # the parameter's full shape
    index: np.ndarray  # int64 [n_heads, n_entries]

    @property
    def size(self) -> int:
        return int(self.index.shape[1])


@dataclass(frozen=True, eq=False)
class BlockSlicing:
    """All parameter entries of one (block, layer), split by head.

    A head's slice is the concatenation, in order, of its rows of every part
    (weight, then bias when biases are included).
    """

    block: str  # Q | K | V | O
    layer: int
    n_heads: int  # query heads for Q/O, KV heads for K/V
    parts: tuple[ParamPart, ...]
    _torch_index: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Entries per head (the `param` dimension of the store)."""
        return sum(p.size for p in self.parts)

    def index_tensor(self, part: int, device: torch.device | str = "cpu") -> torch.Tensor:
        key = (part, str(device))
        if key not in self._torch_index:
            self._torch_index[key] = torch.as_tensor(self.parts[part].index, device=device)
        return self._torch_index[key]


def slice_block(bs: BlockSlicing, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gather one block's per-head slices from full gradient tensors.

    grads[name] has shape (*lead, *param_shape) — e.g. (n_samples, out, in) for
    per-sample gradients. Returns (*lead, n_heads, size).
    """
    pieces = []
    for k, part in enumerate(bs.parts):
        g = grads[part.param]
        nlead = g.dim() - len(part.shape)
        if tuple(g.shape[nlead:]) != part.shape:
            raise ValueError(f"{part.param}: gradient shape {tuple(g.shape)} does not end with the parameter's {part.shape}")
        flat = g.reshape(*g.shape[:nlead], -1)
        idx = bs.index_tensor(k, g.device)
        pieces.append(flat[..., idx])  # (*lead, n_heads, n_entries)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def slice_all(layout, grads: dict[str, torch.Tensor], blocks=None, layers=None) -> dict[tuple[str, int], torch.Tensor]:
    """Every (block, layer) slice of `layout` as (*lead, n_heads, size) tensors."""
    out = {}
    for (b, l), bs in layout.blocks.items():
        if (blocks is None or b in blocks) and (layers is None or l in layers):
            out[(b, l)] = slice_block(bs, grads)
    return out


def assemble(layout, slices: dict[tuple[str, int], torch.Tensor], fill: float = 0.0) -> dict[str, torch.Tensor]:
    """Inverse of `slice_all`: scatter slices back into full parameter tensors.

    Entries not covered by any given slice (e.g. an output-projection bias, or
    blocks not given) are `fill`.
    """
    out: dict[str, torch.Tensor] = {}
    for (b, l), s in slices.items():
        bs = layout.blocks[(b, l)]
        lead = s.shape[:-2]
        offset = 0
        for k, part in enumerate(bs.parts):
            if part.param not in out:
                numel = int(np.prod(part.shape))
                out[part.param] = torch.full((*lead, numel), fill, dtype=s.dtype, device=s.device)
            idx = bs.index_tensor(k, s.device)
            out[part.param][..., idx] = s[..., offset : offset + part.size]
            offset += part.size
    shapes = {p.param: p.shape for bs in layout.blocks.values() for p in bs.parts}
    return {name: t.reshape(*t.shape[:-1], *shapes[name]) for name, t in out.items()}
