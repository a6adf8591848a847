"""Where each attention head lives inside the projection tensors of a model.

Discovery looks at the modules themselves: an attention layer is a module whose
children are linear projections in one of the known arrangements (split q/k/v/o,
GPT-2's fused Conv1D, Phi-3's fused [Q|K|V], NeoX/BLOOM interleaved, Falcon's
multi-query and grouped layouts, BERT's self/output pair). Head counts come from
the module or the model config; everything else (head_dim, KV heads) is derived
from the projection shapes and cross-checked, so a wrong guess fails loudly
instead of slicing the wrong entries. Models qkov does not recognise declare
their layout in the job file (`[model.layout]`, `qkov.pipeline.spec.LayoutSpec`).

The result is a table of flat indices per (block, layer, head) (`BlockSlicing`),
so downstream code never needs to know the architecture. Tables are kept in
factorised form (head offset + shared pattern, `qkov.workers.slicing.ParamPart`), built
one head at a time, so a 7B model's layout never materialises its 17 GB of indices.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import torch.nn as nn

from qkov.pipeline.spec import LayoutSpec
from qkov.workers.slicing import BlockSlicing, ParamPart, factorise
from qkov.pipeline.errors import UnsupportedModelError  # noqa: F401  (re-exported; the error family lives in qkov.pipeline.errors)

BLOCK_ORDER = ("Q", "K", "V", "O")
KINDS = ("split", "fused", "interleaved", "grouped")


@dataclass(frozen=True, eq=False)
class AttentionLayout:
    """Per-head index tables of every attention projection of a model.

    `kind` is how Q/K/V share their projection outputs (one of KINDS): split (own
    tensors), fused ([Q|K|V]), interleaved ((H, 3, hd)) or grouped ((KV, H/KV + 2, hd));
    `architecture` only labels where the modules were recognised (e.g. "gpt2-conv1d").
    """

    architecture: str
    kind: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    attention_modules: tuple[str, ...]  # indexed by (original) layer
    blocks: dict[tuple[str, int], BlockSlicing]
    include_bias: bool
    model_class: str = ""
    _module_rank: dict = field(default_factory=dict, repr=False)  # module path -> position in model.named_modules()

    @property
    def kv_head_of(self) -> np.ndarray:
        """[n_heads] -> the KV head each query head reads (GQA/MQA groups are contiguous)."""
        return np.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)

    @property
    def layers(self) -> tuple[int, ...]:
        """Layer indices present in `blocks` (all of them unless `subset` dropped some)."""
        return tuple(sorted({l for _, l in self.blocks}))

    @property
    def block_names(self) -> tuple[str, ...]:
        present = {b for b, _ in self.blocks}
        return tuple(b for b in BLOCK_ORDER if b in present)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names appearing in any part, in model order."""
        names = {p.param for bs in self.blocks.values() for p in bs.parts}
        return tuple(sorted(names, key=self._param_rank))

    @property
    def projection_modules(self) -> tuple[str, ...]:
        """Paths of the modules owning any part, in model order."""
        mods = {p.rsplit(".", 1)[0] for p in self.param_names}
        return tuple(sorted(mods, key=lambda m: (self._module_rank.get(m, len(self._module_rank)), m)))

    def _param_rank(self, name: str):
        mod, leaf = name.rsplit(".", 1)
        return (self._module_rank.get(mod, len(self._module_rank)), mod, leaf != "weight", leaf)

    def block_size(self, block: str) -> int:
        """Entries per head of `block`; an error if layers disagree (e.g. biases on some layers only)."""
        sizes = {bs.size for (b, _), bs in self.blocks.items() if b == block}
        if not sizes:
            raise KeyError(f"block {block!r} is not in this layout (blocks: {list(self.block_names)})")
        if len(sizes) > 1:
            raise ValueError(f"block {block!r} has different sizes per layer: {sorted(sizes)}")
        return sizes.pop()

    def _sizes(self, block: str) -> int | list[int]:
        """Entries per head of `block`: one number, or one per layer where layers differ."""
        sizes = [bs.size for (b, _), bs in sorted(self.blocks.items(), key=lambda kv: kv[0][1]) if b == block]
        return sizes[0] if len(set(sizes)) == 1 else sizes

    def subset(self, layers=None, blocks=None) -> "AttentionLayout":
        """Only the given layers (original indices kept) and blocks."""
        if layers is not None:
            layers = set(int(l) for l in layers)
            unknown = layers - set(self.layers)
            if unknown:
                raise ValueError(f"layers {sorted(unknown)} are not in this layout (layers: {list(self.layers)})")
        if blocks is not None:
            blocks = set(blocks)
            unknown = blocks - set(self.block_names)
            if unknown:
                raise ValueError(f"blocks {sorted(unknown)} are not in this layout (blocks: {list(self.block_names)})")
        kept = {
            key: bs
            for key, bs in self.blocks.items()
            if (layers is None or key[1] in layers) and (blocks is None or key[0] in blocks)
        }
        return AttentionLayout(
            architecture=self.architecture,
            kind=self.kind,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            v_head_dim=self.v_head_dim,
            attention_modules=self.attention_modules,
            blocks=kept,
            include_bias=self.include_bias,
            model_class=self.model_class,
            _module_rank=self._module_rank,
        )

    def summary(self) -> dict:
        """A JSON-able description, for provenance."""
        return {
            "architecture": self.architecture,
            "kind": self.kind,
            "model_class": self.model_class,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "include_bias": self.include_bias,
            "layers": list(self.layers),
            "blocks": list(self.block_names),
            "block_size": {b: self._sizes(b) for b in self.block_names},
            "attention_modules": list(self.attention_modules),
            "param_names": list(self.param_names),
        }


