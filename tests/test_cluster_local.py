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
