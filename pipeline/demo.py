"""The embedded default job (`qkov demo`), shipped as package data."""
from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from .spec import JobSpec, parse_job


def demo_job(out: str | Path = "runs/demo", samples: int | None = None) -> JobSpec:
    """The demo job with its task paths resolved inside the package and the output at `out`."""
    data = resources.files("pipeline.data")
    cfg = tomllib.loads((data / "demo.toml").read_text())
    cfg["output"]["path"] = str(Path(out).resolve())
    if samples is not None:
        cfg["tasks"]["a"]["limit"] = cfg["tasks"]["b"]["limit"] = samples
    return parse_job(cfg, base_dir=Path(str(data)), source="demo.toml")
