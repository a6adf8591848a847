"""Direct chunk I/O (qkov.pipeline.store.DirectChunks) against zarr's own reader and writer:
the same files byte for byte, the same values for any selection, the same checksum errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from qkov.pipeline.extract import checksummed
from qkov.pipeline.store import RunStore


def _array(root: Path, name: str, shape, chunks, dtype, fill, compressed: bool = False):
    g = zarr.open_group(zarr.storage.LocalStore(str(root)), mode="a", zarr_format=3)
    grp = g.require_group("grp")
    return grp.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                            compressors=checksummed(compressed), dimension_names=[f"d{i}" for i in range(len(shape))])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "zarr.json"}


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "blosc"])  # gradients; pooled scores
@pytest.mark.parametrize("dtype,fill", [("uint16", 0), ("float32", np.nan), ("int32", -1)])
def test_direct_writes_are_zarrs_bytes_and_reads_are_zarrs_values(tmp_path, dtype, fill, compressed):
    rng = np.random.default_rng(0)
    shape, chunks = (10, 2, 3, 7), (4, 1, 1, 7)  # the sample axis ends in a partial chunk
    data = (rng.normal(size=shape) * 1000).astype(dtype)
    by_zarr = _array(tmp_path / "z", "x", shape, chunks, dtype, fill, compressed)
    by_zarr[:] = data
    _array(tmp_path / "d", "x", shape, chunks, dtype, fill, compressed)
    direct = RunStore(str(tmp_path / "d")).direct_chunks("grp").get("x")
    assert direct is not None and (direct.blosc is not None) == compressed
    direct[:] = data  # whole chunks, the edge chunk padded with the fill value as zarr pads it
    assert _files(tmp_path / "z" / "grp" / "x") == _files(tmp_path / "d" / "grp" / "x")
    back = zarr.open_array(zarr.storage.LocalStore(str(tmp_path / "d")), path="grp/x")
    np.testing.assert_array_equal(back[:], data)
    for sel in [np.s_[:], np.s_[3:9, 1:, :2, 2:5], np.s_[9:10], np.s_[0:4, 0:1, 2:3, :], np.s_[..., 3:4]]:
        np.testing.assert_array_equal(direct[sel], data[sel])


def test_a_missing_chunk_reads_as_the_fill_value_like_zarr(tmp_path):
    arr = _array(tmp_path, "x", (8, 4), (4, 4), "float32", np.nan)
    arr[:4] = 1.0
    direct = RunStore(str(tmp_path)).direct_chunks("grp").get("x")
    np.testing.assert_array_equal(direct[:], arr[:])
    assert np.isnan(direct[4:]).all()


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "blosc"])
def test_a_corrupted_chunk_is_a_checksum_error_like_zarrs(tmp_path, compressed):
    arr = _array(tmp_path, "x", (8, 4), (4, 4), "float32", np.nan, compressed)
    arr[:] = np.arange(32, dtype=np.float32).reshape(8, 4)
    chunk = tmp_path / "grp" / "x" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x40
    chunk.write_bytes(bytes(raw))
    direct = RunStore(str(tmp_path)).direct_chunks("grp").get("x")
    with pytest.raises(ValueError, match="checksum"):
        direct[:]
    with pytest.raises(ValueError, match="checksum"):
        arr[:]
    chunk.write_bytes(bytes(raw[:-3]))  # truncated: a half-written chunk
    with pytest.raises(ValueError, match="checksum" if compressed else "c/1/0 is damaged: it holds 61 bytes of data"):
        direct[4:]
    np.testing.assert_array_equal(direct[:4], arr[:4])  # the intact chunk still reads


def test_partial_chunk_writes_are_refused(tmp_path):
    _array(tmp_path, "x", (8, 4), (4, 4), "float32", np.nan)
    direct = RunStore(str(tmp_path)).direct_chunks("grp").get("x")
    with pytest.raises(ValueError, match="whole chunks"):
        direct[1:4] = np.zeros((3, 4), np.float32)
    assert not (tmp_path / "grp" / "x" / "c").exists()


def test_zarr_does_it_where_the_format_is_not_ours(tmp_path):
    g = zarr.open_group(zarr.storage.LocalStore(str(tmp_path)), mode="a", zarr_format=3).require_group("grp")
    g.create_array("zstd", shape=(4,), chunks=(2,), dtype="float32")  # zarr's default compressor
    g.create_array("sharded", shape=(4,), chunks=(2,), shards=(4,), dtype="float32", compressors=checksummed())
    for name in ("zstd", "sharded", "absent"):
        assert RunStore(str(tmp_path)).direct_chunks("grp").get(name) is None
    assert RunStore("memory://qkov-direct").direct_chunks("grp") == {}  # not a local disk


def test_direct_reads_pickle_for_dask_workers(tmp_path):
    import pickle

    arr = _array(tmp_path, "x", (8, 4), (4, 4), "float32", np.nan)
    arr[:] = 2.0
    direct = pickle.loads(pickle.dumps(RunStore(str(tmp_path)).direct_chunks("grp").get("x")))
    np.testing.assert_array_equal(direct[:], arr[:])


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_score_tasks_reading_chunks_themselves_equal_the_dask_read_path(tmp_path, storage):
    """The direct score path (tasks read their own rows from the chunk files) against the Dask
    graph that reads through zarr, on the same stored gradients: whole chunks, rows across
    chunk edges (sample chunks of 3 against shards of 4) and a skipped sample."""
    from qkov.pipeline import schema
    from qkov.pipeline.run import run_job
    from qkov.pipeline.score import compact_scores
    from qkov.testing import tiny_job

    job = tiny_job(tmp_path, "llama_gqa", n_a=6, n_b=5, score={"storage_dtype": storage})
    run_job(job)
    store = RunStore.of(job)
    readers = store.direct_chunks(schema.GRADIENTS)
    assert all(readers.get(b) is not None for b in schema.BLOCKS)
    grads, fisher = store.open_gradients(decode=False), store.open_fisher()
    via_zarr = xr_open(store, schema.GRADIENTS)
    finite = grads[schema.FINITE].values.copy()
    for case, chunk in (("all", None), ("edges", 3), ("skipped", 3)):
        g = grads.copy()
        zg = via_zarr.copy()
        if case == "skipped":
            finite[4] = False  # as if sample 4 had non-finite gradients
            g[schema.FINITE] = (g[schema.FINITE].dims, finite)
            zg[schema.FINITE] = (zg[schema.FINITE].dims, finite)
        direct = compact_scores(g, fisher, sample_chunk=chunk, readers=readers).compute()
        dask_path = compact_scores(zg, fisher, sample_chunk=chunk).compute()
        assert set(direct.data_vars) == set(dask_path.data_vars) and direct.sizes == dask_path.sizes
        for v in direct.data_vars:
            np.testing.assert_allclose(direct[v].values, dask_path[v].values, rtol=1e-6, atol=1e-12, err_msg=f"{case} {v}")


def xr_open(store, group):
    """A group read only through xarray's own zarr backend (no DirectChunks anywhere)."""
    import xarray as xr

    return xr.open_zarr(store.path, group=group, consolidated=False)


