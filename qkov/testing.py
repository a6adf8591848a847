"""qkov's public testing helpers (xbatcher.testing-style): real tiny runs, no model hub.

* `SUPPORTED` — the layout support matrix, one table: every attention arrangement qkov
  must find (DESIGN §5) as a tiny transformers config, with what discovery must report
  (layout kind, head counts, where O lives, how weights are stored). A new layout is one
  entry here; the parametrised tests (layouts, checks, sketches) pick it up.
* `tiny_model(arch)` — a seeded, randomly initialised tiny model of a `SUPPORTED` entry;
  `save_model(model, tokenizer, folder)` — as a local HF folder that `qkov run` loads.
* `write_task_file`, `random_batch` — pre-tokenised task files and padded batches.
* `tiny_job(tmp, arch)` — model + two task files + a validated JobSpec, in seconds;
  `job_toml` / `write_job_file` — the same as a TOML file for the CLI.
* `assert_runs_close(a, b)` — two run stores hold the same results, up to float rounding
  (another CPU, process or reduction order changes the last bits of float32; a real error
  does not hide under the tolerance).
* `plant_heads(run, conflict=…, sharing=…)` — a finished tiny run's scores replaced by
  synthetic ones with known conflict and sharing heads, statistics recomputed (the report's
  "cannot be read backwards" test).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # torch, transformers and the pipeline are imported where used
    import torch
    import xarray as xr

    from qkov.pipeline.spec import JobSpec

VOCAB = 128

# --------------------------------------------------------------------------- the support matrix


@dataclass(frozen=True)
class TinyArchitecture:
    """One supported attention arrangement as a tiny model, and what layout discovery must find in it."""

    name: str
    config: str  # transformers config class
    kwargs: dict[str, Any]  # its constructor arguments
    kind: str  # the AttentionLayout.kind: split | fused ([Q|K|V]) | interleaved ((H,3,hd)) | grouped ((KV,H/KV+2,hd))
    n_heads: int
    n_kv_heads: int
    head_dim: int
    o_proj: str  # the O projection's path inside the attention module
    weight_layout: str = "out_in"  # out_in (nn.Linear) | in_out (GPT-2's Conv1D)
    encoder: bool = False  # a sequence classifier (2 labels) instead of a causal LM
    note: str = field(default="", compare=False)


_NO_DROPOUT = dict(attention_dropout=0.0)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, **_NO_DROPOUT)
_FALCON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=False, alibi=False,
               hidden_dropout=0.0, attention_dropout=0.0)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=72, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)


def _table(*rows: TinyArchitecture) -> dict[str, TinyArchitecture]:
    return {r.name: r for r in rows}


T = TinyArchitecture
SUPPORTED: dict[str, TinyArchitecture] = _table(
    T("gpt2", "GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0),
      "fused", 4, 4, 8, "c_proj", weight_layout="in_out", note="Conv1D, fused c_attn"),
    T("gpt_neox", "GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                                        hidden_dropout=0.0, attention_dropout=0.0),
      "interleaved", 4, 4, 8, "dense"),
    T("bloom", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                                   attention_dropout=0.0),
      "interleaved", 4, 4, 8, "dense"),
    T("llama", "LlamaConfig", dict(**_LLAMA, num_key_value_heads=4), "split", 4, 4, 8, "o_proj"),
    T("llama_gqa", "LlamaConfig", dict(**_LLAMA, num_key_value_heads=2), "split", 4, 2, 8, "o_proj"),
    T("mistral", "MistralConfig", dict(**_LLAMA, num_key_value_heads=2, sliding_window=None), "split", 4, 2, 8, "o_proj"),
    T("qwen2", "Qwen2Config", dict(**_LLAMA, num_key_value_heads=2), "split", 4, 2, 8, "o_proj",
      note="q/k/v biases by construction"),
    T("qwen3", "Qwen3Config", dict(**_LLAMA, num_key_value_heads=2, head_dim=16, attention_bias=False),
      "split", 4, 2, 16, "o_proj", note="q/k RMS norms; head_dim != hidden/heads"),
    T("gemma", "GemmaConfig", dict(**_LLAMA, num_key_value_heads=1, head_dim=16), "split", 4, 1, 16, "o_proj",
      note="MQA, head_dim 16 != 32/4"),
    T("gemma2", "Gemma2Config", dict(**_LLAMA, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                     query_pre_attn_scalar=16),
      "split", 4, 2, 16, "o_proj"),
    T("gemma3", "Gemma3TextConfig", dict(**_LLAMA, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                         query_pre_attn_scalar=16),
      "split", 4, 2, 16, "o_proj"),
    T("phi3", "Phi3Config", dict(**_LLAMA, num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0),
      "fused", 4, 2, 8, "o_proj", note="fused qkv_proj [Q | K | V] with GQA"),
    T("falcon_mq", "FalconConfig", dict(**_FALCON, multi_query=True, new_decoder_architecture=False, parallel_attn=True),
      "fused", 4, 1, 8, "dense", note="old layout, multi-query: one K and one V head"),
    T("falcon_mha", "FalconConfig", dict(**_FALCON, multi_query=False, new_decoder_architecture=False, parallel_attn=True),
      "interleaved", 4, 4, 8, "dense", note="old layout, multi-head: per-head interleaved"),
    T("falcon_new", "FalconConfig", dict(**_FALCON, num_kv_heads=2, new_decoder_architecture=True),
      "grouped", 4, 2, 8, "dense", note="new layout: (KV, H/KV + 2, hd)"),
    T("opt", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2),
      "split", 4, 4, 8, "out_proj"),
    T("phi", "PhiConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0,
                               attention_dropout=0.0, partial_rotary_factor=0.5),
      "split", 4, 4, 8, "dense"),
    T("bert", "BertConfig", dict(**_ENCODER, pad_token_id=0), "split", 4, 4, 8, "output.dense", encoder=True),
    T("roberta", "RobertaConfig", dict(**_ENCODER, pad_token_id=1), "split", 4, 4, 8, "output.dense", encoder=True),
    T("gptj", "GPTJConfig", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
      "split", 4, 4, 8, "out_proj"),
)
del T

ARCHITECTURES: tuple[str, ...] = tuple(SUPPORTED)
ENCODERS: tuple[str, ...] = tuple(a for a, t in SUPPORTED.items() if t.encoder)


def architecture(arch: str) -> TinyArchitecture:
    try:
        return SUPPORTED[arch]
    except KeyError:
        raise ValueError(f"unknown test architecture {arch!r}; known: {list(SUPPORTED)}") from None


# --------------------------------------------------------------------------- models, tasks, jobs


def tiny_model(arch: str, *, seed: int = 0, attn_implementation: str = "eager", dtype=None, **config_overrides):
    """A randomly initialised tiny `arch` model (a `SUPPORTED` key) in eval mode, deterministic for `seed`.

    Decoders get a causal-LM head; encoders a 2-label sequence classifier.
    `config_overrides` are passed to the config's constructor.
    """
    import torch
    import transformers as tf

    a = architecture(arch)
    # the defaults of real vocabularies (50256, 32000) lie outside the tiny one
    cfg = getattr(tf, a.config)(**{"bos_token_id": 1, "eos_token_id": 2, **a.kwargs, **config_overrides})
    torch.manual_seed(seed)
    auto = tf.AutoModelForSequenceClassification if a.encoder else tf.AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=dtype or torch.float32, attn_implementation=attn_implementation)
    return model.eval()


def save_model(model, tokenizer: Any | None, folder: str | Path) -> Path:
    """Save a model (and a tokenizer, if given) as a local HF folder that `[model] path` loads."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def random_batch(vocab: int, lengths: list[int], seed: int = 0, pad_id: int = 0) -> dict[str, "torch.Tensor"]:
    """Right-padded random token batch: input_ids and attention_mask, both LongTensor [B, max(lengths)]."""
    import torch

    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths}")
    g = torch.Generator().manual_seed(seed)
    n_max = max(lengths)
    ids = torch.full((len(lengths), n_max), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), n_max), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def write_task_file(path, n: int, vocab: int, min_len: int, max_len: int, seed: int, id_prefix: str) -> Path:
    """Write `n` pre-tokenised JSONL rows {"id": f"{id_prefix}{k}", "input_ids": [...]}; returns the path."""
    import torch

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


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_job(tmp: str | Path, arch: str = "llama_gqa", *, n_a: int = 10, n_b: int = 7, seed: int = 0,
             min_len: int = 4, max_len: int = 12, model_kwargs: dict | None = None, more: tuple[int, ...] = (),
             **sections: Any) -> "JobSpec":
    """A job on a tiny `arch` model (a `SUPPORTED` key) under `tmp`.

    `more`: sample counts of further tasks c, d, … (named gamma, delta, …), after a and b.
    Keyword sections override the job mapping, e.g. extract={"shard_size": 4}.
    The model folder is reused if it already exists (same arch and seed).
    """
    from qkov.pipeline.spec import parse_job

    tmp = Path(tmp)
    mdir = tmp / f"model-{arch}-{seed}"
    if not (mdir / "config.json").exists():
        save_model(tiny_model(arch, seed=seed, **(model_kwargs or {})), None, mdir)
    a = write_task_file(tmp / f"a-{seed}-{n_a}.jsonl", n_a, VOCAB, min_len, max_len, seed, "a")
    b = write_task_file(tmp / f"b-{seed}-{n_b}.jsonl", n_b, VOCAB, min_len, max_len, seed + 1000, "b")
    job = {
        "model": {"path": str(mdir)},
        "tasks": {"a": {"name": "alpha", "path": str(a)}, "b": {"name": "beta", "path": str(b)},
                  **{key: {"name": name, "path": str(write_task_file(tmp / f"{key}-{seed}-{n}.jsonl", n, VOCAB, min_len, max_len,
                                                                     seed + 1000 * (k + 2), key))}
                     for k, (key, name, n) in enumerate(zip("cdefgh", ("gamma", "delta", "epsilon", "zeta", "eta", "theta"), more))}},
        "extract": {"shard_size": 4, "batch_size": 3},
        "stats": {"n_permutations": 99, "n_bootstrap": 99},
        "output": {"path": str(tmp / f"run-{arch}")},
    }
    return parse_job(_merge(job, sections), base_dir=tmp)


