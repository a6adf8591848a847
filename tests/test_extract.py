"""Extract stage: the gradient store, the Fisher, invariances, executors, resume."""
from __future__ import annotations

from qkov.pipeline.store import RunStore
import numpy as np
import pytest
import xarray as xr

from qkov.pipeline import schema
from qkov.pipeline.executors import DaskExecutor, InlineExecutor
from qkov.pipeline.extract import pending_shards, plan_extract, run_extract
from qkov.pipeline.run import prepare_output

from qkov.testing import RTOL, assert_runs_close, compare_datasets, tiny_job


def extract(job, executor=None):
    prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
    return run_extract(RunStore.of(job), job, executor or InlineExecutor())


def stored(job, block):
    return RunStore(job.output.path).open_gradients()[block].values


def assert_close(got, want, rtol: float = RTOL):
    """Two executions' float32 values: equal up to the rounding of reordered sums (another
    thread count or CPU moves the last bits), relative to the largest value."""
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    job = tiny_job(tmp, "llama_gqa", n_a=10, n_b=7, fisher={"beta": 0.9, "batch_size": 4})
    info = extract(job)
    return tmp, job, info


def test_store_is_readable_by_xarray_with_named_dims_and_user_ids(base):
    tmp, job, info = base
    ds = xr.open_zarr(job.output.path, group="gradients", consolidated=False)
    assert ds["Q"].dims == ("sample", "layer", "head", "param")
    assert ds["K"].dims == ("sample", "layer", "kv_head", "param")
    assert ds.sizes["head"] == 4 and ds.sizes["kv_head"] == 2
    assert list(ds.sample_id.values[:3]) == ["a0", "a1", "a2"] and ds.sample_id.values[-1] == "b6"
    assert set(ds.task.values) == {"alpha", "beta"}
    assert np.isfinite(ds.loss.values).all() and (ds.loss.values > 0).all()
    assert ds.attrs[schema.ATTR_COMPLETE] is True
    prov = ds.attrs[schema.ATTR_PROVENANCE]
    assert prov["config_hash"] == job.config_hash() and "torch" in prov["versions"]
    assert ds.attrs["weights_hash"] == info["weights_hash"]
    tree = xr.open_datatree(job.output.path, engine="zarr", consolidated=False)
    assert {"gradients", "fisher"} <= set(tree.children)


def ema_reference(g2: np.ndarray, beta: float, batch: int) -> np.ndarray:
    """The bias-corrected EMA of batch means of g², written as the recursion."""
    F = np.zeros(g2.shape[1:])
    T = 0
    for s in range(0, len(g2), batch):
        F = beta * F + (1 - beta) * g2[s : s + batch].mean(axis=0)
        T += 1
    return F / (1 - beta**T)


@pytest.mark.parametrize("source", ["pooled", "a", "b"])
def test_fisher_equals_independent_bias_corrected_ema(tmp_path, base, source):
    _, job0, _ = base
    # 16 pooled samples, batch 4: beta = 0.9 over exactly 4 batches; a/b streams have a short last batch
    job = tiny_job(tmp_path, "llama_gqa", n_a=9, n_b=7, fisher={"beta": 0.9, "batch_size": 4, "source": source})
    extract(job)
    f = RunStore(job.output.path).open_fisher()
    assert f.attrs["beta"] == 0.9 and f.attrs["source"] == source
    n_a = 9
    for b in "QKVO":
        g = stored(job, b).astype(np.float64)
        sel = {"pooled": slice(None), "a": slice(0, n_a), "b": slice(n_a, None)}[source]
        ref = ema_reference(g[sel] ** 2, 0.9, 4)
        got = f[b].values.astype(np.float64)
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max(), b
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12 * np.abs(ref).max())
        lam = f["damping"].sel(block=b).values
        np.testing.assert_allclose(lam, np.maximum(0.0, 1e-6 * ref.reshape(ref.shape[0], -1).mean(axis=1)), rtol=1e-6)
    assert f.attrs["T"] == {"pooled": 4, "a": 3, "b": 2}[source]


def test_gradients_do_not_depend_on_extraction_batch_size(tmp_path, base):
    _, job0, _ = base
    ref = {b: stored(job0, b) for b in "QKVO"}
    for bs in (1, 8):
        job = tiny_job(tmp_path, "llama_gqa", n_a=10, n_b=7, extract={"batch_size": bs},
                       fisher={"beta": 0.9, "batch_size": 4}, output={"path": str(tmp_path / f"bs{bs}")})
        extract(job)
        for b in "QKVO":
            got = stored(job, b)
            scale = np.abs(ref[b]).max()
            assert np.abs(got - ref[b]).max() <= 1e-5 * scale, (bs, b)


