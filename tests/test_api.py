"""The way in (issue 30, API and CLI): `qkov.run` at a script's top level, answers as a table,
queries of any selection, `qkov info`, plottable scores, whole cells off a terminal, and the
small things a first session trips over. Each test fails on the code before its fix."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, env: dict | None = None):
    """`qkov ARGS` in-process: (exit code, stdout + stderr, stdout)."""
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback is a bug, not a refusal
    return res.exit_code, res.output, res.stdout


def _subprocess(args: list[str], cwd: Path) -> subprocess.Popen:
    """The venv's python with `args`, the checkout importable, stdout and stderr pipes (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COLUMNS", None)
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One finished tiny run (4 + 3 samples, GQA: 4 query heads, 2 KV heads, 2 layers) and its job."""
    from qkov.testing import tiny_job, write_job_file

    tmp = tmp_path_factory.mktemp("api")
    job = tiny_job(tmp, "llama_gqa", n_a=4, n_b=3, stats={"n_permutations": 19, "n_bootstrap": 19})
    out = tmp / "run"
    toml = write_job_file(job, tmp / "job.toml", output={"path": str(out)})
    code, text, _ = _cli("run", toml, "--inline")
    assert code == 0, text
    return tmp, job, out


@pytest.fixture(scope="module")
def named(done):
    """`qkov stats RUN --n-permutations 19 --seed 3 --name strict` on the finished run: its output."""
    code, text, _ = _cli("stats", done[2], "--n-permutations", 19, "--seed", 3, "--name", "strict")
    assert code == 0, text
    return text


# ---------------------------------------------------------------- 1 and 6h: a plain script, the embedded cluster

STAGE_DONE = r"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ {stage}: \d+/\d+ done$"


@pytest.mark.slow
def test_a_script_without_a_main_guard_runs_on_the_embedded_cluster(done, tmp_path):
    """The README's three lines as a script's top level (no `if __name__ == "__main__":`): each
    worker process the embedded cluster spawned re-ran the script, started a cluster of its own
    and failed ("Nanny failed to start"). Now the run finishes, shows its progress on stderr (the
    API by default, as the CLI) and ends without the nanny's "Worker process still alive after
    4.0 seconds, killing" (each worker's final garbage collection over torch's objects outlasted
    the grace period; the CLI closes its cluster through the same `cluster_client`). The one
    embedded cluster of this module; `python -c` and `python -m` mains: the test below."""
    from qkov.pipeline import schema
    from qkov.pipeline.store import RunStore
    from qkov.testing import assert_runs_close, write_job_file

    _, job, ref = done
    write_job_file(job, tmp_path / "job.toml", output={"path": str(tmp_path / "run")},
                   cluster={"n_workers": 1, "threads_per_worker": 1})
    (tmp_path / "script.py").write_text('import qkov\njob = qkov.load_job("job.toml")\nqkov.run(job)\n')
    proc = _subprocess(["script.py"], tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Nanny failed" not in err, err[-3000:]
    assert "still alive" not in err, f"a worker was killed at shutdown:\n{err[-3000:]}"
    for stage in ("extract", "score", "stats"):
        assert re.search(STAGE_DONE.format(stage=stage), err, re.M), f"no progress for {stage}:\n{err}"
    assert RunStore(str(tmp_path / "run")).is_complete(schema.STATS)
    assert_runs_close(tmp_path / "run", ref)  # the same results as the module's inline run


def test_worker_processes_are_spawned_without_the_main_module():
    """The mechanism, for every shape of `__main__`: a script (`__file__`), `python -m` (a spec
    name) and `python -c` (neither, so multiprocessing never imported it): Dask's worker
    processes are prepared without it while an embedded cluster is open; other processes, and
    every process afterwards, as before."""
    import types
    from multiprocessing import spawn

    from qkov.pipeline.cluster import WORKER_PROCESS_NAME, workers_without_main

    import inspect

    import distributed.nanny

    assert repr(WORKER_PROCESS_NAME) in inspect.getsource(distributed.nanny.WorkerProcess.start).replace('"', "'")
    real = sys.modules["__main__"]
    shapes = {"script": {"__file__": str(ROOT / "script.py")}, "-m": {"__spec__": types.SimpleNamespace(name="tool")},
              "-c": {}}
    try:
        for shape, attrs in shapes.items():
            main = types.ModuleType("__main__")
            main.__spec__ = None
            for k, v in attrs.items():
                setattr(main, k, v)
            sys.modules["__main__"] = main
            keys = {"init_main_from_path", "init_main_from_name"}
            before = keys & set(spawn.get_preparation_data(WORKER_PROCESS_NAME))
            assert bool(before) == (shape != "-c"), shape
            with workers_without_main():
                assert not keys & set(spawn.get_preparation_data(WORKER_PROCESS_NAME)), shape
                assert keys & set(spawn.get_preparation_data("other")) == before, shape
            assert keys & set(spawn.get_preparation_data(WORKER_PROCESS_NAME)) == before, shape
    finally:
        sys.modules["__main__"] = real


# ---------------------------------------------------------------- 2: answers as a DataFrame


def test_answers_hold_what_the_headline_tables_show_and_round_trip_through_csv(done, tmp_path):
    """`qkov.answers` against the console's headline tables, cell by cell as the console prints
    them, on statistics with α = 0.99 so that every table has rows (conflict, synergy, differ)."""
    import pandas as pd

    import qkov
    from qkov.pipeline.query import _cells, headline_tables

    run = done[2]
    qkov.run_stats(run, alpha=0.99, name="loose")
    stats = qkov.open_stats(run, stats="loose")
    df = qkov.answers(run, stats="loose")
    assert df.attrs["alpha"] == 0.99
    tables = headline_tables(stats, top=10_000, differ_scores=("interference", "alignment"))
    filled = {(t["key"], t["score"]) for t in tables if t["rows"]}
    assert {("conflict", "alignment"), ("shared", "interference"), ("differ", "interference")} <= filled, filled
    for col in ("asks", "units"):  # every row says its question in words and its unit
        assert df[col].str.len().min() > 10
    rows = {(r.question, r.score, r.block, r.layer, r.head): r._asdict() for r in df.itertuples(index=False)}

    def as_headline(kind: str, r: dict) -> dict:
        """The df's values under the headline row's names."""
        key = (r["block"], r["layer"], r["head"])
        differ = rows[("differ", r["score"], *key)]
        kv = differ["kv_head"] if r["kv_head"] is not None else None
        out = {"block": key[0], "layer": key[1], "head": key[2], "kv_head": kv, "score": r["score"]}
        if kind == "conflict":
            t = rows[("transfer", "alignment", *key)]
            out.update(transfer_direction=t["direction"], transfer=t["estimate"], transfer_ci_low=t["ci_low"],
                       transfer_ci_high=t["ci_high"], transfer_q_value=t["q_value"],
                       **{c: t[c] for c in ("cosine", "cosine_ci_low", "cosine_ci_high")})
        elif kind == "shared":
            s = rows[("shared", "interference", *key)]
            out.update(sharing=s["estimate"], **{c: s[c] for c in s if c.startswith("sharing_")},
                       direction=differ["direction"], mean=differ["mean"], chance=differ["chance"], q_value=differ["q_value"])
        else:
            out.update(direction=differ["direction"], mean=differ["mean"], chance=differ["chance"], effect=differ["estimate"],
                       effect_ci_low=differ["ci_low"], effect_ci_high=differ["ci_high"], effect_rel=differ["effect_rel"],
                       q_value=differ["q_value"], p_fwer=differ["p_fwer"])
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}

    for table in tables:
        kind = table["key"]
        for r in table["rows"]:
            mine = as_headline(kind, r)
            assert [c[1] for c in _cells(kind, mine)] == [c[1] for c in _cells(kind, r)], (kind, r)  # as printed
            for name, value in mine.items():  # and to full precision
                if isinstance(value, float):
                    assert r[name] is not None and np.isclose(value, r[name], rtol=1e-12), (kind, name, r)
        # the same heads: the df's rows that answer the table's question
        heads = {(r["block"], r["layer"], r["head"]) for r in table["rows"]}
        if kind == "conflict":
            pick = (df.question == "transfer") & (df.direction == -1)
        elif kind == "shared":
            shared = df[(df.question == "shared") & np.isfinite(df.estimate)]  # ranked on sharing alone
            pick = df.index.isin(shared.estimate.sort_values(ascending=False, kind="stable").index[:len(heads)])
        else:
            pick = (df.question == "differ") & (df.score == table["score"]) & df.significant
        assert heads == set(zip(df["block"][pick], df["layer"][pick], df["head"][pick])), kind
    synergy = df[(df.question == "transfer") & (df.direction == 1)]
    assert set(synergy.verdict) <= {"synergy"} and set(df[df.question == "transfer"].verdict) <= {"conflict", "synergy", "not significant"}

    df.to_csv(tmp_path / "answers.csv", index=False)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "answers.csv"), df)


# ---------------------------------------------------------------- 3: any selection; info; parameter names


def test_query_takes_any_selection_of_layer_head_and_block(done):
    import pandas as pd

    import qkov

    run = done[2]
    everything = qkov.answers(run)
    whole = qkov.query(run)
    assert len(whole["slices"]) == len(everything) and whole["n_a"] == 4 and "blocks" not in whole
    layer = qkov.query(run, layer=1)["slices"]
    assert layer and {r["layer"] for r in layer} == {1} and len(layer) == (everything.layer == 1).sum()
    assert {r["block"] for r in qkov.query(run, block="v")["slices"]} == {"V"}
    head1 = qkov.query(run, head=1)["slices"]  # Q and O of head 1; K and V of its KV head (0), stored once
    assert {(r["block"], r["head"], r["kv_head"]) for r in head1} == {("Q", 1, 0), ("O", 1, 0), ("K", 0, 0), ("V", 0, 0)}
    one = qkov.query(run, layer=1, head=1, block="K", top=3)
    assert one["blocks"][0]["kv_head"] == 0 and len(one["blocks"][0]["top_pairs"]) == 3
    assert {(r["block"], r["layer"]) for r in one["slices"]} == {("K", 1)}

    code, text, out = _cli("query", run, "--block", "V", "--format", "csv")
    assert code == 0, text
    from io import StringIO

    got = pd.read_csv(StringIO(out))
    want = everything[everything.block == "V"].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    code, text, out = _cli("query", run, "--layer", 0, "--format", "json")
    assert code == 0 and json.loads(out)["slices"] == json.loads(json.dumps(qkov.query(run, layer=0)["slices"])), text
    assert _cli("query", run, "--layer", 0, "--json")[2] == out  # the old flag still works
    code, text, out = _cli("query", run, "--head", 2)
    assert code == 0 and "head 2" in out and "K" in out, text
    for bad, says in ((("--format", "xml"), "--format 'xml' is not one of table | csv | json"),
                      (("--layer", 9), "layer 9 is out of range; this run has layers 0..1"),
                      (("--json", "--format", "csv"), "--json and --format csv exclude each other")):
        code, text, _ = _cli("query", run, *bad)
        assert code == 2 and says in " ".join(text.split()) and text.count("error:") == 1 and "Traceback" not in text, text


def test_info_lists_every_group_with_settings_completeness_and_bytes(done, named):
    import qkov

    run = done[2]
    info = qkov.info(run)
    groups = {g["group"]: g for g in info["groups"]}
    on_disk = {p.name for p in run.iterdir() if p.is_dir() and p.name != "_lock"}
    assert set(groups) == on_disk and {"gradients", "fisher", "scores", "stats", "stats_strict"} <= set(groups)
    strict = groups["stats_strict"]
    assert strict["complete"] is True and strict["settings"]["seed"] == 3 and strict["settings"]["n_permutations"] == 19
    assert "--stats strict" in strict["what"] and groups["scores"]["settings"]["keep_pairs"] == "all"
    for name, g in groups.items():
        assert g["bytes"] == sum(f.stat().st_size for f in (run / name).rglob("*") if f.is_file()) > 0, name
    assert info["bytes"] == sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) and info["locked_by"] is None
    assert [g["group"] for g in info["groups"]][:4] == ["gradients", "fisher", "scores", "stats"]
    code, text, out = _cli("info", run, "--format", "json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(info)), text
    code, text, out = _cli("info", run)
    assert code == 0 and "stats_strict" in out and "seed=3" in out and "yes" in out, text


# ---------------------------------------------------------------- 4: plottable scores


def test_scores_plot_and_say_what_they_answer(done):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import qkov

    run = done[2]
    scores = qkov.open_scores(run)
    one = scores.interference.sel(block="V", layer=1, head=0)
    one.plot()  # TypeError "... StringDType()" before: sample ids could not be axis labels
    plt.close("all")
    scores.alignment.sel(block="Q", layer=0, head=1).plot()
    plt.close("all")
    assert list(one.sample_a.astype(str).values) == ["a0", "a1", "a2", "a3"]
    for var in ("interference", "alignment", "pooled_interference", "pooled_alignment"):
        attrs = scores[var].attrs
        assert all(len(attrs.get(k, "")) > 5 for k in ("question", "units", "direction")), (var, attrs)
    grads = qkov.open_gradients(run)
    assert grads.sample_id.dtype.kind == "U" and grads.task.dtype.kind == "U"
    assert qkov.open_diagnostics(run).sample_i.dtype.kind == "U"
    tree = qkov.open_run(run)
    assert tree["scores"].dataset.sample_a.dtype.kind == "U" and "question" in tree["scores"].dataset.interference.attrs


# ---------------------------------------------------------------- 5: output outside a terminal


def test_query_through_a_pipe_prints_every_cell_whole(done, tmp_path):
    """stdout a pipe: tables 160 columns wide, no cell cut to `…` (80 columns cut the head's tables)."""
    run = done[2]
    queries = [["query", str(run), "--layer", "1", "--head", "2", "--top", "5"], ["query", str(run)]]
    code = ("import sys; from typer.main import get_command; from qkov.pipeline.cli import app\n"
            f"for args in {queries!r}:\n    get_command(app).main(args, standalone_mode=False)\n    print('=' * 8, flush=True)")
    proc = _subprocess(["-c", code], tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    head, slices = out.split("=" * 8)[:2]
    for text in (head, slices):
        assert "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= 160, text
    assert "top 5 pairs" in head and "transfer [CI]" in slices, out


# ---------------------------------------------------------------- 6: the small things


def test_named_statistics_leave_no_lock_behind_and_their_hints_name_them(done, named):
    """6a: the lock group stayed in the consolidated metadata (`xr.open_datatree` showed `/_lock`
    with a token, host and pid); 6b: the hints after `qkov stats --name` omitted `--stats NAME`."""
    import xarray as xr

    run = done[2]
    tree = xr.open_datatree(str(run), engine="zarr")
    assert "_lock" not in tree.children and "stats_strict" in tree.children
    assert not (run / "_lock").exists()
    flat = " ".join(named.split())
    assert f"qkov query {run} --stats strict" in flat and f"qkov report {run} --stats strict" in flat, named
    assert "qkov.answers(" in flat and "stats='strict'" in flat, named


def test_a_named_rerun_compares_with_its_own_group_and_speaks_each_callers_language(done, named):
    """6f: settings of `stats_<name>` are the base of its rerun (the run's main settings were:
    seed 0 against the group's 3 refused an unchanged rerun); 6e: the CLI names flags, the
    API parameters ("pass replace=True (--replace)" before)."""
    import qkov
    from qkov.pipeline.errors import StatsStageError

    run = done[2]
    code, text, _ = _cli("stats", run, "--n-permutations", 19, "--name", "strict")  # the group's own settings
    assert code == 0, text
    assert qkov.open_stats(run, stats="strict").attrs["seed"] == 3
    code, text, _ = _cli("stats", run, "--n-permutations", 29, "--name", "strict")
    flat = " ".join(text.split())
    assert code == 2 and "different settings (n_permutations: 19 -> 29);" in flat, text
    assert "--replace" in flat and "--name NAME" in flat and "replace=True" not in flat, text
    with pytest.raises(StatsStageError) as e:
        qkov.run_stats(run, n_permutations=29, name="strict")
    assert "replace=True" in str(e.value) and "name=NAME" in str(e.value) and "--" not in str(e.value)


def test_run_refusals_name_the_api_parameters_in_python(done):
    import qkov
    from qkov.pipeline.errors import StoreError, UsageError

    _, job, out = done
    with pytest.raises(StoreError) as e:
        qkov.run(job.model_copy(update={"output": job.output.model_copy(update={"path": str(out)})}), inline=True)
    assert "pass resume=True to continue it or overwrite=True to replace it" in str(e.value) and "--" not in str(e.value)
    with pytest.raises(UsageError, match=r"^resume=True and overwrite=True exclude each other"):
        qkov.run(job, inline=True, resume=True, overwrite=True)


def test_the_report_header_shows_sketch_settings_only_in_sketch_mode(done):
    """6c: an exact run's header said sketch_dim=4096 (the config's default, which it never used)."""
    from qkov.pipeline.report import _score_settings, render_html, run_info
    from qkov.pipeline.store import RunStore

    store = RunStore(str(done[2]))
    info = run_info(store, store.open_stats())
    page = render_html(info, [], {})
    assert "mode=<code>exact</code>" in page and "sketch" not in page
    assert _score_settings({"mode": "sketch", "sketch_dim": 64, "sketch_seed": 2, "storage_dtype": "float32"}) == {
        "mode": "sketch", "sketch_dim": 64, "sketch_seed": 2, "storage_dtype": "float32"}


def test_help_shows_flags_as_flags():
    """6d: rich's help printed `<bool>` beside every flag (and dropped `[cluster]` as markup)."""
    for cmd in ("run", "stats", "query", "report", "demo", "info"):
        code, text, _ = _cli(cmd, "--help", env={"COLUMNS": "200"})
        assert code == 0 and "<bool>" not in text and "--help" in text, text
    text = _cli("run", "--help", env={"COLUMNS": "200"})[1]
    assert re.search(r"^\s+--resume\s+continue an interrupted run", text, re.M), text
    assert "[cluster] of the job" in text, text
