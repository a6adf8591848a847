"""Bad inputs are refused at the command line with exit code 2 and a message that says
what to fix; none leaves behind a run that looks complete, and none touches an existing
run. One test per row of the "Bad inputs" table in docs/faults.md (same order).

The non-finite policies are here too: `error` names the samples, `skip` records them in
the store and keeps them out of the Fisher and the scores (checked against references
computed in this file from the stored gradients).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from typer.testing import CliRunner

from qkov.pipeline import schema
from qkov.pipeline.cli import app
from qkov.pipeline.store import acquire_lock, release_lock
from qkov.testing import VOCAB, save_model, tiny_job, tiny_model, write_job_file

runner = CliRunner()


def qkov(*args) -> tuple[int, str]:
    """Exit code and the output (stdout and stderr) with whitespace runs collapsed (rich wraps lines)."""
    res = runner.invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback is a bug, not a refusal
    return res.exit_code, " ".join(res.output.split())


def refused(*args, says: tuple[str, ...]) -> str:
    code, out = qkov(*args)
    assert code == 2, out
    for phrase in says:
        assert phrase in out, f"{phrase!r} not in: {out}"
    return out


def nothing_complete(run: Path) -> bool:
    """No output at all, or an output none of whose groups is marked complete."""
    if not (run / "zarr.json").exists():
        return True
    root = zarr.open_group(str(run), mode="r")
    return not any(g.attrs.get(schema.ATTR_COMPLETE) for _, g in root.groups())


def snapshot(run: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(run)), p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, extract={"shard_size": 4, "batch_size": 4},
                   stats={"n_permutations": 9, "n_bootstrap": 9})
    return tmp, job


def run_refused(env, name: str, *flags: str, says: tuple[str, ...], **sections) -> Path:
    """`qkov run` of the base job with `sections` overridden, into a fresh output: refused,
    and leaving nothing that looks complete."""
    tmp, job = env
    out = tmp / name / "run"
    (tmp / name).mkdir(exist_ok=True)
    sections.setdefault("output", {"path": str(out)})
    refused("run", write_job_file(job, tmp / name / "job.toml", **sections), "--inline", *flags, says=says)
    assert nothing_complete(Path(sections["output"]["path"]))
    return out


def task_file(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def complete_run(env):
    tmp, job = env
    out = tmp / "complete" / "run"
    (tmp / "complete").mkdir()
    toml = write_job_file(job, tmp / "complete" / "job.toml", output={"path": str(out)})
    code, text = qkov("run", toml, "--inline")
    assert code == 0, text
    return toml, out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- the job file


def test_missing_job_file(env):
    refused("run", env[0] / "nope.toml", says=("job file not found",))


def test_toml_syntax_error(env):
    bad = env[0] / "syntax.toml"
    bad.write_text("[model\npath = 'x'\n")
    refused("run", bad, says=("TOML syntax error",))


def test_unknown_key(env):
    run_refused(env, "unknown-key", model={"pathh": "x"}, says=("[model.pathh] unknown key",))


def test_wrong_type(env):
    run_refused(env, "wrong-type", extract={"batch_size": "eight"}, says=("[extract.batch_size]", "integer", "'eight'"))


def test_unknown_model_name(env):
    run_refused(env, "model-name", model={"path": None, "name": "gpt-17"}, says=("unknown model name 'gpt-17'",))


# ---------------------------------------------------------------- the model


def test_missing_model_path(env):
    run_refused(env, "no-model", model={"path": str(env[0] / "no-such-model")}, says=("model path not found",))


def test_unsupported_architecture(env):
    """A real architecture whose attention qkov does not know (MPT's fused Wqkv): the error lists
    the attention modules found and how to declare the layout."""
    import transformers as tf

    folder = env[0] / "mpt"
    torch.manual_seed(0)
    tf.MptForCausalLM(tf.MptConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64)).save_pretrained(folder)
    run_refused(env, "mpt", model={"path": str(folder)},
                says=("does not recognise the attention layout of MptForCausalLM", "transformer.blocks.0.attn", "Wqkv",
                      "[model.layout]"))


def test_layers_out_of_range(env):
    run_refused(env, "layers", score={"layers": [0, 5]}, says=("score.layers [5] out of range", "2 attention layers"))


# ---------------------------------------------------------------- the task files


def test_missing_task_file(env):
    run_refused(env, "no-task", tasks={"a": {"path": str(env[0] / "missing.jsonl")}}, says=("task file not found",))


def test_tokenizer_missing_for_text_tasks(env):
    text = task_file(env[0] / "text.jsonl", [{"id": "t1", "text": "two plus two"}])
    run_refused(env, "no-tokenizer", tasks={"a": {"path": text}}, says=("tokenizer missing for text tasks",))


def test_empty_task_file(env):
    empty = env[0] / "empty.jsonl"
    empty.write_text("\n\n")
    run_refused(env, "empty", tasks={"b": {"path": str(empty)}}, says=("empty task file",))


def test_invalid_json_row(env):
    bad = env[0] / "badjson.jsonl"
    bad.write_text('{"id": "ok", "input_ids": [5, 6, 7]}\n{"id": "broken", "input_ids": [5, 6\n')
    run_refused(env, "badjson", tasks={"a": {"path": str(bad)}}, says=("badjson.jsonl: line 2: invalid JSON",))


def test_sample_too_short(env):
    short = task_file(env[0] / "short.jsonl", [{"id": "ok", "input_ids": [5, 6, 7]}, {"id": "tiny", "input_ids": [5]}])
    run_refused(env, "short", tasks={"a": {"path": short}}, says=("line 2: sample 'tiny' has 1 token(s); at least 2",))


def test_duplicate_sample_ids(env):
    dup = task_file(env[0] / "dup.jsonl", [{"id": "x", "input_ids": [5, 6]}, {"id": "x", "input_ids": [7, 8]}])
    run_refused(env, "dup", tasks={"b": {"path": dup}}, says=("duplicate sample ids", "'x' on lines [1, 2]"))


def test_limit_larger_than_file(env):
    run_refused(env, "limit", tasks={"a": {"limit": 50}}, says=("limit=50 but the file has only 4 rows",))


def test_token_id_outside_vocabulary(env):
    big = task_file(env[0] / "big.jsonl", [{"id": "ok", "input_ids": [5, 6]}, {"id": "huge", "input_ids": [5, 900]}])
    run_refused(env, "vocab", tasks={"a": {"path": big}},
                says=("'huge' (max id 900)", "token ids >= the model's vocabulary size 128"))


# ---------------------------------------------------------------- non-finite gradients

BAD_TOKEN = 77  # its embedding row is NaN: exactly the samples that contain it get NaN loss and gradients
POISONED = ("a1", "a3", "b2")


@pytest.fixture(scope="module")
def nan_job(env):
    tmp, job = env
    model = tiny_model("llama_gqa", seed=0)
    assert not model.config.tie_word_embeddings  # a tied NaN row would reach every sample through the logits
    with torch.no_grad():
        model.get_input_embeddings().weight[BAD_TOKEN] = float("nan")
    folder = save_model(model, None, tmp / "nan-model")
    g = torch.Generator().manual_seed(3)
    files = {}
    for task, n in (("a", 6), ("b", 5)):
        rows = []
        for k in range(n):
            ids = [t if t != BAD_TOKEN else t + 1 for t in torch.randint(3, VOCAB, (9,), generator=g).tolist()]
            if f"{task}{k}" in POISONED:
                ids[4] = BAD_TOKEN
            rows.append({"id": f"{task}{k}", "input_ids": ids})
        files[task] = task_file(tmp / f"nan-{task}.jsonl", rows)
    return dict(model={"path": str(folder)}, tasks={"a": {"path": files["a"]}, "b": {"path": files["b"]}},
                fisher={"batch_size": 3, "beta": 0.9}, extract={"shard_size": 4, "batch_size": 2})


def test_nonfinite_gradients_error_names_the_samples(env, nan_job):
    out = run_refused(env, "nan-error", **nan_job,
                      says=("non-finite loss or gradients for 3 sample(s): ['a1', 'a3', 'b2']", "nonfinite = 'skip'"))
    # the shards without poisoned samples are done (a later --overwrite recomputes them), the run is not complete
    assert (out / "gradients").exists()


def ema_with_skipped_as_zero(g: np.ndarray, finite: np.ndarray, beta: float, batch: int) -> np.ndarray:
    """Bias-corrected EMA of batch means of g² in store order, skipped samples contributing 0."""
    g2 = np.where(finite[:, None, None, None], g.astype(np.float64) ** 2, 0.0)
    F, T = np.zeros(g.shape[1:]), 0
    for s in range(0, len(g), batch):
        F = beta * F + (1 - beta) * g2[s : s + batch].mean(axis=0)
        T += 1
    return F / (1 - beta**T)


def test_nonfinite_skip_records_and_excludes_the_samples(env, nan_job):
    tmp, job = env
    out = tmp / "nan-skip" / "run"
    (tmp / "nan-skip").mkdir()
    toml = write_job_file(job, tmp / "nan-skip" / "job.toml", **{**nan_job, "extract": {**nan_job["extract"], "nonfinite": "skip"}},
                          output={"path": str(out)})
    code, text = qkov("run", toml, "--inline")
    assert code == 0, text
    assert "skipped samples ['a1', 'a3', 'b2']" in text

    grads = xr.open_zarr(out, group="gradients", consolidated=False)
    ids = list(grads.sample_id.values)
    finite = grads.finite.values
    assert grads.attrs["skipped_samples"] == list(POISONED)
    assert [i for i, f in zip(ids, finite) if not f] == list(POISONED)
    assert np.isnan(grads.loss.values[~finite]).all() and np.isfinite(grads.loss.values[finite]).all()

    fisher = xr.open_zarr(out, group="fisher", consolidated=False)
    assert fisher.attrs["skipped_samples"] == list(POISONED)
    for b in "QKVO":
        g = grads[b].values
        assert np.isfinite(g).all()
        np.testing.assert_allclose(fisher[b].values, ema_with_skipped_as_zero(g, finite, 0.9, 3), rtol=1e-5, atol=0)

    from qkov.pipeline.store import RunStore

    scores = RunStore(str(out)).open_scores()  # the logical view of the compactly stored scores
    kept_a = [i for i, f in zip(ids[:6], finite[:6]) if f]
    kept_b = [i for i, f in zip(ids[6:], finite[6:]) if f]
    assert list(scores.sample_a.values) == kept_a and list(scores.sample_b.values) == kept_b
    # M[i, j] = Σ_p g_i² / (Î + λ) · |g_j| from the stored gradients of the kept samples only
    b, layer = "K", 1
    g = grads[b].sel(layer=layer).values.astype(np.float64)  # (sample, kv_head, param)
    lam = float(fisher["damping"].sel(block=b, layer=layer))
    inv = 1.0 / (fisher[b].sel(layer=layer).values.astype(np.float64) + lam)
    ga, gb = g[:6][finite[:6]], g[6:][finite[6:]]
    ref = np.einsum("ihp,hp,jhp->hij", ga**2, inv, np.abs(gb))
    kv_of = grads["kv_head_of"].values
    got = scores["interference"].sel(block=b, layer=layer).values  # (head, a, b)
    np.testing.assert_allclose(got, ref[kv_of], rtol=1e-5)
    stats = xr.open_zarr(out, group="stats", consolidated=False)
    assert (stats.attrs["n_a"], stats.attrs["n_b"]) == (len(kept_a), len(kept_b))


@pytest.mark.parametrize("kept", [0, 1])
def test_nonfinite_skip_checks_the_sample_counts_left(env, nan_job, kept):
    """extract.nonfinite = "skip" leaving task b with 0 (a ValueError traceback) or 1 sample (ran
    without a word): refused in one line with the counts after skipping; nothing marked complete."""
    tmp, job = env
    rows = [{"id": f"b{k}", "input_ids": [5, 6, 7, 8, 9, 10] if k < kept else [5, 6, BAD_TOKEN, 8, 9]} for k in range(2)]
    b = task_file(tmp / f"nan-b-kept{kept}.jsonl", rows)
    out = run_refused(env, f"nan-kept{kept}", **{**nan_job, "tasks": {**nan_job["tasks"], "b": {"path": b}},
                                                  "extract": {**nan_job["extract"], "nonfinite": "skip"}},
                      says=(f"task 'beta' has {kept} sample(s) left of 2", "at least 2 per task"))
    assert (out / "gradients").exists()  # extracted, never marked complete


# ---------------------------------------------------------------- the output


def test_existing_output_without_overwrite(env, complete_run):
    toml, out = complete_run
    before = snapshot(out)
    refused("run", toml, "--inline", says=("already exists; pass --resume to continue it or --overwrite",))
    assert snapshot(out) == before


def test_unwritable_output(env):
    (env[0] / "a-file").write_text("not a folder")
    out = env[0] / "a-file" / "run"
    run_refused(env, "unwritable", output={"path": str(out)}, says=("cannot write the output", "writable output.path"))
    assert not out.exists()


def test_output_is_a_folder_that_is_not_a_qkov_run(env):
    folder = env[0] / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    run_refused(env, "thesis-job", output={"path": str(folder)}, says=("is not a qkov run", "Choose a new or empty output.path"))
    run_refused(env, "thesis-overwrite", "--overwrite", output={"path": str(folder)}, says=("is not a qkov run",))
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_output_owned_by_another_run(env, complete_run):
    toml, src = complete_run
    out = copy_run(src, env[0] / "owned")
    toml = write_job_file(env[1], env[0] / "owned.toml", output={"path": str(out)})
    token = acquire_lock(str(out))  # held by this (live) process
    try:
        before = snapshot(out)
        for flags in ((), ("--resume",), ("--overwrite",)):
            refused("run", toml, "--inline", *flags, says=("another qkov run owns the output",))
        refused("stats", out, "--n-permutations", 5, says=("another qkov run owns the output",))
        assert snapshot(out) == before
    finally:
        release_lock(str(out), token)


def test_resume_and_overwrite_together(env, complete_run):
    refused("run", complete_run[0], "--resume", "--overwrite", says=("--resume and --overwrite exclude each other",))


def test_resume_with_a_changed_job_file(env, complete_run):
    toml, src = complete_run
    out = copy_run(src, env[0] / "changed")
    # a moved run (output.path) and another cluster are fine; what is computed may not change
    changed = write_job_file(env[1], env[0] / "changed.toml", output={"path": str(out)}, fisher={"beta": 0.5},
                             score={"blocks": ["Q", "O"]}, cluster={"n_workers": 3})
    before = snapshot(out)
    out_text = refused("run", changed, "--inline", "--resume",
                       says=("--resume refused", "at ['fisher.beta', 'score.blocks']", "--overwrite"))
    assert "cluster" not in out_text and "output" not in out_text
    assert snapshot(out) == before


def test_resume_after_the_task_files_changed(env):
    """Same job file, other samples: the finished shards belong to other inputs."""
    tmp, job = env
    a = tmp / "changing-a.jsonl"
    shutil.copy(job.tasks.a.path, a)
    out = tmp / "changing" / "run"
    toml = write_job_file(job, tmp / "changing.toml", tasks={"a": {"path": str(a)}},
                          output={"path": str(out), "keep_work": True})  # its records, to fake an interruption
    assert qkov("run", toml, "--inline")[0] == 0
    root = zarr.open_group(str(out), mode="r+")  # as if interrupted after the first shard
    root["gradients"].attrs[schema.ATTR_COMPLETE] = False
    root[schema.WORK]["done"][1] = 0
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    rows[2]["input_ids"][0] = (rows[2]["input_ids"][0] + 1) % VOCAB
    task_file(a, rows)
    before = snapshot(out)
    refused("run", toml, "--inline", "--resume", says=("--resume refused: the samples differ", "--overwrite"))
    assert snapshot(out) == before


def test_incompatible_schema_version(env, complete_run):
    toml, src = complete_run
    out = copy_run(src, env[0] / "schema999")
    root = zarr.open_group(str(out), mode="r+")
    for node in [root, *(g for _, g in root.groups())]:
        node.attrs[schema.ATTR_SCHEMA] = 999
    refused("stats", out, says=("schema version 999",))
    refused("query", out, "--layer", 0, "--head", 0, says=("schema version 999",))
    resumed = write_job_file(env[1], env[0] / "schema999.toml", output={"path": str(out)})
    refused("run", resumed, "--inline", "--resume", says=("schema version 999",))


def test_stats_on_incomplete_scores(env, complete_run):
    out = copy_run(complete_run[1], env[0] / "incomplete")
    zarr.open_group(str(out / "scores"), mode="r+").attrs[schema.ATTR_COMPLETE] = False
    refused("stats", out, says=("'scores'", "not marked complete", "--resume"))


def test_stats_on_a_path_without_a_run(env):
    refused("stats", env[0] / "nowhere", says=("no qkov run at",))


# ---------------------------------------------------------------- untrusted inputs (issue 18)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_line_refusal(*args) -> str:
    """Exit code 2, exactly one error message (rich may wrap it), no traceback."""
    code, out = qkov(*args)
    assert code == 2, out
    assert out.count("error:") == 1 and "Traceback" not in out, out
    return out


class TestUntrustedInputs:
    """Corrupted, undecodable, inconsistent and oversized inputs to validate, run, stats, query and
    report: each ends with exit code 2, one message that names what to fix, and no new files."""

    @pytest.fixture(scope="class")
    def base(self, tmp_path_factory):
        tmp = tmp_path_factory.mktemp("untrusted")
        job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 9, "n_bootstrap": 9})
        out = tmp / "done"
        toml = write_job_file(job, tmp / "done.toml", output={"path": str(out)})
        assert qkov("run", toml, "--inline")[0] == 0
        return tmp, job, out

    def refused_everywhere(self, base, name: str, says: str, **sections) -> None:
        """`validate` and `run` (inline and on the embedded cluster's path) refuse the job alike."""
        tmp, job, _ = base
        case = tmp / name
        case.mkdir(exist_ok=True)
        sections.setdefault("output", {"path": str(case / "run")})
        toml = write_job_file(job, case / "job.toml", **sections)
        before = _tree(tmp)
        for args in (("validate", toml), ("run", toml, "--inline"), ("run", toml)):
            out = _one_line_refusal(*args)
            assert says in out, f"{args[0]}: {says!r} not in {out}"
        assert _tree(tmp) == before

    # ---- the job file and task files
    def test_undecodable_job_file(self, base):
        tmp = base[0]
        bad = tmp / "latin1.toml"
        bad.write_bytes(write_job_file(base[1], tmp / "x.toml").read_bytes().replace(b"[model]", b"# r\xe9sum\xe9\n[model]", 1))
        before = _tree(tmp)
        for cmd in ("validate", "run", "check"):
            assert "not UTF-8 text" in _one_line_refusal(cmd, bad)
        assert _tree(tmp) == before

    def test_binary_garbage_as_job_file(self, base):
        tmp = base[0]
        bad = tmp / "garbage.toml"
        bad.write_bytes(bytes(range(256)) * 4)
        for cmd in ("validate", "run"):
            _one_line_refusal(cmd, bad)

    def test_undecodable_task_file(self, base):
        bad = base[0] / "latin1.jsonl"
        bad.write_bytes(b'{"id": "ok", "input_ids": [5, 6, 7]}\n{"id": "caf\xe9", "input_ids": [5, 6]}\n')
        self.refused_everywhere(base, "latin1-task", "line 2: not UTF-8 text", tasks={"a": {"path": str(bad)}})

    def test_surrogate_escape_in_an_id(self, base):
        bad = base[0] / "surrogate.jsonl"
        bad.write_text('{"id": "ok", "input_ids": [5, 6, 7]}\n{"id": "x\\udc80", "input_ids": [5, 6]}\n')
        self.refused_everywhere(base, "surrogate", "unpaired surrogate", tasks={"a": {"path": str(bad)}})

    def test_nul_in_an_id(self, base):
        bad = base[0] / "nul.jsonl"
        bad.write_text('{"id": "a", "input_ids": [5, 6, 7]}\n{"id": "a\\u0000", "input_ids": [5, 6]}\n')
        self.refused_everywhere(base, "nul", "line 2 (sample 'a\\x00'): the id holds a NUL character", tasks={"a": {"path": str(bad)}})

    def test_samples_longer_than_the_models_positions(self, base):
        from qkov.testing import save_model

        folder = save_model(tiny_model("gpt2", seed=0), None, base[0] / "gpt2")  # 64 learned positions
        long = task_file(base[0] / "long.jsonl", [{"id": f"l{k}", "input_ids": [5] * 100} for k in range(3)])
        self.refused_everywhere(base, "positions", "longer than the model's 64 positions",
                                model={"path": str(folder), "max_length": 128}, tasks={"a": {"path": long}})

    def test_labels_outside_the_classifiers_classes(self, base):
        from qkov.testing import save_model

        folder = save_model(tiny_model("bert", seed=0), None, base[0] / "bert")  # 2 classes
        rows = lambda k0: [{"id": f"s{k}", "input_ids": [5, 6, 7, 8], "label": k % 2} for k in range(k0, k0 + 3)]
        a = task_file(base[0] / "labels-a.jsonl", rows(0)[:2] + [{"id": "bad", "input_ids": [5, 6, 7], "label": 7}])
        b = task_file(base[0] / "labels-b.jsonl", rows(10))
        self.refused_everywhere(base, "labels", "label outside the classifier's 2 classes",
                                model={"path": str(folder)}, tasks={"a": {"path": a}, "b": {"path": b}})

    def test_one_sample_per_task(self, base):
        self.refused_everywhere(base, "n1", "at least 2 per task", tasks={"a": {"limit": 1}, "b": {"limit": 1}})

    # ---- model folders
    def broken_model(self, base, name: str) -> Path:
        folder = base[0] / name
        shutil.copytree(base[1].model.path, folder)
        return folder

    def test_truncated_weights(self, base):
        folder = self.broken_model(base, "truncated")
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-1000])
        self.refused_everywhere(base, "truncated-run", "truncated or corrupt safetensors", model={"path": str(folder)})

    def test_missing_weights(self, base):
        folder = self.broken_model(base, "noweights")
        (folder / "model.safetensors").unlink()
        self.refused_everywhere(base, "noweights-run", "has no weight files", model={"path": str(folder)})

    def test_pickle_only_weights(self, base):
        folder = self.broken_model(base, "pickle")
        (folder / "model.safetensors").unlink()
        torch.save(tiny_model("llama_gqa", seed=0).state_dict(), folder / "pytorch_model.bin")
        self.refused_everywhere(base, "pickle-run", "safetensors weights only", model={"path": str(folder)})

    def test_config_inconsistent_with_the_weights(self, base):
        folder = self.broken_model(base, "inconsistent")
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 8}))
        self.refused_everywhere(base, "inconsistent-run", "do not match config.json", model={"path": str(folder)})

    def test_undecodable_model_config(self, base):
        folder = self.broken_model(base, "badconfig")
        (folder / "config.json").write_bytes(b'{"model_type": "llama", "x": "\xff"}')
        self.refused_everywhere(base, "badconfig-run", "not UTF-8 text", model={"path": str(folder)})

    # ---- devices and storage
    def test_a_device_that_does_not_exist(self, base):
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
        self.refused_everywhere(base, "nocuda", "no CUDA device", extract={"device": "cuda"})

    def test_storage_backend_not_installed(self, base):
        import importlib.util

        if importlib.util.find_spec("gcsfs") is not None:
            pytest.skip("gcsfs is installed")
        self.refused_everywhere(base, "gcs", "storage backend is not installed", output={"path": "gs://bucket/run"})

    def test_storage_without_reachable_credentials(self, base):
        # one attempt per request: botocore's default retries back off for ~7 s before the same refusal
        so = {"key": "nobody", "secret": "nothing", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
              "config_kwargs": {"retries": {"max_attempts": 1}}}
        self.refused_everywhere(base, "s3", "cannot reach the output", output={"path": "s3://bucket/run", "storage_options": so})

    # ---- existing runs: stats, query, report
    def test_corrupted_run_metadata(self, base):
        tmp, _, done = base
        run = tmp / "meta-corrupt"
        shutil.copytree(done, run)
        for meta in (run / "zarr.json", run / "scores" / "zarr.json"):  # e.g. a half-synced copy
            meta.write_bytes(b'{"zarr_format": 3, "node_type": "gro\xff')
        self.readers_refuse(tmp, run, tmp / "meta-corrupt-report")

    def test_a_corrupted_score_chunk(self, base):
        """One flipped bit in a stored score chunk: every reader names the chunk (no traceback)."""
        tmp, _, done = base
        run = tmp / "chunk-corrupt"
        shutil.copytree(done, run)
        chunk = next(p for p in sorted((run / "scores").rglob("*")) if p.is_file() and "pooled_interference" in str(p)
                     and "/c/" in str(p))
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x40
        chunk.write_bytes(bytes(data))
        # `qkov stats` with the run's own settings reads the sums its score stage reduced, not
        # this chunk; other settings read the pair scores and meet the damage
        self.readers_refuse(tmp, run, tmp / "chunk-corrupt-report", stats=("--n-permutations", 19, "--name", "other"))
        sums = next(p for p in sorted((run / "scores").rglob("*")) if p.is_file() and "stat_sums_interference" in str(p)
                    and "/c/" in str(p))
        data = bytearray(sums.read_bytes())
        data[len(data) // 2] ^= 0x40
        sums.write_bytes(bytes(data))
        assert "stat_sums_interference" in "".join(_one_line_refusal("stats", run).split())  # checksummed too (rich wraps)

    def test_a_corrupted_score_chunk_read_by_zarr_itself(self, base):
        """The same on a store DirectChunks does not read (fsspec's memory://, as S3 would be):
        zarr's own checksum error is named as a damaged store, not printed as a traceback."""
        import fsspec

        tmp, _, done = base
        fs = fsspec.filesystem("memory")
        fs.put(str(done), "/chunk-corrupt-remote", recursive=True)
        chunk = next(p for p in sorted(fs.find("/chunk-corrupt-remote/scores")) if "pooled_interference" in p and "/c/" in p)
        data = bytearray(fs.cat(chunk))
        data[len(data) // 2] ^= 0x40
        fs.pipe(chunk, bytes(data))
        run = "memory://chunk-corrupt-remote"
        before = _tree(tmp)
        for args in (("stats", run, "--n-permutations", 19, "--name", "other"), ("query", run, "--layer", 0, "--head", 0),
                     ("report", run, "--out", tmp / "remote-report")):
            assert "checksum" in _one_line_refusal(*args)
        assert _tree(tmp) == before
        fs.rm("/chunk-corrupt-remote", recursive=True)

    def test_a_file_where_a_run_should_be(self, base):
        tmp = base[0]
        f = tmp / "notes.txt"
        f.write_text("not a run")
        self.readers_refuse(tmp, f, tmp / "notes-report")

    @staticmethod
    def readers_refuse(tmp: Path, run: Path, report_out: Path, stats: tuple = ()) -> None:
        """stats (with `stats` options), query and report each refuse `run` in one line and leave
        nothing under `tmp`."""
        before = _tree(tmp)
        _one_line_refusal("stats", run, *stats)
        _one_line_refusal("query", run, "--layer", 0, "--head", 0)
        _one_line_refusal("report", run, "--out", report_out)
        assert _tree(tmp) == before

    def test_names_and_places_the_file_system_refuses(self, base):
        tmp, _, done = base
        run = tmp / "names"
        shutil.copytree(done, run)
        (tmp / "a-file").write_text("x")
        before = _tree(tmp)
        assert "stats name" in _one_line_refusal("stats", run, "--n-permutations", 19, "--name", "../../escape")
        _one_line_refusal("report", run, "--out", tmp / "a-file" / "report")
        _one_line_refusal("query", run, "--layer", 99, "--head", 0)
        assert _tree(tmp) == before