# --- module inspection -------------------------------------------------------------


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for declared custom models
        return ()
    return (Conv1D,)


def _is_projection(m) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(m, (nn.Linear, *_conv1d_type())) and w is not None and w.dim() == 2


def _auto_weight_layout(m, where: str) -> str:
    """nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]."""
    if isinstance(m, _conv1d_type()):
        return "in_out"
    if isinstance(m, nn.Linear):
        return "out_in"
    raise UnsupportedModelError(
        f"{where} is a {type(m).__name__}, neither nn.Linear nor Conv1D: set weight_layout = \"out_in\" or "
        "\"in_out\" in [model.layout] to say how its weight is stored"
    )


def _get(module: nn.Module, attr: str):
    try:
        return module.get_submodule(attr)
    except AttributeError:
        return None


@dataclass(frozen=True)
class _Found:
    """One attention layer before its index tables: where the projections are and the head counts known."""

    path: str
    architecture: str
    kind: str  # split | fused | interleaved | grouped
    proj: dict  # role ("q","k","v","qkv","o") -> module path relative to `path`
    n_heads: int
    n_kv_heads: int | None = None  # None: derive from shapes
    head_dim: int | None = None
    v_head_dim: int | None = None
    weight_layout: str = "auto"


@dataclass(frozen=True)
class _Arrangement:
    """One known attention arrangement: the projections an attention module holds (role ->
    attribute path), when it applies (a predicate on the module, for arrangements that share
    attribute names), its label and its kind."""

    proj: dict
    architecture: str
    kind: str
    applies: object = None  # module -> bool; None: always


def _flag(name: str):
    return lambda m: bool(getattr(m, name, False))


# Every arrangement discovery recognises, tried in order; the first whose projections all
# exist (and that applies) wins. A new layout is one row here, plus one entry in the support
# matrix qkov.testing.SUPPORTED, which the parametrised tests pick up.
KNOWN_ARRANGEMENTS = (
    _Arrangement(dict(q="q_proj", k="k_proj", v="v_proj", o="o_proj"), "split", "split"),  # Llama, Mistral, Qwen2/3, Gemma 1-3
    _Arrangement(dict(q="q_proj", k="k_proj", v="v_proj", o="out_proj"), "split", "split"),  # OPT, GPT-J
    _Arrangement(dict(q="q_proj", k="k_proj", v="v_proj", o="dense"), "split", "split"),  # Phi
    _Arrangement(dict(q="self.query", k="self.key", v="self.value", o="output.dense"), "bert-split", "split"),  # BERT/RoBERTa
    _Arrangement(dict(qkv="c_attn", o="c_proj"), "gpt2-conv1d", "fused"),  # GPT-2 (Conv1D)
    _Arrangement(dict(qkv="qkv_proj", o="o_proj"), "fused-qkv", "fused"),  # Phi-3
    # Falcon's module flags select its split (FalconAttention._split_heads); NeoX/BLOOM are interleaved.
    _Arrangement(dict(qkv="query_key_value", o="dense"), "falcon-grouped", "grouped", _flag("new_decoder_architecture")),
    _Arrangement(dict(qkv="query_key_value", o="dense"), "falcon-multi-query", "fused", _flag("multi_query")),
    _Arrangement(dict(qkv="query_key_value", o="dense"), "neox-interleaved", "interleaved"),  # GPT-NeoX, BLOOM, Falcon MHA
)
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")


