"""More than two tasks in one job: one extraction, every task pair answered in its own sub-run.

The reference is the two-task runs a three-task run replaces: with `fisher.source = "pair"`
each pair's Fisher is the one its two-task run pools, so every score and every statistic of
the pair's sub-run must equal that run's (same seeds)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qkov.pipeline import schema
from qkov.pipeline.run import run_job
from qkov.pipeline.store import RunStore
from qkov.testing import tiny_job


def _two_task(tmp, three, x, y, **sections):
    """The two-task job of the pair (x, y) of the three-task job `three`: the same files, names,
    model and settings (`sections` as `tiny_job` takes them)."""
    tasks = three.tasks
    return tiny_job(tmp, n_a=10, n_b=7, tasks={"a": tasks[x].model_dump(), "b": tasks[y].model_dump()},
                    output={"path": str(tmp / f"run-{x}{y}")}, **sections)


def _assert_same_stats(got, ref) -> None:
    """Every statistics variable equal: floats to float tolerance (the runs batch their samples
    differently), everything else exactly."""
    assert sorted(got.data_vars) == sorted(ref.data_vars)
    for name in ref.data_vars:
        a, b = got[name].values, ref[name].values
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.fixture(scope="module")
def pooled3(tmp_path_factory):
    """A finished three-task run (5 + 4 + 4 samples, the Fisher pooled over all three) that the
    readers' tests read and the resume tests copy."""
    tmp = tmp_path_factory.mktemp("pooled3")
    job = tiny_job(tmp, n_a=5, n_b=4, more=(4,), output={"path": str(tmp / "run")})
    run_job(job)
    return job


def _copy_of(job, tmp_path):
    """The job pointed at a copy of its finished run (a run may move: --resume takes it)."""
    import shutil

    shutil.copytree(job.output.path, tmp_path / "run")
    return job.model_copy(update={"output": job.output.model_copy(update={"path": str(tmp_path / "run")})})


@pytest.fixture(scope="module")
def four_by_cli(tmp_path_factory):
    """A four-task run made through the CLI; (job, its output)."""
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app
    from qkov.testing import write_job_file

    tmp = tmp_path_factory.mktemp("four")
    job = tiny_job(tmp, n_a=5, n_b=4, more=(3, 4), output={"path": str(tmp / "run")})
    res = CliRunner().invoke(app, ["run", str(write_job_file(job, tmp / "job.toml")), "--inline"])
    assert res.exit_code == 0, res.output
    return job, res.output


@pytest.fixture(scope="module")
def pair3(tmp_path_factory):
    """A finished three-task run (10 + 7 + 6 samples) with a Fisher per pair (`source = "pair"`),
    only read: by the two-task comparison and by the plan's prediction of its sizes."""
    tmp = tmp_path_factory.mktemp("pair3")
    three = tiny_job(tmp, more=(6,), fisher={"source": "pair"}, output={"path": str(tmp / "run-abc")})
    run_job(three)
    return three


@pytest.mark.slow
def test_three_task_run_equals_its_three_two_task_runs(pair3, tmp_path):
    three = pair3
    store = RunStore(three.output.path)
    assert store.is_multi() and store.pair_keys() == [("a", "b"), ("a", "c"), ("b", "c")]
    for x, y in three.tasks.pairs():
        job = _two_task(tmp_path, three, x, y)
        run_job(job)
        ref, got = RunStore(job.output.path), store.pair(x, y)
        assert got.pair_tasks() == (x, y)
        r_f, g_f = ref.open_fisher(), got.open_fisher()
        for b in "QKVO":
            np.testing.assert_allclose(g_f[b].values, r_f[b].values, rtol=1e-5, atol=0)
        r_s, g_s = ref.open_scores(), got.open_scores()
        assert list(g_s[schema.SAMPLE_I].values) == list(r_s[schema.SAMPLE_I].values)
        assert g_s.attrs[schema.ATTR_TASK_A] == three.tasks[x].name and g_s.attrs[schema.ATTR_TASK_B] == three.tasks[y].name
        for name in ("pooled_interference", "pooled_alignment", "interference", "alignment"):
            np.testing.assert_allclose(g_s[name].values, r_s[name].values, rtol=1e-5, atol=1e-6 * np.abs(r_s[name].values).max())
        _assert_same_stats(got.open_stats(), ref.open_stats())




