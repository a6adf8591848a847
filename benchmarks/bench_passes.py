"""Where one answers-mode extraction batch spends its time, part by part, on one device.

    python -m benchmarks.bench_passes [--geometry smollm2|llama3-8b|tiny] [--dtype bfloat16]
        [--batch B] [--seq T] [--layers N] [--repeats R] [--tasks 2]

No store and no cluster: the parts `qkov.workers.writer` runs per batch are called in the
same order, timed cumulatively with the device synchronised, each the median of R batches:
  plain_fwd_bwd      a plain forward+backward of the model with every parameter's .grad (the bound)
  per_sample_bwd     forward + ∂ℓ/∂y of the hooked projections (no parameter .grad)
  formation          + the per-sample (B, out, in) gradients of every layer, sliced per head
  pass1              + the Fisher and task-sum reductions of the answers' first pass, as the writer
                     makes them (qkov.workers.pass_kernels: one Triton kernel per run of rows on CUDA)
  pass1_torch        the same in torch (a bf16 round trip, norms per run, the Fisher's Σ t²): baseline
  pass1_gemm         the same as an earlier version made them (one-hot GEMMs on copies): baseline
  pass2              formation + the second pass's per-sample scalars (instead of pass1's sums), as
                     the writer makes them (one Triton kernel on CUDA)
  pass2_torch        the same in torch, the weights formed per batch (as at 8B, where they do not all
                     stay cached) and reduced by split-K GEMMs: baseline
  pass2_columns      the same with an earlier version's (H, P, c) weight columns: baseline
  pass2_sketch[_torch|_f64] pass2[_torch] + u, v sketched to --sketch-dim (on CUDA the sketch kernel,
                     as the writer; _torch: sketch_layer; float64: baseline)
  pass2_sketch_global  pass2_sketch on the previous scheme's projections (one permutation over all of
                     a slice's entries: random reads): the baseline of the run-local permutation
  pass1_fused, pass2[_sketch]_fused  pass1, pass2[_sketch] on the fused kernels: each sample's gradient
                     formed tile by tile inside the kernel from the activations (no formation step)
  pass1_f64, pass2_f64  the same with the first version's float64 reductions (the Fisher's and the
                        task sums' float64 einsums; pass 2's float64 elementwise products): the baseline
Prints one JSON object with seconds per batch, samples/s and each part's share.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.bench_extract import GEOMETRIES, random_tokens
from qkov.workers import answers as ans
from qkov.workers import pass_kernels as pk
from qkov.workers.grads import per_sample_backward
from qkov.workers.layouts import discover_layout
from qkov.workers.losses import CausalLMLoss
from qkov.workers.slicing import slice_block


def _task_sums_update_f64(acc, t, onehot):
    """The first version's pass-1 reduction (float64 copies of the slice, one einsum per kind):
    the baseline the GEMM form in qkov.workers.answers is measured against, doing equal work."""
    td = t.double()
    for k, x in enumerate((td, td.abs(), td * td)):
        acc[k] += torch.einsum("tb,bhp->thp", onehot, x).to(acc.dtype)


def _task_sums_update_gemm(acc, t, onehot):
    """The previous pass-1 reduction (baseline): per kind one one-hot float32 GEMM over the
    batch, on copies of |t| and t²."""
    flat = t.reshape(t.shape[0], -1)
    oh = onehot.to(torch.float32)
    for k, x in enumerate((flat, flat.abs(), flat * flat)):
        acc[k].view(acc.shape[1], -1).addmm_(oh, x)


def _sample_scalars_columns(t, inv, sums):
    """The previous pass-2 reduction (baseline): the weights formed per batch as (H, P, c)
    columns (concatenated and permuted copies), then the same split-K GEMMs."""
    w = inv.float()
    s = sums.float()
    cols = [(s[0] * w).permute(1, 2, 0).contiguous(),
            torch.cat([torch.ones_like(w)[None], w[None], s[1] * w], dim=0).permute(1, 2, 0).contiguous(),
            (s[2] * w).permute(1, 2, 0).contiguous(), w[..., None].contiguous()]
    B, H, P = t.shape
    K = ans.split_length(P)

    def gemm(x, c):
        return torch.bmm(x.contiguous().view(B, H * (P // K), K).transpose(0, 1),
                         c.reshape(H * (P // K), K, c.shape[-1])).view(H, P // K, B, -1).sum(1)

    t2, v = t * t, t.abs()
    return [gemm(t, cols[0]), gemm(t2, cols[1]), gemm(v, cols[2]), gemm(t2 * v, cols[3])]


def _sample_scalars_f64(t, inv, sums):
    """The first version's pass-2 reduction, in float64 elementwise passes (baseline)."""
    td, w = t.double(), inv.double()
    v = td.abs()
    gw = td * w
    u = gw * td
    own = [(td * td).sum(-1), u.sum(-1), (u * v).sum(-1)]
    a = torch.einsum("bhp,thp->bht", gw, sums[0].double())
    mr = torch.einsum("bhp,thp->bht", u, sums[1].double())
    mc = torch.einsum("bhp,thp->bht", v, sums[2].double() * w)
    return torch.cat([torch.stack(own, dim=-1), torch.stack([a, mr, mc], dim=-1).flatten(-2)], dim=-1)


