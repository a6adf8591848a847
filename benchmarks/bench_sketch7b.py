"""Sketch mode on a Llama-2-7B-geometry model: time per stage, store size, peak memory.

    python -m benchmarks.bench_sketch7b [--workdir DIR] [--out FILE.json]
        [--layers 32 --hidden 4096 --heads 32 --intermediate 11008 --vocab 32000]
        [--n 256 --seq 256] [--batch 8] [--sketch-dim 1024] [--storage-dtype bfloat16]
        [--n-permutations 1000 --n-bootstrap 1000] [--keep-model] [--no-shrink] [--estimate-only]

Builds a randomly initialised LlamaConfig model (bf16; on the GPU when there is one,
so the 7B init takes seconds), saves it as a local HF folder, writes n + n random
`input_ids` task files of exactly `seq` tokens, then runs the real pipeline stages
in-process, as `qkov run --inline` does (extract: Fisher pass, consolidation, sketch
pass; score; stats), and prints one JSON object: seconds per stage, bytes on disk
per store group, peak GPU memory per pass, samples/s, the settings, and the
memory/disk estimate it checked before starting. The JSON is also written to --out
after every stage, so a run cut off by a time limit still reports what it finished.
It checks the free disk, GPU and the arithmetic first (printed as `estimate_gib`); when
the store would not fit the disk it halves --sketch-dim (and says so) unless --no-shrink.
Llama-2-7B geometry, 256 + 256 samples, k = 1024, bfloat16 sketches: ~41 GiB of disk at
peak (model 12.6, Fisher partials 8, Fisher 8, sketches 12; the model folder is deleted
before the 10 GiB of scores are written), ~51 / ~61 GiB of GPU memory in the Fisher /
sketch pass at batch 8, ~44 GiB of host memory.

Scale it down for a CPU smoke run:
    python -m benchmarks.bench_sketch7b --layers 2 --hidden 256 --heads 4 --n 8 --seq 16
"""
from __future__ import annotations

from qkov.pipeline.store import RunStore
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

GiB = 1024**3
# set before torch initialises CUDA: fewer fragmentation failures with large, varied buffers
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


# ---------------------------------------------------------------- pure arithmetic


def geometry(a) -> dict:
    hd = a.hidden // a.heads
    attn = 4 * a.layers * a.hidden * a.heads * hd  # q, k, v, o weights (MHA)
    mlp = 3 * a.layers * a.hidden * a.intermediate
    emb = 2 * a.vocab * a.hidden  # untied input and output embeddings
    return dict(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.heads, head_dim=hd,
                intermediate=a.intermediate, vocab=a.vocab, slice_entries=hd * a.hidden,
                attention_params=attn, n_params=attn + mlp + emb + (2 * a.layers + 1) * a.hidden)


def estimate(a, g: dict, n_shards: int) -> dict:
    """Bytes needed per pass on the GPU, on the host and on disk (random data: no compression)."""
    N, B, T, L, h, H = 2 * a.n, a.batch, a.seq, a.layers, a.hidden, a.heads
    P, k = g["slice_entries"], a.sketch_dim
    slices = 4 * L * H  # (block, layer, head), MHA: K/V heads = query heads
    weights = 2 * g["n_params"]  # bf16
    per_block = L * H * P  # entries of one block's (layer, head, param) Fisher
    # autograd's saved activations per token and layer (bf16, sdpa): ~10 h-wide tensors and 4 of the
    # MLP width, plus the hooks' clones of q/k/v/o outputs and their inputs; ×1.5 for what is missed.
    # They are freed by the backward, before the per-layer loop allocates its buffers.
    act = int(1.5 * B * T * L * 2 * (10 * h + 4 * a.intermediate + 8 * h)) + 3 * B * T * a.vocab * 4
    saved_io = B * T * L * 2 * (2 * h + 4 * h)  # kept inputs and output gradients of q, k, v, o
    layer_grads = 4 * B * h * h * 4  # one layer's (B, out, in) float32 per-sample gradients
    fisher_pass = weights + 4 * per_block * 8 + max(act, saved_io + 2 * layer_grads + 2 * B * H * P * 8)
    proj_cache = min(12 * GiB, slices * P * 5)  # int32 order + int8 sign per entry
    # 1/Î_reg float64 on the device, the cached projections, then float64 operand temporaries
    sketch_pass = weights + 4 * per_block * 8 + proj_cache + max(act, saved_io + 2 * layer_grads + 6 * B * H * P * 8)
    sk_bytes = 2 if a.storage_dtype == "bfloat16" else 4
    disk = {
        "model": weights,
        "work_fisher_partials": n_shards * 4 * per_block * 4,
        "fisher": 4 * per_block * 4,
        "gradients_sketches": N * slices * k * 3 * sk_bytes,
        "scores": 2 * slices * (a.n * a.n + N * N) * 4,  # A×B and pooled matrices, float32
    }
    host = max(weights + 4 * per_block * 4,  # model load, then the Fisher partial on the host
               N * slices * k * 3 * (4 + sk_bytes) + 2 * per_block * 8)  # sketches (+ encoded copy), 1/Î_reg
    peak_disk = sum(disk.values())
    if not a.keep_model:  # the model folder is deleted once extraction is done, before scores are written
        peak_disk = max(sum(v for kk, v in disk.items() if kk != "scores"), sum(v for kk, v in disk.items() if kk != "model"))
    return {"gpu_fisher_pass": fisher_pass, "gpu_sketch_pass": sketch_pass, "host": host, "disk": disk,
            "disk_peak": peak_disk, "activations": act, "projection_cache": proj_cache}


