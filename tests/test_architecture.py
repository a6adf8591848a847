"""The house rules, checked: code layered by where it runs, one error family, and an API
that reaches everything the CLI does with the same parameters."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what worker code may use from the client side: the small shared floor
WORKER_FLOOR = {"qkov.pipeline.spec", "qkov.pipeline.schema", "qkov.pipeline.store", "qkov.pipeline.errors"}


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, inside functions too (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pipeline import schema`
    return out


def client_modules_used(imports: set[str]) -> set[str]:
    """The pipeline modules among the imports (a `from pipeline import x` counts as pipeline.x)."""
    found = set()
    for name in imports:
        parts = name.split(".")
        if parts[0] == "pipeline" and len(parts) >= 2:
            found.add(".".join(parts[:2]))
    return found


def upward_imports(root: Path) -> dict[str, list[str]]:
    """Worker modules under `root` that import client modules outside the floor, and which."""
    bad = {}
    for path in sorted((root / "workers").glob("*.py")):
        used = client_modules_used(imports_of(path, root)) - WORKER_FLOOR
        if used:
            bad[path.name] = sorted(used)
    return bad


def test_workers_import_only_the_shared_floor_of_client_code():
    bad = upward_imports(ROOT)
    assert not bad, f"worker code reaches into client code: {bad}; move the shared part into workers/ or the floor {sorted(WORKER_FLOOR)}"
    for floor in WORKER_FLOOR:  # the floor itself must not pull the client in
        path = ROOT / (floor.replace(".", "/") + ".py")
        assert not ({m for m in client_modules_used(imports_of(path))} - WORKER_FLOOR), path.name
        assert not any(m.startswith("workers") for m in imports_of(path)), f"{path.name} imports workers"


def test_rule_checker_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a worker module importing the score stage, at the top or
    inside a function, is caught (in a copy of workers/: the source tree is never written)."""
    import shutil

    shutil.copytree(ROOT / "workers", tmp_path / "workers", ignore=shutil.ignore_patterns("__pycache__"))
    assert upward_imports(tmp_path) == {}
    (tmp_path / "workers" / "_probe_upward.py").write_text(
        "from qkov.pipeline.score import block_scores\n\ndef later():\n    from pipeline import stats\n", encoding="utf-8")
    assert upward_imports(tmp_path) == {"_probe_upward.py": ["qkov.pipeline.score", "qkov.pipeline.stats"]}


def test_every_user_error_class_is_in_the_one_family():
    from qkov.pipeline import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.QkovError), name
    # the classes are re-exported where they were raised before, not redefined
    from qkov.pipeline.cluster import ClusterError
    from qkov.pipeline.spec import JobFileError
    from qkov.workers.layouts import UnsupportedModelError
    from qkov.workers.models import ModelLoadError
    from qkov.workers.tasks import TaskFileError

    for cls in (ClusterError, JobFileError, UnsupportedModelError, ModelLoadError, TaskFileError):
        assert cls is getattr(errors, cls.__name__)


def test_no_other_module_defines_an_exception_class():
    found = []
    for path in sorted(list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "workers").glob("*.py"))):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not found, f"exception classes outside pipeline/errors.py: {found}"


# CLI command -> API function. A parameter has the same name in both; the only exceptions: the
# job argument (a JOB.toml path on the command line, a loaded JobSpec in Python), output-format
# options the CLI alone has (the API returns the data itself), and what only Python can pass.
PARITY = {
    "run": ("run", {"job_file": "job"}),
    "stats": ("run_stats", {}),
    "query": ("query", {}),
    "info": ("info", {}),
    "report": ("report", {}),
    "check": ("check", {"job_file": "job"}),
    "validate": ("validate", {}),
    "plan": ("plan", {"job_file": "job"}),
    "demo": ("demo", {}),
}
CLI_ONLY = {"fmt", "as_json"}  # --format, --json: how the CLI prints what the API returns
API_ONLY = {"storage_options", "progress"}  # a dict; a callback (the CLI reads the environment, always shows progress)


def parity_problems(cmd: str, cli: list[str], api: list[str], job: dict[str, str]) -> list[str]:
    """How a CLI command's parameters and its API function's differ in name (both directions)."""
    problems = []
    for param in cli:
        if param not in CLI_ONLY and job.get(param, param) not in api:
            problems.append(f"`qkov {cmd}` parameter {param!r} has no API parameter of that name {tuple(api)}")
    mapped = {job.get(p, p) for p in cli}
    for param in api:
        if param not in mapped and param not in API_ONLY:
            problems.append(f"API parameter {param!r} has no `qkov {cmd}` parameter of that name {tuple(cli)}")
    return problems


def test_every_cli_parameter_is_the_api_parameter_of_the_same_name():
    import qkov
    from qkov.pipeline.cli import app

    commands = {c.callback.__name__: c.callback for c in app.registered_commands}
    assert set(commands) == set(PARITY), f"CLI commands without an API mapping: {set(commands) ^ set(PARITY)}"
    problems = []
    for cmd, (fn_name, job) in PARITY.items():
        problems += parity_problems(cmd, list(inspect.signature(commands[cmd]).parameters),
                                    list(inspect.signature(getattr(qkov, fn_name)).parameters), job)
    assert not problems, "\n".join(problems)


def test_parity_check_catches_a_renamed_parameter():
    """The names this project once had on each side: `--stats` vs stats_name, `--out` vs out_dir."""
    assert parity_problems("query", ["run", "stats"], ["run", "stats_name"], {}) == [
        "`qkov query` parameter 'stats' has no API parameter of that name ('run', 'stats_name')",
        "API parameter 'stats_name' has no `qkov query` parameter of that name ('run', 'stats')"]
    assert parity_problems("report", ["run", "out"], ["run", "out_dir"], {})
    assert parity_problems("run", ["job_file"], ["job"], {"job_file": "job"}) == []


def test_the_api_names_a_run_and_a_stats_group_alike_everywhere():
    """Every public function taking a run calls it `run`, and named statistics `stats`."""
    import qkov

    for name in qkov.__all__:
        fn = getattr(qkov, name)
        if not inspect.isfunction(fn):
            continue
        params = list(inspect.signature(fn).parameters)
        assert not {"run_path", "stats_name", "out_dir"} & set(params), f"qkov.{name}{tuple(params)}"