def _n_heads(module: nn.Module, config) -> int | None:
    for a in _HEAD_ATTRS:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    if config is not None:
        v = getattr(config, "num_attention_heads", None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _recognise(path: str, module: nn.Module, config) -> _Found | None:
    """The layout of `module` if it is an attention layer of a known arrangement."""
    for a in KNOWN_ARRANGEMENTS:
        if all(_is_projection(_get(module, attr)) for attr in a.proj.values()) and (a.applies is None or a.applies(module)):
            hd = getattr(module, "head_dim", None) if a.kind == "split" else None  # fused kinds derive it from O
            return _Found(path, a.architecture, a.kind, dict(a.proj), _n_heads(module, config),
                          head_dim=hd if isinstance(hd, int) else None)
    return None


def _glob_match(pattern: str, path: str) -> bool:
    """Segment-wise glob: `*` stays within one dotted segment."""
    ps, xs = pattern.split("."), path.split(".")
    return len(ps) == len(xs) and all(fnmatch.fnmatchcase(x, p) for p, x in zip(ps, xs))


def _declared(spec: LayoutSpec, path: str) -> _Found:
    roles = ("q", "k", "v") if spec.kind == "split" else ("qkv",)
    proj = {r: getattr(spec, r) for r in roles} | {"o": spec.o}
    return _Found(
        path, "declared", spec.kind, proj, spec.n_heads, spec.n_kv_heads or spec.n_heads, spec.head_dim,
        spec.v_head_dim or spec.head_dim, spec.weight_layout,
    )


# --- shapes -> head dimensions -------------------------------------------------------


@dataclass(frozen=True)
class _Proj:
    path: str  # full module path
    n_out: int
    n_in: int
    layout: str  # out_in | in_out
    has_bias: bool


def _projection(model: nn.Module, found: _Found, role: str) -> _Proj:
    rel = found.proj[role]
    full = f"{found.path}.{rel}" if found.path else rel
    m = _get(model, full)
    if m is None or getattr(m, "weight", None) is None or m.weight.dim() != 2:
        raise UnsupportedModelError(f"{full}: no module with a 2-D weight at this path (the {role!r} projection)")
    layout = _auto_weight_layout(m, full) if found.weight_layout == "auto" else found.weight_layout
    r, c = m.weight.shape
    n_out, n_in = (r, c) if layout == "out_in" else (c, r)
    return _Proj(full, int(n_out), int(n_in), layout, getattr(m, "bias", None) is not None)


def _div(a: int, b: int, what: str, where: str) -> int:
    if b <= 0 or a % b:
        raise UnsupportedModelError(f"{where}: {what}: {a} is not divisible by {b}; the layout does not fit the shapes")
    return a // b


def _dims(found: _Found, p: dict[str, _Proj]) -> tuple[int, int, int, int]:
    """(n_heads, n_kv_heads, head_dim, v_head_dim), derived from the shapes and checked against what is known."""
    where = f"{found.path} ({found.architecture}, kind={found.kind})"
    H = found.n_heads
    if H is None:
        raise UnsupportedModelError(f"{where}: cannot tell the number of heads (no num_heads attribute, no config)")
    o_in = p["o"].n_in
    if found.kind == "split":
        hd = _div(p["q"].n_out, H, "q projection outputs / n_heads", where)
        KV = _div(p["k"].n_out, hd, "k projection outputs / head_dim", where)
        vhd = _div(p["v"].n_out, KV, "v projection outputs / n_kv_heads", where)
    else:
        hd = vhd = _div(o_in, H, "o projection inputs / n_heads", where) if found.head_dim is None else found.head_dim
        if found.v_head_dim is not None:
            vhd = found.v_head_dim
        total = p["qkv"].n_out
        if found.kind == "interleaved":
            KV = H
        elif found.n_kv_heads is not None:
            KV = found.n_kv_heads
        else:  # fused/grouped: total = H*hd + KV*(hd + vhd)
            KV = _div(total - H * hd, hd + vhd, "(qkv outputs - n_heads*head_dim) / (head_dim + v_head_dim)", where)
        if found.kind in ("interleaved", "grouped") and vhd != hd:
            raise UnsupportedModelError(f"{where}: kind {found.kind!r} needs v_head_dim == head_dim, got {vhd} != {hd}")
        if total != H * hd + KV * (hd + vhd):
            raise UnsupportedModelError(
                f"{where}: fused projection has {total} outputs, expected n_heads*head_dim + n_kv_heads*(head_dim+v_head_dim)"
                f" = {H}*{hd} + {KV}*({hd}+{vhd}) = {H * hd + KV * (hd + vhd)}"
            )
    for name, want, got in (
        ("head_dim", found.head_dim, hd),
        ("n_kv_heads", found.n_kv_heads, KV),
        ("v_head_dim", found.v_head_dim, vhd),
    ):
        if want is not None and want != got:
            raise UnsupportedModelError(f"{where}: {name} is {want} but the projection shapes give {got}")
    if KV < 1 or H % KV:
        raise UnsupportedModelError(f"{where}: n_heads={H} is not a multiple of n_kv_heads={KV}")
    if o_in != H * vhd:
        raise UnsupportedModelError(f"{where}: o projection has {o_in} inputs, expected n_heads*v_head_dim = {H}*{vhd}")
    return H, KV, hd, vhd


# --- index tables (pure) --------------------------------------------------------------


def qkv_features(kind: str, H: int, KV: int, hd: int, vhd: int) -> dict[str, np.ndarray]:
    """Output features of each head's Q/K/V, as [heads, dim] index arrays into the (fused) output axis.

    split: each block is its own tensor, head-major. fused: [Q | K | V] with GQA sizes.
    interleaved: outputs viewed as (H, 3, hd). grouped: (KV, H/KV + 2, hd) — each
    group's query heads, then its K, then its V (Falcon new_decoder_architecture).
    """
    if kind == "split":
        return {"Q": np.arange(H * hd).reshape(H, hd), "K": np.arange(KV * hd).reshape(KV, hd), "V": np.arange(KV * vhd).reshape(KV, vhd)}
    if kind == "fused":
        q, k = H * hd, KV * hd
        return {
            "Q": np.arange(q).reshape(H, hd),
            "K": q + np.arange(k).reshape(KV, hd),
            "V": q + k + np.arange(KV * vhd).reshape(KV, vhd),
        }
    if kind == "interleaved":
        idx = np.arange(H * 3 * hd).reshape(H, 3, hd)
        return {"Q": idx[:, 0], "K": idx[:, 1], "V": idx[:, 2]}
    if kind == "grouped":
        G = H // KV
        idx = np.arange(KV * (G + 2) * hd).reshape(KV, G + 2, hd)
        return {"Q": idx[:, :G].reshape(H, hd), "K": idx[:, G], "V": idx[:, G + 1]}
    raise ValueError(f"unknown layout kind {kind!r}; expected one of {KINDS}")


def output_rows_index(feat: np.ndarray, n_out: int, n_in: int, layout: str) -> np.ndarray:
    """Flat weight indices of the output features `feat` [heads, d]: [heads, d*n_in], row-major per head."""
    feat = np.asarray(feat, dtype=np.int64)
    if layout == "out_in":  # weight [out, in]; the head's sub-tensor is weight[feat, :]
        idx = feat[:, :, None] * n_in + np.arange(n_in)[None, None, :]
    else:  # weight [in, out]; the sub-tensor is weight[:, feat]
        idx = np.arange(n_in)[None, :, None] * n_out + feat[:, None, :]
    return idx.reshape(len(feat), -1)


def input_cols_index(feat: np.ndarray, n_out: int, n_in: int, layout: str) -> np.ndarray:
    """Flat weight indices of the input features `feat` [heads, d]: [heads, n_out*d], row-major per head."""
    feat = np.asarray(feat, dtype=np.int64)
    if layout == "out_in":  # weight [out, in]; the sub-tensor is weight[:, feat]
        idx = np.arange(n_out)[None, :, None] * n_in + feat[:, None, :]
    else:  # weight [in, out]; the sub-tensor is weight[feat, :]
        idx = feat[:, :, None] * n_out + np.arange(n_out)[None, None, :]
    return idx.reshape(len(feat), -1)


def _weight_shape(p: _Proj) -> tuple[int, int]:
    return (p.n_out, p.n_in) if p.layout == "out_in" else (p.n_in, p.n_out)


def _part(param: str, shape: tuple[int, int], feat: np.ndarray, index_fn, n_out: int, n_in: int, layout: str) -> ParamPart:
    """The ParamPart of `index_fn(feat, ...)` without building the whole table: when every head's
    features are head 0's shifted by a constant (checked exactly on `feat`), its indices are head
    0's shifted by constant·stride, because the index functions are elementwise affine in the
    feature value. That is checked on the first and last heads' rows (the whole table of a 7B
    model takes seconds per layer to build and compare)."""
    feat = np.asarray(feat, dtype=np.int64)
    f = factorise(feat)
    if f is None:
        return ParamPart(param, shape, index_fn(feat, n_out, n_in, layout))
    pattern = index_fn(feat[:1], n_out, n_in, layout)[0]
    stride = int(index_fn(np.array([[1]]), n_out, n_in, layout)[0, 0] - index_fn(np.array([[0]]), n_out, n_in, layout)[0, 0])
    base = f[0] * stride
    for h in sorted({0, len(feat) - 1}):
        if not np.array_equal(index_fn(feat[h : h + 1], n_out, n_in, layout)[0], base[h] + pattern):
            return ParamPart(param, shape, index_fn(feat, n_out, n_in, layout))
    return ParamPart(param, shape, base=base, pattern=pattern)


def _layer_blocks(found: _Found, p: dict[str, _Proj], dims, layer: int, include_bias: bool) -> dict[tuple[str, int], BlockSlicing]:
    H, KV, hd, vhd = dims
    feats = qkv_features(found.kind, H, KV, hd, vhd)
    out = {}
    for b in ("Q", "K", "V"):
        proj = p["qkv"] if found.kind != "split" else p[b.lower()]
        parts = [_part(f"{proj.path}.weight", _weight_shape(proj), feats[b], output_rows_index, proj.n_out, proj.n_in, proj.layout)]
        if include_bias and proj.has_bias:
            parts.append(ParamPart(f"{proj.path}.bias", (proj.n_out,), feats[b].astype(np.int64)))
        out[(b, layer)] = BlockSlicing(b, layer, len(feats[b]), tuple(parts))
    o = p["o"]
    cols = np.arange(H * vhd).reshape(H, vhd)  # every listed model merges heads head-major
    out[("O", layer)] = BlockSlicing(
        "O", layer, H, (_part(f"{o.path}.weight", _weight_shape(o), cols, input_cols_index, o.n_out, o.n_in, o.layout),)
    )
    return out


# --- discovery -------------------------------------------------------------------------


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:  # noqa: BLE001 - odd configs: fall back to the top-level one
            return cfg
    return cfg


def _find(model: nn.Module, declared: LayoutSpec | None) -> list[_Found]:
    config = _text_config(model)
    found: list[_Found] = []
    inside: str | None = None  # skip the descendants of a recognised attention module
    for path, module in model.named_modules():
        if inside is not None and (path == inside or path.startswith(inside + ".")):
            continue
        inside = None
        f = (_declared(declared, path) if _glob_match(declared.attention, path) else None) if declared else _recognise(path, module, config)
        if f is not None:
            found.append(f)
            inside = path
    return found


def discover_layout(model: nn.Module, declared: LayoutSpec | None = None, include_bias: bool = False) -> AttentionLayout:
    """The attention layout of `model`: recognised from its modules, or as `declared`.

    Raises UnsupportedModelError (listing the attention-like modules and a
    `[model.layout]` snippet) when nothing is recognised or matched.
    """
    found = _find(model, declared)
    if not found:
        if declared is not None:
            raise UnsupportedModelError(
                f"[model.layout] attention = {declared.attention!r} matches no module path.\n" + _describe_candidates(model)
            )
        raise UnsupportedModelError(_unsupported_message(model))
    rank = {name: i for i, (name, _) in enumerate(model.named_modules())}
    blocks: dict[tuple[str, int], BlockSlicing] = {}
    all_dims = []
    for layer, f in enumerate(found):
        p = {role: _projection(model, f, role) for role in f.proj}
        dims = _dims(f, p)
        all_dims.append(dims)
        blocks.update(_layer_blocks(f, p, dims, layer, include_bias))
    if len(set(all_dims)) > 1:
        per_layer = ", ".join(f"{f.path}: {d}" for f, d in zip(found, all_dims))
        raise UnsupportedModelError(f"attention layers differ in (n_heads, n_kv_heads, head_dim, v_head_dim): {per_layer}")
    kinds = sorted({f.kind for f in found})
    if len(kinds) > 1:
        per_layer = ", ".join(f"{f.path}: {f.kind}" for f in found)
        raise UnsupportedModelError(f"attention layers differ in layout kind: {per_layer}")
    archs = sorted({f.architecture for f in found})
    H, KV, hd, vhd = all_dims[0]
    return AttentionLayout(
        architecture="+".join(archs),
        kind=kinds[0],
        n_layers=len(found),
        n_heads=H,
        n_kv_heads=KV,
        head_dim=hd,
        v_head_dim=vhd,
        attention_modules=tuple(f.path for f in found),
        blocks=blocks,
        include_bias=include_bias,
        model_class=type(model).__name__,
        _module_rank=rank,
    )


# --- the error for unknown models -------------------------------------------------------


def _attention_like(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that look like attention by class or attribute name (for the error message only)."""
    out = []
    for path, m in model.named_modules():
        label = (type(m).__name__ + " " + path.rsplit(".", 1)[-1]).lower()
        if ("attn" in label or "attention" in label) and not _is_projection(m) and any(True for _ in m.children()):
            out.append((path, m))
    return out


def _projections_of(m: nn.Module, depth: int = 2) -> list[str]:
    rows = []
    for name, sub in m.named_modules():
        if name and name.count(".") < depth and getattr(sub, "weight", None) is not None and sub.weight.dim() == 2:
            rows.append(f"{name}: {type(sub).__name__} weight {tuple(sub.weight.shape)}")
    return rows


def _describe_candidates(model: nn.Module, limit: int = 6) -> str:
    cands = _attention_like(model)
    if not cands:
        return "No attention-like modules were found (no module class or attribute named *Attention*/*attn*)."
    lines = [f"Attention-like modules found ({len(cands)}):"]
    for path, m in cands[:limit]:
        lines.append(f"  {path or '(root)'}  [{type(m).__name__}]")
        lines += [f"      {r}" for r in _projections_of(m)] or ["      (no 2-D weight projections)"]
    if len(cands) > limit:
        lines.append(f"  ... and {len(cands) - limit} more")
    return "\n".join(lines)


def _unsupported_message(model: nn.Module) -> str:
    cands = _attention_like(model)
    glob = ".".join("*" if s.isdigit() else s for s in cands[0][0].split(".")) if cands else "layers.*.attn"
    return (
        f"qkov does not recognise the attention layout of {type(model).__name__}.\n"
        + _describe_candidates(model)
        + "\n\nDeclare the layout in the job file, e.g. (adapt names and sizes):\n"
        "[model.layout]\n"
        f'attention = "{glob}"   # glob over module paths, * = one path segment\n'
        'kind = "split"            # split (q, k, v) | fused [Q|K|V] | interleaved (H,3,hd) | grouped (KV,H/KV+2,hd) (qkv)\n'
        'q = "q_proj"\nk = "k_proj"\nv = "v_proj"   # or: qkv = "qkv"\n'
        'o = "o_proj"\n'
        "n_heads = 8\n"
        "n_kv_heads = 8            # optional, default n_heads\n"
        "head_dim = 64\n"
        'weight_layout = "auto"    # auto (nn.Linear [out,in], Conv1D [in,out]) | out_in | in_out'
    )
