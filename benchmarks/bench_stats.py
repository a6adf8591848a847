"""Stats stage at SmolLM2-135M geometry: 1000 permutations + 1000 bootstraps over every slice.

python -m benchmarks.bench_stats [--layers 30] [--heads 9] [--kv-heads 3] [--n 256]
                                 [--n-permutations 1000] [--n-bootstrap 1000] [--skip-disk]

Builds a synthetic `scores` group (pooled N×N float32 matrices per (block, layer, head),
N = 2n, K/V identical within a KV group, as the score stage writes them) and times
`run_stats` end to end (read scores, null + bootstrap, BH/max-T, write `stats`) on
(a) an in-memory store (`memory://`) and (b) an on-disk store, with Dask's default
threaded scheduler on this machine's cores. Writing the synthetic store is timed
separately and not counted. Prints JSON.

BLAS runs single-threaded per task (OPENBLAS_NUM_THREADS=1 unless set): Dask's threads
are the parallelism, as on distributed workers (whose nannies set the same); a
multi-threaded BLAS under each of them oversubscribes the cores.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS

import argparse
import json
import platform
import shutil
import tempfile
import time
import warnings

import numpy as np
import xarray as xr


def synthetic_scores(layers: int, heads: int, kv_heads: int, n: int, seed: int = 0) -> xr.Dataset:
    from qkov.pipeline import schema as S
    from qkov.pipeline.schema import IS_A

    N = 2 * n
    kv = np.arange(heads) // (heads // kv_heads)
    rng = np.random.default_rng(seed)
    pooled = {s: np.empty((4, layers, heads, N, N), np.float32) for s in S.SCORES}
    for b, blk in enumerate(S.BLOCKS):
        for l in range(layers):
            for g in range(heads if blk in ("Q", "O") else kv_heads):
                u, v, w = np.abs(rng.normal(size=(3, N, 16))).astype(np.float32)
                w -= w.mean()
                members = [g] if blk in ("Q", "O") else np.flatnonzero(kv == g)
                pooled["interference"][b, l, members] = u @ v.T
                pooled["alignment"][b, l, members] = w @ w.T
    ids = np.array([f"a{i}" for i in range(n)] + [f"b{i}" for i in range(n)], dtype=object)
    p5 = (S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_I, S.SAMPLE_J)
    ab5 = (S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_A, S.SAMPLE_B)
    data = {}
    for s in S.SCORES:
        data[S.pooled_name(s)] = (p5, pooled[s])
        data[s] = (ab5, pooled[s][..., :n, n:])
    return xr.Dataset(
        data,
        coords={
            S.BLOCK: np.array(S.BLOCKS, dtype=object), S.LAYER: np.arange(layers), S.HEAD: np.arange(heads),
            S.KV_HEAD: (S.HEAD, kv), S.SAMPLE_I: ids, S.SAMPLE_J: ids, S.SAMPLE_A: ids[:n], S.SAMPLE_B: ids[n:],
            IS_A: (S.SAMPLE_I, np.arange(N) < n),
        },
        attrs={"n_a": n, "n_b": n, S.ATTR_SCHEMA: S.SCHEMA_VERSION},
    ).chunk({S.BLOCK: 1, S.LAYER: 1, S.HEAD: 1})


def write_store(ds: xr.Dataset, run: str) -> float:
    import zarr

    from qkov.pipeline import schema as S
    from qkov.pipeline.store import zarr_store

    t = time.perf_counter()
    store = zarr_store(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(store, group=S.SCORES_GROUP, mode="w", consolidated=False, zarr_format=3)
    zarr.open_group(store, path=S.SCORES_GROUP, mode="r+").attrs[S.ATTR_COMPLETE] = True
    return time.perf_counter() - t


def timed_stats(run: str, settings) -> tuple[float, object]:
    from qkov.pipeline.stats_stage import run_stats
    from qkov.pipeline.store import RunStore

    t = time.perf_counter()
    out = run_stats(RunStore(run), settings, replace=True)
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> dict:
    from qkov.pipeline.spec import StatsSpec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--n", type=int, default=256, help="samples per task (N = 2n pooled)")
    ap.add_argument("--n-permutations", type=int, default=1000)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--skip-disk", action="store_true")
    args = ap.parse_args(argv)

    settings = StatsSpec(n_permutations=args.n_permutations, n_bootstrap=args.n_bootstrap)
    t = time.perf_counter()
    ds = synthetic_scores(args.layers, args.heads, args.kv_heads, args.n)
    gen_s = time.perf_counter() - t
    family = args.layers * (2 * args.heads + 2 * args.kv_heads)
    result: dict = {
        "benchmark": "stats",
        "geometry": {"layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "blocks": 4},
        "n_per_task": args.n,
        "n_pooled": 2 * args.n,
        "n_permutations": args.n_permutations,
        "n_bootstrap": args.n_bootstrap,
        "family_per_score": family,
        "slices_tested": 2 * family,
        "scores_bytes": int(sum(ds[v].nbytes for v in ds.data_vars)),
        "cpu_count": os.cpu_count(),
        "load_avg_before": os.getloadavg()[0],
        "scheduler": "dask default (threads)",
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
        "generate_s": round(gen_s, 2),
    }

    mem_run = f"memory://qkov-bench-stats-{os.getpid()}"
    result["memory_write_scores_s"] = round(write_store(ds, mem_run), 2)
    secs, out = timed_stats(mem_run, settings)
    result["memory_stats_s"] = round(secs, 2)
    result["n_significant_in_family"] = int(out["significant"].where(out["in_family"], False).sum())
    import fsspec

    fsspec.filesystem("memory").rm(mem_run.removeprefix("memory://"), recursive=True)

    if not args.skip_disk:
        tmp = tempfile.mkdtemp(prefix="qkov-bench-stats-")
        try:
            run = os.path.join(tmp, "run.zarr")
            result["disk_write_scores_s"] = round(write_store(ds, run), 2)
            secs, _ = timed_stats(run, settings)
            result["disk_stats_s"] = round(secs, 2)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    result["load_avg_after"] = os.getloadavg()[0]
    result["slice_tests_per_s"] = round(2 * family / result.get("disk_stats_s", result["memory_stats_s"]), 1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
