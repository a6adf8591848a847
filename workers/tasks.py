"""Task files: rows of text, prompt/completion pairs, chats or pre-tokenised input_ids,
read into token samples.

Formats, by path: `.csv`, `.parquet`/`.pq`, a folder written by Hugging Face
`datasets`' `save_to_disk` (one split), anything else JSON Lines (one object per line).
A row has a text field (tokenised with the model's tokenizer, special tokens as the
tokenizer adds them by default), a prompt and a completion field, a chat (a list of
{role, content} messages, rendered with the tokenizer's chat template) or `input_ids`
(a list of non-negative ints, with optional HF-style `labels`: -100 = not predicted);
an optional id field and an optional int `label` (sequence classification). With
`loss = "completion"` only the completion's tokens (a chat's assistant turns) are
predicted: `Sample.targets`. Sample ids are kept exactly as the user wrote them, so
query output can be traced back to the user's data. Every error names the file and the
line or row (or the sample ids) to fix.
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
    # loss = "completion": which tokens the loss predicts (a prompt's are False, as HF's -100
    # labels); None = every next-token prediction counts
    targets: tuple[bool, ...] | None = None


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
    line: int  # 1-based line (JSONL, CSV) or row (Parquet, datasets folder) in the file
    where: str  # "path: line k" / "path: row k", for messages
    id: str
    tokens: list[int] | None
    text: str | None
    label: int | None
    targets: list[bool] | None = None
    prompt: str | None = None  # prompt/completion rows, tokenised as the two parts
    messages: list[dict] | None = None  # chat rows


def _file_bytes(path: Path, spec: TaskSpec) -> bytes:
    if not path.is_file():
        raise TaskFileError(f"task {spec.name!r}: task file not found: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise TaskFileError(f"task {spec.name!r}: cannot read the task file {path} ({e.strerror or e})") from None


def _limited(rows: list, path: Path, spec: TaskSpec, what: str) -> list:
    if not rows:
        raise TaskFileError(f"{path}: empty task file (expected {what})")
    if spec.limit is not None and spec.limit > len(rows):
        raise TaskFileError(f"{path}: limit={spec.limit} but the file has only {len(rows)} rows; lower the limit or remove it")
    return rows[: spec.limit]


def _read_lines(path: Path, spec: TaskSpec) -> list[tuple[int, str]]:
    """The non-blank lines (1-based line number, content), limited to spec.limit."""
    raw = _file_bytes(path, spec)
    lines = []
    for k, b in enumerate(raw.splitlines(), 1):
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskFileError(f"{path}: line {k}: not UTF-8 text (undecodable byte 0x{b[e.start]:02x} at byte {e.start + 1} "
                                "of the line); save the file as UTF-8") from None
        if s.strip():
            lines.append((k, s.removeprefix("\ufeff") if k == 1 else s))
    return _limited(lines, path, spec, "one JSON object per line")


def _jsonl_records(path: Path, spec: TaskSpec) -> list[tuple[int, str, dict]]:
    out = []
    for line, s in _read_lines(path, spec):
        where = f"{path}: line {line}"
        try:
            row = json.loads(s, parse_float=_RawFloat)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise TaskFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        out.append((line, where, row))
    return out


_JSON_CELLS = ("input_ids", "labels")  # CSV cells holding a JSON list (a chat field too)


def _csv_cell(key: str, value: str, spec: TaskSpec, where: str) -> Any:
    """A CSV cell as the JSON row would hold it: lists and chats are JSON text, `label` an int."""
    if key in _JSON_CELLS or key == spec.messages_field:
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{where}: column {key!r} is not a JSON list ({e.msg} at column {e.colno})") from None
    if key == "label":
        try:
            return int(value)
        except ValueError:
            return value  # refused below with the field's own message
    return value


def _csv_records(path: Path, spec: TaskSpec) -> list[tuple[int, str, dict]]:
    import csv
    import io

    try:
        text = _file_bytes(path, spec).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text (undecodable byte at byte {e.start + 1}); save the file as UTF-8") from None
    csv.field_size_limit(2**31 - 1)  # a long document is one cell (the default stops at 128 KiB)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out = []
    try:
        for record in reader:
            where = f"{path}: line {reader.line_num}"
            if None in record or None in record.values():
                raise TaskFileError(f"{where}: {len(record) - (None in record)} columns expected, as in the header "
                                    f"{reader.fieldnames}; quote cells that hold commas")
            # an empty cell is a missing field, as an absent key in JSON
            row = {k: _csv_cell(k, v, spec, where) for k, v in record.items() if v != ""}
            if row:
                out.append((reader.line_num, where, row))
    except csv.Error as e:
        raise TaskFileError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    return _limited(out, path, spec, "a header line, then one row per sample")


def _table_records(path: Path, spec: TaskSpec, batches, what: str) -> list[tuple[int, str, dict]]:
    """Rows of Arrow record batches (Parquet, a datasets folder), read no further than spec.limit."""
    out: list[tuple[int, str, dict]] = []
    for batch in batches:
        for row in batch.to_pylist():
            k = len(out) + 1
            out.append((k, f"{path}: row {k}", {key: v for key, v in row.items() if v is not None}))
        if spec.limit is not None and len(out) >= spec.limit:
            break
    return _limited(out, path, spec, what)


def _parquet_records(path: Path, spec: TaskSpec) -> list[tuple[int, str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise TaskFileError(f"task {spec.name!r}: task file not found: {path}")
    try:
        return _table_records(path, spec, pq.ParquetFile(path).iter_batches(batch_size=1024), "one row per sample")
    except (pa.ArrowException, OSError) as e:
        raise TaskFileError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _dataset_records(path: Path, spec: TaskSpec) -> list[tuple[int, str, dict]]:
    """A folder from `datasets.Dataset.save_to_disk`: its Arrow stream files, in order."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise TaskFileError(f"{path}: a DatasetDict folder (splits {splits}); set the task's path to one split's folder, "
                            f"e.g. {path / (splits[0] if splits else 'train')}")
    try:
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise TaskFileError(f"{path}: a folder, but not one written by datasets' save_to_disk (no readable state.json "
                            "listing its data files); give a .jsonl, .csv or .parquet file or such a folder") from None

    def batches():
        for f in files:
            try:
                with pa.memory_map(str(f)) as source:
                    yield from pa.ipc.open_stream(source)
            except (pa.ArrowException, OSError) as e:
                raise TaskFileError(f"{f}: not a readable Arrow file of the dataset ({str(e).splitlines()[0]})") from None

    return _table_records(path, spec, batches(), "one row per sample")


