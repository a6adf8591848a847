"""qkov's Python API: every CLI command as a function returning xarray objects (or dicts).

    import qkov
    job = qkov.load_job("job.toml")
    qkov.run(job)
    stats = qkov.open_stats(job.output.path)
"""
from __future__ import annotations

from pipeline.spec import JobSpec, StatsSpec, load_job, parse_job


def run(job: JobSpec, *, scheduler: str | None = None, resume: bool = False, overwrite: bool = False,
        inline: bool = False, progress=None):
    """Extract → score → stats. Uses the job's cluster (or `scheduler`), or runs in-process with inline=True."""
    from pipeline.cluster import cluster_client
    from pipeline.run import run_job

    if inline:
        return run_job(job, resume=resume, overwrite=overwrite, progress=progress)
    with cluster_client(job.cluster, scheduler) as client:
        return run_job(job, client=client, resume=resume, overwrite=overwrite, progress=progress)


def run_stats(run_path: str, settings: StatsSpec, *, name: str | None = None, replace: bool = False,
              client=None, storage_options=None):
    from pipeline.stats_stage import run_stats as _run_stats

    return _run_stats(run_path, settings, client=client, name=name, replace=replace, storage_options=storage_options)


def open_stats(run_path: str, name: str | None = None, storage_options=None):
    from pipeline.stats_stage import open_stats as _open

    return _open(run_path, name, storage_options=storage_options)


def open_scores(run_path: str, storage_options=None):
    from pipeline.score import open_scores as _open

    return _open(run_path, storage_options)


def open_gradients(run_path: str, storage_options=None):
    from pipeline.score import open_gradients as _open

    return _open(run_path, storage_options)


def open_run(run_path: str, storage_options=None):
    """The whole run as an xarray DataTree (gradients lazily, not decoded)."""
    import xarray as xr

    return xr.open_datatree(run_path, engine="zarr", consolidated=False, storage_options=storage_options)


def query(run_path: str, layer: int, head: int, block: str | None = None, top: int = 10, score: str = "interference"):
    from pipeline.query import query_head

    return query_head(run_path, layer, head, block=block, top=top, score=score)


def report(run_path: str, out_dir=None):
    from pipeline.report import make_report

    return make_report(run_path, out_dir=out_dir)


def check(job: JobSpec, n_samples: int = 4):
    from pipeline.checks import run_checks

    return run_checks(job, n_samples=n_samples)


def demo_job(out="runs/demo", samples: int | None = None) -> JobSpec:
    from pipeline.demo import demo_job as _demo

    return _demo(out, samples)


__all__ = ["JobSpec", "StatsSpec", "load_job", "parse_job", "run", "run_stats", "open_stats", "open_scores",
           "open_gradients", "open_run", "query", "report", "check", "demo_job"]
