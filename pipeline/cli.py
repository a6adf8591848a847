"""The `qkov` command line: run, stats, query, info, report, check, plan, validate, demo."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.markup import escape

from qkov.pipeline.console import console, err

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  # plain help: flags show as flags (rich help printed `<bool>` beside every one) and
                  # help texts are shown as written (rich read `[cluster]` as markup and dropped it)
                  rich_markup_mode=None,
                  help="qkov: where do two tasks interfere inside a transformer? Per-head Fisher-normalised interference with valid statistics.")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault: shown as one clear message, no traceback."""
    from qkov.pipeline.errors import QkovError

    return (QkovError, FileNotFoundError)


@contextmanager
def _friendly() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        from qkov.pipeline.errors import corrupt_chunk_error, os_error

        e = corrupt_chunk_error(e) or e  # a damaged chunk read by zarr itself (a remote store): the store's fault
        e = os_error(e) or e  # a full disk, a read-only mount, a name too long: the file system's refusal
        if isinstance(e, _user_errors()):
            # escaped: messages quote job-file sections such as [model.layout], which rich would eat as markup
            from qkov.pipeline.errors import cli_message

            # soft_wrap: one line whatever the width (a long path must not be folded into the message)
            err().print(f"[bold red]error:[/] {escape(cli_message(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        raise


REDELIVER_S = 2.0  # a Ctrl-C that has not ended the command by then is delivered again


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a batch scheduler's time limit, `kill`) unwinds like Ctrl-C: the run's lock is
    released and its cluster closed, so a requeued job on another node can --resume.

    Ctrl-C is made reliable: Python raises KeyboardInterrupt wherever the main thread is, and
    one raised inside a garbage-collection callback (distributed has several) is printed and
    dropped, leaving the run waiting with its lock held until a second Ctrl-C. So until the
    command has ended, a Ctrl-C is delivered again every REDELIVER_S seconds; releasing the
    lock is shielded from it (store.release_lock)."""
    import os
    import signal
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import gc

    interrupted = threading.Event()
    finished = threading.Event()
    soon = threading.Event()

    def in_gc_callback(frame) -> bool:
        codes = {getattr(getattr(cb, "__func__", cb), "__code__", None) for cb in gc.callbacks}
        while frame is not None:
            if frame.f_code in codes:
                return True
            frame = frame.f_back
        return False

    def on_sigint(signum, frame):
        interrupted.set()
        if in_gc_callback(frame):  # raised here, it would be printed ("Exception ignored") and dropped
            soon.set()
            return
        raise KeyboardInterrupt

    def redeliver() -> None:
        interrupted.wait()
        while not finished.wait(0.1 if soon.is_set() else REDELIVER_S):
            soon.clear()
            os.kill(os.getpid(), signal.SIGINT)

    before_term = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    before_int = signal.signal(signal.SIGINT, on_sigint)
    threading.Thread(target=redeliver, name="qkov-ctrl-c", daemon=True).start()
    try:
        yield
    except KeyboardInterrupt:
        finished.set()
        err().print("interrupted; nothing is marked complete that was not finished (continue a run with --resume)", highlight=False)
        raise typer.Exit(130) from None
    finally:
        finished.set()
        interrupted.set()  # ends the helper thread
        signal.signal(signal.SIGINT, before_int)
        signal.signal(signal.SIGTERM, before_term)


def _print_summary(path: str, storage_options=None, stats: str | None = None, top: int = 5, pair: str | None = None) -> None:
    """Where the results are, how to read them (for named statistics, with `--stats NAME`),
    then the answers: one table per question (conflict, share, differ), each naming its
    question, with direction, chance and effect (issue 16)."""
    from qkov.pipeline.query import format_headlines, headline_tables, load_stats

    from qkov.pipeline.store import RunStore

    store = RunStore(path, storage_options)
    if pair is None and store.is_multi():
        return _print_pairs(store, stats, top)
    named = f" --stats {stats}" if stats else ""
    console().print(f"\n[bold green]done.[/] results in [bold]{escape(path)}[/]")
    console().print(f"  read them with: qkov.answers({escape(repr(path))}{f', stats={stats!r}' if stats else ''}) (a table), "
                    f"or xarray.open_datatree({escape(repr(path))}, engine='zarr')", highlight=False)
    console().print(f"  slices: qkov query {escape(path)}{escape(named)} [--layer L] [--head H] [--block B]      "
                    f"report: qkov report {escape(path)}{escape(named)}", highlight=False)
    console().print(format_headlines(headline_tables(load_stats(store.select(pair), stats), top)))


def _print_pairs(store, stats: str | None, top: int) -> None:
    """After a run of more than two tasks: where its results are, then each task pair's answers."""
    from qkov.pipeline.query import format_headlines, headline_tables, load_stats

    path, names = store.path, store.task_names()
    named = f" --stats {stats}" if stats else ""
    console().print(f"\n[bold green]done.[/] results in [bold]{escape(path)}[/]: {len(store.pair_keys())} task pairs of "
                    f"{escape(', '.join(names.values()))}")
    console().print(f"  read one pair with: qkov.answers({escape(repr(path))}, pair='A,B'), qkov query {escape(path)} --pair A,B{escape(named)}; "
                    f"all of them: qkov report {escape(path)}{escape(named)}", highlight=False)
    pairs = store.pair_keys()
    if len(pairs) > 3:  # ten pairs' tables would bury each other: one line per pair, the tables in the report
        from qkov.pipeline.report import pair_counts

        for x, y in pairs:
            c = pair_counts(load_stats(store.pair(x, y), stats))
            console().print(f"  {escape(names[x])} × {escape(names[y])}: {c['conflict']} conflict, {c['synergy']} synergy "
                            f"(transfer test, BH q ≤ α within the pair), cross-task interference above / below chance in "
                            f"{c['more_overlap']} / {c['less_overlap']}, of {c['family']} slices", highlight=False)
        return
    for x, y in pairs:
        console().print(f"\n[bold]pair {escape(names[x])},{escape(names[y])}[/] (A = {escape(names[x])}, B = {escape(names[y])})")
        console().print(format_headlines(headline_tables(load_stats(store.pair(x, y), stats), top)))


@app.command()
def run(
    job_file: Path = typer.Argument(..., metavar="JOB.toml", help="TOML job file"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (tcp://host:8786); default: [cluster] of the job, else an embedded LocalCluster"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of the same job"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run at the output path"),
    inline: bool = typer.Option(False, "--inline", help="run in this process without a Dask cluster (debugging)"),
) -> None:
    """Extract → score → stats, then print where the results are and the top heads."""
    import qkov

    with _friendly(), _sigterm_unwinds():
        job = qkov.load_job(job_file)
        summary = qkov.run(job, scheduler=scheduler, resume=resume, overwrite=overwrite, inline=inline)
        if summary.extract:
            err().print(f"extract: {summary.extract['computed']} of {summary.extract['shards']} shards computed"
                      + (f", skipped samples {escape(str(summary.extract['skipped']))}" if summary.extract.get("skipped") else ""))
            if summary.extract.get("warning"):  # the sample counts left after skipping
                err().print(f"[bold yellow]warning:[/] {escape(summary.extract['warning'])}", highlight=False, soft_wrap=True)
        err().print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary.timings.items()))
        _print_summary(job.output.path, job.output.storage_options)


def _differ_counts(ds) -> str:
    """Per score, how many family slices differ from chance and which way (labels null, BH)."""
    from qkov.pipeline import schema
    from qkov.pipeline.schema import STATS_VARS as V

    parts = []
    for score in ds[schema.SCORE].values:
        d = ds.sel({schema.SCORE: score})
        fam = d[V.in_family]
        sig = d[V.significant].where(fam, False)
        if V.direction in d:
            above, below = int((sig & (d[V.direction] > 0)).sum()), int((sig & (d[V.direction] < 0)).sum())
            parts.append(f"{score}: {above} slices above chance, {below} below")
        else:
            parts.append(f"{score}: {int(sig.sum())} slices differ from chance")
    return "; ".join(parts) + f" (label-permutation null, BH q ≤ {ds.attrs['alpha']})"


@app.command()
def stats(
    run: str = typer.Argument(..., metavar="RUN", help="run directory or URL"),
    null: Optional[str] = typer.Option(None, "--null", help="null hypothesis (labels)"),
    n_permutations: Optional[int] = typer.Option(None, "--n-permutations"),
    n_bootstrap: Optional[int] = typer.Option(None, "--n-bootstrap"),
    alpha: Optional[float] = typer.Option(None, "--alpha"),
    alternative: Optional[str] = typer.Option(None, "--alternative", help="two-sided (a new job's default) | greater | less; one-sided hides effects the other way"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    name: Optional[str] = typer.Option(None, "--name", help="keep these statistics beside earlier ones as stats_<name>"),
    replace: bool = typer.Option(False, "--replace", help="replace existing statistics computed with other settings"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address"),
    exclude: Optional[list[str]] = typer.Option(
        None, "--exclude", metavar="SAMPLE_IDS",
        help="leave these samples out (ids, comma-separated or repeated; TASK:ID when an id is in both tasks): "
             "recomputed from the stored scores, the Fisher is not re-estimated; recorded in the stats attrs"),
    pair: Optional[str] = typer.Option(None, "--pair", metavar="A,B", help="the task pair to read, in a run of more than two tasks (task keys or names, A first)"),
) -> None:
    """Rerun the statistics on an existing run with new settings (model and gradients untouched)."""
    import qkov

    with _friendly(), _sigterm_unwinds():
        ds = qkov.run_stats(run, null=null, n_permutations=n_permutations, n_bootstrap=n_bootstrap, alpha=alpha,
                            alternative=alternative, seed=seed, name=name, replace=replace, scheduler=scheduler,
                            exclude=exclude, pair=pair)
        if ds.attrs.get("excluded_samples"):
            console().print(f"excluded {len(ds.attrs['excluded_samples'])} sample(s): "
                          f"{escape(', '.join(ds.attrs['excluded_samples']))} (scores of the others unchanged; Fisher from every sample)")
        console().print(f"statistics written ({'stats_' + name if name else 'stats'}): " + _differ_counts(ds), highlight=False)
        _print_summary(run, stats=name, pair=pair)


FORMATS = ("table", "csv", "json")


def _output_format(fmt: str, as_json: bool, allowed: tuple[str, ...] = FORMATS) -> str:
    from qkov.pipeline.errors import UsageError

    if fmt not in allowed:
        raise UsageError(f"--format {fmt!r} is not one of {' | '.join(allowed)}")
    if as_json and fmt not in ("table", "json"):
        raise UsageError(f"--json and --format {fmt} exclude each other; choose one")
    return "json" if as_json else fmt


def _print_json(data) -> None:
    import json

    print(json.dumps(data, indent=2, ensure_ascii=False))


@app.command()
def query(
    run: str = typer.Argument(..., metavar="RUN", help="run directory or URL"),
    layer: Optional[int] = typer.Option(None, "--layer", help="one layer (default: every layer)"),
    head: Optional[int] = typer.Option(None, "--head", help="one query head (default: every head); K and V: its KV head's slice"),
    block: Optional[str] = typer.Option(None, "--block", help="Q, K, V or O (default: every block)"),
    top: int = typer.Option(10, "--top", help="top sample pairs, shown when one head is selected (--layer and --head)"),
    score: str = typer.Option("interference", "--score", help="pairs ranked by interference (highest first) | alignment (most negative first)"),
    stats: Optional[str] = typer.Option(None, "--stats", help="read the statistics named NAME (stats_<NAME>, from `qkov stats --name`)"),
    fmt: str = typer.Option("table", "--format", help="table | csv (one row per slice and question, as qkov.answers) | json"),
    as_json: bool = typer.Option(False, "--json", help="the same as --format json"),
    pair: Optional[str] = typer.Option(None, "--pair", metavar="A,B", help="the task pair to read, in a run of more than two tasks (task keys or names, A first)"),
) -> None:
    """The statistics of any selection of slices (a head, all heads of a layer, one block across
    layers, the whole run); for one head (--layer and --head) also its top sample pairs, with
    your sample ids and texts, and its numerical health."""
    import qkov
    from qkov.pipeline.query import format_query, format_slices

    with _friendly():
        fmt = _output_format(fmt, as_json)
        res = qkov.query(run, layer=layer, head=head, block=block, top=top, score=score, stats=stats, pair=pair)
        if fmt == "json":
            _print_json(res)
        elif fmt == "csv":
            import pandas as pd

            from qkov.pipeline.query import ANSWER_COLUMNS

            sys.stdout.write(pd.DataFrame(res["slices"], columns=list(ANSWER_COLUMNS)).to_csv(index=False))
        else:
            console().print(format_query(res) if layer is not None and head is not None else format_slices(res))


@app.command()
def info(
    run: str = typer.Argument(..., metavar="RUN", help="run directory or URL"),
    fmt: str = typer.Option("table", "--format", help="table | json"),
) -> None:
    """What a run holds: its groups (named statistics stats_<NAME> included) with their settings,
    whether each is complete, and their bytes on disk; and who holds its lock, if anyone."""
    import qkov
    from qkov.pipeline.info import format_info

    with _friendly():
        fmt = _output_format(fmt, False, ("table", "json"))
        res = qkov.info(run)
        if fmt == "json":
            _print_json(res)
        else:
            console().print(format_info(res))


@app.command()
def report(
    run: str = typer.Argument(..., metavar="RUN", help="run directory or URL (`.` inside a run)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN-report, beside the run)"),
    stats: Optional[str] = typer.Option(None, "--stats", help="report the statistics named NAME (stats_<NAME>)"),
    raw_means: bool = typer.Option(False, "--raw-means", help="also draw the raw A×B means (each block on its own scale)"),
    pair: Optional[str] = typer.Option(None, "--pair", metavar="A,B", help="report one task pair of a run of more than two tasks (default: all of them, with a task × task overview)"),
) -> None:
    """Heatmaps (layer × head per block, significance marked) as PNG plus one HTML page."""
    import qkov

    with _friendly():
        html = qkov.report(run, out=out, stats=stats, raw_means=raw_means, pair=pair)
        console().print(f"report: [bold]{escape(str(html))}[/]")


@app.command()
def check(
    job_file: Path = typer.Argument(..., metavar="JOB.toml", help="TOML job file"),
    n_samples: int = typer.Option(4, "--n-samples", help="samples per task used by the checks"),
    prediction: bool = typer.Option(True, "--prediction/--no-prediction",
                                    help="also check that transfer predicts a measured loss change (float64 forward passes)"),
    prediction_slices: int = typer.Option(60, "--prediction-slices", help="slices the prediction check steps"),
    prediction_eta: float = typer.Option(1e-6, "--prediction-eta", help="the prediction check's natural-gradient step size η"),
) -> None:
    """Sanity checks on the job's model: additivity, scale, ablation, symmetry, prediction."""
    import qkov
    from qkov.pipeline.checks import format_checks

    with _friendly():
        res = qkov.check(qkov.load_job(job_file), n_samples=n_samples, prediction=prediction,
                         prediction_slices=prediction_slices, prediction_eta=prediction_eta, progress=True)
        per_pair = res if isinstance(res, dict) else {None: res}  # more than two tasks: each pair's checks
        for pair, ds in per_pair.items():
            if pair is not None:
                console().print(f"[bold]task pair {escape(pair)}[/]")
            console().print(format_checks(ds))
        if not all(bool(ds["passed"].all()) for ds in per_pair.values()):
            raise typer.Exit(1)


@app.command()
def plan(
    job_file: Path = typer.Argument(..., metavar="JOB.toml", help="TOML job file"),
    resume: bool = typer.Option(False, "--resume", help="count what the run at the output already holds (as `qkov run --resume`)"),
) -> None:
    """Before running: predicted bytes per store group, peak disk use, peak memory per task, task
    counts, and whether the output's free space holds the run (with the settings that would)."""
    import qkov

    with _friendly():
        p = qkov.plan(qkov.load_job(job_file), resume=resume)
        for line in p.lines():
            console().print(line, markup=False, highlight=False, soft_wrap=True)
        if p.options:
            console().print("  it would fit with: " + "; or ".join(p.options), markup=False, highlight=False, soft_wrap=True)


@app.command()
def validate(
    job_file: Path = typer.Argument(..., metavar="JOB.toml", help="TOML job file"),
    resume: bool = typer.Option(False, "--resume", help="check as `qkov run --resume` would"),
    overwrite: bool = typer.Option(False, "--overwrite", help="check as `qkov run --overwrite` would"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="as `qkov run --scheduler` (devices are then the workers' to check)"),
) -> None:
    """Check a job as `qkov run` would before it starts (job file, model folder and checkpoint,
    task files against the model, output), then print the job as TOML with every default filled in."""
    import qkov
    from qkov.pipeline.spec import to_toml

    with _friendly():
        job = qkov.validate(job_file, resume=resume, overwrite=overwrite, scheduler=scheduler, progress=True)
        console().print(to_toml(job.config_dict()), markup=False, highlight=False, soft_wrap=True)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the demo run goes"),
    samples: Optional[int] = typer.Option(None, "--samples", help="samples per task (default: the demo job's)"),
    inline: bool = typer.Option(False, "--inline", help="run in this process without a Dask cluster"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run at --out that `qkov demo` did not make"),
) -> None:
    """The whole job on the embedded default: SmolLM2-135M, arithmetic vs Python code, a LocalCluster."""
    import qkov

    with _friendly(), _sigterm_unwinds():
        html = qkov.demo(out, samples, inline=inline, overwrite=overwrite)
        _print_summary(qkov.demo_job(out, samples).output.path)
        console().print(f"report: [bold]{escape(str(html))}[/]")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
