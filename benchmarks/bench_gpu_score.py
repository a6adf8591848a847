"""Score-kernel throughput on a GPU vs the GPU's measured bf16 matmul peak.

python -m benchmarks.bench_gpu_score [--n 1024] [--slices 24] [--repeats 5]

In-memory operands with SmolLM2-135M slice geometry (P = 64·576 = 36864 entries per
head slice), N pooled samples, `--slices` (layer, head) slices: the stage's own
kernel (`pipeline.score.pair_kernel`: both scores per slice, float32 accumulation,
TF32 off), and the same formulas with TF32 and with bf16 operands, each as TFLOP/s
and as a fraction of a large bf16 matmul's measured rate. Prints JSON with medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def bf16_peak(repeats: int) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, repeats)
    return 2 * 8192**3 / t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--p", type=int, default=36864)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from pipeline.score import slice_scores

    torch.manual_seed(0)
    g = torch.randn(args.slices, args.n, args.p, device="cuda") * 1e-3
    inv = torch.rand(args.slices, args.p, device="cuda") + 0.5
    flops = 2 * 2 * args.n * args.n * args.p * args.slices  # two N×P @ P×N matmuls per slice
    peak = bf16_peak(args.repeats)

    def run(dtype, tf32: bool):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        gg, ii = g.to(dtype), inv.to(dtype)

        def go():
            for s in range(args.slices):
                slice_scores(gg[s], gg[s], ii[s])
        return timed(go, args.repeats)

    res = {}
    for name, dtype, tf32 in (("float32_exact", torch.float32, False), ("tf32", torch.float32, True), ("bf16_operands", torch.bfloat16, False)):
        t = run(dtype, tf32)
        res[name] = {"seconds_median": round(t, 5), "tflops": round(flops / t / 1e12, 2), "fraction_of_bf16_peak": round(flops / t / peak, 3)}
    # the stage kernel itself, numpy in/out per (layer, head) task as Dask calls it
    from pipeline.score import pair_kernel

    gn, invn = g[0].cpu().numpy()[None, None], inv[0].cpu().numpy()[None, None]
    t_task = timed(lambda: pair_kernel(gn, gn, invn, "float32", "cuda"), args.repeats)
    torch.backends.cuda.matmul.allow_tf32 = False
    print(json.dumps({
        "benchmark": "gpu_score_kernel",
        "device": torch.cuda.get_device_name(),
        "n_samples": args.n, "param_per_slice": args.p, "slices": args.slices, "repeats": args.repeats,
        "bf16_matmul_peak_tflops": round(peak / 1e12, 1),
        "in_memory": res,
        "stage_task_with_host_transfers": {"seconds_median": round(t_task, 4),
                                           "tflops": round(2 * 2 * args.n**2 * args.p / t_task / 1e12, 2)},
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
