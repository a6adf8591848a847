"""Per-sample gradients (qkov.workers.grads) and per-sample losses (qkov.workers.losses).

The reference throughout is the plain definition: each sample alone, unpadded,
`loss.backward()` on transformers' own loss (`labels=`), reading `param.grad`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qkov.workers.grads import per_sample_grads
from qkov.workers.layouts import discover_layout
from qkov.workers.losses import CausalLMLoss, SequenceClassificationLoss, loss_task_for
from qkov.testing import VOCAB, random_batch, tiny_model
from reference import per_sample_grads_loop

LENGTHS = [7, 12, 3, 10]  # padded batch, T = 12
DECODERS = ["gpt2", "llama_gqa", "gpt_neox", "falcon_mq", "falcon_new"]


def _model(arch: str, attn: str = "eager", **kw):
    if arch == "llama_gqa":
        kw.setdefault("attention_bias", True)  # exercise the bias path on split projections
    return tiny_model(arch, attn_implementation=attn, **kw)


def _attention_params(model) -> list[str]:
    return list(discover_layout(model, include_bias=True).param_names)


def _reference(model, batch, lengths, names, labels=None) -> dict[str, torch.Tensor]:
    """Per-sample gradients by a loop: one unpadded sample at a time, HF's loss, param.grad."""
    return per_sample_grads_loop(model, [batch["input_ids"][i, :n] for i, n in enumerate(lengths)], names, labels)


def _assert_grads_close(got: dict, ref: dict, rtol: float) -> None:
    scale = max(float(r.norm()) for r in ref.values())
    for name, r in ref.items():
        g = got[name]
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        for i in range(r.shape[0]):
            err = float((g[i] - r[i]).norm())
            # Norm-relative where the gradient is not structurally ~0 (e.g. a key bias, which
            # softmax ignores, has a gradient of pure round-off); absolute against the global scale.
            if float(r[i].norm()) > 1e-6 * scale:
                assert err <= rtol * float(r[i].norm()), f"{name}[{i}]: rel err {err / float(r[i].norm()):.2e}"
            assert torch.allclose(g[i], r[i], rtol=10 * rtol, atol=1e-7 * scale), name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", DECODERS)
def test_matches_per_sample_loop_causal_lm(arch, attn):
    model = _model(arch, attn)
    batch = random_batch(VOCAB, LENGTHS, seed=1)
    names = _attention_params(model)
    res = per_sample_grads(model, batch, names, loss_task_for(model))
    _assert_grads_close(res.grads, _reference(model, batch, LENGTHS, names), rtol=1e-5)
    assert res.n_tokens.tolist() == LENGTHS
    with torch.no_grad():
        ref_losses = [float(model(input_ids=batch["input_ids"][i : i + 1, :n], labels=batch["input_ids"][i : i + 1, :n]).loss) for i, n in enumerate(LENGTHS)]
    torch.testing.assert_close(res.losses, torch.tensor(ref_losses), rtol=1e-6, atol=1e-6)


def test_matches_per_sample_loop_sequence_classification():
    model = _model("bert")
    batch = random_batch(VOCAB, LENGTHS, seed=2)
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    names = _attention_params(model)
    res = per_sample_grads(model, batch, names, loss_task_for(model))
    _assert_grads_close(res.grads, _reference(model, batch, LENGTHS, names, labels=batch["labels"]), rtol=1e-5)


def test_all_linear_params_including_mlp_and_lm_head():
    # Nothing is attention-specific: every Linear of the model, lm_head included (Llama: untied).
    model = _model("llama_gqa", "sdpa")
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head.weight" in names and any(".mlp." in n for n in names)
    batch = random_batch(VOCAB, LENGTHS, seed=3)
    res = per_sample_grads(model, batch, names, loss_task_for(model))
    _assert_grads_close(res.grads, _reference(model, batch, LENGTHS, names), rtol=1e-5)


def test_batch_size_invariance():
    model = _model("llama_gqa", "sdpa")
    lengths = [5, 11, 2, 9, 12, 4, 8, 6]
    full = random_batch(VOCAB, lengths, seed=4)
    names = _attention_params(model)
    task = loss_task_for(model)

    def in_batches(size):
        parts = []
        for s in range(0, len(lengths), size):
            sub = lengths[s : s + size]
            batch = {k: v[s : s + size, : max(sub)] for k, v in full.items()}  # each batch padded to its own width
            parts.append(per_sample_grads(model, batch, names, task))
        return {n: torch.cat([p.grads[n] for p in parts]) for n in names}, torch.cat([p.losses for p in parts])

    g8, l8 = in_batches(8)
    for size in (1, 3):
        g, losses = in_batches(size)
        torch.testing.assert_close(losses, l8, rtol=1e-6, atol=1e-7)
        _assert_grads_close(g, g8, rtol=2e-6)