def test_plan_predicts_the_pairs_of_a_three_task_run(pair3, tmp_path):
    """`qkov plan` counts each pair's groups (and one Fisher per pair under "pair")."""
    from qkov.pipeline.plan import plan
    from qkov.pipeline.store.paths import size_bytes as du

    job = pair3  # planned as a new job would be (the plan reads the job, not its finished output)
    p = plan(job.model_copy(update={"output": job.output.model_copy(update={"path": str(tmp_path / "run")})}))
    assert "3 task pairs" in "\n".join(p.lines()) and p.task_sizes == (10, 7, 6)
    out = Path(job.output.path)
    store = RunStore(str(out))
    pairs = [out / schema.pair_group(x, y) for x, y in store.pair_keys()]
    for group in ("scores", "stats", "fisher"):
        real = sum(du(str(p_ / group)) for p_ in pairs)
        assert real > 0 and abs(p.groups[group] - real) <= 0.10 * real, (group, p.groups[group], real)
    real = du(str(out / "gradients"))
    assert abs(p.groups["gradients"] - real) <= 0.10 * real


def test_a_pooled_fisher_is_shared_and_each_pair_reads_only_its_tasks(four_by_cli):
    job, _ = four_by_cli
    store = RunStore(job.output.path)
    assert store.has_group(schema.FISHER) and len(store.pair_keys()) == 6
    grads = store.open_gradients()
    assert grads.attrs[schema.ATTR_TASK_SIZES] == [5, 4, 3, 4]
    for x, y in store.pair_keys():
        pair = store.pair(x, y)
        assert not pair.own_fisher and not (Path(job.output.path) / schema.pair_group(x, y) / "fisher").exists()
        scores = pair.open_scores()
        names = store.task_names()
        want = [str(i) for i, t in zip(grads[schema.SAMPLE_ID].values, grads[schema.TASK].values) if str(t) in (names[x], names[y])]
        assert list(map(str, scores[schema.SAMPLE_I].values)) == want
        assert int(scores.attrs[schema.ATTR_N_A]) == int((grads[schema.TASK].values == names[x]).sum())
        assert pair.open_stats().sizes  # every pair has its statistics


def test_readers_take_a_pair_and_refuse_a_wrong_one(pooled3, tmp_path):
    import qkov
    from qkov.pipeline.errors import UsageError

    run = pooled3.output.path
    with pytest.raises(UsageError, match="compares 3 tasks.*alpha,gamma"):
        qkov.answers(run)
    with pytest.raises(UsageError, match="ask for alpha,gamma"):
        qkov.answers(run, pair="gamma,alpha")
    with pytest.raises(UsageError, match="two different tasks"):
        qkov.answers(run, pair="alpha,omega")
    by_name, by_key = qkov.answers(run, pair="alpha,gamma"), qkov.answers(run, pair="a,c")
    assert by_name.equals(by_key) and len(by_name) > 0
    assert qkov.open_stats(run, pair="beta,gamma").attrs == RunStore(run).pair("b", "c").open_stats().attrs
    every = qkov.answers(run, pair="all")  # all pairs, with BH across them (checked against scipy's)
    from scipy.stats import false_discovery_control

    assert len(every) == 3 * len(by_name) and set(zip(every.task_a, every.task_b)) == {
        ("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")}
    for (question, score), rows in every.groupby(["question", "score"]):
        tested = rows[rows.p_value.notna()]
        if len(tested):
            want = false_discovery_control(tested.p_value.to_numpy(), method="bh")
            np.testing.assert_allclose(tested.q_value_across_pairs.to_numpy(), want, rtol=1e-12)
        assert rows[rows.p_value.isna()].q_value_across_pairs.isna().all()
    two = tiny_job(tmp_path, n_a=5, n_b=4, output={"path": str(tmp_path / "two")})
    run_job(two)
    assert qkov.answers(two.output.path, pair="alpha,beta").equals(qkov.answers(two.output.path))


def test_checks_run_per_pair_into_each_pairs_sub_run(tmp_path):
    import qkov

    job = tiny_job(tmp_path, n_a=4, n_b=4, more=(4,), output={"path": str(tmp_path / "run")})
    res = qkov.check(job, n_samples=2, prediction=False)
    assert sorted(res) == ["a-b", "a-c", "b-c"]
    store = RunStore(job.output.path)
    for x, y in store.pair_keys():
        got = store.pair(x, y).open_checks()
        ids = got.attrs[schema.ATTR_PROVENANCE]["sample_ids"]  # the pair's own samples (ids are key + row)
        assert bool(got["passed"].all()) and {i[0] for i in ids} == {x, y}, ids


@pytest.mark.parametrize("tasks,fix", [
    ({"C": {"name": "g", "path": "x.jsonl"}}, "lower-case identifiers"),
    ({"c": {"name": "alpha", "path": "x.jsonl"}}, "both 'alpha'"),
])
def test_job_file_task_keys_and_names_are_checked(tmp_path, tasks, fix):
    from qkov.pipeline.errors import JobFileError

    with pytest.raises(JobFileError, match=fix):
        tiny_job(tmp_path, tasks=tasks)


