"""The statistics' math: exact pieces against direct references, and validity shown by
simulation (null calibration, max-T FWER, BH's FDR and power, bootstrap coverage)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from qkov.pipeline import stats as st

ALPHA = 0.05


def interference_like(rng, f: int, n: int, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample terms u_i, v_i ≥ 0 and S = U Vᵀ (asymmetric), slices on very different scales."""
    u = np.abs(rng.normal(size=(f, n, d)))
    v = np.abs(rng.normal(size=(f, n, d)))
    scale = 10.0 ** rng.uniform(-3, 3, size=(f, 1, 1))
    return u * scale, v


def null_family(seed: int, f: int, n_a: int, n_b: int, k: int, kind: str = "interference"):
    """t_obs [F], t_null [K, F] for F slices where A and B come from the same distribution."""
    rng = np.random.default_rng([11, seed])
    if kind == "interference":
        u, v = interference_like(rng, f, n_a + n_b)
        S = u @ v.transpose(0, 2, 1)
    else:  # alignment-like: signed, symmetric
        g = rng.normal(size=(f, n_a + n_b, 4))
        S = g @ g.transpose(0, 2, 1)
    ind_a, ind_b = st.permutation_indicators(n_a, n_b, k, seed)
    t_null = st.null_statistics(S, ind_a, ind_b).T
    return st.observed_statistic(S, np.arange(n_a + n_b) < n_a), t_null


# ---------------------------------------------------------------- exact pieces


