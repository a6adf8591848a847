"""Where an answers-mode extraction task spends its time on one device, in one process.

    python -m benchmarks.profile_answers [--geometry smollm2] [--n 1000] [--seq 256]
        [--layers 0 .. 29] [--batch 16] [--keep-pairs none|top] [--sketch-dim 256] [--profile-n 64]
        [--workdir runs/profile-answers]

No cluster: the one task a one-shard answers run sends its worker (`answers_whole`: both
passes) is called directly, as `qkov.workers.writer` runs it, and timed with the device
synchronised; a plain forward+backward of the same model over the same number of samples is
timed in the same process (the bound). With --profile-n, a smaller task of the same shape runs
under torch.profiler: its top operators by device and by host time, the device's busy share of
the wall time, and how often the host waited for the device. Prints the JSON object after each part (and writes it to --json-out), so a time limit keeps what was measured.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _profile(fn, top: int) -> dict:
    """fn under torch.profiler: top operators by self device and self host time, device busy share."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        _sync()
    wall = time.perf_counter() - t0
    ev = prof.key_averages()
    dev = lambda e: getattr(e, "self_device_time_total", 0) or 0  # noqa: E731  (µs)
    rows = lambda key: [{"op": e.key[:60], "calls": e.count, "self_device_ms": round(dev(e) / 1e3, 2),  # noqa: E731
                         "self_host_ms": round(e.self_cpu_time_total / 1e3, 2)}
                        for e in sorted(ev, key=key, reverse=True)[:top]]
    device_busy = sum(dev(e) for e in ev) / 1e6
    syncs = {e.key: e.count for e in ev if any(s in e.key for s in ("Synchronize", "cudaMemcpy", "item", "_local_scalar"))}
    return {"wall_s": round(wall, 3), "device_busy_s": round(device_busy, 3),
            "device_busy_share": round(device_busy / wall, 3) if wall else None,
            "host_waits": syncs, "by_device": rows(dev), "by_host": rows(lambda e: e.self_cpu_time_total)}


def main(argv: list[str] | None = None) -> None:
    import torch

    from benchmarks.bench_e2e import build_model, make_job, plain_fwd_bwd, write_tasks
    from benchmarks.bench_extract import GEOMETRIES
    from qkov.pipeline.extract import plan_extract, shard_tasks
    from qkov.pipeline.store import RunStore
    from qkov.workers import writer

    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="smollm2", choices=sorted(GEOMETRIES))
    p.add_argument("--n", type=int, default=1000, help="samples per task (two tasks)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: every layer")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model-dtype", default="bfloat16")
    p.add_argument("--profile-n", type=int, default=64, help="samples per task of the profiled task (0: none)")
    p.add_argument("--keep-pairs", default="none", choices=["none", "top"],
                   help="top: the interference sketched as well (pass 2 forms and sketches u, v)")
    p.add_argument("--sketch-dim", type=int, default=256)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--workdir", default="runs/profile-answers")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    a.attn, a.device, a.n_permutations, a.n_bootstrap = "sdpa", "auto", 99, 100
    a.workers, a.threads, a.keep_gradients, a.mode = None, None, "true", "answers"
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    g = GEOMETRIES[a.geometry]
    layers = a.layers if a.layers is not None else list(range(g["num_hidden_layers"]))
    model_dir = build_model(work / f"model-{a.geometry}-{a.model_dtype}", a.geometry, a.model_dtype)
    tasks = write_tasks(work / "tasks", a.n, a.seq, g["vocab_size"])

    def whole_task(n: int):
        a.shard_size = 2 * n
        shutil.rmtree(work / "run", ignore_errors=True)
        job = make_job(model_dir, tasks, work / "run", layers, a, limit=n)
        plan = plan_extract(job)
        return shard_tasks(RunStore.of(job), plan, job, [0], "answers_whole")[0]

    out: dict = {"geometry": a.geometry, "n_per_task": a.n, "seq": a.seq, "layers": len(layers), "batch": a.batch,
                 "keep_pairs": a.keep_pairs, **({"sketch_dim": a.sketch_dim} if a.keep_pairs == "top" else {}),
                 "model_dtype": a.model_dtype, "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

    def emit() -> str:  # after each part, so that a time limit keeps what was measured
        text = json.dumps(out, indent=1)
        if a.json_out:
            Path(a.json_out).write_text(text + "\n")
        return text

    small = whole_task(min(a.n, max(a.batch, a.profile_n or a.batch)))
    writer.compute_shard(small)  # warm-up: model load, CUDA init, kernels chosen
    model, _, _ = writer.worker_model(small.model, small.include_bias, writer.resolve_device("auto"))
    device = str(next(model.parameters()).device)
    plain = plain_fwd_bwd(model, a.batch, a.seq, device)
    n_batches = -(-2 * a.n // a.batch)
    out["plain_fwd_bwd"] = {**plain, "all_samples_s": round(plain["s_per_batch"] * n_batches, 3)}
    big = whole_task(a.n)
    passes, peak, parts, retries = {}, {}, {}, {}
    for phase in ("fisher", "answers_whole"):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        _sync()
        t0 = time.perf_counter()
        writer.compute_shard(replace(big, phase=phase), parts.setdefault(phase, {}))
        _sync()
        passes[phase] = round(time.perf_counter() - t0, 3)
        parts[phase] = {k: round(v, 3) for k, v in parts[phase].items()}
        if torch.cuda.is_available():
            peak[phase] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            # each retry freed the allocator's cache and synchronised the device: a sign of a full card
            retries[phase] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - before
        out.update(task_s=passes, task_parts_s=parts, device_peak_allocated_gb=peak, alloc_retries=retries)
        print(emit(), flush=True)
    passes["answers_pass"] = round(passes["answers_whole"] - passes["fisher"], 3)
    out["over_plain"] = {k: round(v / out["plain_fwd_bwd"]["all_samples_s"], 3) for k, v in passes.items()}
    print(emit(), flush=True)
    if a.profile_n:
        prof_task = whole_task(a.profile_n)
        out["profile"] = {"n_per_task": a.profile_n, "fisher": _profile(lambda: writer.compute_shard(replace(prof_task, phase="fisher")), a.top),
                          "answers_whole": _profile(lambda: writer.compute_shard(prof_task), a.top)}
    print(emit(), flush=True)
    shutil.rmtree(work / "run", ignore_errors=True)


if __name__ == "__main__":
    main()