@pytest.mark.parametrize("sections,fix", [
    ({"fisher": {"source": "d"}}, "not one of"),
    ({"fisher": {"source": "pair"}, "score": {"mode": "sketch"}}, "sketches are formed with one Fisher"),
    ({"output": {"path": "run", "keep_gradients": False}}, "two tasks only"),
])
def test_settings_three_tasks_cannot_take_are_refused(tmp_path, sections, fix):
    from qkov.pipeline.errors import JobFileError

    with pytest.raises(JobFileError, match=fix):
        tiny_job(tmp_path, more=(3,), **sections)


def test_a_two_task_job_keeps_its_config_and_hash(tmp_path):
    """New keys are absent from a two-task job's config, so its hash (and --resume) still holds."""
    job = tiny_job(tmp_path)
    cfg = job.config_dict()
    assert list(cfg["tasks"]) == ["a", "b"] and cfg["fisher"]["source"] == "pooled"
    for task in cfg["tasks"].values():  # the keys runs were stored with before tasks could be more
        assert set(task) == {"name", "path", "text_field", "id_field", "limit"}, task
    assert job.n_tasks == 2 and job.tasks.pairs() == [("a", "b")]


def test_a_run_stopped_between_pairs_resumes_with_the_finished_pairs_kept(pooled3, tmp_path):
    """A crash after some pairs are done loses none of them: --resume scores only the rest."""
    job = _copy_of(pooled3, tmp_path)
    store = RunStore(job.output.path)
    before = {p: store.pair(*p).open_stats() for p in store.pair_keys()}
    stamp = {p: store.pair(*p).group_attrs(schema.SCORES_GROUP)[schema.ATTR_PROVENANCE]["created"] for p in store.pair_keys()}
    # as if the run died while scoring the last pair: its scores never marked complete, no stats
    last = store.pair("b", "c")
    last.root("r+")[schema.SCORES_GROUP].attrs[schema.ATTR_COMPLETE] = False
    last.delete(schema.STATS)
    summary = run_job(job, resume=True)
    assert "extract" in summary.skipped_stages
    assert [s for s in summary.skipped_stages if s.startswith("score")] == ["score ('a', 'b')", "score ('a', 'c')"]
    for p in (("a", "b"), ("a", "c")):  # untouched
        assert store.pair(*p).group_attrs(schema.SCORES_GROUP)[schema.ATTR_PROVENANCE]["created"] == stamp[p]
    for p in store.pair_keys():
        after = store.pair(*p).open_stats()
        for name in before[p].data_vars:
            np.testing.assert_array_equal(after[name].values, before[p][name].values, err_msg=f"{p} {name}")


def test_a_lost_chunk_of_one_pairs_scores_is_recomputed_on_resume(pooled3, tmp_path):
    job = _copy_of(pooled3, tmp_path)
    store = RunStore(job.output.path)
    want = store.pair("a", "c").open_stats()
    scores = tmp_path / "run" / schema.pair_group("a", "c") / schema.SCORES_GROUP
    chunks = sorted(p for p in (scores / "pooled_interference_Q").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[0].unlink()
    summary = run_job(job, resume=True)
    assert summary.repaired_scores and [s for s in summary.skipped_stages if s.startswith("score")] == [
        "score ('a', 'b')", "score ('b', 'c')"]
    got = store.pair("a", "c").open_stats()
    for name in want.data_vars:
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)


@pytest.mark.parametrize("score", [{"mode": "sketch", "sketch_dim": 64}, {"keep_pairs": "top", "top_k": 5}],
                         ids=["sketch", "keep-top"])
def test_pairs_with_a_named_fisher_equal_two_task_runs_in_other_modes(tmp_path, score):
    """fisher.source = a task key: the pairs holding that task use the Fisher a two-task run of
    the pair uses, so in sketch mode and with keep_pairs = "top" too their statistics agree."""
    three = tiny_job(tmp_path, more=(6,), fisher={"source": "a"}, score=score, output={"path": str(tmp_path / "run-abc")})
    run_job(three)
    store = RunStore(three.output.path)
    assert store.has_group(schema.FISHER) and store.open_fisher().attrs["source"] == "a"
    for x, y in (("a", "b"), ("a", "c")):
        job = _two_task(tmp_path, three, x, y, fisher={"source": "a"}, score=score)
        run_job(job)
        _assert_same_stats(store.pair(x, y).open_stats(), RunStore(job.output.path).open_stats())


def test_the_cli_runs_four_tasks_and_prints_one_line_per_pair(four_by_cli):
    from typer.testing import CliRunner

    from qkov.pipeline.cli import app

    job, output = four_by_cli
    out = " ".join(output.split())
    assert "6 task pairs of alpha, beta, gamma, delta" in out
    for a, b in (("alpha", "beta"), ("gamma", "delta")):
        assert f"{a} × {b}:" in out and "conflict" in out
    res = CliRunner().invoke(app, ["query", job.output.path])
    assert res.exit_code == 2 and "--pair A,B" in res.output and "gamma,delta" in res.output
