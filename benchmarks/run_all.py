"""`make bench`: run every benchmark with its defaults, one after another, and print their JSON.
The GPU benchmarks (score kernel vs peak, the end-to-end 1000 x 1000 run, the 7B sketch run)
run only where CUDA is available; `bench_sketch` needs the real SmolLM2 and runs on its own."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

BENCHMARKS = ("bench_extract", "bench_score", "bench_stats", "bench_scaleout")
GPU_BENCHMARKS = ("bench_gpu_score", "bench_e2e", "bench_sketch7b")


def main() -> int:
    import torch

    failed = []
    names = BENCHMARKS + GPU_BENCHMARKS if torch.cuda.is_available() else BENCHMARKS
    if not torch.cuda.is_available():
        print(f"# {', '.join(GPU_BENCHMARKS)}: need a CUDA device, skipped", flush=True)
    for name in names:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"# {name}: not present, skipped", flush=True)
            continue
        print(f"# {name}", flush=True)
        if subprocess.call([sys.executable, "-m", f"benchmarks.{name}"]) != 0:
            failed.append(name)
    if failed:
        print(f"# failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
