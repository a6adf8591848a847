"""Where a run executes: an existing scheduler, a named profile, or an embedded cluster.

Precedence: `--scheduler` on the command line, then `[cluster] address`, then
`[cluster] profile`, then an embedded cluster. An address is `tcp://host:port` (or
any Dask address) or the path of a scheduler file written by `dask scheduler
--scheduler-file` (the usual pattern inside a SLURM allocation).

Embedded default: with GPUs, one worker process per GPU (CUDA_VISIBLE_DEVICES per
worker, resource GPU=1, nthreads=1 as DESIGN §7 fixes it unless [cluster]
threads_per_worker says otherwise, the GPU's share of the memory); without, a
LocalCluster of single-threaded processes sized to the machine. Profiles (SLURM
via dask-jobqueue, Kubernetes via the dask-kubernetes operator) are only imported
and created when asked for. A worker takes GPU work when it was started with
`--resources GPU=1`; the extract stage asks for that resource only when some
worker offers it (qkov.pipeline.executors.dask).

Before any work is sent to a cluster qkov did not start itself, the workers'
environment is compared with the client's: a worker without qkov, or with another
dask/distributed/zarr version, would otherwise fail deep inside a task.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .spec import ClusterSpec
from .errors import ClusterError  # noqa: F401  (re-exported; the error family lives in qkov.pipeline.errors)

GPU_RESOURCE = "GPU"
PROFILE_KINDS = ("slurm", "kubernetes")
# Packages that must agree between the client and every worker: qkov itself (task
# code), the Dask wire protocol, and the store format.
MUST_MATCH = ("qkov", "dask", "distributed", "zarr", "numpy", "xarray")
REMOTE_WORKER_TIMEOUT_S = 120.0
CONNECT_TIMEOUT = "30s"


# The embedded clusters (scheduler, nannies, workers, dashboard) listen on loopback only: Dask's
# TCP comms carry pickled code without authentication, so anyone who can reach a port can run
# code on the workers. A remote cluster is the user's own choice (see docs/cluster.md on TLS).
LOOPBACK = "127.0.0.1"
DASHBOARD = f"{LOOPBACK}:0"  # a free port on loopback


# ---------------------------------------------------------------- embedded


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA runtime means no GPUs
        return 0


def gpu_worker_options(spec: ClusterSpec, n_gpu: int, n_cpu: int) -> dict[str, dict[str, Any]]:
    """Options of the embedded GPU workers (pure): one process per GPU (one CUDA context and
    one model per GPU), each with resource GPU=1, `threads_per_worker` threads (default 1,
    DESIGN §7) and its share of the machine's memory as memory limit.

    The memory share is explicit because Dask's "auto" limit is memory × threads/cores: a
    one-thread worker on a 16-core machine got 1/16 of the memory, and its nanny killed it
    when one shard's gradients (e.g. 128 samples × 8 SmolLM2 layers = 3.6 GB) outgrew that.
    More threads (`[cluster] threads_per_worker`) let the score and stats graphs, which are
    mostly CPU work (store reads, host-device copies, permutation sums), use the other cores;
    the GPU resource still admits one extraction task per GPU at a time.
    """
    n = spec.n_workers or n_gpu
    threads = spec.threads_per_worker or 1
    return {
        f"gpu-{i}": {"nthreads": threads, "memory_limit": 1.0 / n, "resources": {GPU_RESOURCE: 1},
                     "env": {"CUDA_VISIBLE_DEVICES": str(i % n_gpu)}}
        for i in range(n)
    }


WORKER_PRELOAD = "qkov.pipeline.cluster"  # its dask_setup runs in every embedded worker process


def dask_setup(worker) -> None:  # noqa: ARG001 - the Dask preload hook
    """Embedded workers ignore SIGINT. A terminal's Ctrl-C goes to the whole process group: the
    workers died of it mid-task (tracebacks, and a client waiting on them while its own
    KeyboardInterrupt could be lost), where the client alone should stop, close the cluster and
    release the run's lock. The workers end with the cluster."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    import logging

    # when qkov closes its own cluster after a Ctrl-C, a worker still running a task reports the
    # scheduler it can no longer reach and the task it was told to drop: expected, not news
    def expected_at_shutdown(record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Failed to communicate with scheduler during heartbeat" in msg or "ended with CancelledError" in msg)

    for name in ("distributed.worker", "distributed.worker.state_machine"):
        logging.getLogger(name).addFilter(expected_at_shutdown)


def dask_teardown(worker) -> None:  # noqa: ARG001 - the Dask preload hook, run as the worker closes
    """The worker process is about to exit: its final garbage collection is skipped. A spawned
    process ends with a full collection over every object torch and transformers created
    (`Py_FinalizeEx`), which took the nanny's 4 s grace period on a busy 2-core machine: each
    worker was killed with "Worker process still alive after 4.0 seconds, killing". Frozen
    objects are left to the OS; nothing in a closed worker waits on their finalizers (the
    stores' chunks are written and closed by the tasks that wrote them)."""
    import gc

    gc.freeze()


# The embedded clusters' worker processes are started with multiprocessing's "spawn", which by
# default re-runs the user's main script in every worker (as `__mp_main__`) so that objects
# defined there can be unpickled. A script that calls `qkov.run(job)` at its top level, without
# an `if __name__ == "__main__":` guard, then started a cluster inside each worker as it
# started ("Nanny failed to start"). qkov's workers need nothing from the user's main module
# (tasks are qkov's own functions; cloudpickle ships anything defined in `__main__` by value),
# so while an embedded cluster is open its worker processes are started without it.
# Fork is no alternative: the client process already runs torch's and Dask's threads.
WORKER_PROCESS_NAME = "Dask Worker process (from Nanny)"  # distributed.nanny.WorkerProcess
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")
_skip_main_open = 0
_skip_main_lock = threading.Lock()
_prepare_original = None


def _preparation_data_without_main(name):
    data = _prepare_original(name)
    if name == WORKER_PROCESS_NAME:
        for key in _MAIN_KEYS:
            data.pop(key, None)
    return data


@contextmanager
def workers_without_main() -> Iterator[None]:
    """While open, the Dask worker processes this process spawns do not import its main module
    (`multiprocessing.spawn.get_preparation_data` leaves it out for them; other processes keep it)."""
    global _skip_main_open, _prepare_original
    from multiprocessing import spawn

    with _skip_main_lock:
        if _skip_main_open == 0:
            _prepare_original = spawn.get_preparation_data
            spawn.get_preparation_data = _preparation_data_without_main
        _skip_main_open += 1
    try:
        yield
    finally:
        with _skip_main_lock:
            _skip_main_open -= 1
            if _skip_main_open == 0:
                spawn.get_preparation_data = _prepare_original


def gpu_cluster(options: dict[str, dict[str, Any]]):
    """A SpecCluster of nanny-managed workers with these options (see gpu_worker_options)."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {name: {"cls": Nanny, "options": {"host": LOOPBACK, "preload": [WORKER_PRELOAD], **opts}}
               for name, opts in options.items()}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"host": LOOPBACK, "dashboard_address": DASHBOARD}})


def local_cluster(spec: ClusterSpec):
    from distributed import LocalCluster

    n_gpu = gpu_count()
    if n_gpu:
        return gpu_cluster(gpu_worker_options(spec, n_gpu, os.cpu_count() or 1))
    threads = spec.threads_per_worker or 1
    n = spec.n_workers or max(1, (os.cpu_count() or 1) // threads)
    return LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, host=LOOPBACK, dashboard_address=DASHBOARD,
                        preload=[WORKER_PRELOAD])


# ---------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """A `[cluster.profiles.NAME]` table, split into qkov's keys and the cluster class's options."""

    name: str
    kind: str
    scale: int | None  # workers of the default group (SLURM: worker processes over all jobs); None: 1, or the manifest's
    wait_for_workers: int | None  # workers that must have joined before work is sent; None: all that were asked for
    wait_timeout: float | None  # seconds; None waits as long as the batch queue takes
    options: dict[str, Any]


def parse_profile(name: str, raw: dict[str, Any]) -> Profile:
    """Validate a profile table; qkov's own keys are kind, scale, wait_for_workers, wait_timeout."""
    from dask.utils import parse_timedelta

    opts = dict(raw)
    kind = opts.pop("kind", None)
    if kind not in PROFILE_KINDS:
        raise ClusterError(f"[cluster.profiles.{name}] kind must be one of {list(PROFILE_KINDS)}, not {kind!r}")
    scale = opts.pop("scale", None)
    if scale is not None and (not isinstance(scale, int) or isinstance(scale, bool) or scale < 1):
        raise ClusterError(f"[cluster.profiles.{name}] scale must be a positive integer (workers to start), not {scale!r}")
    wait = opts.pop("wait_for_workers", None)
    if wait is not None and (not isinstance(wait, int) or isinstance(wait, bool) or wait < 0):
        raise ClusterError(f"[cluster.profiles.{name}] wait_for_workers must be an integer ≥ 0, not {wait!r}")
    timeout = opts.pop("wait_timeout", None)
    try:
        timeout = None if timeout is None else float(parse_timedelta(timeout, default="s"))
    except (TypeError, ValueError, KeyError):
        raise ClusterError(f"[cluster.profiles.{name}] wait_timeout must be seconds or a duration like '20 minutes', not {timeout!r}") from None
    return Profile(name, kind, scale, wait, timeout, opts)


def _import(module: str, attr: str, kind: str, pip_name: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise ClusterError(f"cluster profile kind {kind!r} needs {pip_name}: pip install {pip_name}") from None


def slurm_cluster(profile: Profile):
    """A dask-jobqueue SLURMCluster; the job file's options override ~/.config/dask/jobqueue.yaml."""
    cls = _import("dask_jobqueue", "SLURMCluster", "slurm", "dask-jobqueue")
    try:
        return cls(**profile.options)
    except (TypeError, ValueError) as e:
        raise ClusterError(f"[cluster.profiles.{profile.name}] (slurm): {e}") from None


# Keys that shape the DaskCluster resource; every other option goes to KubeCluster itself
# (namespace, port_forward_cluster_ip, resource_timeout, shutdown_on_close, ...).
KUBE_SPEC_KEYS = ("name", "image", "worker_command", "resources", "env", "scheduler_resources", "worker_groups",
                  "idle_timeout", "scheduler_service_type", "custom_cluster_spec")
DEFAULT_K8S_NAME = "qkov"


def _kube_env(env: dict | list | None) -> list[dict] | None:
    if env is None:
        return None
    return [{"name": k, "value": str(v)} for k, v in env.items()] if isinstance(env, dict) else list(env)


def _kube_worker(opts: dict, group: dict, replicas: int) -> dict:
    """A DaskWorkerGroup `worker` section; fields left unset are dropped (the CRD has no nulls)."""
    from dask_kubernetes.operator import make_worker_spec

    command = group.get("worker_command", opts.get("worker_command", ["dask", "worker"]))
    w = make_worker_spec(image=group.get("image", opts.get("image")), n_workers=replicas,
                         worker_command=command if isinstance(command, str) else list(command),
                         resources=group.get("resources", opts.get("resources")), env=_kube_env(group.get("env", opts.get("env"))))
    container = w["spec"]["containers"][0]
    for key in ("env", "resources"):
        if container.get(key) is None:
            container.pop(key)
    return w


def _load_manifests(path: str) -> tuple[dict, dict[str, dict]]:
    """The DaskCluster and the DaskWorkerGroups (by group suffix) of a multi-document YAML file."""
    import yaml

    docs = [d for d in yaml.safe_load_all(Path(path).expanduser().read_text()) if d]
    clusters = [d for d in docs if d.get("kind") == "DaskCluster"]
    if len(clusters) != 1:
        raise ClusterError(f"custom_cluster_spec {path}: expected exactly one DaskCluster document, found {len(clusters)}")
    cluster = clusters[0]
    name = cluster["metadata"]["name"]
    groups = {}
    for d in docs:
        if d.get("kind") == "DaskWorkerGroup" and d["spec"].get("cluster") == name:
            groups[d["metadata"]["name"].removeprefix(name + "-")] = d["spec"]["worker"]
    return cluster, groups


def kube_resources(profile: Profile) -> tuple[dict, dict[str, dict]]:
    """The DaskCluster resource and the extra worker groups' `worker` specs of a kubernetes profile.

    Pure (no API server needed), so the result is validated offline against the operator's CRDs.
    Either `custom_cluster_spec` (a YAML file such as deploy/k8s/daskcluster.yaml; a relative
    path is relative to the working directory) or the keys
    image, worker_command, resources, env, scheduler_resources, worker_groups = [{name, scale, ...}].
    """
    from dask_kubernetes.operator import make_cluster_spec

    o = profile.options
    if o.get("custom_cluster_spec"):
        cluster, groups = _load_manifests(o["custom_cluster_spec"])
        if profile.scale is not None:
            cluster["spec"]["worker"]["replicas"] = profile.scale
        return cluster, groups
    if not o.get("image"):
        raise ClusterError(f"[cluster.profiles.{profile.name}] (kubernetes) needs image = an image with qkov installed (see deploy/Dockerfile)")
    scale = profile.scale or 1
    cluster = make_cluster_spec(name=o.get("name", DEFAULT_K8S_NAME), image=o["image"], n_workers=scale,
                                scheduler_service_type=o.get("scheduler_service_type", "ClusterIP"), idle_timeout=o.get("idle_timeout", 0))
    cluster["spec"]["worker"] = _kube_worker(o, {}, scale)
    sched = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    # the scheduler never gets the workers' resources (a GPU limit there would waste a GPU)
    for key, value in (("env", _kube_env(o.get("env"))), ("resources", o.get("scheduler_resources"))):
        if value is None:
            sched.pop(key, None)
        else:
            sched[key] = value
    groups = {}
    for g in o.get("worker_groups", []) or []:
        if "name" not in g:
            raise ClusterError(f"[cluster.profiles.{profile.name}] every worker_groups entry needs a name")
        groups[g["name"]] = _kube_worker(o, g, int(g.get("scale", 1)))
    return cluster, groups


def kube_workers(cluster: dict, groups: dict[str, dict]) -> int:
    """Workers the resources ask for: the default group's replicas plus every extra group's."""
    return int(cluster["spec"]["worker"]["replicas"]) + sum(int(g["replicas"]) for g in groups.values())


def kube_cluster(profile: Profile):
    cls = _import("dask_kubernetes.operator", "KubeCluster", "kubernetes", "dask-kubernetes")
    spec, groups = kube_resources(profile)
    kwargs = {k: v for k, v in profile.options.items() if k not in KUBE_SPEC_KEYS}
    try:
        cluster = cls(custom_cluster_spec=spec, **kwargs)
    except TypeError as e:
        raise ClusterError(f"[cluster.profiles.{profile.name}] (kubernetes): {e}") from None
    for name, worker in groups.items():
        cluster.add_worker_group(name, custom_spec=worker)
    return cluster, kube_workers(spec, groups)


def profile_cluster(profile: Profile):
    """Start the profile's cluster (submits batch jobs / creates Kubernetes resources).
    Returns the cluster and the number of workers it was asked for."""
    if profile.kind == "slurm":
        cluster = slurm_cluster(profile)
        cluster.scale(profile.scale or 1)
        return cluster, profile.scale or 1
    return kube_cluster(profile)


# ---------------------------------------------------------------- connecting and checking


def connect(address: str, timeout: str = CONNECT_TIMEOUT):
    """A Client for a scheduler address or a scheduler file."""
    from distributed import Client

    try:
        if Path(address).is_file():
            return Client(scheduler_file=address, timeout=timeout)
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} ({e}); start one (`dask scheduler`) "
                           "or check the address and that this machine can reach it") from None


