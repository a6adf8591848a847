"""Score stage against an independent reference (autograd loop + numpy + hand slicing)."""
from __future__ import annotations

from qkov.pipeline.store import RunStore
import json

import numpy as np
import pytest
import torch

from qkov.pipeline.executors import DaskExecutor, InlineExecutor
from qkov.pipeline.extract import run_extract
from qkov.pipeline.run import prepare_output
from qkov.pipeline.pairs import top_pairs
from qkov.pipeline.score import run_score, score_dataset
from qkov.testing import compare_datasets, tiny_job
from reference import per_sample_grads_loop
from qkov.workers.models import load_model


# ---- the independent reference: no package slicing, gradients, Fisher or scoring code ----

def hand_slices(model, arch: str, layer: int) -> dict[str, list[tuple[str, object]]]:
    """For one layer: block -> per head, a function taking {param: grad} and returning the head's entries."""
    cfg = model.config
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    rows = lambda name, r: (lambda g: g[name][..., r, :])   # noqa: E731  (nn.Linear [out, in]: output rows)
    cols = lambda name, c: (lambda g: g[name][..., :, c])   # noqa: E731
    hs = lambda k: slice(k * hd, (k + 1) * hd)               # noqa: E731
    if arch == "gpt2":  # Conv1D weights are [in, out]
        p = f"transformer.h.{layer}.attn."
        d = cfg.hidden_size
        return {"Q": [cols(p + "c_attn.weight", slice(h * hd, (h + 1) * hd)) for h in range(H)],
                "K": [cols(p + "c_attn.weight", slice(d + h * hd, d + (h + 1) * hd)) for h in range(H)],
                "V": [cols(p + "c_attn.weight", slice(2 * d + h * hd, 2 * d + (h + 1) * hd)) for h in range(H)],
                "O": [rows(p + "c_proj.weight", hs(h)) for h in range(H)]}
    if arch == "gpt_neox":  # fused rows viewed as (H, 3, hd)
        p = f"gpt_neox.layers.{layer}.attention."
        qkv = p + "query_key_value.weight"
        return {blk: [rows(qkv, slice(h * 3 * hd + k * hd, h * 3 * hd + (k + 1) * hd)) for h in range(H)]
                for k, blk in enumerate("QKV")} | {"O": [cols(p + "dense.weight", hs(h)) for h in range(H)]}
    p = f"model.layers.{layer}.self_attn."
    if arch == "phi3":  # fused rows [Q (H·hd) | K (KV·hd) | V (KV·hd)]
        qkv = p + "qkv_proj.weight"
        return {"Q": [rows(qkv, hs(h)) for h in range(H)],
                "K": [rows(qkv, slice(H * hd + k * hd, H * hd + (k + 1) * hd)) for k in range(KV)],
                "V": [rows(qkv, slice((H + KV) * hd + k * hd, (H + KV) * hd + (k + 1) * hd)) for k in range(KV)],
                "O": [cols(p + "o_proj.weight", hs(h)) for h in range(H)]}
    return {"Q": [rows(p + "q_proj.weight", hs(h)) for h in range(H)],
            "K": [rows(p + "k_proj.weight", hs(k)) for k in range(KV)],
            "V": [rows(p + "v_proj.weight", hs(k)) for k in range(KV)],
            "O": [cols(p + "o_proj.weight", hs(h)) for h in range(H)]}


def autograd_loop(model, samples: list[list[int]]) -> dict[str, np.ndarray]:
    """Per-sample gradients of the 2-D parameters, one unpadded sample at a time with loss.backward()."""
    grads = per_sample_grads_loop(model, [torch.tensor(ids) for ids in samples])
    return {k: v.double().numpy() for k, v in grads.items() if v.dim() == 3}


