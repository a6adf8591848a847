"""The `qkov` command line: run, stats, query, report, check, demo, validate."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="qkov: where do two tasks interfere inside a transformer? Per-head Fisher-normalised interference with valid statistics.")
console = Console(stderr=False)
err = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault: shown as one clear message, no traceback."""
    from pipeline.spec import JobFileError
    from pipeline.store import StoreError
    from workers.layouts import UnsupportedModelError
    from workers.models import ModelLoadError
    from workers.tasks import TaskFileError
    from workers.writer import NonFiniteGradientError

    from pipeline.cluster import ClusterError
    from pipeline.stats_stage import StatsStageError

    return (JobFileError, StoreError, UnsupportedModelError, ModelLoadError, TaskFileError, NonFiniteGradientError,
            FileNotFoundError, ClusterError, StatsStageError)


@contextmanager
def _friendly() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if isinstance(e, _user_errors()) or type(e) is ValueError:
            # escaped: messages quote job-file sections such as [model.layout], which rich would eat as markup
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None
        raise


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a batch scheduler's time limit, `kill`) unwinds like Ctrl-C: the run's lock is
    released and its cluster closed, so a requeued job on another node can --resume."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextmanager
def _stage_progress() -> Iterator:
    cols = (TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*cols, console=err, transient=False) as prog:
        tasks: dict[str, int] = {}

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        yield tick


def _print_summary(path: str, storage_options=None, stats_name: str | None = None) -> None:
    from pipeline.query import format_significant, significant_heads

    console.print(f"\n[bold green]done.[/] results in [bold]{path}[/]")
    console.print(f"  read them with: xarray.open_datatree({path!r}, engine='zarr')")
    console.print(f"  heads:  qkov query {path} --layer L --head H      report:  qkov report {path}")
    console.print(format_significant(significant_heads(path, storage_options=storage_options, stats_name=stats_name)))


@app.command()
def run(
    job_file: Path = typer.Argument(..., help="TOML job file"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (tcp://host:8786); default: [cluster] of the job, else an embedded LocalCluster"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of the same job"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run at the output path"),
    inline: bool = typer.Option(False, "--inline", help="run in this process without a Dask cluster (debugging)"),
) -> None:
    """Extract → score → stats, then print where the results are and the top heads."""
    from pipeline.cluster import cluster_client
    from pipeline.run import run_job
    from pipeline.spec import load_job

    with _friendly(), _sigterm_unwinds():
        job = load_job(job_file)
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other; choose one")
        with _stage_progress() as tick:
            if inline:
                summary = run_job(job, resume=resume, overwrite=overwrite, progress=tick)
            else:
                with cluster_client(job.cluster, scheduler) as client:
                    err.print(f"cluster: {client.dashboard_link or client.scheduler.address}")
                    summary = run_job(job, client=client, resume=resume, overwrite=overwrite, progress=tick)
        if summary.extract:
            err.print(f"extract: {summary.extract['computed']} of {summary.extract['shards']} shards computed"
                      + (f", skipped samples {escape(str(summary.extract['skipped']))}" if summary.extract.get("skipped") else ""))
        err.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary.timings.items()))
        _print_summary(job.output.path, job.output.storage_options)


