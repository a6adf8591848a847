"""The output as a place to write a run: reachable and writable, never inside another run,
and an old run there replaced so that no interruption leaves a part of it behind."""
from __future__ import annotations

import json
import os

from .. import schema
from ..errors import StoreError, UsageError
from .runstore import RunStore



def check_reachable(store: RunStore) -> None:
    """The output's storage backend is installed, has credentials and answers; a local output's
    nearest existing folder is a writable folder. Nothing is created."""
    from .paths import nearest_existing

    local = store.local
    if local is None:
        _check_remote(store)
        return
    probe = nearest_existing(local)
    if not probe.is_dir():
        raise StoreError(f"cannot write the output {store.path}: {probe} is not a folder. Choose a writable output.path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write the output {store.path}: {probe} is not writable. Choose a writable output.path.")


def _check_remote(store: RunStore) -> None:
    import fsspec

    protocol = store.path.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(store.path, **store.storage_options)
    except ImportError as e:
        raise UsageError(f"output.path {store.path}: the {protocol}:// storage backend is not installed ({e}); "
                         f"install it (e.g. pip install {'s3fs' if protocol in ('s3', 's3a') else 'the fsspec backend for ' + protocol})") from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"output.path {store.path}: invalid [output] storage_options ({e})") from None
    try:
        fs.exists(path)
    except Exception as e:  # noqa: BLE001 - backends raise their own credential/network errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StoreError(f"cannot reach the output {store.path} ({type(e).__name__}: {first}); check the credentials "
                         "([output] storage_options or the backend's environment variables) and the bucket") from None


def enclosing_run(store: RunStore) -> str | None:
    """The Zarr store (a qkov run, or one of its groups' folders) that the output's real folder
    (symlinks resolved) lies inside, or None. A run written there would nest in another run's
    metadata: a symlink into another run's group is the usual way in."""
    if store.local is None:
        return None
    for folder in store.local.expanduser().resolve().parents:
        meta = folder / "zarr.json"
        if meta.is_file():
            try:
                attrs = json.loads(meta.read_bytes()).get("attributes") or {}
            except (ValueError, AttributeError):
                attrs = {}
            return f"{folder} (a qkov run)" if attrs.get(schema.ATTR_RUN) else f"{folder} (a Zarr store)"
    return None


def require_not_nested(store: RunStore) -> None:
    """Refuse an output that lies inside another run (`enclosing_run`)."""
    inside = enclosing_run(store)
    if inside is not None:
        real = store.local.expanduser().resolve()
        shown = store.path if str(real) == str(store.local) else f"{store.path} (-> {real})"
        raise StoreError(f"output.path {shown} lies inside {inside}; a run there would write into another run. "
                         "Choose an output.path outside any run.")


def replacing(store: RunStore) -> bool:
    """An `--overwrite` stopped (Ctrl-C, a kill) while it deleted the old run: the old run is no
    longer a run (its root metadata went first), its leftovers wait under `_replacing`."""
    return store.has_group(schema.REPLACING)


def _remove(store: RunStore, entry: str, trash: str | None) -> None:
    """One step of `replace_run`: `entry` moved into `trash` (a local disk: one rename), or deleted
    (an object store, `trash` None: no rename there)."""
    if trash is None:
        store._fs()[0].rm(entry, recursive=True)
    else:
        os.replace(entry, os.path.join(trash, f"{os.path.basename(entry)}.old"))


def replace_run(store: RunStore) -> None:
    """Delete the old run at `store` (the caller holds its lock), so that an interruption at any
    point leaves no part of it that reads as a run, or as a group beside a new run: a marker
    group `_replacing` is written first, then the root's metadata goes (from here nothing
    opens it as a run), then every other entry is moved into the marker (a local disk) or
    deleted (object stores), and the marker last. A stopped replacement is finished by the
    next `--overwrite` and refused by `--resume` (`replacing`)."""
    import zarr

    if not replacing(store):
        if not store.is_run():  # never delete something that is not a qkov run
            raise StoreError(f"{store.path} exists and is not a qkov run; refusing to overwrite it. Choose another output.path.")
        zarr.create_group(store=store.zarr(), path=schema.REPLACING, overwrite=True, zarr_format=3)
    local = store.local
    root = str(local).rstrip("/") if local is not None else None
    trash = f"{root}/{schema.REPLACING}" if local is not None else None
    meta = f"{root}/zarr.json" if local is not None else f"{store._fs()[1].rstrip('/')}/zarr.json"
    if (os.path.exists(meta) if local is not None else store._fs()[0].exists(meta)):
        _remove(store, meta, trash)
    for entry in store.entries():
        if entry.rstrip("/").rsplit("/", 1)[-1] != schema.REPLACING:
            _remove(store, entry, trash)
    store.delete(schema.REPLACING)
