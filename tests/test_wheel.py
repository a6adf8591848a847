"""The installed package works outside the source tree.

Every other test imports qkov from the checkout, so a package missing from the wheel
(as `qkov.pipeline.executors` once was) goes unnoticed until a Docker image or a cluster
worker installs it. This test builds the wheel from a copy of the sources, installs it
into a fresh venv, and from a folder outside the checkout runs the Docker image's smoke
test (deploy/smoke-test.sh: a tiny job with `qkov run --inline`, then `qkov query`) and a
`qkov run` on the embedded LocalCluster, with every module loaded from the wheel.

The fresh venv sees the project venv's third-party packages through a `.pth` line (no
index is needed), but not the project's own editable install: the lines of a `.pth` file
name directories that are appended to sys.path as they are; `.pth` files inside them (the
editable install's hook) are not processed. The test checks that too.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from qkov.pipeline import schema
from qkov.testing import job_toml, tiny_job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qkov", "pipeline", "workers")  # the folders the wheel ships


def _sources(dst: Path) -> Path:
    """A clean copy of what the wheel is built from (a `build/` left in the checkout could add stale files)."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    return dst


def _packages_on_disk() -> set[str]:
    """Every folder with an __init__.py, by the name it installs under (all inside `qkov`)."""
    return {
        ".".join((() if name == "qkov" else ("qkov",)) + p.parent.relative_to(ROOT).parts)
        for name in PACKAGES
        for p in (ROOT / name).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 240) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(bin folder of a fresh venv holding only the qkov wheel, an environment for it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _sources(tmp / "src")
    dist = tmp / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
          str(src)], cwd=tmp, env=env)
    (wheel,) = dist.glob("qkov-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    shipped = {".".join(Path(n).parent.parts) for n in names if n.endswith("/__init__.py") or n == "__init__.py"}
    assert _packages_on_disk() <= shipped, f"packages not in the wheel: {sorted(_packages_on_disk() - shipped)}"
    assert {"qkov/pipeline/data/demo.toml", "qkov/pipeline/data/arithmetic.jsonl", "qkov/pipeline/data/python_code.jsonl",
            "qkov/pipeline/data/geography.jsonl"} <= names
    # one namespace: nothing generic (`pipeline`, `workers`) at the top of site-packages
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"qkov"}, f"the wheel installs top-level names besides qkov: {sorted(tops)}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp, env=env)
    # the project venv's third-party packages, as one directory line (its own .pth files stay unprocessed)
    fresh_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp, env=env).strip())
    deps = [p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()} if Path(p).is_dir()]
    (fresh_site / "project_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    return venv / "bin", env


def test_wheel_runs_a_job_and_a_query_outside_the_source_tree(installed, tmp_path):
    bin_, env = installed
    work = tmp_path / "work"  # outside the checkout: nothing there is importable
    work.mkdir()

    where = json.loads(_run([str(bin_ / "python"), "-c", (
        "import json, sys, importlib.metadata as md, qkov, qkov.pipeline, qkov.workers, qkov.pipeline.executors, qkov.testing\n"
        "print(json.dumps({'files': [m.__file__ for m in (qkov.pipeline, qkov.workers, qkov, qkov.pipeline.executors, qkov.testing)],\n"
        "  'sys_path': sys.path, 'editable': [m for m in sys.modules if 'editable' in m],\n"
        "  'dist': str(md.distribution('qkov')._path)}))"
    )], cwd=work, env=env))
    venv = bin_.parent.resolve()
    for f in where["files"]:
        assert Path(f).resolve().is_relative_to(venv), f"{f} is not from the installed wheel"
    assert Path(where["dist"]).resolve().is_relative_to(venv)
    assert not where["editable"], f"the project's editable install leaked in: {where['editable']}"
    assert not any(Path(p).resolve() == ROOT for p in where["sys_path"] if p), "the checkout is on sys.path"

    # the Docker image's smoke test, on this install: a tiny job run in-process, then queried
    path = f"{bin_}{os.pathsep}{env.get('PATH', '')}"
    out = _run(["sh", str(ROOT / "deploy" / "smoke-test.sh")], cwd=work, env={**env, "PATH": path})
    assert "qkov smoke test passed" in out and str(bin_ / "qkov") in out

    # the embedded LocalCluster: its worker processes import the installed package too
    job = tiny_job(work, "llama_gqa", n_a=4, n_b=3, extract={"shard_size": 4, "batch_size": 4},
                   score={"layers": [1], "blocks": ["Q", "O"]}, stats={"n_permutations": 19, "n_bootstrap": 19},
                   cluster={"n_workers": 1, "threads_per_worker": 1}, output={"path": str(work / "run")})
    (work / "job.toml").write_text(job_toml(job.model_dump(mode="json")))
    out = _run([str(bin_ / "qkov"), "run", "job.toml"], cwd=work, env=env)
    assert "done" in out.lower()
    stats = xr.open_zarr(str(work / "run"), group=schema.STATS, consolidated=False)
    assert stats.attrs[schema.ATTR_COMPLETE] is True and np.isfinite(stats["p_value"].values).all()
    from qkov.pipeline.store import RunStore

    scores = RunStore(str(work / "run")).open_scores()  # the logical view of the compactly stored scores
    assert list(scores["sample_a"].values) == ["a0", "a1", "a2", "a3"] and list(scores["sample_b"].values) == ["b0", "b1", "b2"]
