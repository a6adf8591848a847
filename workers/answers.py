"""Answers mode inside an extraction task: each task's gradient sums (pass 1) and each sample's
scalars against them (pass 2), formed where the per-sample gradients are and never stored.

With w = 1/(Î+λ), u_i = g_i² w and v_i = |g_i| (so M_ij = ⟨u_i, v_j⟩ and A_ij = ⟨g_i, g_j⟩_w),
every row and column sum of the pair matrices over a task k is one inner product with that
task's sums: Σ_j∈k A_ij = ⟨g_i, Σ_k g⟩_w, Σ_j∈k M_ij = ⟨u_i, Σ_k |g|⟩ and
Σ_j∈k M_ji = ⟨w·Σ_k g², |g_i|⟩. Those, with the diagonals A_ii, M_ii, are what every answer
the statistics give is made of (qkov.pipeline.stats_stage), to float rounding.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from qkov.pipeline import schema

from .pass_kernels import fused_pass1, fused_pass2, fused_slice, pass1_update, pass2_scalars, sketch_parts
from .pass_kernels import sketch_tile, use_kernels
from .pass_kernels import squares_sum, task_sums_update  # noqa: F401 (the torch forms, also for tests)


def row_runs(keys) -> list[tuple[object, int, int]]:
    """The maximal runs of equal consecutive `keys` (a batch's rows), as (key, start, stop)."""
    runs: list[tuple[object, int, int]] = []
    for i, k in enumerate(keys):
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1], i + 1)
        else:
            runs.append((k, i, i + 1))
    return runs


def weight_rows(n_tasks: int) -> dict[str, slice]:
    """Where each group of weight rows lies in `scalar_weights`' (3·tasks + 2, H, P) buffer: the
    rows g² is reduced against (1, w, then "mr": w·Σ_k |g|) are one run "sq", so one GEMM takes them all."""
    t = n_tasks
    return {"lin": slice(0, t), "sq": slice(t, 2 * t + 2), "w": slice(t + 1, t + 2), "mr": slice(t + 2, 2 * t + 2),
            "ab": slice(2 * t + 2, 3 * t + 2)}


def weights_buffer(n_tasks: int, shape, device) -> torch.Tensor:
    """A (3·tasks + 2, H, P) float32 buffer for `scalar_weights`, its row of ones written (once)."""
    out = torch.empty((3 * n_tasks + 2, *shape), dtype=torch.float32, device=device)
    out[n_tasks].fill_(1.0)
    return out