def build(geometry: str, dtype: torch.dtype, layers: int | None, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    g = dict(GEOMETRIES[geometry])
    if layers:
        g["num_hidden_layers"] = layers
    cfg = LlamaConfig(**g, attention_dropout=0.0)
    with torch.device(device):  # a 7–8B init takes seconds on the GPU, minutes on the host
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def timed(fn, repeats: int, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(a) -> dict:
    device = a.device
    model = build(a.geometry, getattr(torch, a.dtype), a.layers, device)
    data = random_tokens(model.config.vocab_size, a.batch, a.seq, device)
    layout = discover_layout(model)
    task = CausalLMLoss()
    blocks = ("Q", "K", "V", "O")
    nl = model.config.num_hidden_layers
    heads = {b: layout.blocks[(b, 0)].n_heads for b in blocks}
    sizes = {b: layout.block_size(b) for b in blocks}
    B, K = a.batch, a.tasks
    onehot = torch.zeros((K, B), dtype=torch.float64, device=device)
    # each task's rows together, as a run's samples are (two runs of rows where a real batch has one)
    task_of = (torch.arange(B) * K // B).tolist()
    onehot[torch.tensor(task_of, device=device), torch.arange(B, device=device)] = 1.0
    runs = ans.row_runs(task_of)
    runs1 = [(r0, r1, k, (1.0 / B,)) for k, r0, r1 in runs]
    w = torch.full((1, B), 1.0 / B, dtype=torch.float64, device=device)
    w32 = w.float()
    # answers mode with keep_pairs = "top": every (block, layer)'s projection, built before timing
    # (a worker caches them: qkov.workers.sketch.ProjectionCache)
    projs, globals_ = {}, {}
    if a.sketch_dim:
        from qkov.workers.sketch import layer_projection

        projs = {(b, layer): layer_projection(sizes[b], a.sketch_dim, 0, b, layer, heads[b], 1, device)
                 for b in blocks for layer in range(nl)}
        if not a.steps or "pass2_sketch_global" in a.steps:
            from benchmarks.bench_sketch import previous_scheme

            with previous_scheme():
                globals_ = {(b, layer): layer_projection(sizes[b], a.sketch_dim, 0, b, layer, heads[b], 1, device)
                            for b, layer in projs}
    # per-layer accumulators only (one layer's worth, reused): the reductions' cost, not 8B's memory
    fisher = {b: torch.zeros((1, heads[b], sizes[b]), dtype=torch.float64, device=device) for b in blocks}
    tsums = {b: torch.zeros((3, K, heads[b], sizes[b]), dtype=torch.float32, device=device) for b in blocks}
    inv = {b: torch.rand((heads[b], sizes[b]), dtype=torch.float32, device=device) for b in blocks}

    def plain():
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        task.per_sample_loss(model, data).sum().backward()
        model.zero_grad(set_to_none=True)

    def backward_only():
        return per_sample_backward(model, data, layout.param_names, task)

    fusable = {key: pk.fused_slice(bs) for key, bs in layout.blocks.items()}

    def passes(step: str):
        res = backward_only()
        for layer in range(nl):
            if step.endswith("_fused"):  # as the writer on the fused kernels: no gradient formed
                for b in blocks:
                    fs, bs = fusable[(b, layer)], layout.blocks[(b, layer)]
                    x, go = res.activations(bs.parts[0].param)
                    if step == "pass1_fused":
                        pk.fused_pass1(fs, x, go, runs1, tsums[b], fisher[b], True)
                    else:
                        pk.fused_pass2(fs, x, go, inv[b], tsums[b], True, projs[(b, layer)] if "sketch" in step else None)
                continue
            names = [n for n in layout.param_names if any(p.param == n for b in blocks for p in layout.blocks[(b, layer)].parts)]
            full = res.grads(names)
            for b in blocks:
                t = slice_block(layout.blocks[(b, layer)], full).float()
                if step == "pass1":  # as qkov.workers.writer: the Fisher's Σ t² and the task sums in one read
                    pk.pass1_update(t, runs1, tsums[b], fisher[b], True)
                elif step == "pass1_torch":  # the Fisher's batch Σ t², then the task sums
                    fisher[b][0].add_(ans.squares_sum(t), alpha=1.0 / B)
                    ans.task_sums_update(tsums[b], t.to(torch.bfloat16).float(), runs)
                elif step == "pass1_gemm":  # the previous version: one-hot float32 GEMMs on copies
                    fisher[b] += torch.mm(w32, (t * t).reshape(B, -1)).view(fisher[b].shape)
                    _task_sums_update_gemm(tsums[b], t.to(torch.bfloat16).float(), onehot)
                elif step == "pass1_f64":
                    fisher[b] += torch.einsum("si,ihp->shp", w, t.double() ** 2)
                    _task_sums_update_f64(tsums[b], t.to(torch.bfloat16).float(), onehot)
                elif step == "pass2_f64":
                    t = t.to(torch.bfloat16).float()
                    _sample_scalars_f64(t, inv[b], tsums[b])
                elif step in ("pass2", "pass2_sketch", "pass2_sketch_global") and pk.use_kernels(t):  # as qkov.workers.answers
                    pk.pass2_scalars(t, inv[b], tsums[b], True)
                    if step != "pass2":  # the sketch kernel, on this or the previous scheme's projections
                        pk.sketch_parts(t, inv[b], (projs if step == "pass2_sketch" else globals_)[(b, layer)], ("u", "v"), True)
                elif step in ("pass2", "pass2_torch", "pass2_sketch", "pass2_sketch_global", "pass2_sketch_torch", "pass2_sketch_f64"):
                    t = t.to(torch.bfloat16).float()  # weights formed per batch, as at 8B
                    ans.sample_scalars(t, inv[b], tsums[b])
                    if step not in ("pass2", "pass2_torch"):  # + the interference's operands sketched (float32; the previous float64)
                        from qkov.workers.sketch import sketch_layer

                        x = t.double() if step.endswith("f64") else t
                        sketch_layer(x, inv[b], (globals_ if step.endswith("global") else projs)[(b, layer)], parts=("u", "v"))
                elif step == "pass2_columns":
                    t = t.to(torch.bfloat16).float()
                    _sample_scalars_columns(t, inv[b], tsums[b])
                del t
            del full

    out = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "pass_kernels": device.startswith("cuda") and pk.available(), "geometry": a.geometry, "dtype": a.dtype, "batch": B, "seq": a.seq,
           "layers": nl, "tasks": K, "repeats": a.repeats,
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if pk.use_kernels(torch.empty(0, device=device)):
        out["kernel_check"] = kernel_check(backward_only(), layout, blocks, runs1, inv, K, fusable,
                                           {b: projs.get((b, 0)) for b in blocks})
    t = {"plain_fwd_bwd": timed(plain, a.repeats, device)}
    for p in model.parameters():
        p.requires_grad_(False)
    t["per_sample_bwd"] = timed(backward_only, a.repeats, device)
    steps = ["formation", "pass1", "pass1_torch", "pass1_gemm", "pass2", "pass2_torch", "pass2_columns", "pass1_f64",
             "pass2_f64"]
    steps += ["pass2_sketch", "pass2_sketch_global", "pass2_sketch_torch", "pass2_sketch_f64"] if a.sketch_dim else []
    if pk.use_kernels(torch.empty(0, device=device)) and all(fusable[(b, 0)] for b in blocks):
        steps += ["pass1_fused", "pass2_fused"] + (["pass2_sketch_fused"] if a.sketch_dim else [])
    for step in [x for x in steps if not a.steps or x in a.steps]:
        t[step] = timed(lambda: passes(step), a.repeats, device)
    if a.profile:  # where one batch of each pass goes, by operator (device time): the next thing to cut
        from benchmarks.profile_answers import _profile

        out["profile"] = {"per_sample_bwd": _profile(backward_only, 15),
                          **{step: _profile(lambda step=step: passes(step), 15)
                             for step in [x + ("_fused" if "pass1_fused" in t else "")
                                          for x in ("pass1", "pass2_sketch" if a.sketch_dim else "pass2")]}}
    out["seconds_per_batch"] = {k: round(v, 4) for k, v in t.items()}
    out["samples_per_s"] = {k: round(B / v, 2) for k, v in t.items()}
    out["over_plain"] = {k: round(v / t["plain_fwd_bwd"], 3) for k, v in t.items()}
    t = {**dict.fromkeys(steps + ["per_sample_bwd", "pass1_fused", "pass2_fused", "pass2_sketch_fused"], float("nan")), **t}
    out["parts_s"] = {"formation_and_slicing": round(t["formation"] - t["per_sample_bwd"], 4),
                      "pass1_fused_over_per_sample_bwd": round(t["pass1_fused"] - t["per_sample_bwd"], 4),
                      "pass2_fused_over_per_sample_bwd": round(t["pass2_fused"] - t["per_sample_bwd"], 4),
                      **({"pass2_sketch_fused_over_per_sample_bwd": round(t["pass2_sketch_fused"] - t["per_sample_bwd"], 4)}
                         if a.sketch_dim else {}),
                      "pass1_reductions": round(t["pass1"] - t["formation"], 4),
                      "pass2_reductions": round(t["pass2"] - t["formation"], 4),
                      "pass1_reductions_torch_baseline": round(t["pass1_torch"] - t["formation"], 4),
                      "pass2_reductions_torch_baseline": round(t["pass2_torch"] - t["formation"], 4),
                      "pass1_reductions_gemm_baseline": round(t["pass1_gemm"] - t["formation"], 4),
                      "pass2_reductions_columns_baseline": round(t["pass2_columns"] - t["formation"], 4),
                      **({"pass2_sketch_reductions": round(t["pass2_sketch"] - t["formation"], 4),
                          "pass2_sketch_reductions_global_baseline": round(t["pass2_sketch_global"] - t["formation"], 4),
                          "pass2_sketch_reductions_torch_baseline": round(t["pass2_sketch_torch"] - t["formation"], 4),
                          "pass2_sketch_reductions_f64_baseline": round(t["pass2_sketch_f64"] - t["formation"], 4)}
                         if a.sketch_dim else {}),
                      "pass1_reductions_f64_baseline": round(t["pass1_f64"] - t["formation"], 4),
                      "pass2_reductions_f64_baseline": round(t["pass2_f64"] - t["formation"], 4)}
    if device.startswith("cuda"):
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def kernel_check(res, layout, blocks, runs1, inv, K, fusable, projs) -> dict:
    """The kernels (and the fused kernels, where the block fuses) against the torch forms on
    layer 0's slices of this batch: the largest difference of each output, relative to that
    output's largest magnitude."""
    full = res.grads([n for n in layout.param_names if any(p.param == n for b in blocks for p in layout.blocks[(b, 0)].parts)])
    out = {}
    for b in blocks:
        t = slice_block(layout.blocks[(b, 0)], full).float()
        H, P = t.shape[1:]
        acc = {f: torch.zeros((3, K, H, P), dtype=torch.float32, device=t.device) for f in ("kernel", "torch")}
        fis = {f: torch.zeros((1, H, P), dtype=torch.float64, device=t.device) for f in ("kernel", "torch")}
        pk.pass1_update(t, runs1, acc["kernel"], fis["kernel"], True)
        pk._pass1_torch(t, runs1, acc["torch"], fis["torch"], True)
        x_k = pk.pass2_scalars(t, inv[b], acc["torch"], True)
        x_t = ans.sample_scalars(t.to(torch.bfloat16).float(), inv[b], acc["torch"])

        def rel(x, y):
            return float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-300))

        out[b] = {"task_sums": max(rel(acc["kernel"][k], acc["torch"][k]) for k in range(3)),
                  "fisher": rel(fis["kernel"], fis["torch"]),
                  "scalars": max(rel(x_k[..., j], x_t[..., j]) for j in range(x_t.shape[-1]))}
        fs = fusable[(b, 0)]
        if fs is not None:  # (bf16 rounding of a differently summed value may differ by one bf16 step)
            x, go = res.activations(layout.blocks[(b, 0)].parts[0].param)
            acc["fused"] = torch.zeros_like(acc["torch"])
            fis["fused"] = torch.zeros_like(fis["torch"])
            pk.fused_pass1(fs, x, go, runs1, acc["fused"], fis["fused"], True)
            x_f, sk_f = pk.fused_pass2(fs, x, go, inv[b], acc["torch"], True, projs[b])
            out[b].update({"fused_task_sums": max(rel(acc["fused"][k], acc["torch"][k]) for k in range(3)),
                           "fused_fisher": rel(fis["fused"], fis["torch"]),
                           "fused_scalars": max(rel(x_f[..., j], x_t[..., j]) for j in range(x_t.shape[-1]))})
            if sk_f is not None:
                from qkov.workers.sketch import sketch_layer

                sk_t = sketch_layer(t.to(torch.bfloat16).float(), inv[b], projs[b], parts=("u", "v"))
                out[b]["fused_sketch"] = max(rel(sk_f[p], sk_t[p]) for p in ("u", "v"))
    out["max"] = max(v for d in out.values() for v in d.values())
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="smollm2")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, help="model layers (default: the geometry's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--sketch-dim", type=int, default=0, help="also time pass 2 with u, v sketched to this k (0: not)")
    p.add_argument("--profile", action="store_true", help="also profile one batch of each pass (torch.profiler)")
    p.add_argument("--steps", nargs="+", help="time only these steps (default: all)")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    out = run(a)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
