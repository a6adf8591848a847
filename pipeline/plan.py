"""`qkov plan`: what a job will write and hold, before anything runs.

From the job and the model's config alone (no weights read, no gradients computed): the
bytes each store group will take, the peak disk use of the run, peak host and GPU memory
per task, task counts, and whether the output's free space holds it. `qkov run` prints
the same lines first and refuses a run that cannot fit, naming the settings that would.

Byte figures are exact sums of what the stages write (chunk payloads, a 4-byte crc32c per
chunk, ~1 KB of metadata per array); memory figures are estimates of the largest
allocations (operands and outputs; activations from the model's width), stated as such.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import schema
from .errors import UsageError
from .spec import JobSpec
from .store import RunStore
from .tiling import auto_sample_chunk, heads_per_task, sketched_heads_per_task

META_BYTES = 1024  # zarr.json of one array (measured: 0.6–1.5 KB)
CRC_BYTES = 4  # crc32c per chunk (store.checksummed)
BLOSC_HEADER = 16  # blosc's most per chunk beyond the raw bytes (the pooled scores' chunks)
ARRAY_RECORD_BYTES = 360  # a group's record of one array in its zarr.json (schema.ATTR_ARRAYS: dtype, shape, chunks, codecs)
ZSTD_F32 = 0.93  # zstd on float32 sums of squares (Fisher, its partials): measured 0.92-0.94


@dataclass
class RunPlan:
    """Predicted sizes and counts of one job (see the module docstring)."""

    n_a: int
    n_b: int
    layers: tuple[int, ...]
    blocks: tuple[str, ...]
    heads: dict[str, int]  # block -> heads stored (K/V: KV heads)
    sizes: dict[str, int]  # block -> entries per head slice
    groups: dict[str, int]  # store group -> bytes when the run is complete
    peak_disk: int  # the most the output holds at any time
    layer_groups: int  # extract → score → drop rounds (keep_gradients = false), else 1
    memory: dict[str, int]  # "extract_gpu", "extract_host", "score_task", "stats_task" -> bytes (estimates)
    tasks: dict[str, int]  # stage -> number of tasks
    free: int | None  # bytes the run may still add: free space at the output, within [output] disk_budget; None: unknown
    existing: int = 0  # bytes already in the output (a resumed run)
    options: list[str] = field(default_factory=list)  # settings that would make a run fit, when it does not
    task_sizes: tuple[int, ...] = ()  # samples per task (more than two: every pair is scored on its own)
    # keep_gradients = false: where each layer group's gradients wait for its scores ("device": the
    # fused path, "disk": a sub-run), and why (`hold_on_device`); "" where every gradient is kept
    gradients_in: str = ""
    gradients_in_why: str = ""

    @property
    def total(self) -> int:
        return sum(self.groups.values())

    @property
    def fits(self) -> bool | None:
        return None if self.free is None else self.peak_disk - self.existing <= self.free

    def lines(self) -> list[str]:
        """The plan as the lines `qkov plan` and `qkov run` print."""
        sizes = self.task_sizes or (self.n_a, self.n_b)
        out = [f"plan: {' + '.join(map(str, sizes))} samples, {len(self.layers)} layers, blocks {''.join(self.blocks)}"]
        if len(sizes) > 2:  # each pair's pooled (n_x + n_y)² matrices per slice: growth with the task count
            pairs = [(sizes[i], sizes[j]) for i in range(len(sizes)) for j in range(i + 1, len(sizes))]
            out.append(f"  {len(sizes)} tasks: {len(pairs)} task pairs scored one by one, Σ (n_x + n_y)² = "
                       f"{sum((x + y) ** 2 for x, y in pairs):,} sample pairs per slice (one {sum(sizes)}² matrix would be "
                       f"{sum(sizes) ** 2:,}); scores, stats and diagnostics below are summed over the pairs")
        # the pooled scores are compressed losslessly, by how much depends on the values: their
        # figure is the bound (real scores store ~0.8x of it), and so is the total
        out.append("  store (bytes when complete): " + ", ".join(
            f"{g} {'≤ ' if g == schema.SCORES_GROUP else ''}{_size(b)}" for g, b in self.groups.items() if b)
                   + f"; total ≤ {_size(self.total)} (≤: pair scores counted before their lossless compression; real ones store ~0.8x)")
        rounds = f" (layer groups of {math.ceil(len(self.layers) / self.layer_groups)}: {self.layer_groups} rounds)" if self.layer_groups > 1 else ""
        out.append(f"  peak disk use {_size(self.peak_disk)}{rounds}")
        if self.gradients_in:
            where = "the extraction worker's memory (fused: none on disk)" if self.gradients_in == "device" else "disk"
            out.append(f"  each layer group's gradients wait for its scores in {where}: {self.gradients_in_why}")
        m = self.memory
        out.append(f"  peak memory per task (estimates): extract {_size(m['extract_gpu'])} on the device + "
                   f"{_size(m['extract_host'])} host; score {_size(m['score_task'])}; stats {_size(m['stats_task'])}")
        out.append("  tasks: " + ", ".join(f"{k} {v}" for k, v in self.tasks.items()))
        if self.free is None:
            out.append("  free space at the output: unknown (object store); not checked")
        else:
            need = self.peak_disk - self.existing
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"  free space at the output {_size(self.free)}, needed {_size(need)}"
                       + (f" (+{_size(self.existing)} already there)" if self.existing else "") + f": {verdict}")
        return out


def _size(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} TB"


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _geometry(job: JobSpec, ex=None):
    """(ExtractPlan, parameter count, hidden size, number of layers, vocabulary size) without reading weights."""
    from .extract import meta_model, plan_extract

    ex = ex or plan_extract(job)
    config, model = meta_model(job)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model", 1024)
    depth = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or len(ex.layers)
    vocab = getattr(text, "vocab_size", None) or 0
    return ex, _n_params(model), int(d), int(depth), int(vocab)


@dataclass(frozen=True)
class _Shape:
    """What the sizes are computed from: the extraction plan and the job's storage choices."""

    ex: object  # the ExtractPlan
    n: int  # samples stored
    L: int  # layers
    width: dict  # block -> stored last-axis length (sketch_dim in sketch mode)
    parts: int  # stored arrays per block (3 in sketch mode: u, v, w)
    g_item: int  # bytes per stored gradient value
    c: int  # the score stage's sample chunk
    scored: int  # samples one score stage pools (a task pair's: all of them with two tasks)

    @property
    def sketch(self) -> bool:
        return self.parts > 1

    @property
    def block_heads(self) -> int:
        return sum(self.ex.heads[b] for b in self.ex.blocks)

    @property
    def layer_sample(self) -> int:
        """Per-sample bytes of one layer's stored gradients (all blocks, heads)."""
        return sum(self.parts * self.ex.heads[b] * self.width[b] * self.g_item for b in self.ex.blocks)


