"""Scale-out of the score and stats stages on a LocalCluster of 1, 2 and 4 worker processes.

python -m benchmarks.bench_scaleout [--n 96] [--hidden 256] [--heads 8] [--repeats 2] [--workers 1 2 4]

Extracts one run (a random-init Llama-style model with GQA; n + n samples) in-process,
then, per cluster size, times the score stage (`run_score`: read gradients, per-slice
matmuls, write the pooled matrices) and the stats stage (`run_stats`: permutations,
bootstrap, BH, max-T; write) on a LocalCluster of that many single-threaded worker
processes. One untimed warm-up per cluster (worker imports, first reads); the best of
`--repeats` timed runs is reported (on a shared machine the minimum is the run least
disturbed by others; every run is listed too), with the speed-up over one worker and the
load average. Prints JSON.
"""
from __future__ import annotations

from qkov.pipeline.store import RunStore
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def build_run(tmp: Path, n: int, hidden: int, heads: int, kv_heads: int, layers: int):
    from qkov.pipeline.executors import InlineExecutor
    from qkov.pipeline.extract import run_extract
    from qkov.pipeline.run import prepare_output
    from qkov.testing import tiny_job

    job = tiny_job(tmp, "llama_gqa", n_a=n, n_b=n, min_len=16, max_len=32,
                   model_kwargs={"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                                 "intermediate_size": 2 * hidden, "num_hidden_layers": layers},
                   extract={"shard_size": 32, "batch_size": 16},
                   stats={"n_permutations": 999, "n_bootstrap": 1000})
    prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
    run_extract(RunStore.of(job), job, InlineExecutor())
    return job


def time_stages(job, client, repeats: int) -> dict[str, list[float]]:
    from qkov.pipeline.executors import DaskExecutor
    from qkov.pipeline.score import run_score
    from qkov.pipeline.stats_stage import run_stats

    out: dict[str, list[float]] = {"score": [], "stats": []}
    for r in range(repeats + 1):  # run 0 is the warm-up
        t = time.perf_counter()
        run_score(RunStore.of(job), job, DaskExecutor(client))
        score_t = time.perf_counter() - t
        t = time.perf_counter()
        run_stats(RunStore.of(job), job.stats, DaskExecutor(client), replace=True)
        stats_t = time.perf_counter() - t
        if r:
            out["score"].append(score_t)
            out["stats"].append(stats_t)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96, help="samples per task")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        job = build_run(Path(d), args.n, args.hidden, args.heads, args.kv_heads, args.layers)
        extract_s = time.perf_counter() - t
        for n in args.workers:
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                    Client(cluster) as client:
                la0 = os.getloadavg()[0]
                times = time_stages(job, client, args.repeats)
                results[n] = {stage: float(np.min(v)) for stage, v in times.items()}
                results[n]["all_s"] = {stage: [round(x, 3) for x in v] for stage, v in times.items()}
                results[n]["load_avg_1m"] = [round(la0, 2), round(os.getloadavg()[0], 2)]
    base = results[args.workers[0]]
    head_dim = args.hidden // args.heads
    slices = args.layers * (2 * args.heads + 2 * args.kv_heads)
    report = {
        "benchmark": "scaleout_score_stats_localcluster",
        "machine": {"cpus_usable": cores, "platform": platform.platform(), "python": platform.python_version()},
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "problem": {"samples": 2 * args.n, "slices": slices, "entries_per_slice": head_dim * args.hidden,
                    "n_permutations": 999, "n_bootstrap": 1000, "extract_inline_s": round(extract_s, 2)},
        "workers": {
            str(n): {
                "score_best_s": round(r["score"], 3),
                "stats_best_s": round(r["stats"], 3),
                "score_speedup": round(base["score"] / r["score"], 2),
                "stats_speedup": round(base["stats"] / r["stats"], 2),
                "runs_s": r["all_s"],
                "load_avg_1m_start_end": r["load_avg_1m"],
            }
            for n, r in results.items()
        },
        "note": (f"Each worker is one single-threaded process. This machine has {cores} usable CPU cores, so at most "
                 f"{cores} workers compute at once: more workers than cores cannot add compute, they only time-share "
                 "the same cores and add inter-process transfers and scheduling, so their speed-up is bounded by "
                 f"{cores}x (less when the machine is shared: see the load averages)."),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
