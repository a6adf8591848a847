"""Cost of per-sample attention gradients against a plain batched forward+backward.

    python -m benchmarks.bench_extract [--device cpu|cuda] [--geometry tiny|smollm2]
        [--batch B] [--seq T] [--repeats R] [--dtype float32|bfloat16] [--attn sdpa|eager]

Builds a randomly initialised Llama of SmolLM2-135M geometry (or a tiny one),
times (a) `loss.backward()` with every parameter requiring grad and (b)
`per_sample_grads` for all attention projection parameters, on the same
full-length random batch, and prints one JSON object with the median times,
their ratio and samples/s. Timings are medians after warm-up; on CUDA every
timed call is bracketed by `torch.cuda.synchronize()`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from qkov.workers.grads import per_sample_grads
from qkov.workers.layouts import discover_layout
from qkov.workers.losses import CausalLMLoss

GEOMETRIES = {
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json), random weights.
    "smollm2": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    ),
    # Meta-Llama-3-8B (config.json): GQA 32 query / 8 KV heads, 32 layers, random weights.
    "llama3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=512,
    ),
}
# CPU defaults keep the default run under ~2 minutes on 2 cores; CUDA defaults are the H100 target.
DEFAULTS = {"cpu": dict(batch=4, seq=32, repeats=3, warmup=1), "cuda": dict(batch=16, seq=256, repeats=5, warmup=2)}


def build_model(geometry: str, dtype: torch.dtype, attn: str, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**GEOMETRIES[geometry], attention_dropout=0.0)
    model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def random_tokens(vocab: int, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(fn: Callable[[], object], device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def run(device: str, geometry: str, batch: int | None, seq: int | None, repeats: int | None, dtype: str, attn: str) -> dict:
    d = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    batch, seq, repeats = batch or d["batch"], seq or d["seq"], repeats or d["repeats"]
    model = build_model(geometry, getattr(torch, dtype), attn, device)
    data = random_tokens(model.config.vocab_size, batch, seq, device)
    names = list(discover_layout(model).param_names)
    task = CausalLMLoss()

    def plain():
        model.zero_grad(set_to_none=True)
        task.per_sample_loss(model, data).sum().backward()

    def per_sample():
        return per_sample_grads(model, data, names, task)

    t_plain = median_seconds(plain, repeats, d["warmup"], device)
    model.zero_grad(set_to_none=True)
    t_ps = median_seconds(per_sample, repeats, d["warmup"], device)
    params = dict(model.named_parameters())
    return {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "geometry": geometry,
        "dtype": dtype,
        "attn_implementation": attn,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "batch": batch,
        "seq": seq,
        "repeats": repeats,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_per_sample_params": sum(params[n].numel() for n in names),
        "plain_fwd_bwd_s": round(t_plain, 5),
        "per_sample_grads_s": round(t_ps, 5),
        "ratio": round(t_ps / t_plain, 3),
        "samples_per_s": {"plain_fwd_bwd": round(batch / t_plain, 2), "per_sample_grads": round(batch / t_ps, 2)},
        "peak_gib": {"plain_fwd_bwd": peak_gib(plain, device), "per_sample_grads": peak_gib(per_sample, device)},
        "note": f"full-length random batch (no padding), {d['warmup']} warm-up call(s), median of {repeats}; "
        f"defaults on {'cuda' if device.startswith('cuda') else 'cpu'}: batch {d['batch']}, seq {d['seq']}, repeats {d['repeats']}",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="smollm2")
    p.add_argument("--batch", type=int, help="default: 4 on CPU, 16 on CUDA")
    p.add_argument("--seq", type=int, help="default: 32 on CPU, 256 on CUDA")
    p.add_argument("--repeats", type=int, help="default: 3 on CPU, 5 on CUDA")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--json-out", help="also write the JSON here")
    a = p.parse_args(argv)
    text = json.dumps(run(a.device, a.geometry, a.batch, a.seq, a.repeats, a.dtype, a.attn), indent=2)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
