"""Score-kernel throughput on a GPU vs the GPU's measured bf16 matmul peak and a per-pair loop.

python -m benchmarks.bench_gpu_score [--n 1024 2048] [--heads 9] [--layers 4] [--repeats 5]

In-memory operands with SmolLM2-135M slice geometry (P = 64·576 = 36864 entries per head
slice), N pooled samples, `--layers` × `--heads` slices, each layer's heads batched into
one call as one score task gets them. Runs the stage's own device code
(`qkov.pipeline.score.device_scores`: both scores per slice) with
  * float32 operands and accumulation, TF32 off (exact mode with float32 storage),
  * bf16 operands, float32 accumulation (what the stage does on a GPU when gradients
    are stored as bf16),
each as TFLOP/s and as a fraction of a large bf16 matmul's rate measured in the same run;
the full stage task (`pair_kernel`: bf16 bits from host memory, transfer, scores back to
host); and the research code's loop over (pair, layer, head) on the same GPU-resident
operands, timed on a subset of pairs and extrapolated (said in the output).
Prints JSON with medians.
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
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--p", type=int, default=36864)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-pairs", type=int, default=200)
    args = ap.parse_args()
    from qkov.workers.kernels import device_scores, pair_kernel
    from qkov.workers.grads import has_bmm_out_dtype

    torch.backends.cuda.matmul.allow_tf32 = False
    peak = bf16_peak(args.repeats)
    slices = args.heads * args.layers
    results = []
    for n in args.n:
        torch.manual_seed(0)
        g = (torch.randn(args.layers, args.heads, n, args.p, device="cuda") * 1e-3).to(torch.bfloat16)
        sw = (torch.rand(args.layers, args.heads, args.p, device="cuda") + 0.5).rsqrt()
        flops = 2 * 2 * n * n * args.p * slices  # two N×P @ P×N matmuls per slice
        res = {"n_samples": n, "slices": slices, "flop_per_run": flops}
        for name, dt in (("float32_exact", torch.float32), ("bf16_operands", torch.bfloat16)):
            if dt == torch.bfloat16 and not has_bmm_out_dtype(torch.device("cuda")):
                res[name] = "torch.mm(out_dtype=float32) unsupported by this torch: the stage uses float32 operands"
                continue
            gg, ss = g.to(dt), sw.to(dt)
            t = timed(lambda: [device_scores(gg[l], gg[l], ss[l], torch.float32) for l in range(args.layers)], args.repeats)
            res[name] = {"seconds_median": round(t, 5), "tflops": round(flops / t / 1e12, 1),
                         "fraction_of_bf16_peak": round(flops / t / peak, 3)}
            del gg, ss
        # one stage task as Dask runs it: bf16 bits in host memory → device → scores on the host
        bits = g[0].view(torch.int16).cpu().numpy().view(np.uint16)[None]
        inv = (sw[0].double() ** -2).cpu().numpy()[None]
        t_task = timed(lambda: pair_kernel(bits, bits, inv, "auto", "cuda", encoding="bfloat16"), args.repeats)
        res["stage_task_with_host_transfers"] = {"seconds_median": round(t_task, 4),
                                                 "tflops": round(flops / args.layers / t_task / 1e12, 1)}
        # the research code's loop: per pair, per slice, two dot products (float32, on the GPU)
        g32, sw32 = g.float(), sw.float()
        rng = np.random.default_rng(0)
        pairs = [(int(rng.integers(n)), int(rng.integers(n))) for _ in range(args.loop_pairs)]

        def loop():
            acc = torch.zeros((), device="cuda")
            for i, j in pairs:
                for l in range(args.layers):
                    for h in range(args.heads):
                        wi, wj = g32[l, h, i] * sw32[l, h], g32[l, h, j] * sw32[l, h]
                        acc += torch.dot(wi * wi, g32[l, h, j].abs()) + torch.dot(wi, wj)
            return acc.item()

        t_loop = timed(loop, 1) / len(pairs) * n * n
        best = min(v["seconds_median"] for v in res.values() if isinstance(v, dict) and "tflops" in v and "fraction_of_bf16_peak" in v)
        res["loop_seconds_extrapolated"] = round(t_loop, 1)
        res["speedup_vs_loop"] = round(t_loop / best, 0)
        results.append(res)
        del g, sw, g32, sw32
        torch.cuda.empty_cache()
    print(json.dumps({
        "benchmark": "gpu_score_kernel",
        "device": torch.cuda.get_device_name(),
        "param_per_slice": args.p, "heads_per_call": args.heads, "layers": args.layers, "repeats": args.repeats,
        "bf16_matmul_peak_tflops": round(peak / 1e12, 1),
        "results": results,
        "note": (f"loop timed on {args.loop_pairs} random pairs and extrapolated to N*N; speedup uses the faster "
                 "in-memory kernel; TF32 off throughout"),
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
