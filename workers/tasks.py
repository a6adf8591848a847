"""Task files: JSONL rows of text or pre-tokenised input_ids, read into token samples.

A row is a JSON object with either a text field (tokenised with the model's
tokenizer, special tokens as the tokenizer adds them by default) or `input_ids`
(a list of non-negative ints), an optional id field and an optional int `label`
(sequence classification). Sample ids are kept exactly as the user wrote them, so
query output can be traced back to the user's data. Every error names the file
and the line (or the sample ids) to fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from qkov.pipeline.spec import TaskSpec
from qkov.pipeline.errors import TaskFileError  # noqa: F401  (re-exported; the error family lives in qkov.pipeline.errors)


@dataclass(frozen=True)
class Sample:
    id: str
    task: str
    input_ids: tuple[int, ...]
    text: str | None  # the text the kept tokens cover (None for input_ids rows without text)
    label: int | None


class _RawFloat(float):
    """A JSON number kept with its source spelling, so an id like 1.50 stays "1.50"."""

    raw: str

    def __new__(cls, s: str) -> "_RawFloat":
        f = super().__new__(cls, s)
        f.raw = s
        return f


def _id_str(value: Any) -> str | None:
    """The id as the user wrote it; None when it is not a string or a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, _RawFloat):
        return value.raw
    if isinstance(value, (str, int)):
        return str(value)
    return None


def _encodable(s: str) -> bool:
    """Text that can be written as UTF-8 (JSON's \\ud800 escapes decode to lone surrogates, which cannot)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _is_token_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v)


@dataclass
class _Row:
    line: int  # 1-based line number in the file
    id: str
    tokens: list[int] | None
    text: str | None
    label: int | None


def _read_lines(path: Path, spec: TaskSpec) -> list[tuple[int, str]]:
    """The non-blank lines (1-based line number, content), limited to spec.limit."""
    if not path.is_file():
        raise TaskFileError(f"task {spec.name!r}: task file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TaskFileError(f"task {spec.name!r}: cannot read the task file {path} ({e.strerror or e})") from None
    lines = []
    for k, b in enumerate(raw.splitlines(), 1):
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskFileError(f"{path}: line {k}: not UTF-8 text (undecodable byte 0x{b[e.start]:02x} at byte {e.start + 1} "
                                "of the line); save the file as UTF-8") from None
        if s.strip():
            lines.append((k, s.removeprefix("\ufeff") if k == 1 else s))
    if not lines:
        raise TaskFileError(f"{path}: empty task file (expected one JSON object per line)")
    if spec.limit is not None and spec.limit > len(lines):
        raise TaskFileError(f"{path}: limit={spec.limit} but the file has only {len(lines)} rows; lower the limit or remove it")
    return lines[: spec.limit]


def _parse_row(path: Path, line: int, s: str, index: int, spec: TaskSpec, label: str) -> _Row:
    where = f"{path}: line {line}"
    try:
        row = json.loads(s, parse_float=_RawFloat)
    except json.JSONDecodeError as e:
        raise TaskFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(row).__name__}")

    if spec.id_field is not None and spec.id_field in row:
        sid = _id_str(row[spec.id_field])
        if not sid:
            raise TaskFileError(f"{where}: id field {spec.id_field!r} must be a non-empty string or a number, got {row[spec.id_field]!r}")
    else:
        sid = f"{label}-{index}"

    tokens = text = None
    if "input_ids" in row:
        if not _is_token_list(row["input_ids"]):
            raise TaskFileError(f"{where} (sample {sid!r}): input_ids must be a list of ints >= 0")
        tokens = row["input_ids"]
        if isinstance(row.get(spec.text_field), str):
            text = row[spec.text_field]  # display only: the input_ids are what is scored
    elif spec.text_field in row:
        text = row[spec.text_field]
        if not isinstance(text, str):
            raise TaskFileError(f"{where} (sample {sid!r}): text field {spec.text_field!r} must be a string, got {type(text).__name__}")
    else:
        raise TaskFileError(
            f"{where}: row has neither the text field {spec.text_field!r} nor 'input_ids' "
            f"(its fields: {sorted(row)}); set text_field in the job's task section if the text is under another key"
        )

    for what, value in (("id", sid), ("text", text)):
        if value is not None and not _encodable(value):
            raise TaskFileError(f"{where} (sample {sid.encode('utf-8', 'backslashreplace').decode()!r}): the {what} holds "
                                "an unpaired surrogate escape (e.g. \\ud800), which is not text; fix or remove it")
    if "\0" in sid:  # the store keeps ids as fixed-width strings, which drop NULs: 'a\0' would read back as 'a'
        raise TaskFileError(f"{where} (sample {sid!r}): the id holds a NUL character (\\u0000), which a stored id "
                            "cannot keep; remove it")

    lab = row.get("label")
    if lab is not None and (not isinstance(lab, int) or isinstance(lab, bool) or lab < 0):
        raise TaskFileError(f"{where} (sample {sid!r}): label must be an int >= 0 (a class index), got {lab!r}")
    return _Row(line, sid, tokens, text, lab)


def _tokenize(rows: list[_Row], tokenizer: Any, path: Path, max_length: int) -> None:
    """Fill `tokens` of the text rows in place; a truncated row's text is cut to what its tokens cover."""
    todo = [r for r in rows if r.tokens is None]
    if not todo:
        return
    if tokenizer is None:
        raise TaskFileError(
            f"{path}: tokenizer missing for text tasks: give rows with input_ids or a model folder with a tokenizer"
        )
    offsets = bool(getattr(tokenizer, "is_fast", False))
    # verbose=False: long texts are truncated below, so the "longer than model_max_length" warning is noise.
    enc = tokenizer([r.text for r in todo], add_special_tokens=True, truncation=False, verbose=False,
                    return_offsets_mapping=offsets)
    for k, r in enumerate(todo):
        ids = list(enc["input_ids"][k])
        if len(ids) > max_length:
            if offsets:
                end = max((e for _, e in enc["offset_mapping"][k][:max_length]), default=0)
                r.text = r.text[:end]
            else:
                r.text = tokenizer.decode(ids[:max_length], skip_special_tokens=True)
        r.tokens = ids