def await_workers(client, n: int, timeout: float | None, where: str) -> None:
    if n <= 0:
        return
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError:
        have = len(client.scheduler_info(n_workers=-1)["workers"])
        raise ClusterError(f"{where}: {have} of {n} workers joined within {timeout:g} s; start workers "
                           "(`dask worker ADDRESS`, add `--resources GPU=1 --nthreads 1` on GPU hosts) or check the batch queue") from None


def environment() -> dict[str, Any]:
    """Versions that must match across the cluster (run locally and, pickled by value, on workers)."""
    import importlib.metadata as md
    import importlib.util

    out: dict[str, Any] = {}
    for pkg in MUST_MATCH:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    # qkov may run from a checkout on PYTHONPATH without being installed: the packages are what count
    try:  # a submodule's spec imports its parent package, which may be what is missing
        out["importable"] = all(importlib.util.find_spec(m) is not None for m in ("qkov.pipeline", "qkov.workers"))
    except ImportError:
        out["importable"] = False
    return out


def environment_problems(local: dict[str, Any], workers: dict[str, dict[str, Any]]) -> list[str]:
    """One line per worker whose environment would break or change the run."""
    problems = []
    for addr, env in sorted(workers.items()):
        if not env.get("importable"):
            problems.append(f"{addr}: cannot import qkov (qkov.pipeline, qkov.workers); install qkov in the workers' image/environment")
            continue
        diff = [f"{p} {env.get(p)} (client {local.get(p)})" for p in MUST_MATCH if env.get(p) != local.get(p)]
        if diff:
            problems.append(f"{addr}: " + ", ".join(diff))
    return problems


