"""Where a run lives: the one place that tells a local folder from an fsspec URL, and the
file-system questions about an output (its zarr store, free space, size, entries, deletion).

Everything else asks here (or asks its `RunStore`), never `"://" in path` or `file://` itself.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import zarr


def is_url(path: str) -> bool:
    """The output is an fsspec URL (s3://, gs://, memory://…); `file://` is a local folder."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> Path | None:
    """The local folder of `path` (a `file://` prefix dropped), or None for a URL."""
    return None if is_url(path) else Path(str(path).removeprefix("file://"))


def in_process_only(path: str) -> bool:
    """fsspec's memory:// store lives in one process's memory: no other process sees it."""
    return str(path).startswith("memory://")


def zarr_store(path: str, storage_options: dict | None = None, read_only: bool = False):
    """A zarr v3 store for a local path or any fsspec URL (s3://, gs://, memory://…)."""
    local = local_path(path)
    if local is None:
        return zarr.storage.FsspecStore.from_url(str(path), storage_options=storage_options or {}, read_only=read_only)
    return zarr.storage.LocalStore(str(local), read_only=read_only)


def fsspec_fs(path: str, storage_options: dict | None = None):
    import fsspec

    return fsspec.core.url_to_fs(path, **(storage_options or {}))


def sync(coro):
    """Run one of zarr's coroutines (its store API is async) to completion."""
    from zarr.core.sync import sync as _zarr_sync

    return _zarr_sync(coro)


def nearest_existing(folder: Path) -> Path:
    """`folder`, or its nearest ancestor that exists (where a new output would be created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(path: str) -> int | None:
    """Free bytes on the file system the output goes to (its nearest existing folder); None for URLs."""
    local = local_path(path)
    return None if local is None else shutil.disk_usage(nearest_existing(local.absolute())).free


def size_bytes(path: str) -> int:
    """Bytes under a local output (0 when missing or a URL)."""
    root = local_path(path)
    if root is None or not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def remove(path: str, storage_options: dict | None = None) -> None:
    """Delete a folder (or prefix) and everything under it; nothing when it is not there."""
    local = local_path(path)
    if local is None:
        fs, p = fsspec_fs(path, storage_options)
        if fs.exists(p):
            fs.rm(p, recursive=True)
    else:
        shutil.rmtree(local, ignore_errors=True)
