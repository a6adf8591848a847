"""The embedded cluster's GPU workers: one process per GPU, one thread unless set, the memory shared."""
from __future__ import annotations

from distributed.worker_memory import parse_memory_limit

from qkov.pipeline.cluster import GPU_RESOURCE, gpu_worker_options
from qkov.pipeline.spec import ClusterSpec


def test_one_gpu_worker_gets_one_thread_and_all_memory():
    opts = gpu_worker_options(ClusterSpec(), n_gpu=1, n_cpu=16)
    assert list(opts) == ["gpu-0"]
    w = opts["gpu-0"]
    assert w["nthreads"] == 1 and w["resources"] == {GPU_RESOURCE: 1} and w["env"] == {"CUDA_VISIBLE_DEVICES": "0"}
    # Dask reads a float <= 1 as a fraction of the machine's memory: all of it here
    import logging

    from distributed import system

    assert parse_memory_limit(w["memory_limit"], w["nthreads"], 16, logger=logging.getLogger()) == system.MEMORY_LIMIT


def test_memory_split_between_gpus_and_settings_win():
    opts = gpu_worker_options(ClusterSpec(), n_gpu=8, n_cpu=128)
    assert [o["nthreads"] for o in opts.values()] == [1] * 8
    assert [o["env"]["CUDA_VISIBLE_DEVICES"] for o in opts.values()] == [str(i) for i in range(8)]
    assert all(o["memory_limit"] == 1 / 8 for o in opts.values())
    two_per_gpu = gpu_worker_options(ClusterSpec(n_workers=4, threads_per_worker=3), n_gpu=2, n_cpu=16)
    assert [o["env"]["CUDA_VISIBLE_DEVICES"] for o in two_per_gpu.values()] == ["0", "1", "0", "1"]
    assert [o["nthreads"] for o in two_per_gpu.values()] == [3] * 4


def test_gpu_cluster_starts_workers_with_those_options():
    """The options reach real workers (a GPU label on a CPU machine only routes extraction)."""
    from distributed import Client

    from qkov.pipeline.cluster import gpu_cluster

    opts = gpu_worker_options(ClusterSpec(threads_per_worker=2), n_gpu=1, n_cpu=2)
    with gpu_cluster(opts) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        from distributed import system

        ((addr, w),) = client.scheduler_info(n_workers=-1)["workers"].items()
        assert w["nthreads"] == 2 and w["resources"] == {GPU_RESOURCE: 1} and w["memory_limit"] == system.MEMORY_LIMIT
        assert client.run(lambda: __import__("os").environ["CUDA_VISIBLE_DEVICES"]) == {addr: "0"}


def test_a_ctrl_c_while_the_cluster_closes_waits_for_the_close():
    """A Ctrl-C during the close is held until the block has ended, then raised; one that cut
    `SpecCluster.close` short left the cluster "closing" and distributed's exit hook waited 10 s."""
    import os
    import signal

    import pytest

    from qkov.pipeline.cluster import _ctrl_c_waits

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_waits():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler has run (Python runs it between bytecodes)
                steps.append(1)
            steps.append("end")
    assert steps[-1] == "end"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # an exception already under way (the interrupt being unwound) is kept, not replaced
    with pytest.raises(ValueError):
        with _ctrl_c_waits():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                steps.append(1)
            raise ValueError
    with _ctrl_c_waits():  # no Ctrl-C: nothing raised
        steps.append(2)


def test_an_interrupted_run_stops_a_busy_worker_without_waiting_for_its_task():
    """On Ctrl-C or SIGTERM the embedded cluster's workers are stopped at once: a task still
    running (here one that would sleep for ten minutes) does not hold the command back."""
    import threading

    from distributed import Client, LocalCluster

    from qkov.pipeline.cluster import LOOPBACK, _stop_workers_now

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host=LOOPBACK, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        gate = client.submit(lambda: __import__("time").sleep(600), pure=False)
        while not sum(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):  # the task runs
            threading.Event().wait(0.05)
        nannies = list(cluster.workers.values())
        _stop_workers_now(cluster)
        assert all(n.status.name == "closed" and n.process is None for n in nannies), [n.status for n in nannies]
        del gate
