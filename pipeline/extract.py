"""The extract stage: plan → template → shard tasks on workers → consolidate Fisher.

pangeo-forge style: the driver writes the store's template (metadata, coordinates)
once; each worker task fills whole chunks of one sample shard; the driver then
consolidates the Fisher from the shards' partial sums and marks the groups
complete. A completed-shard record per shard lets `--resume` skip finished work.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import dask.array as da
import numpy as np
import xarray as xr

from qkov.workers import fisher as fisher_math
from qkov.workers.writer import ShardResult, ShardTask, extract_shards

from . import schema
from .spec import JobSpec
from .errors import JobFileError, NonFiniteGradientError, StoreError, TaskFileError, option
from .store import RunStore, checksummed, provenance
from .store.work import shards_done


@dataclass(frozen=True, eq=False)
class ExtractPlan:
    """What extraction will write; pure data, derived from the job and the model's config."""

    sample_ids: tuple[str, ...]  # task by task (A, B, then any others), as the users wrote them
    task_names: tuple[str, ...]
    task_sizes: tuple[int, ...]  # samples per task, in store order
    input_ids: tuple[tuple[int, ...], ...]
    texts: tuple[str | None, ...]
    labels: tuple[int | tuple[bool, ...] | None, ...]  # class indices, or completion target masks
    layers: tuple[int, ...]
    blocks: tuple[str, ...]
    heads: dict[str, int]  # block -> heads in the store (query heads for Q/O, KV heads for K/V)
    sizes: dict[str, int]  # block -> entries per head slice
    n_heads: int
    n_kv_heads: int
    kv_head_of: tuple[int, ...]
    shard_size: int
    # one Fisher per stream: per-sample weights over every stored sample (0 outside the stream),
    # its batches, and where it is stored (None: the run's `fisher`; a task-key pair: that pair's)
    fisher_streams: tuple[np.ndarray, ...]
    fisher_batches: tuple[int, ...]
    fisher_pairs: tuple[tuple[str, str] | None, ...]
    layout_summary: dict = field(default_factory=dict)
    checkpoint: str = ""  # qkov.workers.models.checkpoint_fingerprint of the weight files

    @property
    def n(self) -> int:
        return sum(self.task_sizes)

    @property
    def n_a(self) -> int:
        return self.task_sizes[0]

    @property
    def n_b(self) -> int:
        return self.task_sizes[1]

    def task_rows(self, k: int) -> range:
        """The store rows of task `k` (store order)."""
        start = sum(self.task_sizes[:k])
        return range(start, start + self.task_sizes[k])

    def pair_sizes(self) -> list[tuple[int, int]]:
        """(samples of A, of B) of every task pair the statistics compare."""
        m = self.task_sizes
        return [(m[i], m[j]) for i in range(len(m)) for j in range(i + 1, len(m))]

    @property
    def shards(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.shard_size)) for s in range(0, self.n, self.shard_size)]

    def fingerprint(self) -> str:
        """Hash of what the shards compute from (samples, tokens, labels, slices): a resumed
        run must plan exactly this, or its finished shards belong to other inputs."""
        weights = [[float(w) for w in ws] for ws in self.fisher_streams]
        what = [self.sample_ids, self.task_names, self.n_a, self.input_ids, self.labels, self.layers,
                self.blocks, sorted(self.heads.items()), sorted(self.sizes.items()), self.shard_size,
                weights[0] if len(weights) == 1 else weights]
        if len(self.task_sizes) > 2:
            what.append(list(self.task_sizes))
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def meta_model(job: JobSpec):
    """The model's config and the model built from it on the meta device (no weights read),
    after checking that the checkpoint holds every tensor it needs with the config's shapes
    (a classifier head the checkpoint lacks would otherwise be initialised randomly)."""
    import torch
    import transformers as tf

    from qkov.workers.models import check_checkpoint, load_config, model_folder, model_kind

    folder = model_folder(job.model)
    config = load_config(folder)
    cls = tf.AutoModelForSequenceClassification if model_kind(config) == "sequence_classification" else tf.AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config, attn_implementation=job.model.attn_implementation)
    check_checkpoint(folder, model)
    return config, model