def test_bf16_model_returns_float32_close_to_fp32():
    model = _model("llama_gqa", "sdpa")
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    batch = random_batch(VOCAB, LENGTHS, seed=5)
    names = _attention_params(model)
    ref = per_sample_grads(model, batch, names, loss_task_for(model))
    got = per_sample_grads(model16, batch, names, loss_task_for(model16))
    assert got.losses.dtype == torch.float32
    torch.testing.assert_close(got.losses, ref.losses, rtol=2e-2, atol=2e-2)
    for n in names:
        g, r = got.grads[n], ref.grads[n]
        assert g.dtype == torch.float32
        for i in range(len(LENGTHS)):
            assert float((g[i] - r[i]).norm()) <= 0.1 * float(r[i].norm()), (n, i)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_model_state_restored_after_call_and_after_error():
    model = _model("gpt2")
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_("c_attn" not in n)  # a mixed state, to see that it is restored exactly
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = (_hooks(model), {n: m.training for n, m in model.named_modules()})
    batch = random_batch(VOCAB, LENGTHS, seed=6)
    names = _attention_params(model)

    def state():
        return {n: p.requires_grad for n, p in model.named_parameters()}, (_hooks(model), {n: m.training for n, m in model.named_modules()})

    per_sample_grads(model, batch, names, CausalLMLoss())
    assert state() == (flags, before)
    assert all(p.grad is None for p in model.parameters())

    class Failing:
        name = "failing"

        def per_sample_loss(self, model, batch):
            model(**batch)  # hooks fire, then the task fails
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        per_sample_grads(model, batch, names, Failing())
    assert state() == (flags, before)


def test_training_mode_does_not_apply_dropout():
    model = _model("gpt2", resid_pdrop=0.5, attn_pdrop=0.5, embd_pdrop=0.5).train()
    batch = random_batch(VOCAB, LENGTHS, seed=7)
    names = _attention_params(model)
    a = per_sample_grads(model, batch, names, CausalLMLoss())
    b = per_sample_grads(model, batch, names, CausalLMLoss())
    model.eval()
    _assert_grads_close(a.grads, _reference(model, batch, LENGTHS, names), rtol=1e-5)
    for n in names:
        torch.testing.assert_close(a.grads[n], b.grads[n], rtol=0, atol=0)


class _Reuse(nn.Module):
    """A toy LM that calls one Linear twice and shares a weight between two Linears."""

    def __init__(self, vocab=16, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.twice = nn.Linear(d, d)
        self.a = nn.Linear(d, d, bias=False)
        self.b = nn.Linear(d, d, bias=False)
        self.b.weight = self.a.weight  # tied
        self.head = nn.Linear(d, vocab)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        h = torch.tanh(self.b(torch.tanh(self.a(h)))) + h
        return self.head(h)


class _MeanLogit:
    name = "toy"

    def per_sample_loss(self, model, batch):
        # Each sample's own loss: a nonlinear function of its real tokens only.
        logits = model(batch["input_ids"])
        m = batch["attention_mask"].unsqueeze(-1).float()
        return ((logits.sin() * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2))) ** 2


def test_module_called_twice_and_tied_weights_accumulate():
    torch.manual_seed(0)
    model = _Reuse()
    lengths = [4, 6, 2]
    batch = random_batch(16, lengths, seed=8)
    names = ["twice.weight", "twice.bias", "a.weight", "head.weight"]
    res = per_sample_grads(model, batch, names, _MeanLogit())
    params = dict(model.named_parameters())
    for i, n_tok in enumerate(lengths):
        model.zero_grad(set_to_none=True)
        one = {"input_ids": batch["input_ids"][i : i + 1, :n_tok], "attention_mask": batch["attention_mask"][i : i + 1, :n_tok]}
        _MeanLogit().per_sample_loss(model, one)[0].backward()
        for n in names:
            torch.testing.assert_close(res.grads[n][i], params[n].grad, rtol=1e-5, atol=1e-7)


def test_repeated_calls_follow_a_replaced_parameter_and_a_frozen_model():
    """The owners of a name set are remembered per model between calls (host time per batch):
    a parameter replaced since must be found anew, and a model frozen in eval mode once (as a
    worker keeps it) gives the same gradients and stays frozen."""
    model = _model("llama_gqa")
    batch = random_batch(VOCAB, LENGTHS, seed=11)
    names = _attention_params(model)
    per_sample_grads(model, batch, names, CausalLMLoss())
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight = nn.Parameter(torch.randn_like(attn.q_proj.weight))  # a new tensor under the same name
    k = attn.k_proj
    attn.k_proj = nn.Linear(k.in_features, k.out_features, bias=True)  # a new module: its hooks must be on it
    model.requires_grad_(False).eval()
    res = per_sample_grads(model, batch, names, CausalLMLoss())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    model.requires_grad_(True)  # the loop reference reads param.grad
    _assert_grads_close(res.grads, _reference(model, batch, LENGTHS, names), rtol=1e-5)


