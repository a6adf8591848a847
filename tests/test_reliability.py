"""Reliability: a worker killed mid-extract, a client killed mid-run, two runs on one output.

Every disturbed run must end with exactly the arrays of an undisturbed run (compared as
raw bytes): shard writes are whole chunks, idempotent, and recorded done last. Bitwise
identity needs the same torch thread count everywhere (BLAS splits reductions by
threads: the last bits of a gradient differ between 1 and 2 threads), so the in-process
runs here use one thread, as each LocalCluster worker does.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from qkov.pipeline import schema
from qkov.pipeline.cli import app
from qkov.pipeline.run import run_job
from qkov.pipeline.store import RunStore, StoreError, acquire_lock, read_lock
from qkov.pipeline.store.lock import _lock_is_stale
from qkov.testing import tiny_job, write_job_file

ROOT = Path(__file__).resolve().parents[1]
N = 12  # samples per task, one per shard: 24 shards, enough to be caught in the middle
TOTAL = 2 * N
GROUPS = (schema.GRADIENTS, schema.FISHER, schema.SCORES_GROUP, schema.STATS)


def qkov(*args) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, " ".join(res.output.split())


def with_output(job, path):
    return job.model_copy(update={"output": job.output.model_copy(update={"path": str(path)})})


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed run (in-process) that every disturbed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reliability")
    job = tiny_job(tmp, "llama_gqa", n_a=N, n_b=N, min_len=12, max_len=24,
                   extract={"shard_size": 1, "batch_size": 1}, fisher={"batch_size": 4, "beta": 0.9},
                   score={"layers": [1], "blocks": ["Q", "K"]},  # one sample per chunk makes many score tasks: keep them few
                   stats={"n_permutations": 19, "n_bootstrap": 19}, output={"path": str(tmp / "reference")})
    run_job(job)
    return tmp, job


def store_arrays(run) -> dict[str, object]:
    """Every variable and coordinate of the result groups: dtype, shape and raw bytes (lists for strings)."""
    out = {}
    for group in GROUPS:
        ds = xr.open_zarr(str(run), group=group, consolidated=False)
        for name, var in ds.variables.items():
            v = np.asarray(var.values)
            out[f"{group}/{name}"] = v.tolist() if v.dtype == object else (v.dtype.str, v.shape, v.tobytes())
    return out


def assert_same_results(run, ref) -> None:
    got, want = store_arrays(run), store_arrays(ref)
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"differ from the undisturbed run: {differ}"


def done_shards(run) -> int:
    """Completed-shard records so far; -1 while there is no template."""
    try:
        return int(np.asarray(RunStore(str(run)).root()[schema.WORK][schema.DONE][:]).sum())
    except (StoreError, KeyError):
        return -1


def wait_for(condition, what: str, timeout: float = 240.0) -> None:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_worker_killed_mid_extract_run_finishes_identical(reference):
    """SIGKILL of a worker process while it computes shards: the nanny restarts it, its shards
    run again (here or on the other worker) and the store equals the undisturbed run's."""
    from distributed import Client, LocalCluster

    tmp, ref = reference
    job = with_output(ref, tmp / "worker-killed")
    outcome: dict = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)

        def run() -> None:
            try:
                outcome["summary"] = run_job(job, client=client)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = e

        runner = threading.Thread(target=run)
        runner.start()
        wait_for(lambda: done_shards(job.output.path) >= 2, "the first shards")
        busy = [addr for addr, keys in client.processing().items() if keys]
        done_at_kill = done_shards(job.output.path)
        os.kill(pids[busy[0]], signal.SIGKILL)
        runner.join(timeout=300)
        client.wait_for_workers(2, timeout=60)
        after = client.run(os.getpid)
    assert "error" not in outcome, repr(outcome.get("error"))
    assert done_at_kill < TOTAL  # it died mid-extract, holding shards
    assert busy[0] not in after and pids[busy[0]] not in after.values()  # a fresh worker took its place
    assert outcome["summary"].extract["computed"] == TOTAL
    assert_same_results(job.output.path, ref.output.path)


