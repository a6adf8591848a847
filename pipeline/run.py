"""`qkov run`: extract → score → stats on one output, owned by one process at a time."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zarr

from . import schema
from .executors import executor_for
from .extract import plan_extract, run_extract
from .score import run_score
from .spec import JobSpec
from .store import StoreError, acquire_lock, is_complete, is_url, open_root, read_provenance, release_lock, zarr_store

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
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False


def _remove(path: str, storage_options: dict) -> None:
    root = open_root(path, storage_options, mode="r")
    if not root.attrs.get(ATTR_RUN):  # never delete something that is not a qkov run
        raise StoreError(f"{path} exists and is not a qkov run; refusing to overwrite it. Choose another output.path.")
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
        fs.rm(p, recursive=True)
    else:
        shutil.rmtree(path.removeprefix("file://"))


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
    old = read_provenance(root).get("config") or {}
    new = job.config_dict()
    # where the work runs may change between attempts; what is computed may not
    diff = [k for k in config_differences(old, new) if not k.startswith("cluster.")]
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
    try:
        root = zarr.open_group(zarr_store(path, so), mode="w", zarr_format=3)
    except OSError as e:
        raise StoreError(f"cannot write the output {path}: {e}. Choose a writable output.path.") from None
    from .store import provenance

    root.attrs.update({ATTR_RUN: True, **provenance(job.config_dict(), job.config_hash(), stage="run")})
    return True


def run_job(job: JobSpec, *, client=None, resume: bool = False, overwrite: bool = False,
            progress: Progress | None = None) -> RunSummary:
    """Run every stage not already complete. `client=None` runs in-process."""
    from .stats_stage import run_stats

    fresh = prepare_output(job, resume=resume, overwrite=overwrite)
    root = open_root(job.output.path, job.output.storage_options, mode="r+")
    token = acquire_lock(root)
    summary = RunSummary(job.output.path)
    executor = executor_for(client)
    tick: Progress = progress or (lambda *_: None)
    try:
        t = time.perf_counter()
        if not is_complete(root, schema.GRADIENTS) or not is_complete(root, schema.FISHER):
            plan = plan_extract(job)
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
        run_stats(job.output.path, job.stats, client=client, replace=True, storage_options=job.output.storage_options or None)
        tick("stats", 1, 1)
        summary.timings["stats"] = time.perf_counter() - t
    finally:
        release_lock(open_root(job.output.path, job.output.storage_options, mode="r+"), token)
    return summary


def _has_template(root: zarr.Group) -> bool:
    try:
        root[schema.WORK]["done"]
        root[schema.GRADIENTS]
        return True
    except KeyError:
        return False
