"""Execution on a distributed cluster (embedded LocalCluster or a remote scheduler).

GPU tasks go as futures with resources={"GPU": 1}: graph annotations are dropped
when layers fuse, so a resource request on a graph layer is not reliable.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from qkov.pipeline.cluster import GPU_RESOURCE, gpu_workers


class DaskExecutor:
    def __init__(self, client):
        self.client = client

    def gpu_workers(self) -> list[str]:
        return gpu_workers(self.client)

    def gpu_slots(self) -> int:
        """Device tasks that can run at once: one per GPU worker, else one per worker thread."""
        gpus = self.gpu_workers()
        if gpus:
            return len(gpus)
        return sum(w["nthreads"] for w in self.client.scheduler_info(n_workers=-1)["workers"].values()) or 1

    def one_process(self) -> bool:
        """Whether every task runs in one worker process (what the fused path needs)."""
        return len(self.client.scheduler_info(n_workers=-1)["workers"]) == 1

    def map(self, fn: Callable, items: Iterable[Any], *, gpu: bool = False, on_result: Callable | None = None) -> list:
        from distributed import as_completed

        items = list(items)
        if not items:
            return []
        # Ask for a GPU only where a worker offers one: a resource nobody has would wait forever.
        resources = {GPU_RESOURCE: 1} if gpu and self.gpu_workers() else None
        futures = self.client.map(fn, items, pure=False, resources=resources, retries=2)
        index = {f.key: i for i, f in enumerate(futures)}
        out: list = [None] * len(items)
        try:
            for fut, result in as_completed(futures, with_results=True):
                out[index[fut.key]] = result
                if on_result is not None:
                    on_result(result)
        except BaseException:
            self.client.cancel(futures)
            raise
        return out

    def compute(self, *collections, on_progress: Callable[[int, int], None] | None = None):
        """Run Dask collections on the cluster; `on_progress(done, total)` follows every task of
        their graphs (a scheduler-side progress plugin, watched from a helper thread)."""
        if on_progress is None:
            return self.client.compute(list(collections), sync=True)
        import threading

        futures = self.client.compute(list(collections))
        watcher = threading.Thread(target=_watch, args=(futures, self.client.scheduler.address, on_progress),
                                   name="qkov-progress", daemon=True)
        watcher.start()
        try:
            return self.client.gather(futures)
        except BaseException:
            self.client.cancel(futures)
            raise
        finally:
            watcher.join(timeout=5)


def _watch(futures, address: str, on_progress: Callable[[int, int], None]) -> None:
    """Report tasks done / total of the futures' whole graphs until they finish (distributed's
    own progress plugin, drawn through `on_progress`). Progress is a courtesy: never an error."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class Ticks(TextProgressBar):
        def _draw_bar(self, remaining, all, **kwargs):  # noqa: A002 - distributed's signature
            on_progress(all - remaining, all)

        def _draw_stop(self, **kwargs):
            pass

    try:
        Ticks(futures, scheduler=address, interval="500ms", complete=True)
    except Exception:  # noqa: BLE001
        pass
