"""Compact index tables, per-layer per-sample gradients and on-device sketching (the 7B path)."""
from __future__ import annotations

from qkov.pipeline.store import RunStore
from qkov.workers.fisher import inverse_damped_fisher
import numpy as np
import pytest
import torch

from qkov.pipeline import schema
from qkov.workers.grads import per_sample_backward, per_sample_grads
from qkov.workers.layouts import discover_layout
from qkov.workers.losses import loss_task_for
from qkov.workers.sketch import (LayerProjection, ProjectionCache, inverse_permutation, layer_projection, operands, projection, sketch,
                            sketch_block, sketch_layer, slice_keys)
from qkov.workers.slicing import BlockSlicing, ParamPart, factorise, slice_block
from qkov.testing import ARCHITECTURES, VOCAB, random_batch, tiny_model

# ---------------------------------------------------------------- compact index tables


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("include_bias", [False, True])
def test_every_known_layout_is_stored_compact_and_equals_its_full_table(arch, include_bias):
    """Each part of every tiny model is a verified base + pattern, and its table, its device
    gather index and a part rebuilt from the explicit table all agree entry for entry."""
    layout = discover_layout(tiny_model(arch), include_bias=include_bias)
    for bs in layout.blocks.values():
        for k, part in enumerate(bs.parts):
            assert part.compact, (arch, bs.block, part.param)
            table = part.base[:, None] + part.pattern[None, :]
            assert table.shape == (bs.n_heads, part.size)
            np.testing.assert_array_equal(part.index, table)
            np.testing.assert_array_equal(bs.index_tensor(k).numpy(), table)
            again = ParamPart(part.param, part.shape, table)
            assert again.compact
            np.testing.assert_array_equal(again.base, part.base)
            np.testing.assert_array_equal(again.pattern, part.pattern)
            assert len(np.unique(table)) == table.size and table.max() < np.prod(part.shape)


def test_patterns_are_shared_across_layers():
    layout = discover_layout(tiny_model("llama"))
    assert layout.blocks[("Q", 0)].parts[0].pattern is layout.blocks[("Q", 1)].parts[0].pattern


def test_table_without_head_offset_structure_is_kept_whole_and_slices_the_same():
    rng = np.random.default_rng(0)
    table = rng.permutation(48).reshape(4, 12)  # no base + pattern form
    assert factorise(table) is None
    part = ParamPart("w", (6, 8), table)
    assert not part.compact
    np.testing.assert_array_equal(part.index, table)
    g = torch.randn(3, 6, 8, dtype=torch.float64)
    got = slice_block(BlockSlicing("Q", 0, 4, (part,)), {"w": g})
    want = g.reshape(3, -1)[:, torch.as_tensor(table)]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError):
        ParamPart("w", (6, 8))


# ---------------------------------------------------------------- per-layer per-sample gradients


def test_lazy_gradients_per_parameter_equal_all_at_once():
    model = tiny_model("llama_gqa")
    layout = discover_layout(model, include_bias=True)
    batch = random_batch(VOCAB, [7, 5, 3], seed=1)
    names = layout.param_names
    ref = per_sample_grads(model, batch, names, loss_task_for(model))
    lazy = per_sample_backward(model, batch, names, loss_task_for(model))
    for name in reversed(names):  # any order, one at a time
        torch.testing.assert_close(lazy.grads([name])[name], ref.grads[name], rtol=0, atol=0)
    assert bool(lazy.finite(names).all())


def test_finite_flags_name_the_samples_with_non_finite_gradients():
    """A NaN embedding row poisons only the samples using that token: `finite` finds them
    without forming the gradients, and agrees with the gradients themselves."""
    model = tiny_model("llama")
    batch = random_batch(VOCAB - 1, [6, 6, 6, 6], seed=2)  # token VOCAB-1 unused so far
    batch["input_ids"][2, 3] = VOCAB - 1
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB - 1] = float("nan")
    names = discover_layout(model).param_names
    lazy = per_sample_backward(model, batch, names, loss_task_for(model))
    flags = lazy.finite(names)
    assert flags.tolist() == [True, True, False, True]
    for t in lazy.grads(names).values():
        assert torch.isfinite(t.reshape(4, -1)).all(dim=1).tolist() == flags.tolist()