def meta_vocab_size(job: JobSpec) -> int:
    """Rows of the model's input embedding, from its config alone."""
    import transformers as tf

    from qkov.workers.models import model_folder

    config = tf.AutoConfig.from_pretrained(str(model_folder(job.model)), local_files_only=True)
    size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    return int(size)


def check_sample_counts(job: JobSpec, *sizes: int) -> None:
    """Each task needs at least 2 samples: with one, every label permutation gives the same
    statistic (p = 0.5 for n_A = n_B = 1) and the bootstrap CI has zero width."""
    for (_, spec), n in zip(job.tasks.items(), sizes):
        if n < 2:
            raise TaskFileError(
                f"task {spec.name!r} has {n} sample; the statistics need at least 2 per task (with 1, label "
                "permutations cannot tell the tasks apart and the bootstrap CI has zero width). Add samples"
                + (" or raise its limit" if spec.limit is not None else "")
            )


def sample_count_warning(n_a: int, n_b: int, alpha: float) -> str | None:
    """A note when no p-value can reach alpha: only C(n_A+n_B, n_A) distinct label arrangements exist."""
    from math import comb

    arrangements = comb(n_a + n_b, n_a)
    if 1.0 / arrangements > alpha:
        return (f"with {n_a} + {n_b} samples only {arrangements} label arrangements exist, so no p-value can fall "
                f"below {1 / arrangements:.3g} > alpha = {alpha}: nothing can be significant. Add samples.")
    return None


def completion_notes(plan: "ExtractPlan") -> list[str]:
    """Per task with a completion loss, how many next-token predictions its loss keeps: the
    user's check that the prompt/completion split is the one meant."""
    out = []
    for k, name in enumerate(plan.task_names):
        rows = plan.task_rows(k)
        masks = [plan.labels[i] for i in rows if isinstance(plan.labels[i], tuple)]
        if masks:
            kept = sum(sum(m[1:]) for m in masks)  # the first token is never predicted
            total = sum(len(m) - 1 for m in masks)
            out.append(f"task {name!r}: loss over completion tokens only: {kept:,} of {total:,} next-token "
                       f"predictions ({kept / total:.0%}); the prompt's are context")
    return out


def check_kept_samples(job: JobSpec, plan: "ExtractPlan", finite: np.ndarray) -> str | None:
    """extract.nonfinite = "skip": the sample counts rules applied to the samples left after
    skipping (`finite`, store order: task by task). Fewer than 2 in a task is refused, as before
    the run; returns `sample_count_warning` of the counts left (None when nothing was skipped)."""
    finite = np.asarray(finite, dtype=bool)
    if finite.all():
        return None
    parts = []  # (task, which of its samples are kept, their ids)
    for k, (_, spec) in enumerate(job.tasks.items()):
        rows = plan.task_rows(k)
        parts.append((spec, finite[rows.start:rows.stop], plan.sample_ids[rows.start:rows.stop]))
    kept = [int(part.sum()) for _, part, _ in parts]
    for (spec, part, ids), n in zip(parts, kept):
        if n < 2:
            gone = [i for i, f in zip(ids, part) if not f]
            raise TaskFileError(
                f"task {spec.name!r} has {n} sample(s) left of {len(ids)}: extract.nonfinite = 'skip' left out {len(gone)} "
                f"whose loss or gradients are not finite ({gone[:5]}{' …' if len(gone) > 5 else ''}); the statistics need "
                f"at least 2 per task. Fix or replace those samples (or the model, if its weights hold NaN) and rerun "
                f"with {option('overwrite')}")
    notes = [sample_count_warning(kept[i], kept[j], job.stats.alpha) for i in range(len(kept)) for j in range(i + 1, len(kept))]
    return next((n for n in notes if n), None)


