"""The extraction task a worker runs: one shard of samples → whole store chunks.

A shard is a contiguous range of samples aligned to the store's sample chunks, so
the task writes whole chunks that no other task touches (concurrent partial
writes to one chunk/shard corrupt Zarr data). Order of writes: gradients, loss,
the shard's Fisher partial sum, and last the completed-shard record; a task
killed midway leaves no record, and rerunning it rewrites the same bytes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from qkov.pipeline import schema
from qkov.pipeline.codec import encode_torch, encoded_on_device
from qkov.pipeline.errors import NonFiniteGradientError  # noqa: F401  (raised by the extract stage; kept importable here)
from qkov.pipeline.spec import ModelSpec
from qkov.pipeline.store import RunStore
from qkov.pipeline.store.work import record_shard

from .answers import AnswersPass, row_runs
from .device import resolve_device, use_worker_threads, worker_name
from .grads import per_sample_backward
from .layouts import AttentionLayout, discover_layout
from .losses import loss_task_for, pad_batch
from .models import load_model, weights_hash
from .pass_kernels import fusion_on, pass1_update, sketch_parts, squares_sum, use_kernels
from .slicing import slice_block


@dataclass(frozen=True)
class ShardTask:
    """Everything one shard needs; small and picklable (token ids, not tensors)."""

    store_path: str
    storage_options: dict
    model: ModelSpec
    include_bias: bool
    layers: tuple[int, ...]
    blocks: tuple[str, ...]
    shard: int
    start: int  # first sample index in the store
    input_ids: tuple[tuple[int, ...], ...]
    sample_ids: tuple[str, ...]
    labels: tuple[int | tuple[bool, ...] | None, ...]  # class indices, or completion target masks
    # per Fisher stream (fisher.source = "pair" has one per task pair, else one), each sample's
    # weight: Σ_i w_i g_i² is this shard's contribution to that stream's Fisher
    fisher_weights: tuple[tuple[float, ...], ...]
    batch_size: int
    device: str  # auto | cpu | cuda
    nonfinite: str  # error | skip
    storage_dtype: str = "float32"
    # sketch mode (DESIGN §2) runs every shard twice: "fisher" writes only the Fisher partial
    # sum, "sketch" (after consolidation) only the sketched operands; "exact" does both at once
    phase: str = "exact"  # exact | fisher | sketch | answers
    sketch_dim: int = 0
    sketch_seed: int = 0
    # answers mode (score.mode = "answers"): each sample's task (store order of tasks); the
    # "fisher" pass then also sums each task's g, |g|, g², and the "answers" pass (after
    # consolidation) forms each sample's scalars against those sums
    task_of: tuple[int, ...] = ()
    n_tasks: int = 0
    # answers mode in one shard ("answers_whole": both passes in this task, the task sums kept
    # in memory between them, never written): the Fisher's damping (damping_rel, damping_abs)
    damping: tuple[float, float] = (0.0, 0.0)
    # the fused path (`qkov.workers.resident`): the gradients stay in this worker's memory for the
    # score tasks of the same process instead of being written
    resident: bool = False


@dataclass(frozen=True)
class ShardResult:
    shard: int
    weights_hash: str
    skipped: tuple[str, ...] = ()  # non-finite samples recorded and excluded (nonfinite = "skip")
    device: str = "cpu"
    worker: str = ""
    rejected: tuple[str, ...] = ()  # non-finite samples under nonfinite = "error": nothing was written
    # where the task's time went, (part, seconds): each pass's batches ("exact", "fisher",
    # "answers", "sketch"), answers_whole's consolidation between its passes ("between") and the
    # shard's writes ("write"); `run_extract` adds them up over shards (its "seconds")
    seconds: tuple[tuple[str, float], ...] = ()


# One model per worker process, reused by every shard the worker runs.
_CACHE: dict[Any, tuple[torch.nn.Module, AttentionLayout, str]] = {}
_CACHE_LOCK = threading.Lock()


def worker_model(spec: ModelSpec, include_bias: bool, device: str) -> tuple[torch.nn.Module, AttentionLayout, str]:
    key = (spec.model_dump_json(), include_bias, device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one model per worker: drop any other before loading
            # frozen once: each batch's per-sample backward then has no flags to set and restore
            model = load_model(spec, device=device).requires_grad_(False)
            layout = discover_layout(model, declared=spec.layout, include_bias=include_bias)
            _CACHE[key] = (model, layout, weights_hash(model))
        return _CACHE[key]


_PROJECTIONS = None  # this worker's sketch projections (qkov.workers.sketch.ProjectionCache), built on first use


def _projections():
    global _PROJECTIONS
    if _PROJECTIONS is None:
        from .sketch import ProjectionCache

        _PROJECTIONS = ProjectionCache()
    return _PROJECTIONS


def _layer_params(layout: AttentionLayout, blocks, layer: int) -> list[str]:
    """Parameters holding the given blocks of one layer, in model order (fused QKV: once)."""
    names = {p.param for b in blocks for p in layout.blocks[(b, layer)].parts}
    return [n for n in layout.param_names if n in names]


# The cached model is shared by the worker's threads, and per-sample gradients hook its
# modules: two tasks using it at once capture each other's activations (a shape error, or
# silently wrong gradients where the shapes agree). A worker with no GPU resource runs one
# device task per thread, so tasks take turns; each already uses all of the worker's threads.
_MODEL_IN_USE = threading.Lock()


def compute_shard(task: ShardTask, seconds: dict | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], list[str], str, str]:
    """One shard's compute (see `_compute_shard`), one task at a time per process; `seconds`,
    where given, gets each part's wall time (ShardResult.seconds)."""
    seconds = {} if seconds is None else seconds
    with _MODEL_IN_USE:
        return _answers_whole(task, seconds) if task.phase == "answers_whole" else _compute_shard(task, seconds=seconds)


