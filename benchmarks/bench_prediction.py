"""The prediction check on the real SmolLM2-135M at the demo's settings, as a results file.

`qkov check` runs the same check (qkov.workers.prediction) on a job's first samples; this script
runs it on the demo job's model, tasks, Fisher and layers (0, 3, …, 27) with short samples,
so that ≥ 50 slices fit a 2-core CPU, and writes benchmarks/results/<date>-prediction.json:
per slice the transfer, the predicted and the measured change of task A's mean loss at η,
η/2 and −η/2, the measured first-order slope, and the acceptance figures (Spearman ρ, median
relative error, first-order error, err(η)/err(η/2) where the O(η²) term is resolved, the
measurement noise).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    from qkov.pipeline.demo import demo_job
    from qkov.workers import prediction as P
    from qkov.workers.layouts import discover_layout
    from qkov.workers.losses import loss_task_for
    from qkov.workers.models import load_model, load_tokenizer
    from qkov.workers.tasks import load_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-samples", type=int, default=3, help="samples per task")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--eta", type=float, default=P.DEFAULT_ETA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    job = demo_job("/tmp/qkov-bench-prediction")
    spec = job.model.model_copy(update={"max_length": args.max_length})
    t0 = time.time()
    model, tok = load_model(spec), load_tokenizer(spec)
    tasks = [load_task(t.model_copy(update={"limit": args.n_samples}), tok, args.max_length, lab)
             for t, lab in ((job.tasks.a, "a"), (job.tasks.b, "b"))]
    ids = [x.input_ids for x in tasks[0] + tasks[1]]
    layout = discover_layout(model).subset(layers=job.score.layers)
    f = job.fisher
    r = P.prediction_check(model, layout, ids, None, len(tasks[0]), loss_task_for(model), fisher_source=f.source,
                           beta=f.beta, fisher_batch=f.batch_size, damping_rel=f.damping_rel, damping_abs=f.damping_abs,
                           n_slices=args.slices, eta=args.eta,
                           progress=lambda k, n: print(f"slice {k}/{n} {time.time() - t0:.0f} s", flush=True))
    print(r.detail())
    result = {
        "benchmark": "prediction-check",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} torch threads, {os.cpu_count()} cores visible, shared)",
        "torch": torch.__version__,
        "model": "smollm2-135m (float32 gradients; float64 measurement)",
        "settings": {**vars(args), "layers": list(layout.layers), "fisher": f.model_dump(),
                     "sample_ids": [x.id for x in tasks[0] + tasks[1]]},
        "passed": r.passed, "rho": r.rho, "median_rel_error": r.median_rel_error,
        "median_rel_error_half_eta": r.median_rel_error_at(1), "halving_ratio": r.halving_ratio,
        "halving_tested": r.halving_tested, "n_resolved": int(r.resolved.sum()),
        "median_first_order_error": r.median_first_order_error,
        "n_above_noise": int(r.above_noise.sum()), "base_loss": r.base_loss, "noise": r.noise,
        "noise_summation_order": r.noise_reorder, "calls_below_float64": r.downcasts,
        "lam_mismatch": r.lam_mismatch, "detail": r.detail(),
        "slices": [{"block": s.block, "layer": s.layer, "head": s.head, "transfer": float(t),
                    "predicted": [float(-e * t) for e in r.etas], "measured": r.measured[k].tolist(),
                    "rel_error": [float(r.rel_error(0)[k]), float(r.rel_error(1)[k])],
                    "slope": float(r.slope[k]), "first_order_error": float(r.first_order_error[k])}
                   for k, (s, t) in enumerate(zip(r.slices, r.transfer))],
        "etas": list(r.etas),
        "seconds": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dt.date.today().isoformat()}-prediction.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
