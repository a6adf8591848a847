"""`qkov run`: extract → score → stats on one output, owned by one process at a time.

The stages share one seam: `stage(store, settings, executor)`; each reads only the
groups of the stage before it and is skipped when its own group is already complete.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from . import schema
from .errors import StoreError, UsageError, option
from .executors import executor_for
from .extract import plan_extract, run_extract
from .score import run_score
from .spec import JobSpec
from .stats_stage import run_stats
from .store import RunStore, is_url

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


REPLACING = "_replacing"  # `--overwrite` in progress: the old run's entries, moved here and deleted last


def replacing(store: RunStore) -> bool:
    """An `--overwrite` stopped (Ctrl-C, a kill) while it deleted the old run: the old run is no
    longer a run (its root metadata went first), its leftovers wait under `_replacing`."""
    return store.has_group(REPLACING)


def _remove(store: RunStore, entry: str, trash: str | None) -> None:
    """One step of `replace_run`: `entry` moved into `trash` (a local disk: one rename), or deleted
    (an object store, `trash` None: no rename there)."""
    if trash is None:
        store._fs()[0].rm(entry, recursive=True)
    else:
        os.replace(entry, os.path.join(trash, f"{os.path.basename(entry)}.old"))


def replace_run(store: RunStore) -> None:
    """Delete the old run at `store` (the caller holds its lock), so that an interruption at any
    point leaves no part of it that reads as a run, or as a group beside a new run: a marker
    group `_replacing` is written first, then the root's metadata goes (from here nothing
    opens it as a run), then every other entry is moved into the marker (a local disk) or
    deleted (object stores), and the marker last. A stopped replacement is finished by the
    next `--overwrite` and refused by `--resume` (`replacing`)."""
    import zarr

    if not replacing(store):
        if not store.is_run():  # never delete something that is not a qkov run
            raise StoreError(f"{store.path} exists and is not a qkov run; refusing to overwrite it. Choose another output.path.")
        zarr.create_group(store=store.zarr(), path=REPLACING, overwrite=True, zarr_format=3)
    local = not is_url(store.path)
    root = store.path.rstrip("/")
    trash = f"{root.removeprefix('file://')}/{REPLACING}" if local else None
    meta = f"{root.removeprefix('file://')}/zarr.json" if local else f"{store._fs()[1].rstrip('/')}/zarr.json"
    if (os.path.exists(meta) if local else store._fs()[0].exists(meta)):
        _remove(store, meta, trash)
    for entry in store.entries():
        if entry.rstrip("/").rsplit("/", 1)[-1] != REPLACING:
            _remove(store, entry, trash)
    store.delete(REPLACING)


def prepare_output(store: RunStore, job: JobSpec, *, resume: bool, overwrite: bool) -> bool:
    """Decide fresh vs resume (the caller holds the lock); returns True when the run starts fresh."""
    if resume and overwrite:
        raise UsageError(f"{option('resume')} and {option('overwrite')} exclude each other; choose one")
    check_root(store, resume=resume, overwrite=overwrite)
    if replacing(store):  # check_root let only --overwrite through
        replace_run(store)
    exists = store.exists()
    if exists and not (resume or overwrite):
        raise StoreError(f"output {store.path} already exists; pass {option('resume')} to continue it or {option('overwrite')} to replace it")
    if exists and resume:
        _check_resumable(store, job)
        return False
    if exists and overwrite:
        replace_run(store)
    elif store.entries():  # creating a zarr group with mode "w" would wipe the folder
        raise StoreError(
            f"output {store.path} exists, is not empty and is not a qkov run; refusing to write into it. "
            "Choose a new or empty output.path."
        )
    store.create_run(job.config_dict(), job.config_hash())
    return True


def enclosing_run(store: RunStore) -> str | None:
    """The Zarr store (a qkov run, or one of its groups' folders) that the output's real folder
    (symlinks resolved) lies inside, or None. A run written there would nest in another run's
    metadata: a symlink into another run's group is the usual way in."""
    import json
    from pathlib import Path

    if is_url(store.path):
        return None
    real = Path(store.path.removeprefix("file://")).expanduser().resolve()
    for folder in real.parents:
        meta = folder / "zarr.json"
        if meta.is_file():
            try:
                attrs = json.loads(meta.read_bytes()).get("attributes") or {}
            except (ValueError, AttributeError):
                attrs = {}
            return f"{folder} (a qkov run)" if attrs.get(schema.ATTR_RUN) else f"{folder} (a Zarr store)"
    return None


def check_root(store: RunStore, *, resume: bool, overwrite: bool) -> None:
    """The output is a qkov run's root (symlinks resolved) or a folder that is missing or empty,
    never a place inside another run; an interrupted `--overwrite` is finished only by another."""
    inside = enclosing_run(store)
    if inside is not None:
        from pathlib import Path

        real = Path(store.path.removeprefix("file://")).expanduser().resolve()
        shown = store.path if str(real) == store.path.removeprefix("file://") else f"{store.path} (-> {real})"
        raise StoreError(f"output.path {shown} lies inside {inside}; a run there would write into another run. "
                         "Choose an output.path outside any run.")
    if replacing(store):
        if not overwrite:
            raise StoreError(f"{store.path} holds a run that an interrupted {option('overwrite')} was deleting (its "
                             f"'{REPLACING}' folder); pass {option('overwrite')} to finish replacing it, or choose another output.path")
        return
    if resume and store.exists() and not store.is_run():
        raise StoreError(f"{option('resume')} refused: {store.path} is a Zarr group but not the root of a qkov run "
                         "(a run's group?); pass the run's own folder as output.path.")


def check_output(store: RunStore, job: JobSpec, *, resume: bool, overwrite: bool, plan=None) -> None:
    """Every refusal `prepare_output` would make, without writing anything and without the
    lock (so before any cluster starts): the backend is installed and reachable, the path is
    writable, no live run owns it, and an existing output is resumable or replaceable. With
    `plan` (a resume), the samples and weight files must be those the run started with."""
    if resume and overwrite:
        raise UsageError(f"{option('resume')} and {option('overwrite')} exclude each other; choose one")
    check_reachable(store)
    check_root(store, resume=resume, overwrite=overwrite)
    held = store.read_lock()
    if held is not None:
        from .store import _describe_owner, _lock_is_stale

        if not _lock_is_stale(held):
            raise StoreError(
                f"another qkov run owns the output {store.path} ({_describe_owner(held)}); wait for it to finish. "
                f"If that process is gone (e.g. on another machine), delete {store.path}/{schema.LOCK_GROUP} and retry."
            )
    if replacing(store):  # the next --overwrite finishes the deletion (check_root refused the rest)
        return
    exists = store.exists()
    if exists and not (resume or overwrite):
        raise StoreError(f"output {store.path} already exists; pass {option('resume')} to continue it or {option('overwrite')} to replace it")
    if exists and resume:
        _check_resumable(store, job)
        if plan is not None and _has_template(store):
            from .extract import _check_same_plan

            _check_same_plan(store, plan, job)
        return
    if exists and overwrite and not store.is_run():
        raise StoreError(f"{store.path} exists and is not a qkov run; refusing to overwrite it. Choose another output.path.")
    if not exists and store.entries():
        raise StoreError(
            f"output {store.path} exists, is not empty and is not a qkov run; refusing to write into it. "
            "Choose a new or empty output.path."
        )


def check_reachable(store: RunStore) -> None:
    """The output's storage backend is installed, has credentials and answers; a local output's
    nearest existing folder is a writable folder. Nothing is created."""
    import os
    from pathlib import Path

    from .store import is_url

    if is_url(store.path):
        import fsspec

        protocol = store.path.split("://", 1)[0]
        try:
            fs, path = fsspec.core.url_to_fs(store.path, **store.storage_options)
        except ImportError as e:
            raise UsageError(f"output.path {store.path}: the {protocol}:// storage backend is not installed ({e}); "
                             f"install it (e.g. pip install {'s3fs' if protocol in ('s3', 's3a') else 'the fsspec backend for ' + protocol})") from None
        except (ValueError, TypeError) as e:
            raise UsageError(f"output.path {store.path}: invalid [output] storage_options ({e})") from None
        try:
            fs.exists(path)
        except Exception as e:  # noqa: BLE001 - backends raise their own credential/network errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise StoreError(f"cannot reach the output {store.path} ({type(e).__name__}: {first}); check the credentials "
                             "([output] storage_options or the backend's environment variables) and the bucket") from None
        return
    local = Path(store.path.removeprefix("file://"))
    probe = local
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"cannot write the output {store.path}: {probe} is not a folder. Choose a writable output.path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write the output {store.path}: {probe} is not writable. Choose a writable output.path.")


