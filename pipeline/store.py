"""The run store's one owner: `RunStore` opens, checks, writes, locks and stamps a run.

A run is one Zarr v3 group at a local path or any fsspec URL. Every stage, the CLI and
the API reach the store through a `RunStore`; every stored name comes from
`pipeline.schema`. Workers write their own whole chunks through `RunStore.root`.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import itertools
import json
import os
import shutil
import socket
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from . import schema
from .errors import DAMAGED_FIX, CorruptChunkError, StoreError  # noqa: F401  (StoreError re-exported for callers of the store)


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def zarr_store(path: str, storage_options: dict | None = None, read_only: bool = False):
    """A zarr v3 store for a local path or any fsspec URL (s3://, gs://, memory://…)."""
    if is_url(path):
        return zarr.storage.FsspecStore.from_url(str(path), storage_options=storage_options or {}, read_only=read_only)
    local = str(path).removeprefix("file://")
    return zarr.storage.LocalStore(local, read_only=read_only)


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


@contextmanager
def _quiet_zarr() -> Iterator[None]:
    """str coords (block, score, ids) have no Zarr v3 spec dtype yet; consolidated metadata is a
    zarr-python extension used as xarray does. Neither is the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.UnstableSpecificationWarning)
        warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning, message="Consolidated metadata")
        yield


class RunStore:
    """One run's store. Small and picklable (a path and storage options), so a worker task
    can carry it; opening is lazy."""

    def __init__(self, path: str, storage_options: dict | None = None):
        self.path = str(path)
        self.storage_options = dict(storage_options or {})

    @classmethod
    def coerce(cls, run: "str | RunStore", storage_options: dict | None = None) -> "RunStore":
        """A RunStore from a path or URL (the API's and CLI's RUN argument), or itself."""
        return run if isinstance(run, RunStore) else cls(str(run), storage_options)

    @classmethod
    def of(cls, job) -> "RunStore":
        """The store a job writes ([output] path and storage options)."""
        return cls(job.output.path, job.output.storage_options)

    def __repr__(self) -> str:
        return f"RunStore({self.path!r})"

    # ---- opening --------------------------------------------------------
    def zarr(self, read_only: bool = False):
        return zarr_store(self.path, self.storage_options or None, read_only=read_only)

    def root(self, mode: str = "r") -> zarr.Group:
        """The run's root group. mode 'r' / 'r+' require it to exist."""
        try:
            # never the consolidated copy: it is a snapshot, and qkov reads attrs that change after it
            # (resume records, completion marks)
            return zarr.open_group(self.zarr(read_only=(mode == "r")), mode=mode, zarr_format=3, use_consolidated=False)
        except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"no qkov run at {self.path}: {e}. Run `qkov run JOB.toml` first, or check the path.") from None
        except (ValueError, TypeError, KeyError) as e:  # undecodable or malformed zarr.json
            raise self.damaged(e) from None

    def damaged(self, e: BaseException) -> StoreError:
        """The error for metadata that cannot be read (bytes that are not UTF-8 JSON, missing keys)."""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return StoreError(f"{self.path} is damaged: its Zarr metadata cannot be read ({type(e).__name__}: {first}). "
                          "Restore the run from a copy, or rerun the job with --overwrite.")

    def exists(self) -> bool:
        try:
            zarr.open_group(self.zarr(read_only=True), mode="r", zarr_format=3)
            return True
        except (OSError, zarr.errors.GroupNotFoundError):  # missing, or not a folder at all
            return False
        except (ValueError, TypeError, KeyError) as e:  # something is there, but unreadable
            raise self.damaged(e) from None

    def is_run(self) -> bool:
        return self.exists() and bool(self.root().attrs.get(schema.ATTR_RUN))

    def entries(self) -> list[str]:
        """What lies directly under the output (nothing when it does not exist), our lock excluded."""
        if is_url(self.path):
            fs, p = self._fs()
            try:
                found = [e.rstrip("/") for e in fs.ls(p, detail=False)]
            except FileNotFoundError:
                return []
            return [e for e in found if e.rsplit("/", 1)[-1] != schema.LOCK_GROUP]
        local = Path(self.path.removeprefix("file://"))
        return [str(c) for c in local.iterdir() if c.name != schema.LOCK_GROUP] if local.is_dir() else []

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.path, **self.storage_options)

    # ---- groups ---------------------------------------------------------
    def has_group(self, group: str) -> bool:
        return self.group_attrs(group) is not None

    def group_attrs(self, group: str) -> dict | None:
        """The group's own attrs (never a consolidated copy, which may be stale), or None if absent."""
        try:
            g = zarr.open_group(self.zarr(read_only=True), path=group, mode="r", use_consolidated=False)
        except (FileNotFoundError, NotADirectoryError, zarr.errors.NodeNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            return None
        except (ValueError, TypeError) as e:
            raise self.damaged(e) from None
        return dict(g.attrs)

    def is_complete(self, group: str) -> bool:
        attrs = self.group_attrs(group)
        return attrs is not None and attrs.get(schema.ATTR_COMPLETE) is True

    def mark_complete(self, group: str) -> None:
        """Set last, after every chunk of the group is written: readers trust only this."""
        zarr.open_group(self.zarr(), path=group, mode="r+", use_consolidated=False).attrs[schema.ATTR_COMPLETE] = True

    def stage_hint(self, group: str) -> str:
        """Which command writes `group`, for "run this first" messages."""
        if group in (schema.GRADIENTS, schema.FISHER):
            return "the extract stage (`qkov run JOB.toml`)"
        if group in (schema.SCORES_GROUP, schema.DIAGNOSTICS):  # the score stage writes both
            return "the score stage (`qkov run JOB.toml`, or `--resume` to finish an interrupted run)"
        if group == schema.CHECKS:
            return "the checks (`qkov check JOB.toml`)"
        named = group.removeprefix(f"{schema.STATS}_") if group != schema.STATS else None
        return f"the stats stage (`qkov stats {self.path}" + (f" --name {named}" if named else "") + "`)"

    def require(self, group: str, needed_by: str | None = None) -> None:
        """The one completeness gate: a StoreError naming what to run when `group` is missing,
        incomplete or of another store schema."""
        attrs = self.group_attrs(group)
        who = f"{needed_by} needs the '{group}' group, but " if needed_by else ""
        if attrs is None:
            if not self.exists():
                raise StoreError(f"no qkov run at {self.path}. Run `qkov run JOB.toml` first, or check the path.")
            raise StoreError(f"{who}{self.path} has no '{group}' group; run {self.stage_hint(group)} first")
        if attrs.get(schema.ATTR_COMPLETE) is not True:
            raise StoreError(f"{who}{self.path} has an incomplete '{group}' group (not marked complete: an interrupted run?); "
                             f"run {self.stage_hint(group)} first")
        ver = attrs.get(schema.ATTR_SCHEMA)
        if ver is not None and ver != schema.SCHEMA_VERSION:
            raise StoreError(
                f"the '{group}' group of {self.path} was written with store schema version {ver}, this qkov reads version "
                f"{schema.SCHEMA_VERSION}; rerun the job with this version (qkov run --overwrite) or use the qkov that wrote it."
            )

    def provenance(self, group: str | None = None) -> dict[str, Any]:
        """The recorded provenance of the root (or of one group)."""
        attrs = dict(self.root().attrs) if group is None else (self.group_attrs(group) or {})
        return dict(attrs.get(schema.ATTR_PROVENANCE, {}))

    def config(self) -> dict[str, Any]:
        """The job config the run was started with (as recorded on the root)."""
        return dict(self.provenance().get("config") or {})

    # ---- datasets -------------------------------------------------------
    def open_dataset(self, group: str, needed_by: str | None = None, *, complete: bool = True):
        """A complete group as a lazy xarray dataset (complete=False: one its stage is still
        writing, e.g. the score stage's diagnostics reading the scores before marking them)."""
        import xarray as xr

        if complete:
            self.require(group, needed_by or f"reading '{group}'")
        with _quiet_zarr():
            ds = self._direct(xr.open_zarr(self.zarr(read_only=True), group=group, consolidated=False), group)
        ds = plain_text_coords(ds)
        return with_score_attrs(scores_view(ds)) if group == schema.SCORES_GROUP else ds

    def direct_chunks(self, group: str) -> dict[str, "DirectChunks"]:
        """The arrays of `group` whose chunk files `DirectChunks` reads and writes, by name
        ({} on a remote store or for a group that is not there)."""
        if is_url(self.path):
            return {}
        try:
            arrays = dict(self.root()[group].arrays())
        except KeyError:
            return {}
        folder = os.path.join(str(self.path).removeprefix("file://"), group)
        found = {name: DirectChunks.of(arr, os.path.join(folder, name)) for name, arr in arrays.items()}
        return {name: d for name, d in found.items() if d is not None}

    def _direct(self, ds, group: str):
        """`ds` with its large variables (3+ dims) read by `DirectChunks` where the format allows."""
        readers = self.direct_chunks(group)
        for name in list(ds.data_vars):
            direct = readers.get(str(name))
            if direct is not None and ds[name].ndim >= 3 and direct.shape == ds[name].shape:
                ds[name] = ds[name].copy(data=direct_dask(direct, f"{group}-{name}"))
        return ds

    def open_gradients(self, decode: bool = True, *, complete: bool = True):
        """The `gradients` group, lazily; bfloat16 storage decoded to float32 unless decode=False."""
        ds = self.open_dataset(schema.GRADIENTS, "reading gradients", complete=complete)
        if decode:  # every encoded variable: the blocks' gradients, or their sketches in sketch mode
            for b in list(ds.data_vars):
                ds[b] = decoded(ds[b])
        return ds

    def open_fisher(self):
        return self.open_dataset(schema.FISHER, "reading the Fisher")

    def open_scores(self):
        """The logical `scores` dataset (see `scores_view`), whatever its stored layout."""
        return self.open_dataset(schema.SCORES_GROUP, "reading scores")

    def open_stats(self, name: str | None = None):
        group = schema.stats_group(name)
        return self.open_dataset(group, f"reading '{group}'").load()

    def open_checks(self):
        return self.open_dataset(schema.CHECKS, "reading checks").load()

    def open_tree(self):
        """The whole run as an xarray DataTree (gradients lazily, not decoded)."""
        import xarray as xr

        with _quiet_zarr():
            tree = xr.open_datatree(self.path, engine="zarr", consolidated=False, storage_options=self.storage_options or None)
        for name, child in list(tree.children.items()):
            if child.children:  # bookkeeping with sub-groups (`_work`): as stored
                continue
            ds = child.to_dataset()
            if name == schema.SCORES_GROUP:
                ds = with_score_attrs(scores_view(ds) if ds.attrs.get(schema.ATTR_SCORES_LAYOUT) else ds)
            tree[name] = xr.DataTree(plain_text_coords(ds))
        return tree

    def write_dataset(self, ds, group: str, *, encoding: dict | None = None, compute: bool = True, complete: bool | None = None):
        """Write a dataset as `group` (replacing it). With compute=False returns the delayed
        write (a Dask graph for the caller's executor). complete=True marks it complete afterwards
        (only when computed here); the caller marks a delayed write complete once it ran."""
        with _quiet_zarr():
            out = ds.to_zarr(self.zarr(), group=group, mode="w", compute=compute, encoding=encoding or {},
                             zarr_format=3, consolidated=False)
        if not compute:  # the template is written: its chunks go straight to their files where they can
            direct = self._direct_writes(ds, group)
            out = out if direct is None else direct  # (a Dask collection: never tested for truth)
        if compute and complete:
            self.mark_complete(group)
            self.refresh_consolidated()
        return out

    def _direct_writes(self, ds, group: str, region: dict | None = None):
        """A delayed write of every Dask-backed variable of `ds` through `DirectChunks` (whole
        chunks, as the variables are chunked like their arrays; `region` {dim: slice}: into
        that part of the stored arrays, at chunk boundaries), or None when any of them needs
        zarr's own writer."""
        import dask.array as da

        sources, targets, regions = [], [], []
        readers = self.direct_chunks(group)
        region = region or {}
        for name, var in ds.variables.items():
            if not isinstance(var.data, da.Array):
                continue
            direct = readers.get(str(name))
            if direct is None or direct.ndim != var.ndim:
                return None
            where = tuple(slice(region[d].start or 0, (region[d].start or 0) + n) if d in region else slice(0, n)
                          for d, n in zip(var.dims, var.shape))
            fits = all((w.stop <= big if d in region else n == big) and w.start % k == 0
                       for d, n, w, big, k in zip(var.dims, var.shape, where, direct.shape, direct.chunks))
            whole = all(all(c == k for c in cs[:-1]) and (cs[-1] == k or (cs[-1] < k and w.stop == big))
                        for cs, k, w, big in zip(var.data.chunks, direct.chunks, where, direct.shape))
            if not (fits and whole):
                return None
            sources.append(var.data)
            targets.append(direct)
            regions.append(where)
        return da.store(sources, targets, regions=regions, lock=False, compute=False) if sources else None

    def consolidate(self) -> None:
        """Write the root's consolidated metadata (one read opens the whole run), as a finished
        run has it: xarray then opens the run and each group without a warning. qkov's own
        readers never use it (consolidated=False), so a later stale copy cannot mislead them;
        `write_dataset` keeps it in step."""
        with _quiet_zarr():
            zarr.consolidate_metadata(self.zarr())

    def refresh_consolidated(self) -> None:
        """Keep the root's consolidated view (used by open_datatree) in step, when there is one."""
        with _quiet_zarr():
            if zarr.open_group(self.zarr(read_only=True), mode="r").metadata.consolidated_metadata is not None:
                zarr.consolidate_metadata(self.zarr())

    # ---- the run as a whole ---------------------------------------------
    def create_run(self, config: dict, config_hash: str, stage: str = "run") -> zarr.Group:
        """Create (or stamp) the root as a qkov run, never clearing what is there."""
        try:
            root = zarr.open_group(self.zarr(), mode="a", zarr_format=3)  # "a": never clears a folder
        except OSError as e:
            raise StoreError(f"cannot write the output {self.path}: {e}. Choose a writable output.path.") from None
        root.attrs.update({schema.ATTR_RUN: True, **provenance(config, config_hash, stage=stage)})
        return root

    def remove_run(self) -> None:
        """Delete a previous qkov run here, keeping the lock this process holds on it."""
        if not self.is_run():  # never delete something that is not a qkov run
            raise StoreError(f"{self.path} exists and is not a qkov run; refusing to overwrite it. Choose another output.path.")
        if is_url(self.path):
            fs, _ = self._fs()
            for entry in self.entries():
                fs.rm(entry, recursive=True)
        else:
            for entry in map(Path, self.entries()):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def write_region(self, ds, group: str, region: dict, *, compute: bool = True):
        """Write `ds` into a region of an existing group (whole chunks; the variables that do not
        span the region's dims are left out). With compute=False returns the delayed write."""
        import dask.array as da

        ds = ds.drop_vars([v for v in ds.variables if not set(region) <= set(ds[v].dims)])
        direct = None if compute else self._direct_writes(ds, group, region)
        if direct is not None:  # the Dask variables straight into their chunk files; the rest (coordinates) now
            small = ds.drop_vars([v for v in ds.data_vars if isinstance(ds[v].data, da.Array)])
            if small.variables:
                with _quiet_zarr():
                    small.to_zarr(self.zarr(), group=group, mode="r+", region=region, zarr_format=3, consolidated=False)
            return direct
        with _quiet_zarr():
            return ds.to_zarr(self.zarr(), group=group, mode="r+", region=region, compute=compute, zarr_format=3,
                              consolidated=False)

    def delete(self, group: str | None = None) -> None:
        """Delete one group of the run, or (None) the whole store: a layer group's finished
        sub-run, or `_work` once the run is complete."""
        target = self.path.rstrip("/") + (f"/{group}" if group else "")
        if is_url(target):
            fs, p = fsspec_fs(target, self.storage_options)
            if fs.exists(p):
                fs.rm(p, recursive=True)
        else:
            shutil.rmtree(target.removeprefix("file://"), ignore_errors=True)

    # ---- ownership --------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[str]:
        """Hold the output's lock for the duration of the block (see `acquire_lock`)."""
        token = acquire_lock(self.path, self.storage_options or None)
        try:
            yield token
        finally:
            release_lock(self.path, token, self.storage_options or None)
            self._unlist_lock()

    def _unlist_lock(self) -> None:
        """Consolidated metadata refreshed while the lock was held (`write_dataset` keeps it in
        step) lists the `_lock` group: written again without it, so that xarray never shows a
        lock that is gone. Unless another process took the lock meanwhile (then its release does)."""
        try:
            with _quiet_zarr():
                listed = zarr.open_group(self.zarr(read_only=True), mode="r").metadata.consolidated_metadata
                if listed is not None and schema.LOCK_GROUP in listed.metadata and self.read_lock() is None:
                    zarr.consolidate_metadata(self.zarr())
        except (OSError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
            pass  # no run here (a refused start): nothing is consolidated

    def read_lock(self) -> dict | None:
        return read_lock(self.path, self.storage_options or None)


def plain_text_coords(ds):
    """`ds` with its text coordinates (sample ids, tasks, texts, blocks) as fixed-width `str`
    arrays. Zarr reads them as numpy's variable-width StringDType, which xarray cannot plot
    ("Plotting requires coordinates to be numeric…") and which `.astype(str)` does not convert."""
    import numpy as np

    text = {name: c for name, c in ds.coords.items() if c.dtype.kind == "T"}
    if not text:
        return ds
    return ds.assign_coords({name: (c.dims, np.asarray(c.values.astype(object), dtype=str), c.attrs)
                             for name, c in text.items()})


def with_score_attrs(ds):
    """The logical scores with what each answers (attrs `question`, `units`, `direction`, as the
    statistics' variables carry); `pooled_<score>` is the same score over every pair of A∪B."""
    for name in list(ds.data_vars):
        base = str(name).removeprefix("pooled_")
        if base in schema.SCORE_DOCS:
            question, units, direction = schema.SCORE_DOCS[base]
            if base != name:
                question += f" (every pair of the pooled samples A and B; the A x B block is `{base}`)"
            ds.variables[name].attrs.update(question=question, units=units, direction=direction)
    return ds


def scores_view(raw):
    """The logical `scores` dataset from its stored form: `pooled_<score>` (block, layer, head,
    sample_i, sample_j) and the A×B `<score>` (block, layer, head, sample_a, sample_b), coord
    `kv_head(head)`. A compact store (schema.SCORES_LAYOUT) holds each block's pooled matrices
    once on its own heads (the symmetric alignment folded: its upper triangle once); here the
    alignment is unfolded, K/V are indexed per query head and the A×B block is sliced out,
    lazily, so nothing is copied or read until a value is asked for. A store written before
    the compact layout already is the logical dataset and is returned as it is."""
    import dask.array as da
    import numpy as np
    import xarray as xr

    if raw.attrs.get(schema.ATTR_SCORES_LAYOUT) not in schema.COMPACT_LAYOUTS:
        return raw
    blocks = [str(b) for b in raw[schema.BLOCK].values]
    kv_of = np.asarray(raw[schema.KV_HEAD_OF].values)
    ids = raw[schema.SAMPLE_I].values
    n_a = int(raw.attrs[schema.ATTR_N_A])
    per_head = (schema.BLOCK, schema.LAYER, schema.HEAD)

    def stacked(name: str) -> da.Array | None:  # one logical array from the per-block stored ones
        if f"{name}_{blocks[0]}" not in raw:
            return None
        parts = []
        for b in blocks:
            var = raw[f"{name}_{b}"]
            arr = decoded(var).data
            if schema.ATTR_FOLDED in var.attrs:  # the alignment's upper triangle, once (compact-v2)
                n = int(var.attrs[schema.ATTR_FOLDED])
                if isinstance(arr, da.Array) and arr.numblocks[-2:] == (1, 1):  # whole folded slices: a task per slice
                    arr = arr.map_blocks(schema.unfold_symmetric, n, chunks=arr.chunks[:-2] + ((n,), (n,)), dtype=arr.dtype)
                else:
                    arr = schema.unfold_symmetric(arr, n)
            parts.append(arr[:, kv_of] if schema.head_dim(b) == schema.KV_HEAD else arr)
        return da.stack(parts)

    data = {}
    for s in schema.SCORES:
        full = stacked(schema.pooled_name(s))
        if full is not None:  # keep_pairs = "all"
            data[schema.pooled_name(s)] = (per_head + (schema.SAMPLE_I, schema.SAMPLE_J), full)
            data[s] = (per_head + (schema.SAMPLE_A, schema.SAMPLE_B), full[..., :n_a, n_a:])
        sums = stacked(schema.stat_sums_name(s))  # keep_pairs = "top" | "none"
        if sums is not None:
            data[schema.stat_sums_name(s)] = (per_head + (schema.STAT,), sums)
        for part in ("value", "a", "b"):
            top = stacked(schema.top_name(s, part))
            if top is not None:
                data[schema.top_name(s, part)] = (per_head + (schema.RANK,), top)
    coords = {
        schema.BLOCK: raw[schema.BLOCK].values,
        schema.LAYER: raw[schema.LAYER].values,
        schema.HEAD: raw[schema.HEAD].values,
        schema.KV_HEAD: (schema.HEAD, kv_of),
        schema.SAMPLE_I: ids,
        schema.IS_A: (schema.SAMPLE_I, raw[schema.IS_A].values),
        schema.SAMPLE_A: ids[:n_a],
        schema.SAMPLE_B: ids[n_a:],
        schema.SAMPLE_J: ids,
    }
    return xr.Dataset(data, coords=coords, attrs=dict(raw.attrs))


# ---- direct chunk I/O -------------------------------------------------------
# The large arrays (gradients, pooled scores) have one fixed chunk format: the raw
# little-endian bytes (zarr's `bytes` codec), for the pooled scores compressed by blosc
# (`Blosc` codec: SCORES_COMPRESSION), then a 4-byte crc32c (`Crc32cCodec`), no sharding.
# On a local disk the stages read and write those chunk files
# themselves: zarr's codec pipeline copies every chunk two or three times (a fill-value
# buffer, a merge, np.append for the checksum) and funnels all chunks through one event
# loop, which held extraction's writes near 1 GB/s and slice reads near 0.9 GB/s on the
# H200 host (benchmarks/profile_stages.py). The files are byte for byte what zarr writes
# (tests/test_store_direct.py), so zarr, xarray and every other reader see the same store.


class DirectChunks:
    """Whole-chunk reads and writes of one array in the fixed chunk format, without zarr.
    Picklable (paths and shapes only), so Dask tasks read their own operands. `__getitem__`
    takes any basic selection (what `dask.array.from_array` asks for)."""

    def __init__(self, folder: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, fill, keys: list[str],
                 blosc: dict | None = None):
        self.folder, self.shape, self.chunks = folder, tuple(shape), tuple(chunks)
        self.dtype, self.fill, self.ndim = np.dtype(dtype), fill, len(shape)
        self._sep = keys  # [prefix, separator] of the default chunk key encoding
        self.blosc = blosc  # numcodecs' Blosc config of the array's blosc codec, or None (raw bytes)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_codec"}

    @property
    def codec(self):
        """The blosc compressor, built once per process (it is not picklable)."""
        if self.__dict__.get("_codec") is None:
            from numcodecs import Blosc

            self._codec = Blosc.from_config(dict(self.blosc))
        return self._codec

    @classmethod
    def of(cls, arr: zarr.Array, folder: str) -> "DirectChunks | None":
        """`arr`'s direct reader/writer (its chunk files under `folder`), or None where zarr must
        do it (another codec chain, sharding, another chunk key encoding, a big-endian dtype)."""
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

        meta = arr.metadata
        codecs = list(getattr(meta, "codecs", ()))
        enc = getattr(meta, "chunk_key_encoding", None)
        blosc = codecs.pop(1) if len(codecs) == 3 and isinstance(codecs[1], BloscCodec) else None
        if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], Crc32cCodec)
                or getattr(enc, "name", None) != "default" or arr.dtype.byteorder == ">"):
            return None
        fill = meta.fill_value
        return cls(folder, arr.shape, arr.chunks, arr.dtype.str, None if fill is None else np.asarray(fill).item(),
                   ["c", enc.separator], None if blosc is None else _blosc_config(blosc))

    def _path(self, idx: tuple[int, ...]) -> str:
        prefix, sep = self._sep  # zarr's default chunk key encoding: c/0/1 (or c.0.1)
        return os.path.join(self.folder, sep.join([prefix, *map(str, idx)]))

    def write(self, idx: tuple[int, ...], data: np.ndarray) -> None:
        """Write chunk `idx` whole (an edge chunk's data may be smaller: padded with the fill
        value, as zarr stores it). Atomic: a temporary file renamed into place."""
        import google_crc32c

        data = np.asarray(data)
        if data.shape != self.chunks:
            full = np.full(self.chunks, self.fill if self.fill is not None else 0, dtype=self.dtype)
            full[tuple(slice(0, k) for k in data.shape)] = data
            data = full
        buf = np.ascontiguousarray(data, dtype=self.dtype)
        if self.blosc is not None:  # what zarr's BloscCodec writes: numcodecs' Blosc of the raw bytes
            buf = np.frombuffer(self.codec.encode(buf.view(np.uint8).reshape(-1)), dtype=np.uint8)
        view = memoryview(buf).cast("B")
        crc = np.array([google_crc32c.value(buf)], dtype="<u4").tobytes()
        path = self._path(idx)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            f = open(tmp, "wb", buffering=0)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(tmp, "wb", buffering=0)
        try:
            with f:
                f.write(view)
                f.write(crc)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_into(self, idx: tuple[int, ...], out: np.ndarray) -> bool:
        """Read chunk `idx` into `out` (C-contiguous, the chunk's shape) and check its crc32c;
        False (and `out` filled with the fill value) when the chunk was never written. A
        mismatch (or a truncated file) raises CorruptChunkError."""
        import google_crc32c

        view = memoryview(out).cast("B")
        try:
            f = open(self._path(idx), "rb", buffering=0)
        except FileNotFoundError:
            out.fill(self.fill if self.fill is not None else 0)
            return False
        if self.blosc is not None:
            with f:
                data = f.read()
            body = np.frombuffer(data, dtype=np.uint8)[:-4]
            if len(data) < 4 or np.frombuffer(data[-4:], dtype="<u4")[0] != google_crc32c.value(body):
                raise CorruptChunkError(f"{self._path(idx)} is damaged: its bytes do not match its checksum; {DAMAGED_FIX}")
            self.codec.decode(body, out=view)
            return True
        with f:
            got = f.readinto(view)
            tail = f.read(8)
        if got != view.nbytes or len(tail) != 4 or np.frombuffer(tail, dtype="<u4")[0] != google_crc32c.value(out):
            size = "" if got == view.nbytes and len(tail) == 4 else f"; it has {got + len(tail)} bytes, not {view.nbytes + 4}"
            raise CorruptChunkError(f"{self._path(idx)} is damaged: its bytes do not match its checksum{size}; {DAMAGED_FIX}")
        return True

    def __setitem__(self, key, value) -> None:
        """Write whole chunks (what `dask.array.store` hands over for an array chunked like this one)."""
        sel = _basic_selection(key, self.shape)
        value = np.broadcast_to(np.asarray(value, dtype=self.dtype), tuple(s.stop - s.start for s in sel))
        if any(s.start % c or (s.stop % c and s.stop != n) for s, c, n in zip(sel, self.chunks, self.shape)):
            raise ValueError(f"direct chunk writes take whole chunks, got {key!r} for chunks {self.chunks}")
        for idx in itertools.product(*(range(s.start // c, -(-s.stop // c)) for s, c in zip(sel, self.chunks))):
            part = tuple(slice(i * c - s.start, min(s.stop, (i + 1) * c) - s.start) for i, s, c in zip(idx, sel, self.chunks))
            self.write(idx, value[part])

    def __getitem__(self, key) -> np.ndarray:
        sel = _basic_selection(key, self.shape)
        out = np.empty(tuple(len(range(*s.indices(n))) for s, n in zip(sel, self.shape)), dtype=self.dtype)
        spans = [range(s.start // c, -(-s.stop // c)) for s, c in zip(sel, self.chunks)]
        buf = None
        for idx in itertools.product(*spans):
            lo = [i * c for i, c in zip(idx, self.chunks)]
            inner = tuple(slice(max(s.start, a) - a, min(s.stop, a + c) - a) for s, a, c in zip(sel, lo, self.chunks))
            where = tuple(slice(max(s.start, a) - s.start, min(s.stop, a + c) - s.start) for s, a, c in zip(sel, lo, self.chunks))
            whole = all(i.start == 0 and i.stop == c for i, c in zip(inner, self.chunks))
            target = out[where]
            if whole and target.flags.c_contiguous:
                self.read_into(idx, target)  # straight into the result: no copy
                continue
            if buf is None:
                buf = np.empty(self.chunks, dtype=self.dtype)
            self.read_into(idx, buf)
            target[...] = buf[inner]
        return out


def _blosc_config(codec) -> dict:
    """numcodecs' Blosc config equal to what zarr's BloscCodec `codec` (its typesize set from
    the array) encodes with: the same bytes as zarr writes."""
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
    return {"cname": codec.cname.value, "clevel": codec.clevel, "shuffle": shuffle,
            "blocksize": codec.blocksize, "typesize": codec.typesize}


def _basic_selection(key, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A tuple of step-1 slices with bounds, one per axis (dask asks for nothing else)."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape):
        if not isinstance(k, slice):
            raise TypeError(f"direct chunk reads take slices, got {k!r}")
        start, stop, step = k.indices(n)
        if step != 1:
            raise TypeError("direct chunk reads take step-1 slices")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def direct_dask(chunks: DirectChunks, name: str):
    """A lazy dask array over `chunks`, one task per stored chunk."""
    import dask.array as da

    return da.from_array(chunks, chunks=chunks.chunks, asarray=False, lock=False, fancy=False,
                         meta=np.empty((0,) * chunks.ndim, chunks.dtype), name=f"direct-{name}-{uuid.uuid4().hex[:8]}")


def fsspec_fs(path: str, storage_options: dict | None = None):
    import fsspec

    return fsspec.core.url_to_fs(path, **(storage_options or {}))


def decoded(var):
    """A `gradients` variable as float32 whether or not it was opened decoded."""
    import numpy as np

    if var.dtype != np.uint16:
        return var
    enc = var.attrs[schema.ATTR_ENCODING]
    return var.copy(data=var.data.map_blocks(schema.decode, enc, dtype=np.float32))


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
