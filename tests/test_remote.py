"""Scale-out, for real: `qkov run --scheduler` on a cluster of separate `dask` processes,
and a run written to an S3-compatible server (moto) on loopback.

The cluster is one `dask scheduler` and two `dask worker` processes started from this
venv's `dask` command on 127.0.0.1 (random ports): `gpu-0` offers `--resources GPU=1`
(no CUDA needed: the resource is only a routing tag), `cpu-0` offers none. Both use
one thread. Every process started here is stopped by the fixtures' finalizers.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qkov.pipeline import schema
from qkov.pipeline.run import run_job
from qkov.testing import assert_runs_close, tiny_job

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "qkov-runs"
GROUPS = (schema.GRADIENTS, schema.FISHER, schema.SCORES_GROUP, schema.STATS)
N_A, N_B, SHARD = 5, 4, 3
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "qkov-test", "AWS_SECRET_ACCESS_KEY": "qkov-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}

pytestmark = pytest.mark.skipif(not (BIN / "dask").exists(), reason="needs the venv's `dask` command")


# ---------------------------------------------------------------- helpers


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CREDENTIALS)
    env.pop("AWS_ENDPOINT_URL", None)  # a run must take its endpoint from the job file
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process group we started (nanny and worker together), then wait; SIGKILL stragglers."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def _plain(d):
    """A config mapping without None values (TOML has no null; those keys take their defaults)."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items() if v is not None}
    return d


def write_job(path: Path, config: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(_plain(config)))
    return path


def qkov(*args: str):
    """The `qkov` command line, in this process (torch is imported once, not per command)."""
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, f"qkov {' '.join(args)} failed ({res.exit_code}):\n{res.output[-4000:]}\n{res.exception!r}"
    return res


def assert_same_run(path_a: str, path_b: str, so_a: dict | None = None, so_b: dict | None = None) -> None:
    """Every result group holds the same values (float32 up to rounding: worker processes run
    other thread counts, and on some CPUs the last bits differ), coordinates, ids and
    (provenance aside) attrs."""
    assert_runs_close(path_a, path_b, groups=GROUPS, storage_options_a=so_a, storage_options_b=so_b)


# ---------------------------------------------------------------- fixtures


@dataclass
class RemoteCluster:
    address: str
    client: object
    gpu_worker: str
    cpu_worker: str


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 API (moto in server mode) on loopback, with one bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def remote_cluster(tmp_path_factory):
    from distributed import Client

    tmp = tmp_path_factory.mktemp("dask")
    sched_file = tmp / "scheduler.json"
    procs: list[subprocess.Popen] = []
    client = None

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "w")
        p = subprocess.Popen([str(BIN / "dask"), *args], stdout=log, stderr=subprocess.STDOUT, env=_env(),
                             cwd=tmp, start_new_session=True)
        procs.append(p)
        return p

    def logs() -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(tmp.glob("*.log")))

    try:
        sched = start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                      "--scheduler-file", str(sched_file))
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert sched.poll() is None and time.monotonic() < deadline, f"scheduler did not start\n{logs()}"
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but let a slow disk finish
        address = json.loads(sched_file.read_text())["address"]
        common = ("--scheduler-file", str(sched_file), "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                  "--local-directory", str(tmp), "--death-timeout", "60")
        start("gpu-0", "worker", *common, "--name", "gpu-0", "--resources", "GPU=1")
        start("cpu-0", "worker", *common, "--name", "cpu-0")
        client = Client(address, timeout="30s", set_as_default=False)  # in-process reads stay in-process
        try:
            client.wait_for_workers(2, timeout=90)
        except TimeoutError:
            pytest.fail(f"workers did not join\n{logs()}")
        by_name = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        client.get_task_stream()  # installs the scheduler's task-stream plugin before any run
        yield RemoteCluster(address, client, by_name["gpu-0"], by_name["cpu-0"])
    finally:
        if client is not None:
            client.close()
        _stop(procs)


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    """The reference: the same tiny job run in-process without any cluster."""
    tmp = tmp_path_factory.mktemp("remote-job")
    # small on purpose: every chunk is an HTTP request to the loopback S3 server
    job = tiny_job(tmp, "llama_gqa", n_a=N_A, n_b=N_B, extract={"shard_size": SHARD, "batch_size": 2},
                   score={"layers": [1], "blocks": ["Q", "K"]}, output={"path": str(tmp / "run-inline")})
    run_job(job)
    return tmp, job


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def s3_remote_run(remote_cluster, inline_run, s3_endpoint):
    """The tiny job run once through the remote cluster (`qkov run JOB --scheduler`), its output on
    the S3 server: what both tests below read (one cluster run instead of one per test).

    Workers write the store to S3 (credentials from their environment, endpoint from the job's
    storage_options); the client writes the template with the credentials of its own environment.
    Returns (job file's mapping, output URL, storage options, the run's output, the scheduler's
    task stream of the run)."""
    from qkov.pipeline.spec import load_job

    tmp, job = inline_run
    url = f"s3://{BUCKET}/runs/tiny"
    so = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    cfg = job.model_dump(mode="json")  # the job mapping (config_dict redacts storage options)
    cfg["output"] = {**cfg["output"], "path": url, "storage_options": so}
    jobfile = write_job(tmp / "remote.toml", cfg)
    assert load_job(jobfile).model_dump(mode="json") == cfg  # the command runs exactly this job
    mp = pytest.MonkeyPatch()
    try:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)  # the run takes its endpoint from the job file
        t0 = time.time()
        res = qkov("run", str(jobfile), "--scheduler", remote_cluster.address)
        stream = remote_cluster.client.get_task_stream(start=t0)
    finally:
        mp.undo()
    return cfg, url, so, res.output, stream