def _answers_whole(task: ShardTask, seconds: dict):
    """Answers mode over every sample in one task: pass 1 (the Fisher partial and the task sums),
    λ and 1/(Î+λ) as the run's consolidation forms them from that one partial, then pass 2
    against the sums, which stay on the device between the passes. Nothing P-sized is written
    but the Fisher partial, which the client consolidates into `fisher` as for any run."""
    from dataclasses import replace

    from .fisher import damping, inverse_regularised

    sums: dict = {}
    _, _, partials, bad, _, _ = _compute_shard(replace(task, phase="fisher"), seconds=seconds, sums_out=sums)
    t0 = time.perf_counter()
    device = resolve_device(task.device)
    inv = {}
    for b in task.blocks:
        part = partials[schema.fisher_partial(b)]  # float32 (L, H, P)
        lam = damping(part, *task.damping)  # (its own float64 copy: the λ `consolidate_fisher` forms from one shard)
        # 1/(Î+λ) layer by layer on the device (8B: 1.3 G entries; numpy's float64 passes took ~5 s per 54 M on a 2-core host)
        inv[b] = torch.empty(part.shape, dtype=torch.float32, device=device)
        for li in range(part.shape[0]):
            inv[b][li] = inverse_regularised(torch.from_numpy(part[li]).to(device), float(lam[li]))
    if device != "cpu":
        torch.cuda.synchronize(device)
    seconds["between"] = time.perf_counter() - t0
    out = _compute_shard(replace(task, phase="answers"), resident=(inv, sums), seconds=seconds)
    return (out[0], out[1], partials, sorted(set(bad) | set(out[3]), key=task.sample_ids.index), *out[4:])


