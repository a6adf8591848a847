"""Where the extract and score stages spend their time, part by part, in one process.

    python -m benchmarks.profile_stages [--n 512] [--seq 256] [--layers 0 1 2 3] [--workdir runs/profile]

No cluster: the stage functions a worker runs are called directly and timed with the
device synchronised, so each figure is one part's own cost (compute, device→host,
Zarr encode + write, read + decode, kernel, score write). cProfile's top entries for the
write and read paths are printed too. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _top(prof: cProfile.Profile, n: int = 12) -> list[str]:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(n)
    return [ln for ln in s.getvalue().splitlines() if ln.strip()][-n:]


def main() -> None:
    from benchmarks.bench_e2e import build_model, make_job, write_tasks
    from benchmarks.bench_extract import GEOMETRIES
    from qkov.pipeline import schema
    from qkov.pipeline.extract import plan_extract, shard_tasks, write_template
    from qkov.pipeline.store import RunStore
    from qkov.workers import writer

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--geometry", default="smollm2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--workdir", default="runs/profile")
    a = p.parse_args()
    a.attn, a.device, a.scores_dtype, a.n_permutations, a.n_bootstrap = "sdpa", "auto", "float32", 99, 100
    a.workers, a.threads, a.keep_gradients = None, None, "true"
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work / f"model-{a.geometry}", a.geometry)
    tasks = write_tasks(work / "tasks", a.n, a.seq, GEOMETRIES[a.geometry]["vocab_size"])
    shutil.rmtree(work / "run", ignore_errors=True)
    job = make_job(model, tasks, work / "run", a.layers, a)
    store = RunStore.of(job)
    plan = plan_extract(job)
    store.create_run(job.config_dict(), job.config_hash())
    write_template(store, plan, job)
    todo = shard_tasks(store, plan, job, list(range(len(plan.shards))), "exact")
    out: dict = {"n": plan.n, "layers": a.layers, "shards": len(todo)}

    # extraction: compute (device) and write (host) of each shard, separately
    writer.compute_shard(todo[0])  # warm-up: model load, CUDA init
    comp, wr, nbytes = [], [], 0
    prof = cProfile.Profile()
    for k, t in enumerate(todo):
        _sync()
        t0 = time.perf_counter()
        c = writer.compute_shard(t)
        _sync()
        comp.append(time.perf_counter() - t0)
        nbytes += sum(x.nbytes for x in c[0].values())
        t0 = time.perf_counter()
        if k == 1:
            prof.enable()
        writer.write_shard(t, c)
        if k == 1:
            prof.disable()
        wr.append(time.perf_counter() - t0)
    out["extract"] = {"compute_s": [round(x, 3) for x in comp], "write_s": [round(x, 3) for x in wr],
                      "gradient_bytes": nbytes, "write_gb_s": round(nbytes / sum(wr) / 1e9, 3),
                      "compute_samples_per_s": round(plan.n / sum(comp), 1), "write_profile": _top(prof, 25)}
    print(json.dumps(out["extract"], indent=1), file=sys.stderr, flush=True)
    from qkov.pipeline.extract import consolidate_fisher

    whash = writer.worker_model(job.model, job.score.include_bias, "cuda" if _cuda() else "cpu")[2]
    consolidate_fisher(store, plan, job, whash)
    root = store.root("r+")
    root[schema.GRADIENTS].attrs[schema.ATTR_WEIGHTS_HASH] = whash
    store.mark_complete(schema.GRADIENTS)

    # score: read one head slice (all samples) as the stage's readers do, kernel, write — each timed
    import torch

    from qkov.workers.fisher import inverse_damped_fisher
    from qkov.workers.kernels import pair_kernel

    grads = store.open_gradients(decode=False)
    fisher = store.open_fisher()
    var = grads["Q"]
    inv = np.asarray(inverse_damped_fisher(fisher, "Q"))
    reads, kern = [], []
    prof = cProfile.Profile()
    for h in range(3):
        t0 = time.perf_counter()
        if h == 1:
            prof.enable()
        x = var.isel(layer=0, head=h).values  # (N, P) uint16
        if h == 1:
            prof.disable()
        reads.append(time.perf_counter() - t0)
        xi = x[None, None]
        t0 = time.perf_counter()
        r = pair_kernel(xi, xi, inv[0:1, h:h + 1], device="auto", encoding="bfloat16")
        _sync()
        kern.append(time.perf_counter() - t0)
    out["score"] = {"slice_bytes": int(x.nbytes), "read_s": [round(v, 3) for v in reads],
                    "read_gb_s": round(x.nbytes / min(reads) / 1e9, 3),
                    "kernel_s": [round(v, 3) for v in kern], "out_bytes": int(r.nbytes), "read_profile": _top(prof, 25)}
    z_in = store.root()[schema.GRADIENTS]["Q"]  # the same slices through zarr's own reader
    through_zarr = []
    for h in range(3):
        t0 = time.perf_counter()
        z_in[:, 0, h]
        through_zarr.append(time.perf_counter() - t0)
    out["score"]["read_zarr_s"] = [round(v, 3) for v in through_zarr]
    # one slice's two N×N float32 chunks written by zarr, and by DirectChunks as the stage does
    from qkov.pipeline.extract import checksummed

    probe = store.root("r+").require_group("probe")  # inside the run, which is removed below
    for name in ("zarr", "direct"):
        z = probe.create_array(name, shape=(2, plan.n, plan.n), chunks=(1, plan.n, plan.n), dtype="float32",
                               compressors=checksummed())
        target = z if name == "zarr" else store.direct_chunks("probe")[name]
        t0 = time.perf_counter()
        target[:] = r[:, 0, 0]
        dt = time.perf_counter() - t0
        out["score"][f"write_{name}_s"], out["score"][f"write_{name}_gb_s"] = round(dt, 3), round(r.nbytes / dt / 1e9, 3)
    # the pieces of the kernel: host→device, compute, device→host
    if _cuda():
        t0 = time.perf_counter()
        d = torch.from_numpy(x.view(np.int16)).to("cuda")
        _sync()
        h2d = time.perf_counter() - t0
        pin = torch.from_numpy(x.view(np.int16)).pin_memory()
        t0 = time.perf_counter()
        d = pin.to("cuda", non_blocking=True)
        _sync()
        out["score"].update(h2d_pageable_s=round(h2d, 4), h2d_pinned_s=round(time.perf_counter() - t0, 4))
        from qkov.workers.kernels import device_scores

        a_ = d.view(torch.bfloat16)[None]
        sw = torch.as_tensor(inv[0, 0:1], device="cuda").sqrt().to(torch.bfloat16)
        device_scores(a_, a_, sw, torch.float32)
        _sync()
        t0 = time.perf_counter()
        o = device_scores(a_, a_, sw, torch.float32)
        _sync()
        out["score"]["device_compute_s"] = round(time.perf_counter() - t0, 4)
        t0 = time.perf_counter()
        o.cpu()
        out["score"]["d2h_pageable_s"] = round(time.perf_counter() - t0, 4)
    print(json.dumps(out, indent=1))
    shutil.rmtree(work / "run", ignore_errors=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
