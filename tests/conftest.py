"""Shared pytest fixtures (kept light: no model is built at import time)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Let `python -m pytest` and a bare `pytest` both import the repo's packages without an install.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One converted copy of the pretrained test models per checkout (gitignored), shared by
# every test and worker process; a user's own QKOV_CACHE wins.
os.environ.setdefault("QKOV_CACHE", str(ROOT / ".cache" / "qkov"))

# Triton's CPU interpreter for the pass kernels' tests (tests/test_pass_kernels.py): read when
# triton is first imported, by this process or a worker it spawns, so set before any import.
# The kernels run on CPU tensors only where a test also sets QKOV_PASS_KERNELS=interpret; on a
# machine with a GPU triton compiles as usual and those tests skip.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# OpenMP threads (torch's intra-op pool, MKL's BLAS) sleep when idle instead of spinning. Unset,
# libgomp spins each idle thread for a while after every parallel region: with two xdist workers
# and the processes they start sharing the cores, the spinning threads take the CPU the others
# need (test_prediction.py alone: 90 s of CPU instead of 20 s). The thread counts, and so how
# the sums split, are unchanged; read when the OpenMP runtime loads (with torch), so set before
# any import of torch, here and in every process the tests start (they inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The test files that take longest (seconds on 2 cores, `--junitxml` summed per file), longest
# first: `make test` hands whole files to its two xdist workers in this order, so the long ones
# overlap each other and the short ones fill in at the end (longest-first scheduling).
LONGEST_FILES = ("test_slurm.py", "test_prediction.py", "test_trust.py", "test_many_tasks.py", "test_remote.py",
                 "test_layer_groups.py", "test_reliability.py", "test_docs.py", "test_api.py", "test_report_pairs.py",
                 "test_checks.py", "test_wheel.py")


def pytest_configure(config):
    # pytest-xdist (>= 3.6) orders the files of `--dist loadfile` by their number of tests unless
    # told not to, which put the longest file (4 tests, ~4 minutes) last; keep the order below
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FILES), then the files with slow tests, each file's slow
    tests first (a stable sort: modules keep their order otherwise), so that with two xdist
    workers they overlap each other and the short ones fill in, instead of the longest starting
    last."""
    rank = {name: k for k, name in enumerate(LONGEST_FILES)}
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path not in slow_files,
                                 item.get_closest_marker("slow") is None))


@pytest.fixture
def tmp_run(tmp_path: Path) -> Path:
    """A fresh, not yet existing run directory inside pytest's tmp_path."""
    return tmp_path / "run"


def _shared(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` run once per test session, also when pytest-xdist runs the files that
    need it in several worker processes: made under a file lock in the workers' common
    temporary folder (the others wait for it, then read the same files). For what the
    tests only read."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # popen-gwN's parent: one folder for every worker of this session
    base = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (base / "ready").exists():
            import shutil

            shutil.rmtree(base, ignore_errors=True)
            base.mkdir()
            make(base)
            (base / "ready").touch()
    return base


@pytest.fixture(scope="session")
def report_run(tmp_path_factory) -> str:
    """One finished tiny run (tasks "math" and "code") that the report tests read and never change
    (made once for all xdist workers)."""

    def make(base: Path) -> None:
        from qkov.pipeline.run import run_job
        from qkov.testing import tiny_job

        run_job(tiny_job(base, "llama_gqa", n_a=8, n_b=6, tasks={"a": {"name": "math"}, "b": {"name": "code"}}))

    return str(_shared(tmp_path_factory, "report-run", make) / "run-llama_gqa")  # tiny_job's output


@pytest.fixture(scope="session")
def report_page(report_run, tmp_path_factory) -> Path:
    """The report of `report_run` (its page, report.html; made once for all xdist workers)."""

    def make(base: Path) -> None:
        from qkov.pipeline.report import make_report

        assert make_report(report_run) == page  # beside the run (its default folder)

    page = Path(report_run + "-report") / "report.html"
    _shared(tmp_path_factory, "report-page", make)
    assert page.is_file()
    return page