def job_toml(config: dict) -> str:
    """A job mapping (e.g. `JobSpec.model_dump(mode="json")`) as TOML text; None values are left out."""
    lines: list[str] = []

    def emit(prefix: str, table: dict) -> None:
        if prefix:
            lines.append(f"[{prefix}]")
        # JSON scalars, strings and arrays are valid TOML values
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items() if v is not None and not isinstance(v, dict))
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", config)
    return "\n".join(lines) + "\n"


def write_job_file(job: "JobSpec | dict", path: str | Path, **sections: Any) -> Path:
    """Write a job (with `sections` overriding it, as in `tiny_job`) as a TOML file for the CLI."""
    from qkov.pipeline.spec import JobSpec

    # the job itself, storage options included (config_dict() redacts their values)
    config = job.model_dump(mode="json") if isinstance(job, JobSpec) else dict(job)
    p = Path(path)
    p.write_text(job_toml(_merge(config, sections)))
    return p


# --------------------------------------------------------------------------- comparing runs

RESULT_GROUPS = ("gradients", "fisher", "scores", "stats")  # qkov.pipeline.schema: GRADIENTS, FISHER, SCORES_GROUP, STATS
RTOL = 1e-5  # float32 rounding of reordered sums stays orders of magnitude below
BFLOAT16_RTOL = 2.0**-7  # a float32 rounding difference may move a bf16-stored value by one unit in the last place