def test_two_process_local_cluster_writes_the_same_store(tmp_path, base):
    from distributed import Client, LocalCluster

    _, job0, _ = base
    job = tiny_job(tmp_path, "llama_gqa", n_a=10, n_b=7, fisher={"beta": 0.9, "batch_size": 4},
                   output={"path": str(tmp_path / "cluster")})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl) as c:
        extract(job, DaskExecutor(c))
    # other processes, other torch thread counts: equal up to float32 rounding (on some CPUs the
    # last bits differ), which the comparison tells from a real error (tests/test_testing.py)
    assert_runs_close(job.output.path, job0.output.path, groups=(schema.GRADIENTS, schema.FISHER))


def test_resume_recomputes_only_unfinished_shards(tmp_path, base):
    _, job0, _ = base
    job = tiny_job(tmp_path, "llama_gqa", n_a=10, n_b=7, fisher={"beta": 0.9, "batch_size": 4},
                   output={"path": str(tmp_path / "resume")})
    extract(job)
    root = RunStore.of(job).root("r+")
    # simulate a crash after shard 1's data but before its record, and shard 3 never written
    root[schema.WORK]["done"][1] = 0
    root[schema.WORK]["done"][3] = 0
    root[schema.GRADIENTS]["Q"][12:16] = 0.0
    plan = plan_extract(job)
    assert pending_shards(RunStore.of(job), plan) == [1, 3]
    info = run_extract(RunStore.of(job), job, InlineExecutor(), plan=plan, fresh=False)
    assert info["computed"] == 2 and info["shards"] == 5
    for b in "QKVO":
        assert_close(stored(job, b), stored(job0, b))


def test_bfloat16_storage_round_trips_to_nearest_bf16(tmp_path, base):
    import torch

    _, job0, _ = base
    job = tiny_job(tmp_path, "llama_gqa", n_a=10, n_b=7, fisher={"beta": 0.9, "batch_size": 4},
                   score={"storage_dtype": "bfloat16"}, output={"path": str(tmp_path / "bf16")})
    extract(job)
    raw = xr.open_zarr(job.output.path, group="gradients", consolidated=False)
    assert raw["Q"].dtype == np.uint16 and raw["Q"].attrs[schema.ATTR_ENCODING] == "bfloat16"
    for b in "QKVO":
        want = stored(job0, b)  # float32, from another execution
        got = stored(job, b)
        assert np.array_equal(got, torch.from_numpy(got).to(torch.bfloat16).float().numpy())  # bf16 values
        # round to nearest: within half a bf16 unit (2^-8 relative) of the float32 value, plus its rounding
        np.testing.assert_allclose(got, want, rtol=2.0**-8 + RTOL, atol=RTOL * np.abs(want).max())
        assert not np.allclose(got, want, rtol=2.0**-10, atol=0)  # and not float32 values
    # the Fisher is accumulated from the float32 gradients, not the rounded ones
    assert_close(RunStore(job.output.path).open_fisher()["Q"].values, RunStore(job0.output.path).open_fisher()["Q"].values)


def test_layers_and_blocks_subset(tmp_path):
    job = tiny_job(tmp_path, "gpt2", n_a=5, n_b=4, score={"layers": [1], "blocks": ["O", "Q"]})
    extract(job)
    ds = RunStore(job.output.path).open_gradients()
    assert set(ds.data_vars) == {"Q", "O"} and list(ds.layer.values) == [1]
    bad = tiny_job(tmp_path, "gpt2", n_a=5, n_b=4, score={"layers": [0, 7]}, output={"path": str(tmp_path / "bad")})
    with pytest.raises(ValueError, match=r"out of range.*2 attention layers"):
        plan_extract(bad)


