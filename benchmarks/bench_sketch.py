"""Sketch-mode accuracy against exact mode on the real SmolLM2-135M.

    QKOV_CACHE=.cache/qkov python -m benchmarks.bench_sketch [--n 12] [--layers 0 14 29]
        [--dims 1024 4096 16384] [--pipeline-dim 1024] [--global-baseline] [--out DIR]

Runs exact mode once (arithmetic vs python-code built-in tasks), then, for each
sketch_dim k, sketches the run's gradients with qkov.workers.sketch exactly as pass 2 of
a sketch-mode run does (same seeds, same Fisher) and compares every slice's A×B
scores with the exact ones: median relative interference pair error, median
alignment error in units of √(A_ii A_jj) (alignment may be ~0, so a relative error
would be meaningless), and Spearman ρ of the heads ranked by mean score (one entry
per stored (block, layer, head)). `--pipeline-dim k` also runs a real sketch-mode
job at that k and reports how far its stored scores lie from the in-memory ones
(they should agree to float32 rounding). Prints one JSON object.
"""
from __future__ import annotations

from qkov.pipeline.store import RunStore
from qkov.workers.fisher import inverse_damped_fisher
import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from qkov.pipeline import schema

DATA = Path(__file__).resolve().parents[1] / "pipeline" / "data"


def job_for(out: Path, n: int, layers: list[int], **score) -> "JobSpec":  # noqa: F821
    from qkov.pipeline.spec import parse_job

    task = lambda name, file: {"name": name, "path": str(DATA / file), "text_field": "text", "id_field": "id", "limit": n}
    return parse_job({
        "model": {"name": "smollm2-135m", "dtype": "float32", "attn_implementation": "sdpa", "max_length": 96},
        "tasks": {"a": task("arithmetic", "arithmetic.jsonl"), "b": task("python-code", "python_code.jsonl")},
        "fisher": {"source": "pooled", "beta": 0.99, "batch_size": 8, "damping_rel": 1e-6},
        "extract": {"batch_size": 4, "shard_size": 8},
        "score": {"layers": layers, **score},
        "stats": {"n_permutations": 99, "n_bootstrap": 99},
        "output": {"path": str(out)},
    })


def exact_and_sketched(grads, fisher, dims: list[int], seed: int) -> tuple[dict, dict, dict]:
    """Per block: exact (L, H, N, N) interference and alignment in float64, and the same
    from sketches of dimension k for every k in dims (plus the time spent sketching)."""
    
    from qkov.workers.sketch import operands, sketch_block

    layers = tuple(int(x) for x in grads[schema.LAYER].values)
    exact, sk, secs = {}, {k: {} for k in dims}, {k: 0.0 for k in dims}
    for b in [b for b in schema.BLOCKS if b in grads]:
        g = grads[b].values  # (N, L, H, P)
        inv = inverse_damped_fisher(fisher, b).compute()
        gt = torch.as_tensor(g, dtype=torch.float64).permute(1, 2, 0, 3)  # (L, H, N, P)
        u, v, w = operands(gt, torch.as_tensor(inv)[:, :, None, :])
        exact[b] = ((u @ v.transpose(-1, -2)).numpy(), (w @ w.transpose(-1, -2)).numpy())
        for k in dims:
            t = time.perf_counter()
            s = sketch_block(g, inv, b, layers, k, seed)
            secs[k] += time.perf_counter() - t
            su, sv, sw = (torch.as_tensor(s[p], dtype=torch.float64).permute(1, 2, 0, 3) for p in schema.SKETCH_PARTS)
            sk[k][b] = ((su @ sv.transpose(-1, -2)).numpy(), (sw @ sw.transpose(-1, -2)).numpy())
    return exact, sk, secs