def test_bh_equals_scipy_with_ties_and_ones():
    rng = np.random.default_rng(0)
    for trial in range(30):
        p = rng.random(rng.integers(1, 300))
        p[: p.size // 3] = np.round(p[: p.size // 3], 2)  # ties
        p[rng.random(p.size) < 0.1] = 1.0
        p[rng.random(p.size) < 0.05] = rng.random() * 1e-4
        np.testing.assert_array_equal(st.bh_qvalues(p), scipy.stats.false_discovery_control(p, method="bh"))
    p = np.array([0.01, np.nan, 0.04, 0.03])
    q = st.bh_qvalues(p)
    assert np.isnan(q[1])
    np.testing.assert_array_equal(q[[0, 2, 3]], scipy.stats.false_discovery_control(p[[0, 2, 3]], method="bh"))


def test_permutation_indicators():
    ind_a, ind_b = st.permutation_indicators(7, 5, 4000, seed=1)
    assert ind_a.shape == ind_b.shape == (4000, 12) and ind_a.dtype == np.float64
    assert (ind_a.sum(1) == 7).all() and (ind_a + ind_b == 1).all()
    np.testing.assert_array_equal(ind_a, st.permutation_indicators(7, 5, 4000, seed=1)[0])
    assert not np.array_equal(ind_a, st.permutation_indicators(7, 5, 4000, seed=2)[0])
    # every position lands in A with probability 7/12, every labelling equally likely
    np.testing.assert_allclose(ind_a.mean(0), 7 / 12, atol=0.03)
    labels = {tuple(r) for r in ind_a[:50].astype(int)}
    assert len(labels) > 45


def test_null_statistics_equal_direct_means():
    rng = np.random.default_rng(2)
    S = rng.normal(size=(3, 4, 9, 9)).astype(np.float32)
    ind_a, ind_b = st.permutation_indicators(4, 5, 50, seed=3)
    got = st.null_statistics(S, ind_a, ind_b)
    assert got.shape == (3, 4, 50)
    for k in range(50):
        a, b = ind_a[k] == 1, ind_b[k] == 1
        np.testing.assert_allclose(got[..., k], S.astype(np.float64)[..., a, :][..., b].mean((-2, -1)), rtol=1e-12)
    is_a = np.arange(9) < 4
    np.testing.assert_allclose(st.observed_statistic(S, is_a), S[..., :4, 4:].astype(np.float64).mean((-2, -1)), rtol=1e-12)


def test_p_values_by_hand():
    t_null = np.array([[1.0, -3.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0]])  # K=4, F=2
    t_obs = np.array([3.0, -3.0])
    np.testing.assert_array_equal(st.p_values(t_obs, t_null, "greater"), [3 / 5, 5 / 5])
    np.testing.assert_array_equal(st.p_values(t_obs, t_null, "less"), [4 / 5, 2 / 5])
    # two-sided about the mean of all K+1 values (2.6, -0.6):
    # |null - m| = [1.6, .6, .4, 1.4] vs .4 -> 4 hits; [2.4, .6, 1.6, 2.6] vs 2.4 -> 2 hits
    np.testing.assert_array_equal(st.p_values(t_obs, t_null, "two-sided"), [5 / 5, 3 / 5])
    # no spread (ablated head) -> 1 whatever the direction; NaN stays NaN
    assert st.p_values(np.zeros(1), np.zeros((9, 1)), "less")[0] == 1.0
    assert np.isnan(st.p_values(np.array([np.nan]), t_null[:, :1])[0])
    bad = t_null.copy()
    bad[2, 1] = np.nan  # a NaN permutation value must not count as "not exceeding"
    assert np.isnan(st.p_values(t_obs, bad)[1]) and np.isnan(st.maxt_pvalues(t_obs, bad)[1])
    assert st.maxt_pvalues(t_obs, bad)[0] == st.maxt_pvalues(t_obs[:1], t_null[:, :1])[0]
    with pytest.raises(ValueError, match="alternative"):
        st.p_values(t_obs, t_null, "bigger")


def test_maxt_against_loop_reference():
    t_obs, t_null = null_family(seed=4, f=12, n_a=6, n_b=7, k=300)
    t_obs[3] += 5 * t_null[:, 3].std()  # one real effect
    t_null[:, 5] = t_obs[5] = 0.0  # one dead slice
    for alt in ("greater", "less", "two-sided"):
        got = st.maxt_pvalues(t_obs, t_null, alt)
        live = [s for s in range(12) if s != 5]
        allv = {s: np.append(t_null[:, s], t_obs[s]) for s in live}  # standardise over K+1 values
        z = {s: (t_null[:, s] - allv[s].mean()) / allv[s].std() for s in live}
        z0 = {s: (t_obs[s] - allv[s].mean()) / allv[s].std() for s in live}
        orient = {"greater": lambda x: x, "less": lambda x: -x, "two-sided": np.abs}[alt]
        mx = np.max([orient(z[s]) for s in live], axis=0)
        for s in range(12):
            want = 1.0 if s == 5 else (1 + np.sum(mx >= orient(z0[s]) - 1e-9)) / 301
            assert got[s] == pytest.approx(max(want, st.p_values(t_obs, t_null, alt)[s]), abs=0), (alt, s)
        assert (got >= st.p_values(t_obs, t_null, alt)).all()
    assert st.maxt_pvalues(t_obs, t_null, "greater")[3] <= 2 / 301


def test_bootstrap_ci_against_resampling_reference():
    rng = np.random.default_rng(5)
    M = rng.normal(size=(2, 7, 6))
    low, high = st.bootstrap_ci(M, n_boot=400, level=0.9, seed=9)
    w_a, w_b = st.bootstrap_weights(7, 6, 400, seed=9)
    assert (w_a.sum(1) == 7).all() and (w_b.sum(1) == 6).all()
    for s in range(2):
        reps = [M[s][np.repeat(np.arange(7), wa.astype(int))][:, np.repeat(np.arange(6), wb.astype(int))].mean() for wa, wb in zip(w_a, w_b)]
        np.testing.assert_allclose([low[s], high[s]], np.quantile(reps, [0.05, 0.95]), rtol=1e-12)


# ---------------------------------------------------------------- validity by simulation


@pytest.mark.parametrize("kind,alternative", [("interference", "greater"), ("interference", "two-sided"), ("alignment", "less")])
def test_null_calibration(kind, alternative):
    p = np.concatenate([st.p_values(*null_family(seed, 400, 15, 12, 999, kind), alternative) for seed in range(3)])
    ks = scipy.stats.kstest(p, "uniform")
    lo, hi = scipy.stats.binom.interval(0.99, p.size, ALPHA)
    fp = int((p <= ALPHA).sum())
    print(f"\n{kind}/{alternative}: KS p={ks.pvalue:.3f}, false positives {fp}/{p.size} (99% band {lo:.0f}-{hi:.0f})")
    assert ks.pvalue > 0.01
    assert lo <= fp <= hi


def test_maxt_controls_fwer():
    reps, errors, naive = 300, 0, 0
    for r in range(reps):
        t_obs, t_null = null_family(seed=100 + r, f=20, n_a=10, n_b=10, k=199)
        t_obs[0] = t_null[:, 0] = 0.0  # an ablated slice in every family
        errors += bool((st.maxt_pvalues(t_obs, t_null) <= ALPHA).any())
        naive += bool((st.p_values(t_obs, t_null) <= ALPHA).any())
    lo, hi = scipy.stats.binom.interval(0.99, reps, ALPHA)
    print(f"\nmax-T FWER {errors / reps:.3f} (99% band {lo / reps:.3f}-{hi / reps:.3f}); uncorrected {naive / reps:.3f}")
    assert lo <= errors <= hi
    assert naive > hi  # the family is large enough for correction to matter


def test_bh_fdr_and_power_with_planted_effects():
    reps, f, planted, n = 100, 40, 8, 20
    fdp, power = [], []
    for r in range(reps):
        rng = np.random.default_rng([21, r])
        u, v = interference_like(rng, f, 2 * n)
        u[:planted, :n] *= 2.0  # A's u larger in the planted slices
        S = u @ v.transpose(0, 2, 1)
        ind_a, ind_b = st.permutation_indicators(n, n, 999, seed=r)
        t_null = st.null_statistics(S, ind_a, ind_b).T
        q = st.bh_qvalues(st.p_values(st.observed_statistic(S, np.arange(2 * n) < n), t_null))
        hit = q <= ALPHA
        fdp.append(hit[planted:].sum() / max(hit.sum(), 1))
        power.append(hit[:planted].mean())
    fdr, se = np.mean(fdp), np.std(fdp) / np.sqrt(reps)
    print(f"\nBH realised FDR {fdr:.4f} (se {se:.4f}, bound {ALPHA * (f - planted) / f:.3f}); power {np.mean(power):.3f}")
    assert fdr <= ALPHA + 3 * se
    assert np.mean(power) >= 0.8


def test_bootstrap_coverage():
    reps, n_a, n_b, d = 300, 30, 25, 4
    mu, nu = np.array([1.0, 0.5, -0.5, 0.2]), np.array([0.3, 1.0, 0.4, -0.6])
    covered = 0
    for r in range(reps):
        rng = np.random.default_rng([31, r])
        u = mu + rng.normal(size=(n_a, d))
        v = nu + rng.normal(size=(n_b, d))
        low, high = st.bootstrap_ci(u @ v.T, n_boot=1000, level=0.95, seed=r)
        covered += low <= mu @ nu <= high
    print(f"\nbootstrap 95% CI coverage {covered / reps:.3f}")
    assert 0.90 <= covered / reps <= 0.99