def test_provenance_keeps_storage_option_keys_not_credentials(tmp_path):
    job = tiny_job(tmp_path, "gpt2", n_a=3, n_b=3, output={"storage_options": {"key": "AKIA-SECRET", "secret": "s3cr3t"}})
    cfg = job.config_dict()
    assert cfg["output"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>"}
    assert "s3cr3t" not in str(cfg) and "AKIA-SECRET" not in str(cfg)


def test_shard_groups_write_each_shard_once_and_equal_single_shard_tasks(tmp_path):
    """Shards computed in groups (device compute overlapped with the previous shard's write)
    give the same store as one shard per task; groups never starve a device slot."""
    from qkov.pipeline.extract import shard_groups, shard_tasks, plan_extract
    from qkov.workers.writer import extract_shards

    job = tiny_job(tmp_path, "llama_gqa", n_a=7, n_b=6, extract={"shard_size": 2},
                   score={"storage_dtype": "bfloat16"}, output={"path": str(tmp_path / "grouped")})
    prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
    run_extract(RunStore.of(job), job, InlineExecutor())  # 7 shards → groups of 3 (inline: one slot)
    plan = plan_extract(job)
    tasks = shard_tasks(RunStore.of(job), plan, job, list(range(len(plan.shards))))
    groups = shard_groups(tasks, slots=1)
    assert [len(g) for g in groups] == [3, 3, 1] and [t for g in groups for t in g] == tasks
    assert [len(g) for g in shard_groups(tasks, slots=4)] == [1] * 7
    grouped = RunStore(job.output.path).open_gradients(decode=False).load()

    single = job.model_copy(update={"output": job.output.model_copy(update={"path": str(tmp_path / "single")})})
    prepare_output(RunStore.of(single), single, resume=False, overwrite=True)
    from qkov.pipeline.extract import write_template

    write_template(RunStore.of(single), plan_extract(single), single)
    res = [r for t in shard_tasks(RunStore.of(single), plan_extract(single), single, list(range(len(plan.shards)))) for r in extract_shards((t,))]
    assert [r.shard for r in res] == list(range(7))
    assert [r.shard for r in extract_shards(tuple(shard_tasks(RunStore.of(single), plan_extract(single), single, [0, 1])))] == [0, 1]
    ref = RunStore(single.output.path).open_gradients(decode=False, complete=False).load()
    for b in "QKVO":
        assert grouped[b].dtype == np.uint16
    # bf16 bits decoded; a float32 rounding difference may move a value by one bf16 unit
    assert compare_datasets(grouped.drop_attrs(deep=False), ref.drop_attrs(deep=False)) == []  # `ref` was never finished


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_all_zero_gradient_chunks_are_written_and_not_called_lost(tmp_path, storage):
    """A shard whose gradients are exactly 0 in a slice (an ablated head, skipped samples) still
    stores its chunk: zarr leaves all-fill chunks out by default, and the score stage's gate
    would then call a finished run damaged."""
    from qkov.pipeline.extract import shard_tasks, write_template
    from qkov.pipeline.store.work import damaged_shards
    from qkov.workers.writer import compute_shard, write_shard

    job = tiny_job(tmp_path, "llama_gqa", n_a=2, n_b=2, extract={"shard_size": 2}, score={"storage_dtype": storage})
    store = RunStore.of(job)
    prepare_output(store, job, resume=False, overwrite=True)
    plan = plan_extract(job)
    write_template(store, plan, job)
    for task in shard_tasks(store, plan, job, [0, 1]):
        grads, *rest = compute_shard(task)
        grads = {b: np.zeros_like(g) if b == "V" else g for b, g in grads.items()}  # V exactly 0 everywhere
        write_shard(task, (grads, *rest))
    assert damaged_shards(store) == []
    assert (RunStore(job.output.path).open_gradients(complete=False)["V"].values == 0).all()


def test_tasks_sharing_a_workers_model_take_turns(tmp_path):
    """A worker without a GPU resource runs one extraction task per thread on its one cached
    model; per-sample gradients hook that model's modules, so tasks at once would capture each
    other's activations. Shards computed from four threads at once equal the same shards
    computed one after another."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from qkov.pipeline.extract import shard_tasks, write_template
    from qkov.workers.writer import compute_shard

    # shards of 4, 4, 4 and 3 samples, one batch each: a hook that saw another task's call
    # meets a batch of another size
    job = tiny_job(tmp_path, "llama_gqa", n_a=8, n_b=7, min_len=32, max_len=48, extract={"shard_size": 4, "batch_size": 4})
    store = RunStore.of(job)
    prepare_output(store, job, resume=False, overwrite=True)
    plan = plan_extract(job)
    write_template(store, plan, job)
    tasks = shard_tasks(store, plan, job, list(range(len(plan.shards))))
    assert len(tasks) == 4
    serial = [compute_shard(t) for t in tasks]
    for _ in range(3):
        start = threading.Barrier(len(tasks))

        def at_once(task):
            start.wait()
            return compute_shard(task)

        with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
            concurrent = list(pool.map(at_once, tasks))
        for (g1, l1, *_), (g2, l2, *_) in zip(concurrent, serial):
            assert_close(l1, l2)
            for b in g2:
                assert_close(g1[b], g2[b])


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_staged_slices_reach_the_host_as_put_one_by_one(storage_dtype):
    """On a GPU a shard's slices that go to the host per batch are staged on the device and copied
    once per batch (`ShardBuffers.flush`), early when the stage is full: the host buffers hold
    what one copy per slice wrote, bit for bit, NaN included."""
    import numpy as np
    import torch

    from qkov.workers.writer import ShardBuffers

    rng = torch.Generator().manual_seed(0)
    shapes = {"Q_u": (3, 2, 10, 5), "Q_v": (3, 2, 10, 5)}
    puts = [(name, li, s, torch.randn(min(4, 10 - s), 2, 5, generator=rng))
            for s in (0, 4, 8) for li in range(3) for name in shapes]
    puts[5][3][0, 1, 2] = float("nan")
    want = ShardBuffers(shapes, storage_dtype, "cpu", stage=False)
    got = ShardBuffers(shapes, storage_dtype, "cpu", stage=True)
    got.STAGE_BYTES = 300  # a few slices per copy: the early flushes too
    for name, li, s, t in puts:
        want.put(name, li, s, t)
        got.put(name, li, s, t)
    assert got._pending  # (staged, not yet copied)
    w, g = want.to_host(), got.to_host()
    assert all(np.array_equal(w[k].view(np.uint8), g[k].view(np.uint8)) for k in shapes)
