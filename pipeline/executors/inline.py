"""In-process execution: tasks one after another, Dask graphs on the threaded scheduler."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import dask


class InlineExecutor:
    name = "inline"

    def map(self, fn: Callable, items: Iterable[Any], *, gpu: bool = False, on_result: Callable | None = None) -> list:
        out = []
        for item in items:
            r = fn(item)
            if on_result is not None:
                on_result(r)
            out.append(r)
        return out

    def gpu_slots(self) -> int:
        """Device tasks that run at once."""
        return 1

    def compute(self, *collections):
        """Dask's threaded scheduler, one torch thread per task (workers.device says why)."""
        from workers.device import one_thread_per_task

        with one_thread_per_task():
            return dask.compute(*collections, scheduler="threads")

    def describe(self) -> str:
        return "in-process"