def _decoded(var: "xr.Variable") -> tuple[Any, float]:
    """Values of a stored variable as numbers, and the relative tolerance of its storage."""
    import numpy as np

    from qkov.pipeline import schema

    v = np.asarray(var.values)
    if var.attrs.get(schema.ATTR_ENCODING) == "bfloat16" and v.dtype == np.uint16:  # stored bf16 bits
        return (v.astype(np.uint32) << 16).view(np.float32), BFLOAT16_RTOL
    return v, RTOL


def _same(x: Any, y: Any, rtol: float = 0.0) -> bool:
    """Equality of attribute values, with NaN equal to NaN (e.g. a float `_FillValue`), arrays
    compared whole, and floats within `rtol` relative: a float attr computed from worker
    results (e.g. a sum over the Fisher) carries the same rounding as the values."""
    import numpy as np

    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k], rtol) for k in x)
    if isinstance(x, (list, tuple, np.ndarray)) or isinstance(y, (list, tuple, np.ndarray)):
        xa, ya = np.asarray(x, dtype=object), np.asarray(y, dtype=object)
        return xa.shape == ya.shape and all(_same(u, v, rtol) for u, v in zip(xa.ravel(), ya.ravel()))
    real = lambda v: isinstance(v, (float, np.floating))  # noqa: E731 - bools and ints stay exact
    if real(x) and real(y):
        if x != x or y != y:
            return x != x and y != y
        return abs(float(x) - float(y)) <= rtol * max(abs(float(x)), abs(float(y)))
    return bool(x == y)


