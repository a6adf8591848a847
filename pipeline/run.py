"""`qkov run`: extract → score → stats on one output, owned by one process at a time.

Each stage reads only the groups of the stage before it and is skipped when its own groups
are already complete. Every stage is `run_<stage>(store, settings, executor, *, options)`:
`run_extract(store, job, executor, *, plan, fresh, on_progress)` and `run_score(store, job,
executor, *, on_progress)` take the whole job (extraction needs the model, tasks, score,
extract and Fisher sections; scoring the score and stats ones), `run_stats(store, job.stats,
executor, *, replace)` its own section, and for `[output] keep_gradients = false`
`run_layer_groups(store, job, executor, *, plan, progress)` runs the first two interleaved. The output's own checks and
bookkeeping (lock, replacement, `_work` records and repairs) are the store's
(`qkov.pipeline.store.output`, `qkov.pipeline.store.work`); this module decides and orders.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from . import schema
from .errors import StoreError, UsageError, option
from .executors import executor_for
from .extract import check_same_plan, plan_extract, run_extract
from .layer_groups import run_layer_groups
from .score import run_score
from .spec import JobSpec
from .stats_stage import run_stats
from .store import RunStore
from .store.output import check_reachable, replace_run, replacing, require_not_nested
from .store.paths import in_process_only
from .store.work import has_template, is_grouped, reopen_damaged_layers, reopen_damaged_scores, reopen_damaged_shards

Progress = Callable[[str, int, int], None]  # (stage, done, total)
UNPLANNED = object()  # run_job's `plan` when no preflight ran yet


@dataclass
class RunSummary:
    path: str
    extract: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    skipped_stages: list = field(default_factory=list)
    repaired: list = field(default_factory=list)  # completed shards whose gradient chunks were missing (recomputed)
    repaired_scores: bool = False  # score chunks were missing: the score stage ran again


def require_one_mode(resume: bool, overwrite: bool) -> None:
    """`resume` continues the run at the output and `overwrite` replaces it: never both. Checked
    where a run is asked for (`preflight`, `run_job`); what they call relies on it."""
    if resume and overwrite:
        raise UsageError(f"{option('resume')} and {option('overwrite')} exclude each other; choose one")


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two job configs."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def _check_resumable(store: RunStore, job: JobSpec) -> None:
    version = store.root().attrs.get(schema.ATTR_SCHEMA)
    if version != schema.SCHEMA_VERSION:
        raise StoreError(
            f"{option('resume')} refused: {store.path} was written with store schema version {version}, this qkov writes "
            f"version {schema.SCHEMA_VERSION}; start over with {option('overwrite')} or use the qkov that wrote it."
        )
    # where the work runs and where the run lives (a moved or synced run) may change between
    # attempts; what is computed may not
    diff = [k for k in config_differences(store.config(), job.config_dict()) if not k.startswith(("cluster.", "output."))]
    if diff:
        raise StoreError(
            f"{option('resume')} refused: the job file differs from the one this run was started with, at {diff}. "
            f"Restore those keys, or start over with {option('overwrite')}."
        )


def _refuse_existing(store: RunStore, job: JobSpec, *, resume: bool, overwrite: bool) -> bool:
    """The refusals about what is already at the output, shared by `prepare_output` and
    `check_output`; True when an existing run is to be resumed (and may be)."""
    exists = store.exists()
    if exists and not (resume or overwrite):
        raise StoreError(f"output {store.path} already exists; pass {option('resume')} to continue it or {option('overwrite')} to replace it")
    if exists and resume:
        _check_resumable(store, job)
        return True
    if exists and overwrite and not store.is_run():  # never delete something that is not a qkov run
        raise StoreError(f"{store.path} exists and is not a qkov run; refusing to overwrite it. Choose another output.path.")
    if not exists and store.entries():  # creating a zarr group with mode "w" would wipe the folder
        raise StoreError(
            f"output {store.path} exists, is not empty and is not a qkov run; refusing to write into it. "
            "Choose a new or empty output.path."
        )
    return False


def prepare_output(store: RunStore, job: JobSpec, *, resume: bool, overwrite: bool) -> bool:
    """Decide fresh vs resume (the caller holds the lock); returns True when the run starts fresh."""
    check_root(store, resume=resume, overwrite=overwrite)
    if replacing(store):  # check_root let only --overwrite through
        replace_run(store)
    if _refuse_existing(store, job, resume=resume, overwrite=overwrite):
        if job.n_tasks > 2:
            store.create_pairs(job.config_dict(), job.config_hash())
        return False
    if overwrite and store.exists():
        replace_run(store)
    store.create_run(job.config_dict(), job.config_hash())
    if job.n_tasks > 2:
        store.create_pairs(job.config_dict(), job.config_hash())
    return True


def check_root(store: RunStore, *, resume: bool, overwrite: bool) -> None:
    """The output is a qkov run's root (symlinks resolved) or a folder that is missing or empty,
    never a place inside another run; an interrupted `--overwrite` is finished only by another."""
    require_not_nested(store)
    if replacing(store):
        if not overwrite:
            raise StoreError(f"{store.path} holds a run that an interrupted {option('overwrite')} was deleting (its "
                             f"'{schema.REPLACING}' folder); pass {option('overwrite')} to finish replacing it, or choose another output.path")
        return
    if resume and store.exists() and not store.is_run():
        raise StoreError(f"{option('resume')} refused: {store.path} is a Zarr group but not the root of a qkov run "
                         "(a run's group?); pass the run's own folder as output.path.")


def check_output(store: RunStore, job: JobSpec, *, resume: bool, overwrite: bool, plan=None) -> None:
    """Every refusal `prepare_output` would make, without writing anything and without the
    lock (so before any cluster starts): the backend is installed and reachable, the path is
    writable, no live run owns it, and an existing output is resumable or replaceable. With
    `plan` (a resume), the samples and weight files must be those the run started with."""
    check_reachable(store)
    check_root(store, resume=resume, overwrite=overwrite)
    store.require_unlocked()
    if replacing(store):  # the next --overwrite finishes the deletion (check_root refused the rest)
        return
    if _refuse_existing(store, job, resume=resume, overwrite=overwrite) and plan is not None and has_template(store):
        check_same_plan(store, plan, job)


def check_shared_output(job: JobSpec) -> None:
    """The work runs on a Dask cluster (worker processes): its output must be a store every
    process reaches. fsspec's memory:// lives in one process's memory: each worker would
    write into its own, empty copy."""
    if in_process_only(job.output.path):
        raise UsageError(f"output.path {job.output.path}: a memory:// store lives in this process only, and the "
                         f"cluster's workers are other processes; run in this process ({option('inline')}) or write "
                         "to a folder or an object store")


def preflight(job: JobSpec, *, resume: bool = False, overwrite: bool = False, local: bool = True,
              cluster: bool = False):
    """Everything that can be checked before a cluster starts or the output is touched: the
    model folder and checkpoint, the task files against the model, layers, sample counts,
    devices (`local`: the work runs on this machine), the output (`cluster`: written by a
    Dask cluster's worker processes) and the statistics' memory. Returns the extraction
    plan, or None when a resumed run's extraction is already complete (nothing to plan)."""
    require_one_mode(resume, overwrite)
    if cluster:
        check_shared_output(job)
    store = RunStore.of(job)
    check_reachable(store)
    done = resume and store.exists() and all(store.is_complete(g) for g in (schema.GRADIENTS, schema.FISHER))
    if local:
        check_devices(job)
    plan = None if done else plan_extract(job)
    check_output(store, job, resume=resume, overwrite=overwrite, plan=plan)
    if plan is not None:  # a run that cannot fit the output's free space is refused now, not hours in
        from .plan import plan as run_plan, require_fits, require_stats_memory

        predicted = run_plan(job, resume=resume or overwrite, extract_plan=plan)
        # first: permutations beyond memory also make the scores' stored sums beyond any disk
        slices = len(predicted.layers) * len(predicted.blocks) * max(predicted.heads.values())
        n_a, n_b = max(plan.pair_sizes(), key=sum)  # the largest task pair's statistics
        require_stats_memory(job.stats, n_a, n_b, slices, names=("stats.n_permutations", "stats.n_bootstrap"))
        require_fits(job, predicted)
        if local:
            check_memory(job, predicted.memory)
    return plan


def check_memory(job: JobSpec, memory: dict[str, int], host_total: int | None = None, gpu_total: int | None = None) -> None:
    """Refuse, before anything is allocated, settings whose one extraction task needs more memory
    than this machine has (the plan's estimates; the work runs here: inline or embedded)."""
    import psutil
    import torch

    from .plan import _size

    host_total = host_total if host_total is not None else psutil.virtual_memory().total
    on_gpu = job.extract.device != "cpu" and torch.cuda.is_available()
    if gpu_total is None and on_gpu:
        gpu_total = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    host_need = memory.get("extract_host", 0) + (0 if on_gpu else memory.get("extract_gpu", 0))
    fix = ("lower extract.shard_size (samples per task) or extract.batch_size, or score fewer layers "
           "(score.layers)")
    if host_need > host_total:
        raise UsageError(f"one extraction task needs about {_size(host_need)} of memory (estimate) but this machine has "
                         f"{_size(host_total)}; {fix}")
    if on_gpu and gpu_total and memory.get("extract_gpu", 0) > gpu_total:
        raise UsageError(f"one extraction task needs about {_size(memory['extract_gpu'])} of GPU memory (estimate) but the "
                         f"GPU has {_size(gpu_total)}; {fix}")


def check_devices(job: JobSpec) -> None:
    """A device the job names must exist where the work runs (here: inline or embedded cluster)."""
    import torch

    for key, dev in (("extract.device", job.extract.device), ("score.device", getattr(job.score, "device", "auto"))):
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"{key} = {dev!r} but this machine has no CUDA device; set {key} = 'auto' or 'cpu'")