def test_finite_falls_back_to_the_gradients_when_the_overflow_bound_fails(monkeypatch):
    """Below the bound no gradient can overflow; above it, the flags come from the gradients
    themselves (forced here with a tiny bound): the same answer either way."""
    import qkov.workers.grads as grads_mod

    model = tiny_model("gpt2")
    batch = random_batch(VOCAB, [5, 4], seed=4)
    names = discover_layout(model).param_names
    monkeypatch.setattr(grads_mod, "_OVERFLOW_LIMIT", 1e-30)
    lazy = per_sample_backward(model, batch, names, loss_task_for(model))
    calls = []
    real = lazy.grads
    monkeypatch.setattr(lazy, "grads", lambda ns: calls.append(list(ns)) or real(ns))
    assert lazy.finite(names).tolist() == [True, True]
    assert calls  # the fallback formed the gradients


# ---------------------------------------------------------------- projections on the device


@pytest.mark.parametrize("size", [1, 2, 7, 64, 1000, 4099])
def test_inverse_permutation_is_a_permutation_and_inverts_the_rows(size):
    keys = torch.as_tensor(slice_keys(5, "O", 2, 1, nnz=2))
    order = inverse_permutation(size, keys)
    assert all(sorted(row.tolist()) == list(range(size)) for row in order)
    proj = projection(size, size, 5, "O", 2, 1, nnz=2)  # k = P: rows are the ranks themselves
    for r in range(2):
        torch.testing.assert_close(proj.rows[r][order[r]], torch.arange(size), rtol=0, atol=0)