def test_region_writes_go_to_the_chunk_files_and_equal_zarrs(tmp_path):
    """`RunStore.write_region(compute=False)` (a layer group's scores) stores its Dask variables
    through DirectChunks at the region's chunk offsets; zarr writes the same bytes."""
    import dask.array as da
    import xarray as xr

    rng = np.random.default_rng(1)
    full = rng.normal(size=(5, 3, 8, 8)).astype(np.float32)  # (layer, head, i, j), tiles of 4 × 4
    dims = ("layer", "head", "i", "j")
    enc = {"x": {"chunks": (1, 1, 4, 4), "compressors": checksummed()}}
    stores = {}
    for name in ("direct", "zarr"):
        store = RunStore(str(tmp_path / name))
        tmpl = xr.Dataset({"x": (dims, da.zeros(full.shape, chunks=(1, 1, 4, 4), dtype=np.float32))},
                          coords={"layer": np.arange(5)})
        store.write_dataset(tmpl, "grp", encoding=enc, compute=False)
        stores[name] = store
    for lo, hi in ((0, 2), (2, 5)):
        part = xr.Dataset({"x": (dims, da.from_array(full[lo:hi], chunks=(1, 1, 4, 4)))}, coords={"layer": np.arange(lo, hi)})
        region = {"layer": slice(lo, hi)}
        assert stores["direct"]._direct_writes(part, "grp", region) is not None
        stores["direct"].write_region(part, "grp", region, compute=False).compute()
        part.to_zarr(stores["zarr"].zarr(), group="grp", mode="r+", region=region, zarr_format=3, consolidated=False)
    assert _files(tmp_path / "direct" / "grp" / "x") == _files(tmp_path / "zarr" / "grp" / "x")
    np.testing.assert_array_equal(stores["direct"].direct_chunks("grp")["x"][:], full)
    # a region that does not start at a chunk boundary is left to zarr
    odd = xr.Dataset({"x": (dims, da.from_array(full[:, :, :2], chunks=(1, 1, 2, 4)))})
    assert stores["direct"]._direct_writes(odd, "grp", {"i": slice(2, 4)}) is None


