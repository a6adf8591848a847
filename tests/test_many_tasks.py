"""More than two tasks in one job: one extraction, every task pair answered in its own sub-run.

The reference is the two-task runs a three-task run replaces: with `fisher.source = "pair"`
each pair's Fisher is the one its two-task run pools, so every score and every statistic of
the pair's sub-run must equal that run's (same seeds)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from qkov.pipeline import schema
from qkov.pipeline.run import run_job
from qkov.pipeline.store import RunStore
from qkov.testing import tiny_job


def _two_task(tmp, three, x, y):
    """The two-task job of the pair (x, y) of the three-task job `three`: the same files, names,
    model and settings."""
    tasks = three.tasks
    return tiny_job(tmp, n_a=10, n_b=7, tasks={"a": tasks[x].model_dump(), "b": tasks[y].model_dump()},
                    output={"path": str(tmp / f"run-{x}{y}")})


@pytest.mark.slow
def test_three_task_run_equals_its_three_two_task_runs(tmp_path):
    three = tiny_job(tmp_path, more=(6,), fisher={"source": "pair"}, output={"path": str(tmp_path / "run-abc")})
    t = time.perf_counter()
    run_job(three)
    t_three = time.perf_counter() - t
    store = RunStore(three.output.path)
    assert store.is_multi() and store.pair_keys() == [("a", "b"), ("a", "c"), ("b", "c")]
    t_pairs = 0.0
    for x, y in three.tasks.pairs():
        job = _two_task(tmp_path, three, x, y)
        t = time.perf_counter()
        run_job(job)
        t_pairs += time.perf_counter() - t
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
        r_st, g_st = ref.open_stats(), got.open_stats()
        assert sorted(g_st.data_vars) == sorted(r_st.data_vars)
        for name in r_st.data_vars:
            a, b = g_st[name].values, r_st[name].values
            if a.dtype.kind in "fc":
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)


