"""The documentation: the README is a front page, the MkDocs site builds in strict mode (and
fails on a broken link or a missing name), and every code block of README.md and docs/ runs
(convention: docs/development.md, "Code blocks run")."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_blocks as db  # noqa: E402  (tests/ is not a package)

ROOT = db.ROOT
README = ROOT / "README.md"
MKDOCS = Path(sys.executable).with_name("mkdocs")
BLOCKS = db.all_blocks()
RUN_BLOCKS = [b for b in BLOCKS if b.lang in db.RUN_LANGS]
RUN = "runs/math-vs-code"
PROGRESS = re.compile(r"\b(extract|score|stats): \d+/\d+")

# ---------------------------------------------------------------- the README as a front page


def _headings(text: str) -> list[tuple[int, str]]:
    body = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # no '#' lines of code blocks
    return [(len(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^(#{2,4}) (.+)$", body, re.M)]


def _slug(heading: str) -> str:
    """The anchor GitHub and MkDocs (Python-Markdown's toc) both give a heading."""
    text = re.sub(r"[`*_\[\]]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_readme_is_a_front_page_with_a_table_of_contents():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the front page holds at most 200"
    # the two formulas, the install and the two commands
    assert "M[i,j] = Σ_p g_i[p]² / (Î[p]+λ) · |g_j[p]|" in text and "A[i,j] = Σ_p g_i[p] · g_j[p] / (Î[p]+λ)" in text
    assert re.search(r"^make demo\s+#.*creates \.venv", text, re.M) and re.search(r"^make test\s+#.*creates \.venv", text, re.M)
    # the table of contents lists every section and sub-section after it, by working anchors
    toc = text[text.index("## Contents"):]
    toc = toc[:toc.index("\n## ", 3)]
    listed = re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", toc)
    after = [h for lvl, h in _headings(text[text.index("## Contents") + 1:]) if lvl <= 3]
    assert [t for t, _ in listed] == after, "the README's contents must list its sections in order"
    for title, anchor in listed:
        assert anchor == _slug(title), f"contents link #{anchor} does not reach '{title}' (#{_slug(title)})"
    # what each number answers comes before anything about how results are stored
    answers = text.index("### 3. Reading the three answer tables")
    internals = [text.find(w) for w in ("pooled_", "chunk", "qkov_provenance", "_work", "Zarr group") if w in text]
    assert all(answers < k for k in internals), "storage internals before the answer tables"
    # no changelog, no internal documents, no words a user cannot read
    for stale in ("DESIGN.md", "An earlier summary", "seed's metric", "used to", "job-file reference section"):
        assert stale not in text, f"README.md mentions {stale!r}"
    for name in ("`make demo`", "`make test`"):
        assert name in text


def test_docs_link_only_to_pages_and_files_that_exist():
    """README links into docs/ resolve (the site checks links between its pages); every
    repository path a page names in `code` (deploy/…, tests/…, benchmarks/…) exists."""
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
        assert target.startswith("docs/"), f"README.md links to {target}: link to the documentation pages"
    path_re = re.compile(r"(?:^|(?<=[\s(]))((?:deploy|tests|benchmarks|pipeline|workers|qkov|requirements|docs)/[\w./-]*)")
    named = set()
    for page in db.DOC_FILES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text(encoding="utf-8")):
            for p in path_re.findall(span):
                named.add(p)
                assert (ROOT / p).exists(), f"{page.relative_to(ROOT)} names {p}, which does not exist"
    assert {"deploy/slurm/qkov-run.sbatch", "deploy/k8s/daskjob.yaml", "tests/test_effects.py"} <= named


def _resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_docs_name_only_python_objects_that_exist():
    """`qkov.pipeline.schema.fold_symmetric`, `qkov.run(job)`, `qkov.workers.kernels.side_parts`, …:
    every dotted name of qkov's packages that a page shows in `code` can be imported."""
    name_re = re.compile(r"^((?:qkov|pipeline|workers)(?:\.\w+)+)(?:\(|$)")
    missing, seen = [], set()
    for page in db.DOC_FILES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text(encoding="utf-8")):
            m = name_re.match(span.strip())
            if not m or m.group(1) in seen:
                continue
            seen.add(m.group(1))
            try:
                _resolve(m.group(1))
            except (ImportError, AttributeError):
                missing.append(f"{page.relative_to(ROOT)}: {m.group(1)}")
    assert not missing, f"names that do not exist: {missing}"
    assert {"qkov.testing.SUPPORTED", "qkov.pipeline.schema.fold_symmetric"} <= seen