def _records(path: Path, spec: TaskSpec) -> list[tuple[int, str, dict]]:
    """(line or row number, where, row) of a task file in any supported format, up to spec.limit."""
    if path.is_dir():
        return _dataset_records(path, spec)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(path, spec)
    if suffix in (".parquet", ".pq"):
        return _parquet_records(path, spec)
    return _jsonl_records(path, spec)


def _labels_targets(row: dict, tokens: list[int], where: str) -> list[bool]:
    """HF causal-LM labels (-100 = not predicted, else the token itself) as a target mask."""
    labels = row["labels"]
    if not (isinstance(labels, list) and len(labels) == len(tokens)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in labels)):
        raise TaskFileError(f"{where}: labels must be a list of ints as long as input_ids ({len(tokens)}), -100 where "
                            "a token is not predicted")
    bad = [t for t, (x, y) in enumerate(zip(labels, tokens)) if x != -100 and x != y]
    if bad:
        raise TaskFileError(f"{where}: labels[{bad[0]}] = {labels[bad[0]]} is neither -100 nor the token input_ids[{bad[0]}] "
                            f"= {tokens[bad[0]]}; a causal LM predicts its own next tokens")
    return [x != -100 for x in labels]


def _text_value(row: dict, field: str, where: str, sid: str) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise TaskFileError(f"{where} (sample {sid!r}): field {field!r} must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict, field: str, where: str, sid: str) -> list[dict]:
    msgs = row[field]
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
    if not ok:
        raise TaskFileError(f"{where} (sample {sid!r}): {field!r} must be a list of {{\"role\": ..., \"content\": ...}} "
                            "messages with string values")
    if not any(m["role"] == "assistant" for m in msgs):
        raise TaskFileError(f"{where} (sample {sid!r}): the chat has no assistant turn, so nothing to predict with "
                            "loss = \"completion\"")
    return msgs


def _content(row: dict, spec: TaskSpec, line: int, where: str, sid: str) -> _Row:
    """The row's tokens or text to tokenise, by the spec's fields (ids and label filled by the caller)."""
    out = _Row(line, where, sid, None, None, None)
    if "input_ids" in row:
        if not _is_token_list(row["input_ids"]):
            raise TaskFileError(f"{where} (sample {sid!r}): input_ids must be a list of ints >= 0")
        out.tokens = row["input_ids"]
        if isinstance(row.get(spec.text_field), str):
            out.text = row[spec.text_field]  # display only: the input_ids are what is scored
        if spec.loss == "completion":
            if "labels" not in row:
                raise TaskFileError(f"{where} (sample {sid!r}): loss = \"completion\" with input_ids needs HF-style "
                                    "`labels` (-100 where a token is not predicted)")
            out.targets = _labels_targets(row, out.tokens, f"{where} (sample {sid!r})")
    elif spec.prompt_field is not None:
        missing = [f for f in (spec.prompt_field, spec.completion_field) if f not in row]
        if missing:
            raise TaskFileError(f"{where}: row has no {missing} (its fields: {sorted(row)}); set prompt_field and "
                                "completion_field in the job's task section to the row's keys")
        out.prompt = _text_value(row, spec.prompt_field, where, sid)
        out.text = _text_value(row, spec.completion_field, where, sid)  # the completion until tokenised
    elif spec.loss == "completion" and spec.messages_field in row:
        out.messages = _messages(row, spec.messages_field, where, sid)
    elif spec.loss == "completion":
        raise TaskFileError(f"{where}: loss = \"completion\" needs prompt_field and completion_field, chat rows "
                            f"({spec.messages_field!r}: a list of messages) or input_ids with labels; the row's fields: "
                            f"{sorted(row)}")
    elif spec.text_field in row:
        out.text = _text_value(row, spec.text_field, where, sid)
    else:
        raise TaskFileError(
            f"{where}: row has neither the text field {spec.text_field!r} nor 'input_ids' "
            f"(its fields: {sorted(row)}); set text_field in the job's task section if the text is under another key"
        )
    return out


def _parse_record(line: int, where: str, row: dict, index: int, spec: TaskSpec, label: str) -> _Row:
    if spec.id_field is not None and spec.id_field in row:
        sid = _id_str(row[spec.id_field])
        if not sid:
            raise TaskFileError(f"{where}: id field {spec.id_field!r} must be a non-empty string or a number, got {row[spec.id_field]!r}")
    else:
        sid = f"{label}-{index}"
    out = _content(row, spec, line, where, sid)

    for what, value in (("id", sid), ("text", out.text), ("prompt", out.prompt)):
        if value is not None and not _encodable(value):
            raise TaskFileError(f"{where} (sample {sid.encode('utf-8', 'backslashreplace').decode()!r}): the {what} holds "
                                "an unpaired surrogate escape (e.g. \\ud800), which is not text; fix or remove it")
    if "\0" in sid:  # the store keeps ids as fixed-width strings, which drop NULs: 'a\0' would read back as 'a'
        raise TaskFileError(f"{where} (sample {sid!r}): the id holds a NUL character (\\u0000), which a stored id "
                            "cannot keep; remove it")

    lab = row.get("label")
    if lab is not None and (not isinstance(lab, int) or isinstance(lab, bool) or lab < 0):
        raise TaskFileError(f"{where} (sample {sid!r}): label must be an int >= 0 (a class index), got {lab!r}")
    out.label = lab
    return out


def _chat_ids(tokenizer: Any, messages: list[dict], **kw) -> list[int]:
    got = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(got["input_ids"] if hasattr(got, "keys") else got)


def _tokenize_chat(r: _Row, tokenizer: Any) -> None:
    """A chat's tokens by the tokenizer's template; its assistant turns (from the end of the
    generation prompt before each to the end of the turn, closing tokens included) are the targets."""
    if not getattr(tokenizer, "chat_template", None):
        raise TaskFileError(f"{r.where}: chat rows need a tokenizer with a chat template; this model's has none")
    full = _chat_ids(tokenizer, r.messages)
    targets = [False] * len(full)
    for k, m in enumerate(r.messages):
        if m["role"] != "assistant":
            continue
        start = len(_chat_ids(tokenizer, r.messages[:k], add_generation_prompt=True))
        upto = _chat_ids(tokenizer, r.messages[: k + 1])
        if full[: len(upto)] != upto:
            raise TaskFileError(f"{r.where} (sample {r.id!r}): the chat template renders turn {k + 1} differently once "
                                "later turns follow, so its tokens cannot be located; give prompt/completion fields instead")
        targets[start : len(upto)] = [True] * (len(upto) - start)
    r.tokens, r.targets = full, targets
    r.text = tokenizer.apply_chat_template(r.messages, tokenize=False)


def _tokenize(rows: list[_Row], tokenizer: Any, path: Path, max_length: int, loss: str) -> None:
    """Fill `tokens` (and `targets`) of the text rows in place; a truncated row's text is cut to what its tokens cover."""
    todo = [r for r in rows if r.tokens is None]
    if not todo:
        return
    if tokenizer is None:
        raise TaskFileError(
            f"{path}: tokenizer missing for text tasks: give rows with input_ids or a model folder with a tokenizer"
        )
    for r in todo:
        if r.messages is not None:
            _tokenize_chat(r, tokenizer)
    pairs = [r for r in todo if r.prompt is not None]
    if pairs:  # the prompt as a text of its own (special tokens added), then the completion's tokens
        enc_p = tokenizer([r.prompt for r in pairs], add_special_tokens=True, truncation=False, verbose=False)
        enc_c = tokenizer([r.text for r in pairs], add_special_tokens=False, truncation=False, verbose=False)
        for k, r in enumerate(pairs):
            p, c = list(enc_p["input_ids"][k]), list(enc_c["input_ids"][k])
            r.tokens, r.text = p + c, r.prompt + r.text
            r.targets = [False] * len(p) + [True] * len(c) if loss == "completion" else None
    plain = [r for r in todo if r.tokens is None]
    if not plain:
        return
    offsets = bool(getattr(tokenizer, "is_fast", False))
    # verbose=False: long texts are truncated below, so the "longer than model_max_length" warning is noise.
    enc = tokenizer([r.text for r in plain], add_special_tokens=True, truncation=False, verbose=False,
                    return_offsets_mapping=offsets)
    for k, r in enumerate(plain):
        ids = list(enc["input_ids"][k])
        if len(ids) > max_length:
            if offsets:
                end = max((e for _, e in enc["offset_mapping"][k][:max_length]), default=0)
                r.text = r.text[:end]
            else:
                r.text = tokenizer.decode(ids[:max_length], skip_special_tokens=True)
        r.tokens = ids


def load_task(spec: TaskSpec, tokenizer: Any, max_length: int, label: str) -> list[Sample]:
    """Read a task's file into samples of at most `max_length` tokens.

    `label` is the task's name in the store (Sample.task; also the prefix of default ids
    "{label}-{row index}" for rows without an id). Rows past `spec.limit` are not read.
    """
    path = Path(spec.path)
    rows = [_parse_record(line, where, row, k, spec, label) for k, (line, where, row) in enumerate(_records(path, spec))]
    _tokenize(rows, tokenizer, path, max_length, spec.loss)

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
                f"{r.where}: sample {r.id!r} has {len(ids)} token(s); at least 2 are needed "
                "(the loss predicts each next token)"
            )
        targets = None if r.targets is None else tuple(r.targets[:max_length])
        if targets is not None and not any(targets[1:]):  # the first token is never predicted
            raise TaskFileError(f"{r.where}: sample {r.id!r} has no completion token within the first {max_length} tokens "
                                "(model.max_length), so its completion loss is empty; shorten the prompt or raise max_length")
        samples.append(Sample(id=r.id, task=label, input_ids=ids, text=r.text, label=r.label, targets=targets))
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
        if any(s.targets is not None for s in samples):
            raise TaskFileError(f"task {samples[0].task!r}: loss = \"completion\" predicts a causal LM's next tokens, but "
                                "the model is a sequence classifier; use loss = \"all\" (its loss is the label's)")
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