def test_output_modified_in_place_downstream():
    # Falcon-style `out += residual` on a module's output must not change what we read.
    class OutInPlace(_Reuse):
        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            y = self.twice(h)
            y.mul_(3.0)
            return self.head(torch.tanh(y))

    torch.manual_seed(1)
    model = OutInPlace()
    lengths = [3, 5]
    batch = random_batch(16, lengths, seed=9)
    res = per_sample_grads(model, batch, ["twice.weight"], _MeanLogit())
    for i, n_tok in enumerate(lengths):
        model.zero_grad(set_to_none=True)
        one = {k: v[i : i + 1, :n_tok] for k, v in batch.items()}
        _MeanLogit().per_sample_loss(model, one)[0].backward()
        torch.testing.assert_close(res.grads["twice.weight"][i], model.twice.weight.grad, rtol=1e-5, atol=1e-7)


def test_input_modified_in_place_after_the_call_is_an_error():
    class InPlace(_Reuse):
        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids) * 1.0
            y = self.twice(h)
            h.add_(1.0)  # legal for autograd (mul by a constant does not save h), wrong for us
            return self.head(y + h)

    batch = random_batch(16, [3, 4], seed=9)
    with pytest.raises(RuntimeError, match="modified in place"):
        per_sample_grads(InPlace(), batch, ["twice.weight"], _MeanLogit())


def test_bad_requests_are_clear_errors():
    model = _model("gpt2")
    batch = random_batch(VOCAB, LENGTHS, seed=10)
    task = CausalLMLoss()
    with pytest.raises(KeyError, match="not in the model"):
        per_sample_grads(model, batch, ["transformer.h.0.attn.nope.weight"], task)
    with pytest.raises(ValueError, match="LayerNorm"):
        per_sample_grads(model, batch, ["transformer.h.0.ln_1.weight"], task)
    with pytest.raises(ValueError, match="Embedding"):  # tied to lm_head, but also an Embedding
        per_sample_grads(model, batch, ["transformer.wte.weight"], task)
    left = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="right-padded"):
        per_sample_grads(model, left, ["transformer.h.0.attn.c_attn.weight"], task)
    short = random_batch(VOCAB, [4, 1], seed=10)
    with pytest.raises(ValueError, match="fewer than 2 real tokens"):
        per_sample_grads(model, short, ["transformer.h.0.attn.c_attn.weight"], task)
    assert all(p.requires_grad for p in model.parameters()) and _hooks(model) == 0


def test_causal_lm_loss_matches_hf_and_ignores_padding():
    model = _model("llama_gqa")
    batch = random_batch(VOCAB, LENGTHS, seed=11)
    with torch.no_grad():
        got = CausalLMLoss().per_sample_loss(model, batch)
        for i, n in enumerate(LENGTHS):
            ids = batch["input_ids"][i : i + 1, :n]
            assert abs(float(got[i]) - float(model(input_ids=ids, labels=ids).loss)) < 1e-5
        # Different pad ids leave the loss unchanged: pads never enter it.
        other = dict(batch, input_ids=torch.where(batch["attention_mask"] == 1, batch["input_ids"], 5))
        torch.testing.assert_close(CausalLMLoss().per_sample_loss(model, other), got, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32 and got.shape == (len(LENGTHS),)


def test_loss_task_for():
    assert isinstance(loss_task_for(tiny_model("gpt2")), CausalLMLoss)  # GPT2LMHeadModel
    assert isinstance(loss_task_for(tiny_model("falcon_mq")), CausalLMLoss)
    assert isinstance(loss_task_for(tiny_model("bert")), SequenceClassificationLoss)
    with pytest.raises(ValueError, match="no loss task for model class GPT2Model"):
        loss_task_for(tiny_model("gpt2").transformer)
    with pytest.raises(ValueError, match="labels"):
        SequenceClassificationLoss().per_sample_loss(tiny_model("bert"), random_batch(VOCAB, [3], seed=0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    model = _model("llama_gqa", "sdpa")
    batch = random_batch(VOCAB, LENGTHS, seed=12)
    names = _attention_params(model)
    ref = per_sample_grads(model, batch, names, CausalLMLoss())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = per_sample_grads(copy.deepcopy(model).to("cuda", dtype), batch, names, CausalLMLoss())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for n in names:
        g = got.grads[n]
        assert g.dtype == torch.float32 and g.is_cuda
        for i in range(len(LENGTHS)):
            assert float((g[i].cpu() - ref.grads[n][i]).norm()) <= tol * float(ref.grads[n][i].norm()), (n, i)
