"""End-to-end exact-mode `qkov run`, stage by stage, on the embedded cluster the CLI starts.

    python -m benchmarks.bench_e2e [--n 1000] [--seq 256] [--layers L ...] [--geometry smollm2|tiny]
        [--shard-size 128] [--batch 16] [--workdir runs/bench-e2e] [--keep] [--no-calibrate]

Builds a randomly initialised Llama of SmolLM2-135M geometry (saved once under the
workdir), writes two task files of `--n` random `input_ids` sequences of exactly
`--seq` tokens, and runs the job (exact mode, bfloat16 gradient storage, device auto)
the way `qkov run JOB.toml` does: `cluster_client` (the embedded cluster: one worker
per GPU) and `run_job`, which times extract, score and stats.

Disk: exact mode stores every sample's attention gradients, so the full depth rarely
fits a small disk (SmolLM2-135M, 1000 + 1000 samples: 3.5 GB of bf16 gradients per
layer, 106 GB for all 30). Without `--layers` the benchmark scores the most layers,
spread over depth, whose store fits the free disk with a reserve, and prints that
arithmetic. Score and stats run one task group per (block, layer, head) slice, so
their time is linear in the layers; extraction is a fixed forward/backward cost plus a
per-layer cost, measured by a 1-layer calibration extraction (lowest chosen layer, so
the same backward depth). From these the 30-layer time is extrapolated, and labelled so.

Before timing, one small warm-up extraction loads the model and CUDA on the worker;
its time (what a cold `qkov run` pays once) is reported apart. Prints one JSON object.

`--keep-gradients false` runs in layer groups (extract → score → drop) and takes every
layer by default: the disk then holds the results and one group's gradients. The run's
`qkov plan` lines are printed and recorded with the peak store size sampled each second,
and the disk (fdatasync'd write, cold read) and pinned host→device bandwidths are measured
in the same run; `io_ratios` gives extraction's write rate as a fraction of the disk's
write bandwidth and the score stage's time over its I/O bound (issue 17).
"""
from __future__ import annotations

from qkov.pipeline.store import RunStore
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_extract import GEOMETRIES

GiB = 2**30
MODEL_MARKER = "bench_geometry.json"


# ---------------------------------------------------------------- inputs


