"""Testing helpers: tiny randomly initialised models of every supported layout.

No model hub is needed: each model is built from its transformers config with a
seeded random init, small enough for CPU tests (2 layers, hidden 32-64, vocab
128, 4 query heads). Variants exercise what the layouts must handle: GQA/MQA
(1-2 KV heads), head_dim != hidden/heads, q/k/v biases, q/k norms, fused and
interleaved QKV, transposed Conv1D, encoders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 128

ARCHITECTURES: tuple[str, ...] = (
    "gpt2",
    "gpt_neox",
    "bloom",
    "llama",
    "llama_gqa",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "falcon_mq",
    "falcon_new",
    "opt",
    "phi",
    "bert",
    "roberta",
    "gptj",
)

ENCODERS = ("bert", "roberta")

_NO_DROPOUT = dict(attention_dropout=0.0)
_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    **_NO_DROPOUT,
)


def _config(arch: str) -> tuple[type, dict[str, Any]]:
    """The transformers config class of a tiny `arch` model and its kwargs."""
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig, dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
        )
    if arch == "bloom":
        return tf.BloomConfig, dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0)
    if arch == "llama":
        return tf.LlamaConfig, dict(**_LLAMA, num_key_value_heads=4)
    if arch == "llama_gqa":
        return tf.LlamaConfig, dict(**_LLAMA, num_key_value_heads=2)
    if arch == "mistral":
        return tf.MistralConfig, dict(**_LLAMA, num_key_value_heads=2, sliding_window=None)
    if arch == "qwen2":  # Qwen2 has q/k/v biases by construction
        return tf.Qwen2Config, dict(**_LLAMA, num_key_value_heads=2)
    if arch == "qwen3":  # q/k RMS norms on head_dim; head_dim decoupled from hidden/heads
        return tf.Qwen3Config, dict(**_LLAMA, num_key_value_heads=2, head_dim=16, attention_bias=False)
    if arch == "gemma":  # MQA, head_dim 16 != 32/4
        return tf.GemmaConfig, dict(**_LLAMA, num_key_value_heads=1, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config, dict(**_LLAMA, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig, dict(**_LLAMA, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    if arch == "phi3":  # fused qkv_proj [Q | K | V] with GQA
        return tf.Phi3Config, dict(**_LLAMA, num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0)
    if arch == "falcon_mq":  # old layout: multi-query, one K and one V head
        return tf.FalconConfig, dict(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
            new_decoder_architecture=False, parallel_attn=True, bias=False, alibi=False,
            hidden_dropout=0.0, attention_dropout=0.0,
        )
    if arch == "falcon_new":  # grouped layout: (KV, H/KV + 2, hd)
        return tf.FalconConfig, dict(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
            new_decoder_architecture=True, bias=False, alibi=False, hidden_dropout=0.0, attention_dropout=0.0,
        )
    if arch == "opt":
        return tf.OPTConfig, dict(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    if arch == "phi":
        return tf.PhiConfig, dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, partial_rotary_factor=0.5,
        )
    if arch in ENCODERS:
        cls = tf.BertConfig if arch == "bert" else tf.RobertaConfig
        return cls, dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=72, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=2, pad_token_id=1 if arch == "roberta" else 0,
        )
    if arch == "gptj":
        return tf.GPTJConfig, dict(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    raise ValueError(f"unknown test architecture {arch!r}; known: {list(ARCHITECTURES)}")


def tiny_model(arch: str, *, seed: int = 0, attn_implementation: str = "eager", dtype=torch.float32, **config_overrides):
    """A randomly initialised tiny `arch` model in eval mode, deterministic for `seed`.

    Decoders get a causal-LM head; bert/roberta a 2-label sequence classifier.
    `config_overrides` are passed to the config's constructor.
    """
    import transformers as tf

    cls, kwargs = _config(arch)
    # the defaults of real vocabularies (50256, 32000) lie outside the tiny one
    kwargs = {"bos_token_id": 1, "eos_token_id": 2, **kwargs, **config_overrides}
    cfg = cls(**kwargs)
    torch.manual_seed(seed)
    auto = tf.AutoModelForSequenceClassification if arch in ENCODERS else tf.AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def random_batch(vocab: int, lengths: list[int], seed: int = 0, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random token batch: input_ids and attention_mask, both LongTensor [B, max(lengths)]."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths}")
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def write_task_file(path, n: int, vocab: int, min_len: int, max_len: int, seed: int, id_prefix: str) -> Path:
    """Write `n` pre-tokenised JSONL rows {"id": f"{id_prefix}{k}", "input_ids": [...]}; returns the path."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    g = torch.Generator().manual_seed(seed)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for k in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(0, vocab, (length,), generator=g).tolist()
            f.write(json.dumps({"id": f"{id_prefix}{k}", "input_ids": ids}) + "\n")
    return p