def reference_scores(model, arch, samples, n_a, beta, fisher_batch, damping_rel):
    grads = autograd_loop(model, samples)
    n_layers = model.config.num_hidden_layers
    out = {}
    for layer in range(n_layers):
        for blk, heads in hand_slices(model, arch, layer).items():
            g = np.stack([f(grads).reshape(len(samples), -1) for f in heads], axis=1)  # (N, heads, P)
            F, T = np.zeros(g.shape[1:]), 0
            for s in range(0, len(g), fisher_batch):
                F = beta * F + (1 - beta) * (g[s : s + fisher_batch] ** 2).mean(axis=0)
                T += 1
            F /= 1 - beta**T
            reg = F + damping_rel * F.mean()
            for h in range(g.shape[1]):
                gi = g[:, h]
                u, v, w = gi**2 / reg[h], np.abs(gi), gi / np.sqrt(reg[h])
                out[(blk, layer, h)] = (u[:n_a] @ v[n_a:].T, w[:n_a] @ w[n_a:].T, u @ v.T)
    return out


def run_to_scores(job, executor=None, **kw):
    prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
    ex = executor or InlineExecutor()
    run_extract(RunStore.of(job), job, ex)
    return run_score(RunStore.of(job), job, ex, **kw)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "gpt_neox", "phi3"])
def test_scores_equal_independent_reference(tmp_path, arch):
    job = tiny_job(tmp_path, arch, n_a=6, n_b=5, fisher={"batch_size": 4, "beta": 0.9})
    scores = run_to_scores(job).load()
    model = load_model(job.model)
    samples = [json.loads(l)["input_ids"] for p in (job.tasks.a.path, job.tasks.b.path) for l in open(p)]
    ref = reference_scores(model, arch, samples, 6, 0.9, 4, job.fisher.damping_rel)
    kv = scores.kv_head.values
    for (blk, layer, h), (m_ref, a_ref, pooled_ref) in ref.items():
        # K/V references are per KV head; the store shows them on every query head of the group
        heads = np.flatnonzero(kv == h) if blk in "KV" else [h]
        for q in heads:
            sel = dict(block=blk, layer=layer, head=q)
            for name, r in (("interference", m_ref), ("alignment", a_ref), ("pooled_interference", pooled_ref)):
                got = scores[name].sel(**sel).values.astype(np.float64)
                assert np.abs(got - r).max() <= 1e-5 * np.abs(r).max(), (arch, name, blk, layer, q)
    assert list(scores.sample_a.values) == [f"a{k}" for k in range(6)]
    assert list(scores.sample_b.values) == [f"b{k}" for k in range(5)]


def test_head_additivity_against_whole_tensor(tmp_path):
    """Σ over heads of the stored scores = the score of the whole block tensor (K/V: over KV heads)."""
    job = tiny_job(tmp_path, "llama_gqa", n_a=6, n_b=5)
    scores = run_to_scores(job).load()
    model = load_model(job.model)
    samples = [json.loads(l)["input_ids"] for p in (job.tasks.a.path, job.tasks.b.path) for l in open(p)]
    grads = autograd_loop(model, samples)
    fisher = RunStore(job.output.path).open_fisher()
    names = {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "o_proj"}
    for layer in range(2):
        for blk, mod in names.items():
            g = grads[f"model.layers.{layer}.self_attn.{mod}.weight"].reshape(11, -1)
            # the whole tensor's Fisher and damping, as stored; entry order is irrelevant to the sum
            F = fisher[blk].sel(layer=layer).values.astype(np.float64).reshape(-1)
            lam = float(fisher["damping"].sel(block=blk, layer=layer))
            g_sorted = _align_entries(g, F, model, layer, blk)
            reg = F + lam
            whole_m = (g_sorted[:6] ** 2 / reg) @ np.abs(g_sorted[6:]).T
            whole_a = (g_sorted[:6] / np.sqrt(reg)) @ (g_sorted[6:] / np.sqrt(reg)).T
            unique = np.unique(scores.kv_head.values, return_index=True)[1] if blk in "KV" else range(4)
            sm = sum(scores["interference"].sel(block=blk, layer=layer, head=h).values.astype(np.float64) for h in unique)
            sa = sum(scores["alignment"].sel(block=blk, layer=layer, head=h).values.astype(np.float64) for h in unique)
            assert np.abs(sm - whole_m).max() <= 1e-5 * np.abs(whole_m).max(), (blk, layer)
            assert np.abs(sa - whole_a).max() <= 1e-5 * np.abs(whole_a).max(), (blk, layer)


