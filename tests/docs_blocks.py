"""The fenced code blocks of README.md and docs/, and how tests/test_docs.py runs each kind
(the convention is documented in docs/development.md, "Code blocks run")."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = ("python", "bash", "toml", "yaml")  # run by the tests
SHOWN_LANGS = ("text",)  # output and formulas: shown, not run
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}:{self.lang or 'none'}"


def blocks(path: Path) -> list[Block]:
    """Fenced blocks of one markdown file (indented fences in list items included)."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    k = 0
    while k < len(lines):
        m = FENCE.match(lines[k])
        if not m:
            k += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info").strip()
        body: list[str] = []
        j = k + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{k + 1}: code block never closed")
        out.append(Block(path, k + 1, info.split()[0] if info else "", "\n".join(body) + "\n"))
        k = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for p in DOC_FILES for b in blocks(p)]


# ---------------------------------------------------------------- python


def calls_run(src: str) -> bool:
    """The block runs the job (so it starts where the run does not exist yet)."""
    return bool(re.search(r"\bqkov\.run\(", src))


def run_python(src: str, script_dir: Path, c_dir: Path, env: dict, timeout: float = 420.0):
    """The block verbatim as a script file (no main guard) in `script_dir` and as `python -c`
    in `c_dir`, at the same time; returns both CompletedProcess-like (args, rc, out, err)."""
    script = script_dir / "docs_block.py"
    script.write_text(src, encoding="utf-8")
    procs = [
        ("script", subprocess.Popen([sys.executable, str(script)], cwd=script_dir, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)),
        ("-c", subprocess.Popen([sys.executable, "-c", src], cwd=c_dir, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)),
    ]
    results = []
    for mode, p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += f"\n[docs test: killed after {timeout:.0f} s]"
        results.append((mode, p.returncode, out, err))
    return results


# ---------------------------------------------------------------- bash


def commands(src: str) -> list[str]:
    """The block's command lines: `\\` continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n[ \t]*", " ", src)
    out = []
    for line in joined.splitlines():
        quote, cut = None, len(line)
        for k, ch in enumerate(line):  # a `#` that starts a word outside quotes starts a comment
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (k == 0 or line[k - 1] in " \t"):
                cut = k
                break
        if line[:cut].strip():
            out.append(line[:cut].strip())
    return out


def run_command(line: str, cwd: Path, env: dict) -> tuple[int, str]:
    """One command line of a bash block (see docs/development.md): `qkov …` through the Typer
    app in this process (`qkov run` with `--inline`), `make T` as `make -n T` in the
    repository, anything else in bash. Returns (exit code, output)."""
    argv = shlex.split(line)
    if argv[0] == "qkov":
        from typer.testing import CliRunner

        from qkov.pipeline.cli import app

        args = argv[1:]
        if args[:1] == ["run"] and "--inline" not in args:
            args.append("--inline")
        old = Path.cwd()
        os.chdir(cwd)
        try:
            res = CliRunner().invoke(app, args)
        finally:
            os.chdir(old)
        text = res.output
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            import traceback

            text += "\n" + "".join(traceback.format_exception(*res.exc_info))
        return res.exit_code, text
    if argv[0] == "make":
        p = subprocess.run(["make", "-n", "-C", str(ROOT), *argv[1:]], capture_output=True, text=True, env=env)
        return p.returncode, p.stdout + p.stderr
    p = subprocess.run(line, shell=True, executable="/bin/bash", cwd=cwd, capture_output=True, text=True, env=env)
    return p.returncode, p.stdout + p.stderr


# ---------------------------------------------------------------- toml and yaml


def is_whole_job(data: dict) -> bool:
    return "model" in data and isinstance(data.get("tasks"), dict) and "a" in data["tasks"]


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def unknown_config_keys(data, prefix: str = "") -> list[str]:
    """Keys of a Dask config mapping that are not Dask's or distributed's settings."""
    import dask
    import distributed  # noqa: F401  (loads distributed's defaults into dask.config)

    bad = []
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        try:
            known = dask.config.get(path)
        except KeyError:
            bad.append(path)
            continue
        if isinstance(v, dict):
            if not isinstance(known, dict):
                bad.append(path + " (not a section)")
            else:
                bad += unknown_config_keys(v, path)
    return bad
