"""Seeded sparse random projections (CountSketch / SJLT) of per-slice score operands.

Sketch mode stores, per (block, layer, head) slice of P entries, k-dimensional
projections S(x) of the three operands the scores are inner products of:
  u = g²/Î_reg,  v = |g|,  w = g/√Î_reg   →   M_ij ≈ S(u_i)·S(v_j),  A_ij ≈ S(w_i)·S(w_j).
S has `nnz` nonzeros ±1/√nnz per column p, at rows h_r(p), r < nnz. Signs are
independent fair coins, so for p ≠ q the cross terms vanish in expectation and
E[S(x)·S(y)] = x·y exactly (unbiased), with Var ≈ (‖x‖²‖y‖² + (x·y)²)/k.
Buckets are "balanced" and local: h_r(p) = π_r(p) mod k for a pseudo-random permutation π_r
of 0..P-1 that keeps every run of k consecutive entries (k·c ≤ p < k·(c+1), the last one
ragged) in place and shuffles it, so each run fills k distinct buckets once: every row gets
⌊P/k⌋ or ⌈P/k⌉ entries, two entries of one run never share a bucket, two of different runs
share one with probability 1/k (as a fully random hash gives, so the variance is the same),
and for k ≥ P (nnz = 1) the hash is injective and the sketch preserves inner products
exactly. Local because applying S reads each run of g as one contiguous block: at 8B a
permutation over all of a slice's P entries made every read a random 32-byte access (8× the
bytes), most of an answers pass's sketching time.

The projection is a pure function of (seed, block, layer, head, P, k, nnz), computed
with exact integer arithmetic that gives the same bits on every device: π_r ranks the
entries by a keyed 62-bit integer hash (a stable sort, so even a tie is broken the same
way everywhere) and the signs are another keyed hash bit. A GPU worker therefore
builds its projections on the device from the seed instead of drawing P random
numbers per slice on the host. Regenerated wherever needed (optionally cached by a
worker), never stored.

Applying S uses the inverse permutation: position q of π⁻¹ holds the entry that
lands in bucket q mod k, so S(x) is a gather followed by a reshape-sum (no scatter).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from qkov.pipeline import schema

PARTS = schema.SKETCH_PARTS  # the stored operands, in this order
# How projections are drawn; stored with a sketch-mode run so that `--resume` never mixes
# sketches of two schemes (runs before 2026-11-28 drew buckets with torch.randperm, before
# 2026-12-07 permuted all P entries at once).
PROJECTION_SCHEME = "keyed-hash-runs-v3"  # v2 (before 2026-12-07): one permutation over all P entries
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Projection:
    """One slice's sparse projection: rows (nnz, P) long, signs (nnz, P) scaled by 1/√nnz."""

    rows: torch.Tensor
    signs: torch.Tensor
    dim: int

    def to(self, device) -> "Projection":
        return Projection(self.rows.to(device), self.signs.to(device), self.dim)


def slice_seed(seed: int, block: str, layer: int, head: int) -> int:
    """A 63-bit generator seed for one slice (stable across processes, unlike hash())."""
    key = f"qkov-sketch/{int(seed)}/{block}/{int(layer)}/{int(head)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def slice_keys(seed: int, block: str, layer: int, head: int, nnz: int = 1) -> np.ndarray:
    """(nnz, 3) 32-bit keys of one slice: per row r two keys of its sort hash, then its sign key."""
    s = slice_seed(seed, block, layer, head)
    out = np.empty((nnz, 3), dtype=np.int64)
    for r in range(nnz):
        d = hashlib.blake2b(f"{s}/{r}".encode(), digest_size=12).digest()
        out[r] = np.frombuffer(d, dtype="<u4").astype(np.int64)
    return out


# ---- exact integer hashing in int64 (no overflow: every product stays below 2^49) ----


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for 0 ≤ x < 2^32, via 16-bit halves so that int64 never overflows."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) of 0 ≤ x < 2^32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _sort_keys(p: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """A keyed 62-bit hash of each entry p (< 2^32); keys (..., 3) broadcast over p's last axis."""
    h = _hash32(p & _M32)
    return (_hash32(h ^ keys[..., 0:1]) << 30) | (_hash32(h ^ keys[..., 1:2]) >> 2)


