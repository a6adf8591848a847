"""In-process execution: tasks one after another, Dask graphs on the threaded scheduler."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import dask


class InlineExecutor:
    def map(self, fn: Callable, items: Iterable[Any], *, gpu: bool = False, on_result: Callable | None = None) -> list:
        out = []
        for item in items:
            r = fn(item)
            if on_result is not None:
                on_result(r)
            out.append(r)
        return out

    def one_process(self) -> bool:
        return True

    def gpu_slots(self) -> int:
        """Device tasks that run at once."""
        return 1

    def compute(self, *collections, on_progress: Callable[[int, int], None] | None = None):
        """Dask's threaded scheduler, one torch thread per task (qkov.workers.device says why);
        `on_progress(done, total)` after every task of the graphs."""
        from dask.callbacks import Callback

        from qkov.workers.device import one_thread_per_task

        class Ticks(Callback):
            def _start(self, dsk):
                self.total, self.done = len(dsk), 0
                on_progress(0, self.total)

            def _posttask(self, key, result, dsk, state, worker_id):
                self.done += 1
                on_progress(min(self.done, self.total), self.total)

            def _finish(self, dsk, state, errored):
                if not errored:  # the scheduler may run fewer tasks than the graph lists (culled keys)
                    on_progress(self.total, self.total)

        with one_thread_per_task(), (Ticks() if on_progress is not None else _nothing()):
            return dask.compute(*collections, scheduler="threads")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