def run_job(job: JobSpec, *, client=None, resume: bool = False, overwrite: bool = False,
            progress: Progress | None = None, plan=UNPLANNED) -> RunSummary:
    """Run every stage not already complete. `client=None` runs in-process.

    Every input (model, layout, task files, layers) is validated before the output is
    touched, so a bad input leaves no output behind and never removes a previous run.
    The whole run holds the output's lock: a second run on it is refused. What the file
    system refuses on the way (a full disk, a read-only mount, a name too long) is a
    StoreError naming the fix; the run stays resumable (every write is a whole chunk,
    recorded done after it is written).
    """
    from .errors import os_error

    try:
        return _run_job(job, client=client, resume=resume, overwrite=overwrite, progress=progress, plan=plan)
    except OSError as e:
        refused = os_error(e, job.output.path)
        if refused is None:
            raise
        raise refused from None



def _run_job(job: JobSpec, *, client, resume: bool, overwrite: bool, progress: Progress | None, plan) -> RunSummary:
    require_one_mode(resume, overwrite)
    if client is not None:
        check_shared_output(job)
    store = RunStore.of(job)
    summary = RunSummary(store.path)
    if plan is UNPLANNED:  # the CLI ran `preflight` before starting its cluster
        t = time.perf_counter()
        plan = preflight(job, resume=resume, overwrite=overwrite, local=client is None, cluster=client is not None)
        summary.timings["preflight"] = time.perf_counter() - t
    executor = executor_for(client)
    with store.lock():
        fresh = prepare_output(store, job, resume=resume, overwrite=overwrite)
        if not fresh:  # completed-shard records are checked against the chunks that exist
            summary.repaired = reopen_damaged_shards(store)
            if is_grouped(store):  # no gradients to score again from: the damaged layers' groups run again
                summary.repaired_scores = bool(reopen_damaged_layers(store))
            else:  # each pair's scores (a list, not a generator: every pair is checked, not only up to the first)
                summary.repaired_scores = any([reopen_damaged_scores(sub) for sub in store.pair_runs()])
        grouped = not job.output.keep_gradients or is_grouped(store)
        _Stages(store, job, executor, summary, progress or (lambda *_: None), plan, fresh).run(grouped)
        t = time.perf_counter()
        if job.score.mode == "answers" and not (store.group_attrs(schema.FISHER) or {}).get(schema.ATTR_VALUES_DROPPED):
            # its scalars and the Fisher's health are written: the store keeps no P-sized array (one
            # Fisher, the run's: answers mode refuses fisher.source = "pair")
            store.drop_values(schema.FISHER)
        if grouped or not job.output.keep_work:  # every stage is complete: its bookkeeping is not needed
            store.delete(schema.WORK)
    # after the lock is gone (its group must not be listed): the README's xarray calls open the
    # finished run without "failed to open with consolidated metadata" warnings
    store.consolidate()
    summary.timings["finish"] = time.perf_counter() - t
    return summary


