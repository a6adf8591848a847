"""`qkov run`: extract → score → stats on one output, owned by one process at a time."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zarr

from . import schema
from .executors import executor_for
from .extract import plan_extract, run_extract
from .score import run_score
from .spec import JobSpec
from .store import LOCK_GROUP, StoreError, is_complete, is_url, open_root, owned, read_provenance, zarr_store

ATTR_RUN = "qkov_run"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class RunSummary:
    path: str
    extract: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    skipped_stages: list = field(default_factory=list)


def _exists(path: str, storage_options: dict) -> bool:
    try:
        zarr.open_group(zarr_store(path, storage_options, read_only=True), mode="r", zarr_format=3)
        return True
    except (OSError, zarr.errors.GroupNotFoundError):  # missing, or not a folder at all
        return False


def _entries(path: str, storage_options: dict) -> list[str]:
    """What lies directly under the output (nothing when it does not exist), our lock excluded."""
    if is_url(path) and not path.startswith("file://"):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
        try:
            found = [e.rstrip("/") for e in fs.ls(p, detail=False)]
        except FileNotFoundError:
            return []
        return [e for e in found if e.rsplit("/", 1)[-1] != LOCK_GROUP]
    local = Path(path.removeprefix("file://"))
    return [str(c) for c in local.iterdir() if c.name != LOCK_GROUP] if local.is_dir() else []


def _remove(path: str, storage_options: dict) -> None:
    """Delete a previous qkov run at `path`, keeping the lock this process holds on it."""
    root = open_root(path, storage_options, mode="r")
    if not root.attrs.get(ATTR_RUN):  # never delete something that is not a qkov run
        raise StoreError(f"{path} exists and is not a qkov run; refusing to overwrite it. Choose another output.path.")
    if is_url(path) and not path.startswith("file://"):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
        for entry in _entries(path, storage_options):
            fs.rm(entry, recursive=True)
    else:
        for entry in map(Path, _entries(path, storage_options)):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


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


def _check_resumable(job: JobSpec) -> None:
    root = open_root(job.output.path, job.output.storage_options, mode="r")
    version = root.attrs.get(schema.ATTR_SCHEMA)
    if version != schema.SCHEMA_VERSION:
        raise StoreError(
            f"--resume refused: {job.output.path} was written with store schema version {version}, this qkov writes "
            f"version {schema.SCHEMA_VERSION}; start over with --overwrite or use the qkov that wrote it."
        )
    old = read_provenance(root).get("config") or {}
    new = job.config_dict()
    # where the work runs and where the run lives (a moved or synced run) may change between
    # attempts; what is computed may not
    diff = [k for k in config_differences(old, new) if not k.startswith(("cluster.", "output."))]
    if diff:
        raise StoreError(
            f"--resume refused: the job file differs from the one this run was started with, at {diff}. "
            "Restore those keys, or start over with --overwrite."
        )


def prepare_output(job: JobSpec, *, resume: bool, overwrite: bool) -> bool:
    """Decide fresh vs resume; returns True when the run starts fresh."""
    path, so = job.output.path, job.output.storage_options
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    exists = _exists(path, so)
    if exists and not (resume or overwrite):
        raise StoreError(f"output {path} already exists; pass --resume to continue it or --overwrite to replace it")
    if exists and resume:
        _check_resumable(job)
        return False
    if exists and overwrite:
        _remove(path, so)
    elif _entries(path, so):  # creating a zarr group with mode "w" would wipe the folder
        raise StoreError(
            f"output {path} exists, is not empty and is not a qkov run; refusing to write into it. "
            "Choose a new or empty output.path."
        )
    try:
        root = zarr.open_group(zarr_store(path, so), mode="a", zarr_format=3)
    except OSError as e:
        raise StoreError(f"cannot write the output {path}: {e}. Choose a writable output.path.") from None
    from .store import provenance

    root.attrs.update({ATTR_RUN: True, **provenance(job.config_dict(), job.config_hash(), stage="run")})
    return True


def run_job(job: JobSpec, *, client=None, resume: bool = False, overwrite: bool = False,
            progress: Progress | None = None) -> RunSummary:
    """Run every stage not already complete. `client=None` runs in-process.

    Every input (model, layout, task files, layers) is validated before the output is
    touched, so a bad input leaves no output behind and never removes a previous run.
    The whole run holds the output's lock: a second run on it is refused.
    """
    from .stats_stage import run_stats

    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    path, so = job.output.path, job.output.storage_options
    plan = None if resume and _exists(path, so) else plan_extract(job)
    summary = RunSummary(path)
    executor = executor_for(client)
    tick: Progress = progress or (lambda *_: None)
    with owned(path, so):
        fresh = prepare_output(job, resume=resume, overwrite=overwrite)
        root = open_root(path, so, mode="r+")
        t = time.perf_counter()
        if not is_complete(root, schema.GRADIENTS) or not is_complete(root, schema.FISHER):
            plan = plan or plan_extract(job)
            has_template = not fresh and _has_template(root)
            summary.extract = run_extract(job, executor, plan=plan, fresh=not has_template,
                                          on_progress=lambda d, n: tick("extract", d, n))
        else:
            summary.skipped_stages.append("extract")
        summary.timings["extract"] = time.perf_counter() - t
        t = time.perf_counter()
        if not is_complete(root, schema.SCORES_GROUP):
            tick("score", 0, 1)
            run_score(job, executor)
            tick("score", 1, 1)
        else:
            summary.skipped_stages.append("score")
        summary.timings["score"] = time.perf_counter() - t
        t = time.perf_counter()
        tick("stats", 0, 1)
        run_stats(path, job.stats, client=client, replace=True, storage_options=so or None)
        tick("stats", 1, 1)
        summary.timings["stats"] = time.perf_counter() - t
    return summary


def _has_template(root: zarr.Group) -> bool:
    try:
        root[schema.WORK]["done"]
        root[schema.GRADIENTS]
        return True
    except KeyError:
        return False
