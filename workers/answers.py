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
    """Add one batch to the per-task sums: acc (tasks, 3, H, P) in TASK_SUM_KINDS order (Σ g,
    Σ |g|, Σ g²; float32, as the partials are written: at 8B two tasks' sums are 32 GB of device
    memory, not 64), the batch's own sums formed in float64; t (B, H, P) the batch's gradient
    slice, onehot (tasks, B) float64 (0 for samples that take no part: other tasks, skipped ones)."""
    td = t.double()
    for k, x in enumerate((td, td.abs(), td * td)):
        acc[:, k] += torch.einsum("tb,bhp->thp", onehot, x).to(acc.dtype)


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


class AnswersPass:
    """The scalars' share of one extraction task (`qkov.workers.writer`; answers and sketch
    mode): in the "fisher" phase each task's sums over this shard (its `_work` partials), in
    the "answers" (or "sketch") phase each sample's scalars against the consolidated sums (and, with sketch_dim, the interference's
    sketched operands u, v). Gradients arrive as the exact mode would store them: rounded to
    `storage_dtype`."""

    def __init__(self, task, heads: dict, sizes: dict, device: str, resident: tuple | None = None):
        n, L = len(task.input_ids), len(task.layers)
        self.task, self.summing = task, task.phase == "fisher"
        self.onehot = torch.zeros((task.n_tasks, n), dtype=torch.float64, device=device)
        self.onehot[torch.as_tensor(task.task_of, device=device), torch.arange(n, device=device)] = 1.0
        if self.summing:
            self.tsums = {b: torch.zeros((task.n_tasks, 3, L, heads[b], sizes[b]), dtype=torch.float32, device=device)
                          for b in task.blocks}
            return
        if resident is None:  # consolidated by the client (a run of several shards)
            from .sketch import stored_inverse_fisher

            where = (task.store_path, task.storage_options)
            resident = ({b: stored_inverse_fisher(*where, b) for b in task.blocks},
                        {b: stored_task_sums(*where, b) for b in task.blocks})
        self.inv = {b: torch.as_tensor(resident[0][b], device=device) for b in task.blocks}
        self.sums = {b: torch.as_tensor(resident[1][b], device=device) for b in task.blocks}
        n_parts = len(schema.answer_parts(range(task.n_tasks)))
        self.scalars = {b: np.zeros((L, heads[b], n, n_parts), dtype=np.float64) for b in task.blocks}
        # answers mode, keep_pairs = "top": the interference's operands u, v sketched too (in the
        # task's ShardBuffers; sketch mode's own pass sketches all three)
        self.sketch_shapes = {schema.sketch_var(b, p): (L, heads[b], n, task.sketch_dim)
                              for b in task.blocks for p in ("u", "v")} if task.sketch_dim and task.phase == "answers" else {}

    def consume(self, b: str, li: int, s: int, t: torch.Tensor, finite: torch.Tensor, put, projection) -> None:
        """One batch (rows s:s+B) of one block and layer: t (B, H, P) float32, finite (B,);
        `put(name, li, s, x)` stores sketches, `projection(b, li)` gives the layer's sketch."""
        if self.task.storage_dtype != "float32":
            t = t.to(torch.bfloat16).float()
        if self.summing:
            task_sums_update(self.tsums[b][:, :, li], t, self.onehot[:, s : s + t.shape[0]] * finite.to(torch.float64))
            return
        x = sample_scalars(t, self.inv[b][li], self.sums[b][:, :, li].double())
        self.scalars[b][li, :, s : s + t.shape[0]] = x.transpose(0, 1).cpu().numpy()
        if self.sketch_shapes:
            from .sketch import sketch_layer

            for p, x in sketch_layer(t, self.inv[b][li], projection(b, li)).items():
                if p != "w":  # the alignment's answers come exactly from the scalars
                    put(schema.sketch_var(b, p), li, s, x.float())

    def partials(self) -> dict[str, np.ndarray]:
        """Pass 1: the shard's task sums by `_work` array name (float32)."""
        return {schema.task_sum_partial(b, k): x[k].float().cpu().numpy() for b, x in self.tsums.items()
                for k in range(self.task.n_tasks)} if self.summing else {}
