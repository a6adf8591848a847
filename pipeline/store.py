"""The run store's one owner: `RunStore` opens, checks, writes, locks and stamps a run.

A run is one Zarr v3 group at a local path or any fsspec URL. Every stage, the CLI and
the API reach the store through a `RunStore`; every stored name comes from
`qkov.pipeline.schema`. Workers write their own whole chunks through `RunStore.root`.
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
from .errors import DAMAGED_FIX, CorruptChunkError, QkovError, StoreError  # noqa: F401  (StoreError re-exported for callers of the store)

# what the `scores` group's layout attrs and the gradients' encodings may say (schema version 1)
KEEP_PAIRS = ("all", "top", "none")
SCORES_DTYPES = ("float32", "bfloat16")
ENCODINGS = ("float32", "bfloat16")
# variables up to this size are read when their group is opened (RunStore._eager)
EAGER_BYTES = 64 << 20


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


def checksummed_encoding(ds, encoding: dict | None):
    """(`ds`, `encoding`) with a crc32c checksum last in every variable's codec chain: after the
    compressors a variable is given (`encoding`, or its own `.encoding` as read), else after zarr's
    default zstd. Every chunk qkov writes through the store is then verified when read."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    def chained(enc: dict) -> dict:
        enc = dict(enc)
        chain = enc.pop("compressors", enc.pop("compressor", "default"))
        chain = [ZstdCodec()] if isinstance(chain, str) else list(chain) if isinstance(chain, (list, tuple)) else [] if chain is None else [chain]
        if not chain or not _is_crc32c(chain[-1]):
            chain.append(Crc32cCodec())
        return {**enc, "compressors": chain}

    given = {k: chained(v) for k, v in (encoding or {}).items()}
    ds = ds.copy(deep=False)  # new Variables: their encodings are set here, not the caller's
    for name, var in ds.variables.items():
        if name not in given:
            var.encoding = chained(var.encoding)
    return ds, given


def _is_crc32c(codec) -> bool:
    name = codec.get("name") if isinstance(codec, dict) else getattr(codec, "codec_name", None) or type(codec).__name__
    return str(name).lower() in ("crc32c", "crc32ccodec")


def _array_record(doc: dict) -> list:
    """What `RunStore.check_arrays` compares of an array's zarr.json: [data_type, shape, chunk shape, codec names]."""
    if doc.get("node_type") != "array":
        raise ValueError(f"not an array (node_type {doc.get('node_type')!r})")
    return json.loads(json.dumps([doc["data_type"], list(doc["shape"]), list(doc["chunk_grid"]["configuration"]["chunk_shape"]),
                                  [c["name"] for c in doc.get("codecs", [])]]))


def _show(value) -> str:
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


def _computes(arr) -> bool:
    try:
        arr.compute(scheduler="sync")
        return True
    except Exception:  # noqa: BLE001 - looking for the variable that failed
        return False


async def _list_dir(store, prefix: str) -> list[str]:
    return [name async for name in store.list_dir(prefix)]


