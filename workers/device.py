"""Device and thread policy for code that runs inside a task, in one place.

Three rules, each measured on the machines this project runs on:
* an extraction task uses exactly the threads its Dask worker was given (one model per
  worker, the worker's threads are its share of the cores);
* a score task inside a Dask worker uses one torch thread: the concurrency comes from the
  worker's threads and processes, and torch's own pool on top oversubscribed a 16-core
  host (16 single-threaded workers × 16 torch threads each);
* the in-process (inline) executor runs Dask's threaded scheduler with one torch thread
  per task, for the same reason, and restores the caller's setting afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from qkov.pipeline.errors import UsageError


def resolve_device(device: str) -> str:
    """`auto` → cuda when this process sees a GPU, else cpu; decided where the task runs
    (the client may have no GPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device = {device!r} but this worker has no CUDA device; use 'auto' or 'cpu'")
    return device


def dask_worker():
    """The Dask worker running this task, or None outside one."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def use_worker_threads() -> None:
    """Extraction: torch uses exactly the threads this task's Dask worker was given."""
    worker = dask_worker()
    nthreads = getattr(getattr(worker, "state", None), "nthreads", None)
    if nthreads:
        torch.set_num_threads(max(1, int(nthreads)))


def one_thread_in_worker() -> None:
    """Score tasks: one torch thread each inside a Dask worker (see the module docstring)."""
    if dask_worker() is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@contextmanager
def one_thread_per_task() -> Iterator[None]:
    """For the in-process threaded scheduler: one torch thread per task, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_name() -> str:
    worker = dask_worker()
    return worker.address if worker is not None else "inline"