def check_shared_output(job: JobSpec) -> None:
    """The work runs on a Dask cluster (worker processes): its output must be a store every
    process reaches. fsspec's memory:// lives in one process's memory: each worker would
    write into its own, empty copy."""
    if job.output.path.startswith("memory://"):
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
    from .extract import plan_extract

    if resume and overwrite:
        raise UsageError(f"{option('resume')} and {option('overwrite')} exclude each other; choose one")
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
        from .plan import plan as run_plan, require_fits

        from .plan import require_stats_memory

        predicted = run_plan(job, resume=resume or overwrite, extract_plan=plan)
        # first: permutations beyond memory also make the scores' stored sums beyond any disk
        slices = len(predicted.layers) * len(predicted.blocks) * max(predicted.heads.values())
        require_stats_memory(job.stats, plan.n_a, plan.n_b, slices, names=("stats.n_permutations", "stats.n_bootstrap"))
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


def _has_template(store: RunStore) -> bool:
    root = store.root()
    try:
        root[schema.WORK][schema.DONE]  # written last by the template
        root[schema.GRADIENTS]
        return True
    except KeyError:
        return False


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
    if resume and overwrite:
        raise UsageError(f"{option('resume')} and {option('overwrite')} exclude each other; choose one")
    if client is not None:
        check_shared_output(job)
    store = RunStore.of(job)
    summary = RunSummary(store.path)
    if plan is UNPLANNED:  # the CLI ran `preflight` before starting its cluster
        t = time.perf_counter()
        plan = preflight(job, resume=resume, overwrite=overwrite, local=client is None, cluster=client is not None)
        summary.timings["preflight"] = time.perf_counter() - t
    executor = executor_for(client)
    tick: Progress = progress or (lambda *_: None)
    with store.lock():
        fresh = prepare_output(store, job, resume=resume, overwrite=overwrite)
        if not fresh:  # completed-shard records are checked against the chunks that exist
            from .extract import missing_chunks, reopen_damaged_shards

            from .layer_groups import is_grouped, reopen_damaged_layers

            summary.repaired = reopen_damaged_shards(store)
            if is_grouped(store):  # no gradients to score again from: the damaged layers' groups run again
                summary.repaired_scores = bool(reopen_damaged_layers(store))
            elif store.is_complete(schema.SCORES_GROUP) and missing_chunks(store, schema.SCORES_GROUP):
                store.root("r+")[schema.SCORES_GROUP].attrs[schema.ATTR_COMPLETE] = False
                summary.repaired_scores = True

        def extract() -> None:
            nonlocal plan
            plan = plan or plan_extract(job)
            summary.extract = run_extract(store, job, executor, plan=plan, fresh=fresh or not _has_template(store),
                                          on_progress=lambda d, n: tick("extract", d, n))

        def score() -> None:  # progress per task of the score graph
            run_score(store, job, executor, on_progress=lambda d, n: tick("score", d, n))

        def stats() -> None:
            if "score" in summary.skipped_stages and store.is_complete(schema.STATS):
                # the scores are those the statistics were computed from: keep them, whatever their
                # settings (a user's `qkov stats --replace` is not undone by --resume)
                summary.skipped_stages.append("stats")
                return
            tick("stats", 0, 1)
            run_stats(store, job.stats, executor, replace=True)
            tick("stats", 1, 1)

        def by_layer_groups() -> None:  # keep_gradients = false: extract → score → drop per layer group
            nonlocal plan
            from .layer_groups import run_layer_groups

            plan = plan or plan_extract(job)
            t0 = time.perf_counter()
            summary.extract = ex = run_layer_groups(store, job, executor, plan, progress=tick)
            ex["loop_s"] = time.perf_counter() - t0  # the whole extract → score → drop loop
            # the stages interleave group by group: each one's time summed over the groups
            summary.timings.update(extract=ex["setup_s"] + ex["extract_s"], score=ex["score_s"], drop=ex["drop_s"])

        from .layer_groups import is_grouped

        grouped = not job.output.keep_gradients or is_grouped(store)
        stages = (  # (name, the groups it writes, how to run it)
            ("extract", (schema.GRADIENTS, schema.FISHER), extract),
            ("score", (schema.SCORES_GROUP,), score),
            ("stats", (), stats),  # always: cheap, and the job's settings are the ones asked for
        ) if not grouped else (
            ("score", (schema.GRADIENTS, schema.FISHER, schema.SCORES_GROUP), by_layer_groups),  # extract and score, interleaved
            ("stats", (), stats),
        )
        for name, groups, stage in stages:
            t = time.perf_counter()
            if groups and all(store.is_complete(g) for g in groups):
                summary.skipped_stages.append(name)
            else:
                stage()
            summary.timings.setdefault(name, time.perf_counter() - t)
        t = time.perf_counter()
        if grouped or not job.output.keep_work:  # every stage is complete: its bookkeeping is not needed
            store.delete(schema.WORK)
    # after the lock is gone (its group must not be listed): the README's xarray calls open the
    # finished run without "failed to open with consolidated metadata" warnings
    store.consolidate()
    summary.timings["finish"] = time.perf_counter() - t
    return summary
