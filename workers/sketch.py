"""Seeded sparse random projections (CountSketch / SJLT) of per-slice score operands.

Sketch mode stores, per (block, layer, head) slice of P entries, k-dimensional
projections S(x) of the three operands the scores are inner products of:
  u = g²/Î_reg,  v = |g|,  w = g/√Î_reg   →   M_ij ≈ S(u_i)·S(v_j),  A_ij ≈ S(w_i)·S(w_j).
S has `nnz` nonzeros ±1/√nnz per column p, at rows h_r(p), r < nnz. Signs are
independent fair coins, so for p ≠ q the cross terms vanish in expectation and
E[S(x)·S(y)] = x·y exactly (unbiased), with Var ≈ (‖x‖²‖y‖² + (x·y)²)/k.
Buckets are "balanced": h_r = (random permutation of 0..P-1) mod k, so every row
gets ⌊P/k⌋ or ⌈P/k⌉ entries, and for k ≥ P (nnz = 1) the hash is injective and the
sketch preserves inner products exactly.

The projection is a pure function of (seed, block, layer, head, P, k, nnz): drawn
with a CPU torch.Generator (identical on every worker and device), then moved to
the device; regenerated wherever needed, never stored.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import schema

PARTS = schema.SKETCH_PARTS  # the stored operands, in this order


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


def projection(size: int, dim: int, seed: int, block: str, layer: int, head: int, nnz: int = 1) -> Projection:
    """The projection of slice (block, layer, head), P = size entries → dim, on CPU."""
    if dim < 1 or nnz < 1 or size < 1:
        raise ValueError(f"sketch needs size, dim, nnz >= 1 (got {size}, {dim}, {nnz})")
    gen = torch.Generator().manual_seed(slice_seed(seed, block, layer, head))
    rows = torch.stack([torch.randperm(size, generator=gen) % dim for _ in range(nnz)])
    signs = torch.randint(0, 2, (nnz, size), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    return Projection(rows, signs / np.sqrt(nnz), dim)


def sketch(x: torch.Tensor, proj: Projection) -> torch.Tensor:
    """S(x): (..., P) → (..., k) in x's dtype and device."""
    signs = proj.signs.to(device=x.device, dtype=x.dtype)
    rows = proj.rows.to(x.device)
    out = x.new_zeros((*x.shape[:-1], proj.dim))
    for r in range(rows.shape[0]):
        out.index_add_(-1, rows[r], x * signs[r])
    return out


def operands(g: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u = g²/Î_reg, v = |g|, w = g/√Î_reg for gradients g (..., P) and inv (P,) = 1/Î_reg;
    u·v and w·w are exactly the interference and alignment of `pipeline.score.slice_scores`."""
    return g * g * inv, g.abs(), g * torch.sqrt(inv)


def sketch_block(g: np.ndarray, inv: np.ndarray, block: str, layers: tuple[int, ...], dim: int, seed: int,
                 nnz: int = 1, device: str = "cpu") -> dict[str, np.ndarray]:
    """Sketched operands of one block for a batch of samples.

    g: (n, L, H, P) gradients; inv: (L, H, P) = 1/Î_reg; `layers` are the model's layer
    indices of axis 1 (they seed the projections). Returns {"u"|"v"|"w": (n, L, H, dim)}
    float32, formed in float64 so that g² of small gradients does not underflow first.
    """
    n, L, H, P = g.shape
    gt = torch.as_tensor(g, device=device).to(torch.float64)
    it = torch.as_tensor(inv, device=device).to(torch.float64)
    out = {p: np.zeros((n, L, H, dim), dtype=np.float32) for p in PARTS}
    for li, layer in enumerate(layers):
        for h in range(H):
            proj = projection(P, dim, seed, block, layer, h, nnz).to(device)
            for name, x in zip(PARTS, operands(gt[:, li, h], it[li, h])):
                out[name][:, li, h] = sketch(x, proj).float().cpu().numpy()
    return out


def stored_inverse_fisher(store_path: str, storage_options: dict | None, block: str) -> np.ndarray:
    """1/Î_reg (L, H, P) of one block from the run's consolidated `fisher` group, by the
    score stage's own formula (so sketch and exact mode normalise identically)."""
    from pipeline.score import inverse_damped_fisher, open_fisher

    return np.asarray(inverse_damped_fisher(open_fisher(store_path, storage_options), block).compute())


def sketch_shard(task, grads: dict[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
    """Pass 2 of a sketch-mode shard: the `gradients` variables ({B}_u, {B}_v, {B}_w) of one
    workers.writer.ShardTask from its gradients {block: (n, L, H, P)}, with the run's Fisher."""
    out = {}
    for b, g in grads.items():
        inv = stored_inverse_fisher(task.store_path, task.storage_options, b)
        parts = sketch_block(g, inv, b, task.layers, task.sketch_dim, task.sketch_seed, device=device)
        out.update({schema.sketch_var(b, p): arr for p, arr in parts.items()})
    return out
