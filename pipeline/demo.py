"""The embedded default job (`qkov demo`), shipped as package data."""
from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from .console import err
from .errors import StoreError, option
from .spec import JobSpec, parse_job
from .store import RunStore


def demo_job(out: str | Path = "runs/demo", samples: int | None = None) -> JobSpec:
    """The demo job with its task paths resolved inside the package and the output at `out`."""
    data = resources.files("qkov.pipeline.data")
    cfg = tomllib.loads((data / "demo.toml").read_text())
    cfg["output"]["path"] = str(Path(out).resolve())
    if samples is not None:
        for task in cfg["tasks"].values():
            task["limit"] = samples
    return parse_job(cfg, base_dir=Path(str(data)), source="demo.toml")


def may_replace(job: JobSpec, overwrite: bool) -> bool:
    """`qkov demo` replaces its own earlier demo run at --out (same model and built-in tasks);
    any other run there only with --overwrite, and never a folder that is not a run."""
    store = RunStore.of(job)
    if not store.exists():
        return False
    if overwrite:
        return True
    old = store.config() if store.is_run() else {}
    # made by `qkov demo` (of this qkov or an earlier one, whose demo had other tasks): the demo's
    # model, and every task one of the built-in files shipped beside the demo job
    data = Path(str(resources.files("qkov.pipeline.data"))).resolve()
    old_tasks = list((old.get("tasks") or {}).values())
    same = bool(old_tasks) and (old.get("model") or {}).get("name") == job.model.name and all(
        Path(str(t.get("path", ""))).resolve().parent == data for t in old_tasks)
    if not store.is_run():
        raise StoreError(f"{option('out', store.path)} exists and is not a qkov run; refusing to write into it. "
                         f"Choose another {option('out', 'DIR')}.")
    if not same:
        raise StoreError(f"{option('out', store.path)} holds a qkov run that `qkov demo` did not make; refusing to replace it. "
                         f"Choose another {option('out', 'DIR')}, or pass {option('overwrite')} to replace it.")
    return True


def run_demo(out: str | Path = "runs/demo", samples: int | None = None, *, inline: bool = False, overwrite: bool = False,
             progress=True) -> tuple[JobSpec, Path]:
    """`qkov demo`: the demo job checked, run on an embedded cluster (or inline) and reported.
    Returns the job and the report's HTML path. `progress` as `qkov.run` takes it; True also
    says what runs where before the work starts."""
    from .launch import launch
    from .report import make_report

    job = demo_job(out, samples=samples)
    if progress and not callable(progress):
        tasks = [t for _, t in job.tasks.items()]
        err().print(f"demo: {job.model.name}, {' vs '.join(t.name for t in tasks)} (loss on the answers), "
                    f"{'+'.join(str(t.limit) for t in tasks)} samples, layers {job.score.layers or 'all'} → {job.output.path}")
    launch(job, overwrite=may_replace(job, overwrite), inline=inline, progress=progress, show_plan=False)
    return job, make_report(job.output.path)
