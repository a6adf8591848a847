"""Where a fused-path score task spends its time on one GPU, without a cluster or a model.

    python -m benchmarks.profile_fused_score [--n 1000] [--layers 2] [--threads 1 4 16]
        [--profile-tasks 6] [--n-permutations 999] [--n-bootstrap 1000] [--json-out F]

Random bf16 gradients of SmolLM2-135M slice geometry (Q/O 9 heads, K/V 3, P = 64·576) for
`--layers` layers and 2·n samples are deposited in this process's resident store in shards
of 500, as a fused extraction leaves them (`qkov.workers.resident`); then the score stage's
own task function (`qkov.pipeline.score_graph._pair_task`: both N×N scores of one slice,
its diagnostics' parts and stats sums, the alignment folded, all copied to the host) runs
  * once per slice on 1, 4, ... threads at a time (as a worker's threads run them): slices/s;
  * on a few slices under torch.profiler: top operators by device time, the device's busy
    share of the wall time, host waits;
  * its parts alone, timed with the device synchronised: the two score GEMMs, the stats sums,
    the diagnostics' parts and the copies of the scores to the host (pageable, as the task
    does, and into pinned memory, the copy bound);
and a large bf16 matmul's rate and the pinned device→host bandwidth, measured in the same
run. Prints one JSON object (also written after each part to --json-out).
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

HEADS = {"Q": 9, "K": 3, "V": 3, "O": 9}
P = 64 * 576


def main() -> None:
    from benchmarks.bench_extract import median_seconds
    from benchmarks.profile_answers import _profile, _sync
    from qkov.pipeline.score_graph import _pair_task
    from qkov.pipeline.slice_reductions import other_weights, stats_weights
    from qkov.workers import resident
    from qkov.workers.kernels import device_scores
    from qkov.workers.reductions import side_parts, tile_sums
    from qkov.workers.resident import ResidentRows

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="samples per task (two tasks)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--profile-tasks", type=int, default=6)
    ap.add_argument("--n-permutations", type=int, default=999)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--write-dir", default=None,
                    help="also time every slice with its scores written into the run's chunk format here (a scratch folder)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def timed(fn) -> float:  # median of 3 after a warm-up, the device synchronised
        return median_seconds(fn, 3, 1, dev)
    n, n_a = 2 * a.n, a.n
    out: dict = {"n_per_task": a.n, "layers": a.layers, "heads": HEADS, "P": P, "device":
                 torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                 "stats": {"n_permutations": a.n_permutations, "n_bootstrap": a.n_bootstrap}}

    def emit():
        text = json.dumps(out, indent=1)
        if a.json_out:
            Path(a.json_out).write_text(text + "\n")
        return text

    key, gen = "profile-fused-score", torch.Generator(device=dev).manual_seed(0)
    for start in range(0, n, 500):
        m = min(500, n - start)
        resident.deposit(key, start, {b: (torch.randn((a.layers, h, m, P), generator=gen, device=dev) * 1e-3).to(torch.bfloat16)
                                      for b, h in HEADS.items()})
    readers = {b: ResidentRows(key, b, (n, a.layers, h, P), "<u2") for b, h in HEADS.items()}
    inv = {b: np.random.default_rng(1).uniform(0.5, 2.0, (a.layers, h, P)).astype(np.float32) for b, h in HEADS.items()}
    rows = np.arange(n)
    stats_args = (a.n_permutations, a.n_bootstrap, 0)
    slices = [(b, layer, h) for layer in range(a.layers) for b, nh in HEADS.items() for h in range(nh)]

    def task(s, **kw):
        b, layer, h = s
        return _pair_task(np.array([layer]), np.array([h]), inv[b][layer : layer + 1, h : h + 1], rows, rows, rows, rows,
                          n=n, n_a=n_a, stats_args=stats_args, reader=readers[b], accumulate="auto", device="auto",
                          encoding="bfloat16", **kw)

    task(slices[0])  # warm-up: weights cached, kernels chosen
    _sync()
    # the bounds, in this run
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    mm_s = timed(lambda: x @ x)
    out["bounds"] = {"matmul_tflops": round(2 * 8192**3 / mm_s / 1e12, 1)}
    flops = 2 * 2 * n * n * P  # both scores of one slice
    if dev == "cuda":
        src = torch.empty(n * n * 3 // 2, device=dev)  # a slice's interference plus folded alignment, float32
        pinned = torch.empty(src.shape, pin_memory=True)
        out["bounds"]["d2h_pinned_gb_s"] = round(src.numel() * 4 / timed(lambda: pinned.copy_(src, non_blocking=True)) / 1e9, 1)
        out["bounds"]["d2h_pageable_gb_s"] = round(src.numel() * 4 / timed(lambda: src.cpu()) / 1e9, 1)
        del src, pinned
    out["slice"] = {"score_flops": flops, "bytes_to_host": n * n * 4 * 3 // 2}
    print(emit(), flush=True)

    # the task's parts alone, one Q slice
    b, layer, h = slices[0]
    g = readers[b].rows_on_device(layer, [h], rows, dev).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    sw = torch.as_tensor(inv[b][layer, h : h + 1], device=dev).sqrt().to(g.dtype)
    scores = device_scores(g, g, sw, torch.float32)
    weights = stats_weights((np.arange(n) < n_a).tobytes(), *stats_args)
    other = other_weights(np.arange(n) < n_a)
    parts = {"scores_gemms": lambda: device_scores(g, g, sw, torch.float32),
             "stats_sums": lambda: tile_sums(scores, weights, n_a, 0, 0),
             "diagnostics_parts": lambda: side_parts(g, scores, other, 0, 0),
             "scores_to_host_pageable": lambda: (scores[0].cpu(), scores[1].cpu())}
    out["parts_s"] = {k: round(timed(f), 5) for k, f in parts.items()}
    out["parts_s"]["whole_task"] = round(timed(lambda: task(slices[0])), 5)
    out["parts_s"]["scores_gemm_tflops"] = round(flops / out["parts_s"]["scores_gemms"] / 1e12, 1)
    del g, scores
    print(emit(), flush=True)

    # every slice, on T threads at a time
    out["threads"] = {}
    for t in a.threads:
        wall = _on_threads(task, slices, t)
        out["threads"][str(t)] = {"wall_s": round(wall, 3), "s_per_slice": round(wall / len(slices), 5),
                                  "score_tflops": round(flops * len(slices) / wall / 1e12, 1)}
        print(emit(), flush=True)
    if a.write_dir:  # with the writes, as a run makes them: after the task from its returned (pageable) arrays, or in it
        out["threads_with_writes"] = _with_writes(a, task, slices, n, emit, out)
    if a.profile_tasks:
        some = slices[: a.profile_tasks]
        out["profile"] = _profile(lambda: [task(s) for s in some], a.top)
        out["profile"]["tasks"] = len(some)
    resident.release(key)
    print(emit(), flush=True)


def _on_threads(fn, slices, threads: int) -> float:
    """Seconds to run fn on every slice, `threads` at a time (as a worker's threads run them),
    the device synchronised before and after."""
    from benchmarks.profile_answers import _sync

    _sync()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, slices))
    _sync()
    return time.perf_counter() - t0


def _with_writes(a, task, slices, n: int, emit, out) -> dict:
    """Every slice on T threads, each slice's two scores written whole into chunk files (blosc +
    crc32c, as a run stores them): "after" = the task returns its scores (pageable host arrays)
    and the same thread writes them, as the run's store tasks do; "in_task" = the task writes
    them itself from its reused pinned buffers (`write_to`)."""
    import shutil

    import zarr

    from qkov.pipeline import schema
    from qkov.pipeline.store.chunks import DirectChunks, checksummed

    folder = Path(a.write_dir)
    shutil.rmtree(folder, ignore_errors=True)
    root = zarr.open_group(str(folder), mode="w", zarr_format=3)
    n_l, n_h = a.layers, max(HEADS.values())
    targets = {}
    for name, shape in (("inter", (n, n)), ("align", schema.folded_shape(n))):
        arr = root.create_array(name, shape=(n_l, n_h, *shape), chunks=(1, 1, *shape), dtype="float32",
                                compressors=checksummed(True))
        targets[name] = DirectChunks.of(arr, str(folder / name))
    res: dict = {}
    for t in a.threads:
        for how in ("after", "in_task"):
            def one(s, how=how):
                b, layer, h = s
                if how == "in_task":
                    return task(s, write_to=(targets["inter"], targets["align"], layer, None))
                parts = task(s)
                targets["inter"].write((layer, h, 0, 0), parts.interference[:, :1])
                targets["align"].write((layer, h, 0, 0), parts.alignment[:, :1])
                return None

            wall = _on_threads(one, slices, t)
            res[f"{how}_{t}"] = {"wall_s": round(wall, 3), "s_per_slice": round(wall / len(slices), 5)}
            out["threads_with_writes"] = res
            print(emit(), flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