def plan_extract(job: JobSpec) -> ExtractPlan:
    from qkov.workers.models import load_tokenizer
    from qkov.workers.models import checkpoint_fingerprint, model_folder
    from qkov.workers.tasks import load_task, validate_for_model

    tokenizer = load_tokenizer(job.model)
    loaded = [load_task(spec, tokenizer, job.model.max_length, key) for key, spec in job.tasks.items()]
    samples = [s for task in loaded for s in task]
    check_sample_counts(job, *map(len, loaded))
    config, model = meta_model(job)
    from qkov.workers.layouts import discover_layout

    layout = discover_layout(model, declared=job.model.layout, include_bias=job.score.include_bias)
    # token ids inside the embedding, lengths inside a learned position table, a classifier's
    # labels inside its classes (a missing label would silently give loss 0 and gradient 0)
    for task in loaded:
        validate_for_model(task, config, model)
    layers = tuple(job.score.layers) if job.score.layers is not None else tuple(range(layout.n_layers))
    bad = [l for l in layers if l >= layout.n_layers]
    if bad:
        raise JobFileError(f"score.layers {bad} out of range: the model has {layout.n_layers} attention layers (0..{layout.n_layers - 1})")
    blocks = tuple(job.score.blocks)
    sub = layout.subset(layers=layers, blocks=blocks)
    sizes = tuple(map(len, loaded))
    streams = fisher_streams(job, sizes)
    return ExtractPlan(
        sample_ids=tuple(s.id for s in samples),
        task_names=tuple(spec.name for _, spec in job.tasks.items()),
        task_sizes=sizes,
        input_ids=tuple(tuple(s.input_ids) for s in samples),
        texts=tuple(s.text for s in samples),
        # a completion loss's target mask travels where a classifier's label does (never both)
        labels=tuple(s.targets if s.targets is not None else s.label for s in samples),
        layers=layers,
        blocks=blocks,
        heads={bl: sub.blocks[(bl, layers[0])].n_heads for bl in blocks},
        sizes={bl: sub.block_size(bl) for bl in blocks},
        n_heads=layout.n_heads,
        n_kv_heads=layout.n_kv_heads,
        kv_head_of=tuple(int(x) for x in layout.kv_head_of),
        shard_size=job.extract.shard_size,
        fisher_streams=tuple(w for _, w, _ in streams),
        fisher_batches=tuple(t for _, _, t in streams),
        fisher_pairs=tuple(p for p, _, _ in streams),
        layout_summary=sub.summary(),
        checkpoint=checkpoint_fingerprint(model_folder(job.model)),
    )


