"""The chunk format of a run, and the checks on every chunk read from it.

Every chunk qkov writes carries a crc32c last in its codec chain (`checksummed`,
`checksummed_encoding`); every chunk read from a run is checked against it and against the
size its array's metadata declares (`CheckedStore` for zarr's reads, `DirectChunks` for the
large arrays the stages read and write themselves, byte for byte in zarr's format).
"""
from __future__ import annotations

import itertools
import json
import os
import uuid
from pathlib import Path

import numpy as np
import zarr

from .. import schema
from ..errors import DAMAGED_FIX, CorruptChunkError


def checksummed(compressed: bool = False) -> list:
    """The chunk codecs after `bytes` of the arrays the stages write whole: a crc32c checksum,
    after `schema.SCORES_COMPRESSION` where `compressed` (the pooled scores)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return ([BloscCodec(**schema.SCORES_COMPRESSION)] if compressed else []) + [Crc32cCodec()]


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