def plan_job(job: JobSpec, *, resume: bool = False, geometry=None, device=None) -> RunPlan:
    """The job's RunPlan (see the module docstring). `geometry` reuses `_geometry(job)`.
    `resume` (or an --overwrite of an existing run): the bytes already at the output count
    as available, since they are either part of the result or about to be removed.
    `device`: (free bytes, name) of the memory the fused path would hold gradients in, as
    measured (`measure_device`; the run measures on its worker), or None: not measured."""
    ex, n_params, d, depth, vocab = geometry or _geometry(job)
    store = RunStore.of(job)
    existing = store.size_bytes() if resume else 0
    free = store.free_bytes()
    if job.output.disk_budget is not None:  # the run may hold at most the budget, whatever is free
        left = max(0, job.output.disk_budget - existing)
        free = left if free is None else min(free, left)
    s = job.score
    n = ex.n
    sketch = s.mode == "sketch"
    g_item = 2 if s.storage_dtype == "bfloat16" and not sketch else 4
    width = {b: (s.sketch_dim if sketch else ex.sizes[b]) for b in ex.blocks}

    def shape(n_scored: int) -> _Shape:  # the score stage's chunk is chosen per scored sample count
        c = min(n_scored, auto_sample_chunk(n_scored, max(width.values()), 4 if sketch else g_item,
                                            direct=not sketch and store.local is not None))
        return _Shape(ex, n, len(ex.layers), width, 3 if sketch else 1, g_item, c, n_scored)

    pairs = ex.pair_sizes()
    shapes = [(shape(x + y), x, y) for x, y in pairs]
    groups, work = _group_bytes(job, shapes, len(ex.fisher_streams))
    memory, tasks = _memory_and_tasks(job, shapes, n_params, d, depth, vocab)
    held, why = hold_on_device(job, shapes[0][0], memory, device)
    rounds, peak = _peak_disk(job, shapes[0][0], groups, work, free, held)
    return RunPlan(n_a=ex.n_a, n_b=ex.n_b, layers=ex.layers, blocks=ex.blocks, heads=dict(ex.heads), sizes=dict(ex.sizes),
                   groups=groups, peak_disk=peak, layer_groups=rounds, memory=memory, tasks=tasks,
                   free=free, existing=existing, task_sizes=tuple(ex.task_sizes),
                   gradients_in="" if job.output.keep_gradients else ("device" if held else "disk"), gradients_in_why=why)