@pytest.mark.slow
def test_remote_scheduler_routes_gpu_work_and_matches_inline_run(remote_cluster, inline_run, s3_remote_run):
    tmp, job = inline_run
    _, url, so, stdout, stream = s3_remote_run
    assert "done." in stdout
    assert f"extract: {-(-(N_A + N_B) // SHARD)} of {-(-(N_A + N_B) // SHARD)} shards computed" in " ".join(stdout.split())

    from distributed.utils import key_split

    shards = [t for t in stream if key_split(t["key"]) == "extract_shards"]  # groups of consecutive shards
    n_shards = -(-(N_A + N_B) // SHARD)
    per = max(1, min(4, n_shards // 2))  # qkov.pipeline.extract.shard_groups with the one GPU worker
    assert len({t["key"] for t in shards}) == -(-n_shards // per)
    assert {t["worker"] for t in shards} == {remote_cluster.gpu_worker}, "extraction ran on a worker without the GPU resource"
    # CPU stages are not pinned: the untagged worker takes part in scoring/statistics
    others = [t for t in stream if key_split(t["key"]) != "extract_shards"]
    assert any(t["worker"] == remote_cluster.cpu_worker for t in others)

    creds = {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    assert_same_run(url, job.output.path, so_a={**so, **creds})


@pytest.mark.slow
def test_s3_output_through_the_cluster_equals_local_run_and_query_reads_it(inline_run, s3_remote_run, monkeypatch):
    """The run's store is really on the S3 server (workers wrote it there), nothing on local disk;
    `qkov query` reads it back with the endpoint from AWS_ENDPOINT_URL. (Its equality with the
    inline run: the test above, on the same output.)"""
    from qkov.pipeline.query import query as query_run

    tmp, job = inline_run
    _, url, so, _, _ = s3_remote_run
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)

    import s3fs

    creds = {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    fs = s3fs.S3FileSystem(**creds, **so)
    assert fs.exists(f"{BUCKET}/runs/tiny/{schema.SCORES_GROUP}/zarr.json")  # really on the server, not on disk
    assert not (ROOT / "s3:").exists() and not Path("s3:").exists() and not (tmp / "s3:").exists()
    for group in GROUPS:
        assert fs.exists(f"{BUCKET}/runs/tiny/{group}/zarr.json"), group

    # the command line takes no storage options: the endpoint comes from the standard variable
    monkeypatch.setenv("AWS_ENDPOINT_URL", so["client_kwargs"]["endpoint_url"])
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients were made before the variable was set
    out = qkov("query", url, "--layer", "1", "--head", "2", "--top", "3", "--json")
    remote = json.loads(out.stdout)
    local = query_run(job.output.path, 1, 2, top=3)
    assert remote.pop("run") == url and local.pop("run") == job.output.path
    # the same answer, to float32 rounding: a local run reduces the diagnostics inside its score
    # tasks (DirectChunks), an S3 run from the stored arrays, in another summation order
    local = json.loads(json.dumps(local))
    # the alignment marginals are float32 sums of signed terms: their summation order moves them
    # by float32 rounding of the terms' size, not of their (smaller) sum
    for r, l in zip(remote["blocks"], local["blocks"]):
        rm, lm = r.pop("alignment_marginals", None), l.pop("alignment_marginals", None)
        assert (rm is None) == (lm is None)
        if rm is not None:
            scale = max([abs(x["marginal"]) for t in "ab" for x in lm[t]] + [abs(lm["transfer"])])
            for t in "ab":
                assert [x["sample"] for x in rm[t]] == [x["sample"] for x in lm[t]]
                assert [x["marginal"] for x in rm[t]] == pytest.approx([x["marginal"] for x in lm[t]], abs=1e-4 * scale)
    _assert_json_close(remote, local)
    assert np.isfinite(remote["blocks"][0]["stats"]["interference"]["p_value"])


def _assert_json_close(a, b, where: str = "") -> None:
    """Equal JSON values, floats to a relative 1e-5 (absolute 1e-9)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_json_close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_json_close(x, y, f"{where}[{k}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9, nan_ok=True), where
    else:
        assert a == b, where


def test_unreachable_scheduler_is_a_clear_error():
    import socket

    from qkov.pipeline.cluster import ClusterError, connect

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}"):
        connect(f"tcp://127.0.0.1:{port}", timeout="2s")
    assert time.monotonic() - t < 30
