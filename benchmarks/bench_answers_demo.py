"""The demo job in exact mode and in answers mode (`score.mode = "answers"`), compared.

    python -m benchmarks.bench_answers_demo [--out runs/bench-answers] [--json-out PATH] [--sketch-dim 256] [--reuse]

Both runs are the built-in demo job (SmolLM2-135M, three tasks of 40, every third layer),
in this process on a local cluster, one after the other: exact mode stores every per-sample
gradient (bf16) and scores every pair; answers mode stores none and makes every answer from
each task's sums and per-sample scalars; "answers-top" also sketches the interference's
operands (k = --sketch-dim) for its labels test and top pairs. Reports, per task pair, whether the three headline
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


def _p_agreement(exact: str, other: str, pairs: list[str]) -> dict:
    """The interference labels test of `other` against exact mode's, over every family slice of every pair:
    Spearman ρ of the p-values, and how many slices both / only one call significant."""
    from scipy.stats import spearmanr

    from qkov.pipeline.store import RunStore

    pa, pb, sa, sb = [], [], [], []
    for pair in pairs:
        a, b = (RunStore(r).select(pair).open_stats().sel(score="interference") for r in (exact, other))
        fam = a["in_family"].broadcast_like(a["mean"]).values
        pa += list(a["p_value"].values[fam]); pb += list(b["p_value"].values[fam])
        sa += list(a["significant"].values[fam]); sb += list(b["significant"].values[fam])
    sa, sb = np.asarray(sa, bool), np.asarray(sb, bool)
    return {"spearman_rho": round(float(spearmanr(pa, pb).statistic), 4), "slices": len(pa),
            "significant_both": int((sa & sb).sum()), "only_exact": int((sa & ~sb).sum()), "only_this": int((~sa & sb).sum())}


def _sketch_head_rho(exact: str, other: str, pairs: list[str]) -> dict | None:
    """Where `other` sketched the interference: Spearman ρ over the family slices between the
    sketched A×B mean (what its labels test permutes) and the exact one, per pair."""
    from scipy.stats import spearmanr

    from qkov.pipeline import schema
    from qkov.pipeline.store import RunStore

    out = {}
    for pair in pairs:
        scores = RunStore(other).select(pair).open_scores()
        if schema.stat_sums_name("interference") not in scores:
            return None
        sketched = scores[schema.stat_sums_name("interference")].isel({schema.STAT: 0}).values
        want = RunStore(exact).select(pair).open_stats().sel(score="interference")
        fam = want["in_family"].broadcast_like(want["mean"]).values
        out[pair] = round(float(spearmanr(sketched[fam], want["mean"].values[fam]).statistic), 5)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench-answers")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--sketch-dim", type=int, default=256,
                    help="answers-top: the interference's sketch dimension (its labels test and top pairs)")
    ap.add_argument("--reuse", action="store_true", help="keep a mode's finished run from an earlier call (no time)")
    args = ap.parse_args(argv)
    from qkov.pipeline.demo import demo_job
    from qkov.pipeline.run import run_job
    from qkov.pipeline.store import RunStore

    out = Path(args.out)
    runs, secs = {}, {}
    modes = {"exact": {"mode": "exact"}, "answers": {"mode": "answers", "keep_pairs": "none"},
             "answers-top": {"mode": "answers", "keep_pairs": "top", "sketch_dim": args.sketch_dim}}
    for name, score in modes.items():
        job = demo_job(out / name)
        job = job.model_copy(update={"score": job.score.model_validate({**job.score.model_dump(), **score})})
        runs[name] = str(out / name)
        if args.reuse and RunStore(runs[name]).exists() and all(p.is_complete("stats") for p in RunStore(runs[name]).pair_runs()):
            secs[name] = None
            continue
        t = time.perf_counter()
        run_job(job, overwrite=True)
        secs[name] = round(time.perf_counter() - t, 1)

    pairs = [",".join(p) for p in RunStore(runs["exact"]).pair_keys()]
    result = {
        "benchmark": "bench_answers_demo",
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "question": "does answers mode (no per-sample gradient stored) give the demo's exact-mode headline tables, "
                    "and how much smaller is its store?",
        "seconds": secs,
        "modes": modes,
        "store_bytes": {m: _size(Path(p)) for m, p in runs.items()},
        "tables": {m: {p: _compare(_tables(runs["exact"], p), _tables(runs[m], p)) for p in pairs}
                   for m in modes if m != "exact"},
        "interference_labels_p_value_vs_exact": {m: _p_agreement(runs["exact"], runs[m], pairs) for m in modes if m != "exact"},
        "sketched_interference_mean_vs_exact_spearman": {m: _sketch_head_rho(runs["exact"], runs[m], pairs)
                                                         for m in modes if m != "exact"},
    }
    result["store_ratio_exact_over"] = {m: round(result["store_bytes"]["exact"] / result["store_bytes"][m], 1)
                                        for m in modes if m != "exact"}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
