"""Where a run executes: an existing scheduler, a named profile, or an embedded cluster.

Embedded default: with GPUs, one worker process per GPU (CUDA_VISIBLE_DEVICES per
worker, nthreads=1, resource GPU=1); without, a LocalCluster of processes sized
to the machine. Profiles (SLURM via dask-jobqueue, Kubernetes via the
dask-kubernetes operator) are only imported and created when asked for.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from .spec import ClusterSpec


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA runtime means no GPUs
        return 0


def local_cluster(spec: ClusterSpec):
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    n_gpu = gpu_count()
    if n_gpu:
        workers = {
            f"gpu-{i}": {
                "cls": Nanny,
                "options": {"nthreads": 1, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": str(i)}},
            }
            for i in range(spec.n_workers or n_gpu)
        }
        return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})
    threads = spec.threads_per_worker or 1
    n = spec.n_workers or max(1, (os.cpu_count() or 1) // threads)
    return LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, dashboard_address=":0")


def profile_cluster(spec: ClusterSpec):
    """A cluster from a named profile: {kind = "slurm" | "kubernetes", scale = N, ...options}."""
    opts = dict(spec.profiles[spec.profile])
    kind = opts.pop("kind", None)
    scale = int(opts.pop("scale", 1))
    if kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise RuntimeError("profile kind 'slurm' needs dask-jobqueue: pip install dask-jobqueue") from None
        cluster = SLURMCluster(**opts)
    elif kind == "kubernetes":
        try:
            from dask_kubernetes.operator import KubeCluster
        except ImportError:
            raise RuntimeError("profile kind 'kubernetes' needs dask-kubernetes: pip install dask-kubernetes") from None
        cluster = KubeCluster(**opts)
    else:
        raise ValueError(f"cluster profile {spec.profile!r}: kind must be 'slurm' or 'kubernetes', not {kind!r}")
    cluster.scale(scale)
    return cluster


@contextmanager
def cluster_client(spec: ClusterSpec, scheduler: str | None = None) -> Iterator[object]:
    """A distributed Client for the run; what it started is closed on exit."""
    from distributed import Client

    address = scheduler or spec.address
    if address:
        client = Client(address, timeout="30s")
        try:
            yield client
        finally:
            client.close()
        return
    cluster = profile_cluster(spec) if spec.profile else local_cluster(spec)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
