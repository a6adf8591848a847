"""The job file: TOML validated into small immutable config types.

Errors name the field, what was given and what is allowed (pydantic's messages,
re-worded by `load_job`). Relative paths resolve against the job file's folder.
"""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import JobFileError  # noqa: F401  (re-exported; the error family lives in qkov.pipeline.errors)

Block = Literal["Q", "K", "V", "O"]
KNOWN_MODELS = ("smollm2-135m",)
REDACTED = "<redacted>"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayoutSpec(_Frozen):
    """A declared attention layout for models qkov does not recognise.

    `attention` is a glob over module paths (`blocks.*.attn`); the projections are
    attribute paths relative to each matched module.
    """

    attention: str
    kind: Literal["split", "fused", "interleaved", "grouped"]
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str
    n_heads: int = Field(ge=1)
    n_kv_heads: int | None = Field(default=None, ge=1)
    head_dim: int = Field(ge=1)
    v_head_dim: int | None = Field(default=None, ge=1)
    weight_layout: Literal["auto", "out_in", "in_out"] = "auto"

    @model_validator(mode="after")
    def _projections(self) -> "LayoutSpec":
        if self.kind == "split":
            missing = [n for n in ("q", "k", "v") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"kind='split' needs {missing} (attribute paths of the projections)")
        elif self.qkv is None:
            raise ValueError(f"kind={self.kind!r} needs qkv (attribute path of the fused projection)")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        return self


class ModelSpec(_Frozen):
    path: str | None = None
    name: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    max_length: int = Field(default=128, ge=2)
    layout: LayoutSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of path (a local HF folder) or name " f"(one of {list(KNOWN_MODELS)})")
        if self.name is not None and self.name not in KNOWN_MODELS:
            raise ValueError(f"unknown model name {self.name!r}; known: {list(KNOWN_MODELS)}, or use path = a local HF folder")
        return self


# TaskSpec keys added after runs were first stored, with their defaults (see JobSpec.config_dict)
_TASK_KEYS_ADDED = {"loss": "all", "prompt_field": None, "completion_field": None, "messages_field": "messages"}


class TaskSpec(_Frozen):
    name: str
    path: str
    text_field: str = "text"
    id_field: str | None = "id"
    limit: int | None = Field(default=None, ge=1)
    # "all": every next-token prediction counts (HF labels = input_ids); "completion": only the
    # completion's tokens (prompt labels -100), from prompt_field + completion_field, a chat row's
    # assistant turns (messages_field, the tokenizer's chat template) or input_ids rows' `labels`
    loss: Literal["all", "completion"] = "all"
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str = "messages"

    @model_validator(mode="after")
    def _prompt_pair(self) -> "TaskSpec":
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ValueError("give both prompt_field and completion_field (the row's prompt and its answer), or neither")
        return self


TASK_KEY = re.compile(r"[a-z][a-z0-9_]*")


