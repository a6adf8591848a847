"""benchmarks/bench_e2e.py: its disk arithmetic, and a tiny end-to-end run on the CLI's cluster path."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_e2e as be


def test_disk_arithmetic_for_smollm2_geometry():
    # SmolLM2-135M: 9 query heads, 3 KV heads, slices of 64 × 576 entries; 1000 + 1000 samples, bf16
    heads, sizes = {"Q": 9, "K": 3, "V": 3, "O": 9}, dict.fromkeys("QKVO", 64 * 576)
    per = be.bytes_per_layer(heads, sizes, 1000, 1000, n_heads=9, shard_size=128)
    assert per["gradients"] == 2000 * 24 * 36864 * 2  # 3.54 GB a layer, 106 GB for 30
    assert 30 * per["gradients"] / 1e9 == pytest.approx(106.2, abs=0.1)
    assert per["scores"] == 2 * 24 * 2000**2 * 4  # compact: pooled N×N per block head (K/V per KV head), both scores
    assert per["_work"] == 16 * 24 * 36864 * 4  # 16 shards' Fisher partial sums
    assert be.fit_layers(free=50 * 2**30, per_layer=5 * 2**30, reserve=5 * 2**30, n_layers=30) == 9
    assert be.fit_layers(free=2**30, per_layer=5 * 2**30, reserve=0, n_layers=30) == 0
    assert be.spread(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29] and be.spread(30, 1) == [0] and be.spread(30, 99) == list(range(30))
    assert be.score_flops(2000, heads, sizes, 1) == 4 * 2000**2 * 24 * 36864


def test_extrapolation_separates_fixed_and_per_layer_extraction():
    t = {"extract": 50.0, "score": 40.0, "stats": 8.0}
    x = be.extrapolate(t, n_layers_run=8, n_layers_model=30, calib_extract_s=22.0)
    assert x["extract_per_layer_s"] == pytest.approx(4.0) and x["extract_fixed_s"] == pytest.approx(18.0)
    assert x["extract_s"] == pytest.approx(18 + 4 * 30) and x["score_s"] == pytest.approx(150) and x["stats_s"] == pytest.approx(30)
    assert x["total_s"] == pytest.approx(138 + 150 + 30)
    assert "overestimate" in be.extrapolate(t, 8, 30, None)["extract_method"]


@pytest.mark.slow
def test_tiny_run_reports_every_field(tmp_path, capsys):
    out = tmp_path / "result.json"
    res = be.main(["--geometry", "tiny", "--n", "8", "--seq", "16", "--layers", "0", "1", "--batch", "4",
                   "--shard-size", "8", "--n-permutations", "19", "--n-bootstrap", "20", "--workers", "1",
                   "--workdir", str(tmp_path / "work"), "--json-out", str(out), "--io-gib", "0.05", "--baseline"])
    assert json.loads(out.read_text()) == res == json.loads(capsys.readouterr().out)
    assert res["layers"] == [0, 1] and res["n_layers_model"] == 2 and res["device"] == ["cpu"]
    assert set(res["stage_s"]) == {"preflight", "extract", "score", "stats", "finish"} and all(v > 0 for v in res["stage_s"].values())
    assert res["run_total_s"] >= sum(res["stage_s"].values())
    assert res["cluster"]["workers"] == 1 and res["calibration_extract_1_layer_s"] > 0
    assert res["samples_per_s"]["extract"] > 0 and res["score"]["tflops_per_s"] >= 0
    assert res["score"]["flops"] == 4 * 16**2 * 2 * (4 + 2 + 2 + 4) * 16 * 64  # tiny: 4 q heads, 2 kv, 16 × 64 slices
    assert {"gradients", "fisher", "scores", "stats"} <= set(res["store_bytes"]) and "_work" not in res["store_bytes"]
    assert all(res["store_bytes"][g] > 0 for g in ("gradients", "scores", "stats"))
    x = res["extrapolated_to_all_layers"]
    assert x["label"].startswith("EXTRAPOLATED") and x["n_layers"] == 2 and x["total_s"] > 0
    assert res["disk"]["layers_that_fit"] == 2 and res["disk"]["per_layer_total_gib"] >= 0
    assert not (tmp_path / "work" / "run").exists()  # the run's store is removed unless --keep
    # bandwidths measured in the same run, and the stages as ratios to them (issue 17)
    assert all(res["io"][k] > 0 for k in ("disk_write_gb_s", "disk_read_cold_gb_s", "page_cache_read_gb_s"))
    r = res["io_ratios"]
    assert r["gradient_bytes"] == 16 * 2 * (4 + 2 + 2 + 4) * 16 * 64 * 2 and r["extract_write_fraction_of_disk_write"] > 0
    assert r["score_time_over_bound_overlapped"] > 0 and res["plan"]["fits"] is True
    assert (tmp_path / "work" / "model-tiny" / be.MODEL_MARKER).is_file()
    plain = res["plain_fwd_bwd"]  # the bound measured in the same run, and the extraction against it
    assert plain["samples_per_s"] > 0 and plain["extract_over_plain"] == pytest.approx(
        res["stage_s"]["extract"] / (16 / plain["samples_per_s"]), rel=1e-2)


@pytest.mark.slow
def test_tiny_layer_grouped_run_reports_its_loop_and_profile(tmp_path):
    res = be.main(["--geometry", "tiny", "--n", "8", "--seq", "16", "--batch", "4", "--shard-size", "8",
                   "--n-permutations", "19", "--n-bootstrap", "20", "--workers", "1", "--no-calibrate", "--keep-gradients",
                   "false", "--profile", "--workdir", str(tmp_path / "work"), "--io-gib", "0.05"])
    loop = res["layer_groups_s"]
    assert loop["loop"] >= res["stage_s"]["extract"] + res["stage_s"]["score"] and loop["drop_gradients"] >= 0
    assert loop["other"] == pytest.approx(loop["loop"] - res["stage_s"]["extract"] - res["stage_s"]["score"]
                                          - loop["drop_gradients"] - loop["setup"], abs=3e-3)
    assert {"preflight", "finish"} <= set(res["stage_s"]) and loop["setup"] >= 0
    # the workers' task seconds per stage, from the scheduler's task stream
    assert "stats" in res["profile"] and all(st["wall_s"] >= 0 for st in res["profile"].values())
    assert any(k.startswith("extract_shards") for st in res["profile"].values() for k in st["task_seconds"])


def test_profile_answers_times_the_task_its_parts_and_the_plain_pass_on_the_workers_frozen_model(tmp_path):
    """`benchmarks.profile_answers` (scale_figures' llama3-8b-task) on a tiny model: the task's passes
    and their parts (each pass, the consolidation between them), and the plain forward+backward
    measured on the worker's cached model, which extraction keeps frozen (the bound's own
    backward makes it trainable for its timing only)."""
    from benchmarks import profile_answers
    from qkov.workers import writer

    out = tmp_path / "pa.json"
    profile_answers.main(["--geometry", "tiny", "--n", "8", "--batch", "4", "--seq", "16", "--profile-n", "0",
                          "--keep-pairs", "top", "--sketch-dim", "16", "--workdir", str(tmp_path / "w"), "--json-out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["task_parts_s"]["answers_whole"]) == {"fisher", "between", "answers"}
    assert res["plain_fwd_bwd"]["s_per_batch"] > 0 and res["over_plain"]["answers_pass"] > 0
    assert all(not p.requires_grad for model, _, _ in writer._CACHE.values() for p in model.parameters())


def test_a_run_stopped_by_its_time_limit_still_writes_what_it_measured(tmp_path, capsys):
    """bench_e2e's SIGTERM handler (a device command's `timeout`): the result so far, marked
    partial, with each stage's start after the run's, written to --json-out; exit code 124."""
    import signal
    import time

    out = tmp_path / "r.json"
    t0 = time.perf_counter()
    handler = be.partial_writer(str(out), {"warmup_s": 1.5}, t0, {"extract": t0 + 2.0, "score": t0 + 9.0})
    with pytest.raises(SystemExit) as stop:
        handler(signal.SIGTERM, None)
    doc = json.loads(out.read_text())
    assert stop.value.code == 124 and doc["partial"] and doc["warmup_s"] == 1.5
    assert doc["stage_started_after_s"] == {"extract": 2.0, "score": 9.0} and doc["stopped_after_s"] >= 0
