"""The fused path (`[output] gradients_in = "device"`, issue 28): a layer group's gradients stay in
the extraction worker's memory and the score tasks of the same process read them there; no
gradient byte is written. Its scores equal the disk path's bit for bit (the same stored values
through the same kernels), a planted change to the held gradients moves exactly its slice, a
run that fails mid-way resumes to the same result, and `qkov plan` says where they wait and why."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from qkov.pipeline import schema
from qkov.pipeline.errors import UsageError
from qkov.pipeline.run import run_job
from qkov.testing import assert_runs_close, tiny_job

RESULTS = (schema.FISHER, schema.SCORES_GROUP, schema.DIAGNOSTICS, schema.STATS)


def _grouped(job, path, **output):
    return job.model_copy(update={"output": job.output.model_copy(update={
        "path": str(path), "keep_gradients": False, "layers_per_group": 1, **output})})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An ordinary run, and the same job in layer groups through the disk and the fused path;
    while each group is scored, the gradient chunk files of its sub-run and the bytes held in
    memory are recorded (`seen`)."""
    from qkov.pipeline import layer_groups
    from qkov.workers import resident

    tmp = tmp_path_factory.mktemp("fused")
    job = tiny_job(tmp, "llama_gqa", n_a=12, n_b=12, extract={"shard_size": 5, "batch_size": 3},
                   stats={"n_permutations": 49, "n_bootstrap": 49}, output={"path": str(tmp / "reference")})
    run_job(job)
    out = {"job": job, "tmp": tmp, "seen": {}}
    score = layer_groups._GroupRun._score

    def watched(self, k, group, sub, grads, fisher, readers):
        where = "device" if "device" in Path(sub.path).parts else "disk"
        chunks = [f for b in ("Q", "K", "V", "O") for f in (Path(sub.path) / schema.GRADIENTS / b / "c").rglob("*") if f.is_file()]
        out["seen"][(where, k)] = (len(chunks), resident.held_bytes())
        return score(self, k, group, sub, grads, fisher, readers)

    from qkov.workers import kernels

    to_host = kernels._to_host

    def counted(role, t, encoding):  # the score tasks' own writes of their slices
        out["written_by_tasks"] = out.get("written_by_tasks", 0) + t.shape[0]
        return to_host(role, t, encoding)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_groups._GroupRun, "_score", watched)
        mp.setattr(kernels, "_to_host", counted)
        for where in ("disk", "device"):
            out[where] = run_job(_grouped(job, tmp / where, gradients_in=where))
    return out


def _same(a, b) -> bool:
    return np.array_equal(a, b, equal_nan=np.issubdtype(np.asarray(a).dtype, np.floating))


def _arrays(path, group):
    g = zarr.open_group(str(path), mode="r")[group]
    return {k: g[k][:] for k in sorted(g.array_keys())}


def test_the_fused_path_scores_equal_the_disk_paths_bit_for_bit(runs):
    tmp = runs["tmp"]
    assert runs["device"].extract["gradients_in"]["where"] == "device"
    assert runs["disk"].extract["gradients_in"]["where"] == "disk"
    for group in (schema.SCORES_GROUP, schema.FISHER):
        want, got = _arrays(tmp / "disk", group), _arrays(tmp / "device", group)
        assert want.keys() == got.keys() and want
        for k in want:
            assert _same(want[k], got[k]), (group, k)
    assert_runs_close(tmp / "device", tmp / "reference", groups=RESULTS)


def test_the_score_tasks_write_the_scores_themselves_the_same_bits_as_the_graph(runs):
    """Layer groups with whole slices per chunk: each score task writes its slices' chunks
    (both scores of every slice, in both runs), and they hold the bits the ordinary run's
    graph wrote (its store tasks, from the scores the tasks returned)."""
    tmp = runs["tmp"]
    want, got = _arrays(tmp / "reference", schema.SCORES_GROUP), _arrays(tmp / "device", schema.SCORES_GROUP)
    pooled = [k for k in want if k.startswith(schema.pooled_name(""))]
    slices = sum(got[k].shape[0] * got[k].shape[1] for k in pooled)
    assert pooled and runs["written_by_tasks"] == 2 * slices  # (2: the disk and the fused run)
    for k in pooled:
        assert _same(want[k], got[k]), k


def test_no_gradient_byte_is_written_on_the_fused_path(runs):
    """While each group is scored its sub-run holds no gradient chunk (the disk path's does),
    and the held slices are let go once the group's scores are written."""
    from qkov.workers import resident

    seen = runs["seen"]
    assert [k for k in seen if k[0] == "disk"] == [("disk", 0), ("disk", 1)]
    assert all(n > 0 and held == 0 for (w, _), (n, held) in seen.items() if w == "disk"), seen
    fused = [v for (w, _), v in seen.items() if w == "device"]
    assert len(fused) == 2 and all(n == 0 and held > 0 for n, held in fused), seen
    assert resident.held_bytes() == 0


