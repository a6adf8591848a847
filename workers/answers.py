"""Answers mode inside an extraction task: each task's gradient sums (pass 1) and each sample's
scalars against them (pass 2), formed where the per-sample gradients are and never stored.

With w = 1/(Î+λ), u_i = g_i² w and v_i = |g_i| (so M_ij = ⟨u_i, v_j⟩ and A_ij = ⟨g_i, g_j⟩_w),
every row and column sum of the pair matrices over a task k is one inner product with that
task's sums: Σ_j∈k A_ij = ⟨g_i, Σ_k g⟩_w, Σ_j∈k M_ij = ⟨u_i, Σ_k |g|⟩ and
Σ_j∈k M_ji = ⟨w·Σ_k g², |g_i|⟩. Those, with the diagonals A_ii, M_ii, are what every answer
the statistics give is made of (qkov.pipeline.stats_stage), to float rounding.
"""
from __future__ import annotations

import numpy as np
import torch

from qkov.pipeline import schema


def task_sums_update(acc: torch.Tensor, t: torch.Tensor, onehot: torch.Tensor) -> None:
    """Add one batch to the per-task sums: acc (tasks, 3, H, P) float64 in TASK_SUM_KINDS order
    (Σ g, Σ |g|, Σ g²), t (B, H, P) the batch's gradient slice, onehot (tasks, B) float64 (0 for
    samples that take no part: other tasks, skipped samples)."""
    td = t.double()
    acc[:, 0] += torch.einsum("tb,bhp->thp", onehot, td)
    acc[:, 1] += torch.einsum("tb,bhp->thp", onehot, td.abs())
    acc[:, 2] += torch.einsum("tb,bhp->thp", onehot, td * td)


def sample_scalars(t: torch.Tensor, inv: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Each sample's scalars of one slice batch: t (B, H, P) its gradients, inv (H, P) 1/(Î+λ),
    sums (tasks, 3, H, P) the task sums -> (B, H, parts) float64 in `schema.answer_parts` order:
    Σg², A_ii, M_ii, then per task ⟨g_i, Σg⟩_w, ⟨u_i, Σ|g|⟩, ⟨w Σg², |g_i|⟩."""
    td, w = t.double(), inv.double()
    v = td.abs()
    gw = td * w
    u = gw * td
    own = [(td * td).sum(-1), u.sum(-1), (u * v).sum(-1)]
    a = torch.einsum("bhp,thp->bht", gw, sums[:, 0])
    mr = torch.einsum("bhp,thp->bht", u, sums[:, 1])
    mc = torch.einsum("bhp,thp->bht", v, sums[:, 2] * w)
    per_task = torch.stack([a, mr, mc], dim=-1).flatten(-2)  # (B, H, tasks · 3): task-major, as answer_parts
    return torch.cat([torch.stack(own, dim=-1), per_task], dim=-1)


def stored_task_sums(store_path: str, storage_options: dict | None, block: str) -> np.ndarray:
    """The consolidated task sums (tasks, 3, L, H, P) float64 of one block (`_work/task_sums`)."""
    from qkov.pipeline.store import RunStore

    root = RunStore(store_path, storage_options).root()
    return np.asarray(root[schema.WORK][schema.TASK_SUMS][block][:], dtype=np.float64)
