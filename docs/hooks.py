"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that are generated from the code when the site
is built, so that they cannot drift from it.

* `index.md` is the repository's README.md, its links into `docs/` rewritten to page links.
* `<!-- qkov:job-file-reference -->` becomes the job-file reference: every key of the pydantic
  models in `pipeline/spec.py` (`JobSpec` and its sections) with its type, bounds and default,
  and its description (`Field(description=...)`, else `docs/job-file-fields.yml`).
* `<!-- qkov:cli-reference -->` becomes the CLI reference: every command of the Typer app
  (`qkov.pipeline.cli.app`, as its click command) with its usage, help, arguments and options.
* `<!-- qkov:supported-layouts -->` becomes the table of `qkov.testing.SUPPORTED`.

Problems are logged as warnings, so `mkdocs build --strict` fails on them: a key without a
description, a description of a key that does not exist, an unknown marker.
"""
from __future__ import annotations

import json
import logging
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

log = logging.getLogger("mkdocs.plugins.qkov")

MARKER = re.compile(r"<!--\s*qkov:([\w-]+)\s*-->")


# ---------------------------------------------------------------- markdown helpers


def escape(text: str) -> str:
    """Text for a table cell: markdown and HTML specials escaped outside `code spans`."""
    parts = re.split(r"(`[^`]*`)", " ".join(str(text).split()))
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part)
        else:
            out.append(part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                       .replace("|", "\\|").replace("*", "\\*"))
    return "".join(out)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- index.md = README.md


def readme_page(config) -> str:
    readme = Path(config.config_file_path).parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


# ---------------------------------------------------------------- the job-file reference


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML form for {v!r}")


def _is_model(ann) -> bool:
    from pydantic import BaseModel

    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _model_of(ann):
    """The pydantic model a field holds (also inside `X | None`), else None."""
    if _is_model(ann):
        return ann
    if get_origin(ann) in (Union, types.UnionType):
        models = [a for a in get_args(ann) if _is_model(a)]
        return models[0] if len(models) == 1 else None
    return None


def type_text(ann) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " or ".join(f"`{_toml(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in args if a is not type(None))
    if origin is list:
        return f"array of {type_text(args[0])}" if args else "array"
    if origin is dict or ann is dict:
        return "table"
    if _is_model(ann):
        return "table"
    names = {int: "integer", float: "number", bool: "boolean", str: "string"}
    if ann in names:
        return names[ann]
    if ann is Any:
        return "any"
    log.warning("job-file reference: no text for the type %r", ann)
    return escape(str(ann))


def bounds_text(field) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for m in field.metadata:
        for attr, sign in signs.items():
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sign} {v}")
    return ", ".join(out)


def default_text(field) -> str:
    if field.is_required():
        return "**required**"
    v = field.get_default(call_default_factory=True)
    if v is None:
        return "absent"
    if _is_model(type(v)):
        return "the section's defaults"
    return f"`{_toml(v)}`"


def load_descriptions(config) -> dict:
    import yaml

    path = Path(config.docs_dir) / "job-file-fields.yml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {"sections": data.get("sections") or {}, "fields": data.get("fields") or {}}


def job_file_reference(config) -> str:
    from qkov.pipeline.spec import JobSpec

    desc = load_descriptions(config)
    used_fields: set[str] = set()
    used_sections: set[str] = set()
    parts: list[str] = []

    def describe(cls, name: str, field) -> str:
        key = f"{cls.__name__}.{name}"
        used_fields.add(key)
        text = field.description or desc["fields"].get(key)
        if not text:
            log.warning("job-file reference: %s (key %r of pipeline/spec.py) has no description: give it "
                        "Field(description=...) or an entry in docs/job-file-fields.yml", key, name)
            return ""
        return text

    def section(cls, titles: list[str], level: int) -> None:
        """One table of keys; the tables it holds (`[model.layout]`) follow as sub-sections."""
        used_sections.add(cls.__name__)
        heading = " and ".join(f"`[{t}]`" for t in titles) if titles else "The sections"
        parts.append(f"{'#' * level} {heading}\n")
        intro = desc["sections"].get(cls.__name__) or (cls.__doc__ or "").strip().split("\n\n")[0]
        if not intro:
            log.warning("job-file reference: the section %s has no description in docs/job-file-fields.yml", cls.__name__)
        parts.append(" ".join(intro.split()) + "\n")
        rows, subs = [], []
        for name, field in cls.model_fields.items():
            text = describe(cls, name, field)
            sub = _model_of(field.annotation)
            if sub is not None:  # a table of its own, described below
                subs.append((name, sub))
                kind = "table, below" if titles else "section"
            else:
                bounds = bounds_text(field)
                kind = type_text(field.annotation) + (f" ({bounds})" if bounds else "")
            rows.append([f"`{name}`", kind, default_text(field), escape(text)])
        if rows:
            parts.append(table(["key", "type", "default", "what it does"], rows) + "\n")
        child = level + 1 if titles else level  # the top level's sections are its siblings
        for name, sub in subs:
            path = f"{titles[0]}.{name}" if titles else name
            inner = [_model_of(f.annotation) for f in sub.model_fields.values()]
            if inner and all(m is not None for m in inner) and len(set(inner)) == 1:
                # only tables of one model (tasks.a, tasks.b): one section for them all
                used_sections.add(sub.__name__)
                for n, f in sub.model_fields.items():
                    describe(sub, n, f)
                section(inner[0], [f"{path}.{n}" for n in sub.model_fields], child)
            else:
                section(sub, [path], child)

    section(JobSpec, [], 3)
    for key in sorted(set(desc["fields"]) - used_fields):
        log.warning("docs/job-file-fields.yml describes %s, which pipeline/spec.py does not have", key)
    for key in sorted(set(desc["sections"]) - used_sections):
        log.warning("docs/job-file-fields.yml describes the section %s, which pipeline/spec.py does not have", key)
    return "\n".join(parts)


# ---------------------------------------------------------------- the CLI reference


# Options that set a job-file key for one command, e.g. `qkov stats --alpha` = `[stats] alpha`:
# where such an option has no help text of its own, the key's description is shown.
OPTION_KEYS = {"stats": ("stats", "StatsSpec")}


def cli_reference(config) -> str:
    import typer

    from qkov.pipeline import spec
    from qkov.pipeline.cli import app

    desc = load_descriptions(config)["fields"]

    group = typer.main.get_command(app)  # the click group behind the Typer app
    root = group.context_class(group, info_name="qkov")
    parts = []
    if group.help:
        parts.append(" ".join(group.help.split()) + "\n")
    for name, cmd in group.commands.items():
        if getattr(cmd, "hidden", False):
            continue
        ctx = cmd.context_class(cmd, info_name=name, parent=root)
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        opts = [p for p in cmd.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]
        usage = " ".join([f"qkov {name}"] + (["[OPTIONS]"] if opts else [])
                         + [(p.metavar or p.name.upper()) for p in args])
        parts.append(f"## `qkov {name}`\n")
        parts.append(f"`{usage}`\n")
        if not cmd.help:
            log.warning("CLI reference: `qkov %s` has no help text (the command function's docstring)", name)
        parts.append(escape(cmd.help or "") + "\n")
        rows = []
        for p in args + opts:
            record = p.get_help_record(ctx) or ("", "")
            decl, help_text = record
            if p.param_type_name == "argument":
                shown = p.metavar or p.name.upper()
                kind = re.search(r"<([^>]+)>", decl or "")
                decl = shown + (f" <{kind.group(1)}>" if kind else "")
            if not help_text and name in OPTION_KEYS and p.param_type_name == "option":
                section, model = OPTION_KEYS[name]
                field = getattr(spec, model).model_fields.get(p.name)
                text = field is not None and (field.description or desc.get(f"{model}.{p.name}"))
                if text:
                    help_text = f"Sets `[{section}] {p.name}` for this rerun (default: the stored value). {text}"
            if not help_text:
                log.warning("CLI reference: `qkov %s %s` has no help text", name, decl)
            rows.append([f"`{decl}`", escape(help_text or "")])
        if rows:
            parts.append(table(["argument or option", "what it does"], rows) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- the layout support matrix


def supported_layouts() -> str:
    from qkov.testing import SUPPORTED

    rows = []
    for name, a in SUPPORTED.items():
        rows.append([f"`{name}`", f"`{a.config}`", a.kind, str(a.n_heads), str(a.n_kv_heads), str(a.head_dim),
                     f"`{a.o_proj}`", a.weight_layout, "; ".join(x for x in ("encoder (a classifier)" if a.encoder else "", escape(a.note)) if x)])
    return table(["entry", "transformers config", "kind", "heads", "KV heads", "head_dim", "O projection",
                  "weights", "note"], rows) + "\n"


# ---------------------------------------------------------------- the hook


GENERATORS = {
    "job-file-reference": job_file_reference,
    "cli-reference": cli_reference,
    "supported-layouts": lambda config: supported_layouts(),
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "index.md":
        markdown = readme_page(config)

    def generate(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            log.warning("%s: unknown generated section <!-- qkov:%s -->; known: %s", page.file.src_uri, name,
                        ", ".join(GENERATORS))
            return ""
        return GENERATORS[name](config)

    return MARKER.sub(generate, markdown)