def inverse_permutation(size: int, keys: torch.Tensor, run: int | None = None) -> torch.Tensor:
    """π⁻¹ as (..., size) int64: π⁻¹(q) is the entry of rank q by the keyed hash; keys (..., 3).
    With `run` (the sketch dim), entries are ranked within each run of `run` consecutive ones
    (the last one ragged), so π⁻¹ maps every run onto itself."""
    p = torch.arange(size, dtype=torch.int64, device=keys.device).expand(*keys.shape[:-1], size)
    h = _sort_keys(p, keys)
    if run is None or run >= size:
        return torch.sort(h, dim=-1, stable=True).indices
    full = (size // run) * run
    lead = h[..., :full].reshape(*h.shape[:-1], size // run, run)
    starts = torch.arange(0, full, run, dtype=torch.int64, device=keys.device)[:, None]
    parts = [(torch.sort(lead, dim=-1, stable=True).indices + starts).flatten(-2)]
    if full < size:
        parts.append(torch.sort(h[..., full:], dim=-1, stable=True).indices + full)
    return torch.cat(parts, dim=-1)


def _signs(p: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """±1 (int64) per entry p: the top bit of a keyed hash."""
    return 1 - 2 * (_hash32(_hash32(p & _M32) ^ key) >> 31)


def projection(size: int, dim: int, seed: int, block: str, layer: int, head: int, nnz: int = 1) -> Projection:
    """The projection of slice (block, layer, head), P = size entries → dim, on CPU."""
    if dim < 1 or nnz < 1 or size < 1:
        raise ValueError(f"sketch needs size, dim, nnz >= 1 (got {size}, {dim}, {nnz})")
    keys = torch.as_tensor(slice_keys(seed, block, layer, head, nnz))
    order = inverse_permutation(size, keys, dim)  # (nnz, P)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(size).expand(nnz, size).contiguous())
    rows = rank % dim
    signs = _signs(torch.arange(size).expand(nnz, size), keys[:, 2:3]).to(torch.float64)
    return Projection(rows, signs / np.sqrt(nnz), dim)


def sketch(x: torch.Tensor, proj: Projection) -> torch.Tensor:
    """S(x): (..., P) → (..., k) in x's dtype and device (the reference scatter form)."""
    signs = proj.signs.to(device=x.device, dtype=x.dtype)
    rows = proj.rows.to(x.device)
    out = x.new_zeros((*x.shape[:-1], proj.dim))
    for r in range(rows.shape[0]):
        out.index_add_(-1, rows[r], x * signs[r])
    return out


def operands(g: torch.Tensor, inv: torch.Tensor, parts: tuple[str, ...] = PARTS) -> tuple[torch.Tensor, ...]:
    """u = g²/Î_reg, v = |g|, w = g/√Î_reg (those named in `parts`, in its order) for gradients
    g (..., P) and inv (P,) = 1/Î_reg; u·v and w·w are exactly the interference and alignment of
    `qkov.workers.kernels.slice_scores`."""
    make = {"u": lambda: g * g * inv, "v": g.abs, "w": lambda: g * torch.sqrt(inv)}
    return tuple(make[p]() for p in parts)


# ---- applying every head's projection of one (block, layer) at once, on any device ----


@dataclass(frozen=True)
class LayerProjection:
    """The projections of one (block, layer)'s H slices in gather form: `order` (nnz, H, P)
    = π_r⁻¹(q) (int32 where P fits) and `signs` (nnz, H, P) int8 of the entry at order."""

    order: torch.Tensor
    signs: torch.Tensor
    dim: int

    @property
    def nbytes(self) -> int:
        return self.order.numel() * self.order.element_size() + self.signs.numel() * self.signs.element_size()


def layer_projection(size: int, dim: int, seed: int, block: str, layer: int, n_heads: int, nnz: int = 1,
                     device="cpu") -> LayerProjection:
    """Every head's projection of (block, layer), built on `device` from the seed (bit-identical on any device)."""
    if dim < 1 or nnz < 1 or size < 1:
        raise ValueError(f"sketch needs size, dim, nnz >= 1 (got {size}, {dim}, {nnz})")
    keys = torch.as_tensor(np.stack([slice_keys(seed, block, layer, h, nnz) for h in range(n_heads)], axis=1),
                           device=device)  # (nnz, H, 3)
    order = inverse_permutation(size, keys, dim)  # (nnz, H, P)
    signs = _signs(order, keys[..., 2:3]).to(torch.int8)
    small = torch.int32 if size < 2**31 else torch.int64
    return LayerProjection(order.to(small), signs, dim)


def _bucket_sum(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ over q ≡ j (mod dim) of y[..., q], j < dim: a reshape-sum plus the ragged tail."""
    P = y.shape[-1]
    full = (P // dim) * dim
    out = y[..., :full].reshape(*y.shape[:-1], P // dim, dim).sum(-2) if full else y.new_zeros((*y.shape[:-1], dim))
    if full < P:
        out[..., : P - full] += y[..., full:]
    return out


def sketch_layer(g: torch.Tensor, inv: torch.Tensor, proj: LayerProjection, parts: tuple[str, ...] = PARTS) -> dict[str, torch.Tensor]:
    """Sketched operands {"u","v","w": (B, H, k)} (those in `parts`) of gradients g (B, H, P)
    with inv (H, P) = 1/Î_reg, in float32 (float64 where g is float64, for references). u is
    formed as (g·√inv)², as the score kernel forms g²/Î_reg, so small gradients do not underflow
    before the Fisher scales them. The operands are elementwise in (g, inv), so g and √inv are
    gathered once per row r. In float64 (8 bytes per entry per copy) the sketches were the
    largest part of an 8B answers pass."""
    dt = torch.float64 if g.dtype == torch.float64 else torch.float32
    out = {p: None for p in parts}
    scale = 1.0 / np.sqrt(proj.order.shape[0])
    root = inv.to(dt).sqrt() if ("u" in parts or "w" in parts) else None
    for r in range(proj.order.shape[0]):
        idx = proj.order[r].long()  # (H, P)
        go = torch.gather(g.to(dt), -1, idx.expand(g.shape[0], *idx.shape))
        s = proj.signs[r].to(dt) * scale
        ro = torch.gather(root, -1, idx) if root is not None else None
        del idx
        for name in parts:
            if name == "v":
                x = go.abs().mul_(s)
            else:
                x = go * ro
                x = x.square_().mul_(s) if name == "u" else x.mul_(s)
            t = _bucket_sum(x, proj.dim)
            del x
            out[name] = t if out[name] is None else out[name] + t
    return out


class ProjectionCache:
    """A worker's projections per (seed, dim, nnz, block, layer, P, H, device), up to `budget`
    bytes (7B: 64 MB per (block, layer), ~10.7 GB for all); beyond it they are rebuilt per use."""

    def __init__(self, budget: int = 12 << 30):
        self.budget, self.used, self._items = budget, 0, {}

    def get(self, size, dim, seed, block, layer, n_heads, nnz, device) -> LayerProjection:
        key = (size, dim, seed, block, layer, n_heads, nnz, str(device))
        hit = self._items.get(key)
        if hit is None:
            hit = layer_projection(size, dim, seed, block, layer, n_heads, nnz, device)
            if self.used + hit.nbytes <= self.budget:
                self._items[key] = hit
                self.used += hit.nbytes
        return hit

    def clear(self) -> None:
        self._items.clear()
        self.used = 0


def sketch_block(g: np.ndarray, inv: np.ndarray, block: str, layers: tuple[int, ...], dim: int, seed: int,
                 nnz: int = 1, device: str = "cpu") -> dict[str, np.ndarray]:
    """Sketched operands of one block for a batch of samples.

    g: (n, L, H, P) gradients; inv: (L, H, P) = 1/Î_reg; `layers` are the model's layer
    indices of axis 1 (they seed the projections). Returns {"u"|"v"|"w": (n, L, H, dim)}
    float32 (see `sketch_layer`).
    """
    n, L, H, P = g.shape
    out = {p: np.zeros((n, L, H, dim), dtype=np.float32) for p in PARTS}
    for li, layer in enumerate(layers):
        proj = layer_projection(P, dim, seed, block, layer, H, nnz, device)
        gl = torch.as_tensor(np.ascontiguousarray(g[:, li]), device=device)
        il = torch.as_tensor(np.ascontiguousarray(inv[li]), device=device)
        for name, t in sketch_layer(gl, il, proj).items():
            out[name][:, li] = t.float().cpu().numpy()
    return out


def stored_inverse_fisher(store_path: str, storage_options: dict | None, block: str) -> np.ndarray:
    """1/Î_reg (L, H, P) of one block from the run's consolidated `fisher` group, by the
    score stage's own formula (so sketch and exact mode normalise identically)."""
    from qkov.pipeline.store import RunStore

    from .fisher import inverse_damped_fisher

    fisher = RunStore(store_path, storage_options).open_fisher()
    return np.asarray(inverse_damped_fisher(fisher, block).compute())
