"""Statistics on a real (tiny) model's scores: calibration under a true null.

A and B are drawn from one pool (same generator), so every labelling is equally
likely under the null. For many random A/B splits of the pooled score matrices the
stage's p-values must be uniform, and the stage must agree with the pure math.
"""
from __future__ import annotations

from qkov.pipeline.store import RunStore
import numpy as np
import pytest
from scipy import stats as sps

from qkov.pipeline import stats as st
from qkov.pipeline.executors import InlineExecutor
from qkov.pipeline.extract import run_extract
from qkov.pipeline.run import prepare_output
from qkov.pipeline.score import run_score
from qkov.pipeline.spec import StatsSpec
from qkov.pipeline.stats_stage import compute_stats
from qkov.testing import tiny_job


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("null")
    # same length range and vocabulary for both tasks: exchangeable samples
    job = tiny_job(tmp, "llama_gqa", n_a=12, n_b=12, min_len=6, max_len=10)
    prepare_output(RunStore.of(job), job, resume=False, overwrite=True)
    run_extract(RunStore.of(job), job, InlineExecutor())
    return run_score(RunStore.of(job), job, InlineExecutor()).load()


def relabelled(scores, order):
    """The scores dataset as if the samples in `order[:n_a]` were task A."""
    n_a = int(scores.attrs["n_a"])
    ds = scores.isel(sample_i=order, sample_j=order)
    for name in ("interference", "alignment"):
        ab = ds[f"pooled_{name}"].values[..., :n_a, n_a:]
        ds[name] = (("block", "layer", "head", "sample_a", "sample_b"), ab)
    ids = ds.sample_i.values
    return ds.assign_coords(sample_a=ids[:n_a], sample_b=ids[n_a:], is_a=("sample_i", np.arange(len(order)) < n_a))


def test_null_p_values_are_uniform_on_model_scores(pooled):
    rng = np.random.default_rng(1)
    n = pooled.sizes["sample_i"]
    slices = [("Q", 0, 0), ("K", 1, 0), ("V", 0, 1), ("O", 1, 3)]
    n_splits, n_perm = 200, 199
    ind_a, ind_b = st.permutation_indicators(12, 12, n_perm, seed=7)
    for score in ("interference", "alignment"):
        for blk, layer, head in slices:
            S = pooled[f"pooled_{score}"].sel(block=blk, layer=layer, head=head).values.astype(np.float64)
            p = []
            for _ in range(n_splits):
                order = rng.permutation(n)
                Sp = S[np.ix_(order, order)]
                t_obs = st.observed_statistic(Sp, np.arange(n) < 12)
                t_null = st.null_statistics(Sp, ind_a, ind_b)
                p.append(st.p_values(np.atleast_1d(t_obs), t_null[:, None], "greater")[0])
            p = np.array(p)
            assert sps.kstest(p, "uniform").pvalue > 0.01, (score, blk, layer, head)
            lo, hi = sps.binom.interval(0.99, n_splits, 0.05)
            assert lo <= (p <= 0.05).sum() <= hi, (score, blk, layer, head, (p <= 0.05).sum())


def test_stage_agrees_with_the_math_on_a_relabelled_split(pooled):
    order = np.random.default_rng(3).permutation(pooled.sizes["sample_i"])
    ds = relabelled(pooled, order)
    settings = StatsSpec(n_permutations=99, n_bootstrap=50, seed=5)
    out = compute_stats(ds, settings)
    ind_a, ind_b = st.permutation_indicators(12, 12, 99, seed=5)
    S = ds["pooled_interference"].sel(block="Q", layer=1, head=2).values.astype(np.float64)
    t_obs = st.observed_statistic(S, np.arange(24) < 12)
    p = st.p_values(np.atleast_1d(t_obs), st.null_statistics(S, ind_a, ind_b)[:, None], settings.alternative)[0]
    got = out.sel(score="interference", block="Q", layer=1, head=2)
    assert float(got["mean"]) == pytest.approx(float(ds["interference"].sel(block="Q", layer=1, head=2).mean()), rel=1e-6)
    assert float(got["p_value"]) == pytest.approx(p)
    assert float(got["null_mean"]) == pytest.approx(float(st.null_statistics(S, ind_a, ind_b).mean()), rel=1e-9)
