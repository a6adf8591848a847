"""Run-store I/O at the edge: opening local paths or fsspec URLs, provenance,
completion markers and the ownership lock. Names come from `pipeline.schema`.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import zarr

from . import schema


class StoreError(RuntimeError):
    """A run store that cannot be used as asked; the message says what to do."""


def is_url(path: str) -> bool:
    return "://" in str(path)


def zarr_store(path: str, storage_options: dict | None = None, read_only: bool = False):
    """A zarr v3 store for a local path or any fsspec URL (s3://, gs://, memory://…)."""
    if is_url(path) and not str(path).startswith("file://"):
        return zarr.storage.FsspecStore.from_url(str(path), storage_options=storage_options or {}, read_only=read_only)
    local = str(path).removeprefix("file://")
    return zarr.storage.LocalStore(local, read_only=read_only)


def open_root(path: str, storage_options: dict | None = None, mode: str = "r") -> zarr.Group:
    """Open the run's root group. mode 'r' requires it to exist."""
    store = zarr_store(path, storage_options, read_only=(mode == "r"))
    try:
        return zarr.open_group(store, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise StoreError(f"no qkov run at {path}: {e}. Run `qkov run JOB.toml` first, or check the path.") from None


def has_group(root: zarr.Group, name: str) -> bool:
    try:
        root[name]
        return True
    except KeyError:
        return False


def is_complete(root: zarr.Group, group: str) -> bool:
    return has_group(root, group) and bool(root[group].attrs.get(schema.ATTR_COMPLETE, False))


def mark_complete(root: zarr.Group, group: str) -> None:
    """Set last, after every chunk of the group is written: readers trust only this."""
    root[group].attrs[schema.ATTR_COMPLETE] = True


def require_complete(root: zarr.Group, group: str, needed_by: str) -> None:
    if not has_group(root, group):
        raise StoreError(f"{needed_by} needs the '{group}' group, but this run has no '{group}' group; "
                         "run the earlier stages first (`qkov run JOB.toml`).")
    if not is_complete(root, group):
        raise StoreError(
            f"{needed_by} needs the '{group}' group, which is not marked complete (an interrupted run?); "
            "finish it with `qkov run JOB.toml --resume`."
        )
    ver = root[group].attrs.get(schema.ATTR_SCHEMA)
    if ver is not None and ver != schema.SCHEMA_VERSION:
        raise StoreError(
            f"the '{group}' group was written with store schema version {ver}, this qkov reads version {schema.SCHEMA_VERSION}; "
            "rerun the job with this version (qkov run --overwrite) or use the qkov that wrote it."
        )


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("qkov", "torch", "transformers", "dask", "distributed", "zarr", "xarray", "numpy", "scipy"):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def provenance(config: dict[str, Any] | None = None, config_hash: str | None = None, **extra: Any) -> dict[str, Any]:
    """Attrs stamped on every group: what produced it (kronfluence-style config stamp)."""
    return {
        schema.ATTR_SCHEMA: schema.SCHEMA_VERSION,
        schema.ATTR_PROVENANCE: json.loads(
            json.dumps(
                {
                    "config": config,
                    "config_hash": config_hash,
                    "versions": versions(),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **extra,
                },
                default=str,
            )
        ),
    }


def read_provenance(root: zarr.Group, group: str | None = None) -> dict[str, Any]:
    node = root if group is None else root[group]
    return dict(node.attrs.get(schema.ATTR_PROVENANCE, {}))


# ---- ownership lock -------------------------------------------------------
# Two `qkov run`s on one output must never interleave. The lock is a record in
# the store itself, so it works on object storage too: the zarr v3 group
# `_lock` whose metadata document (`_lock/zarr.json`) holds the owner (token,
# host, pid, the pid's start time, since). It is created with the store's
# exclusive create (atomic on local disks: link(2); on object stores zarr
# checks then writes, so two starts in the same instant may both pass there) and
# read back, so of two concurrent starts exactly one owns the output. It is taken
# *before* the output is created or removed. A lock whose owner is gone (this
# host, pid dead, a zombie, or reused by another process) is stale and is broken
# by the next run; a lock from another host is never guessed stale.

LOCK_GROUP = "_lock"
_LOCK_DOC = f"{LOCK_GROUP}/zarr.json"
ATTR_LOCK = "qkov_lock"


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


def _process_started(pid: int) -> float | None:
    """Start time of a live, non-zombie process on this host; None when there is none."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed but not yet reaped
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # alive, owned by someone else
        return -1.0


def read_lock(path: str, storage_options: dict | None = None) -> dict | None:
    """The owner record of the output's lock, or None when nobody holds it."""
    from zarr.core.buffer import default_buffer_prototype

    try:
        buf = _sync(zarr_store(path, storage_options, read_only=True).get(_LOCK_DOC, prototype=default_buffer_prototype()))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if buf is None:
        return None
    try:
        return dict(json.loads(buf.to_bytes())["attributes"][ATTR_LOCK])
    except (ValueError, KeyError, TypeError):
        return {"token": None}  # unreadable: treat as held by an unknown owner


def _lock_is_stale(held: dict) -> bool:
    """True only when the owner is provably gone: same host and its pid is dead or reused."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        pid = int(held.get("pid", -1))
    except (TypeError, ValueError):
        return False
    started = _process_started(pid) if pid > 0 else None
    if started is None:
        return True
    recorded = held.get("pid_started")
    # a live pid that started at another time is a different process that reused the number
    return started >= 0 and recorded is not None and abs(started - float(recorded)) > 1.0


def _describe_owner(held: dict) -> str:
    return f"host {held.get('host')}, pid {held.get('pid')}, since {held.get('since')}"


def acquire_lock(path: str, storage_options: dict | None = None) -> str:
    """Own the output at `path` (created if missing); returns the token for `release_lock`.

    Raises StoreError when a live process owns it, or when the path cannot be written.
    """
    from zarr.core.buffer import default_buffer_prototype

    token = uuid.uuid4().hex
    record = {
        "token": token,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _process_started(os.getpid()),
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {ATTR_LOCK: record}}
    buf = default_buffer_prototype().buffer.from_bytes(json.dumps(doc).encode())
    store = zarr_store(path, storage_options)
    for _ in range(3):  # at most: a stale lock broken, then a lost race with another breaker
        try:
            _sync(store.set_if_not_exists(_LOCK_DOC, buf))
        except OSError as e:
            raise StoreError(f"cannot write the output {path}: {e}. Choose a writable output.path.") from None
        held = read_lock(path, storage_options)
        if held is None:  # released between our attempt and the read: try again
            continue
        if held.get("token") == token:
            return token
        if not _lock_is_stale(held):
            raise StoreError(
                f"another qkov run owns the output {path} ({_describe_owner(held)}); wait for it to finish. "
                f"If that process is gone (e.g. on another machine), delete {path}/{LOCK_GROUP} and retry."
            )
        if read_lock(path, storage_options) == held:  # break only the stale record we judged
            _sync(store.delete_dir(LOCK_GROUP))
    raise StoreError(f"could not take the lock on {path}: other qkov runs keep taking it; try again.")


def release_lock(path: str, token: str, storage_options: dict | None = None) -> None:
    """Give the output up, if `token` still owns it."""
    held = read_lock(path, storage_options)
    if held is not None and held.get("token") == token:
        _sync(zarr_store(path, storage_options).delete_dir(LOCK_GROUP))


@contextmanager
def owned(path: str, storage_options: dict | None = None) -> Iterator[str]:
    """Hold the output's lock for the duration of the block."""
    token = acquire_lock(path, storage_options)
    try:
        yield token
    finally:
        release_lock(path, token, storage_options)
