"""The answers passes fused with the per-sample gradients' formation (qkov.workers.pass_kernels'
fused_pass1 / fused_pass2), run by Triton's CPU interpreter, against the unfused path: the
per-sample gradients formed by torch (qkov.workers.grads), sliced (qkov.workers.slicing), then
reduced by the torch forms."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from qkov.workers import answers as ans
from qkov.workers import pass_kernels as pk
from qkov.workers.grads import per_sample_backward
from qkov.workers.slicing import slice_block

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs triton under its CPU interpreter (make test installs it; conftest sets it)")


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("QKOV_PASS_KERNELS", "interpret")
    monkeypatch.setenv("QKOV_PASS_FUSED", "1")
    pk.available.cache_clear()
    yield
    pk.available.cache_clear()


def _layout_and_grads(dtype=torch.float32, kv_heads=2, seed=0):
    """A tiny Llama (GQA, head_dim 32) with one batch's activations and its formed gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qkov.workers.layouts import discover_layout
    from qkov.workers.losses import CausalLMLoss

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=64, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    layout = discover_layout(model)
    ids = torch.randint(0, 64, (3, 19), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # a padded row
    res = per_sample_backward(model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, layout.param_names,
                              CausalLMLoss())
    return layout, res


def _block(layout, res, b):
    bs = layout.blocks[(b, 0)]
    fs = pk.fused_slice(bs)
    assert fs is not None, b
    x, go = res.activations(bs.parts[0].param)
    t = slice_block(bs, res.grads([bs.parts[0].param])).float()
    return fs, x, go, t


def test_every_llama_block_fuses_and_its_slices_are_weight_row_segments():
    """Q/K/V heads are rows of their weights, O's heads columns: each head's row a segment of a
    weight row, as the kernels address them (checked against slice_block on a marked weight)."""
    layout, res = _layout_and_grads()
    for b in "QKVO":
        bs = layout.blocks[(b, 0)]
        fs = pk.fused_slice(bs)
        marked = torch.arange(fs.out * fs.inp, dtype=torch.float64).view(1, fs.out, fs.inp)
        got = slice_block(bs, {bs.parts[0].param: marked})[0]  # (H, P) flat weight indices
        h, r, c = np.meshgrid(np.arange(fs.n_heads), np.arange(fs.R), np.arange(fs.C), indexing="ij")
        base = fs.first + h * fs.head_stride
        want = (base // fs.inp + r) * fs.inp + base % fs.inp + c
        np.testing.assert_array_equal(got.numpy().reshape(h.shape), want)
    assert res.activations(layout.blocks[("Q", 0)].parts[0].param)[0].shape == (3, 19, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", [False, True])
def test_fused_pass1_equals_formed_gradients_reduced(interpreted, dtype, rounding):
    """Task sums over runs of rows (one without a task), the Fisher's weighted Σ g² per stream and
    the flag, from x and ∂ℓ/∂y, equal the formed, sliced gradients' pass 1 (torch forms)."""
    layout, res = _layout_and_grads(dtype)
    runs = [(0, 2, 1, (0.5, 0.0)), (2, 3, None, (0.25, 1.0))]
    for b in "QKVO":
        fs, x, go, t = _block(layout, res, b)
        H, P = t.shape[1:]
        acc0 = torch.rand((3, 2, H, P), generator=torch.Generator().manual_seed(1))
        f0 = torch.rand((2, H, P), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        got_acc, got_f = acc0.clone(), f0.clone()
        bad = pk.fused_pass1(fs, x, go, runs, got_acc, got_f, rounding)
        want_acc, want_f = acc0.clone(), f0.clone()
        pk._pass1_torch(t, runs, want_acc, want_f, rounding)
        assert int(bad) == 0
        scale = float(t.abs().max())
        # (sums in another order: bf16-rounded entries may round the other way at a last-bit tie)
        np.testing.assert_allclose(got_acc.numpy(), want_acc.numpy(), rtol=1e-5, atol=(4e-3 if rounding else 1e-5) * scale)
        np.testing.assert_allclose(got_f.numpy(), want_f.numpy(), rtol=1e-5, atol=1e-5 * scale**2)


def test_fused_pass1_flags_a_non_finite_gradient(interpreted):
    layout, res = _layout_and_grads()
    fs, x, go, _ = _block(layout, res, "V")
    x = x.clone()
    x[1, 3, 5] = float("inf")
    acc = torch.zeros((3, 1, fs.n_heads, fs.R * fs.C))
    assert int(pk.fused_pass1(fs, x, go, [(0, 3, 0, None)], acc, None, False)) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", [False, True])
def test_fused_pass2_equals_formed_gradients_reduced(interpreted, dtype, rounding):
    """Each sample's scalars against the task sums, from x and ∂ℓ/∂y, equal `sample_scalars` of
    the formed, sliced (and rounded) gradients."""
    layout, res = _layout_and_grads(dtype)
    for b in "QKVO":
        fs, x, go, t = _block(layout, res, b)
        H, P = t.shape[1:]
        g = torch.Generator().manual_seed(5)
        inv = torch.rand((H, P), generator=g) + 0.5
        sums = torch.randn((3, 2, H, P), generator=g)
        got, sketches = pk.fused_pass2(fs, x, go, inv, sums, rounding)
        want = ans.sample_scalars(t.to(torch.bfloat16).float() if rounding else t, inv, sums)
        assert sketches is None and got.shape == want.shape
        scale = want.abs().amax(dim=(0, 1), keepdim=True)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=(2e-3 if rounding else 1e-5) * float(scale.max()))


@pytest.mark.parametrize("dim, nnz", [(32, 1), (64, 2)])
def test_fused_pass2_sketches_equal_the_torch_sketch(interpreted, dim, nnz):
    """u, v sketched in the fused kernel (runs of `dim` whole in each tile: Q/K/V's rows hold
    several runs, O's a run spans rows where dim > head_dim) equal sketch_layer of the formed
    gradients on the same projection; a planted sign flip in the projection would not."""
    from qkov.workers.sketch import LayerProjection, layer_projection, sketch_layer

    layout, res = _layout_and_grads()
    for b in "QKVO":
        fs, x, go, t = _block(layout, res, b)
        H, P = t.shape[1:]
        assert pk.sketch_tile(fs, dim) is not None, (b, dim)
        inv = torch.rand((H, P), generator=torch.Generator().manual_seed(6)) + 0.5
        sums = torch.zeros((3, 1, H, P))
        proj = layer_projection(P, dim, 0, b, 0, H, nnz)
        _, got = pk.fused_pass2(fs, x, go, inv, sums, False, proj)
        want = sketch_layer(t, inv, proj, parts=("u", "v"))
        for p in ("u", "v"):
            scale = float(want[p].abs().max())
            np.testing.assert_allclose(got[p].numpy(), want[p].numpy(), rtol=1e-4, atol=1e-5 * scale)
        flipped = LayerProjection(proj.order, proj.signs.clone(), dim)
        flipped.signs[0, 0, 3] *= -1
        _, off = pk.fused_pass2(fs, x, go, inv, sums, False, flipped)
        assert not torch.allclose(off["v"], want["v"], rtol=1e-4, atol=1e-5 * float(want["v"].abs().max()))


def test_layouts_that_do_not_fuse_say_so():
    """A block of two parts (a weight and its bias) or with a gathered layout is not fused."""
    from qkov.workers.slicing import BlockSlicing, ParamPart

    w = ParamPart("w", (8, 4), np.arange(32).reshape(2, 16))
    assert pk.fused_slice(BlockSlicing("Q", 0, 2, (w,))) is not None
    bias = ParamPart("b", (8,), np.arange(8).reshape(2, 4))
    assert pk.fused_slice(BlockSlicing("Q", 0, 2, (w, bias))) is None
    shuffled = ParamPart("w", (8, 4), np.array([[3, 0, 1, 2] * 4, [7, 4, 5, 6] * 4]))
    assert pk.fused_slice(BlockSlicing("Q", 0, 2, (shuffled,))) is None


def test_an_answers_task_on_the_fused_kernels_equals_one_formed_first(interpreted, tmp_path, monkeypatch):
    """A whole answers task (pass 1, then pass 2 against its sums; bf16 rounding; u, v sketched
    where asked) in this process with the fused kernels, against the same task with the
    gradients formed first (QKOV_PASS_FUSED=0, the default): the same scalars, sketches, Fisher and sums.
    Every block of every layer fuses where it fits (counted); K/V's and O's sketch tiles do not
    at head_dim 8 and run unfused beside them."""
    from dataclasses import replace

    from qkov.pipeline.extract import plan_extract, shard_tasks
    from qkov.pipeline.store import RunStore
    from qkov.testing import tiny_job
    from qkov.workers import writer

    score = {"mode": "answers", "keep_pairs": "top", "storage_dtype": "bfloat16", "sketch_dim": 16, "top_k": 3}
    job = tiny_job(tmp_path, "llama_gqa", n_a=5, n_b=4, score=score, fisher={"source": "a"},
                   extract={"shard_size": 64, "batch_size": 4}, output={"path": str(tmp_path / "run")})
    task = shard_tasks(RunStore.of(job), plan_extract(job), job, [0], "answers_whole")[0]
    calls = {"fused_pass1": 0, "fused_pass2": 0}
    for name in calls:
        real = getattr(ans, name)
        monkeypatch.setattr(ans, name, lambda *a, real=real, name=name, **k: calls.__setitem__(name, calls[name] + 1) or real(*a, **k))
    got = writer.compute_shard(task)
    n_slices = len(task.layers) * len(task.blocks) * -(-len(task.input_ids) // 4)
    assert calls["fused_pass1"] == n_slices
    assert 0 < calls["fused_pass2"] < n_slices  # (Q's sketch tiles fit; the others' do not)
    monkeypatch.setenv("QKOV_PASS_FUSED", "0")
    want = writer.compute_shard(replace(task))
    for got_part, want_part in ((got[0], want[0]), (got[2], want[2])):  # scalars (and sketches); Fisher and task sums
        assert set(got_part) == set(want_part)
        for name, w in want_part.items():
            w = np.asarray(w, dtype=np.float64)
            np.testing.assert_allclose(np.asarray(got_part[name], dtype=np.float64), w, rtol=1e-4,
                                       atol=2e-3 * np.abs(w).max(), err_msg=name)