@pytest.mark.parametrize("P, k", [(300, 32), (4099, 256), (64, 64)])
def test_buckets_are_filled_run_by_run(P, k):
    """Each run of k consecutive entries (the last one ragged) is shuffled within itself, so
    applying S reads g run by run (no random reads across the slice); yet within a run the
    order is not the identity, and runs are shuffled differently (else entries at the same
    offset of every run would always share a bucket)."""
    proj = layer_projection(P, k, 3, "Q", 1, 2, nnz=2)
    order = proj.order.long()
    q = torch.arange(P)
    assert torch.equal(order // k, (q // k).expand_as(order))  # every entry stays in its run
    assert all(sorted(row.tolist()) == list(range(P)) for row in order.reshape(-1, P))
    local = order % k
    assert not torch.equal(local, (q % k).expand_as(local))
    if P >= 2 * k:
        assert not torch.equal(local[..., :k], local[..., k : 2 * k])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("P, k, nnz", [(300, 32, 1), (301, 16, 3), (50, 64, 1), (4096, 128, 2)])
def test_device_sketch_equals_the_reference_scatter_sketch(P, k, nnz, dtype, tol):
    """sketch_layer (gather + reshape-sum, all heads at once) == per-head `sketch` of the
    float64 operands with `projection` (scatter form), for ragged P/k, k > P and nnz > 1:
    to float64 rounding for float64 gradients, to float32 rounding for float32 ones (the
    workers' case: formed in float32)."""
    H, B = 3, 4
    g = torch.randn(B, H, P, dtype=torch.float32, generator=torch.Generator().manual_seed(0)).to(dtype)
    inv = torch.rand(H, P, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.01
    proj = layer_projection(P, k, 7, "V", 3, H, nnz)
    got = sketch_layer(g, inv, proj)
    for h in range(H):
        ref = projection(P, k, 7, "V", 3, h, nnz)
        for name, x in zip(schema.SKETCH_PARTS, operands(g[:, h].double(), inv[h])):
            assert got[name].dtype == dtype
            # (a sum of P/k terms of either sign: the tolerance is against its terms' scale)
            torch.testing.assert_close(got[name][:, h].double(), sketch(x, ref), rtol=tol,
                                       atol=tol * float(x.abs().max()) * max(1.0, (P / k) ** 0.5))
        assert (ref.rows[0].bincount(minlength=k).max() - ref.rows[0].bincount(minlength=k).min()) <= 1  # balanced


def test_sketch_block_matches_per_slice_reference():
    n, L, H, P, k = 5, 2, 3, 200, 24
    rng = np.random.default_rng(3)
    g = rng.standard_normal((n, L, H, P)).astype(np.float32)
    inv = rng.random((L, H, P)) + 0.1
    out = sketch_block(g, inv, "K", (4, 9), k, 11)
    for li, layer in enumerate((4, 9)):
        for h in range(H):
            ref = projection(P, k, 11, "K", layer, h)
            for name, x in zip(schema.SKETCH_PARTS, operands(torch.as_tensor(g[:, li, h]).double(), torch.as_tensor(inv[li, h]))):
                np.testing.assert_allclose(out[name][:, li, h], sketch(x, ref).float().numpy(), rtol=1e-5,
                                           atol=1e-6 * float(x.abs().max()))  # formed in float32


def test_projection_cache_respects_its_budget():
    one = layer_projection(100, 8, 0, "Q", 0, 2)
    cache = ProjectionCache(budget=one.nbytes)
    a = cache.get(100, 8, 0, "Q", 0, 2, 1, "cpu")
    assert cache.get(100, 8, 0, "Q", 0, 2, 1, "cpu") is a and cache.used == one.nbytes
    b = cache.get(100, 8, 0, "Q", 1, 2, 1, "cpu")  # over budget: built, not kept
    assert cache.get(100, 8, 0, "Q", 1, 2, 1, "cpu") is not b and cache.used == one.nbytes
    torch.testing.assert_close(a.order, one.order, rtol=0, atol=0)
    assert isinstance(a, LayerProjection) and a.order.dtype == torch.int32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_projection_is_bit_identical_to_cpu():
    P, k, H = 524_288, 1024, 4
    cpu = layer_projection(P, k, 0, "O", 31, H)
    gpu = layer_projection(P, k, 0, "O", 31, H, device="cuda")
    assert torch.equal(cpu.order, gpu.order.cpu()) and torch.equal(cpu.signs, gpu.signs.cpu())


# ---------------------------------------------------------------- the sketch pass end to end


def test_sketch_pass_equals_reference_sketches_of_exact_gradients(tmp_path):
    """The stored sketches of a sketch-mode run are the reference scatter sketches of the
    exact run's per-sample gradients with the run's own 1/Î_reg, slice by slice."""
    from qkov.pipeline.run import run_job
    
    from qkov.testing import tiny_job

    k = 48
    runs = {}
    for name, score in (("exact", {}), ("sk", {"mode": "sketch", "sketch_dim": k, "sketch_seed": 2})):
        job = tiny_job(tmp_path, "phi3", n_a=5, n_b=4, extract={"shard_size": 3, "batch_size": 2},
                       score=score, output={"path": str(tmp_path / name)})
        run_job(job)
        runs[name] = job.output.path
    ge, gs = RunStore(runs["exact"]).open_gradients(), RunStore(runs["sk"]).open_gradients()
    layers = [int(x) for x in ge[schema.LAYER].values]
    for b in schema.BLOCKS:
        g = ge[b].values
        inv = inverse_damped_fisher(RunStore(runs["exact"]).open_fisher(), b).compute()
        for li, layer in enumerate(layers):
            for h in range(g.shape[2]):
                ref = projection(g.shape[-1], k, 2, b, layer, h)
                xs = operands(torch.as_tensor(g[:, li, h]).double(), torch.as_tensor(inv[li, h]))
                for part, x in zip(schema.SKETCH_PARTS, xs):
                    want = sketch(x, ref).float().numpy()
                    got = gs[schema.sketch_var(b, part)].values[:, li, h]
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