async def _read_docs(store, keys: list[str]) -> list[bytes | None]:
    """The bytes stored under `keys` (None where missing), fetched concurrently."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype

    async def one(key: str) -> bytes | None:
        try:
            buf = await store.get(key, prototype=default_buffer_prototype())
        except (FileNotFoundError, NotADirectoryError):
            return None
        return None if buf is None else buf.to_bytes()

    return list(await asyncio.gather(*(one(k) for k in keys)))


# ---- checked chunk reads ------------------------------------------------------
# Every chunk zarr reads from a run (read-only) passes `check_chunk` first: its crc32c where its
# array's codecs end with one, and its decoded size against the array's metadata (dtype x chunk
# shape), read from the compressor's header (blosc, zstd) without decoding. zarr verifies the
# checksum itself, but its error names no chunk, and a chunk of another size than its metadata
# declares reached users as a reshape, zstd or blosc traceback (or, read into a larger buffer,
# as numbers). DirectChunks applies the same checks to the chunks it reads itself.


def _crc32c(data) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def _zstd_content_size(frame: bytes) -> int | None:
    """The decompressed size a zstd frame's header declares (None when it declares none)."""
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return -1  # not a zstd frame at all
    fhd = frame[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(frame) < pos + size:
        return None
    value = int.from_bytes(frame[pos:pos + size], "little")
    return value + 256 if size == 2 else value


def decoded_size(body: bytes, compressors: tuple[str, ...]) -> int | None:
    """The size `body` (a chunk without its checksum) decodes to, where its format says it cheaply."""
    if not compressors:
        return len(body)
    if compressors == ("blosc",):
        return int.from_bytes(body[4:8], "little") if len(body) >= 16 else -1
    if compressors == ("zstd",):
        return _zstd_content_size(body)
    return None


def size_error(where: str, size: int, expected: int, shape, dtype) -> CorruptChunkError:
    what = "is not in the format its array's metadata declares" if size < 0 else f"holds {size} bytes of data"
    return CorruptChunkError(f"{where} is damaged: it {what}, but the array's zarr.json declares chunks of {tuple(shape)} "
                             f"{dtype} ({expected} bytes; a truncated chunk, or edited metadata); {DAMAGED_FIX}")


def checksum_error(where: str, note: str = "") -> CorruptChunkError:
    return CorruptChunkError(f"{where} is damaged: its bytes do not match its checksum{note}; {DAMAGED_FIX}")


class _ChunkSpec:
    """What a chunk of one array must be: its codec names and, for fixed-size types, its decoded bytes."""

    def __init__(self, doc: dict):
        from zarr.core.metadata.v3 import ArrayV3Metadata

        self.codecs = tuple(c["name"] for c in doc.get("codecs", []))
        self.shape = tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])
        dtype = ArrayV3Metadata.from_dict(dict(doc)).dtype.to_native_dtype()
        self.dtype = str(doc["data_type"]) if isinstance(doc["data_type"], str) else dtype.str
        fixed = dtype.kind not in "OTV" and self.codecs[:1] == ("bytes",)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize if fixed else None

    def check(self, data: bytes, where: str) -> None:
        codecs = self.codecs
        if codecs and codecs[-1] == "crc32c":
            body = np.frombuffer(data, dtype=np.uint8)[:-4]  # a view: no copy
            if len(data) < 4 or int.from_bytes(data[-4:], "little") != _crc32c(body):
                raise checksum_error(where)
            codecs = codecs[:-1]
        else:
            body = np.frombuffer(data, dtype=np.uint8)
        if self.nbytes is None:
            return
        compressors = codecs[1:]
        size = decoded_size(body[:32].tobytes() if compressors else body, compressors)
        if size is not None and size != self.nbytes:
            raise size_error(where, size, self.nbytes, self.shape, self.dtype)