@dataclass
class _Stages:
    """The stages of one `run_job`, in order, each skipped when the groups it writes are complete."""

    store: RunStore
    job: JobSpec
    executor: object
    summary: RunSummary
    tick: Progress
    plan: object  # the ExtractPlan, or None until a stage needs it
    fresh: bool  # the output was created by this run (no template to resume from)

    def run(self, grouped: bool) -> None:
        if self.job.n_tasks > 2:
            return self.run_pairs()
        stages = (  # (name, the groups it writes, how to run it)
            ("extract", (schema.GRADIENTS, schema.FISHER), self.extract),
            ("score", (schema.SCORES_GROUP,), self.score),
            ("stats", (), self.stats),  # always: cheap, and the job's settings are the ones asked for
        ) if not grouped else (
            ("score", (schema.GRADIENTS, schema.FISHER, schema.SCORES_GROUP), self.by_layer_groups),  # extract and score, interleaved
            ("stats", (), self.stats),
        )
        for name, groups, stage in stages:
            t = time.perf_counter()
            if groups and all(self.store.is_complete(g) for g in groups):
                self.summary.skipped_stages.append(name)
            else:
                stage()
            self.summary.timings.setdefault(name, time.perf_counter() - t)

    def run_pairs(self) -> None:
        """More than two tasks: one extraction, then each task pair's scores and statistics in its
        own sub-run (`RunStore.pair`), each skipped when complete."""
        pairs = self.store.pair_runs()
        fishers = [p for p in pairs if p.own_fisher] or [self.store]
        t = time.perf_counter()
        if self.store.is_complete(schema.GRADIENTS) and all(f.is_complete(schema.FISHER) for f in fishers):
            self.summary.skipped_stages.append("extract")
        else:
            self.extract()
        self.summary.timings["extract"] = time.perf_counter() - t
        for stage in ("score", "stats"):
            self.summary.timings.setdefault(stage, 0.0)
        for k, pair in enumerate(pairs):
            t = time.perf_counter()
            done = pair.is_complete(schema.SCORES_GROUP)
            if done:
                self.summary.skipped_stages.append(f"score {pair.pair_tasks()}")
            else:  # progress over the pairs: each pair's graph a share of the stage
                run_score(pair, self.job, self.executor,
                          on_progress=lambda d, n, k=k: self.tick("score", k * n + d, len(pairs) * n))
            self.summary.timings["score"] += time.perf_counter() - t
            t = time.perf_counter()
            if not (done and pair.is_complete(schema.STATS)):
                run_stats(pair, self.job.stats, self.executor, replace=True)
            self.tick("stats", k + 1, len(pairs))
            self.summary.timings["stats"] += time.perf_counter() - t

    def extract(self) -> None:
        self.plan = self.plan or plan_extract(self.job)
        self.summary.extract = run_extract(self.store, self.job, self.executor, plan=self.plan,
                                           fresh=self.fresh or not has_template(self.store),
                                           on_progress=lambda d, n: self.tick("extract", d, n))

    def score(self) -> None:  # progress per task of the score graph
        run_score(self.store, self.job, self.executor, on_progress=lambda d, n: self.tick("score", d, n))

    def stats(self) -> None:
        if "score" in self.summary.skipped_stages and self.store.is_complete(schema.STATS):
            # the scores are those the statistics were computed from: keep them, whatever their
            # settings (a user's `qkov stats --replace` is not undone by --resume)
            self.summary.skipped_stages.append("stats")
            return
        self.tick("stats", 0, 1)
        run_stats(self.store, self.job.stats, self.executor, replace=True)
        self.tick("stats", 1, 1)

    def by_layer_groups(self) -> None:  # keep_gradients = false: extract → score → drop per layer group
        self.plan = self.plan or plan_extract(self.job)
        t0 = time.perf_counter()
        self.summary.extract = ex = run_layer_groups(self.store, self.job, self.executor, plan=self.plan, progress=self.tick)
        ex["loop_s"] = time.perf_counter() - t0  # the whole extract → score → drop loop
        # the stages interleave group by group: each one's time summed over the groups
        self.summary.timings.update(extract=ex["setup_s"] + ex["extract_s"], score=ex["score_s"], drop=ex["drop_s"])