def _compute_shard(task: ShardTask, resident: tuple | None = None, seconds: dict | None = None,
                   sums_out: dict | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], list[str], str, str]:
    """Per-sample gradient slices (or their sketches), losses and the Fisher partial of one shard (no I/O).

    Each phase computes only what it writes: exact mode the gradients {B: (L, H, n, P)} (each
    store chunk one contiguous (n, P) block, written without a copy) and the Fisher partial;
    the sketch-mode Fisher pass only the Fisher partial (empty gradients); the sketch pass
    only the sketched operands {B_u|B_v|B_w: (L, H, n, k)} (empty Fisher).
    Per batch, per-sample gradients are formed one layer at a time and consumed on the
    device (sliced, squared into the Fisher, sketched) before the next layer's, so device
    memory holds one layer's (B, out, in) gradients, not the model's."""
    device = resolve_device(task.device)
    model, full_layout, whash = worker_model(task.model, task.include_bias, device)
    t0 = time.perf_counter()
    layout = full_layout.subset(layers=task.layers, blocks=task.blocks)
    loss_task = loss_task_for(model)
    n, L = len(task.input_ids), len(task.layers)
    heads = {b: layout.blocks[(b, task.layers[0])].n_heads for b in task.blocks}
    sizes = {b: layout.block_size(b) for b in task.blocks}
    keep_grads, sketching = task.phase == "exact", task.phase == "sketch"
    keep_fisher = task.phase in ("exact", "fisher")
    shapes = {b: (L, heads[b], n, sizes[b]) for b in task.blocks if keep_grads}
    answers = None
    if task.n_tasks > 0 and task.phase in ("fisher", "answers", "sketch"):  # each sample's scalars (answers, sketch mode)
        answers = AnswersPass(task, heads, sizes, device, resident)
        shapes = getattr(answers, "sketch_shapes", None) or shapes
    if sketching:
        from .sketch import PARTS, stored_inverse_fisher

        shapes = {schema.sketch_var(b, p): (L, heads[b], n, task.sketch_dim) for b in task.blocks for p in PARTS}
        # 1/Î_reg once per task, kept on the device for every batch (7B: 4.3 GB per block in float64)
        inv = answers.inv if answers is not None else {
            b: torch.as_tensor(stored_inverse_fisher(task.store_path, task.storage_options, b), device=device)
            for b in task.blocks}
    grads = ShardBuffers(shapes, task.storage_dtype, device, resident=task.resident and keep_grads)
    # float64 running sums over batches on the device (7B: 4.3 GB per block), so that the sum over
    # samples is as exact as the host's consolidation; copied out once, as float32, at the end of the task
    n_streams = len(task.fisher_weights)
    fisher = {b: torch.zeros((n_streams, L, heads[b], sizes[b]), dtype=torch.float64, device=device)
              for b in task.blocks if keep_fisher}
    losses = np.zeros(n, dtype=np.float32)
    bad: list[str] = []
    w_all = np.asarray(task.fisher_weights, dtype=np.float64).reshape(n_streams, n)
    for s in range(0, n, task.batch_size):
        e = min(n, s + task.batch_size)
        # built on the host: per_sample_backward checks it there and copies it without waiting for the device
        batch = pad_batch(list(task.input_ids[s:e]), list(task.labels[s:e]), "cpu")
        res = per_sample_backward(model, batch, layout.param_names, loss_task)
        # decided before any layer is consumed: a skipped sample enters no layer's Fisher sum
        finite = torch.isfinite(res.losses) & res.finite(layout.param_names)
        all_finite = bool(finite.all())  # (res.finite has synchronised already)
        ok = np.ones(e - s, dtype=bool) if all_finite else finite.cpu().numpy()
        # the Fisher's batch sums: per run of rows with the same stream weights (skipped samples
        # weigh 0), one Σ t² over the run's rows in float32 (a 2-norm: t read once, no t² copy),
        # added with its weight to float64 sums. Float64 einsums moved ~3x the bytes and were 40 %
        # of an 8B first pass; one-hot float32 GEMMs over a copy of t² still half of its reductions
        w = w_all[:, s:e] * ok
        all_runs = row_runs([tuple(col) for col in w.T])
        weight_runs = [(c, r0, r1) for c, r0, r1 in all_runs if any(c)]
        for r in np.flatnonzero(~ok).tolist():
            bad.append(task.sample_ids[s + r])
        losses[s:e] = res.losses.detach().float().cpu().numpy()
        # answers' passes fused with the gradients' formation where a block allows it: its
        # per-sample gradients are then formed tile by tile inside the kernels, never stored
        fusing = answers is not None and task.phase != "sketch" and all_finite and fusion_on(device)
        for li, layer in enumerate(task.layers):
            def projection(b, li, layer=layer):  # the (block, layer)'s sketch projection (the worker caches them)
                return _projections().get(sizes[b], task.sketch_dim, task.sketch_seed, b, layer, heads[b], 1, device)

            fused = {}
            for b in task.blocks if fusing else ():
                bs = layout.blocks[(b, layer)]
                fs = answers.fusable(bs, keep_fisher)
                acts = res.activations(bs.parts[0].param) if fs is not None else None
                if acts is not None:
                    fused[b] = (fs, acts)
            rest = [b for b in task.blocks if b not in fused]
            full = res.grads(_layer_params(layout, rest, layer)) if rest else {}
            for b in task.blocks:
                if b in fused:
                    flag = answers.fused(b, li, s, *fused[b], fisher[b][:, li] if keep_fisher else None, w, grads.put,
                                         projection)
                    if flag is not None:
                        grads.note_finite(flag == 0, f"block {b} layer {layer}")
                    continue
                t = slice_block(layout.blocks[(b, layer)], full).float()  # (B, H, P)
                if not all_finite:  # (a copy of the slice: only for a batch that needs it)
                    t = torch.where(finite[:, None, None], t, torch.zeros((), device=t.device))
                if answers is not None and answers.summing and keep_fisher and use_kernels(t):
                    # answers' first pass on the kernels: the Fisher, the task sums and the finite check in one read of t
                    grads.note_finite(answers.pass1(b, li, s, t, fisher[b][:, li], w) == 0, f"block {b} layer {layer}")
                    del t
                    continue
                if keep_grads and grads.on_device and use_kernels(t):
                    # exact mode on the kernels: the Fisher, the stored rows (bf16 rounded) and the finite check in one read
                    runs = [(r0, r1, None, c if any(c) else None) for c, r0, r1 in all_runs]
                    grads.note_finite(pass1_update(t, runs, None, fisher[b][:, li] if keep_fisher else None, False,
                                                   store=(grads.bufs[b], li, s)) == 0, f"block {b} layer {layer}")
                    del t
                    continue
                grads.check_finite(t, f"block {b} layer {layer}")
                if keep_fisher:
                    for c, r0, r1 in weight_runs:
                        sq = squares_sum(t[r0:r1])
                        for k in np.flatnonzero(c).tolist():
                            fisher[b][k, li].add_(sq, alpha=c[k])
                        del sq
                if keep_grads:
                    grads.put(b, li, s, t)
                if answers is not None:
                    answers.consume(b, li, s, t, finite, grads.put, projection)
                if sketching:
                    for p, x in sketch_parts(t, inv[b][li], projection(b, li), PARTS, False).items():
                        grads.put(schema.sketch_var(b, p), li, s, x.float())
                del t
            del full
        grads.flush()  # the batch's staged slices, in one copy
        del res
    partials = {schema.fisher_partial(b, k): f[k].float().cpu().numpy() for b, f in fisher.items() for k in range(n_streams)}
    if answers is not None and sums_out is not None and answers.summing:
        sums_out.update(answers.tsums)  # kept where they are, for a pass 2 in this task (answers_whole)
    elif answers is not None:
        partials.update(answers.partials())
    out = grads.held() if grads.resident else grads.to_host()
    if answers is not None and not answers.summing:
        out = {**answers.host_scalars(), **out}
    if seconds is not None:  # (the copies to the host above waited for the device)
        seconds[task.phase] = seconds.get(task.phase, 0.0) + time.perf_counter() - t0
    return out, losses, partials, bad, whash, device


