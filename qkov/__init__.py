"""qkov's Python API: every CLI command as a function with the same parameter names, returning
xarray objects, pandas DataFrames or dicts. A RUN is a path or URL (or a `RunStore`).

    import qkov
    job = qkov.load_job("job.toml")
    qkov.run(job)                                  # works at a script's top level, no __main__ guard needed
    qkov.answers(job.output.path)                  # one row per slice and question
    qkov.run_stats(job.output.path, n_permutations=9999, name="strict")
"""
from __future__ import annotations

import os as _os

# The wheel installs the client and worker code inside this package (qkov/pipeline,
# qkov/workers); in a checkout those folders stand beside it, so look there too.
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "pipeline")):
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from qkov.pipeline.errors import QkovError
from qkov.pipeline.spec import JobSpec, StatsSpec, load_job, parse_job
from qkov.pipeline.store import RunStore


def _store(run, storage_options, pair: str | None) -> RunStore:
    """The run a reader reads: a run of more than two tasks needs `pair` ("A,B") and gives that
    pair's sub-run (`RunStore.select`)."""
    return RunStore.coerce(run, storage_options).select(pair)


def run(job: JobSpec, *, scheduler: str | None = None, resume: bool = False, overwrite: bool = False,
        inline: bool = False, progress=True):
    """`qkov run`: extract → score → stats; returns a `RunSummary`. Every input and the output are
    checked first, before any cluster starts; then the work runs on the job's cluster (or
    `scheduler`), or in-process with inline=True. The embedded cluster's workers never
    import the calling script, so a plain script needs no `if __name__ == "__main__":` guard.

    progress: True (default) prints what the CLI prints while it works to stderr (the plan, warnings,
    the cluster's address, each stage's progress: bars on a terminal, timestamped lines in a log or
    notebook); False prints nothing; a callable is called with (stage, done, total) instead."""
    from qkov.pipeline.launch import launch

    return launch(job, scheduler=scheduler, resume=resume, overwrite=overwrite, inline=inline, progress=progress)


def run_stats(run, *, null: str | None = None, n_permutations: int | None = None, n_bootstrap: int | None = None,
              alpha: float | None = None, alternative: str | None = None, seed: int | None = None,
              name: str | None = None, replace: bool = False, scheduler: str | None = None, storage_options=None,
              exclude: list[str] | None = None, pair: str | None = None):
    """`qkov stats`: rerun the statistics with the stored settings, the given ones changed (None
    keeps the stored value): those of `stats_<name>` when that group exists, else the run's.
    Holds the run's lock, as the CLI does. `exclude`: sample ids left out (from the stored
    scores; the Fisher is not re-estimated). `pair` ("A,B", task keys or names): the task pair
    of a run of more than two tasks whose statistics are rerun (every reader takes it too)."""
    from qkov.pipeline.plan import check_stats_request
    from qkov.pipeline.stats_stage import rerun_stats

    store = _store(run, storage_options, pair)
    settings = dict(null=null, n_permutations=n_permutations, n_bootstrap=n_bootstrap, alpha=alpha,
                    alternative=alternative, seed=seed)
    check_stats_request(store, name, **settings)  # a name too long, permutations beyond memory: refused first
    if scheduler:
        from qkov.pipeline.cluster import connect
        from qkov.pipeline.executors import executor_for

        with connect(scheduler) as client:
            return rerun_stats(store, executor_for(client), name=name, replace=replace, exclude=exclude, **settings)
    return rerun_stats(store, name=name, replace=replace, exclude=exclude, **settings)


def open_stats(run, stats: str | None = None, storage_options=None, pair: str | None = None):
    """The statistics (`stats`, or `stats_<stats>` from `qkov stats --name`), loaded."""
    return _store(run, storage_options, pair).open_stats(stats)


def open_scores(run, storage_options=None, pair: str | None = None):
    """The logical scores dataset, lazily (sample ids as plain `str` coordinates: plottable)."""
    return _store(run, storage_options, pair).open_scores()


def open_gradients(run, storage_options=None, pair: str | None = None):
    return _store(run, storage_options, pair).open_gradients()


def open_diagnostics(run, storage_options=None, pair: str | None = None):
    """The run's `diagnostics` (numerical health per slice, per-sample norms, marginals and outlier
    flags; docs/health.md), loaded; None for a run scored before they were recorded."""
    from qkov.pipeline.health import open_diagnostics as _open

    return _open(_store(run, storage_options, pair))


def open_checks(run, storage_options=None, pair: str | None = None):
    return _store(run, storage_options, pair).open_checks()


def open_run(run, storage_options=None):
    """The whole run as an xarray DataTree (gradients lazily, not decoded)."""
    return RunStore.coerce(run, storage_options).open_tree()


