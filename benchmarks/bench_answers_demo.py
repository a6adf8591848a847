"""The demo job in exact mode and in answers mode (`score.mode = "answers"`), compared.

    python -m benchmarks.bench_answers_demo [--out runs/bench-answers] [--json-out PATH]

Both runs are the built-in demo job (SmolLM2-135M, three tasks of 40, every third layer),
in this process on a local cluster, one after the other: exact mode stores every per-sample
gradient (bf16) and scores every pair; answers mode stores none and makes every answer from
each task's sums and per-sample scalars. Reports, per task pair, whether the three headline
tables name the same slices in the same order and how far their numbers are apart, plus
each store's bytes on disk (and the ratio) and each run's seconds.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tables(run: str, pair: str | None) -> dict:
    from qkov.pipeline.query import headline_tables
    from qkov.pipeline.store import RunStore

    stats = RunStore(run).select(pair).open_stats()
    return {t["key"]: t for t in headline_tables(stats, top=5)}


def _compare(a: dict, b: dict) -> dict:
    """Per table: same slices in the same order, and the largest relative difference of its numbers."""
    out = {}
    for key in a:
        ra, rb = a[key]["rows"], b[key]["rows"]
        name = lambda r: (r.get("block"), r.get("layer"), r.get("head"))  # noqa: E731
        same = [name(r) for r in ra] == [name(r) for r in rb]
        worst = 0.0
        for x, y in zip(ra, rb):
            for k, v in x.items():
                w = y.get(k)
                if isinstance(v, float) and isinstance(w, float) and np.isfinite(v) and np.isfinite(w) and k in (
                        "transfer", "cosine", "sharing", "sharing_ab", "sharing_ba", "mean", "effect", "transfer_p_value"):
                    worst = max(worst, abs(v - w) / max(abs(v), 1e-30))
        out[key] = {"same_slices": same, "rows": len(ra), "n_found": [a[key]["n_found"], b[key]["n_found"]],
                    "max_rel_diff_point_estimates": worst}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench-answers")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    from qkov.pipeline.demo import demo_job
    from qkov.pipeline.run import run_job

    out = Path(args.out)
    runs, secs = {}, {}
    for mode in ("exact", "answers"):
        job = demo_job(out / mode)
        job = job.model_copy(update={"score": job.score.model_validate({**job.score.model_dump(), "mode": mode,
                                                                        **({"keep_pairs": "none"} if mode == "answers" else {})})})
        t = time.perf_counter()
        run_job(job, overwrite=True)
        secs[mode] = round(time.perf_counter() - t, 1)
        runs[mode] = str(out / mode)
    from qkov.pipeline.store import RunStore

    pairs = [",".join(p) for p in RunStore(runs["exact"]).pair_keys()]
    result = {
        "benchmark": "bench_answers_demo",
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "question": "does answers mode (no per-sample gradient stored) give the demo's exact-mode headline tables, "
                    "and how much smaller is its store?",
        "seconds": secs,
        "store_bytes": {m: _size(Path(p)) for m, p in runs.items()},
        "tables": {p: _compare(_tables(runs["exact"], p), _tables(runs["answers"], p)) for p in pairs},
    }
    result["store_ratio_exact_over_answers"] = round(result["store_bytes"]["exact"] / result["store_bytes"]["answers"], 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
