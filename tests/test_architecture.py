"""The house rules, checked: code layered by where it runs, one error family, and an API
that reaches everything the CLI does with the same parameters."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> its folder in the checkout (the wheel puts them under one namespace)
PACKAGES = {"qkov": "qkov", "qkov.pipeline": "pipeline", "qkov.workers": "workers"}
# what worker code may use from the client side: the small shared floor (a package counts whole)
WORKER_FLOOR = ("qkov.pipeline.spec", "qkov.pipeline.schema", "qkov.pipeline.store", "qkov.pipeline.errors",
                "qkov.pipeline.codec")
# read-only commands, and the stages that write a run: a reader never imports a stage
READERS = ("qkov.pipeline.query", "qkov.pipeline.report", "qkov.pipeline.info")
STAGES = ("qkov.pipeline.extract", "qkov.pipeline.score", "qkov.pipeline.stats_stage", "qkov.pipeline.diagnostics",
          "qkov.pipeline.layer_groups", "qkov.pipeline.run")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the three packages, by the name it is imported under."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("").parts
            if "__pycache__" in rel or (pkg == "qkov" and len(rel) > 1):
                continue
            mods[".".join((pkg, *rel)).removesuffix(".__init__")] = path
    return mods


def imports_of(path: Path, name: str) -> set[str]:
    """Every name a module imports, inside functions too (absolute; relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from qkov.pipeline import schema`
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (each name resolved to its longest module prefix)."""
    mods = project_modules(root)
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imp in imports_of(path, name):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                targets.add(imp)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start), on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w), on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def upward_imports(root: Path = ROOT) -> dict[str, list[str]]:
    """Worker modules that import client modules outside the floor, and which."""
    graph = import_graph(root)
    bad = {}
    for mod, targets in graph.items():
        if _within(mod, ["qkov.workers"]):
            used = sorted(t for t in targets if _within(t, ["qkov.pipeline"]) and t != "qkov.pipeline"
                          and not _within(t, WORKER_FLOOR))
            if used:
                bad[mod.rpartition(".")[2] + ".py"] = used
    return bad


def reader_stage_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{r} -> {t}" for r in graph if _within(r, READERS) for t in graph[r] if _within(t, STAGES))


def _copy_tree(tmp_path: Path) -> Path:
    """The three packages copied (the source tree is never written: other tests read it in parallel)."""
    import shutil

    for folder in PACKAGES.values():
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "data"))
    return tmp_path


def test_workers_import_only_the_shared_floor_of_client_code():
    bad = upward_imports(ROOT)
    assert not bad, f"worker code reaches into client code: {bad}; move the shared part into workers/ or the floor {WORKER_FLOOR}"
    graph = import_graph(ROOT)
    for mod, targets in graph.items():  # the floor itself must not pull the client or the workers in
        if _within(mod, WORKER_FLOOR):
            assert not [t for t in targets if _within(t, ["qkov.workers"])], f"{mod} imports workers"
            assert not [t for t in targets if _within(t, ["qkov.pipeline"]) and t != "qkov.pipeline"
                        and not _within(t, WORKER_FLOOR)], f"{mod} imports client code outside the floor"


def test_no_import_circles_counting_imports_inside_functions():
    found = circles(import_graph(ROOT))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_readers_never_import_a_stage():
    found = reader_stage_imports(import_graph(ROOT))
    assert not found, f"read-only commands importing a stage: {found}; move the shared helper out of the stage"


def test_rule_checkers_catch_planted_violations(tmp_path):
    """Each checker can fail: a worker importing the score stage (at the top and inside a function),
    a circle closed by an import inside a function, a reader importing a stage."""
    root = _copy_tree(tmp_path)
    before = (upward_imports(root), circles(import_graph(root)), reader_stage_imports(import_graph(root)))
    (root / "workers" / "_probe_upward.py").write_text(
        "from qkov.pipeline.score import run_score\n\ndef later():\n    from qkov.pipeline import stats\n", encoding="utf-8")
    assert upward_imports(root)["_probe_upward.py"] == ["qkov.pipeline.score", "qkov.pipeline.stats"]
    (root / "pipeline" / "_probe_circle.py").write_text("from . import schema\n", encoding="utf-8")
    with (root / "pipeline" / "schema.py").open("a", encoding="utf-8") as f:
        f.write("\n\ndef _later():\n    from . import _probe_circle\n")
    planted = ["qkov.pipeline._probe_circle", "qkov.pipeline.schema"]
    assert planted not in before[1] and planted in circles(import_graph(root))
    with (root / "pipeline" / "query.py").open("a", encoding="utf-8") as f:
        f.write("\n\ndef _later():\n    from .stats_stage import rerun_stats\n")
    edge = "qkov.pipeline.query -> qkov.pipeline.stats_stage"
    assert edge not in before[2] and edge in reader_stage_imports(import_graph(root))


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
    for path in sorted(list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "workers").rglob("*.py"))):
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