def gib(x) -> float:
    return round(x / GiB, 2)


# ---------------------------------------------------------------- I/O


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def build_model(a, folder: Path, device: str) -> None:
    """A random-init bf16 LlamaForCausalLM of the requested geometry, saved as an HF folder."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                         max_position_embeddings=max(4096, a.seq), bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # init directly where it is fast (7B on the GPU: seconds)
        model = tf.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)  # safetensors, 2 bytes per parameter
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def job_for(a, work: Path, model: Path):
    from qkov.pipeline.spec import parse_job
    from qkov.testing import write_task_file

    ta = write_task_file(work / "a.jsonl", a.n, a.vocab, a.seq, a.seq, 1, "a")
    tb = write_task_file(work / "b.jsonl", a.n, a.vocab, a.seq, a.seq, 2, "b")
    return parse_job({
        "model": {"path": str(model), "dtype": "bfloat16", "attn_implementation": a.attn, "max_length": a.seq},
        "tasks": {"a": {"name": "taskA", "path": str(ta)}, "b": {"name": "taskB", "path": str(tb)}},
        "fisher": {"source": "pooled", "beta": 0.99, "batch_size": 16, "damping_rel": 1e-6},
        # one shard (= one worker task) per run: one GPU gains nothing from more, and each shard
        # keeps a whole float32 Fisher partial in `_work` (7B: 8.6 GB)
        "extract": {"batch_size": a.batch, "shard_size": 2 * a.n, "device": "auto"},
        "score": {"mode": "sketch", "sketch_dim": a.sketch_dim, "storage_dtype": a.storage_dtype},
        "stats": {"n_permutations": a.n_permutations, "n_bootstrap": a.n_bootstrap, "seed": 0},
        "output": {"path": str(work / "run")},
    }, base_dir=work)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/bench7b", help="model, task files and the run (deleted first)")
    ap.add_argument("--out", default=None, help="also write the JSON here (after every stage)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=None, help="default: 11008 · hidden / 4096")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--n", type=int, default=256, help="samples per task")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="extract.batch_size")
    ap.add_argument("--sketch-dim", type=int, default=1024)
    ap.add_argument("--storage-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--n-permutations", type=int, default=1000)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--keep-model", action="store_true", help="keep the model folder until the end (needs more disk)")
    ap.add_argument("--no-shrink", dest="shrink_to_fit", action="store_false",
                    help="refuse instead of halving --sketch-dim (down to 256) until the store fits the free disk")
    ap.add_argument("--estimate-only", action="store_true")
    a = ap.parse_args(argv)
    a.intermediate = a.intermediate or max(16, round(11008 * a.hidden / 4096))

    import torch

    cuda = torch.cuda.is_available()
    g = geometry(a)
    work = Path(a.workdir).resolve()  # the job resolves relative paths against its own folder
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free
    asked = a.sketch_dim
    est = estimate(a, g, n_shards=1)
    while a.shrink_to_fit and est["disk_peak"] * 1.05 > free and a.sketch_dim > 256:
        a.sketch_dim //= 2  # the sketches are the part of the store that k sizes
        est = estimate(a, g, n_shards=1)
    gpu_total = torch.cuda.get_device_properties(0).total_memory if cuda else None
    out: dict = {
        "benchmark": "sketch7b",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "settings": {**{k: v for k, v in vars(a).items() if k not in ("out", "estimate_only")},
                     "torch": torch.__version__, "cpus": os.cpu_count()},
        "geometry": g,
        "estimate_gib": {"gpu_fisher_pass": gib(est["gpu_fisher_pass"]), "gpu_sketch_pass": gib(est["gpu_sketch_pass"]),
                         "host": gib(est["host"]), "disk_peak": gib(est["disk_peak"]),
                         "disk": {k: gib(v) for k, v in est["disk"].items()}, "disk_free": gib(free),
                         "gpu_total": gib(gpu_total) if gpu_total else None},
        "seconds": {},
    }
    if a.sketch_dim != asked:
        out["settings"]["sketch_dim_reduced_for_disk"] = f"{asked} -> {a.sketch_dim}"

    def emit():
        text = json.dumps(out, indent=1)
        if a.out:
            Path(a.out).write_text(text)
        return text

    print(json.dumps(out["estimate_gib"]), file=sys.stderr)
    problems = []
    if est["disk_peak"] * 1.05 > free:
        problems.append(f"disk: needs ~{gib(est['disk_peak'])} GiB, {gib(free)} GiB free at {work}")
    if gpu_total and max(est["gpu_fisher_pass"], est["gpu_sketch_pass"]) > 0.95 * gpu_total:
        problems.append(f"GPU: needs ~{gib(max(est['gpu_fisher_pass'], est['gpu_sketch_pass']))} GiB of {gib(gpu_total)}")
    if problems or a.estimate_only:
        out["refused"] = problems
        print(emit())
        if problems:
            raise SystemExit("not enough resources: " + "; ".join(problems))
        return out

    from qkov.pipeline import extract as extract_mod
    from qkov.pipeline import schema
    from qkov.pipeline.executors import executor_for
    from qkov.pipeline.run import prepare_output
    from qkov.pipeline.score import run_score
    from qkov.pipeline.stats_stage import run_stats

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    model_dir = work / "model"
    build_model(a, model_dir, "cuda" if cuda else "cpu")
    out["seconds"]["model_build_save"] = round(time.perf_counter() - t, 2)
    out["model_bytes"] = dir_bytes(model_dir)
    emit()

    job = job_for(a, work, model_dir)
    marks: dict[str, float] = {}
    peaks: dict[str, float] = {}
    real_consolidate = extract_mod.consolidate_fisher

    def timed_consolidate(*args, **kw):  # the boundary between the two extraction passes
        sync()
        marks["fisher_pass_end"] = time.perf_counter()
        if cuda:
            peaks["fisher_pass"] = gib(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        r = real_consolidate(*args, **kw)
        marks["consolidate_end"] = time.perf_counter()
        return r

    extract_mod.consolidate_fisher = timed_consolidate  # timing wrapper around the real function
    executor = executor_for(None)
    path = job.output.path
    try:
        with RunStore.of(job).lock():
            t = time.perf_counter()
            plan = extract_mod.plan_extract(job)
            prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
            out["seconds"]["plan"] = round(time.perf_counter() - t, 2)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            extract_mod.run_extract(RunStore.of(job), job, executor, plan=plan, fresh=True)
            sync()
            t1 = time.perf_counter()
            if cuda:
                peaks["sketch_pass"] = gib(torch.cuda.max_memory_allocated())
            out["seconds"]["extract_fisher_pass"] = round(marks["fisher_pass_end"] - t0, 2)
            out["seconds"]["extract_consolidate_fisher"] = round(marks["consolidate_end"] - marks["fisher_pass_end"], 2)
            out["seconds"]["extract_sketch_pass"] = round(t1 - marks["consolidate_end"], 2)
            out["peak_gpu_gib"] = peaks
            out["samples_per_s"] = {"fisher_pass": round(2 * a.n / out["seconds"]["extract_fisher_pass"], 2),
                                    "sketch_pass": round(2 * a.n / out["seconds"]["extract_sketch_pass"], 2)}
            out["note"] = "the Fisher pass includes the worker's model load (safetensors -> GPU) and weights hash"
            emit()
            if not a.keep_model:  # scores need no model; frees its disk before they are written
                shutil.rmtree(model_dir)
            t = time.perf_counter()
            run_score(RunStore.of(job), job, executor)
            out["seconds"]["score"] = round(time.perf_counter() - t, 2)
            emit()
            t = time.perf_counter()
            run_stats(RunStore.of(job), job.stats, executor, replace=True)
            out["seconds"]["stats"] = round(time.perf_counter() - t, 2)
    finally:
        extract_mod.consolidate_fisher = real_consolidate
    run = Path(path)
    out["store_bytes"] = {p.name: dir_bytes(p) for p in sorted(run.iterdir()) if p.is_dir()}
    out["store_bytes"]["total"] = dir_bytes(run)
    out["sketch_bytes_per_sample"] = out["store_bytes"].get(schema.GRADIENTS, 0) // (2 * a.n)
    print(emit())
    return out


if __name__ == "__main__":
    main()