def _group_bytes(job: JobSpec, shapes: list, streams: int = 1) -> tuple[dict[str, int], int]:
    """Bytes of each store group of the complete run (the pair groups summed over the task pairs:
    `shapes` holds (shape, n_a, n_b) per pair), and of `_work` (the Fisher partials and records)."""
    sh = shapes[0][0]
    ex, n, L = sh.ex, sh.n, sh.L
    shards = len(ex.shards)
    slices = sum(sh.parts * ex.heads[b] for b in ex.blocks)  # arrays' chunks per (shard, layer)
    n_arrays = sh.parts * len(ex.blocks)
    coords = n * 16  # ids, task, n_tokens, loss, finite, text preview (compressed)
    groups: dict[str, int] = {}
    # edge chunks are stored whole: a partial last shard takes a full shard's bytes
    groups[schema.GRADIENTS] = shards * ex.shard_size * L * sh.layer_sample + shards * L * slices * CRC_BYTES \
        + (n_arrays + 10) * META_BYTES + coords
    fisher_vals = sum(L * ex.heads[b] * ex.sizes[b] for b in ex.blocks)
    # Fisher and its per-shard partial sums are float32 under Zarr's default zstd: ~7 % smaller (measured)
    # fisher.source = "pair": one Fisher (and one set of partials) per task pair
    groups[schema.FISHER] = streams * (int(fisher_vals * 4 * ZSTD_F32) + len(ex.blocks) * (L * CRC_BYTES + META_BYTES) + 4 * META_BYTES)
    work = streams * (int(shards * fisher_vals * 4 * ZSTD_F32) + len(ex.blocks) * (shards * L * CRC_BYTES + META_BYTES)) \
        + (2 + sh.sketch) * (shards * 5 + META_BYTES)
    groups[schema.SCORES_GROUP] = sum(_scores_bytes(job, p, x, y) for p, x, y in shapes)
    n_tasks = len(ex.task_sizes)
    head_slices = sum(ex.heads[b] for b in ex.blocks)
    sums = n_tasks * len(schema.TASK_SUM_KINDS) * fisher_vals  # each task's Σg, Σ|g|, Σg²: per shard (float32), then float64
    scalars = shards * ex.shard_size * L * head_slices * len(schema.answer_parts(range(n_tasks))) * 8 \
        + shards * len(ex.blocks) * CRC_BYTES + len(ex.blocks) * META_BYTES  # each sample's scalars, float64
    if job.score.mode == "sketch":  # the sketches, each sample's scalars beside them, and the task sums while it runs
        groups[schema.GRADIENTS] += scalars
        work += int(shards * sums * 4 * ZSTD_F32) + sums * 8 + 2 * len(ex.blocks) * n_tasks * META_BYTES
        groups[schema.SCORES_GROUP] += sum(2 * L * p.block_heads * p.scored * len(schema.MOMENTS) * 8 for p, _, _ in shapes)
    if job.score.mode == "answers":  # per sample and slice a few float64 scalars; P-sized arrays only while it runs
        groups[schema.GRADIENTS] = scalars + 11 * META_BYTES + coords
        if job.score.keep_pairs == "top":  # the interference's sketched operands u, v
            groups[schema.GRADIENTS] += 2 * shards * L * head_slices * (ex.shard_size * job.score.sketch_dim * sh.g_item
                                                                         + CRC_BYTES)
        temporary = int(groups[schema.FISHER])  # the Fisher's values: dropped once the scalars are made
        groups[schema.FISHER] = len(ex.blocks) * L * 8 + 6 * META_BYTES
        if shards > 1:  # one shard keeps its task sums in memory between its passes
            work += int(shards * sums * 4 * ZSTD_F32) + sums * 8 + 2 * len(ex.blocks) * n_tasks * META_BYTES
        work += temporary
        groups[schema.SCORES_GROUP] = sum(2 * L * p.block_heads * p.scored * len(schema.MOMENTS) * 8
                                          + (2 * len(ex.blocks) + 8) * META_BYTES + 3 * p.scored * 16 for p, _, _ in shapes)
        if job.score.keep_pairs == "top":  # the sketched interference's sums and top pairs
            groups[schema.SCORES_GROUP] += sum(_scores_bytes(job, p, x, y) // 2 for p, x, y in shapes)
    # ~42 small variables per (score, block, layer, head), compressed; their zarr.json carry the
    # variables' question/units/direction (~1.25 KB each) and the group's record of each array
    groups[schema.STATS] = len(shapes) * (2 * len(ex.blocks) * L * ex.n_heads * 160 + 42 * (1250 + ARRAY_RECORD_BYTES))
    # per (block, layer, block head, sample) diagnostics beside the scores (layer-grouped runs too)
    groups[schema.DIAGNOSTICS] = sum(L * sh.block_heads * p.scored * 20 + 24 * META_BYTES for p, _, _ in shapes)
    # the root's zarr.json carries a consolidated copy of every node's metadata (~1.35x its size)
    nodes = (n_arrays + 10) + (len(ex.blocks) + 4) + (2 * len(ex.blocks) + 8) + 40 + 24 + (len(ex.blocks) + 3)
    groups["root"] = int(1.35 * nodes * META_BYTES)
    return groups, work


def _scores_bytes(job: JobSpec, sh: _Shape, n_a: int, n_b: int) -> int:
    """Bytes of one `scores` group: the pooled matrices (keep_pairs = "all"), else the statistics' sums and top pairs."""
    ex, n, L, s = sh.ex, sh.scored, sh.L, job.score
    blocks = len(ex.blocks)
    sums_width = schema.stat_sums_width(job.stats.n_permutations, job.stats.n_bootstrap, n)
    if s.keep_pairs != "all":  # per slice and score: the statistics' sums (float64) and the top pairs
        top = 12 * min(s.top_k, n_a * n_b) if s.keep_pairs == "top" else 0
        return 2 * L * sh.block_heads * (sums_width * 8 + top + (4 if top else 1) * CRC_BYTES) \
            + (8 * blocks + 8) * META_BYTES + 3 * n * 16
    s_item = 2 if s.scores_dtype == "bfloat16" else 4
    t = math.ceil(n / sh.c)
    # pooled interference in (c, c) tiles and the folded alignment (schema.fold_symmetric), each
    # chunk compressed by blosc: at most its bytes + a 16-byte header (real scores: ~0.8x, not counted)
    rows, cols = schema.folded_shape(n)
    fr, fc = (rows, cols) if sh.c >= n else (sh.c, min(sh.c, cols))
    folds = math.ceil(rows / fr) * math.ceil(cols / fc)
    out = L * sh.block_heads * (t * t * (sh.c * sh.c * s_item + CRC_BYTES + BLOSC_HEADER)
                                + folds * (fr * fc * s_item + CRC_BYTES + BLOSC_HEADER)) \
        + (2 * blocks + 8) * META_BYTES + 3 * n * 16
    if s.scores_dtype == "float32":
        # the statistics' sums reduced beside the matrices (qkov.pipeline.score.compact_scores)
        out += 2 * L * sh.block_heads * (sums_width * 8 + CRC_BYTES) + 2 * blocks * META_BYTES
    return out


def _peak_disk(job: JobSpec, sh: _Shape, groups: dict[str, int], work: int, free: int | None,
               held: int | None = None) -> tuple[int, int]:
    """(layer groups, peak bytes at the output); sets the `gradients` and `_work` figures of `groups`.
    Score, stats and later groups never need the gradients: with keep_gradients = false each
    layer group's gradients go once its scores are written, and the run proceeds group by group;
    on the fused path (`held` layers per group) they are never written, only the group's Fisher."""
    if job.output.keep_gradients:
        groups[schema.WORK] = work if job.output.keep_work else 0  # else removed on success
        return 1, sum(groups.values()) + (0 if job.output.keep_work else work)
    # pipeline/layer_groups.py: one group's gradients and Fisher partials at a time, beside the results
    per_layer = max(1, (groups[schema.GRADIENTS] + work) // sh.L)
    groups[schema.GRADIENTS] = sh.n * 16 + 10 * META_BYTES  # its coordinates stay
    groups[schema.WORK] = 0  # removed on success
    if held:
        return math.ceil(sh.L / held), sum(groups.values()) + held * max(1, work // sh.L)
    per = layers_per_group(job, sh.L, per_layer, free, sum(groups.values()))
    return math.ceil(sh.L / per), sum(groups.values()) + per * per_layer


def _memory_and_tasks(job: JobSpec, shapes: list, n_params: int, d: int, depth: int,
                      vocab: int = 0) -> tuple[dict[str, int], dict[str, int]]:
    """Peak memory per task (estimates) and task counts per stage. Extraction holds the weights, a
    batch's per-sample gradients of the chosen slices (float32) and the activations; its writer
    holds two shards; a score task its operands."""
    sh = shapes[0][0]
    ex, L = sh.ex, sh.L
    bsz = job.extract.batch_size
    w_item = 2 if job.model.dtype in ("bfloat16", "float16") else 4
    T = max((len(x) for x in ex.input_ids), default=1)
    per_sample_f32 = sum(L * ex.heads[b] * ex.sizes[b] * 4 for b in ex.blocks)
    acts = bsz * T * d * 24 * depth * w_item  # ~24 d-wide activations per token and layer kept for backward
    # the logits, in the model's dtype and as the loss's float32 copy, log-probabilities and gradient:
    # SmolLM2 at batch 64 holds ~10 GB of them; left out, the fused plan held 15 layers, not 10, and ran out
    acts += bsz * T * vocab * (w_item + 3 * 4)
    # a batch's per-sample gradients are formed one layer at a time (qkov.workers.writer): that
    # layer's (B, out, in) gradients and their slices, not every layer's (8B: 1.3 GB, not 21 GB)
    per_layer_f32 = per_sample_f32 // max(1, L)
    memory = {
        "extract_gpu": n_params * w_item + 2 * bsz * per_layer_f32 + acts,
        "extract_host": 2 * ex.shard_size * L * sh.layer_sample + n_params * w_item,
        "score_task": 0,
        "stats_task": 0,
    }
    if job.score.mode == "answers":  # no gradient shard: each task's float32 sums of g, |g|, g² and the Fisher's
        p_vals = per_sample_f32 // 4  # two arrays (its sum, then 1/(Î+λ)), on the device and their copies on the host
        sums = (3 * len(ex.task_sizes) + 2) * p_vals * 4
        # + pass 2's weight rows of one (block, layer), formed per batch where not cached (qkov.workers.answers)
        memory["extract_gpu"] += sums + (3 * len(ex.task_sizes) + 2) * per_layer_f32
        memory["extract_host"] = n_params * w_item + sums
    item = 4 if sh.sketch else sh.g_item
    score_tasks = stats_tasks = 0
    k, nb = job.stats.n_permutations, job.stats.n_bootstrap
    for p, _, _ in shapes:  # each task pair's score graph in turn
        c = p.c
        t = math.ceil(p.scored / c)
        for b in ex.blocks:
            if job.score.mode == "answers":  # no pair scores: with the interference sketched, a task per head group
                if job.score.keep_pairs == "top":  # its u·vᵀ (float32), the sums' float64 copy, u and v
                    hc, n_s = sketched_heads_per_task(ex.heads[b], p.scored), p.scored
                    memory["score_task"] = max(memory["score_task"], hc * n_s * (12 * n_s + 8 * job.score.sketch_dim))
                    score_tasks += L * math.ceil(ex.heads[b] / hc)
                continue
            hc = heads_per_task(ex.heads[b], c, sh.width[b], item)
            operands = 2 * hc * c * sh.width[b] * item * sh.parts
            formed = 3 * c * sh.width[b] * 4  # one head's w, w², |g| (float32)
            out = 2 * hc * c * c * 4
            memory["score_task"] = max(memory["score_task"], operands + formed + out)
            score_tasks += L * math.ceil(ex.heads[b] / hc) * t * t
        memory["stats_task"] = max(memory["stats_task"], c * c * 8 + (k + nb + 2) * c * 8 * 2)
        stats_tasks += 2 * sh.block_heads * L * t * t  # the family: one test per block head
    shards = len(ex.shards)
    tasks = {
        "extract": math.ceil(shards / 4) if shards >= 8 else shards,
        "score": score_tasks,
        "stats": stats_tasks,
    }
    return memory, tasks


DEVICE_HEADROOM = 0.9  # of the measured free device memory: the allocator's fragmentation and the CUDA context


def hold_on_device(job: JobSpec, sh: _Shape, memory: dict[str, int], device) -> tuple[int | None, str]:
    """The fused path's layers per group (None: the disk path) and why. A group's gradients are
    held in the stored dtype beside the model, a batch's extraction and a score task's operands
    (`memory`'s estimates), in DEVICE_HEADROOM of the free memory measured on the device
    (`device` = (free bytes, name)); `[output] layers_per_group` caps it."""
    if job.output.keep_gradients:
        return None, ""
    if job.output.gradients_in == "disk":
        return None, "[output] gradients_in = \"disk\""
    per_layer = sh.n * sh.layer_sample
    want = job.output.layers_per_group or sh.L
    if device is None:
        if job.output.gradients_in == "device":
            return min(sh.L, want), (f"[output] gradients_in = \"device\": {_size(per_layer)} per layer, held where the "
                                     "extraction runs (its memory not measured here)")
        return None, "no GPU measured here to hold them (gradients_in = \"auto\")"
    free, name = device
    room = int(DEVICE_HEADROOM * free) - memory["extract_gpu"] - 2 * memory["score_task"]
    per = min(want, sh.L, max(0, room // per_layer))
    if per < 1 and job.output.gradients_in == "auto":
        return None, (f"one layer's gradients ({_size(per_layer)}) do not fit the {_size(free)} free on {name} beside "
                      f"the model, a batch and a score task ({_size(memory['extract_gpu'] + 2 * memory['score_task'])})")
    return max(1, per), (f"{_size(per_layer)} per layer; {_size(free)} free on {name} holds {max(1, per)} of "
                         f"{sh.L} layers beside the model, a batch and a score task")


def measure_device(job: JobSpec):
    """(free bytes, name) of the GPU this process sees, where the job may use one; else None.
    `qkov plan` measures here; the run measures again on its worker, which decides."""
    if job.output.keep_gradients or job.score.mode != "exact" or job.extract.device == "cpu" \
            or job.output.gradients_in == "disk":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info()[0]), torch.cuda.get_device_name()
    except (ImportError, RuntimeError):
        return None


def layers_per_group(job: JobSpec, n_layers: int, per_layer: int, free: int | None, results: int) -> int:
    """Layers per group of a keep_gradients = false run: `[output] layers_per_group`, else as
    many as fit (90 %) of the free space left beside the results, at least one."""
    if job.output.layers_per_group:
        return min(n_layers, job.output.layers_per_group)
    if free is None:
        return n_layers
    return int(min(n_layers, max(1, (0.9 * free - results) // per_layer)))


def _with(job: JobSpec, **sections) -> JobSpec:
    """The job with some section fields changed (validated as a job file would be)."""
    cfg = job.model_dump(mode="json")
    for sec, kv in sections.items():
        cfg[sec] = {**cfg.get(sec, {}), **kv}
    return JobSpec.model_validate(cfg)


def fitting_options(job: JobSpec, plan: RunPlan, geometry, resume: bool = False) -> list[str]:
    """Settings (one change at a time, then together) under which the run fits the free space."""
    if plan.free is None or plan.fits:
        return []
    tries: list[tuple[str, dict]] = []
    if job.output.keep_gradients:
        tries.append(("[output] keep_gradients = false", {"output": {"keep_gradients": False}}))
    if job.score.scores_dtype != "bfloat16":
        tries.append(('[score] scores_dtype = "bfloat16"', {"score": {"scores_dtype": "bfloat16"}}))
    if job.score.storage_dtype != "bfloat16" and job.score.mode == "exact":
        tries.append(('[score] storage_dtype = "bfloat16"', {"score": {"storage_dtype": "bfloat16"}}))
    if job.score.mode == "exact":
        tries.append(('[score] mode = "sketch", sketch_dim = 1024', {"score": {"mode": "sketch", "sketch_dim": 1024}}))
    if job.score.keep_pairs == "all":  # the pooled N x N matrices grow as the square of the samples
        tries.append(('[score] keep_pairs = "top"', {"score": {"keep_pairs": "top"}}))
    out = []
    combined: dict = {}
    for label, change in tries:
        for sec, kv in change.items():
            combined.setdefault(sec, {}).update(kv)
        try:
            p = plan_job(_with(job, **change), geometry=geometry, resume=resume)
        except Exception:  # noqa: BLE001 - an option this job cannot take is simply not offered
            continue
        if p.fits:
            out.append(f"{label} (peak {_size(p.peak_disk)})")
    if not out and len(tries) > 1:
        try:
            p = plan_job(_with(job, **combined), geometry=geometry, resume=resume)
            if p.fits:
                out.append(" + ".join(label for label, _ in tries) + f" (peak {_size(p.peak_disk)})")
        except Exception:  # noqa: BLE001
            pass
    # fewer layers, with the settings as they are
    L = len(plan.layers)
    per_layer = max(1, plan.peak_disk // L)
    most = int((plan.free + plan.existing) // per_layer)
    if 0 < most < L:
        out.append(f"[score] layers = {list(plan.layers[:most]) if most <= 6 else f'{most} of the {L} layers'}")
    return out


def plan(job: JobSpec, *, resume: bool = False, extract_plan=None) -> RunPlan:
    """`qkov plan`: the job's RunPlan, with the options that would make it fit when it does not.
    `extract_plan`: reuse one already made (preflight's)."""
    geometry = _geometry(job, extract_plan)
    p = plan_job(job, resume=resume, geometry=geometry, device=measure_device(job))
    p.options = fitting_options(job, p, geometry, resume)
    return p


def require_fits(job: JobSpec, p: RunPlan) -> None:
    """`qkov run` refuses, before it starts, a run whose peak disk use exceeds the free space."""
    if p.fits is False:
        need = p.peak_disk - p.existing
        hint = ("; it would fit with: " + "; or ".join(p.options)) if p.options else "; no single setting makes it fit: free space or choose fewer samples"
        where = "free" + (" within [output] disk_budget" if job.output.disk_budget is not None else "")
        raise UsageError(f"the run needs {_size(need)} at {job.output.path} but only {_size(p.free)} is {where}{hint}. "
                         "(`qkov plan JOB.toml` shows the figures.)")


NAME_MAX = 255  # bytes of one file name on the common file systems (ext4, xfs, APFS, NTFS)


def stats_memory(n_a: int, n_b: int, n_slices: int, n_permutations: int, n_bootstrap: int) -> int:
    """Bytes the statistics hold at once at the least (an estimate, float64): the label
    permutations and bootstrap weights every stats task draws (`slice_reductions.stats_weights`: the
    draw, its argsort and the 0/1 indicators of both tasks, 5·K·N; the bootstrap rows
    2·(1+B)·N) and the per-slice sums the caller gathers (slices × (1+K+4(1+B)+N))."""
    n, k, b = n_a + n_b, n_permutations, n_bootstrap
    return 8 * n * (5 * (1 + k) + 2 * (1 + b)) + 8 * n_slices * schema.stat_sums_width(k, b, n)


def require_stats_memory(settings, n_a: int, n_b: int, n_slices: int, *, names: tuple[str, str],
                         total: int | None = None) -> None:
    """Refuse, before anything is allocated, statistics settings whose permutations and
    bootstrap cannot fit this machine's memory (`names`: how the caller spells the two settings)."""
    import psutil

    total = psutil.virtual_memory().total if total is None else total
    need = stats_memory(n_a, n_b, n_slices, settings.n_permutations, settings.n_bootstrap)
    if need > total:
        raise UsageError(
            f"{names[0]} = {settings.n_permutations} with {names[1]} = {settings.n_bootstrap} needs at least "
            f"{_size(need)} of memory for the statistics ({n_a} + {n_b} samples, {n_slices} slices; estimate) but this "
            f"machine has {_size(total)}; lower {names[0]} (9999 resolves p down to 1e-4) or {names[1]}")


def require_stats_name(name: str | None) -> None:
    """A statistics name (`stats_<name>`) the store can hold as a folder name."""
    from .errors import param

    if name is None:
        return
    group = schema.stats_group(name)  # letters, digits, '_', '.', '-'
    if len(group.encode()) > NAME_MAX:
        raise UsageError(f"{param('name')} is {len(name)} characters; at most {NAME_MAX - len(group) + len(name)} fit (it "
                         f"becomes the folder name '{group[:20]}…', and file names hold at most {NAME_MAX} bytes)")


def check_stats_request(store, name: str | None = None, **overrides) -> None:
    """`qkov stats` / `qkov.run_stats` before anything is read or allocated: the run has scores,
    the name fits a file name, the settings are valid and their permutations fit in memory."""
    from .errors import param
    from .stats_stage import stats_settings

    store.require(schema.SCORES_GROUP, "the statistics")
    require_stats_name(name)
    settings = stats_settings(store, name, **overrides)
    try:
        scores = store.root()[schema.SCORES_GROUP]
        n = int(scores[schema.SAMPLE_I].shape[0])
        slices = math.prod(int(scores[d].shape[0]) for d in (schema.BLOCK, schema.LAYER, schema.HEAD))
    except KeyError:  # a layout without these coordinates: its reader names what is wrong
        return
    n_a = int(store.group_attrs(schema.SCORES_GROUP).get(schema.ATTR_N_A, n // 2))
    require_stats_memory(settings, n_a, n - n_a, slices, names=(param("n_permutations"), param("n_bootstrap")))


__all__ = ["RunPlan", "plan", "plan_job", "require_fits", "layers_per_group", "stats_memory",
           "require_stats_memory", "require_stats_name", "check_stats_request"]
