"""`[output] keep_gradients = false` (issue 17): a run in layer groups (extract → score → drop)
equals an ordinary run, keeps no gradients or `_work`, and resumes after being killed mid-way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from qkov.pipeline import schema
from qkov.pipeline.run import run_job
from qkov.pipeline.store import RunStore
from qkov.testing import assert_runs_close, tiny_job, write_job_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = (schema.FISHER, schema.SCORES_GROUP, schema.DIAGNOSTICS, schema.STATS)  # diagnostics: written group by group too


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An ordinary run (gradients kept) that a layer-grouped run must reproduce."""
    tmp = tmp_path_factory.mktemp("groups")
    job = tiny_job(tmp, "llama_gqa", n_a=12, n_b=12, extract={"shard_size": 1, "batch_size": 1},
                   stats={"n_permutations": 49, "n_bootstrap": 49}, output={"path": str(tmp / "reference")})
    run_job(job)
    return tmp, job


def _grouped(job, path, **output):
    return job.model_copy(update={"output": job.output.model_copy(update={"path": str(path), "keep_gradients": False, **output})})


def _work_attrs(path) -> dict:
    try:
        return dict(zarr.open_group(str(path), path=schema.WORK, mode="r").attrs)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
        return {}


def _done_shards(path) -> int:
    try:
        return int(np.asarray(zarr.open_group(str(path), mode="r")[schema.WORK][schema.DONE][:]).sum())
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
        return -1


def _budget_for_one_layer(ref, path) -> int:
    """A disk budget that holds one layer's gradients beside the results, not two."""
    from qkov.pipeline.plan import plan

    return int(plan(_grouped(ref, path, layers_per_group=1)).peak_disk / 0.85)


@pytest.fixture(scope="module")
def grouped(reference):
    """A keep_gradients = false run whose disk budget makes two groups of one layer each, with the
    progress it reported: read by the two tests below (one grouped run for both; the killed run
    further down sets layers_per_group = 1 explicitly)."""
    tmp, ref = reference
    out = tmp / "grouped"
    job = _grouped(ref, out, disk_budget=_budget_for_one_layer(ref, out))
    ticks: list[tuple[str, int, int]] = []
    summary = run_job(job, progress=lambda *t: ticks.append(t))
    return job, summary, ticks


def test_layer_groups_equal_an_ordinary_run_and_keep_no_gradients(reference, grouped):
    tmp, ref = reference
    out = tmp / "grouped"
    _, summary, ticks = grouped
    assert summary.extract["groups"] == 2 and summary.extract["computed"] == 2 * 24
    # progress in the order the stages run (`score: 0/2` came before `extract: 0/48`), every
    # stage timed (the timings line had no extraction)
    stages = [t[0] for t in ticks]
    assert stages[0] == "extract" and ticks[stages.index("score")] == ("score", 0, 2), ticks
    assert ("extract", 24, 48) in ticks[: stages.index("score")] and ticks[-1][0] == "stats", ticks
    assert [k for k in summary.timings if k in ("extract", "score", "stats")] == ["extract", "score", "stats"], summary.timings
    assert summary.timings["extract"] > 0 and summary.timings["score"] > 0
    assert_runs_close(out, ref.output.path, groups=RESULTS)
    assert not (out / schema.WORK).exists()  # the groups' sub-runs and bookkeeping are gone
    grads = xr.open_zarr(str(out), group=schema.GRADIENTS, consolidated=False)
    assert not grads.data_vars and grads.attrs[schema.ATTR_GRADIENTS_DROPPED] is True
    assert list(grads[schema.SAMPLE_ID].values) == list(RunStore(ref.output.path).open_gradients()[schema.SAMPLE_ID].values)
    import qkov

    q = qkov.query(str(out), layer=1, head=2, block="K", top=3)  # query needs scores and ids, not gradients
    want = qkov.query(ref.output.path, layer=1, head=2, block="K", top=3)
    assert [p["sample_a"] for p in q["blocks"][0]["top_pairs"]] == [p["sample_a"] for p in want["blocks"][0]["top_pairs"]]
    assert len(q["blocks"][0]["top_pairs"]) == 3