def _by_value(fn):
    """`fn` re-created as a closure so cloudpickle ships its code, not an import of qkov."""
    import types

    return types.FunctionType(fn.__code__, {"__builtins__": __builtins__, "MUST_MATCH": MUST_MATCH}, fn.__name__ + "_probe")


def check_workers(client) -> None:
    probe = _by_value(environment)
    problems = environment_problems(environment(), client.run(probe))
    if problems:
        raise ClusterError("the cluster's workers do not match this client:\n  " + "\n  ".join(problems)
                           + "\nUse one image/environment for client, scheduler and workers (deploy/Dockerfile).")


def gpu_workers(client) -> list[str]:
    info = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in info.items() if w.get("resources", {}).get(GPU_RESOURCE, 0) >= 1)


@contextmanager
def cluster_client(spec: ClusterSpec, scheduler: str | None = None) -> Iterator[object]:
    """A distributed Client for the run; what it started is closed on exit."""
    address = scheduler or spec.address
    if address:
        client = connect(address)
        try:
            await_workers(client, 1, REMOTE_WORKER_TIMEOUT_S, f"scheduler {address}")
            check_workers(client)
            yield client
        finally:
            _close(client, None)
        return
    if spec.profile:
        profile = parse_profile(spec.profile, spec.profiles[spec.profile])
        cluster, asked = profile_cluster(profile)
        with _client_of(cluster) as client:
            wait = asked if profile.wait_for_workers is None else profile.wait_for_workers
            await_workers(client, wait, profile.wait_timeout, f"profile {profile.name!r}")
            check_workers(client)
            yield client
        return
    with workers_without_main():  # held while the cluster lives: a nanny may restart a worker at any time
        with _client_of(local_cluster(spec), interrupted=_stop_workers_now) as client:
            yield client