@app.command()
def stats(
    run_path: str = typer.Argument(..., metavar="RUN", help="run directory or URL"),
    null: Optional[str] = typer.Option(None, "--null", help="null hypothesis (labels)"),
    n_permutations: Optional[int] = typer.Option(None, "--n-permutations"),
    n_bootstrap: Optional[int] = typer.Option(None, "--n-bootstrap"),
    alpha: Optional[float] = typer.Option(None, "--alpha"),
    alternative: Optional[str] = typer.Option(None, "--alternative", help="greater | less | two-sided"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    name: Optional[str] = typer.Option(None, "--name", help="keep these statistics beside earlier ones as stats_<name>"),
    replace: bool = typer.Option(False, "--replace", help="replace existing statistics computed with other settings"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address"),
) -> None:
    """Rerun the statistics on an existing run with new settings (model and gradients untouched)."""
    from pydantic import ValidationError

    from pipeline.spec import StatsSpec
    from pipeline.stats_stage import run_stats
    from pipeline.store import open_root, owned, read_provenance

    with _friendly():
        base = (read_provenance(open_root(run_path)).get("config") or {}).get("stats", {})
        over = {k: v for k, v in dict(null=null, n_permutations=n_permutations, n_bootstrap=n_bootstrap, alpha=alpha,
                                       alternative=alternative, seed=seed).items() if v is not None}
        try:
            settings = StatsSpec(**{**base, **over})
        except ValidationError as e:
            raise ValueError("; ".join(f"--{'-'.join(str(x) for x in er['loc']).replace('_', '-')}: {er['msg']}" for er in e.errors())) from None
        with owned(run_path):  # never beside a `qkov run` (or another `qkov stats`) writing this run
            if scheduler:
                from pipeline.cluster import connect

                with connect(scheduler) as client:
                    ds = run_stats(run_path, settings, client=client, name=name, replace=replace)
            else:
                ds = run_stats(run_path, settings, name=name, replace=replace)
        n_sig = int(ds["significant"].where(ds["in_family"], False).sum())
        console.print(f"statistics written ({'stats_' + name if name else 'stats'}): {n_sig} significant slices at alpha={settings.alpha}")
        _print_summary(run_path, stats_name=name)


@app.command()
def query(
    run_path: str = typer.Argument(..., metavar="RUN"),
    layer: int = typer.Option(..., "--layer"),
    head: int = typer.Option(..., "--head"),
    block: Optional[str] = typer.Option(None, "--block", help="Q, K, V or O (default: all)"),
    top: int = typer.Option(10, "--top", help="number of top interfering pairs"),
    score: str = typer.Option("interference", "--score", help="interference | alignment"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """A head's statistics and its top interfering sample pairs (with your sample ids)."""
    import json

    from pipeline.query import format_query, query_head

    with _friendly():
        res = query_head(run_path, layer, head, block=block, top=top, score=score)
        if as_json:
            console.print_json(json.dumps(res))
        else:
            console.print(format_query(res))


@app.command()
def report(
    run_path: str = typer.Argument(..., metavar="RUN"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN-report, beside the run)"),
) -> None:
    """Heatmaps (layer × head per block, significance marked) as PNG plus one HTML page."""
    from pipeline.report import make_report

    with _friendly():
        html = make_report(run_path, out_dir=out)
        console.print(f"report: [bold]{html}[/]")


@app.command()
def check(
    job_file: Path = typer.Argument(..., help="TOML job file"),
    n_samples: int = typer.Option(4, "--n-samples", help="samples per task used by the checks"),
) -> None:
    """Sanity checks on the job's model: additivity, scale, ablation, symmetry."""
    from pipeline.checks import format_checks, run_checks
    from pipeline.spec import load_job

    with _friendly():
        job = load_job(job_file)
        ds = run_checks(job, n_samples=n_samples)
        console.print(format_checks(ds))
        if not bool(ds["passed"].all()):
            raise typer.Exit(1)


@app.command()
def validate(job_file: Path = typer.Argument(..., help="TOML job file")) -> None:
    """Validate a job file and print it with every default filled in."""
    import json

    from pipeline.spec import load_job

    with _friendly():
        job = load_job(job_file)
        console.print_json(json.dumps(job.config_dict()))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the demo run goes"),
    samples: Optional[int] = typer.Option(None, "--samples", help="samples per task (default: the demo job's)"),
    inline: bool = typer.Option(False, "--inline", help="run in this process without a Dask cluster"),
) -> None:
    """The whole job on the embedded default: SmolLM2-135M, arithmetic vs Python code, a LocalCluster."""
    from pipeline.cluster import cluster_client
    from pipeline.demo import demo_job
    from pipeline.report import make_report
    from pipeline.run import run_job

    with _friendly():
        job = demo_job(out, samples=samples)
        err.print(f"demo: {job.model.name}, {job.tasks.a.name} vs {job.tasks.b.name}, "
                  f"{job.tasks.a.limit}+{job.tasks.b.limit} samples, layers {job.score.layers or 'all'} → {job.output.path}")
        with _stage_progress() as tick:
            if inline:
                run_job(job, overwrite=True, progress=tick)
            else:
                with cluster_client(job.cluster) as client:
                    run_job(job, client=client, overwrite=True, progress=tick)
        _print_summary(job.output.path)
        html = make_report(job.output.path)
        console.print(f"report: [bold]{html}[/]")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
