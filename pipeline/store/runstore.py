"""`RunStore`, the run store's one owner: it opens, checks, writes, locks and stamps a run.

A run is one Zarr v3 group at a local path or any fsspec URL. Every stage, the CLI and
the API reach the store through a `RunStore`; every stored name comes from
`qkov.pipeline.schema`. Workers write their own whole chunks through `RunStore.root`.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import zarr

from .. import schema
from ..errors import DAMAGED_FIX, CorruptChunkError, QkovError, StoreError, UsageError, param
from .paths import fsspec_fs, free_bytes, local_path, remove, size_bytes, sync, zarr_store
from .chunks import CheckedStore, DirectChunks, checksummed_encoding, direct_dask
from .lock import acquire_lock, read_lock, release_lock, require_unlocked
from .provenance import provenance
from .views import pair_gradients, decoded, plain_text_coords, scores_view, sorted_vars, with_score_attrs

# what the `scores` group's layout attrs and the gradients' encodings may say (schema version 1)
KEEP_PAIRS = ("all", "top", "none")
SCORES_DTYPES = ("float32", "bfloat16")
ENCODINGS = ("float32", "bfloat16")
# variables up to this size are read when their group is opened (RunStore._eager)
EAGER_BYTES = 64 << 20


@contextmanager
def _quiet_zarr() -> Iterator[None]:
    """str coords (block, score, ids) have no Zarr v3 spec dtype yet; consolidated metadata is a
    zarr-python extension used as xarray does. Neither is the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.UnstableSpecificationWarning)
        warnings.filterwarnings("ignore", category=zarr.errors.ZarrUserWarning, message="Consolidated metadata")
        yield


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