CLOSE_TIMEOUT_S = 60.0  # closing a cluster: a Ctrl-C waits this long at most (see _ctrl_c_waits)


@contextmanager
def _ctrl_c_waits() -> Iterator[None]:
    """A Ctrl-C (SIGINT) that arrives during the block is held until the block has ended, then
    raised as KeyboardInterrupt, unless the block is already ending with an exception (usually
    the KeyboardInterrupt of the Ctrl-C that started the unwinding). Main thread only.

    For closing a cluster: the CLI delivers a Ctrl-C again every 2 s until the command has ended
    (cli._sigterm_unwinds), and one raised inside `SpecCluster.close` cancelled the close half
    way: the cluster was left "closing", and distributed's exit hook then waited its full 10 s for
    a status that never changed (an interrupted run took ~13 s to exit, ~10 of them asleep)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, _frame: arrived.append(signum))
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        signal.signal(signal.SIGINT, before)
        if arrived and not failed and before is not signal.SIG_IGN:
            raise KeyboardInterrupt


INTERRUPT_GRACE_S = 0.5  # an interrupted run's workers: seconds to stop before they are killed


def _stop_workers_now(cluster) -> None:
    """Close the nannies of an embedded cluster with a short grace (INTERRUPT_GRACE_S), as a run
    stops on Ctrl-C or SIGTERM. Closed as usual (5 s), a worker still running a task cannot exit
    until the task has ended (its executor thread is joined) and its nanny kills it after 4 s, so
    an interrupted run sat ~4 s waiting for that; killed sooner, it is killed the same way, and
    the run is resumable as after any killed worker (a shard is recorded done in `_work` only
    after its data, store.work.record_shard; --resume redoes what a killed task left). The
    scheduler and the client then close as usual."""
    import asyncio

    nannies = [w for w in list(getattr(cluster, "workers", {}).values()) if hasattr(w, "kill") and hasattr(w, "close")]
    if not nannies:
        return

    async def close_all() -> None:
        await asyncio.gather(*(n.close(timeout=INTERRUPT_GRACE_S, reason="qkov-interrupted") for n in nannies),
                             return_exceptions=True)

    import logging

    def expected(record: logging.LogRecord) -> bool:  # the kill is the point here, not news
        return "Worker process still alive after" not in record.getMessage()

    log = logging.getLogger("distributed.nanny")
    log.addFilter(expected)
    try:
        with suppress(Exception):  # the usual close follows whatever happens here
            cluster.sync(close_all, callback_timeout=CLOSE_TIMEOUT_S)
    finally:
        log.removeFilter(expected)


def _close(client, cluster) -> None:
    """Close the client, then the cluster, with a Ctrl-C held back until both are closed (or
    CLOSE_TIMEOUT_S has passed: a close that hangs does not hang the command)."""
    with _ctrl_c_waits():
        try:
            if client is not None:
                client.close(timeout=CLOSE_TIMEOUT_S)
        finally:
            if cluster is not None:
                with suppress(TimeoutError):
                    cluster.close(timeout=CLOSE_TIMEOUT_S)


@contextmanager
def _client_of(cluster, interrupted=None) -> Iterator[object]:
    """A Client of `cluster`; both closed on exit (the cluster also when the Client fails).
    `interrupted(cluster)`, if given, runs first when the run ends on Ctrl-C or SIGTERM."""
    from distributed import Client

    client = None
    try:
        client = Client(cluster)
        yield client
    except (KeyboardInterrupt, SystemExit):
        if interrupted is not None:
            with _ctrl_c_waits():
                interrupted(cluster)
        raise
    finally:
        _close(client, cluster)
