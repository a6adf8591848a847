"""A Dask worker preload that holds a worker still at a known point, so a test can stop a job
in a known state instead of racing it (tests/test_slurm.py).

Load it with `DASK_DISTRIBUTED__WORKER__PRELOAD=/path/to/tests/hold_worker.py` and
`QKOV_TEST_HOLD=<folder>`. While `<folder>/hold` exists, a worker that finishes a task named
`extract_shards` (its shards and their done records already written) creates
`<folder>/held` and stops there: it starts no further task. SIGTERM then ends the process at
once with 143, as a scheduler's kill would end a busy worker; SIGKILL works as always.
Removing `<folder>/hold` lets it go on.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from distributed import WorkerPlugin
from distributed.utils import key_split

TASK = "extract_shards"


class Hold(WorkerPlugin):
    name = "qkov-test-hold"

    def __init__(self, folder: Path):
        self.folder = folder

    def transition(self, key, start, finish, **kwargs):
        if finish != "memory" or key_split(key) != TASK or not (self.folder / "hold").exists():
            return
        # the worker's event loop stops here: its next task cannot start
        before = signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
        (self.folder / "held").touch()
        try:
            while (self.folder / "hold").exists():
                time.sleep(0.05)
        finally:
            signal.signal(signal.SIGTERM, before)


def dask_setup(worker) -> None:
    folder = os.environ.get("QKOV_TEST_HOLD")
    if folder:
        worker.plugins[Hold.name] = Hold(Path(folder))