def answers(run, stats: str | None = None, storage_options=None, pair: str | None = None):
    """The run's answers as a pandas DataFrame: one row per slice (block, layer, head; K/V once
    per KV head, `kv_head` the KV head a row's head reads) and question — `differ` (per score:
    the A×B mean vs chance, estimate = mean − chance), `transfer` (alignment: does a step on
    B's loss raise A's loss, conflict, or lower it, synergy) and `shared` (interference sharing
    ratio) — with the question in words (`asks`), the estimate's `units`, `estimate`,
    `ci_low`/`ci_high`, `p_value`, `q_value`, `significant`, `direction`, `verdict`, and the
    figures the headline tables show beside them (mean, chance, cosine, sharing per direction…).
    `stats` reads `stats_<stats>`. `df.attrs` holds the statistics' settings; `df.to_csv` exports.
    A run of more than two tasks needs `pair` ("A,B"); `pair="all"` gives every pair's rows with
    `task_a`, `task_b` and `q_value_across_pairs` (BH over all pairs, for ranking across them)."""
    from qkov.pipeline.query import answers as _answers

    if pair == "all":
        from qkov.pipeline.query import answers_all_pairs

        return answers_all_pairs(RunStore.coerce(run, storage_options), stats=stats)
    return _answers(_store(run, storage_options, pair), stats=stats)


def info(run, storage_options=None) -> dict:
    """`qkov info`: the run's groups (named statistics `stats_<name>` included), each with its
    settings, whether it is complete and its bytes on disk; the run's total bytes and lock owner."""
    from qkov.pipeline.info import describe_run

    return describe_run(run, storage_options)


def query(run, layer: int | None = None, head: int | None = None, block: str | None = None, top: int = 10,
          score: str = "interference", stats: str | None = None, storage_options=None, pair: str | None = None) -> dict:
    """`qkov query`: the statistics of any selection of slices — one head, all heads of a layer,
    one block across layers, the whole run. Always `slices`: the selected rows of `answers`
    (JSON-able). With both `layer` and `head`, also the head's statistics per block (`blocks`),
    its top `top` sample pairs ranked by `score`, with your ids and texts, and its health."""
    from qkov.pipeline.query import query as _query

    return _query(_store(run, storage_options, pair), layer=layer, head=head, block=block, top=top, score=score,
                  stats=stats)


def report(run, out=None, stats: str | None = None, raw_means: bool = False, storage_options=None,
           pair: str | None = None):
    """`qkov report`: effect heatmaps (300-dpi PNG + SVG) and one self-contained, interactive
    HTML page in `out` (default: RUN-report beside the run); returns the page's path. `stats`
    reports `stats_<stats>`; `raw_means` also draws the raw A×B means."""
    from qkov.pipeline.report import make_report

    store = RunStore.coerce(run, storage_options)
    if pair is not None:
        store = store.select(pair)
    return make_report(store, out_dir=out, stats_name=stats, raw_means=raw_means)


def check(job: JobSpec, n_samples: int = 4, prediction: bool = True, prediction_slices: int = 60,
          prediction_eta: float = 1e-6, progress=False):
    """`qkov check`: the sanity checks on the job's model (with `prediction`, also whether transfer
    predicts a measured loss change), written to the run's `checks` group; refused before any
    model work when the output is a folder that is not a run. progress: True prints each step to
    stderr as the CLI does, a callable is called with (step, done, total), False prints nothing.
    A job of more than two tasks is checked pair by pair (each pair's `checks` in its sub-run):
    then {"a-b": dataset, …}."""
    from qkov.pipeline.checks import check_checks_output, run_checks
    from qkov.pipeline.console import print_step

    if progress and not callable(progress):
        progress = lambda what, k, n: print_step("check", what, k, n)  # noqa: E731
    check_checks_output(job)
    return run_checks(job, n_samples=n_samples, prediction=prediction, prediction_slices=prediction_slices,
                      prediction_eta=prediction_eta, progress=progress or None)


def plan(job: JobSpec, *, resume: bool = False):
    """`qkov plan`: predicted bytes per store group, peak disk, memory per task, task counts and
    whether the output's free space holds the run (`RunPlan`; `.lines()` is what the CLI prints)."""
    from qkov.pipeline.plan import plan as run_plan

    return run_plan(job, resume=resume)


def validate(job_file, *, resume: bool = False, overwrite: bool = False, scheduler: str | None = None,
             progress=False) -> JobSpec:
    """`qkov validate`: the job checked as `qkov run` would check it before starting (job file,
    model, task files, devices where the work runs here, output); returns it with every
    default filled in. progress: True prints the warnings `qkov run` would print (few samples)."""
    from qkov.pipeline.launch import check_job

    job = load_job(job_file)
    check_job(job, resume=resume, overwrite=overwrite, scheduler=scheduler, loud=bool(progress))
    return job


def demo(out="runs/demo", samples: int | None = None, *, inline: bool = False, overwrite: bool = False, progress=True):
    """`qkov demo`: the embedded default job run end to end and reported; returns the report's
    path. `progress` as in `run` (True: printed to stderr, False: silent, or a callable)."""
    from qkov.pipeline.demo import run_demo

    return run_demo(out, samples, inline=inline, overwrite=overwrite, progress=progress)[1]


def demo_job(out="runs/demo", samples: int | None = None) -> JobSpec:
    """The job `qkov demo` runs (pass it to `run`)."""
    from qkov.pipeline.demo import demo_job as _demo

    return _demo(out, samples)


__all__ = ["JobSpec", "StatsSpec", "RunStore", "QkovError", "load_job", "parse_job", "run", "run_stats", "open_stats",
           "open_scores", "open_gradients", "open_diagnostics", "open_checks", "open_run", "answers", "info", "query",
           "report", "check", "validate", "plan", "demo", "demo_job"]