SLICE_DIMS = ("block", "layer", "head", "kv_head")  # one (block, layer, head) slice of the model
LABEL_DIMS = ("score",)  # which quantity (interference, alignment): each keeps its own magnitude


def _scale(magnitude, dims: tuple) -> Any:
    """The magnitude a value's rounding error is measured against: the largest |value| of its
    (block, layer, head) slice when the variable has more dims than those (gradients over
    samples and parameters, scores over sample pairs: rounding follows the slice's terms, and
    slices differ in size by orders of magnitude); else the largest over every slice of the
    same quantity (per-slice statistics such as a mean alignment or a CI bound can be ~0 by
    cancellation of terms as large as the largest statistic)."""
    terms = tuple(i for i, d in enumerate(dims) if d not in SLICE_DIMS + LABEL_DIMS)
    if len(terms) == len(dims):
        return magnitude.max()
    if terms:
        return magnitude.max(axis=terms, keepdims=True)
    slices = tuple(i for i, d in enumerate(dims) if d in SLICE_DIMS)
    return magnitude.max(axis=slices, keepdims=True) if slices else magnitude


def compare_datasets(a: "xr.Dataset", b: "xr.Dataset", *, rtol: float | None = None, what: str = "") -> list[str]:
    """How `a` differs from `b` (the reference), beyond float rounding; [] when they agree.

    Floating-point data (variables and coordinates) must satisfy
    |a − b| ≤ rtol·|b| + rtol·max|b| elementwise, with NaN where the other is NaN; the max is
    over the value's (block, layer, head) slice where the variable has other dims too, else
    over the variable (`_scale`). A reordered float32 sum passes; one value off by 1e-3
    relative fails unless it is under 1 % of that scale. Float attributes must agree within
    rtol relative (they can come from worker results too). Everything else (ids, tasks,
    integers, booleans, shapes, dims, names) and every other attribute but provenance and the
    store's record of its arrays must be equal.
    """
    import numpy as np

    from qkov.pipeline import schema

    out: list[str] = []
    where = f"{what}: " if what else ""
    if set(a.variables) != set(b.variables):
        return [f"{where}variables differ: only in a {sorted(set(a.variables) - set(b.variables))}, "
                f"only in b {sorted(set(b.variables) - set(a.variables))}"]
    if dict(a.sizes) != dict(b.sizes):
        out.append(f"{where}sizes differ: {dict(a.sizes)} != {dict(b.sizes)}")
    # what produced a group and how it is chunked (the store's record of its arrays: a layer-grouped
    # run chunks the Fisher's damping per layer) are not results
    ignored = (schema.ATTR_PROVENANCE, schema.ATTR_ARRAYS)
    drop = lambda attrs: {k: v for k, v in attrs.items() if k not in ignored}  # noqa: E731
    attr_tol = RTOL if rtol is None else rtol
    if not _same(drop(a.attrs), drop(b.attrs), attr_tol):
        keys = sorted(k for k in set(a.attrs) | set(b.attrs)
                      if k not in ignored and not _same(a.attrs.get(k), b.attrs.get(k), attr_tol))
        out.append(f"{where}attrs differ at {keys}")
    for name in sorted(b.variables, key=str):
        va, vb = a.variables[name], b.variables[name]
        label = f"{where}{name}"
        if va.dims != vb.dims or va.shape != vb.shape:
            out.append(f"{label}: dims/shape {va.dims}{va.shape} != {vb.dims}{vb.shape}")
            continue
        if not _same(drop(va.attrs), drop(vb.attrs), attr_tol):
            keys = sorted(k for k in set(va.attrs) | set(vb.attrs) if not _same(va.attrs.get(k), vb.attrs.get(k), attr_tol))
            out.append(f"{label}: attrs differ at {keys}")
        xa, tol_a = _decoded(va)
        xb, tol_b = _decoded(vb)
        if xa.dtype.kind in "OSTU" and xb.dtype.kind in "OSTU":  # text: the storage's string dtype may vary
            xa, xb = xa.astype(object).astype(str), xb.astype(object).astype(str)
        elif xa.dtype != xb.dtype:
            out.append(f"{label}: dtype {xa.dtype} != {xb.dtype}")
            continue
        if not np.issubdtype(xb.dtype, np.floating):
            if not np.array_equal(xa, xb):
                bad = np.flatnonzero(np.asarray(xa != xb).ravel())
                out.append(f"{label}: {len(bad)} of {xb.size} non-float values differ (first at flat index {bad[:5].tolist()})")
            continue
        tol = max(tol_a, tol_b) if rtol is None else rtol
        nan_a, nan_b = np.isnan(xa), np.isnan(xb)
        if not np.array_equal(nan_a, nan_b):
            out.append(f"{label}: NaN at different places ({int(nan_a.sum())} vs {int(nan_b.sum())})")
            continue
        if not (~nan_b).any():
            continue
        fa, fb = np.where(nan_b, 0.0, xa).astype(np.float64), np.where(nan_b, 0.0, xb).astype(np.float64)
        scale = _scale(np.abs(fb), vb.dims)
        err = np.abs(fa - fb)
        bound = tol * np.abs(fb) + tol * scale
        bad = (err > bound) | ~np.isfinite(err)
        if bad.any():
            k = int(np.argmax(np.where(np.isfinite(err), err - bound, np.inf)))
            fa_, fb_, err_, scale_ = fa.ravel(), fb.ravel(), err.ravel(), np.broadcast_to(scale, fb.shape).ravel()
            out.append(f"{label}: {int(bad.sum())} of {fb.size} values differ beyond rtol={tol:g} "
                       f"(worst: {fa_[k]!r} vs {fb_[k]!r}, |diff| {err_[k]:.3g}, scale {scale_[k]:.3g})")
    return out


