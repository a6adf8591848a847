"""Public testing helpers: tiny real jobs on disk (xbatcher-style).

`tiny_job(tmp, "llama_gqa")` saves a randomly initialised tiny model as a local HF
folder, writes two pre-tokenised task files and returns a validated JobSpec, so
tests (ours and users') exercise the real pipeline end to end in seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .spec import JobSpec, parse_job


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_job(tmp: str | Path, arch: str = "llama_gqa", *, n_a: int = 10, n_b: int = 7, seed: int = 0,
             min_len: int = 4, max_len: int = 12, model_kwargs: dict | None = None, **sections: Any) -> JobSpec:
    """A job on a tiny `arch` model (see workers.testing.ARCHITECTURES) under `tmp`.

    Keyword sections override the job mapping, e.g. extract={"shard_size": 4}.
    The model folder is reused if it already exists (same arch and seed).
    """
    from workers.models import save_tiny
    from workers.testing import VOCAB, tiny_model, write_task_file

    tmp = Path(tmp)
    mdir = tmp / f"model-{arch}-{seed}"
    if not (mdir / "config.json").exists():
        save_tiny(tiny_model(arch, seed=seed, **(model_kwargs or {})), None, mdir)
    a = write_task_file(tmp / f"a-{seed}-{n_a}.jsonl", n_a, VOCAB, min_len, max_len, seed, "a")
    b = write_task_file(tmp / f"b-{seed}-{n_b}.jsonl", n_b, VOCAB, min_len, max_len, seed + 1000, "b")
    job = {
        "model": {"path": str(mdir)},
        "tasks": {"a": {"name": "alpha", "path": str(a)}, "b": {"name": "beta", "path": str(b)}},
        "extract": {"shard_size": 4, "batch_size": 3},
        "stats": {"n_permutations": 99, "n_bootstrap": 99},
        "output": {"path": str(tmp / f"run-{arch}")},
    }
    return parse_job(_merge(job, sections), base_dir=tmp)


def _toml_value(v: Any) -> str:
    import json

    return json.dumps(v)  # JSON scalars, strings and arrays are valid TOML values


def job_toml(config: dict) -> str:
    """A job mapping (e.g. `JobSpec.model_dump(mode="json")`) as TOML text; None values are left out."""
    lines: list[str] = []

    def emit(prefix: str, table: dict) -> None:
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None and not isinstance(v, dict))
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", config)
    return "\n".join(lines) + "\n"


def write_job_file(job: JobSpec | dict, path: str | Path, **sections: Any) -> Path:
    """Write a job (with `sections` overriding it, as in `tiny_job`) as a TOML file for the CLI."""
    # the job itself, storage options included (config_dict() redacts their values)
    config = job.model_dump(mode="json") if isinstance(job, JobSpec) else dict(job)
    p = Path(path)
    p.write_text(job_toml(_merge(config, sections)))
    return p