def _align_entries(g, F_flat, model, layer, blk):
    """Put the whole-tensor gradient entries in the store's Fisher order (heads, then row-major).

    Q/K/V heads are contiguous row blocks of the weight, so row-major order already matches;
    O heads are column blocks: reorder columns head by head.
    """
    if blk != "O":
        return g
    n = g.shape[0]
    W = g.reshape(n, 32, 32)  # o_proj [d, H*hd], hd = 8
    return np.concatenate([W[:, :, h * 8 : (h + 1) * 8].reshape(n, -1) for h in range(4)], axis=1)


@pytest.mark.slow
def test_same_scores_inline_two_processes_and_any_chunking(tmp_path):
    from distributed import Client, LocalCluster

    job = tiny_job(tmp_path, "llama_gqa", n_a=9, n_b=8)
    ref = run_to_scores(job).load()
    small = score_dataset(RunStore(job.output.path).open_gradients(), RunStore(job.output.path).open_fisher(), sample_chunk=4).load()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl) as c:
        dist = run_score(RunStore.of(job), job, DaskExecutor(c)).load()
    for name in ("interference", "alignment", "pooled_interference", "pooled_alignment"):
        # float32 accumulation: other chunk shapes may sum in another order (alignment can be ~0,
        # so the bound is relative to the slice block's scale, not to each entry)
        got, want = small[name].values, ref[name].values
        assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max(), name
    # two worker processes: the same kernels with other torch thread counts (equal here, on
    # some CPUs not in the last bits), so equal up to float32 rounding, ids and coords exactly
    assert not compare_datasets(dist, ref, what="scores")


def test_open_scores_reads_one_slice_and_top_pairs_use_user_ids(tmp_path):
    job = tiny_job(tmp_path, "gpt2", n_a=5, n_b=4)
    run_to_scores(job)
    s = RunStore(job.output.path).open_scores()
    one = s["interference"].sel(layer=1, head=2, block="V")
    assert one.dims == ("sample_a", "sample_b") and one.data.npartitions == 1
    pairs = top_pairs(s, layer=1, head=2, block="V", n=3)
    m = one.values
    assert pairs[0]["interference"] == pytest.approx(float(m.max()))
    assert pairs[0]["sample_a"].startswith("a") and pairs[0]["sample_b"].startswith("b")
    assert [p["interference"] for p in pairs] == sorted((p["interference"] for p in pairs), reverse=True)


def test_raw_bf16_bits_score_like_decoded_gradients(tmp_path):
    """The stage reads bf16 gradients as raw bits and decodes them inside the kernel; on CPU
    that is exactly the decoded float32 path, head batching included."""
    job = tiny_job(tmp_path, "llama_gqa", n_a=7, n_b=6, score={"storage_dtype": "bfloat16"})
    prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
    run_extract(RunStore.of(job), job, InlineExecutor())
    fisher = RunStore(job.output.path).open_fisher()
    decoded = score_dataset(RunStore(job.output.path).open_gradients(), fisher, device="cpu").load()
    raw = RunStore(job.output.path).open_gradients(decode=False)
    assert raw["K"].dtype == np.uint16
    got = score_dataset(raw, fisher, device="cpu", sample_chunk=5).load()
    for name in ("interference", "alignment", "pooled_interference", "pooled_alignment"):
        want = decoded[name].values
        assert np.abs(got[name].values - want).max() <= 2e-6 * np.abs(want).max(), name


def test_heads_per_task_bounds_task_bytes():
    from qkov.pipeline.tiling import TASK_BYTES, heads_per_task

    assert heads_per_task(9, 128, 36864, 4) == 9  # 170 MB: one task per layer
    assert heads_per_task(9, 512, 36864, 4) == TASK_BYTES // (512 * 36864 * 4)
    assert heads_per_task(32, 2048, 524288, 2) == 1  # never fewer than one head
