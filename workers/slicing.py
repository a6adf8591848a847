"""Per-head slices of attention projection tensors, and their inverse.

A layout (see `qkov.workers.layouts`) describes, for every (block, layer), which
parameter entries belong to which head as flat-index tables. Slicing is then one
gather per parameter and reassembly one scatter, whatever the layout (fused,
interleaved, transposed Conv1D, GQA), so there is no per-architecture slicing
code to get wrong downstream.

Every layout qkov knows puts head h's entries at a head offset plus a pattern
shared by all heads (index[h] = base[h] + pattern). Parts store that
factorisation (verified exactly) instead of the table: at Llama-2-7B scale the
full int64 tables would take 17 GB, the factorised ones 4 MB per part. Gather
indices are built on the fly on the gradients' device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

QUERY_BLOCKS = ("Q", "O")  # live on query heads; K and V live on KV heads

_INTERNED: dict[tuple, np.ndarray] = {}  # equal patterns (every layer of a model) share one array


def _intern(pattern: np.ndarray) -> np.ndarray:
    key = (pattern.shape, pattern.tobytes())
    if key not in _INTERNED:
        pattern.setflags(write=False)
        _INTERNED[key] = pattern
    return _INTERNED[key]


def factorise(index: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(base [H], pattern [n]) with index[h] == base[h] + pattern exactly, or None if the table
    is not of that form. pattern = index[0], so base[0] = 0."""
    index = np.asarray(index, dtype=np.int64)
    if index.ndim != 2 or index.shape[1] == 0:
        return None
    base = index[:, 0] - index[0, 0]
    if not np.array_equal(index - base[:, None], np.broadcast_to(index[0], index.shape)):
        return None
    return base, index[0].copy()


class ParamPart:
    """The entries of one parameter that belong to a (block, layer), per head.

    `index[h]` holds flat indices into `param.flatten()`, in a canonical order
    (row-major over the head's sub-tensor). Every head has the same count. Built
    from a full table (`ParamPart(param, shape, index)`: factorised when it can be)
    or directly from its factorisation (`ParamPart(param, shape, base=, pattern=)`).
    """

    __slots__ = ("param", "shape", "base", "pattern", "_table", "_strides")

    def __init__(self, param: str, shape: tuple[int, ...], index: np.ndarray | None = None, *,
                 base: np.ndarray | None = None, pattern: np.ndarray | None = None):
        self.param = param  # name in model.named_parameters()
        self.shape = tuple(int(s) for s in shape)  # the parameter's full shape
        if (index is None) == (pattern is None):
            raise ValueError("give either a full index table or base and pattern")
        self._table = None
        self._strides = False  # not yet looked for (`strides`)
        if index is not None:
            index = np.asarray(index, dtype=np.int64)
            f = factorise(index)
            if f is None:  # keep the table: no head-offset structure
                self.base, self.pattern, self._table = None, None, index
                return
            base, pattern = f
        self.base = np.asarray(base, dtype=np.int64).reshape(-1)
        self.pattern = _intern(np.asarray(pattern, dtype=np.int64).reshape(-1))

    @property
    def compact(self) -> bool:
        return self._table is None

    @property
    def n_heads(self) -> int:
        return len(self.base) if self.compact else int(self._table.shape[0])

    @property
    def size(self) -> int:
        return len(self.pattern) if self.compact else int(self._table.shape[1])

    @property
    def index(self) -> np.ndarray:
        """The full int64 table [n_heads, n_entries], built on demand (not kept)."""
        if not self.compact:
            return self._table
        return self.base[:, None] + self.pattern[None, :]

    def strides(self) -> tuple[int, int, int, int, int] | None:
        """(first, head stride, rows, row stride, row length) where every head's entries are rows
        of equal length at a fixed stride, and the heads at a fixed stride: index[h, r·C + c] =
        first + h·head_stride + r·row_stride + c. Then a slice is a strided view of the
        gradient (a copy without an index where rows are not adjacent), not a gather: every
        layout qkov knows is of this form. None where it is not (the gather is used)."""
        if self._strides is not False:
            return self._strides
        self._strides = None
        if not self.compact or self.pattern.size == 0:
            return None
        p, b = self.pattern, self.base
        d = np.diff(p)
        C = int(np.argmax(d != 1)) + 1 if (d != 1).any() else p.size
        if p.size % C:
            return None
        rows = p.reshape(-1, C)
        if not np.array_equal(rows - rows[:, :1], np.broadcast_to(np.arange(C), rows.shape)):
            return None
        S = int(rows[1, 0] - rows[0, 0]) if rows.shape[0] > 1 else C
        Bs = int(b[1] - b[0]) if b.size > 1 else 0
        if (rows.shape[0] > 1 and not (np.diff(rows[:, 0]) == S).all()) or (b.size > 1 and not (np.diff(b) == Bs).all()) \
                or S < C or Bs < 0:
            return None
        self._strides = (int(p[0]), Bs, rows.shape[0], S, C)
        return self._strides

    def __repr__(self) -> str:
        form = "base+pattern" if self.compact else "table"
        return f"ParamPart({self.param!r}, {self.shape}, {self.n_heads}x{self.size} {form})"


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
        """The gather index [n_heads, n_entries] (int64) of one part on `device`, built from the
        cached (small) base and pattern; only full tables are cached whole."""
        p = self.parts[part]
        key = (part, str(device))
        if key not in self._torch_index:
            if p.compact:
                self._torch_index[key] = (_device_array(p.base, device), _device_array(p.pattern, device))
            else:
                self._torch_index[key] = torch.as_tensor(p.index, device=device)
        cached = self._torch_index[key]
        if isinstance(cached, tuple):
            base, pattern = cached
            return base[:, None] + pattern[None, :]
        return cached


_DEVICE_ARRAYS: dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]] = {}


def _device_array(a: np.ndarray, device) -> torch.Tensor:
    """One device copy per (interned) array and device, shared by every layer's part."""
    key = (id(a), str(device))
    hit = _DEVICE_ARRAYS.get(key)
    if hit is None or hit[0] is not a:  # the id may have been reused by a new array
        hit = (a, torch.tensor(a, device=device))  # a copy: interned arrays are read-only
        _DEVICE_ARRAYS[key] = hit
    return hit[1]


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
        st = part.strides()
        if st is not None and flat.is_contiguous():  # a strided view: no index built or read
            first, hs, R, S, C = st
            x = flat.as_strided((*flat.shape[:-1], part.n_heads, R, C), (*flat.stride()[:-1], hs, S, 1),
                                flat.storage_offset() + first)
            pieces.append(x.reshape(*flat.shape[:-1], part.n_heads, R * C))  # a view where rows are adjacent
            continue
        idx = bs.index_tensor(k, g.device)
        pieces.append(flat[..., idx])  # (*lead, n_heads, n_entries)
        del idx
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
