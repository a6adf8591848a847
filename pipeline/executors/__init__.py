"""Executors run a stage's planned tasks. A stage plans (pure, cheap, testable) and
an executor executes; each executor lives in its own module (rechunker-style).

Every executor offers:
  map(fn, items, *, gpu=False, on_result=None) -> list   # independent tasks, results in input order
  compute(*dask_collections) -> tuple                    # run Dask graphs
"""
from .dask import DaskExecutor
from .inline import InlineExecutor


def executor_for(client=None):
    """A DaskExecutor for a distributed Client, else the in-process executor."""
    return DaskExecutor(client) if client is not None else InlineExecutor()


__all__ = ["DaskExecutor", "InlineExecutor", "executor_for"]