class CheckedStore(zarr.storage.WrapperStore):
    """A run's store, read-only, that checks every chunk zarr reads before zarr decodes it
    (`_ChunkSpec.check`), raising a CorruptChunkError that names the chunk and the fix."""

    def __init__(self, store, where: str):
        super().__init__(store)
        self.where = str(where).rstrip("/")
        self._specs: dict[str, _ChunkSpec | None] = {}

    def _with_store(self, store):
        return type(self)(store, self.where)

    def __repr__(self) -> str:
        return f"CheckedStore({self._store!r})"

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None or byte_range is not None or key.rsplit("/", 1)[-1] == "zarr.json":
            return buf
        spec = await self._spec(key, prototype)
        if spec is not None:
            spec.check(buf.to_bytes(), f"{self.where}/{key}")
        return buf

    async def _spec(self, key: str, prototype) -> "_ChunkSpec | None":
        """The spec of the array `key` is a chunk of (zarr's default chunk key encoding: the array's
        path, then `c` and the chunk's indices), or None for other keys."""
        parts = key.split("/")
        at = None
        for i in range(len(parts) - 1, 0, -1):
            if (parts[i] == "c" and all(p.isdigit() for p in parts[i + 1:])) or (
                    i == len(parts) - 1 and parts[i].startswith("c.") and parts[i][2:].replace(".", "").isdigit()):
                at = i
                break
        if at is None:
            return None
        array = "/".join(parts[:at])
        if array not in self._specs:
            doc = await self._store.get(f"{array}/zarr.json", prototype)
            try:
                meta = json.loads(doc.to_bytes()) if doc is not None else None
                self._specs[array] = _ChunkSpec(meta) if meta and meta.get("node_type") == "array" else None
            except Exception:  # noqa: BLE001 - unreadable metadata: zarr itself refuses it when opening
                self._specs[array] = None
        return self._specs[array]


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
        """The run's zarr store; read-only, every chunk zarr reads from it is checked first (its
        checksum, its size against the array's metadata: `CheckedStore`)."""
        store = zarr_store(self.path, self.storage_options or None, read_only=read_only)
        return CheckedStore(store, self.path) if read_only else store

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

    def damaged(self, e: BaseException, group: str | None = None) -> StoreError:
        """The error for metadata that cannot be read (bytes that are not UTF-8 JSON, missing keys,
        arrays whose shapes or types do not fit together)."""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        where = self.path + (f"/{group}" if group else "")
        return StoreError(f"{where} is damaged: its Zarr metadata cannot be read ({type(e).__name__}: {first}). "
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
        """The group's own attrs (never a consolidated copy, which may be stale), or None if absent;
        without the store's record of its arrays (schema.ATTR_ARRAYS)."""
        attrs = self._attrs(group)
        return None if attrs is None else {k: v for k, v in attrs.items() if k != schema.ATTR_ARRAYS}

    def _attrs(self, group: str) -> dict | None:
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
        self._require(group, self._attrs(group), needed_by)

    def _require(self, group: str, attrs: dict | None, needed_by: str | None) -> None:
        who = f"{needed_by} needs the '{group}' group, but " if needed_by else ""
        if attrs is None:
            if not self.exists():
                raise StoreError(f"no qkov run at {self.path}. Run `qkov run JOB.toml` first, or check the path.")
            raise StoreError(f"{who}{self.path} has no '{group}' group; run {self.stage_hint(group)} first")
        if attrs.get(schema.ATTR_COMPLETE) is not True:
            raise StoreError(f"{who}{self.path} has an incomplete '{group}' group (not marked complete: an interrupted run?); "
                             f"run {self.stage_hint(group)} first")
        self.check_layout(group, attrs)

    def check_layout(self, group: str, attrs: dict) -> None:
        """Refuse a group (or the run's root) written in a store schema version or layout this qkov
        does not read, in one line naming the version found and the one expected; the same schema
        version may hold a layout added later (a `scores` layout, an encoding), refused here rather
        than read as another one."""
        use = "use the qkov that wrote it (`qkov info` shows its version), or rerun the job with this one (qkov run --overwrite)"
        for where, found in (("root", self._root_schema()), (f"'{group}' group", attrs.get(schema.ATTR_SCHEMA))):
            if found is not None and found != schema.SCHEMA_VERSION:
                raise StoreError(f"the {where} of {self.path} was written with store schema version {found!r}, this qkov "
                                 f"reads version {schema.SCHEMA_VERSION}; {use}.")
        known = {schema.ATTR_SCORES_LAYOUT: schema.COMPACT_LAYOUTS, schema.ATTR_KEEP_PAIRS: KEEP_PAIRS,
                 schema.ATTR_SCORES_DTYPE: SCORES_DTYPES} if group == schema.SCORES_GROUP else {}
        for attr, versions in known.items():
            found = attrs.get(attr)
            if found is not None and found not in versions:
                raise StoreError(f"the '{group}' group of {self.path} has {attr} = {found!r}, this qkov reads "
                                 f"{' or '.join(map(repr, versions))} (store schema version {schema.SCHEMA_VERSION}); {use}.")

    def _root_schema(self):
        """The store schema version stamped on the run's root (read once per RunStore)."""
        if "_root_version" not in self.__dict__:
            self._root_version = (self._attrs("") or {}).get(schema.ATTR_SCHEMA)
        return self._root_version

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

        attrs = self._attrs(group)  # read once: the completeness gate, the layout and the array record
        if complete:
            self._require(group, attrs, needed_by or f"reading '{group}'")
        elif attrs is not None:
            self.check_layout(group, attrs)
        if attrs is not None:
            self.check_arrays(group, attrs.get(schema.ATTR_ARRAYS))
        try:
            with _quiet_zarr():
                ds = xr.open_zarr(self.zarr(read_only=True), group=group, consolidated=False)
        except QkovError:  # a damaged chunk of a coordinate, named by CheckedStore
            raise
        except (ValueError, TypeError, KeyError, IndexError, NotImplementedError) as e:  # metadata that does not hold together
            raise self.damaged(e, self.unreadable_node(group) or group) from None
        ds.attrs.pop(schema.ATTR_ARRAYS, None)
        for name, var in ds.variables.items():
            enc = var.attrs.get(schema.ATTR_ENCODING)
            if enc is not None and enc not in ENCODINGS:
                raise StoreError(f"{self.path}/{group}/{name} is stored in encoding {enc!r}, this qkov reads "
                                 f"{' or '.join(map(repr, ENCODINGS))} (store schema version {schema.SCHEMA_VERSION}); use the "
                                 "qkov that wrote it (`qkov info` shows its version), or rerun the job with this one (qkov run --overwrite).")
        ds = self._eager(self._direct(ds, group), group)
        ds = plain_text_coords(ds)
        return with_score_attrs(scores_view(ds)) if group == schema.SCORES_GROUP else ds

    def _eager(self, ds, group: str):
        """`ds` with its small variables read now (and kept as Dask arrays of the same chunks, for
        callers that map over blocks): a damaged chunk there is refused when the group is opened,
        not later inside a reader that might take the error for something else. The large ones
        (gradients, Fisher, the pooled scores) stay lazy; their chunks are checked when read
        (DirectChunks, CheckedStore)."""
        import dask
        import dask.array as da

        names = [name for name, var in ds.variables.items() if isinstance(var.data, da.Array) and var.nbytes <= EAGER_BYTES
                 and not (var.ndim >= 3 and (group in (schema.GRADIENTS, schema.FISHER) or str(name).startswith("pooled_")))]
        try:  # threads here, never a cluster's workers that a caller's client may have made the default
            values = dask.compute(*(ds.variables[n].data for n in names), scheduler="threads")
        except QkovError:
            raise
        except Exception as e:  # noqa: BLE001 - an undecodable chunk of a store without checksums (written before them)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            bad = next((n for n in names if not _computes(ds.variables[n].data)), None)
            raise CorruptChunkError(f"{self.path}/{group}" + (f"/{bad}" if bad else "") + " is damaged: a chunk cannot be "
                                    f"decoded ({type(e).__name__}: {first}); {DAMAGED_FIX}") from None
        for name, value in zip(names, values):
            ds.variables[name].data = da.from_array(value, chunks=ds.variables[name].data.chunks)
        return ds

    def check_arrays(self, group: str, recorded: dict | None) -> None:
        """Each array of `group` as its writer recorded it (schema.ATTR_ARRAYS: data type, shape,
        chunk shape, codecs): a zarr.json edited or damaged afterwards is refused in one line
        naming the array and the field, not believed (a float64 declared over float32 chunks, a
        sample axis of 12 over chunks of 9). Groups written before the record skip this."""
        if not isinstance(recorded, dict):
            return
        docs = _sync(_read_docs(self.zarr(read_only=True), [f"{group}/{name}/zarr.json" for name in recorded]))
        fields = ("data type", "shape", "chunk shape", "codecs")
        for (name, want), doc in zip(recorded.items(), docs):
            where = f"{self.path}/{group}/{name}"
            if doc is None:
                raise StoreError(f"{where} is missing (its folder or zarr.json was removed): {DAMAGED_FIX}")
            try:
                found = _array_record(json.loads(doc))
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                raise self.damaged(e, f"{group}/{name}") from None
            for field, w, f in zip(fields, want, found):
                if w != f:
                    raise StoreError(f"{where}/zarr.json declares {field} {_show(f)}, but the array was written with "
                                     f"{_show(w)}; {DAMAGED_FIX}")

    def record_arrays(self, group: str) -> None:
        """Record each array of `group` as just written (see `check_arrays`)."""
        g = zarr.open_group(self.zarr(), path=group, mode="r+", use_consolidated=False)
        names = sorted(g.array_keys())
        docs = _sync(_read_docs(self.zarr(), [f"{group}/{name}/zarr.json" for name in names]))
        g.attrs[schema.ATTR_ARRAYS] = {name: _array_record(json.loads(doc)) for name, doc in zip(names, docs) if doc is not None}

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
        ds, encoding = checksummed_encoding(ds, encoding)
        if compute and complete and self._is_consolidated():
            self.check_metadata()  # what refreshing the consolidated metadata reads: refused before anything is written
        with _quiet_zarr():
            out = ds.to_zarr(self.zarr(), group=group, mode="w", compute=compute, encoding=encoding,
                             zarr_format=3, consolidated=False)
        self.record_arrays(group)  # the arrays exist now (a delayed write has written its metadata)
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

    def check_metadata(self) -> None:
        """Every node's metadata in the run can be read (what consolidating it reads), else the
        one-line error naming the first that cannot."""
        try:
            with _quiet_zarr():
                for _ in zarr.open_group(self.zarr(read_only=True), mode="r", use_consolidated=False).members(max_depth=None):
                    pass
        except QkovError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, NotImplementedError) as e:
            raise self.damaged(e, self.unreadable_node()) from None

    def unreadable_node(self, under: str = "") -> str | None:
        """The path of the first group or array at or under `under` whose zarr.json zarr cannot read, or None."""
        from zarr.core.metadata.v3 import ArrayV3Metadata

        store = self.zarr(read_only=True)
        todo = [under.strip("/")]
        while todo:
            group = todo.pop()
            children = _sync(_list_dir(store, group))
            paths = [f"{group}/{c}".lstrip("/") for c in children]
            for path, doc in zip(paths, _sync(_read_docs(store, [f"{p}/zarr.json" for p in paths]))):
                if doc is None:
                    continue
                try:
                    meta = json.loads(doc)
                    if meta.get("node_type") == "group":
                        todo.append(path)
                    else:
                        ArrayV3Metadata.from_dict(meta)
                except Exception:  # noqa: BLE001 - whatever zarr would trip over
                    return path
        return None

    def refresh_consolidated(self) -> None:
        """Keep the root's consolidated view (used by open_datatree) in step, when there is one."""
        with _quiet_zarr():
            if self._is_consolidated():
                zarr.consolidate_metadata(self.zarr())

    def _is_consolidated(self) -> bool:
        with _quiet_zarr():
            return zarr.open_group(self.zarr(read_only=True), mode="r").metadata.consolidated_metadata is not None

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
        path = self._path(idx)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            out.fill(self.fill if self.fill is not None else 0)
            return False
        if self.blosc is not None:
            with f:
                data = f.read()
            body = np.frombuffer(data, dtype=np.uint8)[:-4]
            if len(data) < 4 or np.frombuffer(data[-4:], dtype="<u4")[0] != google_crc32c.value(body):
                raise checksum_error(path)
            size = decoded_size(bytes(body[:16]), ("blosc",))  # blosc would fill a larger buffer only in part
            if size != view.nbytes:
                raise size_error(path, size, view.nbytes, self.chunks, self.dtype)
            self.codec.decode(body, out=view)
            return True
        with f:
            got = f.readinto(view)
            tail = f.read(8)
        if got != view.nbytes or len(tail) != 4:  # a chunk of another size than the metadata declares, or truncated
            raise size_error(path, max(os.path.getsize(path) - 4, 0), view.nbytes, self.chunks, self.dtype)
        if np.frombuffer(tail, dtype="<u4")[0] != google_crc32c.value(out):
            raise checksum_error(path)
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
