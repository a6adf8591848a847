"""One job of N tasks against the N(N-1)/2 two-task jobs it replaces, measured in one run.

    python -m benchmarks.bench_many_tasks [--tasks 3] [--n 48] [--seq 64] [--model smollm2|tiny]
        [--layers 0 3 6] [--json-out PATH]

Both sides do the same work per pair: the N-task job uses `fisher.source = "pair"`, so each
pair's answers equal its two-task job's (tests/test_many_tasks.py checks that equality);
what differs is that the N-task job extracts each task's gradients once, where the two-task
jobs extract every task N - 1 times. Both run in this process (inline, the same threads),
after one warm-up run that loads the model and imports everything, so neither side pays a
start-up the other does not. Prints one JSON object: seconds per side and stage, and the
ratio (N-task seconds / summed two-task seconds; < 1 is the gain).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path


def _jobs(work: Path, n_tasks: int, n: int, seq: int, model: str, layers: list[int]):
    from qkov.pipeline.spec import parse_job
    from qkov.testing import VOCAB, save_model, tiny_model, write_task_file

    if model == "tiny":
        folder = work / "model"
        save_model(tiny_model("llama_gqa", seed=0), None, folder)
        source, vocab = {"path": str(folder)}, VOCAB
    else:
        from benchmarks.bench_e2e import build_model

        folder = build_model(work / "model-smollm2", "smollm2")
        source, vocab = {"path": str(folder)}, 49152
    keys = "abcdefgh"[:n_tasks]
    tasks = {k: {"name": f"task-{k}", "path": str(write_task_file(work / f"{k}.jsonl", n, vocab, seq, seq, 100 * i, k))}
             for i, k in enumerate(keys)}
    base = {"model": {**source, "max_length": seq}, "fisher": {"source": "pair"},
            "extract": {"batch_size": 8, "shard_size": 16}, "score": {"layers": layers},
            "stats": {"n_permutations": 199, "n_bootstrap": 200}}
    many = parse_job({**base, "tasks": tasks, "output": {"path": str(work / "many")}})
    pairs = [parse_job({**base, "tasks": {"a": tasks[x], "b": tasks[y]}, "output": {"path": str(work / f"pair-{x}{y}")}})
             for x, y in many.tasks.pairs()]
    return many, pairs


def _timed(job) -> tuple[float, dict]:
    from qkov.pipeline.run import run_job

    t = time.perf_counter()
    summary = run_job(job, overwrite=True)
    return time.perf_counter() - t, {k: round(v, 2) for k, v in summary.timings.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--n", type=int, default=48, help="samples per task")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sample")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2",
                    help="smollm2: a random-init Llama of SmolLM2-135M's geometry; tiny: the tests' model")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="qkov-many-"))
    try:
        many, pairs = _jobs(work, args.tasks, args.n, args.seq, args.model,
                            args.layers if args.model == "smollm2" else [0, 1])
        _timed(pairs[0])  # warm-up: imports, model load, kernels
        t_many, stages_many = _timed(many)
        per_pair = [_timed(job) for job in pairs]
        t_pairs = sum(t for t, _ in per_pair)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "benchmark": "many_tasks",
        "question": "seconds of one N-task job / summed seconds of the two-task jobs of its pairs (same answers)",
        "tasks": args.tasks, "pairs": len(pairs), "n_per_task": args.n, "seq": args.seq, "model": args.model,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)",
        "many_task_s": round(t_many, 2), "many_task_stages_s": stages_many,
        "two_task_s": [round(t, 2) for t, _ in per_pair], "two_task_stages_s": [s for _, s in per_pair],
        "two_task_total_s": round(t_pairs, 2), "ratio": round(t_many / t_pairs, 3),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
