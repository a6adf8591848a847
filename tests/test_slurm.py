"""qkov on a real SLURM cluster: the project's `deploy/slurm/` recipes, end to end.

The cluster is one node (munged, slurmctld, slurmd from Debian's packages, brought up by
tests/slurm_cluster.py in a private network namespace that holds only loopback, torn
down by pid). Three scenarios, each compared with the same tiny job run in-process:

1. `[cluster] profile` of kind "slurm" (dask-jobqueue, with deploy/slurm/jobqueue.yaml as
   the defaults): `qkov run` submits its Dask workers as SLURM jobs; squeue shows them
   while it runs and none after.
2. `sbatch deploy/slurm/qkov-run.sbatch JOB.toml`: the whole run inside one allocation;
   the output is complete and `qkov query` reads it.
3. Requeue: the batch job is stopped mid-extraction, first by the warning the recipe asks
   for before a time limit (`--signal=B:USR1@300`), then, requeued, by what a time limit
   or preemption does (SIGTERM to every process of the job); each time it ends with the
   lock released and nothing marked complete, and `scontrol requeue` runs the same script
   again, whose `--resume` computes only the missing shards; the store equals an
   undisturbed run.

Stores are compared with qkov.testing.assert_runs_close (float32 rounding tolerance,
everything else exact): bitwise identity across processes is not promised.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qkov.testing import assert_runs_close, tiny_job, write_job_file
from slurm_cluster import SlurmCluster, SlurmUnavailable, start_slurm

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
RECIPE = ROOT / "deploy" / "slurm"
N_A = N_B = 12
SHARDS = N_A + N_B  # one sample per shard, 4 shards per worker task: 6 tasks, enough to be caught in the middle

pytestmark = pytest.mark.slow  # one module: `make test` distributes whole files (--dist loadfile), so one SLURM test cluster


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    try:
        cluster = start_slurm(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"the SLURM test cluster must run in CI: {e}")
        pytest.skip(f"no SLURM test cluster here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed run, in-process: what every SLURM run must reproduce."""
    from qkov.pipeline.run import run_job

    import torch

    tmp = tmp_path_factory.mktemp("slurm-job")
    job = tiny_job(tmp, "llama_gqa", n_a=N_A, n_b=N_B, min_len=16, max_len=32,
                   extract={"shard_size": 1, "batch_size": 1}, fisher={"batch_size": 4, "beta": 0.9},
                   score={"layers": [1], "blocks": ["Q", "K"]},
                   stats={"n_permutations": 19, "n_bootstrap": 19}, output={"path": str(tmp / "reference")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker (OMP_NUM_THREADS=1): BLAS splits reductions by thread count
    try:
        run_job(job)
    finally:
        torch.set_num_threads(threads)
    return tmp, job


def job_env(slurm: SlurmCluster, tmp: Path, **extra: str) -> dict[str, str]:
    """What a user's shell would have: the venv first on PATH, one BLAS thread per worker, and
    a TMPDIR (the recipes put Dask's scratch space there; sbatch exports it to the jobs)."""
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    env = slurm.env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(scratch), **extra)
    env["PATH"] = f"{VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("PYTHONPATH", None)  # qkov comes from the venv, as on a cluster
    return env


def done_shards(run: Path) -> int:
    """Completed-shard records so far; -1 while there is no template."""
    from qkov.pipeline import schema
    from qkov.pipeline.store import RunStore

    try:
        return int(np.asarray(RunStore(str(run)).root()[schema.WORK][schema.DONE][:]).sum())
    except Exception:  # noqa: BLE001 - no store / no template yet
        return -1


def complete_groups(run: Path) -> list[str]:
    from qkov.pipeline.store import RunStore

    store = RunStore(str(run))
    return [g for g in ("gradients", "fisher", "scores", "stats") if store.is_complete(g)]


def batch_job(tmp: Path, job, name: str) -> Path:
    """The tiny job as a TOML file for the batch recipe (its --scheduler flag picks the cluster)."""
    return write_job_file(job, tmp / f"{name}.toml", output={"path": str(tmp / name)})


def sbatch_recipe(slurm: SlurmCluster, tmp: Path, jobfile: Path, workers: int = 2, **extra: str) -> int:
    """`sbatch deploy/slurm/qkov-run.sbatch JOB` as a user of a small cluster would: the script
    unchanged, its sizing overridden on the command line (one node, `workers` tasks of 1 CPU)."""
    return slurm.sbatch("--nodes=1", f"--ntasks-per-node={workers}", "--cpus-per-task=1", "--mem-per-cpu=1G", "--time=00:15:00",
                        f"--output={tmp}/%x-%j.log", str(RECIPE / "qkov-run.sbatch"), str(jobfile),
                        env=job_env(slurm, tmp, QKOV_VENV=str(VENV), **extra), cwd=tmp)


def assert_close_json(got, want, where: str = "") -> None:
    """Equal JSON documents, numbers up to float32 rounding (rtol 1e-5)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_close_json(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close_json(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)) and np.isclose(got, want, rtol=1e-5, atol=1e-12, equal_nan=True), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def log_of(tmp: Path, job_id: int) -> str:
    logs = list(tmp.glob(f"*-{job_id}.log"))
    return logs[0].read_text(errors="replace") if logs else "(no log)"


# ---------------------------------------------------------------- 1. dask-jobqueue workers


def test_jobqueue_profile_submits_workers_as_slurm_jobs(slurm, reference):
    tmp, job = reference
    out = tmp / "run-jobqueue"
    profile = {
        "kind": "slurm",
        "scale": 2,  # two workers = two SLURM jobs
        # deploy/slurm/jobqueue.yaml gives the defaults (DASK_CONFIG below); sized down to this node
        "job_cpu": 1,
        # a worker process holds torch, transformers and triton (torch._dynamo imports it where it is
        # installed): ~0.8 GB, which at "1GB" Dask's 80 % threshold paused for good, and the run hung
        "memory": "2GB",
        "walltime": "00:15:00",
        "interface": "lo",
        "scheduler_options": {"dashboard_address": "127.0.0.1:0"},
        "log_directory": str(tmp / "dask-logs"),
        "wait_timeout": "120 s",
    }
    jobfile = write_job_file(job, tmp / "jobqueue.toml", cluster={"profile": "slurm", "profiles": {"slurm": profile}},
                             output={"path": str(out)})
    assert slurm.queue() == []

    seen: list[list[dict]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(slurm.queue())
            stop.wait(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = slurm.run(str(VENV / "bin" / "qkov"), "run", str(jobfile), check=False, timeout=300,
                        env=job_env(slurm, tmp, DASK_CONFIG=str(RECIPE)), cwd=tmp)
    finally:
        stop.set()
        watcher.join(10)
    assert res.returncode == 0, f"qkov run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}\n{slurm.logs()}"
    assert f"extract: {SHARDS} of {SHARDS} shards computed" in " ".join(res.stderr.split())

    # while it ran: two worker jobs, named by the recipe's jobqueue.yaml, running at once
    running = [[j for j in snap if j["name"] == "qkov-worker" and j["state"] == "RUNNING"] for snap in seen]
    assert max(map(len, running)) == 2, f"squeue never showed both worker jobs running: {seen}"
    worker_ids = {j["id"] for snap in running for j in snap}
    assert len(worker_ids) == 2
    # each asked for one GPU (jobqueue.yaml's --gres=gpu:1) and ran a Dask worker that joined the run
    assert all(j["gres"].endswith("gpu:1") for snap in running for j in snap), running
    for job_id in worker_ids:
        log = (tmp / "dask-logs" / f"qkov-worker-{job_id}.err").read_text()
        assert "Registered to:" in log, log[-2000:]
        assert f"Local Directory: {tmp / 'scratch'}" in log  # jobqueue.yaml's ${TMPDIR:-/tmp}, TMPDIR exported by sbatch
    # after: the cluster cancelled its jobs
    slurm.wait_queue_empty(timeout=30)
    assert slurm.queue() == []

    assert complete_groups(out) == ["gradients", "fisher", "scores", "stats"]
    assert_runs_close(out, job.output.path)


# ---------------------------------------------------------------- 2. the batch recipe


def test_sbatch_recipe_runs_qkov_inside_an_allocation(slurm, reference):
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app
    from qkov.pipeline.query import query as query_run

    tmp, job = reference
    jobfile = batch_job(tmp, job, "run-batch")
    job_id = sbatch_recipe(slurm, tmp, jobfile)
    info = slurm.wait_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), timeout=240)
    log = log_of(tmp, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}\n{slurm.logs()}"
    assert f"extract: {SHARDS} of {SHARDS} shards computed" in " ".join(log.split())
    assert info["NumNodes"] == "1" and info["NumTasks"] == "2"
    slurm.wait_queue_empty(timeout=30)

    out = tmp / "run-batch"
    assert complete_groups(out) == ["gradients", "fisher", "scores", "stats"]
    assert not list(tmp.glob(".qkov-dask-*.json")), "the recipe left its scheduler file behind"
    assert_runs_close(out, job.output.path)

    # queryable: `qkov query` on the batch job's output gives the reference's answer
    res = CliRunner().invoke(app, ["query", str(out), "--layer", "1", "--head", "2", "--top", "3", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    want = json.loads(json.dumps(query_run(job.output.path, 1, 2, top=3)))
    assert got.pop("run") == str(out) and want.pop("run") == job.output.path
    assert_close_json(got, want)
    assert got["blocks"] and all(b["top_pairs"] for b in got["blocks"]), got


# ---------------------------------------------------------------- 3. SIGTERM, requeue, --resume


def test_batch_job_stopped_mid_extraction_requeues_and_resumes(slurm, reference):
    """Stopped twice the ways a scheduler stops a job, requeued each time, finished by --resume.

    The stop must land mid-extraction whatever the machine's speed: the job's worker loads
    tests/hold_worker.py, which holds it still after an extraction task while a `hold` file
    exists. The test waits for that state (`held`), then signals; the held worker starts no
    further shard, so the stopped run has done some shards but not all, by construction."""
    from qkov.pipeline.store import RunStore

    tmp, job = reference
    out = tmp / "run-requeue"
    gate = tmp / "hold"
    gate.mkdir(exist_ok=True)
    (gate / "hold").touch()
    jobfile = batch_job(tmp, job, "run-requeue")
    # one worker: one extraction task at a time
    job_id = sbatch_recipe(slurm, tmp, jobfile, workers=1, QKOV_TEST_HOLD=str(gate),
                           DASK_DISTRIBUTED__WORKER__PRELOAD=str(Path(__file__).with_name("hold_worker.py")))

    def stop_mid_extraction(after: int, *scancel: str) -> int:
        deadline = time.monotonic() + 240  # a failure detector only: the stop waits for the held state
        while not (gate / "held").exists():
            state = slurm.job(job_id)["JobState"]
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state} before the worker held\n{log_of(tmp, job_id)}"
            assert time.monotonic() < deadline, f"the worker did not hold after 240 s\n{log_of(tmp, job_id)}"
            time.sleep(0.05)
        held_at = done_shards(out)
        slurm.run("scancel", *scancel, str(job_id))
        ended = slurm.wait_job(job_id, ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"), timeout=120)
        log = log_of(tmp, job_id)
        done = done_shards(out)
        assert ended["JobState"] == "FAILED" and ended["ExitCode"].startswith("143:"), f"{ended}\n{log}"
        assert done == held_at and after < done < SHARDS, f"not stopped mid-extraction ({done} of {SHARDS} shards done, {held_at} when held)\n{log}"
        assert RunStore(str(out)).read_lock() is None, f"the stopped run did not release its lock\n{log}"
        assert complete_groups(out) == [], "a stopped run marked a group complete"
        (gate / "held").unlink()
        return done

    # 1. the warning before a time limit (#SBATCH --signal=B:USR1@300): SIGUSR1 to the batch script only
    done = stop_mid_extraction(0, "--batch", "--signal=USR1")
    # the same job id and script again, after the cluster's credential lifetime (AuthInfo cred_expire)
    slurm.run("scontrol", "requeue", str(job_id))
    # 2. what a time limit, scancel or preemption does: SIGTERM to every process of the job
    done = stop_mid_extraction(done, "--full", "--signal=TERM")
    (gate / "hold").unlink()  # the third start runs to the end
    slurm.run("scontrol", "requeue", str(job_id))

    third = slurm.wait_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
    log = log_of(tmp, job_id)
    assert third["JobState"] == "COMPLETED" and third["ExitCode"] == "0:0", f"{third}\n{log}\n{slurm.logs()}"
    assert int(third["Restarts"]) == 2
    assert f"extract: {SHARDS - done} of {SHARDS} shards computed" in " ".join(log.split()), log
    assert complete_groups(out) == ["gradients", "fisher", "scores", "stats"]
    assert_runs_close(out, job.output.path)


# ---------------------------------------------------------------- the documented configuration


def test_readme_shows_the_slurm_conf_the_tests_use():
    """deploy/slurm/README.md documents the test cluster's slurm.conf and gres.conf: exactly
    what tests/slurm_cluster.py writes (comments aside), with $ROOT and $HOST for the paths."""
    import re

    from slurm_cluster import gres_conf, slurm_conf

    text = (RECIPE / "README.md").read_text()
    section = text[text.index("## The test cluster's slurm.conf"):]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    settings = lambda conf: [l for l in conf.splitlines() if l.strip() and not l.startswith("#")]  # noqa: E731
    assert settings(blocks[0]) == settings(slurm_conf(Path("$ROOT"), "$HOST"))
    assert settings(blocks[1]) == settings(gres_conf("$HOST"))
