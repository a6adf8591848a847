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


def pytest_collection_modifyitems(config, items):
    """The slow tests first (a stable sort: modules keep their order otherwise), so that with
    two xdist workers they overlap each other and the short ones fill in, instead of the
    longest starting last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def tmp_run(tmp_path: Path) -> Path:
    """A fresh, not yet existing run directory inside pytest's tmp_path."""
    return tmp_path / "run"


@pytest.fixture(scope="session")
def report_run(tmp_path_factory) -> str:
    """One finished tiny run (tasks "math" and "code") that the report tests read and never change."""
    from qkov.pipeline.run import run_job
    from qkov.testing import tiny_job

    job = tiny_job(tmp_path_factory.mktemp("report"), "llama_gqa", n_a=8, n_b=6,
                   tasks={"a": {"name": "math"}, "b": {"name": "code"}})
    run_job(job)
    return job.output.path


@pytest.fixture(scope="session")
def report_page(report_run) -> Path:
    """The report of `report_run` (its page, report.html)."""
    from qkov.pipeline.report import make_report

    return make_report(report_run)