class ShardBuffers:
    """A shard's gradient slices {name: (L, H, n, P)} in the store's representation, filled
    batch by batch. On a GPU they stay on the device until the shard is done, when one
    copy per array moves them into reused pinned host memory: no per-batch device→host
    copies and synchronisations stalling the next batch's backward pass, and no host-side
    transposes or zero-filled allocations. Where a shard's slices would take more than a
    quarter of the free device memory they go to the host per batch: staged on the device
    (`stage`, up to STAGE_BYTES) and copied in one transfer at the batch's end (`flush`), not
    one per (block, layer) (8B's sketches, 10.5 GB a shard: 128 synchronisations a batch)."""

    STAGE_BYTES = 256 << 20

    def __init__(self, shapes: dict[str, tuple[int, ...]], storage_dtype: str, device: str, resident: bool = False,
                 stage: bool | None = None):
        self.storage_dtype, self.resident = storage_dtype, resident
        self.stage = device != "cpu" if stage is None else stage  # (on a CPU there is no device to wait for)
        self._pending: list = []  # (name, layer, first sample, stored bits on the device), until `flush`
        self._pending_bytes = 0
        self.dtype = torch.bfloat16 if storage_dtype == "bfloat16" else torch.float32
        self.host_np = np.dtype(schema.stored_dtype(storage_dtype))
        size = sum(int(np.prod(v)) for v in shapes.values()) * self.host_np.itemsize
        # resident (the fused path): torch tensors where the task runs, on a CPU worker too
        self.on_device = resident or (device != "cpu" and torch.cuda.is_available() and size <= torch.cuda.mem_get_info()[0] // 4)
        self.bufs = {k: (torch.empty(v, dtype=self.dtype, device=device) if self.on_device
                         else np.zeros(v, dtype=self.host_np)) for k, v in shapes.items()}
        self._finite: list = []  # on a GPU: (all-finite flag on the device, where)

    def check_finite(self, t: torch.Tensor, where: str) -> None:
        """Non-finite values in samples judged finite are a bug; on a GPU the check is kept
        on the device and read once per shard (no synchronisation per slice)."""
        if self.on_device:
            self._finite.append((torch.isfinite(t).all(), where))
        elif not bool(torch.isfinite(t).all()):
            raise RuntimeError(f"non-finite gradients in {where} for samples judged finite")

    def note_finite(self, ok: torch.Tensor, where: str) -> None:
        """`check_finite` with the device's all-finite flag formed elsewhere (a pass kernel's)."""
        self._finite.append((ok, where))

    def put(self, name: str, li: int, start: int, t: torch.Tensor) -> None:
        """Store the batch's (B, H, P) float32 slice at layer li, samples start:start+B."""
        if self.on_device:  # bf16 rounded on the device (round-to-nearest-even, as on CPU)
            self.bufs[name][li, :, start : start + t.shape[0]] = t.to(self.dtype).transpose(0, 1)
        elif self.stage:
            bits = encoded_on_device(t, self.storage_dtype)  # the stored representation, where t is
            if bits is t:  # (float32: a copy of its own, not a view keeping a layer's gradients alive)
                bits = t.clone()
            self._pending.append((name, li, start, bits))
            self._pending_bytes += bits.numel() * bits.element_size()
            if self._pending_bytes > self.STAGE_BYTES:
                self.flush()
        else:
            self.bufs[name][li, :, start : start + t.shape[0]] = to_stored(t, self.storage_dtype).swapaxes(0, 1)

    def flush(self) -> None:
        """The staged slices to the host in one copy (one synchronisation)."""
        if not self._pending:
            return
        flat = torch.cat([bits.reshape(-1) for *_, bits in self._pending])
        host = flat.cpu().numpy().view(self.host_np)
        off = 0
        for name, li, start, bits in self._pending:
            n = bits.numel()
            self.bufs[name][li, :, start : start + bits.shape[0]] = host[off : off + n].reshape(bits.shape).swapaxes(0, 1)
            off += n
        self._pending, self._pending_bytes = [], 0

    def _checked(self) -> None:
        self.flush()
        if self._finite and not bool(torch.stack([ok for ok, _ in self._finite]).all()):  # one synchronisation
            where = next(w for ok, w in self._finite if not bool(ok))
            raise RuntimeError(f"non-finite gradients in {where} for samples judged finite")

    def held(self) -> dict[str, torch.Tensor]:
        """The fused path: the slices where they were formed, (L, H, n, P) in the stored dtype."""
        self._checked()
        bufs, self.bufs = self.bufs, {}
        return bufs

    def to_host(self) -> dict[str, np.ndarray]:
        self._checked()
        if not self.on_device:
            return self.bufs
        out = {}
        for k, d in self.bufs.items():
            h = _pinned(k, d.shape, self.dtype)
            h.copy_(d, non_blocking=True)
            out[k] = h
        torch.cuda.current_stream().synchronize()
        self.bufs = {}
        return {k: (h.view(torch.int16) if self.dtype == torch.bfloat16 else h).numpy().view(self.host_np)
                for k, h in out.items()}


# Pinned host buffers for the shards' gradients, reused by every shard of a worker. Two sets,
# used in turn: extract_shards holds at most two computed shards (one written, one computing).
_PINNED: dict = {}
_PINNED_TURN: dict = {}


def _pinned(name: str, shape: tuple[int, ...], dtype) -> torch.Tensor:
    turn = _PINNED_TURN[name] = 1 - _PINNED_TURN.get(name, 1)
    key = (name, turn)
    have = _PINNED.get(key)
    if have is None or have.dtype != dtype or have.numel() < int(np.prod(shape)):
        have = _PINNED[key] = torch.empty(int(np.prod(shape)), dtype=dtype, pin_memory=True)
    return have[: int(np.prod(shape))].view(shape)


def to_stored(t: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """A float32 tensor in the store's representation, on the host. bf16 is rounded where t
    lives (the one codec, `qkov.pipeline.codec.encode_torch`), so only half the bytes cross
    to the host and the host does no conversion pass."""
    return encode_torch(t, storage_dtype)


def extract_shards(tasks: tuple[ShardTask, ...]) -> list[ShardResult]:
    """Several consecutive shards on this worker, overlapping device compute with Zarr writes:
    while shard k is written by a writer thread, the device computes shard k+1. At most two
    computed shards are held in host memory (the next compute waits for the write before
    last). Each shard's done-record is written after its chunks, so a worker killed mid-group
    loses only unfinished shards; a retried group rewrites finished ones with the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    use_worker_threads()
    out = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkov-writer") as pool:
        pending = None
        for task in tasks:
            seconds: dict = {}
            computed = compute_shard(task, seconds)
            if pending is not None:
                out.append(pending.result())  # raises the writer's error, if any
            pending = pool.submit(write_shard, task, computed, seconds)
        if pending is not None:
            out.append(pending.result())
    return out


def write_shard(task: ShardTask, computed, seconds: dict | None = None) -> ShardResult:
    """Write one computed shard (compute_shard's output) into its whole chunks.

    Non-finite samples under nonfinite = "error" are returned, not raised: the error is
    deterministic, so retrying the task elsewhere would only repeat it, and the driver
    can then name every offending sample of the run at once.
    """
    grads, losses, fisher, bad, whash, device = computed
    t0 = time.perf_counter()
    if bad and task.nonfinite == "error":
        return ShardResult(task.shard, whash, (), device, worker_name(), rejected=tuple(bad))
    store = RunStore(task.store_path, task.storage_options)
    root = store.root("r+")
    stop = task.start + len(task.input_ids)
    # every chunk is written, even an all-zero one (an ablated head, a shard of skipped samples):
    # zarr would otherwise leave it out, and the score stage's intactness gate treats an absent
    # chunk of a completed shard as lost
    g = root[schema.GRADIENTS]
    direct = store.direct_chunks(schema.GRADIENTS)
    if task.resident and grads:  # the fused path: held for this process's score tasks, not written
        from .resident import deposit

        deposit(task.store_path, task.start, grads)
        grads = {}
    with zarr.config.set({"array.write_empty_chunks": True}):
        for b, arr in grads.items():  # (L, H, n, P), already in the stored representation (to_stored)
            # each (layer, head) chunk is a contiguous (n, P) block of arr: DirectChunks writes it without a copy
            (direct.get(b) or g[b])[task.start : stop] = arr.transpose(2, 0, 1, 3)
    g[schema.LOSS][task.start : stop] = losses
    rejected = set(bad)
    ok = np.array([sid not in rejected for sid in task.sample_ids])
    g[schema.FINITE][task.start : stop] = ok
    record_shard(root, task.shard, fisher, "fisher" if task.phase == "answers_whole" else task.phase)
    if task.phase == "answers_whole":  # both passes done: the fisher record above, then this one
        record_shard(root, task.shard, {}, "answers")
    spent = {**(seconds or {}), "write": time.perf_counter() - t0}
    return ShardResult(task.shard, whash, tuple(bad), device, worker_name(), seconds=tuple(spent.items()))