def fisher_streams(job: JobSpec, sizes: tuple[int, ...]) -> list[tuple[tuple[str, str] | None, np.ndarray, int]]:
    """The job's Fisher streams: (the pair that owns it, or None for the run's one Fisher; the
    per-sample weights over the store; its batch count). `fisher.source` "pooled" streams every
    task (store order), a task key that task; "pair", with more than two tasks, one stream per
    task pair (its two tasks in store order: the stream a two-task run of that pair uses)."""
    f, keys = job.fisher, job.tasks.keys()

    def stream(members: list[int]) -> tuple[np.ndarray, int]:
        w = fisher_math.task_stream_weights(sizes, members, f.batch_size, f.beta)
        return w, -(-sum(sizes[k] for k in members) // f.batch_size)

    if f.source == "pair" and len(keys) > 2:
        return [((x, y), *stream([keys.index(x), keys.index(y)])) for x, y in job.tasks.pairs()]
    members = list(range(len(keys))) if f.source in ("pooled", "pair") else [keys.index(f.source)]
    return [(None, *stream(members))]


def _text_preview(t: str | None, n: int = 200) -> str:
    return "" if t is None else t[:n]


def gradients_template(plan: ExtractPlan, job: JobSpec) -> xr.Dataset:
    enc = schema.stored_dtype(job.score.storage_dtype)
    n, L = plan.n, len(plan.layers)
    data = {}
    pdim = schema.param_dims(plan.sizes)
    scalars = forms_scalars(job)
    for name, b, width in gradient_variables(plan, job):
        shape = (n, L, plan.heads[b], width)
        if scalars and name == b:  # a few float64 scalars per sample and slice: one chunk per shard
            arr = da.zeros(shape, chunks=(plan.shard_size, L, plan.heads[b], width), dtype=np.float64)
            data[name] = xr.Variable((schema.SAMPLE, schema.LAYER, schema.head_dim(b), schema.PART), arr)
            continue
        arr = da.zeros(shape, chunks=(plan.shard_size, 1, 1, width), dtype=enc)
        last = schema.SKETCH if job.score.mode == "sketch" or scalars else pdim[b]
        data[name] = xr.Variable((schema.SAMPLE, schema.LAYER, schema.head_dim(b), last), arr,
                                 attrs={schema.ATTR_ENCODING: job.score.storage_dtype})
    labels = [name for name, m in zip(plan.task_names, plan.task_sizes) for _ in range(m)]
    coords = {
        schema.SAMPLE_ID: (schema.SAMPLE, np.array(plan.sample_ids, dtype=object)),
        schema.TASK: (schema.SAMPLE, np.array(labels, dtype=object)),
        schema.N_TOKENS: (schema.SAMPLE, np.array([len(x) for x in plan.input_ids], dtype=np.int32)),
        schema.TEXT: (schema.SAMPLE, np.array([_text_preview(t) for t in plan.texts], dtype=object)),
        schema.LOSS: (schema.SAMPLE, da.full(n, np.nan, chunks=plan.shard_size, dtype=np.float32)),
        schema.FINITE: (schema.SAMPLE, da.zeros(n, chunks=plan.shard_size, dtype=bool)),
        schema.LAYER: (schema.LAYER, np.array(plan.layers, dtype=np.int32)),
        schema.HEAD: (schema.HEAD, np.arange(plan.n_heads, dtype=np.int32)),
        schema.KV_HEAD: (schema.KV_HEAD, np.arange(plan.n_kv_heads, dtype=np.int32)),
        schema.KV_HEAD_OF: (schema.HEAD, np.array(plan.kv_head_of, dtype=np.int32)),
    }
    if scalars:
        coords[schema.PART] = (schema.PART, np.array(schema.answer_parts(job.tasks.keys()), dtype=object))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(
        provenance(job.config_dict(), job.config_hash(), layout=plan.layout_summary, stage="extract"),
        shard_size=plan.shard_size,
        storage_dtype=job.score.storage_dtype,
    )
    if len(plan.task_sizes) == 2:
        ds.attrs.update({schema.ATTR_N_A: plan.n_a, schema.ATTR_N_B: plan.n_b, schema.ATTR_TASK_A: plan.task_names[0],
                         schema.ATTR_TASK_B: plan.task_names[1]})
    else:  # the pairs' views (RunStore.pair) take their rows from these
        ds.attrs.update({schema.ATTR_TASKS: list(plan.task_names), schema.ATTR_TASK_SIZES: list(plan.task_sizes)})
    ds.attrs[schema.ATTR_MODE] = job.score.mode
    if sketches(job):
        from qkov.workers.sketch import PROJECTION_SCHEME

        ds.attrs.update({"sketch_dim": job.score.sketch_dim, "sketch_seed": job.score.sketch_seed, "sketch_nnz": 1,
                         schema.ATTR_SKETCH_PROJECTION: PROJECTION_SCHEME})
    ds.attrs[schema.ATTR_COMPLETE] = False
    return ds


def gradient_variables(plan: ExtractPlan, job: JobSpec) -> list[tuple[str, str, int]]:
    """(variable, block, last-axis length) of `gradients`: per block the gradients, or in
    sketch mode its three sketched operands {B}_u, {B}_v, {B}_w of length sketch_dim."""
    if not forms_scalars(job):
        return [(b, b, plan.sizes[b]) for b in plan.blocks]
    # each sample's scalars per slice (schema.answer_parts), and the sketched operands: sketch
    # mode's three, answers mode's u and v with keep_pairs = "top" (the interference's)
    scalars = [(b, b, len(schema.answer_parts(job.tasks.keys()))) for b in plan.blocks]
    parts = schema.SKETCH_PARTS if job.score.mode == "sketch" else ("u", "v") if job.score.keep_pairs == "top" else ()
    return [(schema.sketch_var(b, p), b, job.score.sketch_dim) for b in plan.blocks for p in parts] + scalars


def write_template(store: RunStore, plan: ExtractPlan, job: JobSpec) -> None:
    """Metadata and coordinates of `gradients`, plus the bookkeeping arrays in `_work`."""
    ds = gradients_template(plan, job)
    # uncompressed: per-sample gradients are near-incompressible (zstd saved 7% of float32 chunks while
    # writing 3.3x and reading 2.2x slower, measured), and every stage after extract streams them.
    # A crc32c checksum per chunk (7.9 GB/s, within the noise of the store's own write/read times,
    # measured) turns a corrupted or half-written chunk into an error instead of wrong scores.
    scalars = forms_scalars(job)
    encoding = {name: {"chunks": (plan.shard_size, *((len(plan.layers), plan.heads[b]) if scalars and name == b else (1, 1)), width),
                       "compressors": checksummed()}
                for name, b, width in gradient_variables(plan, job)}
    encoding[schema.LOSS] = {"chunks": (plan.shard_size,)}
    encoding[schema.FINITE] = {"chunks": (plan.shard_size,)}
    store.write_dataset(ds, schema.GRADIENTS, encoding=encoding, compute=False)  # metadata only: workers fill the chunks
    root = store.root("r+")
    work = root.require_group(schema.WORK)
    n_shards = len(plan.shards)
    for b, stream in ((b, s) for b in plan.blocks for s in range(len(plan.fisher_streams))):
        shape = (n_shards, len(plan.layers), plan.heads[b], plan.sizes[b])
        # one chunk per (shard, layer): whole-shard chunks reach 2 GB per block at 7B scale
        work.create_array(schema.fisher_partial(b, stream), shape=shape, chunks=(1, 1, *shape[2:]), dtype="float32", fill_value=0.0, overwrite=True,
                          dimension_names=("shard", schema.LAYER, schema.head_dim(b), f"{schema.PARAM}_{b}"))
    for b, k in ((b, k) for b in plan.blocks for k in range(len(plan.task_sizes))
                 if scalars and (len(plan.shards) > 1 or job.score.mode == "sketch")):
        shape = (n_shards, len(schema.TASK_SUM_KINDS), len(plan.layers), plan.heads[b], plan.sizes[b])
        work.create_array(schema.task_sum_partial(b, k), shape=shape, chunks=(1, 1, 1, *shape[3:]), dtype="float32",
                          fill_value=0.0, overwrite=True,
                          dimension_names=("shard", "kind", schema.LAYER, schema.head_dim(b), f"{schema.PARAM}_{b}"))
    work.attrs[schema.ATTR_PLAN] = plan.fingerprint()
    work.attrs[schema.ATTR_CHECKPOINT] = plan.checkpoint
    if job.score.mode in ("sketch", "answers"):
        work.create_array(schema.DONE_FISHER, shape=(n_shards,), chunks=(1,), dtype="int8", fill_value=0, overwrite=True,
                          dimension_names=("shard",))
    # `done` last: its presence is what marks the template as written (store.work.has_template)
    work.create_array(schema.DONE, shape=(n_shards,), chunks=(1,), dtype="int8", fill_value=0, overwrite=True,
                      dimension_names=("shard",))


def shard_tasks(store: RunStore, plan: ExtractPlan, job: JobSpec, shards: list[int], phase: str = "exact") -> list[ShardTask]:
    out = []
    for k in shards:
        s, e = plan.shards[k]
        out.append(
            ShardTask(
                store_path=store.path,
                storage_options=dict(store.storage_options),
                model=job.model,
                include_bias=job.score.include_bias,
                layers=plan.layers,
                blocks=plan.blocks,
                shard=k,
                start=s,
                input_ids=plan.input_ids[s:e],
                sample_ids=plan.sample_ids[s:e],
                labels=plan.labels[s:e],
                fisher_weights=tuple(tuple(float(x) for x in w[s:e]) for w in plan.fisher_streams),
                batch_size=job.extract.batch_size,
                device=job.extract.device,
                nonfinite=job.extract.nonfinite,
                storage_dtype=job.score.storage_dtype,
                phase=phase,
                sketch_dim=job.score.sketch_dim if sketches(job) else 0,
                sketch_seed=job.score.sketch_seed,
                **(_task_of(plan, s, e, job) if forms_scalars(job) else {}),
            )
        )
    return out


def forms_scalars(job: JobSpec) -> bool:
    """Extraction forms each sample's scalars against the task sums (two passes): answers mode,
    and sketch mode, whose point estimates come from them exactly."""
    return job.score.mode in ("answers", "sketch")


def sketches(job: JobSpec) -> bool:
    """Extraction sketches operands: sketch mode, or answers mode keeping the interference's top pairs."""
    return job.score.mode == "sketch" or (job.score.mode == "answers" and job.score.keep_pairs == "top")


def _task_of(plan: ExtractPlan, start: int, stop: int, job: JobSpec) -> dict:
    """Answers mode: each sample's task index (store order) for rows start:stop, and the damping
    (one shard makes both passes in its task: `answers_whole`)."""
    task = np.repeat(np.arange(len(plan.task_sizes)), plan.task_sizes)
    return {"task_of": tuple(int(k) for k in task[start:stop]), "n_tasks": len(plan.task_sizes),
            "damping": (job.fisher.damping_rel, job.fisher.damping_abs)}


def answers_phases(plan: ExtractPlan) -> list[tuple[str, str]]:
    """Answers mode's passes and their done-records: in one shard both run in one task, the task
    sums kept in its memory (nothing P-sized per task written); over several shards pass 1
    writes each shard's sums, which the client consolidates before pass 2."""
    if len(plan.shards) == 1:
        return [("answers_whole", schema.DONE)]
    return [("fisher", schema.DONE_FISHER), ("answers", schema.DONE)]


def pending_shards(store: RunStore, plan: ExtractPlan, record: str = schema.DONE) -> list[int]:
    done = shards_done(store, record)
    return [k for k in range(len(plan.shards)) if not done[k]]


def check_same_plan(store: RunStore, plan: ExtractPlan, job: JobSpec) -> None:
    root = store.root()
    if sketches(job):
        from qkov.workers.sketch import PROJECTION_SCHEME

        scheme = root[schema.GRADIENTS].attrs.get(schema.ATTR_SKETCH_PROJECTION, "randperm-v1")
        if scheme != PROJECTION_SCHEME:
            raise StoreError(
                f"{option('resume')} refused: this run's sketches were drawn with projection scheme {scheme!r} and this "
                f"qkov draws {PROJECTION_SCHEME!r}; finishing it would mix sketches that do not compare. "
                f"Start over with {option('overwrite')}."
            )
    check_same_checkpoint(store, plan)
    stored = root[schema.WORK].attrs.get(schema.ATTR_PLAN)
    if stored is not None and stored != plan.fingerprint():
        raise StoreError(
            f"{option('resume')} refused: the samples differ from those this run started with (a task file or the "
            f"tokenizer changed since); restore them, or start over with {option('overwrite')}."
        )


def check_same_checkpoint(store: RunStore, plan: ExtractPlan) -> None:
    """--resume after the weight files changed would finish a run whose early shards hold the
    old model's gradients: refused before anything is written (the fingerprint the run started
    with is recorded with its template)."""
    try:
        stored = store.root()[schema.WORK].attrs.get(schema.ATTR_CHECKPOINT)
    except KeyError:  # no template yet: nothing was computed from any weights
        return
    if stored and plan.checkpoint and stored != plan.checkpoint:
        raise StoreError(
            f"{option('resume')} refused: the model's weight files differ from those this run started with (checkpoint "
            f"fingerprint {stored} then, {plan.checkpoint} now); finishing it would mix two models' gradients. "
            f"Restore the weights, or start over with {option('overwrite')}."
        )


def consolidate_fisher(store: RunStore, plan: ExtractPlan, job: JobSpec, weights_hash: str | None) -> None:
    """Each Fisher stream's Σ over shards (in shard order, float64) of each shard's Σ w_i g_i²,
    with its damping per tensor, into the run's `fisher` (or, one per pair, the pairs' own)."""
    for stream, pair in enumerate(plan.fisher_pairs):
        target = store if pair is None else store.pair(*pair)
        _write_fisher(target, store.root()[schema.WORK], stream, plan, job, weights_hash)


def consolidate_task_sums(store: RunStore, plan: ExtractPlan) -> None:
    """Answers mode: each task's Σ g, Σ |g|, Σ g² over shards (shard order, float64) into
    `_work/task_sums/<block>` (task, kind, layer, head, param), which pass 2 reduces against."""
    work = store.root("r+")[schema.WORK]
    out = work.require_group(schema.TASK_SUMS)
    for b in plan.blocks:
        shape = (len(plan.task_sizes), len(schema.TASK_SUM_KINDS), len(plan.layers), plan.heads[b], plan.sizes[b])
        arr = out.create_array(b, shape=shape, chunks=(1, 1, 1, *shape[3:]), dtype="float64", fill_value=0.0,
                               overwrite=True, dimension_names=(schema.TASK, "kind", schema.LAYER, schema.head_dim(b),
                                                                f"{schema.PARAM}_{b}"))
        for k in range(shape[0]):
            part = work[schema.task_sum_partial(b, k)]
            for kind in range(shape[1]):
                for li in range(shape[2]):  # one stored chunk at a time
                    total = np.zeros(shape[3:], dtype=np.float64)
                    for sh in range(part.shape[0]):
                        total += part[sh, kind, li]
                    arr[k, kind, li] = total


def _write_fisher(target: RunStore, work, stream: int, plan: ExtractPlan, job: JobSpec, weights_hash: str | None) -> None:
    f = job.fisher
    data, lam = {}, {}
    pdim = schema.param_dims(plan.sizes)
    for b in plan.blocks:
        part = work[schema.fisher_partial(b, stream)]
        total = np.zeros(part.shape[1:], dtype=np.float64)
        for k in range(part.shape[0]):
            for li in range(part.shape[1]):  # one stored chunk at a time
                total[li] += part[k, li]
        lam[b] = fisher_math.damping(total, f.damping_rel, f.damping_abs)
        data[b] = xr.Variable((schema.LAYER, schema.head_dim(b), pdim[b]), total.astype(np.float32))
    ds = xr.Dataset(
        data,
        coords={
            schema.LAYER: np.array(plan.layers, dtype=np.int32),
            schema.BLOCK: np.array(plan.blocks, dtype=object),
        },
    )
    ds[schema.DAMPING] = xr.Variable((schema.BLOCK, schema.LAYER), np.stack([lam[b] for b in plan.blocks]))
    ds.attrs.update(
        provenance(job.config_dict(), job.config_hash(), stage="extract", weights_hash=weights_hash),
        beta=f.beta,
        T=plan.fisher_batches[stream],
        batch_size=f.batch_size,
        source=f.source,
        damping_rel=f.damping_rel,
        damping_abs=f.damping_abs,
        # extract.nonfinite = "skip": these samples' g² count as 0 in their batch's mean
        **{schema.ATTR_SKIPPED_SAMPLES: list(work.attrs.get(schema.ATTR_SKIPPED, []))},
    )
    if plan.fisher_pairs[stream] is not None:
        ds.attrs[schema.ATTR_PAIR] = list(plan.fisher_pairs[stream])
    # one chunk per (block, layer): readers (the sketch pass, the score stage) go layer by layer
    encoding = {b: {"chunks": (1, plan.heads[b], plan.sizes[b])} for b in plan.blocks}
    target.write_dataset(ds, schema.FISHER, encoding=encoding)
    target.mark_complete(schema.FISHER)


def _finish_pass(store: RunStore, plan: ExtractPlan, results: list[ShardResult], record: str) -> tuple[str | None, list[str]]:
    """Check one pass's shard results (one model, no rejected samples, every shard done) and
    record its skipped samples; returns the weights hash and the skipped sample ids."""
    root = store.root("r+")
    work = root[schema.WORK]
    hashes = {r.weights_hash for r in results} | ({work.attrs[schema.ATTR_WEIGHTS_HASH]} if schema.ATTR_WEIGHTS_HASH in work.attrs else set())
    if len(hashes) > 1:
        raise StoreError(f"workers loaded different model weights (hashes {sorted(hashes)}); every worker must see the same model files")
    whash = next(iter(hashes), None)
    if whash:
        work.attrs[schema.ATTR_WEIGHTS_HASH] = whash
    order = {sid: k for k, sid in enumerate(plan.sample_ids)}
    skipped = sorted({s for r in results for s in r.skipped}, key=order.__getitem__)
    if skipped:  # kept across resumed attempts, in store order
        earlier = set(work.attrs.get(schema.ATTR_SKIPPED, []))
        work.attrs[schema.ATTR_SKIPPED] = sorted(earlier | set(skipped), key=lambda s: order.get(s, len(order)))
    rejected = [s for r in results for s in r.rejected]  # shard order = store order
    if rejected:
        raise NonFiniteGradientError(
            f"non-finite loss or gradients for {len(rejected)} sample(s): {rejected}; their shards were not written. "
            "Drop them from the task files, or set extract.nonfinite = 'skip' to record and exclude them "
            f"(then rerun with {option('overwrite')})."
        )
    if pending_shards(store, plan, record):
        raise StoreError(f"some extraction shards did not complete; rerun with {option('resume')}")
    return whash, skipped


def shard_groups(tasks: list[ShardTask], slots: int) -> list[tuple[ShardTask, ...]]:
    """Consecutive shards per device task, so that a worker writes one shard while its device
    computes the next (qkov.workers.writer.extract_shards): up to 4 per task, but at least two
    tasks per device slot so the work still spreads over every GPU."""
    per = max(1, min(4, len(tasks) // (2 * max(1, slots))))
    return [tuple(tasks[i : i + per]) for i in range(0, len(tasks), per)]


def run_extract(store: RunStore, job: JobSpec, executor, *, plan: ExtractPlan | None = None, fresh: bool = True,
                on_progress: Callable[[int, int], None] | None = None, resident: bool = False) -> dict:
    """The extract stage: gradients and the Fisher into the run. With fresh=False (resume),
    only shards without a completed-shard record run. Returns counts and the weights hash.
    resident (the fused path, `qkov.workers.resident`): the gradients stay in the worker's
    memory for this process's score tasks; only the Fisher, losses and records are written."""
    plan = plan or plan_extract(job)
    if fresh:
        write_template(store, plan, job)
    else:
        check_same_plan(store, plan, job)
    # sketch mode: pass 1 writes the Fisher; pass 2 needs the consolidated Fisher to form its operands
    # answers mode likewise: pass 1 the Fisher and the task sums, pass 2 each sample's scalars against them
    phases = {"sketch": [("fisher", schema.DONE_FISHER), ("sketch", schema.DONE)],
              "answers": answers_phases(plan)}.get(job.score.mode, [("exact", schema.DONE)])
    todo = {record: pending_shards(store, plan, record) for _, record in phases}
    total = len(plan.shards) * len(phases)
    done_count = [total - sum(map(len, todo.values()))]
    if on_progress:
        on_progress(done_count[0], total)

    def _tick(group: list[ShardResult]) -> None:
        done_count[0] += len(group)
        if on_progress:
            on_progress(done_count[0], total)

    seconds: dict[str, float] = {}
    for phase, record in phases:
        tasks = shard_tasks(store, plan, job, todo[record], phase)
        if resident:
            tasks = [replace(t, resident=True) for t in tasks]
        groups = shard_groups(tasks, slots=executor.gpu_slots())
        results = [r for rs in executor.map(extract_shards, groups, gpu=True, on_result=_tick) for r in rs]
        for r in results:
            for part, sec in r.seconds:
                seconds[part] = seconds.get(part, 0.0) + sec
        whash, skipped = _finish_pass(store, plan, results, record)
        if phase in ("exact", "fisher", "answers_whole"):  # the pass that wrote the Fisher partial sums
            t = time.perf_counter()
            # the sample counts after skipping, before anything is marked complete (a resume asks again)
            warning = check_kept_samples(job, plan, store.root()[schema.GRADIENTS][schema.FINITE][:])
            consolidate_fisher(store, plan, job, whash)
            if phase == "fisher" and forms_scalars(job):
                consolidate_task_sums(store, plan)
            seconds["consolidate"] = seconds.get("consolidate", 0.0) + time.perf_counter() - t
    root = store.root("r+")
    g = root[schema.GRADIENTS]
    g.attrs[schema.ATTR_WEIGHTS_HASH] = whash
    g.attrs[schema.ATTR_SKIPPED_SAMPLES] = list(root[schema.WORK].attrs.get(schema.ATTR_SKIPPED, []))
    store.mark_complete(schema.GRADIENTS)
    # worker parts summed over shards (device-seconds where several GPUs run at once), the
    # consolidations on the client: where the stage's time goes
    return {"shards": len(plan.shards), "computed": len(todo[schema.DONE]), "weights_hash": whash, "skipped": skipped,
            "warning": warning, "seconds": {k: round(v, 3) for k, v in seconds.items()}}