def scalar_weights(inv: torch.Tensor, sums: torch.Tensor, out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weight rows every sample of one (layer, block) is reduced against, as views of one
    (3·tasks + 2, H, P) float32 buffer (`out`, reused where given; its row of ones is written
    only when `out` is new): "lin" w·Σ_k g per task (against g), "sq" 1, w, w·Σ_k |g| per task
    (against g²), "ab" w·Σ_k g² per task (against |g|), "w" w (against |g|³). inv (H, P) = w =
    1/(Î+λ), sums (3, tasks, H, P) in TASK_SUM_KINDS order. Rows, not (H, P, c) columns: each
    is written by one product of contiguous rows, with no concatenated or permuted copies
    (at 8B these are formed again for every batch: they do not all fit beside the sums)."""
    n_tasks = sums.shape[1]
    rows = weight_rows(n_tasks)
    out = weights_buffer(n_tasks, inv.shape, inv.device) if out is None else out
    w = out[rows["w"]][0]
    w.copy_(inv)
    for kind, name in enumerate(("lin", "mr", "ab")):
        torch.mul(sums[kind], w, out=out[rows[name]])
    return {name: out[rows[name]] for name in ("lin", "sq", "ab", "w")}


@functools.cache
def split_length(p: int, target: int = 1024) -> int:
    """The divisor of p nearest `target` (on a log scale): the length of the runs `head_gemm` cuts
    each head's P entries into."""
    best = p
    for d in range(1, math.isqrt(p) + 1):
        if p % d == 0:
            for k in (d, p // d):
                if abs(math.log(k / target)) < abs(math.log(best / target)):
                    best = k
    return best


def head_gemm(x: torch.Tensor, rows: torch.Tensor, columns: bool = False) -> torch.Tensor:
    """Σ_p x[b, h, p] rows[c, h, p] -> (H, B, c) float32, for x (B, H, P) and weight rows
    (c, H, P) (each (H, P) row contiguous; the rows any stride apart). Split-K: each head's P
    entries cut into R runs of K, one batched GEMM over the (head, run) pairs (x and the rows
    read in place: the rows as a column-major operand, no copy; `columns`: already in
    `cached_columns`' form), the R partial sums then added.
    cuBLAS's batched GEMM of a few output columns over one long summed axis (P = 36,864 at
    SmolLM2, 524,288 at 8B) took ~1 ms per call on an H100, 50× its memory-bandwidth time: it
    made the answers' second pass 6.5× a plain forward+backward where the first pass was 1.5×."""
    B, H, P = x.shape
    K = split_length(P)
    R = P // K
    xs = x.contiguous().view(B, H * R, K).transpose(0, 1)  # (H·R, B, K)
    ws = rows if columns else as_columns(rows)
    return torch.bmm(xs, ws).view(H, R, B, -1).sum(1)


def as_columns(rows: torch.Tensor) -> torch.Tensor:
    """Weight rows (c, H, P) as `head_gemm`'s (H·R, K, c) operand: a strided view, no copy."""
    return rows.reshape(rows.shape[0], -1, split_length(rows.shape[-1])).permute(1, 2, 0)


def cached_columns(wts: dict) -> dict:
    """`scalar_weights`' rows, each made a contiguous `head_gemm` operand once, for weights kept
    for a shard's batches (a contiguous operand is cuBLAS's fastest layout); "columns" marks them."""
    return {**{name: as_columns(rows).contiguous() for name, rows in wts.items()}, "columns": True}


def sample_scalars(t: torch.Tensor, inv: torch.Tensor, sums: torch.Tensor, weights=None) -> torch.Tensor:
    """Each sample's scalars of one slice batch: t (B, H, P) its gradients, inv (H, P) 1/(Î+λ),
    sums (3, tasks, H, P) the task sums (weights: their `scalar_weights`, when already formed)
    -> (B, H, parts) float64 in `schema.answer_parts` order: Σg², A_ii, M_ii, then per task
    ⟨g_i, Σg⟩_w, ⟨u_i, Σ|g|⟩, ⟨w Σg², |g_i|⟩. Float32 products summed by GEMMs over each head's
    P entries (as exact mode's pair scores are float32 GEMMs); the sums over samples the
    statistics make from these are float64."""
    wts = weights if weights is not None else scalar_weights(inv, sums)
    cols = wts.get("columns", False)
    n_tasks = wts["lin"].shape[-1 if cols else 0]
    t = t.contiguous()
    t2 = t * t
    v = t.abs()
    r_lin = head_gemm(t, wts["lin"], cols)  # (H, B, tasks)
    r_sq = head_gemm(t2, wts["sq"], cols)  # (H, B, 2 + tasks): Σg², A_ii, ⟨u_i, Σ_k|g|⟩
    r_ab = head_gemm(v, wts["ab"], cols)  # (H, B, tasks)
    m_ii = head_gemm(t2.mul_(v), wts["w"], cols)  # ⟨u_i, |g_i|⟩ (t2 no longer needed)
    own = torch.cat([r_sq[..., :2], m_ii], dim=-1)
    per_task = torch.stack([r_lin, r_sq[..., 2:], r_ab], dim=-1).reshape(*r_lin.shape[:2], 3 * n_tasks)  # task-major
    return torch.cat([own, per_task], dim=-1).transpose(0, 1).double()


def stored_task_sums(store_path: str, storage_options: dict | None, block: str) -> np.ndarray:
    """The consolidated task sums of one block (`_work/task_sums`, stored (tasks, 3, L, H, P)
    float64) as the second pass holds them: (3, tasks, L, H, P) float32."""
    from qkov.pipeline.store import RunStore

    arr = RunStore(store_path, storage_options).root()[schema.WORK][schema.TASK_SUMS][block]
    out = np.empty((arr.shape[1], arr.shape[0], *arr.shape[2:]), dtype=np.float32)
    for k in range(arr.shape[0]):  # one task at a time: at 8B a task's float64 sums are 32 GB
        out[:, k] = arr[k]
    return out


def _on_device(x, device) -> torch.Tensor:
    """x (numpy, any float dtype, or a tensor already placed) as float32 on `device`, converted on the host."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device)


class AnswersPass:
    """The scalars' share of one extraction task (`qkov.workers.writer`; answers and sketch
    mode): in the "fisher" phase each task's sums over this shard (its `_work` partials), in
    the "answers" (or "sketch") phase each sample's scalars against the consolidated sums (and, with sketch_dim, the interference's
    sketched operands u, v). Gradients arrive as the exact mode would store them: rounded to
    `storage_dtype`."""

    def __init__(self, task, heads: dict, sizes: dict, device: str, resident: tuple | None = None):
        n, L = len(task.input_ids), len(task.layers)
        self.task, self.summing = task, task.phase == "fisher"
        self.task_of = list(task.task_of)  # each row's task, on the host: the sums take runs of rows
        if self.summing:
            self._runs: tuple = (None, [])  # (batch start, its runs of rows) for `pass1`
            self.tsums = {b: torch.zeros((3, task.n_tasks, L, heads[b], sizes[b]), dtype=torch.float32, device=device)
                          for b in task.blocks}
            return
        if resident is None:  # consolidated by the client (a run of several shards)
            from .sketch import stored_inverse_fisher

            where = (task.store_path, task.storage_options)
            resident = ({b: stored_inverse_fisher(*where, b) for b in task.blocks},
                        {b: stored_task_sums(*where, b) for b in task.blocks})
        # float32 on the device (8B: 1/(Î+λ) 5.4 GB, two tasks' sums 32 GB), converted on the host
        self.inv = {b: _on_device(resident[0][b], device) for b in task.blocks}
        self.sums = {b: _on_device(resident[1][b], device) for b in task.blocks}
        self._weights: dict = {}  # (block, layer) -> scalar_weights, while the task's batches last
        self._scratches: dict = {}  # block -> the reused weights buffer (`_scratch`)
        self._cached = 0  # bytes of weights cached on the device
        self.device = torch.device(device)
        n_parts = len(schema.answer_parts(range(task.n_tasks)))
        # kept where they are formed and copied out once per task: a copy per (block, layer, batch)
        # synchronised the device 120 times a batch at SmolLM2 (8B: 128 MB per block, float64)
        self.scalars = {b: torch.zeros((L, heads[b], n, n_parts), dtype=torch.float64, device=device) for b in task.blocks}
        # answers mode, keep_pairs = "top": the interference's operands u, v sketched too (in the
        # task's ShardBuffers; sketch mode's own pass sketches all three)
        self.sketch_shapes = {schema.sketch_var(b, p): (L, heads[b], n, task.sketch_dim)
                              for b in task.blocks for p in ("u", "v")} if task.sketch_dim and task.phase == "answers" else {}

    def pass1(self, b: str, li: int, s: int, t: torch.Tensor, fisher: torch.Tensor | None, w: np.ndarray) -> torch.Tensor:
        """Pass 1 of one batch (rows s:s+B) of one block and layer with the Fisher's batch sums in
        the same read of t (`pass_kernels.pass1_update`): fisher (streams, H, P) float64 += w·Σ t²
        per stream, w (streams, B) the rows' Fisher weights (skipped samples' 0). Returns the
        device's non-finite flag for t."""
        self._set_runs(s, t.shape[0], w)
        return pass1_update(t, self._runs[1], self.tsums[b][:, :, li], fisher, self.task.storage_dtype != "float32")

    def fusable(self, bs, fisher_kept: bool):
        """The block's `FusedSlice` where this phase can reduce it straight from the activations
        (`fused`): pass 1 with the Fisher kept, or pass 2 with (where sketched) a dim that fits a
        tile; else None (the gradients are formed and sliced first)."""
        if self.summing and not fisher_kept:
            return None
        fs = fused_slice(bs)
        if fs is None:
            return None
        if not self.summing and self.sketch_shapes and sketch_tile(fs, self.task.sketch_dim) is None:
            return None
        return fs

    def fused(self, b: str, li: int, s: int, fs, acts, fisher, w: np.ndarray, put, projection) -> torch.Tensor | None:
        """One batch (rows s:s+B) of one block and layer reduced by the fused kernels from acts =
        (x, ∂ℓ/∂y) (`LazyPerSampleGrads.activations`): pass 1 (returns its non-finite flag, as
        `pass1`) or pass 2 (scalars and, where asked, the sketched u, v; returns None)."""
        x, go = acts
        rounding = self.task.storage_dtype != "float32"
        if self.summing:
            self._set_runs(s, x.shape[0], w)
            return fused_pass1(fs, x, go, self._runs[1], self.tsums[b][:, :, li], fisher, rounding)
        proj = projection(b, li) if self.sketch_shapes else None
        scalars, sketches = fused_pass2(fs, x, go, self.inv[b][li], self.sums[b][:, :, li], rounding, proj)
        self.scalars[b][li, :, s : s + x.shape[0]] = scalars.transpose(0, 1)
        for p, v in (sketches or {}).items():
            put(schema.sketch_var(b, p), li, s, v)
        return None

    def _set_runs(self, s: int, n: int, w: np.ndarray) -> None:
        if self._runs[0] != s:  # the batch's runs, the same for each of its (block, layer)s
            keys = [(k, tuple(col)) for k, col in zip(self.task_of[s : s + n], w.T.tolist())]
            self._runs = (s, [(r0, r1, k, c if any(c) else None) for (k, c), r0, r1 in row_runs(keys)])

    def consume(self, b: str, li: int, s: int, t: torch.Tensor, finite: torch.Tensor, put, projection) -> None:
        """One batch (rows s:s+B) of one block and layer: t (B, H, P) float32, finite (B,);
        `put(name, li, s, x)` stores sketches, `projection(b, li)` gives the layer's sketch."""
        rounding = self.task.storage_dtype != "float32"
        if not self.summing and use_kernels(t):  # t read once per output, rounded in the kernels
            x = pass2_scalars(t, self.inv[b][li], self.sums[b][:, :, li], rounding)
            self.scalars[b][li, :, s : s + t.shape[0]] = x.transpose(0, 1)
            self._sketch(b, li, s, t, rounding, put, projection)
            return
        if rounding:
            t = t.to(torch.bfloat16).float()
        if self.summing:  # (skipped samples' rows are zero: they add nothing)
            task_sums_update(self.tsums[b][:, :, li], t, row_runs(self.task_of[s : s + t.shape[0]]))
            return
        key = (b, li)
        wts = self._weights.get(key)
        if wts is None:  # formed once per shard where they fit (SmolLM2: 1 GB), else per batch in a reused buffer
            shape = (3 * self.task.n_tasks + 2, *self.inv[b].shape[1:])
            cache = self._cacheable(shape)
            wts = scalar_weights(self.inv[b][li], self.sums[b][:, :, li], None if cache else self._scratch(b, shape))
            if cache:
                wts = self._weights[key] = cached_columns(wts)
        x = sample_scalars(t, None, None, wts)
        self.scalars[b][li, :, s : s + t.shape[0]] = x.transpose(0, 1)
        self._sketch(b, li, s, t, False, put, projection)  # (t already rounded)

    def _sketch(self, b, li, s, t, rounding, put, projection) -> None:
        if self.sketch_shapes:  # u and v only: the alignment's answers come exactly from the scalars
            for p, x in sketch_parts(t, self.inv[b][li], projection(b, li), ("u", "v"), rounding).items():
                put(schema.sketch_var(b, p), li, s, x.float())

    def _cacheable(self, shape) -> bool:
        if self.device.type != "cuda":
            return True
        nbytes = 4 * math.prod(shape)
        if self._cached + nbytes > torch.cuda.mem_get_info()[0] // 4:
            return False
        self._cached += nbytes
        return True

    def _scratch(self, b: str, shape) -> torch.Tensor:
        """One weights buffer per block for the (block, layer)s not cached, rewritten per batch."""
        if b not in self._scratches:
            self._scratches[b] = weights_buffer(self.task.n_tasks, shape[1:], self.device)
        return self._scratches[b]

    def host_scalars(self) -> dict[str, np.ndarray]:
        """Pass 2: each block's (L, H, n, parts) float64 scalars, on the host (one copy per block)."""
        return {} if self.summing else {b: x.cpu().numpy() for b, x in self.scalars.items()}

    def partials(self) -> dict[str, np.ndarray]:
        """Pass 1: the shard's task sums by `_work` array name (float32)."""
        if not self.summing:
            return {}
        out = {}
        for b, x in self.tsums.items():
            for k in range(self.task.n_tasks):  # kind by kind: no device copy of a task's strided sums (8B: 16 GB)
                out[schema.task_sum_partial(b, k)] = np.stack([x[kind, k].cpu().numpy() for kind in range(x.shape[0])])
        return out