@pytest.mark.slow
def test_client_killed_mid_run_resume_finishes_identical(reference, tmp_path):
    """`qkov run` (a subprocess with its own LocalCluster) is frozen mid-extract: a second run on
    the output is refused, whatever its flags. Then it is SIGKILLed; its workers stop, its lock is
    stale, `--resume` with another job file is refused naming the keys, and `--resume` computes
    only the unfinished shards and ends with the undisturbed run's arrays."""
    tmp, ref = reference
    out = tmp / "client-killed"
    toml = write_job_file(ref, tmp_path / "job.toml", output={"path": str(out)},
                          cluster={"n_workers": 1, "threads_per_worker": 1})
    log = tmp_path / "client.log"
    with log.open("w") as sink:
        client = subprocess.Popen([sys.executable, "-m", "qkov.pipeline.cli", "run", str(toml)], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=sink, stderr=subprocess.STDOUT)
    workers: list[psutil.Process] = []
    try:
        wait_for(lambda: done_shards(out) >= 2 or client.poll() is not None, "the client's first shards")
        assert client.poll() is None, log.read_text()
        client.send_signal(signal.SIGSTOP)  # alive and owning the output, mid-extract
        workers = psutil.Process(client.pid).children(recursive=True)
        assert workers  # its LocalCluster's worker processes
        before = done_shards(out)
        for flags in (("--overwrite",), ("--resume",), ()):
            code, text = qkov("run", toml, "--inline", *flags)
            assert code == 2 and "another qkov run owns the output" in text, text
            assert f"pid {client.pid}" in text
        assert done_shards(out) >= before  # nothing was removed or restarted under the owner

        client.send_signal(signal.SIGKILL)
        client.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"the killed client's processes kept running: {alive}"
    finally:
        for proc in [p for p in workers if p.is_running()] + ([client] if client.poll() is None else []):
            proc.kill()
        client.wait(timeout=60)

    held = read_lock(str(out))
    assert held["pid"] == client.pid and _lock_is_stale(held)
    pending = TOTAL - done_shards(out)
    assert 0 < pending < TOTAL, "the client was not killed in the middle of extraction"

    changed = write_job_file(ref, tmp_path / "changed.toml", output={"path": str(out)}, fisher={"beta": 0.5},
                             extract={"shard_size": 2})
    code, text = qkov("run", changed, "--inline", "--resume")  # gets past the stale lock to the config check
    assert code == 2 and "--resume refused" in text and "at ['extract.shard_size', 'fisher.beta']" in text, text

    code, text = qkov("run", toml, "--inline", "--resume")
    assert code == 0, text
    computed = re.search(r"extract: (\d+) of (\d+) shards computed", text)
    assert computed and (int(computed[1]), int(computed[2])) == (pending, TOTAL), text
    assert read_lock(str(out)) is None
    assert_same_results(out, ref.output.path)


def test_sigterm_releases_the_lock(reference):
    """A batch scheduler's SIGTERM (time limit) unwinds `qkov run`: the lock is released, so the
    requeued job may --resume on another node, and nothing is marked complete. The signal is
    sent to this process while the command runs in it (as `qkov run` would receive it)."""
    tmp, ref = reference
    out = tmp / "terminated"
    toml = write_job_file(ref, tmp / "terminated.toml", output={"path": str(out)})
    late: list[int] = []  # a signal that arrived after the command restored this handler
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: late.append(signum))

    def terminate_mid_extract() -> None:
        wait_for(lambda: done_shards(out) >= 1, "the first shard")
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_mid_extract)
    try:
        sender.start()
        res = CliRunner().invoke(app, ["run", str(toml), "--inline"])
        sender.join(timeout=60)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not late and res.exit_code == 128 + signal.SIGTERM, res.output
    assert read_lock(str(out)) is None
    assert 0 < done_shards(out) < TOTAL
    assert not RunStore(str(out)).root()[schema.GRADIENTS].attrs.get(schema.ATTR_COMPLETE)


def test_simultaneous_starts_have_exactly_one_owner(tmp_path):
    """Eight starts at the same instant on a new output: one owns it, seven are refused."""
    path = str(tmp_path / "race")
    barrier = threading.Barrier(8)
    results: list = []

    def start() -> None:
        barrier.wait()
        try:
            results.append(acquire_lock(path))
        except StoreError as e:
            results.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    owners = [r for r in results if isinstance(r, str)]
    assert len(owners) == 1 and read_lock(path)["token"] == owners[0]
    assert all("another qkov run owns the output" in str(e) for e in results if not isinstance(e, str))


def test_stale_lock_is_recognised_only_when_the_owner_is_gone():
    me = psutil.Process()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, never reaped until below
    try:
        wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, "the zombie", timeout=30)
        host = socket.gethostname()

        def record(pid, started=None, on=host):
            return {"host": on, "pid": pid, "pid_started": started}

        assert not _lock_is_stale(record(os.getpid(), me.create_time()))
        assert not _lock_is_stale(record(os.getpid()))  # old records without a start time: alive is alive
        assert _lock_is_stale(record(dead.pid))
        assert _lock_is_stale(record(zombie.pid))
        assert _lock_is_stale(record(os.getpid(), me.create_time() - 3600))  # the pid now belongs to another process
        assert not _lock_is_stale(record(dead.pid, on="another-host"))  # never guessed across machines
    finally:
        zombie.wait()


def test_a_finished_run_keeps_no_work_and_a_resume_reruns_the_statistics_only(reference, tmp_path):
    """`_work` (shard records, Fisher partial sums) is removed once every stage is complete
    (`[output] keep_work = true` keeps it: tests/test_plan.py); `--resume` of the finished run
    then finds extraction and scores complete and reproduces the statistics."""
    import shutil

    tmp, job = reference
    ref = Path(job.output.path)
    assert not (ref / schema.WORK).exists()
    copy = tmp_path / "run"
    shutil.copytree(ref, copy)
    summary = run_job(job.model_copy(update={"output": job.output.model_copy(update={"path": str(copy)})}), resume=True)
    assert {"extract", "score"} <= set(summary.skipped_stages) and not (copy / schema.WORK).exists()
    assert_same_results(copy, ref)