class TasksSpec(_Frozen):
    """`[tasks.a]`, `[tasks.b]` and any further tasks (`[tasks.c]`, …), in file order after a
    and b. Every unordered pair of them is one question (`pairs`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    a: TaskSpec
    b: TaskSpec
    __pydantic_extra__: dict[str, TaskSpec] = Field(init=False)

    @model_validator(mode="after")
    def _distinct(self) -> "TasksSpec":
        bad = [k for k in self.model_extra if not TASK_KEY.fullmatch(k)]
        if bad:
            raise ValueError(f"task keys {bad} are not lower-case identifiers; name the tables [tasks.c], [tasks.d], … "
                             "(letters, digits, _)")
        seen: dict[str, str] = {}
        for key, task in self.items():
            if task.name in seen:
                raise ValueError(f"tasks.{seen[task.name]}.name and tasks.{key}.name are both {task.name!r}; give them different names")
            seen[task.name] = key
        return self

    def items(self) -> list[tuple[str, TaskSpec]]:
        """(key, task) in store order: a, b, then the others as the job file lists them."""
        return [("a", self.a), ("b", self.b), *self.model_extra.items()]

    def keys(self) -> list[str]:
        return [k for k, _ in self.items()]

    def __getitem__(self, key: str) -> TaskSpec:
        return dict(self.items())[key]

    def __len__(self) -> int:
        return 2 + len(self.model_extra)

    def pairs(self) -> list[tuple[str, str]]:
        """Every unordered pair of task keys, (earlier, later) in store order."""
        keys = self.keys()
        return [(x, y) for i, x in enumerate(keys) for y in keys[i + 1:]]

    def key_of(self, name_or_key: str) -> str | None:
        """The key of a task given by its key or its name (None if neither)."""
        for key, task in self.items():
            if name_or_key in (key, task.name):
                return key
        return None


class FisherSpec(_Frozen):
    # "pooled": every task of the job; a task key: that task alone; "pair": each pair of tasks
    # its own Fisher pooled over the two (what separate two-task runs would use)
    source: str = "pooled"
    beta: float = Field(default=0.99, ge=0.0, lt=1.0)
    batch_size: int = Field(default=16, ge=1)
    damping_rel: float = Field(default=1e-6, ge=0.0)
    damping_abs: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _positive_damping(self) -> "FisherSpec":
        if self.damping_rel == 0 and self.damping_abs == 0:
            raise ValueError("damping_rel and damping_abs are both 0: Î+λ may be 0; set one > 0")
        return self


class ExtractSpec(_Frozen):
    batch_size: int = Field(default=8, ge=1)  # samples per forward/backward; results do not depend on it
    shard_size: int = Field(default=32, ge=1)  # samples per store chunk / per Dask task
    nonfinite: Literal["error", "skip"] = "error"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ScoreSpec(_Frozen):
    # exact: per-sample gradients stored, every pair scored; sketch: their random projections;
    # answers: no per-sample gradient stored, only each task's sums and per-sample scalars
    # (two passes over the model), which every answer but the pair scores is made of
    mode: Literal["exact", "sketch", "answers"] = "exact"
    sketch_dim: int = Field(default=4096, ge=16)
    sketch_seed: int = 0  # seeds the sketch projections (independent of stats.seed, which stats reruns change)
    layers: list[int] | None = None  # None = every attention layer
    blocks: list[Block] = ["Q", "K", "V", "O"]
    storage_dtype: Literal["float32", "bfloat16"] = "float32"
    scores_dtype: Literal["float32", "bfloat16"] = "float32"  # stored pair scores (bf16: half the bytes, ~3 digits)
    # "all": the pooled N×N score matrices are stored; "top": each tile is reduced on the worker to
    # what the statistics need plus the top_k pairs per slice (for query); "none": the sums only.
    # Answers mode: "none", or "top" = the interference also sketched (sketch_dim) for its labels
    # test and top pairs
    keep_pairs: Literal["all", "top", "none"] = "all"
    top_k: int = Field(default=100, ge=1)
    include_bias: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where score tasks run ("auto": the worker's GPU if it has one)

    @model_validator(mode="before")
    @classmethod
    def _answers_keep_pairs(cls, data: Any) -> Any:
        """Answers mode stores no exact pair score: keep_pairs is "none" (nothing N×N formed) or
        "top" (the interference sketched at sketch_dim: its labels test and top pairs); "all",
        the other modes' default that a dumped job carries, means "none" there."""
        if isinstance(data, dict) and data.get("mode") == "answers" and data.get("keep_pairs", "none") != "top":
            data = {**data, "keep_pairs": "none"}
        return data

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("blocks is empty; give a subset of ['Q', 'K', 'V', 'O']")
        if len(set(v)) != len(v):
            raise ValueError(f"blocks has duplicates: {v}")
        return [b for b in ("Q", "K", "V", "O") if b in v]

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v or any(x < 0 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"layers must be distinct non-negative layer indices, got {v}")
        return sorted(v)


class StatsSpec(_Frozen):
    null: Literal["labels"] = "labels"
    alternative: Literal["greater", "less", "two-sided"] = "two-sided"
    n_permutations: int = Field(default=999, ge=1)
    n_bootstrap: int = Field(default=1000, ge=1)
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    ci_level: float = Field(default=0.95, gt=0.0, lt=1.0)
    seed: int = 0


class ClusterSpec(_Frozen):
    address: str = ""  # "" = embedded LocalCluster; tcp://host:port = existing scheduler
    profile: str | None = None  # name of an entry in `profiles`
    n_workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int | None = Field(default=None, ge=1)
    profiles: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _profile_exists(self) -> "ClusterSpec":
        if self.profile is not None and self.profile not in self.profiles:
            raise ValueError(f"profile {self.profile!r} is not defined; defined: {sorted(self.profiles)}")
        return self


class OutputSpec(_Frozen):
    path: str
    storage_options: dict[str, Any] = {}
    # bytes the run may occupy at most, when less than the file system reports free (a quota it
    # does not show, space kept for other jobs); `qkov plan` / `qkov run` check the run against it
    disk_budget: int | None = Field(default=None, ge=1)
    # false: gradients are dropped once the scores computed from them are written; a run larger
    # than the free disk then goes layer group by layer group (extract → score → drop)
    keep_gradients: bool = True
    layers_per_group: int | None = Field(default=None, ge=1)  # with keep_gradients = false; None: as the disk allows
    # with keep_gradients = false, where a layer group's gradients wait for its scores: "device" in the
    # extraction worker's memory (the fused path: no gradient byte on disk; one worker), "disk" in a
    # sub-run, "auto" the device where `qkov plan` measures a GPU that holds a group, else the disk
    gradients_in: Literal["auto", "device", "disk"] = "auto"
    # true: keep `_work` (completed-shard records, Fisher partial sums) after the run succeeds, so
    # that `--resume` can re-extract gradient shards lost later; false: removed on success
    keep_work: bool = False