def test_a_planted_change_to_the_held_gradients_moves_exactly_its_slice(runs, tmp_path, monkeypatch):
    """Scaling one sample's held gradients in one (layer, head) of block K changes that slice's
    scores in that sample's row and column, and nothing else: the scores come from the memory
    the extraction left them in."""
    from qkov.workers import resident

    deposit = resident.deposit

    def planted(key, start, bufs):
        if start == 0 and "r1" in key:  # layer group 1 (layer 1), the first shard
            bufs["K"][0, 1, 2] *= 3.0  # layer 1, KV head 1, sample 2
        return deposit(key, start, bufs)

    monkeypatch.setattr(resident, "deposit", planted)
    run_job(_grouped(runs["job"], tmp_path / "planted", gradients_in="device"))
    want, got = _arrays(runs["tmp"] / "device", schema.SCORES_GROUP), _arrays(tmp_path / "planted", schema.SCORES_GROUP)
    moved = {k for k in want if not _same(want[k], got[k])}
    assert moved and all(k.endswith("_K") for k in moved), moved
    name = next(k for k in moved if k.startswith(schema.pooled_name("interference")))
    diff = np.argwhere(~np.isclose(want[name], got[name], rtol=0, atol=0))
    assert {tuple(x) for x in diff[:, :2]} == {(1, 1)}  # (layer 1, head 1) only
    assert set(diff[:, 2]) | set(diff[:, 3]) >= {2} and all(2 in (r, c) for r, c in diff[:, 2:])