def load_task(spec: TaskSpec, tokenizer: Any, max_length: int, label: str) -> list[Sample]:
    """Read a task's JSONL file into samples of at most `max_length` tokens.

    `label` is the task's name in the store (Sample.task; also the prefix of default ids
    "{label}-{row index}" for rows without an id). Rows past `spec.limit` are not read.
    """
    path = Path(spec.path)
    rows = [_parse_row(path, line, s, k, spec, label) for k, (line, s) in enumerate(_read_lines(path, spec))]
    _tokenize(rows, tokenizer, path, max_length)

    seen: dict[str, list[int]] = {}
    for r in rows:
        seen.setdefault(r.id, []).append(r.line)
    dups = {i: lines for i, lines in seen.items() if len(lines) > 1}
    if dups:
        shown = "; ".join(f"{i!r} on lines {lines}" for i, lines in list(dups.items())[:10])
        raise TaskFileError(f"{path}: duplicate sample ids ({len(dups)}): {shown}; sample ids must be unique within a task")

    samples = []
    for r in rows:
        ids = tuple(r.tokens[:max_length])
        if len(ids) < 2:
            raise TaskFileError(
                f"{path}: line {r.line}: sample {r.id!r} has {len(ids)} token(s); at least 2 are needed "
                "(the loss predicts each next token)"
            )
        samples.append(Sample(id=r.id, task=label, input_ids=ids, text=r.text, label=r.label))
    return samples


def validate_vocab(samples: Sequence[Sample], vocab_size: int) -> None:
    """Raise when a sample holds token ids outside the model's vocabulary (naming the samples)."""
    bad = [(s.id, max(s.input_ids)) for s in samples if s.input_ids and max(s.input_ids) >= vocab_size]
    if bad:
        task = samples[0].task
        shown = ", ".join(f"{i!r} (max id {m})" for i, m in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise TaskFileError(
            f"task {task!r}: {len(bad)} sample(s) have token ids >= the model's vocabulary size {vocab_size}: {shown}; "
            "were the input_ids made with another tokenizer?"
        )


def _shown(bad: list[tuple[str, int]], what: str) -> str:
    return ", ".join(f"{i!r} ({what} {m})" for i, m in bad[:10]) + (" ..." if len(bad) > 10 else "")


def validate_positions(samples: Sequence[Sample], n_positions: int | None) -> None:
    """Raise when a sample is longer than the model's learned position table (GPT-2, BERT, OPT…):
    the forward would index past it. None: the model has no such limit (rotary, ALiBi)."""
    if not n_positions:
        return
    bad = [(s.id, len(s.input_ids)) for s in samples if len(s.input_ids) > n_positions]
    if bad:
        raise TaskFileError(
            f"task {samples[0].task!r}: {len(bad)} sample(s) are longer than the model's {n_positions} positions: "
            f"{_shown(bad, 'tokens')}; set model.max_length to at most {n_positions} (longer samples are truncated to it)"
        )


def validate_labels(samples: Sequence[Sample], num_labels: int) -> None:
    """Raise when a classifier's sample has no label or a label outside 0..num_labels-1."""
    missing = [s.id for s in samples if s.label is None]
    if missing:
        raise TaskFileError(f"task {samples[0].task!r}: the model is a sequence classifier but samples {missing[:10]} "
                            "have no integer 'label' field; add one to every row")
    bad = [(s.id, s.label) for s in samples if s.label >= num_labels]
    if bad:
        raise TaskFileError(
            f"task {samples[0].task!r}: {len(bad)} sample(s) have a label outside the classifier's {num_labels} classes "
            f"(0..{num_labels - 1}): {_shown(bad, 'label')}; fix the labels or use a model with more classes (config num_labels)"
        )


def validate_for_model(samples: Sequence[Sample], config: Any, model: Any) -> None:
    """Everything about the samples that the model's config decides, checked before any work:
    token ids inside the vocabulary, lengths inside learned position tables, and a classifier's
    labels inside its classes. `model` may live on the meta device (only its modules are read)."""
    if not samples:
        return
    size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    if size:
        validate_vocab(samples, int(size))
    validate_positions(samples, learned_positions(config, model))
    if type(model).__name__.endswith("ForSequenceClassification"):
        validate_labels(samples, int(getattr(config, "num_labels", 2)))


def learned_positions(config: Any, model: Any) -> int | None:
    """The length of the model's learned absolute position table, or None when it has none."""
    import torch

    has_table = any(isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings", "embed_positions")
                    for name, m in model.named_modules())
    if not has_table:
        return None
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n and getattr(config, "model_type", "") == "roberta":
        n -= int(getattr(config, "pad_token_id", 1) or 1) + 1  # RoBERTa's positions start after the padding index
    return int(n) if n else None
