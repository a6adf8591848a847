"""qkov's Python API: every CLI command as a function with the same parameters, returning
xarray objects (or dicts). A RUN is a path or URL (or a `RunStore`).

    import qkov
    job = qkov.load_job("job.toml")
    qkov.run(job)
    stats = qkov.open_stats(job.output.path)
    qkov.run_stats(job.output.path, n_permutations=9999, name="strict")
"""
from __future__ import annotations

from pipeline.errors import QkovError
from pipeline.spec import JobSpec, StatsSpec, load_job, parse_job
from pipeline.store import RunStore


def run(job: JobSpec, *, scheduler: str | None = None, resume: bool = False, overwrite: bool = False,
        inline: bool = False, progress=None):
    """`qkov run`: extract → score → stats. Uses the job's cluster (or `scheduler`), or runs
    in-process with inline=True."""
    from pipeline.cluster import cluster_client
    from pipeline.run import run_job

    if inline:
        return run_job(job, resume=resume, overwrite=overwrite, progress=progress)
    with cluster_client(job.cluster, scheduler) as client:
        return run_job(job, client=client, resume=resume, overwrite=overwrite, progress=progress)


def run_stats(run_path, *, null: str | None = None, n_permutations: int | None = None, n_bootstrap: int | None = None,
              alpha: float | None = None, alternative: str | None = None, seed: int | None = None,
              name: str | None = None, replace: bool = False, scheduler: str | None = None, storage_options=None,
              exclude: list[str] | None = None):
    """`qkov stats`: rerun the statistics with the run's stored settings, the given ones
    changed (None keeps the stored value). Holds the run's lock, as the CLI does.
    `exclude`: sample ids left out (from the stored scores; the Fisher is not re-estimated)."""
    from pipeline.stats_stage import rerun_stats

    store = RunStore.coerce(run_path, storage_options)
    settings = dict(null=null, n_permutations=n_permutations, n_bootstrap=n_bootstrap, alpha=alpha,
                    alternative=alternative, seed=seed)
    if scheduler:
        from pipeline.cluster import connect
        from pipeline.executors import executor_for

        with connect(scheduler) as client:
            return rerun_stats(store, executor_for(client), name=name, replace=replace, exclude=exclude, **settings)
    return rerun_stats(store, name=name, replace=replace, exclude=exclude, **settings)


def open_stats(run_path, name: str | None = None, storage_options=None):
    return RunStore.coerce(run_path, storage_options).open_stats(name)


def open_scores(run_path, storage_options=None):
    return RunStore.coerce(run_path, storage_options).open_scores()


def open_gradients(run_path, storage_options=None):
    return RunStore.coerce(run_path, storage_options).open_gradients()


def open_diagnostics(run_path, storage_options=None):
    """The run's `diagnostics` (numerical health per slice, per-sample norms, marginals and outlier
    flags; README "Health and outliers"), loaded; None for a run scored before they were recorded."""
    from pipeline.diagnostics import open_diagnostics as _open

    return _open(RunStore.coerce(run_path, storage_options))


def open_checks(run_path, storage_options=None):
    return RunStore.coerce(run_path, storage_options).open_checks()


def open_run(run_path, storage_options=None):
    """The whole run as an xarray DataTree (gradients lazily, not decoded)."""
    return RunStore.coerce(run_path, storage_options).open_tree()


def query(run_path, layer: int, head: int, block: str | None = None, top: int = 10, score: str = "interference",
          stats_name: str | None = None, storage_options=None):
    """`qkov query`: one head's statistics and its top sample pairs."""
    from pipeline.query import query_head

    return query_head(run_path, layer, head, block=block, top=top, score=score, stats_name=stats_name,
                      storage_options=storage_options)


def report(run_path, out_dir=None, stats_name: str | None = None, storage_options=None, raw_means: bool = False):
    """`qkov report`: effect heatmaps (300-dpi PNG + SVG) and one self-contained, interactive
    HTML page; returns the page's path. `raw_means` also draws the raw A×B means."""
    from pipeline.report import make_report

    return make_report(run_path, out_dir=out_dir, stats_name=stats_name, storage_options=storage_options,
                       raw_means=raw_means)


def check(job: JobSpec, n_samples: int = 4, prediction: bool = True, prediction_slices: int = 60,
          prediction_eta: float = 1e-6):
    """`qkov check`: the sanity checks on the job's model (with `prediction`, also whether transfer
    predicts a measured loss change), written to the run's `checks` group."""
    from pipeline.checks import run_checks

    return run_checks(job, n_samples=n_samples, prediction=prediction, prediction_slices=prediction_slices,
                      prediction_eta=prediction_eta)


def plan(job: JobSpec, *, resume: bool = False):
    """`qkov plan`: predicted bytes per store group, peak disk, memory per task, task counts and
    whether the output's free space holds the run (`RunPlan`; `.lines()` is what the CLI prints)."""
    from pipeline.plan import plan as run_plan

    return run_plan(job, resume=resume)


def validate(job_file, *, resume: bool = False, overwrite: bool = False, scheduler: str | None = None) -> JobSpec:
    """`qkov validate`: the job checked as `qkov run` would check it before starting (job file,
    model, task files, devices where the work runs here, output); returns it with every
    default filled in."""
    from pipeline.run import preflight

    job = load_job(job_file)
    preflight(job, resume=resume, overwrite=overwrite, local=not (scheduler or job.cluster.address or job.cluster.profile))
    return job


def demo(out="runs/demo", samples: int | None = None, *, inline: bool = False, overwrite: bool = False, progress=None):
    """`qkov demo`: the embedded default job run end to end and reported; returns the report's path."""
    from pipeline.demo import run_demo

    return run_demo(out, samples, inline=inline, overwrite=overwrite, progress=progress)[1]


def demo_job(out="runs/demo", samples: int | None = None) -> JobSpec:
    """The job `qkov demo` runs (pass it to `run`)."""
    from pipeline.demo import demo_job as _demo

    return _demo(out, samples)


__all__ = ["JobSpec", "StatsSpec", "RunStore", "QkovError", "load_job", "parse_job", "run", "run_stats", "open_stats",
           "open_scores", "open_gradients", "open_diagnostics", "open_checks", "open_run", "query", "report", "check", "validate", "plan", "demo", "demo_job"]