class RunStore:
    """One run's store. Small and picklable (a path and storage options), so a worker task
    can carry it; opening is lazy."""

    def __init__(self, path: str, storage_options: dict | None = None, *, parent: "RunStore | None" = None,
                 own_fisher: bool = False):
        self.path = str(path)
        self.storage_options = dict(storage_options or {})
        # a task pair's sub-run of a run of more than two tasks: its gradients (and `_work`) are
        # the parent's; so is its Fisher unless each pair has its own (fisher.source = "pair")
        self.parent = parent
        self.own_fisher = own_fisher

    @property
    def base(self) -> "RunStore":
        """The run that holds the gradients: the parent of a pair's sub-run, else itself."""
        return self.parent or self

    def _owner(self, group: str) -> "RunStore":
        if self.parent is not None and (group in (schema.GRADIENTS, schema.WORK)
                                        or (group == schema.FISHER and not self.own_fisher)):
            return self.parent
        return self

    def task_keys(self) -> list[str]:
        """The run's task keys in store order (a, b, then any others the job file named)."""
        return list((self.base.config().get("tasks") or {"a": {}, "b": {}}).keys())

    def pair_keys(self) -> list[tuple[str, str]]:
        keys = self.task_keys()
        return [(x, y) for i, x in enumerate(keys) for y in keys[i + 1:]]

    def is_multi(self) -> bool:
        """A run of more than two tasks: its answers live in one sub-run per task pair."""
        return self.parent is None and len(self.task_keys()) > 2

    def pair(self, key_a: str, key_b: str) -> "RunStore":
        """The sub-run of one task pair of a run of more than two tasks (`schema.pair_group`)."""
        own = (self.config().get("fisher") or {}).get("source") == "pair"
        return RunStore(f"{self.path.rstrip('/')}/{schema.pair_group(key_a, key_b)}", self.storage_options, parent=self,
                        own_fisher=own)

    def pair_runs(self) -> list["RunStore"]:
        """The run of every task pair: a run of more than two tasks' sub-runs, else the run itself."""
        return [self.pair(x, y) for x, y in self.pair_keys()] if self.is_multi() else [self]

    def task_names(self) -> dict[str, str]:
        """{task key: task name} of the run, in store order."""
        return {k: str(t.get("name", k)) for k, t in (self.base.config().get("tasks") or {}).items()}

    def select(self, pair: "str | tuple[str, str] | None") -> "RunStore":
        """The run the readers read for `pair` ("x,y": two tasks by key or name, A first): a run of
        more than two tasks needs one and gives that pair's sub-run; a two-task run takes none,
        or its own two tasks."""
        if pair is None and not self.is_multi():
            return self
        names = self.task_names()
        keys = list(names)
        listed = ", ".join(f"{names[x]},{names[y]}" for x, y in self.pair_keys())
        if pair is None:
            raise UsageError(f"{self.path} compares {len(keys)} tasks ({', '.join(names.values())}): choose a pair with "
                             f"{param('pair')} A,B, one of: {listed}")
        parts = [p.strip() for p in pair.split(",")] if isinstance(pair, str) else list(pair)
        by = {**{n: k for k, n in names.items()}, **{k: k for k in keys}}
        chosen = [by.get(p) for p in parts]
        if len(parts) != 2 or None in chosen or chosen[0] == chosen[1]:
            raise UsageError(f"{param('pair')} {pair!r}: give two different tasks of the run as A,B (keys or names), "
                             f"one of: {listed}")
        x, y = chosen
        if keys.index(x) > keys.index(y):
            raise UsageError(f"{param('pair')} {pair!r}: a pair's task A is the earlier task of the job file; "
                             f"ask for {names[y]},{names[x]} (its answers name both directions)")
        return self.pair(x, y) if self.is_multi() else self

    def pair_tasks(self) -> tuple[str, str]:
        """The keys of this run's tasks A and B: ("a", "b"), or a pair sub-run's two."""
        if self.parent is None:
            return ("a", "b")
        pair = self.root().attrs.get(schema.ATTR_PAIR)
        return (str(pair[0]), str(pair[1])) if pair else ("a", "b")

    def task_config(self, which: str) -> dict:
        """The job config of this run's task A ("a") or B ("b") (a pair sub-run: of its pair)."""
        key = self.pair_tasks()[0 if which == "a" else 1]
        return dict((self.base.config().get("tasks") or {}).get(key) or {})

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
        local = self.local
        if local is None:
            fs, p = self._fs()
            try:
                found = [e.rstrip("/") for e in fs.ls(p, detail=False)]
            except FileNotFoundError:
                return []
            return [e for e in found if e.rsplit("/", 1)[-1] != schema.LOCK_GROUP]
        return [str(c) for c in local.iterdir() if c.name != schema.LOCK_GROUP] if local.is_dir() else []

    def _fs(self):
        return fsspec_fs(self.path, self.storage_options)

    @property
    def local(self) -> Path | None:
        """The run's local folder, or None on an object store (`local_path`)."""
        return local_path(self.path)

    def free_bytes(self) -> int | None:
        """Free bytes where the run is (or will be) written; None on an object store."""
        return free_bytes(self.path)

    def size_bytes(self) -> int:
        """Bytes the run holds on a local disk (0 when missing or on an object store)."""
        return size_bytes(self.path)

    # ---- groups ---------------------------------------------------------
    def has_group(self, group: str) -> bool:
        return self.group_attrs(group) is not None

    def group_attrs(self, group: str) -> dict | None:
        """The group's own attrs (never a consolidated copy, which may be stale), or None if absent;
        without the store's record of its arrays (schema.ATTR_ARRAYS)."""
        attrs = self._attrs(group)
        return None if attrs is None else {k: v for k, v in attrs.items() if k != schema.ATTR_ARRAYS}

    def _attrs(self, group: str) -> dict | None:
        if (owner := self._owner(group)) is not self:
            return owner._attrs(group)
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

        if (owner := self._owner(group)) is not self:
            return owner.open_dataset(group, needed_by, complete=complete)
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
        ds = plain_text_coords(sorted_vars(ds))
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
                 and not (var.ndim >= 3 and (group in (schema.GRADIENTS, schema.FISHER) or str(name).startswith(schema.pooled_name(""))))]
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
        docs = sync(_read_docs(self.zarr(read_only=True), [f"{group}/{name}/zarr.json" for name in recorded]))
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
        docs = sync(_read_docs(self.zarr(), [f"{group}/{name}/zarr.json" for name in names]))
        g.attrs[schema.ATTR_ARRAYS] = {name: _array_record(json.loads(doc)) for name, doc in zip(names, docs) if doc is not None}

    def direct_chunks(self, group: str) -> dict[str, "DirectChunks"]:
        """The arrays of `group` whose chunk files `DirectChunks` reads and writes, by name
        ({} on a remote store or for a group that is not there)."""
        if (owner := self._owner(group)) is not self:
            return owner.direct_chunks(group)
        if self.local is None:
            return {}
        try:
            arrays = dict(self.root()[group].arrays())
        except KeyError:
            return {}
        folder = os.path.join(str(self.local), group)
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
        if self.parent is not None:  # one pair of a run of more than two tasks
            tasks = self.base.config().get("tasks") or {}
            ka, kb = self.pair_tasks()
            ds = pair_gradients(ds, tasks[ka]["name"], tasks[kb]["name"])
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
            tree[name] = xr.DataTree(plain_text_coords(sorted_vars(ds)))
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
            children = sync(_list_dir(store, group))
            nodes = [f"{group}/{c}".lstrip("/") for c in children]
            for path, doc in zip(nodes, sync(_read_docs(store, [f"{p}/zarr.json" for p in nodes]))):
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

    def create_pairs(self, config: dict, config_hash: str) -> None:
        """A run of more than two tasks: one sub-run root per task pair (`pair`), never clearing
        what is there (a resumed run keeps its finished pairs)."""
        root = zarr.open_group(self.zarr(), mode="a", zarr_format=3)
        for x, y in self.pair_keys():
            g = root.require_group(schema.pair_group(x, y))
            if not g.attrs.get(schema.ATTR_RUN):  # a pair made earlier keeps its own record
                g.attrs.update({schema.ATTR_RUN: True, schema.ATTR_PAIR: [x, y], **provenance(config, config_hash, stage="run")})

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
        remove(self.path.rstrip("/") + (f"/{group}" if group else ""), self.storage_options)

    def drop_values(self, group: str) -> None:
        """Delete the values of `group`'s arrays of 3 or more dims, keeping its coordinates,
        small variables and attrs (answers mode: the Fisher, P entries per block, once its
        scalars and health are written); its record of arrays follows, and attr
        `values_dropped` says so."""
        root = self.root("r+")
        for name, arr in list(root[group].arrays()):
            if arr.ndim >= 3:
                self.delete(f"{group}/{name}")
        self.record_arrays(group)
        self.root("r+")[group].attrs[schema.ATTR_VALUES_DROPPED] = True

    def rename(self, group: str, to: str) -> None:
        """Move `group` to `to` inside a local run, atomically (one rename: nothing reads it
        where it was any more); an object store has no rename, so its callers delete instead."""
        os.replace(self.local / group, self.local / to)

    # ---- ownership --------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[str]:
        """Hold the output's lock for the duration of the block (see `acquire_lock`); a pair's
        sub-run is locked by its run's lock."""
        if self.parent is not None:
            with self.parent.lock() as token:
                yield token
            return
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
        return read_lock(self.base.path, self.storage_options or None)

    def require_unlocked(self) -> None:
        """Refuse the output when a live qkov run owns it (its lock is not taken here)."""
        require_unlocked(self.base.path, self.storage_options or None)
