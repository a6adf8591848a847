"""`make bench`: run every benchmark with its defaults, one after another, and print their JSON."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

BENCHMARKS = ("bench_extract", "bench_score", "bench_stats", "bench_scaleout")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
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