def build_model(folder: Path, geometry: str, dtype: str = "float32", baseline: dict | None = None) -> Path:
    """A random-init Llama of `geometry` saved as a local HF folder; reused when already there.
    Built on the GPU when there is one (an 8B init takes seconds there, minutes on the host).
    With `baseline` (batch, seq), a plain forward+backward of the freshly built model is timed
    first, in the same process and run as the pipeline it is compared with: `baseline` gets
    its median seconds per batch."""
    want = {"geometry": geometry, "dtype": dtype, **GEOMETRIES[geometry]}
    marker = folder / MODEL_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want and baseline is None:
        return folder
    import torch
    import transformers as tf

    from qkov.testing import save_model

    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**GEOMETRIES[geometry], attention_dropout=0.0, bos_token_id=1, eos_token_id=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = tf.LlamaForCausalLM._from_config(cfg, dtype=getattr(torch, dtype))
    if baseline is not None:
        baseline.update(plain_fwd_bwd(model, baseline["batch"], baseline["seq"], device))
    save_model(model, None, folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(json.dumps(want))  # last: a half-written folder is rebuilt
    return folder


def plain_fwd_bwd(model, batch: int, seq: int, device: str, repeats: int = 5) -> dict:
    """The bound the extraction is compared with: a plain forward+backward (every parameter's
    .grad, the model's own dtype and attention) of full-length random batches, median seconds."""
    import statistics

    import torch

    from benchmarks.bench_extract import random_tokens
    from qkov.workers.losses import CausalLMLoss

    data, task = random_tokens(model.config.vocab_size, batch, seq, device), CausalLMLoss()
    model.train(False)
    frozen = [p for p in model.parameters() if not p.requires_grad]  # (a worker's cached model is frozen)
    model.requires_grad_(True)
    times = []
    try:
        for r in range(repeats + 2):  # two warm-up calls
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.zero_grad(set_to_none=True)
            task.per_sample_loss(model, data).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times.append(time.perf_counter() - t)
    finally:
        model.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(False)
    sec = statistics.median(times)
    return {"s_per_batch": round(sec, 5), "samples_per_s": round(batch / sec, 2), "tokens_per_s": round(batch * seq / sec, 1),
            "note": "plain forward+backward of the same model in this run (every parameter's .grad), median of "
                    f"{repeats} after 2 warm-ups"}


def write_tasks(folder: Path, n: int, seq: int, vocab: int) -> tuple[Path, Path]:
    from qkov.testing import write_task_file

    return (write_task_file(folder / "a.jsonl", n, vocab, seq, seq, 0, "a"),
            write_task_file(folder / "b.jsonl", n, vocab, seq, seq, 1, "b"))


def make_job(model: Path, tasks: tuple[Path, Path], out: Path, layers: list[int], a: argparse.Namespace,
             limit: int | None = None):
    from qkov.pipeline.spec import parse_job

    task = lambda name, p: {"name": name, "path": str(p), **({"limit": limit} if limit else {})}  # noqa: E731
    return parse_job({
        "model": {"path": str(model), "dtype": getattr(a, "model_dtype", "float32"), "attn_implementation": a.attn, "max_length": a.seq},
        "tasks": {"a": task("a", tasks[0]), "b": task("b", tasks[1])},
        "extract": {"batch_size": a.batch, "shard_size": a.shard_size, "device": a.device},
        "score": {"mode": getattr(a, "mode", "exact"), "layers": layers, "storage_dtype": "bfloat16",
                  "keep_pairs": getattr(a, "keep_pairs", "all"), "sketch_dim": getattr(a, "sketch_dim", 4096),
                  **({"scores_dtype": a.scores_dtype} if getattr(a, "mode", "exact") != "answers" else {})},
        "stats": {"n_permutations": a.n_permutations, "n_bootstrap": a.n_bootstrap},
        "cluster": {**({"n_workers": a.workers} if a.workers else {}),
                    **({"threads_per_worker": a.threads} if a.threads else {})},
        "output": {"path": str(out), "keep_gradients": a.keep_gradients == "true",
                   **({"gradients_in": getattr(a, "gradients_in", "auto")} if a.keep_gradients == "false" else {})},
    })


# ---------------------------------------------------------------- disk arithmetic (pure)


def bytes_per_layer(heads: dict[str, int], sizes: dict[str, int], n_a: int, n_b: int, n_heads: int,
                    shard_size: int, storage_bytes: int = 2) -> dict[str, int]:
    """Uncompressed store bytes one scored layer adds, per group (an upper bound: Zarr's
    default zstd only shrinks them). Scores are stored compactly: the pooled N×N matrices once
    per block head (K/V per KV head), float32 (`qkov plan` gives the exact figures)."""
    n = n_a + n_b
    grad_entries = sum(heads[b] * sizes[b] for b in heads)  # one sample, one layer
    return {
        "gradients": n * grad_entries * storage_bytes,
        "_work": math.ceil(n / shard_size) * grad_entries * 4,  # per-shard Fisher partial sums
        "fisher": grad_entries * 4,
        "scores": 2 * sum(heads.values()) * n * n * 4,  # pooled N×N per block head, both scores
    }


def spread(n_layers: int, k: int) -> list[int]:
    """k layers spread evenly over depth, first and last included."""
    k = max(1, min(k, n_layers))
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, k)})