def test_a_fused_run_that_fails_mid_way_resumes_to_the_same_result(runs, tmp_path, monkeypatch):
    """Group 1 fails while it is scored: group 0 stays done; the resume extracts group 1 again
    (its held gradients went with the failure) and ends equal to the uninterrupted run."""
    from qkov.pipeline import layer_groups

    job = _grouped(runs["job"], tmp_path / "run", gradients_in="device")
    score = layer_groups._GroupRun._score

    def failing(self, k, *a):
        if k == 1:
            raise RuntimeError("worker lost")
        return score(self, k, *a)

    monkeypatch.setattr(layer_groups._GroupRun, "_score", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_job(job)
    work = dict(zarr.open_group(str(tmp_path / "run"), path=schema.WORK, mode="r").attrs)
    assert work[schema.ATTR_GROUPS_DONE] == [0]
    monkeypatch.setattr(layer_groups._GroupRun, "_score", score)
    summary = run_job(job, resume=True)
    assert summary.extract["computed"] == 5  # group 1's five shards again, group 0's none
    for group in (schema.SCORES_GROUP, schema.FISHER):
        want, got = _arrays(runs["tmp"] / "device", group), _arrays(tmp_path / "run", group)
        for k in want:
            assert _same(want[k], got[k]), (group, k)


def test_several_workers_refuse_device_and_auto_takes_the_disk(runs, tmp_path):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(UsageError, match="several workers"):
            run_job(_grouped(runs["job"], tmp_path / "device", gradients_in="device"), client=client)
        assert not (tmp_path / "device" / schema.SCORES_GROUP).exists()


def test_plan_says_where_the_gradients_wait_and_why(runs, tmp_path):
    """The rule `qkov plan` states: the fused path where the measured device holds a group beside
    the model, a batch and a score task (as many layers per group as fit), else the disk."""
    from qkov.pipeline.plan import _geometry, hold_on_device, plan, plan_job

    job = _grouped(runs["job"], tmp_path / "run", layers_per_group=None)
    here = plan(job)  # this machine: no GPU measured
    assert here.gradients_in == "disk" and "no GPU" in here.gradients_in_why
    assert any("wait for its scores in disk" in line for line in here.lines())
    geo = _geometry(job)
    disk = plan_job(job, geometry=geo)
    one = plan_job(job, geometry=geo, device=(10**12, "a large GPU"))
    assert one.gradients_in == "device" and one.layer_groups == 1 and "a large GPU" in one.gradients_in_why
    assert one.peak_disk < disk.peak_disk  # no gradients on disk
    # just room for one layer beside the rest: one layer per group
    per_layer = 24 * sum(geo[0].heads[b] * geo[0].sizes[b] for b in geo[0].blocks) * 4
    need = one.memory["extract_gpu"] + 2 * one.memory["score_task"]
    tight = plan_job(job, geometry=geo, device=(int((need + per_layer * 1.5) / 0.9), "a small GPU"))
    assert tight.gradients_in == "device" and tight.layer_groups == 2
    none = plan_job(job, geometry=geo, device=(need // 2, "a tiny GPU"))
    assert none.gradients_in == "disk" and "do not fit" in none.gradients_in_why
    assert plan_job(_grouped(runs["job"], tmp_path / "r", gradients_in="disk"), geometry=geo,
                    device=(10**12, "x")).gradients_in == "disk"
    assert hold_on_device(runs["job"], None, {}, None) == (None, "")  # gradients kept: not asked


def test_resident_rows_gather_any_rows_across_shards():
    """`ResidentRows` against plain indexing of the concatenated shards: runs of rows, gaps
    (skipped samples), rows spanning shards, one head or several."""
    from qkov.workers import resident

    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 3, 11, 5, generator=g).to(torch.bfloat16)  # (L, H, N, P)
    key = "test-resident-rows"
    for start, stop in ((0, 4), (4, 8), (8, 11)):
        resident.deposit(key, start, {"Q": full[:, :, start:stop].clone()})
    reader = resident.ResidentRows(key, "Q", (11, 2, 3, 5), "<u2")
    for rows in (np.arange(11), np.arange(2, 7), np.array([0, 3, 5, 9, 10]), np.array([4])):
        for heads in ([0, 1, 2], [1], [0, 2]):
            got = reader.rows_on_device(1, heads, rows, "cpu")
            assert torch.equal(got, full[1][heads][:, rows]), (rows, heads)
    assert resident.release(key) == full.numel() * 2 and resident.held_bytes() == 0
    with pytest.raises(Exception, match="not held by this worker"):
        reader.rows_on_device(0, [0], np.arange(3), "cpu")


@pytest.mark.parametrize("scores_dtype", ["float32", "bfloat16"])
def test_a_score_task_writes_the_chunks_the_graph_would_write(tmp_path, scores_dtype):
    """`direct_pair_kernel(write_to=…)` (a task writing its whole slices itself) against the
    same task's returned scores encoded as the graph encodes them (`codec.encode`) and written
    by `DirectChunks`: the same chunk bytes, for float32 and bf16 scores, several heads, at the
    layer offset given."""
    import zarr

    from qkov.pipeline import codec
    from qkov.pipeline.store.chunks import DirectChunks, checksummed
    from qkov.workers import resident
    from qkov.workers.kernels import direct_pair_kernel

    n, heads, P = 9, [0, 1, 2], 20
    g = torch.randn(1, 3, n, P, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    key = "test-write-to"
    resident.deposit(key, 0, {"Q": g})
    reader = resident.ResidentRows(key, "Q", (n, 1, 3, P), "<u2")
    inv = np.random.default_rng(0).uniform(0.5, 2.0, (1, 3, P)).astype(np.float32)
    enc = codec.BFLOAT16 if scores_dtype == "bfloat16" else None
    dtype = "uint16" if enc else "float32"
    root = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    out = {}
    for way in ("graph", "task"):
        out[way] = [DirectChunks.of(root.create_array(f"{way}-{s}", shape=(2, 3, *shape), chunks=(1, 1, *shape),
                                                      dtype=dtype, compressors=checksummed(True)), str(tmp_path / f"{way}-{s}"))
                    for s, shape in (("inter", (n, n)), ("align", schema.folded_shape(n)))]
    rows = np.arange(n)
    side = (rows, rows, np.ones((n, 2)) / n)
    kw = dict(side=side, reader=reader, encoding="bfloat16", fold=True)
    parts = direct_pair_kernel(np.array([0]), np.array(heads), inv, rows, rows, **kw)
    for target, scores in zip(out["graph"], (parts.interference, parts.alignment)):
        for h in heads:
            target.write((1, h, 0, 0), codec.encode(scores[:, h : h + 1], enc) if enc else scores[:, h : h + 1])
    written = direct_pair_kernel(np.array([0]), np.array(heads), inv, rows, rows, write_to=(*out["task"], 1, enc), **kw)
    assert written.interference is None and written.alignment is None
    np.testing.assert_array_equal(written.diagnostics.sq, parts.diagnostics.sq)
    for s in ("inter", "align"):
        for h in heads:
            want = (tmp_path / f"graph-{s}" / "c" / "1" / str(h) / "0" / "0").read_bytes()
            assert (tmp_path / f"task-{s}" / "c" / "1" / str(h) / "0" / "0").read_bytes() == want, (s, h)
    resident.release(key)
