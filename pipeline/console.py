"""What qkov prints while it works, for the CLI and the Python API alike: the consoles (stdout
for results, stderr for progress and messages) and the stages' progress, as bars on a terminal
and as timestamped lines elsewhere (a batch job's log, a pipe, a notebook)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console

# Output width: a terminal's own (or COLUMNS); 160 columns where output is not a terminal (a
# log, a pipe, a notebook's `!qkov`), so tables stay whole instead of cut at 80. Built per
# print, never at import: a width fixed then would outlive the environment it was read from.
PIPE_WIDTH = 160

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, width=PIPE_WIDTH)
    return c


def console() -> Console:
    return _console(stderr=False)


def err() -> Console:
    return _console(stderr=True)


def stamp() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_step(stage: str, what: str, done: int, total: int) -> None:
    """One timestamped step of a stage on stderr (`qkov check` prints its checks so)."""
    from rich.markup import escape

    err().print(f"{stamp()} {stage} {done}/{total}: {escape(what)}", highlight=False)


@contextmanager
def plain_progress(every_s: float = 30.0) -> Iterator[Progress]:
    """Progress as timestamped lines on stderr: a line when a stage starts and ends, at each
    tenth of it, and at least every `every_s` seconds."""
    import time

    state: dict[str, tuple[float, int, bool]] = {}

    def tick(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        prev = state.get(stage)
        decile, finished = (10 * done) // max(1, total), done >= total
        if prev is not None and (prev[2] or (not finished and decile == prev[1] and now - prev[0] < every_s)):
            return
        state[stage] = (now, decile, finished)
        print(f"{stamp()} {stage}: {done}/{total}" + (" done" if finished else ""), file=sys.stderr, flush=True)

    yield tick


@contextmanager
def stage_progress() -> Iterator[Progress]:
    """The stages' progress on stderr: bars on a terminal, else `plain_progress` lines."""
    if not err().is_terminal:
        with plain_progress() as tick:
            yield tick
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = (TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Bars(*cols, console=err(), transient=False) as prog:
        tasks: dict[str, int] = {}

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        yield tick


@contextmanager
def progress_for(progress: "bool | Progress | None") -> Iterator[Progress | None]:
    """The API's `progress` argument as a callback: True shows it as the CLI does
    (`stage_progress`), False or None shows nothing, a callable is called with (stage, done, total)."""
    if callable(progress):
        yield progress
    elif progress:
        with stage_progress() as tick:
            yield tick
    else:
        yield None