class JobSpec(_Frozen):
    model: ModelSpec
    tasks: TasksSpec
    fisher: FisherSpec = FisherSpec()
    extract: ExtractSpec = ExtractSpec()
    score: ScoreSpec = ScoreSpec()
    stats: StatsSpec = StatsSpec()
    cluster: ClusterSpec = ClusterSpec()
    output: OutputSpec

    @model_validator(mode="after")
    def _fisher_source(self) -> "JobSpec":
        allowed = ["pooled", "pair", *self.tasks.keys()]
        if self.fisher.source not in allowed:
            raise ValueError(f"fisher.source {self.fisher.source!r} is not one of {allowed} (pooled over all tasks, each "
                             "pair's own, or one task's key)")
        if self.fisher.source == "pair" and self.score.mode == "sketch":
            raise ValueError("fisher.source = 'pair' with score.mode = 'sketch': sketches are formed with one Fisher; "
                             "use fisher.source = 'pooled' or a task key")
        if self.score.mode == "answers" and self.fisher.source == "pair":
            raise ValueError("fisher.source = 'pair' with score.mode = 'answers': each sample's scalars are formed with "
                             "one Fisher for every pair; use fisher.source = 'pooled' or a task key")
        if self.output.gradients_in == "device" and (self.output.keep_gradients or self.score.mode != "exact"):
            raise ValueError("output.gradients_in = 'device' holds each layer group's gradients in memory until its pair "
                             "scores are written: it needs score.mode = 'exact' and output.keep_gradients = false")
        if self.score.mode == "answers" and not self.output.keep_gradients:
            raise ValueError("output.keep_gradients = false with score.mode = 'answers': answers mode stores no "
                             "gradients to drop; leave output.keep_gradients out")
        if len(self.tasks) > 2 and not self.output.keep_gradients:
            raise ValueError("output.keep_gradients = false runs two tasks only (layer groups score one pair); "
                             "with more tasks keep the gradients, or run the pairs as two-task jobs")
        return self

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def pair_job(self, key_a: str, key_b: str) -> "JobSpec":
        """The two-task job of one task pair (its tasks as a and b); the Fisher source as close
        as two tasks express it: pooled over the pair unless it is one of the pair's tasks."""
        source = {key_a: "a", key_b: "b"}.get(self.fisher.source, "pooled")
        return self.model_copy(update={"tasks": TasksSpec(a=self.tasks[key_a], b=self.tasks[key_b]),
                                       "fisher": self.fisher.model_copy(update={"source": source})})

    def config_dict(self) -> dict[str, Any]:
        """The full config with defaults filled in (what provenance records and the hash
        covers). Storage options carry credentials: their values are redacted, the keys kept."""
        cfg = self.model_dump(mode="json")
        cfg["output"]["storage_options"] = {k: REDACTED for k in sorted(self.output.storage_options)}
        if cfg["output"].get("gradients_in") == "auto":  # where gradients wait changes no result: as a newer key
            del cfg["output"]["gradients_in"]
        for task in cfg["tasks"].values():  # keys newer than stored runs: absent at their defaults, so
            for key, default in _TASK_KEYS_ADDED.items():  # an earlier run's hash (and --resume) still holds
                if task.get(key) == default:
                    del task[key]
        return cfg

    def config_hash(self) -> str:
        return config_hash(self.config_dict())


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, float) else str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (JSON escapes are TOML escapes)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(config: dict[str, Any]) -> str:
    """A job config (JobSpec.config_dict()) as a TOML job file: tables for sections, keys left
    out where the value is None (the default). `load_job` reads it back to the same job."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = [(k, v) for k, v in table.items() if v is not None and not isinstance(v, dict)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars)
        if prefix and (scalars or not tables):
            lines.append("")
        for k, v in tables:
            emit(f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), v)

    emit("", config)
    return "\n".join(lines).rstrip() + "\n"


def _is_url(p: str) -> bool:
    return "://" in p


def _resolve(base: Path, p: str) -> str:
    if _is_url(p):
        return p
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job file"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/job-file.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  [{loc}] {msg}{shown}")
    return "\n".join(lines)


def parse_job(data: dict[str, Any], base_dir: str | Path = ".", source: str = "job") -> JobSpec:
    """Validate a job mapping; relative paths resolve against `base_dir`."""
    base = Path(base_dir).resolve()
    data = json.loads(json.dumps(data))  # deep copy, TOML datetimes excluded by the schema anyway
    try:
        for sect, key in (("model", "path"), ("output", "path")):
            if isinstance(data.get(sect), dict) and isinstance(data[sect].get(key), str):
                data[sect][key] = _resolve(base, data[sect][key])
        for task in (data["tasks"].values() if isinstance(data.get("tasks"), dict) else ()):
            if isinstance(task, dict) and isinstance(task.get("path"), str):
                task["path"] = _resolve(base, task["path"])
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise JobFileError(_format_errors(err, source)) from None


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a TOML job file."""
    p = Path(path)
    if not p.is_file():
        raise JobFileError(f"job file not found: {p} (give the path of a TOML job file; see README.md for an example)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise JobFileError(f"cannot read the job file {p} ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise JobFileError(f"{p}: line {line}: not UTF-8 text (undecodable byte 0x{raw[e.start]:02x}); save the job file as UTF-8") from None
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise JobFileError(f"{p}: TOML syntax error: {e}") from None
    return parse_job(data, base_dir=p.parent, source=str(p))