def fit_layers(free: int, per_layer: int, reserve: int, n_layers: int) -> int:
    """Most layers whose store fits in `free` bytes minus `reserve`."""
    return max(0, min(n_layers, (free - reserve) // per_layer))


def score_flops(n: int, heads: dict[str, int], sizes: dict[str, int], n_layers: int) -> int:
    """Matmul FLOPs of the score stage: per unique slice two N×P @ P×N products
    (interference and alignment), 2 FLOPs per multiply-add."""
    return 2 * 2 * n * n * n_layers * sum(heads[b] * sizes[b] for b in heads)


def store_bytes(path: Path) -> dict[str, int]:
    """Bytes on disk under each top-level group of a local run."""
    out: dict[str, int] = {}
    for child in sorted(path.iterdir()):
        files = [child] if child.is_file() else [f for f in child.rglob("*") if f.is_file()]
        out[child.name] = sum(f.stat().st_size for f in files)
    return out


def extrapolate(t: dict[str, float], n_layers_run: int, n_layers_model: int, calib_extract_s: float | None) -> dict:
    """Stage times for every layer of the model, from a run over `n_layers_run` layers.

    Score and stats: linear in the slices. Extraction: fixed (forward/backward to the
    lowest layer) + per layer, from the 1-layer calibration; without one, scaled
    linearly, which overstates it (the fixed part is scaled too)."""
    f = n_layers_model / n_layers_run
    out: dict[str, Any] = {"score_s": t["score"] * f, "stats_s": t["stats"] * f}
    if calib_extract_s is not None and n_layers_run > 1:
        per_layer = max(0.0, (t["extract"] - calib_extract_s) / (n_layers_run - 1))
        fixed = calib_extract_s - per_layer
        out.update(extract_s=fixed + per_layer * n_layers_model, extract_fixed_s=fixed, extract_per_layer_s=per_layer,
                   extract_method="fixed + per-layer, from the 1-layer calibration")
    else:
        out.update(extract_s=t["extract"] * f, extract_method="linear in layers (no calibration; an overestimate)")
    out["score_per_layer_s"] = t["score"] / n_layers_run
    out["stats_per_layer_s"] = t["stats"] / n_layers_run
    out["total_s"] = out["extract_s"] + out["score_s"] + out["stats_s"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


# ---------------------------------------------------------------- bandwidths, measured in the same run


def measure_io(folder: Path, gib: float = 4.0) -> dict:
    """Disk write (fdatasync'd) and cold read of one `gib` file in `folder` (its pages dropped
    from the cache with posix_fadvise after the sync), and pinned host→device copies. GB/s."""
    import torch

    path = folder / "io-probe.bin"
    block = np.random.default_rng(0).integers(0, 255, 64 * 2**20, dtype=np.uint8).tobytes()
    n = max(1, int(gib * GiB) // len(block))
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block)
        os.fdatasync(f.fileno())
    write = n * len(block) / (time.perf_counter() - t)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    while os.read(fd, 16 * 2**20):
        pass
    read = n * len(block) / (time.perf_counter() - t)
    os.close(fd)
    t = time.perf_counter()
    with open(path, "rb") as f:  # now cached
        while f.read(16 * 2**20):
            pass
    cached = n * len(block) / (time.perf_counter() - t)
    path.unlink()
    out = {"disk_write_gb_s": round(write / 1e9, 3), "disk_read_cold_gb_s": round(read / 1e9, 3),
           "page_cache_read_gb_s": round(cached / 1e9, 3), "probe_gib": gib}
    if torch.cuda.is_available():
        x = torch.empty(2**30, dtype=torch.uint8).pin_memory()
        y = torch.empty_like(x, device="cuda")
        y.copy_(x, non_blocking=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            y.copy_(x, non_blocking=True)
        torch.cuda.synchronize()
        out["h2d_pinned_gb_s"] = round(5 * 2**30 / (time.perf_counter() - t) / 1e9, 2)
        del x, y
    return out


# ---------------------------------------------------------------- running


def _log(msg: str) -> None:
    print(f"[bench_e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _worker_device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _load_model_on_worker(model_spec, include_bias: bool, device: str) -> str:
    """Fill the worker's model cache exactly as an extraction task does (qkov.workers.writer)."""
    from qkov.workers.device import resolve_device
    from qkov.workers.writer import worker_model

    dev = resolve_device(device)
    worker_model(model_spec, include_bias, dev)
    return dev


def partial_writer(json_out: str | None, result: dict, t0: float, stage_start: dict):
    """A SIGTERM handler that prints (and writes to json_out) the result so far, marked partial, with
    the seconds after the run's start at which each stage began, then exits with 124 (timeout's code)."""
    def handler(signum, frame) -> None:
        doc = {**result, "partial": True, "stopped_after_s": round(time.perf_counter() - t0, 1),
               "stage_started_after_s": {k: round(v - t0, 1) for k, v in stage_start.items()}}
        text = json.dumps(doc, indent=2, default=str)
        print(text, flush=True)
        if json_out:
            Path(json_out).write_text(text + "\n")
        raise SystemExit(124)
    return handler


def _device_memory() -> dict | None:
    """(on a worker) Its CUDA allocator's record: the peak held, and how often it had to free its
    cache and retry an allocation (each retry synchronises the device: a sign of a full card)."""
    import torch

    if not torch.cuda.is_available():
        return None
    st = torch.cuda.memory_stats()
    return {"peak_allocated_gib": round(st.get("allocated_bytes.all.peak", 0) / 2**30, 2),
            "peak_reserved_gib": round(st.get("reserved_bytes.all.peak", 0) / 2**30, 2),
            "alloc_retries": st.get("num_alloc_retries", 0), "ooms": st.get("num_ooms", 0)}


def _warm_workers(job, client) -> None:
    """Load the model on every worker, so no timed stage pays a worker's cold start."""
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    futures = [client.submit(_load_model_on_worker, job.model, job.score.include_bias, job.extract.device,
                             workers=[w], allow_other_workers=False, pure=False) for w in workers]
    client.gather(futures)


def _extract_only(job, client) -> float:
    """The extract stage alone, through the same executor `run_job` uses; returns seconds."""
    from qkov.pipeline.executors import executor_for
    from qkov.pipeline.extract import run_extract
    from qkov.pipeline.run import prepare_output

    with RunStore.of(job).lock():
        prepare_output(RunStore.of(job), job, resume=False, overwrite=False)
        t = time.perf_counter()
        run_extract(RunStore.of(job), job, executor_for(client))
        return time.perf_counter() - t


def run_benchmark(a: argparse.Namespace) -> dict:
    from qkov.pipeline.cluster import cluster_client
    from qkov.pipeline.extract import plan_extract
    from qkov.pipeline.run import run_job

    t_all = time.perf_counter()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    baseline = {"batch": a.batch, "seq": a.seq} if a.baseline else None
    model = build_model(work / f"model-{a.geometry}", a.geometry, a.model_dtype, baseline)
    tasks = write_tasks(work / "tasks", a.n, a.seq, GEOMETRIES[a.geometry]["vocab_size"])
    n_layers_model = GEOMETRIES[a.geometry]["num_hidden_layers"]
    for stale in ("warmup", "calibration", "run"):  # left by an interrupted attempt
        shutil.rmtree(work / stale, ignore_errors=True)

    # disk arithmetic from the plan of one layer (the slice geometry of every layer)
    one = plan_extract(make_job(model, tasks, work / "run", [0], a))
    per_group = bytes_per_layer(one.heads, one.sizes, one.n_a, one.n_b, one.n_heads, a.shard_size)
    per_layer = sum(per_group.values())
    free = shutil.disk_usage(work).free
    reserve = max(int(a.reserve_gib * GiB), int(0.1 * free))
    fit = fit_layers(free, per_layer, reserve, n_layers_model)
    if a.layers is None and a.keep_gradients == "false":  # layer groups: the disk holds the results, not the gradients
        layers = list(range(n_layers_model))[: a.max_layers or n_layers_model]
    elif a.layers is None:
        k = min(fit, a.max_layers or n_layers_model)
        if k < 1:
            raise SystemExit(f"not even one layer fits: {per_layer / GiB:.2f} GiB per layer, {free / GiB:.1f} GiB free, "
                             f"{reserve / GiB:.1f} GiB reserve")
        layers = spread(n_layers_model, k)
    else:
        layers = sorted(set(a.layers))
        if len(layers) > fit and not a.ignore_disk and a.keep_gradients == "true":
            raise SystemExit(f"{len(layers)} layers need {len(layers) * per_layer / GiB:.1f} GiB; {free / GiB:.1f} GiB free "
                             f"minus {reserve / GiB:.1f} GiB reserve fits {fit}. Give fewer --layers or --ignore-disk.")
    disk = {
        "free_gib": round(free / GiB, 2), "reserve_gib": round(reserve / GiB, 2),
        "per_layer_gib": {g: round(v / GiB, 3) for g, v in per_group.items()},
        "per_layer_total_gib": round(per_layer / GiB, 3), "layers_that_fit": int(fit),
        "run_estimate_gib": round(len(layers) * per_layer / GiB, 2),
        "all_layers_estimate_gib": round(n_layers_model * per_layer / GiB, 2),
        "note": "uncompressed bytes (an upper bound; zstd shrinks them a little); reserve = max(--reserve-gib, 10% of free)",
    }
    _log(f"disk: {per_layer / GiB:.2f} GiB/layer ({', '.join(f'{g} {v / GiB:.2f}' for g, v in per_group.items())}); "
         f"{free / GiB:.1f} GiB free, {reserve / GiB:.1f} reserve -> {fit} of {n_layers_model} layers fit; "
         f"all {n_layers_model} would need {n_layers_model * per_layer / GiB:.1f} GiB. Layers: {layers}")

    job = make_job(model, tasks, work / "run", layers, a)
    result: dict[str, Any] = {"benchmark": "e2e_exact_run", "geometry": a.geometry, "n_per_task": a.n, "seq": a.seq,
                              "layers": layers, "n_layers_model": n_layers_model, "disk": disk}
    from qkov.pipeline.plan import plan as run_plan

    predicted = run_plan(job)
    result["plan"] = {"lines": predicted.lines(), "groups": predicted.groups, "peak_disk": predicted.peak_disk,
                      "layer_groups": predicted.layer_groups, "fits": predicted.fits}
    _log("\n".join(predicted.lines()))
    result["io"] = measure_io(work, a.io_gib)
    _log(f"bandwidths: {result['io']}")
    t = time.perf_counter()
    with cluster_client(job.cluster) as client:  # what `qkov run JOB.toml` does without --scheduler
        result["cluster_start_s"] = round(time.perf_counter() - t, 2)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        result["cluster"] = {"workers": len(workers), "threads": sorted(w["nthreads"] for w in workers.values()),
                             "resources": sorted({json.dumps(w.get("resources", {})) for w in workers.values()})}
        result["device"] = sorted(set(client.run(_worker_device).values()))
        _log(f"cluster up in {result['cluster_start_s']} s: {result['cluster']}, device {result['device']}")

        # model load + CUDA init on every worker (cached there for the timed runs), then one small
        # extraction through the stage's code path (first kernels, store writers)
        t = time.perf_counter()
        warm = make_job(model, tasks, work / "warmup", [layers[0]], a, limit=min(a.n, a.batch))
        _warm_workers(warm, client)
        _extract_only(warm, client)
        result["warmup_s"] = round(time.perf_counter() - t, 2)
        shutil.rmtree(work / "warmup")
        _log(f"warm-up (model load on every worker + a small extraction): {result['warmup_s']} s")

        calib_s = None
        if len(layers) > 1 and not a.no_calibrate and a.keep_gradients == "true":
            cal = make_job(model, tasks, work / "calibration", [layers[0]], a)
            calib_s = _extract_only(cal, client)
            shutil.rmtree(work / "calibration")  # before the main run: its disk is needed
            _log(f"calibration extraction (layer {layers[0]} only): {calib_s:.1f} s")

        stage_start: dict[str, float] = {}
        stage_wall: dict[str, float] = {}  # wall clock of each stage's first tick, for the worker profiles
        if a.profile:
            client.get_task_stream()  # registers the scheduler's task-stream plugin before the run

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in stage_start:
                stage_start[stage] = time.perf_counter()
                stage_wall[stage] = time.time()
                _log(f"{stage} started")

        peak = {"bytes": 0}
        import threading

        stop = threading.Event()

        def watch() -> None:  # peak disk use of the output while it runs
            while not stop.wait(1.0):
                try:
                    peak["bytes"] = max(peak["bytes"], sum(store_bytes(Path(job.output.path)).values()))
                except OSError:
                    pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t = time.perf_counter()
        # stopped by a time limit (`timeout` sends SIGTERM): what was measured still comes out
        previous = signal.signal(signal.SIGTERM, partial_writer(a.json_out, result, t, stage_start))
        try:
            summary = run_job(job, client=client, progress=tick)
        finally:
            signal.signal(signal.SIGTERM, previous)
        total = time.perf_counter() - t
        result["worker_device_memory"] = sorted(client.run(_device_memory).values(), key=str)
        stop.set()
        watcher.join()
        if a.profile:
            bounds = sorted(stage_wall.items(), key=lambda kv: kv[1]) + [("end", time.time())]
            result["profile"] = {st: stage_profile(client, t0, t1) for (st, t0), (_, t1) in zip(bounds, bounds[1:])}
    times = dict(summary.timings)
    try:  # the score stage's own split: pair scores vs the diagnostics pass
        from qkov.pipeline import schema

        prov = RunStore.of(job).group_attrs(schema.SCORES_GROUP)[schema.ATTR_PROVENANCE]
        result["score_parts_s"] = prov.get(schema.ATTR_STAGE_SECONDS)
    except Exception:  # noqa: BLE001 - a layer-grouped run has no single split
        result["score_parts_s"] = None
    if "loop_s" in (summary.extract or {}):  # layer groups: extraction and scoring interleave; their own times
        grouped_s = summary.extract["loop_s"]  # the whole extract → score → drop loop
        times["extract"], times["score"] = summary.extract["extract_s"], summary.extract["score_s"]
        times.pop("drop", None)  # reported below with the loop's other parts
        drop, setup = summary.extract.get("drop_s", 0.0), summary.extract.get("setup_s", 0.0)
        result["gradients_in"] = summary.extract.get("gradients_in")
        result["layer_groups_s"] = {"loop": round(grouped_s, 3), "drop_gradients": round(drop, 3), "setup": round(setup, 3),
                                    "other": round(grouped_s - times["extract"] - times["score"] - drop - setup, 3),
                                    "note": "seconds of the layer-group loop's wall time; extract and score are counted in "
                                            "stage_s; here dropping each group's sub-run (its gradients), creating each sub-run "
                                            "(setup) and the rest"}
    result["peak_store_bytes_sampled_1s"] = peak["bytes"]
    if baseline is not None:  # the extraction's passes against a plain forward+backward of the same samples
        plain_s = a.n * 2 / baseline["samples_per_s"]
        passes = 2 if getattr(a, "mode", "exact") != "exact" else 1
        result["plain_fwd_bwd"] = {**baseline, "for_all_samples_s": round(plain_s, 2),
                                   "extract_over_plain": round(times["extract"] / plain_s, 3),
                                   "extract_passes": passes,
                                   "note": baseline["note"] + "; extract_over_plain: the extract stage's seconds (all its "
                                           "passes, writes included) over one plain forward+backward of every sample"}
    _log("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    parts = (summary.extract or {}).get("seconds")
    if parts:  # the extract stage's parts: each pass's batches, consolidations, writes (summed over shards)
        result["extract_parts_s"] = parts
        _log("extract parts: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))

    plan = plan_extract(job)
    n = plan.n
    flops = score_flops(n, plan.heads, plan.sizes, len(layers))
    result.update({
        "stage_s": {k: round(v, 3) for k, v in times.items()},
        "run_total_s": round(total, 3),
        "calibration_extract_1_layer_s": None if calib_s is None else round(calib_s, 3),
        "samples_per_s": {"extract": round(n / times["extract"], 2), "run": round(n / total, 2)},
        "score": {"flops": flops, "tflops_per_s": round(flops / times["score"] / 1e12, 3),
                  "unique_slices": len(layers) * sum(plan.heads.values()), "pairs_per_slice": n * n,
                  "note": "matmul FLOPs of both scores over the pooled N×N pairs, divided by the whole stage's time "
                          "(store reads, decoding, host-device copies and writes included)"},
        "store_bytes": store_bytes(Path(job.output.path)),
        "io_ratios": io_ratios(result["io"], plan, len(layers), times, a.scores_dtype,
                                getattr(a, "keep_pairs", "all"), pooled_bytes(Path(job.output.path))),
        "extrapolated_to_all_layers": {"n_layers": n_layers_model,
                                       **extrapolate(times, len(layers), n_layers_model, calib_s),
                                       "store_gib": disk["all_layers_estimate_gib"],
                                       "label": "EXTRAPOLATED, not measured"},
        "settings": {"storage_dtype": "bfloat16", "mode": getattr(a, "mode", "exact"), "extract_batch": a.batch, "shard_size": a.shard_size,
                     "attn_implementation": a.attn, "model_dtype": a.model_dtype, "n_permutations": a.n_permutations,
                     "n_bootstrap": a.n_bootstrap, "device_setting": a.device},
        "versions": _versions(),
        "cpu_count": os.cpu_count(),
    })
    if not a.keep:
        shutil.rmtree(work / "run", ignore_errors=True)
    result["benchmark_wall_s"] = round(time.perf_counter() - t_all, 2)
    return result


def pooled_bytes(path: Path) -> int:
    """Bytes on disk of a run's stored pooled score matrices (their chunk files)."""
    root = path / "scores"
    return sum(f.stat().st_size for d in root.glob("pooled_*") for f in d.rglob("*") if f.is_file() and f.name != "zarr.json")


def io_ratios(io: dict, plan, n_layers: int, times: dict, scores_dtype: str, keep_pairs: str = "all",
              scores: int | None = None) -> dict:
    """Bytes each stage moves and its time as a multiple of the I/O bound measured in this run.

    Extraction writes the bf16 gradients; its rate is compared with the disk's write
    bandwidth. The score stage reads them (bound: the cold disk read) and writes the compact
    scores (bound: the disk write; `scores`: the pooled matrices' bytes as stored, measured,
    else the uncompressed full matrices); with reads, copies and writes overlapped its floor
    is the larger of the two, without overlap their sum; both are given."""
    n = plan.n
    grad = n * n_layers * sum(plan.heads[b] * plan.sizes[b] for b in plan.heads) * 2
    if scores is None:
        scores = 2 * n_layers * sum(plan.heads.values()) * n * n * (2 if scores_dtype == "bfloat16" else 4)
    scores *= keep_pairs == "all"  # top/none write no N×N matrices
    before = 2 * 4 * plan.n_heads * (n * n + plan.n_a * plan.n_b) * (2 if scores_dtype == "bfloat16" else 4)
    w, r = io["disk_write_gb_s"] * 1e9, io["disk_read_cold_gb_s"] * 1e9
    h2d = io.get("h2d_pinned_gb_s", float("inf")) * 1e9
    floor_overlap = max(grad / r, scores / w, grad / h2d)
    floor_serial = grad / r + scores / w + grad / h2d
    sig = lambda x: float(f"{x:.3g}")  # noqa: E731 - significant digits: a tiny run's small rates must not round to 0
    return {
        "gradient_bytes": grad, "score_bytes_written": scores,
        "extract_write_gb_s": sig(grad / times["extract"] / 1e9),
        "extract_write_fraction_of_disk_write": sig(grad / times["extract"] / w),
        "score_io_bound_overlapped_s": sig(floor_overlap), "score_io_bound_serial_s": sig(floor_serial),
        "score_time_over_bound_overlapped": sig(times["score"] / floor_overlap),
        "score_time_over_bound_serial": sig(times["score"] / floor_serial),
        "scores_bytes_per_layer": scores // n_layers,
        "scores_bytes_per_layer_before_compact": before,
        "scores_bytes_over_before_compact": round(scores / n_layers / before, 4),
        "note": "bounds from the disk bandwidths and pinned H2D measured in this run (cold read, fdatasync'd write); "
                "*_over_bound and *_over_before_compact: lower is better; *_fraction_of_disk_write: higher is better",
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "dask", "distributed", "zarr", "numpy")}


def stage_profile(client, start: float, stop: float, top: int = 25) -> dict:
    """Where the workers' time went between two wall-clock times: per task prefix the tasks'
    summed compute seconds and their count (the scheduler's task stream), and the top
    functions by samples of distributed's own statistical profiler (self and inclusive)."""
    from dask.utils import key_split

    per: dict[str, list[float]] = {}
    for rec in client.get_task_stream(start=start, stop=stop):
        for ss in rec.get("startstops", ()):
            row = per.setdefault(f"{key_split(rec['key'])}:{ss['action']}", [0.0, 0])
            row[0] += ss["stop"] - ss["start"]
            row[1] += 1
    tree = client.profile(start=start, stop=stop)
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}

    def walk(node: dict, seen: frozenset) -> None:
        d = node.get("description") or {}
        name = f"{Path(str(d.get('filename', '?'))).name}:{d.get('name', '?')}"
        kids = node.get("children", {}).values()
        self_n[name] = self_n.get(name, 0) + node["count"] - sum(k["count"] for k in kids)
        if name not in seen:  # recursion counted once
            incl[name] = incl.get(name, 0) + node["count"]
        for k in kids:
            walk(k, seen | {name})

    walk(tree, frozenset())
    total = max(1, tree.get("count", 1))
    best = lambda d: [(k, round(v / total, 3)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
    return {"note": "task_seconds: {task prefix:action: [seconds summed over its tasks, task count]} (more = more worker "
                    "time); self_share / inclusive_share: the fraction of distributed's profiler samples of the workers' "
                    "threads in that function itself / in it or below (higher = where the stage's time went)",
            "wall_s": round(stop - start, 2),
            "task_seconds": {k: [round(v[0], 2), v[1]] for k, v in sorted(per.items(), key=lambda kv: -kv[1][0])},
            "profile_samples": total, "self_share": best(self_n), "inclusive_share": best(incl)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="samples per task")
    p.add_argument("--seq", type=int, default=256, help="tokens per sample (every sample exactly this long)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to extract and score (score.layers); default: the most that fit the disk")
    p.add_argument("--max-layers", type=int, help="cap on the default layer count")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="smollm2")
    p.add_argument("--batch", type=int, default=16, help="extract.batch_size")
    p.add_argument("--shard-size", type=int, default=128, help="extract.shard_size (samples per store chunk and task)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32", help="[model] dtype")
    p.add_argument("--baseline", action="store_true",
                   help="time a plain forward+backward of the model (batch --batch) in this run, for the ratio")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--n-permutations", type=int, default=999)
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--workers", type=int, help="cluster.n_workers (default: what `qkov run` starts, one per GPU or per core)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="cluster.threads_per_worker (default: every core; `qkov run` defaults to 1 per GPU worker)")
    p.add_argument("--workdir", default="runs/bench-e2e", help="model, task files and the run (on the disk measured)")
    p.add_argument("--reserve-gib", type=float, default=3.0, help="disk kept free beyond the run (at least 10%% of free)")
    p.add_argument("--ignore-disk", action="store_true", help="run the given --layers even if the estimate does not fit")
    p.add_argument("--no-calibrate", action="store_true", help="skip the 1-layer calibration extraction")
    p.add_argument("--keep", action="store_true", help="keep the run's store afterwards")
    p.add_argument("--json-out", help="also write the JSON here")
    p.add_argument("--keep-gradients", choices=["true", "false"], default="true",
                   help="[output] keep_gradients; false: layer groups, and every layer by default")
    p.add_argument("--gradients-in", choices=["auto", "device", "disk"], default="auto",
                   help="[output] gradients_in, with --keep-gradients false (device: the fused path)")
    p.add_argument("--scores-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--sketch-dim", type=int, default=256, help="answers mode with --keep-pairs top: the interference's sketch dimension")
    p.add_argument("--mode", choices=["exact", "answers"], default="exact",
                   help="score.mode (answers: no per-sample gradient or pair score stored; two passes over the model)")
    p.add_argument("--keep-pairs", choices=["all", "top", "none"], default="all",
                   help="score.keep_pairs (top/none: no N×N matrices are written)")
    p.add_argument("--profile", action="store_true",
                   help="record per stage the workers' task seconds and profiler top functions (result['profile'])")
    p.add_argument("--io-gib", type=float, default=4.0, help="size of the disk bandwidth probe file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    result = run_benchmark(a)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
