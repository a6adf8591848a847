"""The output's ownership lock: two `qkov run`s on one output never interleave."""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Iterator

from .. import schema
from ..errors import StoreError
from .paths import sync as _sync, zarr_store

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

LOCK_GROUP = schema.LOCK_GROUP
_LOCK_DOC = f"{LOCK_GROUP}/zarr.json"
ATTR_LOCK = schema.ATTR_LOCK


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


def owned_elsewhere(path: str, held: dict) -> StoreError:
    """The refusal of a start on an output whose lock `held` another (live) qkov run holds."""
    return StoreError(
        f"another qkov run owns the output {path} ({_describe_owner(held)}); wait for it to finish. "
        f"If that process is gone (e.g. on another machine), delete {path}/{LOCK_GROUP} and retry."
    )


def require_unlocked(path: str, storage_options: dict | None = None) -> None:
    """Refuse (`owned_elsewhere`) an output a live qkov run owns, without taking its lock."""
    held = read_lock(path, storage_options)
    if held is not None and not _lock_is_stale(held):
        raise owned_elsewhere(path, held)


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
            raise owned_elsewhere(path, held)
        if read_lock(path, storage_options) == held:  # break only the stale record we judged
            _sync(store.delete_dir(LOCK_GROUP))
    raise StoreError(f"could not take the lock on {path}: other qkov runs keep taking it; try again.")


def release_lock(path: str, token: str, storage_options: dict | None = None) -> None:
    """Give the output up, if `token` still owns it. Ctrl-C is held back until it is done (a
    KeyboardInterrupt half-way would leave the lock behind)."""
    with _sigint_deferred():
        held = read_lock(path, storage_options)
        if held is not None and held.get("token") == token:
            _sync(zarr_store(path, storage_options).delete_dir(LOCK_GROUP))


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """SIGINT blocked for the block (main thread): a Ctrl-C meanwhile is delivered after it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