def assert_runs_close(run_a: str | Path, run_b: str | Path, *, groups: Iterable[str] = RESULT_GROUPS,
                      storage_options_a: dict | None = None, storage_options_b: dict | None = None,
                      rtol: float | None = None) -> None:
    """Two run stores (paths or fsspec URLs) hold the same results up to float rounding.

    Every group in `groups` is read with xarray and compared with `compare_datasets`
    (`run_b` is the reference); an AssertionError lists every difference found.
    """
    import xarray as xr

    problems: list[str] = []
    for group in groups:
        kw = dict(group=group, consolidated=False, decode_cf=False)
        a = xr.open_zarr(str(run_a), storage_options=storage_options_a, **kw).load()
        b = xr.open_zarr(str(run_b), storage_options=storage_options_b, **kw).load()
        problems += compare_datasets(a, b, rtol=rtol, what=group)
    assert not problems, f"{run_a} differs from {run_b}:\n  " + "\n  ".join(problems)



# --------------------------------------------------------------------------- planted heads

Slice = tuple[str, int, int]  # (block, layer, head); K/V: any query head of the KV group


def plant_heads(run: str | Path, *, conflict: Iterable[Slice] = (), sharing: Iterable[Slice] = (),
                seed: int = 0, n_features: int = 24, **stats: Any) -> None:
    """Replace every slice's pooled scores of a finished run (keep_pairs = "all", float32
    scores) by scores of synthetic per-sample gradients g with known answers, then recompute
    its `stats` from them (the run's settings with `stats` overrides, e.g. alternative; by
    default another seed than the stored sums', so that they are not reused).

    With Î + λ = 1, interference M_ij = Σ g_ip² |g_jp| and alignment A_ij = Σ g_ip g_jp over
    `n_features` features, noise N(0, 1) on each task's support:

    * every other slice: separated tasks: A on features [0, ⅔), B on [⅓, 1), each task's
      mean (+1) on its own third only, so the task means are orthogonal (transfer ≈ 0) and the
      overlap is noise (sharing ≈ 0.25, below chance);
    * `sharing`: both tasks identically distributed on every feature with mean 0 (sharing ≈ 1,
      transfer ≈ 0);
    * `conflict`: as the others, with A's mean +1 on [0, ⅔) and B's mean −1 on the shared
      third: a step on B raises A's loss (transfer ≈ −n_features/3, cosine < 0).

    The run's `diagnostics` (norms, outlier flags) still describe the original scores."""
    import dask.array as da
    import numpy as np
    import zarr

    from qkov.pipeline import schema as S
    from qkov.pipeline.slice_reductions import slice_statistics
    from qkov.pipeline.stats_stage import rerun_stats
    from qkov.pipeline.store import RunStore

    store = RunStore(str(run))
    scores = store.open_scores()
    attrs = scores.attrs
    if attrs.get(S.ATTR_SCORES_LAYOUT) not in S.COMPACT_LAYOUTS or S.pooled_name("alignment") not in scores:
        raise ValueError("plant_heads needs a compact-layout run that keeps every pair (keep_pairs = 'all')")
    if attrs.get(S.ATTR_SCORES_DTYPE, "float32") != "float32":
        raise ValueError("plant_heads writes float32 scores only")
    n_a, n_b = int(attrs[S.ATTR_N_A]), int(attrs[S.ATTR_N_B])
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    kv_of = np.asarray(scores[S.KV_HEAD].values)
    third = n_features // 3
    own_a, own_b, shared = slice(0, third), slice(2 * third, n_features), slice(third, 2 * third)

    def key(block: str, layer: int, head: int) -> tuple[str, int, int]:  # the stored (block, layer, head or KV head)
        return block, int(layer), int(kv_of[head]) if S.head_dim(block) == S.KV_HEAD else int(head)

    kinds = {key(*x): "conflict" for x in conflict}
    kinds.update({key(*x): "sharing" for x in sharing})
    group = zarr.open_group(store.zarr(), path=S.SCORES_GROUP, mode="r+")
    for bi, block in enumerate(str(b) for b in scores[S.BLOCK].values):
        arrays = {s: group[S.stored_pooled_name(s, block)] for s in S.SCORES}
        values = {s: np.zeros(a.shape, np.float32) for s, a in arrays.items()}  # one write per array
        full = {s: np.zeros(arrays["interference"].shape, np.float32) for s in S.SCORES}  # unfolded, for the sums
        for li in range(arrays["interference"].shape[0]):
            for hi in range(arrays["interference"].shape[1]):
                layer = int(scores[S.LAYER].values[li])
                kind = kinds.get((block, layer, hi), "separated")
                rng = np.random.default_rng([seed, bi, li, hi])
                g = np.zeros((is_a.size, n_features))
                if kind == "sharing":
                    g[:] = rng.normal(size=g.shape)
                else:
                    g[is_a, : 2 * third] = rng.normal(size=(n_a, 2 * third))
                    g[~is_a, third:] = rng.normal(size=(n_b, n_features - third))
                    g[is_a, own_a] += 1.0
                    g[~is_a, own_b] += 1.0
                    if kind == "conflict":
                        g[is_a, shared] += 1.0
                        g[~is_a, shared] -= 1.0
                inter = (g**2) @ np.abs(g).T
                align = g @ g.T
                for s, m in (("interference", inter), ("alignment", align)):
                    full[s][li, hi] = m = m.astype(np.float32)
                    values[s][li, hi] = S.fold_symmetric(m) if S.ATTR_FOLDED in arrays[s].attrs else m
        for s, arr in arrays.items():
            arr[...] = values[s]
            name = S.stat_sums_name(s, block)
            if name in group:  # the statistics' sums the score stage stored, redone from the new scores
                made = attrs.get(S.ATTR_SUMS_SETTINGS) or {}
                sums = slice_statistics(da.from_array(full[s][None], chunks=(1, 1, 1, -1, -1)), is_a,
                                        int(made["n_permutations"]), int(made["n_bootstrap"]), int(made["seed"]))
                group[name][...] = sums.compute()[0]
    rerun_stats(store, replace=True, **stats)


__all__ = [
    "VOCAB", "TinyArchitecture", "SUPPORTED", "ARCHITECTURES", "ENCODERS", "architecture", "tiny_model", "save_model",
    "random_batch", "write_task_file", "tiny_job", "job_toml", "write_job_file", "RESULT_GROUPS", "compare_datasets",
    "assert_runs_close", "plant_heads",
]
