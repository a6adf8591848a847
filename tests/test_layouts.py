"""Attention-layout discovery: exact partitions, and behaviour, for every required architecture.

References are written here independently of `qkov.workers.layouts`: head sizes per
architecture, the slicing formulas of each transformers `_split_heads`, and the
model's own behaviour (gradients after ablating a head, attention patterns after
zeroing a slice or one position of a projection output).
"""
from __future__ import annotations

import json
import tomllib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qkov.pipeline.spec import LayoutSpec
from qkov.workers.layouts import UnsupportedModelError, discover_layout
from qkov.workers.slicing import assemble, slice_all, slice_block
from qkov.testing import SUPPORTED, VOCAB, random_batch, tiny_model
from reference import reference_head_slice

D_MODEL = 32
# The support matrix (qkov.testing.SUPPORTED) states, per architecture and independently of
# qkov.workers.layouts, the layout kind, the head counts, where O lives and how weights are stored.
CASES = list(SUPPORTED)


def build(case: str):
    return tiny_model(case)


def _hf_batch(case: str):
    return random_batch(VOCAB, [7, 5], seed=3, pad_id=1 if case == "roberta" else 0)


def hf_loss(model, case: str) -> torch.Tensor:
    b = _hf_batch(case)
    if SUPPORTED[case].encoder:
        return model(**b, labels=torch.tensor([0, 1])).loss
    return model(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss


def hf_patterns(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [heads, T, T] attention probabilities of one unpadded sequence."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True)
    return [a[0] for a in out.attentions]


# --- 1. exact partition of the projection tensors, and slice contents -------------------------


@pytest.mark.parametrize("include_bias", [False, True], ids=["weights", "bias"])
@pytest.mark.parametrize("case", CASES)
def test_slices_partition_the_projection_tensors(case, include_bias):
    model = build(case)
    layout = discover_layout(model, include_bias=include_bias)
    t = SUPPORTED[case]
    H, KV, hd = t.n_heads, t.n_kv_heads, t.head_dim
    assert layout.kind == t.kind
    assert (layout.n_layers, layout.n_heads, layout.n_kv_heads, layout.head_dim, layout.v_head_dim) == (2, H, KV, hd, hd)
    assert layout.kv_head_of.tolist() == [h // (H // KV) for h in range(H)]
    params = dict(model.named_parameters())

    count = {n: np.zeros(params[n].numel(), dtype=np.int64) for n in layout.param_names}
    for (block, layer), bs in layout.blocks.items():
        assert bs.n_heads == (KV if block in "KV" else H)
        for part in bs.parts:
            assert part.shape == tuple(params[part.param].shape)
            assert part.index.shape[0] == bs.n_heads
            np.add.at(count[part.param], part.index.ravel(), 1)
    # every entry of every covered tensor lies in exactly one (block, head) slice
    for n, c in count.items():
        assert (c == 1).all(), f"{n}: entries covered {sorted(set(c.tolist()))} times"

    # ... and the covered tensors are exactly the attention projection weights (+ Q/K/V biases)
    mods = layout.attention_modules

    def inside(n: str) -> bool:
        return any(n.startswith(m + ".") for m in mods)

    o_mods = {f"{m}.{SUPPORTED[case].o_proj}" for m in mods}
    want = {n for n, p in params.items() if inside(n) and p.dim() == 2}
    if include_bias:
        want |= {n for n in params if inside(n) and n.endswith(".bias") and n[: -len(".bias")] + ".weight" in want and n[: -len(".bias")] not in o_mods}
    assert set(layout.param_names) == want
    for layer, m in enumerate(mods):
        assert [p.param for p in layout.blocks[("O", layer)].parts] == [f"{m}.{SUPPORTED[case].o_proj}.weight"]

    # per-head sizes: d_model × head_dim (+ head_dim bias entries on Q/K/V)
    for (block, layer), bs in layout.blocks.items():
        has_bias = any(p.param.endswith(".bias") for p in bs.parts)
        assert bs.size == D_MODEL * hd + (hd if has_bias else 0)
        assert has_bias == (include_bias and block != "O" and f"{bs.parts[0].param[:-len('.weight')]}.bias" in params)

    # slicing then assembling random gradients with a leading sample axis restores them
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(3, *params[n].shape, generator=g) for n in layout.param_names}
    back = assemble(layout, slice_all(layout, grads))
    assert set(back) == set(grads)
    for n in grads:
        assert torch.equal(back[n], grads[n]), n


def test_every_known_arrangement_is_in_the_support_matrix():
    """Each arrangement discovery knows is exercised by a tiny model of qkov.testing.SUPPORTED
    (so the parametrised tests cover it), and each has one of the kinds slicing implements."""
    from qkov.workers.layouts import KINDS, KNOWN_ARRANGEMENTS

    assert {a.kind for a in KNOWN_ARRANGEMENTS} <= set(KINDS)
    covered = set()
    for case in CASES:
        layout = discover_layout(build(case))
        o_param = layout.blocks[("O", 0)].parts[0].param
        rows = [i for i, a in enumerate(KNOWN_ARRANGEMENTS)
                if (a.architecture, a.kind) == (layout.architecture, layout.kind) and o_param.endswith(f".{a.proj['o']}.weight")]
        assert rows, f"{case}: discovered {layout.architecture}/{layout.kind}, which no arrangement row names"
        covered.add(rows[0])
    missing = [KNOWN_ARRANGEMENTS[i] for i in range(len(KNOWN_ARRANGEMENTS)) if i not in covered]
    assert not missing, f"arrangements without a tiny model in qkov.testing.SUPPORTED: {missing}"


@pytest.mark.parametrize("case", CASES)
def test_slices_match_reference_formulas(case):
    model = build(case)
    layout = discover_layout(model)
    params = dict(model.named_parameters())
    for (block, layer), bs in layout.blocks.items():
        (part,) = bs.parts
        got = slice_block(bs, {part.param: params[part.param].detach()})
        for h in range(bs.n_heads):
            assert torch.equal(got[h], reference_head_slice(SUPPORTED[case], block, params[part.param].detach(), h)), (block, layer, h)


# --- 2. behaviour: ablation and attention patterns ---------------------------------------


@contextmanager
def zeroed(model, layout, block: str, layer: int, heads):
    """Zero the given heads' slice of (block, layer) in the model's weights; restore them on exit."""
    params = dict(model.named_parameters())
    saved = []
    with torch.no_grad():
        for part in layout.blocks[(block, layer)].parts:
            flat = params[part.param].view(-1)
            idx = torch.as_tensor(part.index[sorted(heads)].ravel())
            saved.append((flat, idx, flat[idx].clone()))
            flat[idx] = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for flat, idx, values in saved:
                flat[idx] = values


def check_o_ablation(model, layout, loss_of, H: int, KV: int) -> None:
    """Zeroing heads' O columns zeroes exactly their Q (and fully ablated groups' K/V) gradients."""
    G = H // KV
    single, many = {1}, set(range(G)) | {H - 1}  # `many` ablates KV group 0 whole, the last group partly
    params = dict(model.named_parameters())
    for per_layer in ((single, many), (many, single)):
        with zeroed(model, layout, "O", 0, per_layer[0]), zeroed(model, layout, "O", 1, per_layer[1]):
            model.zero_grad()
            loss_of(model).backward()
        s = slice_all(layout, {n: params[n].grad for n in layout.param_names}, blocks=("Q", "K", "V"))
        for layer, heads in enumerate(per_layer):
            for h in range(H):
                zero = bool((s[("Q", layer)][h] == 0).all())
                assert zero == (h in heads), f"layer {layer} Q head {h}: zero={zero}, ablated={sorted(heads)}"
            for kv in range(KV):
                whole = set(range(kv * G, (kv + 1) * G)) <= heads
                for b in "KV":
                    zero = bool((s[(b, layer)][kv] == 0).all())
                    assert zero == whole, f"layer {layer} {b} kv head {kv}: zero={zero}, ablated={sorted(heads)}"


@pytest.mark.parametrize("case", CASES)
def test_ablating_a_heads_output_silences_exactly_its_qkv_gradients(case):
    H, KV = SUPPORTED[case].n_heads, SUPPORTED[case].n_kv_heads
    model = build(case)
    check_o_ablation(model, discover_layout(model, include_bias=True), lambda m: hf_loss(m, case), H, KV)


def _changed_heads(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    diff = (after - before).abs().flatten(1).amax(1)
    assert ((diff < 1e-6) | (diff > 1e-4)).all(), f"ambiguous pattern change {diff.tolist()}"
    return {int(h) for h in torch.nonzero(diff > 1e-4).flatten()}


def check_slice_zeroing_patterns(model, layout, patterns_of, H: int, KV: int) -> None:
    """Zeroing head h's Q slice changes only head h's pattern (in that layer); K: its group's; V: none."""
    G = H // KV
    before_all = patterns_of(model)
    for layer in (0, 1):
        for block, head in (("Q", 1), ("K", KV - 1), ("V", KV - 1)):
            before = before_all[layer]
            with zeroed(model, layout, block, layer, [head]):
                after = patterns_of(model)[layer]
            want = {"Q": {head}, "K": set(range(head * G, (head + 1) * G)), "V": set()}[block]
            assert _changed_heads(before, after) == want, (layer, block, head)


def check_position_patterns(model, layout, patterns_of, H: int, KV: int, T: int, causal: bool) -> None:
    """Replacing one position t of a head's projected Q (K) output changes row t (column t) of its pattern.

    This separates Q from K, which slice-wide interventions cannot (scores are bilinear in q and k).
    """
    G, t = H // KV, 2
    before = patterns_of(model)[0]
    for block, head in (("Q", 2), ("K", KV - 1), ("V", 0)):
        part = layout.blocks[(block, 0)].parts[0]
        module = model.get_submodule(part.param.rsplit(".", 1)[0])
        out_axis = 0 if isinstance(module, nn.Linear) else 1  # Conv1D and [in, out] stores are transposed
        feats = np.unique(np.unravel_index(part.index[head], part.shape)[out_axis])
        assert len(feats) == layout.head_dim

        # a large random replacement, not zero: q_r·k_t can be ~0 by accident, q_r·(k_t - z) hardly
        z = 3.0 * torch.randn(len(feats), generator=torch.Generator().manual_seed(7))

        def replace_t(_m, _inp, out):
            out = out.clone()
            out[:, t, torch.as_tensor(feats)] = z.to(out.dtype)
            return out

        handle = module.register_forward_hook(replace_t)
        after = patterns_of(model)[0]
        handle.remove()
        heads = {"Q": {head}, "K": set(range(head * G, (head + 1) * G)), "V": set()}[block]
        assert _changed_heads(before, after) == heads, block
        for h in heads:
            rows = (after[h] - before[h]).abs().amax(1) > 1e-5
            if block == "Q":
                assert rows.tolist() == [r == t for r in range(T)], f"Q head {h}: changed rows {rows.tolist()}"
            else:  # every query that sees key t
                assert rows.tolist() == [r >= t or not causal for r in range(T)], f"K head {h}: changed rows {rows.tolist()}"


@pytest.mark.parametrize("case", CASES)
def test_zeroing_slices_changes_only_that_heads_attention(case):
    H, KV = SUPPORTED[case].n_heads, SUPPORTED[case].n_kv_heads
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    model = build(case)
    kw = dict(model=model, layout=discover_layout(model, include_bias=True), H=H, KV=KV)
    check_slice_zeroing_patterns(patterns_of=lambda m: hf_patterns(m, ids), **kw)
    causal = not SUPPORTED[case].encoder
    check_position_patterns(patterns_of=lambda m: hf_patterns(m, ids), T=6, causal=causal, **kw)


# --- 3. declared layouts on a custom model; unknown models -----------------------------------


class InOutLinear(nn.Module):
    """A projection storing its weight [in, out], of a type qkov cannot know."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * n_in**-0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class ToyAttention(nn.Module):
    """Causal attention whose Q/K/V storage follows `kind`, written out independently of qkov."""

    def __init__(self, d, H, KV, hd, kind, in_out):
        super().__init__()
        self.H, self.KV, self.hd, self.kind = H, KV, hd, kind
        lin = InOutLinear if in_out else nn.Linear
        if kind == "split":
            self.wq, self.wk, self.wv = lin(d, H * hd), lin(d, KV * hd), lin(d, KV * hd)
        else:
            self.qkv = lin(d, (H + 2 * KV) * hd)
        self.out = lin(H * hd, d)

    def _qkv(self, x):
        B, T, _ = x.shape
        H, KV, hd, G = self.H, self.KV, self.hd, self.H // self.KV
        if self.kind == "split":
            return self.wq(x).view(B, T, H, hd), self.wk(x).view(B, T, KV, hd), self.wv(x).view(B, T, KV, hd)
        y = self.qkv(x)
        if self.kind == "fused":
            q, k, v = y.split([H * hd, KV * hd, KV * hd], dim=-1)
            return q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)
        if self.kind == "interleaved":
            y = y.view(B, T, H, 3, hd)
            return y[..., 0, :], y[..., 1, :], y[..., 2, :]
        y = y.view(B, T, KV, G + 2, hd)  # grouped
        return y[:, :, :, :G].reshape(B, T, H, hd), y[:, :, :, G], y[:, :, :, G + 1]

    def forward(self, x):
        q, k, v = (z.transpose(1, 2) for z in self._qkv(x))  # (B, heads, T, hd)
        G = self.H // self.KV
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        T = x.shape[1]
        scores = (q @ k.transpose(-1, -2)) / self.hd**0.5
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        p = scores.softmax(-1)
        o = (p @ v).transpose(1, 2).reshape(x.shape[0], T, -1)
        return self.out(o), p


class ToyBlock(nn.Module):
    def __init__(self, d, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = ToyAttention(d, **kw)

    def forward(self, x):
        a, p = self.attn(self.norm(x))
        return x + a, p


class ToyLM(nn.Module):
    def __init__(self, d=32, H=4, KV=2, hd=8, kind="interleaved", in_out=False, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(ToyBlock(d, H=H, KV=KV, hd=hd, kind=kind, in_out=in_out) for _ in range(2))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        x, pats = self.emb(ids), []
        for blk in self.blocks:
            x, p = blk(x)
            pats.append(p[0])
        return self.head(x), pats


TOYS = {  # kind, KV heads, weight storage
    "split": ("split", 2, False),
    "fused-in_out": ("fused", 2, True),
    "interleaved": ("interleaved", 4, False),
    "grouped-in_out": ("grouped", 2, True),
    "grouped-mqa": ("grouped", 1, False),
}


def _toy_spec(kind: str, KV: int, in_out: bool) -> LayoutSpec:
    proj = dict(q="wq", k="wk", v="wv") if kind == "split" else dict(qkv="qkv")
    return LayoutSpec(
        attention="blocks.*.attn", kind=kind, o="out", n_heads=4, n_kv_heads=KV, head_dim=8,
        weight_layout="in_out" if in_out else "auto", **proj,
    )


@pytest.mark.parametrize("toy", list(TOYS))
def test_declared_layout_on_a_custom_model(toy):
    kind, KV, in_out = TOYS[toy]
    spec = _toy_spec(kind, KV, in_out)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))

    def loss_of(m):
        logits, _ = m(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def patterns_of(m):
        with torch.no_grad():
            return m(ids[:1])[1]

    layout = discover_layout(ToyLM(KV=KV, kind=kind, in_out=in_out), declared=spec)
    assert layout.architecture == "declared" and layout.attention_modules == ("blocks.0.attn", "blocks.1.attn")
    assert layout.kind == kind and layout.subset(layers=[1]).kind == kind and layout.summary()["kind"] == kind
    assert (layout.n_heads, layout.n_kv_heads, layout.head_dim) == (4, KV, 8)
    model = ToyLM(KV=KV, kind=kind, in_out=in_out)
    kw = dict(model=model, layout=discover_layout(model, spec, include_bias=True), H=4, KV=KV)
    check_o_ablation(loss_of=loss_of, **kw)
    check_slice_zeroing_patterns(patterns_of=patterns_of, **kw)
    check_position_patterns(patterns_of=patterns_of, T=6, causal=True, **kw)


def test_declared_layout_errors_name_the_problem():
    model = ToyLM(KV=2, kind="fused", in_out=True)
    with pytest.raises(UnsupportedModelError, match="weight_layout"):  # InOutLinear is neither nn.Linear nor Conv1D
        discover_layout(model, _toy_spec("fused", 2, in_out=False))
    with pytest.raises(UnsupportedModelError, match=r"matches no module path[\s\S]*blocks\.0\.attn"):
        discover_layout(model, _toy_spec("fused", 2, True).model_copy(update={"attention": "layers.*.attn"}))
    with pytest.raises(UnsupportedModelError, match="outputs"):  # 4 query + 2x2 KV heads do not fit (H,3,hd)
        discover_layout(model, _toy_spec("interleaved", 4, True))
    with pytest.raises(UnsupportedModelError, match="n_kv_heads"):
        discover_layout(model, _toy_spec("fused", 1, True))


def test_unknown_architecture_lists_attention_modules_and_how_to_declare():
    with pytest.raises(UnsupportedModelError) as err:
        discover_layout(ToyLM(kind="interleaved", KV=4))
    msg = str(err.value)
    for needle in ("ToyLM", "blocks.0.attn", "blocks.1.attn", "ToyAttention", "qkv: Linear weight (96, 32)",
                   "out: Linear weight (32, 32)", "[model.layout]", 'attention = "blocks.*.attn"'):
        assert needle in msg, needle
    # the snippet is a valid declaration once its placeholders are filled in
    snippet = msg[msg.index("[model.layout]"):]
    LayoutSpec(**tomllib.loads(snippet)["model"]["layout"])


# --- 4. layout helpers ----------------------------------------------------------------


def test_subset_summary_and_block_size():
    model = build("qwen2")  # GQA with q/k/v biases
    full = discover_layout(model, include_bias=True)
    assert full.block_size("Q") == D_MODEL * 8 + 8 and full.block_size("O") == D_MODEL * 8
    sub = full.subset(layers=[1], blocks=["K", "O"])
    assert set(sub.blocks) == {("K", 1), ("O", 1)} and sub.layers == (1,) and sub.n_layers == 2
    assert sub.blocks[("K", 1)] is full.blocks[("K", 1)]
    assert sub.projection_modules == ("model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj")
    assert sub.param_names == (
        "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.o_proj.weight",
    )
    with pytest.raises(ValueError, match="layers"):
        full.subset(layers=[2])
    with pytest.raises(KeyError):
        sub.block_size("Q")
    summary = json.loads(json.dumps(full.summary()))
    assert summary["n_kv_heads"] == 2 and summary["block_size"]["K"] == D_MODEL * 8 + 8
    assert summary["attention_modules"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    # GPT-J builds k, v, q in that order: projection_modules follow the model, not Q/K/V/O
    assert discover_layout(build("gptj")).projection_modules[:4] == tuple(
        f"transformer.h.0.attn.{n}" for n in ("k_proj", "v_proj", "q_proj", "out_proj")
    )


def test_block_size_refuses_layers_of_different_sizes():
    model = ToyLM(kind="split", KV=2)
    model.blocks[1].attn.wq.bias = None  # only layer 0 has a Q bias
    layout = discover_layout(model, _toy_spec("split", 2, False), include_bias=True)
    assert layout.blocks[("Q", 0)].size == D_MODEL * 8 + 8 and layout.blocks[("Q", 1)].size == D_MODEL * 8
    with pytest.raises(ValueError, match="different sizes"):
        layout.block_size("Q")
    assert layout.summary()["block_size"] == {"Q": [D_MODEL * 8 + 8, D_MODEL * 8], "K": D_MODEL * 8 + 8, "V": D_MODEL * 8 + 8, "O": D_MODEL * 8}


@pytest.mark.parametrize("case", CASES)
def test_strided_slices_equal_the_index_gather(case):
    """Where a part's entries are rows at fixed strides (`ParamPart.strides`: every layout qkov
    knows), `slice_block` takes a strided view of the gradients instead of gathering by index:
    the same values in the same order, with a sample axis in front as extraction has it."""
    model = build(case)
    layout = discover_layout(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    grads = {n: torch.randn(3, *params[n].shape, generator=g) for n in layout.param_names}
    strided = 0
    for bs in layout.blocks.values():
        got = slice_block(bs, grads)
        want = torch.cat([grads[p.param].reshape(3, -1)[:, torch.as_tensor(p.index)] for p in bs.parts], dim=-1)
        assert torch.equal(got, want), (bs.block, bs.layer)
        strided += sum(p.strides() is not None for p in bs.parts)
    assert strided > 0
