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
from typing import Any

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
        raise StoreError(f"{needed_by} needs the '{group}' group, which this run does not have; run the earlier stages first (`qkov run`).")
    if not is_complete(root, group):
        raise StoreError(
            f"{needed_by} needs the '{group}' group, which is incomplete (an interrupted run?); finish it with `qkov run JOB.toml --resume`."
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
# the store (works on object storage too): owner id + host + pid + time. A
# stale lock (dead pid on this host) can be broken with --resume/--overwrite.

LOCK_KEY = "lock"


def _lock_group(root: zarr.Group) -> zarr.Group:
    return root.require_group(schema.WORK)


def acquire_lock(root: zarr.Group) -> str:
    work = _lock_group(root)
    held = work.attrs.get(LOCK_KEY)
    if held and not _lock_is_stale(held):
        raise StoreError(
            f"another qkov run owns this output (host {held.get('host')}, pid {held.get('pid')}, since {held.get('since')}); "
            "wait for it to finish, or remove the stale lock if that process is gone."
        )
    token = uuid.uuid4().hex
    work.attrs[LOCK_KEY] = {
        "token": token,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # read back: a concurrent writer that won the race has a different token
    if _lock_group(root).attrs.get(LOCK_KEY, {}).get("token") != token:
        raise StoreError("another qkov run took the lock on this output at the same moment; try again.")
    return token


def _lock_is_stale(held: dict) -> bool:
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def release_lock(root: zarr.Group, token: str) -> None:
    work = _lock_group(root)
    held = work.attrs.get(LOCK_KEY)
    if held and held.get("token") == token:
        attrs = dict(work.attrs)
        attrs.pop(LOCK_KEY)
        work.attrs.clear()
        work.attrs.update(attrs)