@pytest.mark.slow
def test_a_layer_grouped_run_killed_mid_way_resumes_to_the_same_result(reference, tmp_path):
    """`qkov run` in layer groups of one layer is frozen while it extracts group 1 (group 0 is
    scored and its gradients deleted), SIGKILLed, then resumed: the result equals the ordinary run."""
    tmp, ref = reference
    out = tmp_path / "killed"
    toml = write_job_file(ref, tmp_path / "job.toml", output={"path": str(out), "keep_gradients": False, "layers_per_group": 1})
    group1 = out / schema.layer_group_path(1)
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "qkov.pipeline.cli", "run", str(toml), "--inline"], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=sink, stderr=subprocess.STDOUT)
    try:
        start = time.monotonic()
        while not (_done_shards(group1) >= 2 or proc.poll() is not None or time.monotonic() - start > 300):
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed mid-way:\n" + log.read_text()
        proc.send_signal(signal.SIGSTOP)
        assert _work_attrs(out)[schema.ATTR_GROUPS_DONE] == [0]  # group 0 scored ...
        assert not (out / schema.layer_group_path(0)).exists()  # ... and its gradients dropped
        done_at_kill = _done_shards(group1)
        assert 2 <= done_at_kill < 24  # group 1 half extracted
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    res = subprocess.run([sys.executable, "-m", "qkov.pipeline.cli", "run", str(toml), "--inline", "--resume"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    text = " ".join((res.stdout + res.stderr).split())
    assert f"extract: {24 - done_at_kill} of 48 shards computed" in text, text  # only what the kill left undone
    assert_runs_close(out, ref.output.path, groups=RESULTS)
    assert not (out / schema.WORK).exists()


def test_the_disk_budget_sets_the_layer_groups(reference, grouped, tmp_path):
    """Without layers_per_group, a keep_gradients = false run takes as many layers per group as
    fit beside the results: a budget that holds one layer's gradients, not two, gives two groups.
    (The run: the module's `grouped`, made with such a budget.)"""
    from qkov.pipeline.plan import plan

    tmp, ref = reference
    one = plan(_grouped(ref, tmp_path / "run", layers_per_group=1))
    whole = plan(_grouped(ref, tmp_path / "run"))
    assert whole.layer_groups == 1 and one.layer_groups == 2 and one.peak_disk < whole.peak_disk
    budget = int(one.peak_disk / 0.85)  # < whole.peak_disk: one layer per group
    assert budget == _budget_for_one_layer(ref, tmp_path / "run")
    job = _grouped(ref, tmp_path / "run", disk_budget=budget)
    p = plan(job)
    assert p.layer_groups == 2 and p.fits, p.lines()
    assert not plan(job.model_copy(update={"output": job.output.model_copy(update={"keep_gradients": True})})).fits
    ran, summary, _ = grouped
    assert ran.output.disk_budget == budget and ran.output.layers_per_group is None
    assert summary.extract["groups"] == 2
    assert_runs_close(ran.output.path, ref.output.path, groups=RESULTS)


def test_finished_groups_are_deleted_in_the_background_once_there_is_room(tmp_path, monkeypatch):
    """A finished sub-run leaves its place at once (renamed aside) and is deleted by a thread;
    the next group waits for that deletion only while the disk lacks the room it needs, and
    a stopped run's half-deleted sub-runs are removed when it resumes."""
    import shutil

    from qkov.pipeline import layer_groups as lg
    from qkov.pipeline.store import paths
    from qkov.pipeline.store.work import clear_dropped

    rmtree = shutil.rmtree

    run = tmp_path / "run"
    (run / schema.WORK).mkdir(parents=True)
    sub = RunStore(str(run / schema.layer_group_path(0)))
    (Path(sub.path) / "gradients").mkdir(parents=True)
    (Path(sub.path) / "gradients" / "c").write_bytes(b"x" * 1000)
    gate = __import__("threading").Event()

    def slow_rmtree(path, **kw):  # a deletion that lasts until the test lets it finish
        gate.wait(30)
        rmtree(path, **kw)

    monkeypatch.setattr(paths.shutil, "rmtree", slow_rmtree)
    dropper = lg._Dropper(RunStore(str(run)))
    dropper.drop(0)
    assert not Path(sub.path).exists() and (run / schema.dropped_group_path(0)).exists()
    t0 = time.perf_counter()
    dropper.wait_for_room(0)  # room enough: no waiting for the deletion
    assert time.perf_counter() - t0 < 0.5 and dropper.thread.is_alive()
    __import__("threading").Timer(0.6, gate.set).start()
    dropper.wait_for_room(2**62)  # no disk has that much free: waits until the deletion is over
    assert time.perf_counter() - t0 >= 0.5 and not (run / schema.dropped_group_path(0)).exists()
    dropper.wait()
    assert dropper.waited >= 0.5
    monkeypatch.setattr(paths.shutil, "rmtree", rmtree)
    left = run / schema.dropped_group_path(3)
    (left / "gradients").mkdir(parents=True)
    clear_dropped(RunStore(str(run)))
    assert not left.exists() and (run / schema.WORK).exists()