def _declare(array: Path, **fields) -> None:
    """Edit an array's zarr.json as someone (or something) might after it was written."""
    import json

    doc = json.loads((array / "zarr.json").read_text())
    doc.update(fields)
    (array / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("codecs", ["raw", "blosc", "zstd"])  # gradients; pooled scores; everything else qkov writes
def test_chunks_of_another_size_than_their_metadata_declares_are_refused(tmp_path, codecs):
    """A zarr.json declaring float64 over float32 chunks: refused by the store's own chunk reader
    and by every zarr read through the store, naming the chunk; never read as numbers (blosc
    decoded the 4-byte values into the front half of an 8-byte buffer: statistics off by 1e9)."""
    from qkov.pipeline.errors import CorruptChunkError

    from zarr.codecs import Crc32cCodec, ZstdCodec

    compressors = {"raw": checksummed(), "blosc": checksummed(True), "zstd": [ZstdCodec(), Crc32cCodec()]}[codecs]
    g = zarr.open_group(zarr.storage.LocalStore(str(tmp_path)), mode="a", zarr_format=3).require_group("grp")
    arr = g.create_array("x", shape=(8, 4), chunks=(4, 4), dtype="float32", fill_value=np.nan, compressors=compressors)
    arr[:] = np.arange(32, dtype=np.float32).reshape(8, 4)
    store = RunStore(str(tmp_path))
    np.testing.assert_array_equal(zarr.open_array(store.zarr(read_only=True), path="grp/x")[:],
                                  np.arange(32, dtype=np.float32).reshape(8, 4))
    _declare(tmp_path / "grp" / "x", data_type="float64")
    readers = [lambda: zarr.open_array(store.zarr(read_only=True), path="grp/x")[:]]
    if codecs != "zstd":
        readers.append(lambda: store.direct_chunks("grp")["x"][:])
    for read in readers:
        with pytest.raises(CorruptChunkError, match=r"grp/x/c/[01]/0 is damaged: it holds 64 bytes of data, but the "
                                                    r"array's zarr\.json declares chunks of \(4, 4\) float64 \(128 bytes"):
            read()


def test_zarr_reads_through_the_store_name_the_damaged_chunk(tmp_path):
    """zarr checks the crc32c itself, but its error names no chunk; reads through the store do."""
    from qkov.pipeline.errors import CorruptChunkError

    arr = _array(tmp_path, "x", (8, 4), (4, 4), "float32", np.nan)
    arr[:] = 1.0
    chunk = tmp_path / "grp" / "x" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x01
    chunk.write_bytes(bytes(raw))
    through = zarr.open_array(RunStore(str(tmp_path)).zarr(read_only=True), path="grp/x")
    np.testing.assert_array_equal(through[:4], 1.0)
    with pytest.raises(CorruptChunkError, match=r"grp/x/c/1/0 is damaged: its bytes do not match its checksum"):
        through[4:]


def test_every_write_through_the_store_ends_in_a_checksum(tmp_path):
    """The store's default: zstd then crc32c; given compressors keep theirs and gain the
    checksum; a chain that already ends in one (a dataset read back) is not checksummed twice."""
    import json

    import xarray as xr
    from zarr.codecs import BloscCodec

    store = RunStore(str(tmp_path))
    ds = xr.Dataset({"a": ("i", np.arange(3.0)), "b": ("i", np.arange(3)), "t": ("i", np.array(["x", "yy", "z"]))},
                    coords={"i": np.arange(3)})
    store.write_dataset(ds, "g", encoding={"b": {"compressors": [BloscCodec(cname="lz4")]}})
    store.write_dataset(store.open_dataset("g", complete=False).load(), "h")

    def chain(group, name):
        return [c["name"] for c in json.loads((tmp_path / group / name / "zarr.json").read_text())["codecs"]]

    for group in ("g", "h"):
        assert chain(group, "a") == chain(group, "i") == ["bytes", "zstd", "crc32c"]
        assert chain(group, "b") == ["bytes", "blosc", "crc32c"]
        assert chain(group, "t")[-2:] == ["zstd", "crc32c"]


def test_a_group_reads_with_its_variables_in_name_order_whatever_the_file_system_lists(tmp_path):
    """Zarr lists a group's arrays in directory order, which differs between machines; readers
    (and "the first block") must not: the store returns variables sorted by name."""
    import xarray as xr

    store = RunStore(str(tmp_path / "run"))
    names = ["zeta", "alpha", "mu", "beta"]
    ds = xr.Dataset({n: ("x", np.arange(3, dtype="float32") + k) for k, n in enumerate(names)}, coords={"x": [0, 1, 2]})
    store.create_run({"output": {}}, "test")
    store.write_dataset(ds, "grp", complete=True)
    out = store.open_dataset("grp")
    assert list(out.data_vars) == sorted(names)
    for k, n in enumerate(names):
        np.testing.assert_array_equal(out[n].values, np.arange(3, dtype="float32") + k)
    assert list(store.open_tree()["grp"].to_dataset().data_vars) == sorted(names)