def test_every_code_block_is_of_a_kind_the_tests_run_or_show():
    unknown = [b.id for b in BLOCKS if b.lang not in db.RUN_LANGS + db.SHOWN_LANGS]
    assert not unknown, f"code blocks of no known kind (python, bash, toml, yaml, text): {unknown}"
    langs = {b.lang for b in RUN_BLOCKS}
    assert {"python", "bash", "toml", "yaml"} <= langs
    readme_python = [b for b in RUN_BLOCKS if b.path == README and b.lang == "python"]
    assert any("qkov.run(job)" in b.text for b in readme_python), "the README's walk runs qkov.run(job) from Python"


# ---------------------------------------------------------------- the site


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # the hook module is not compiled into docs/
    return subprocess.run([str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
                          capture_output=True, text=True, cwd=config.parent, timeout=300, env=env)


def test_site_builds_in_strict_mode(tmp_path):
    res = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert res.returncode == 0, res.stdout + res.stderr
    site = tmp_path / "site"
    # the generated parts are there: README as home, job-file keys, CLI commands, API, layouts
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "A 10-minute walk" in home and 'href="cluster/"' in home
    job_file = (site / "job-file" / "index.html").read_text(encoding="utf-8")
    from qkov.pipeline.spec import JobSpec, ScoreSpec

    for section in JobSpec.model_fields:
        assert f"[{section}" in job_file
    for key in ScoreSpec.model_fields:
        assert f"<code>{key}</code>" in job_file
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    import typer

    from qkov.pipeline.cli import app

    commands = list(typer.main.get_command(app).commands)
    assert {"run", "stats", "query", "info", "report", "check", "plan", "validate", "demo"} <= set(commands)
    for command in commands:
        assert f"<code>qkov {command}</code>" in cli
    assert "--n-permutations" in cli and "--scheduler" in cli and "--format" in cli
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="qkov.run_stats"' in api and 'id="qkov.testing.tiny_job"' in api
    assert "llama_gqa" in (site / "layouts" / "index.html").read_text(encoding="utf-8")


PLANTS = {
    # a link to a page that does not exist
    "broken-link": ("statistics.md", "See [the old page](old-statistics.md).", "old-statistics.md"),
    # a cross-reference to a Python name that does not exist (e.g. a function renamed)
    "missing-name": ("api.md", "Use [qkov.rerun_everything][] instead.", "qkov.rerun_everything"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_strict_build_fails_on_a_broken_link_or_a_missing_name(tmp_path, plant):
    """In a copy of the docs (never the checkout: other tests read it in parallel)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copytree(ROOT / "docs", copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy2(ROOT / name, copy / name)
    for package in ("qkov", "pipeline"):  # mkdocstrings reads the sources beside mkdocs.yml
        (copy / package).symlink_to(ROOT / package)
    page, line, needle = PLANTS[plant]
    with (copy / "docs" / page).open("a", encoding="utf-8") as f:
        f.write(f"\n{line}\n")
    res = _mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert res.returncode != 0, f"the strict build passed with {line!r} planted in {page}"
    assert needle in res.stdout + res.stderr, res.stdout + res.stderr


def _load_hooks():
    spec = importlib.util.spec_from_file_location("qkov_docs_hooks", ROOT / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # nothing written into docs/
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = before
    return mod


def test_job_file_reference_warns_on_keys_without_and_descriptions_without_keys(tmp_path, caplog):
    """The generated reference cannot drift from pipeline/spec.py: a key with no description,
    or a description of a key the spec does not have, is a warning (an error with --strict)."""
    hooks = _load_hooks()

    class Config:
        docs_dir = str(tmp_path)

    fields = (ROOT / "docs" / "job-file-fields.yml").read_text(encoding="utf-8")
    (tmp_path / "job-file-fields.yml").write_text(fields, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.qkov"):
        page = hooks.job_file_reference(Config())
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert "`[tasks.a]` and `[tasks.b]`" in page and "`[model.layout]`" in page

    drifted = fields.replace("  ScoreSpec.top_k:", "  ScoreSpec.top_n:")
    assert drifted != fields
    (tmp_path / "job-file-fields.yml").write_text(drifted, encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.qkov"):
        hooks.job_file_reference(Config())
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "ScoreSpec.top_k" in messages and "has no description" in messages
    assert "ScoreSpec.top_n" in messages and "does not have" in messages


# ---------------------------------------------------------------- every code block runs


@pytest.fixture(scope="module")
def docs_work(tmp_path_factory) -> dict[str, Path]:
    """`template`: what the blocks name (job.toml, models/my-llama, math.jsonl, code.jsonl);
    `finished`: the same with the job's finished run at runs/math-vs-code. Made once per test
    session, also when pytest-xdist spreads the blocks over several workers (built under a
    file lock in the workers' common temporary folder), and only read: every block runs in
    its own copy, under `copies` (this worker's)."""
    from filelock import FileLock

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    base = root / "docs-work"
    with FileLock(str(root / "docs-work.lock")):
        if not (base / "ready").exists():
            shutil.rmtree(base, ignore_errors=True)
            _make_docs_work(base)
            (base / "ready").touch()
    return {"template": base / "template", "finished": base / "finished",
            "copies": tmp_path_factory.mktemp("docs-blocks")}


def _make_docs_work(base: Path) -> None:
    from qkov.pipeline.run import run_job
    from qkov.pipeline.spec import load_job
    from qkov.testing import VOCAB, tiny_job, write_job_file, write_task_file

    template = base / "template"
    job = tiny_job(template / "tiny", "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 19, "n_bootstrap": 19})
    (template / "models").mkdir()
    shutil.copytree(job.model.path, template / "models" / "my-llama")
    write_task_file(template / "math.jsonl", 200, VOCAB, 4, 12, 1, "m-")
    write_task_file(template / "code.jsonl", 200, VOCAB, 4, 12, 2, "c-")
    write_job_file(job, template / "job.toml", model={"path": str(template / "models" / "my-llama")},
                   output={"path": RUN}, cluster={"n_workers": 1})
    finished = base / "finished"
    shutil.copytree(template, finished, symlinks=True)
    run_job(load_job(finished / "job.toml"))


def _copy(work: dict[str, Path], which: str, name: str) -> Path:
    dst = work["copies"] / name
    shutil.copytree(work[which], dst, symlinks=True)
    return dst


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("COLUMNS", None)
    return env


@pytest.mark.slow  # together about a minute; scheduled early (conftest), the run they read made once
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.id for b in RUN_BLOCKS])
def test_code_block_runs(block: db.Block, docs_work):
    slug = re.sub(r"\W+", "-", block.id)
    if block.lang == "python":
        which = "template" if db.calls_run(block.text) else "finished"  # a block that runs the job makes the run
        results = db.run_python(block.text, _copy(docs_work, which, slug + "-script"), _copy(docs_work, which, slug + "-c"),
                                _env())
        for mode, rc, out, err in results:
            assert rc == 0, f"{block.id} as {mode} exited {rc}:\n{out[-3000:]}\n{err[-5000:]}"
            assert "Traceback" not in err, f"{block.id} as {mode} printed a traceback:\n{err[-5000:]}"
            if db.calls_run(block.text):
                silent = "progress=False" in block.text
                found = {m.group(1) for m in PROGRESS.finditer(err)}
                if silent:
                    assert not found, f"{block.id} as {mode}: progress=False still printed progress:\n{err[-3000:]}"
                else:
                    assert found == {"extract", "score", "stats"}, \
                        f"{block.id} as {mode}: no progress lines for every stage on stderr:\n{err[-3000:]}"
    elif block.lang == "bash":
        lines = db.commands(block.text)
        runs_job = any(re.match(r"qkov run\b", line) for line in lines)
        cwd = _copy(docs_work, "template" if runs_job else "finished", slug)
        for line in lines:
            code, out = db.run_command(line, cwd, _env())
            assert code == 0, f"{block.id}: `{line}` exited {code}:\n{out[-5000:]}"
    elif block.lang == "toml":
        from qkov.pipeline.spec import parse_job

        import qkov

        data = tomllib.loads(block.text)
        if db.is_whole_job(data):
            where = docs_work["copies"] / f"{slug}-validate"
            where.mkdir()
            for name in ("models", "math.jsonl", "code.jsonl"):
                (where / name).symlink_to(docs_work["template"] / name)
            (where / "job.toml").write_text(block.text, encoding="utf-8")
            qkov.validate(where / "job.toml")
        else:
            base = tomllib.loads((docs_work["template"] / "job.toml").read_text(encoding="utf-8"))
            parse_job(db.merged(base, data), base_dir=docs_work["template"], source=block.id)
    elif block.lang == "yaml":
        import yaml

        bad = db.unknown_config_keys(yaml.safe_load(block.text))
        assert not bad, f"{block.id}: not Dask settings: {bad}"
    else:  # pragma: no cover - RUN_BLOCKS holds only the languages above
        pytest.fail(f"{block.id}: no runner for {block.lang!r}")