def accuracy(exact: dict, approx: dict, n_a: int) -> dict:
    """Errors over every slice's A×B pairs and head-ranking ρ over every stored slice."""
    rel, align_err, means = [], [], {"interference": ([], []), "alignment": ([], [])}
    for b, (m_e, a_e) in exact.items():
        m_s, a_s = approx[b]
        ab = (..., slice(None, n_a), slice(n_a, None))
        rel.append((np.abs(m_s - m_e) / np.abs(m_e))[ab].ravel())
        d = np.sqrt(np.abs(np.einsum("...ii->...i", a_e)))
        align_err.append((np.abs(a_s - a_e) / (d[..., :, None] * d[..., None, :]))[ab].ravel())
        for name, e, s in (("interference", m_e, m_s), ("alignment", a_e, a_s)):
            means[name][0].append(e[ab].mean(axis=(-2, -1)).ravel())
            means[name][1].append(s[ab].mean(axis=(-2, -1)).ravel())
    out = {
        "interference_median_rel_error": float(np.median(np.concatenate(rel))),
        "interference_p90_rel_error": float(np.quantile(np.concatenate(rel), 0.9)),
        "alignment_median_error_vs_sqrt_AiiAjj": float(np.median(np.concatenate(align_err))),
    }
    for name, (e, s) in means.items():
        out[f"{name}_head_rank_spearman"] = float(spearmanr(np.concatenate(e), np.concatenate(s)).statistic)
    return out


@contextlib.contextmanager
def previous_scheme():
    """Projections built inside are the previous scheme's (keyed-hash-v2: one permutation over all
    of a slice's P entries, not per run of k): the run-local scheme's baseline, in accuracy here
    and in the sketch kernel's reads in bench_passes."""
    from unittest import mock

    from qkov.workers import sketch as sk_mod

    whole = sk_mod.inverse_permutation
    with mock.patch.object(sk_mod, "inverse_permutation", lambda size, keys, run=None: whole(size, keys)):
        yield


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12, help="samples per task")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 14, 29])
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--pipeline-dim", type=int, default=1024, help="also run a real sketch-mode job at this k (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--global-baseline", action="store_true",
                    help="also sketch with the previous scheme's projections (one permutation over all P entries)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("QKOV_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "qkov"))

    from qkov.pipeline.run import run_job
    

    tmp = Path(args.out or tempfile.mkdtemp(prefix="bench_sketch_"))
    t = time.perf_counter()
    exact_job = job_for(tmp / "exact", args.n, args.layers)
    run_job(exact_job, overwrite=(tmp / "exact").exists())
    t_exact = time.perf_counter() - t
    grads, fisher = RunStore(str(tmp / "exact")).open_gradients().load(), RunStore(str(tmp / "exact")).open_fisher().load()
    n_a = int(grads.attrs["n_a"])
    exact, sk, secs = exact_and_sketched(grads, fisher, args.dims, args.seed)
    P = {b: int(grads[b].shape[-1]) for b in exact}
    result = {
        "model": "smollm2-135m", "layers": args.layers, "n_a": n_a, "n_b": int(grads.sizes[schema.SAMPLE]) - n_a,
        "entries_per_slice": P, "exact_run_s": round(t_exact, 1), "sketch_seed": args.seed,
        "dims": {str(k): {**accuracy(exact, sk[k], n_a), "sketch_s": round(secs[k], 2),
                          "stored_fraction_of_exact": round(3 * k / float(np.mean(list(P.values()))), 4)}
                 for k in args.dims},
    }
    if args.global_baseline:  # the same sketches on keyed-hash-v2 projections: the run-local scheme's accuracy baseline
        with previous_scheme():
            _, sk_g, secs_g = exact_and_sketched(grads, fisher, args.dims, args.seed)
        result["global_scheme_dims"] = {str(k): {**accuracy(exact, sk_g[k], n_a), "sketch_s": round(secs_g[k], 2)}
                                        for k in args.dims}
    if args.pipeline_dim:
        k = args.pipeline_dim
        t = time.perf_counter()
        job = job_for(tmp / f"sketch{k}", args.n, args.layers, mode="sketch", sketch_dim=k, sketch_seed=args.seed)
        run_job(job, overwrite=(tmp / f"sketch{k}").exists())
        stored = RunStore(str(tmp / f"sketch{k}")).open_scores().load()
        ref = sk[k] if k in sk else exact_and_sketched(grads, fisher, [k], args.seed)[1][k]
        dev = 0.0
        for b, (m, a) in ref.items():
            heads = stored[schema.HEAD].values if schema.head_dim(b) == schema.HEAD else \
                [int(np.flatnonzero(stored[schema.KV_HEAD].values == h)[0]) for h in range(m.shape[1])]
            for name, arr in (("interference", m), ("alignment", a)):
                got = stored[schema.pooled_name(name)].sel(block=b).values[:, heads]
                dev = max(dev, float(np.max(np.abs(got - arr)) / np.max(np.abs(arr))))
        result["pipeline_check"] = {"sketch_dim": k, "run_s": round(time.perf_counter() - t, 1),
                                    "max_deviation_vs_in_memory": dev}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
