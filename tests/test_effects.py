"""Effect sizes (sharing, transfer, cosine, effect vs chance), the transfer test and
layer → head testing: exact pieces against float64 references computed from per-sample
gradients with DESIGN §1's formulas, validity shown by simulation (CI coverage, uniform
p under the null, FDR and power of the hierarchical procedure)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from qkov.pipeline import stats as st
from qkov.workers.reductions import ab_margins, pair_sums

ALPHA = 0.05


def gradients(rng, f: int, n_a: int, n_b: int, p: int, mu_a=None, mu_b=None, noise: str = "normal"):
    """Per-sample gradients g [F, N, P] (A then B) and a damped diagonal Fisher Î_reg [F, P]."""
    size = (f, n_a + n_b, p)
    e = rng.normal(size=size) if noise == "normal" else rng.standard_t(4, size=size) / np.sqrt(2.0)
    g = e.copy()
    if mu_a is not None:
        g[:, :n_a] += mu_a
    if mu_b is not None:
        g[:, n_a:] += mu_b
    fisher = (g**2).mean(1) + 1e-3
    return g, fisher


def pooled_scores(g: np.ndarray, fisher: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """DESIGN §1 over every ordered pooled pair, stored as the score stage stores them:
    M[i, j] = Σ_p g_i² / Î · |g_j|, A[i, j] = Σ_p g_i g_j / Î."""
    inv = 1.0 / fisher[:, None, :]
    inter = np.einsum("fip,fjp->fij", g**2 * inv, np.abs(g))
    align = np.einsum("fip,fjp->fij", g * inv, g)
    return inter.astype(dtype), align.astype(dtype)


def reference_effects(g: np.ndarray, fisher: np.ndarray, n_a: int) -> dict[str, np.ndarray]:
    """The effects from the gradients' task means, not from the pair matrices (float64).

    Σ_{i≠i'} u_i·v_i' = (Σu)·(Σv) − Σ u_i·v_i, so the within-task means need no pairs."""
    g = g.astype(np.float64)
    inv = 1.0 / fisher[:, None, :]
    u, v, w = g**2 * inv, np.abs(g), g * np.sqrt(inv)  # interference = u·v, alignment = w·w

    def cross(x, y):  # mean over i in X, j in Y of x_i · y_j
        return np.einsum("fp,fp->f", x.mean(1), y.mean(1))

    def within(x, y):
        n = x.shape[1]
        return (np.einsum("fp,fp->f", x.sum(1), y.sum(1)) - np.einsum("fip,fip->f", x, y)) / (n * (n - 1))

    A, B = slice(None, n_a), slice(n_a, None)
    transfer = cross(w[:, A], w[:, B])
    norm_a, norm_b = within(w[:, A], w[:, A]), within(w[:, B], w[:, B])
    return {
        "sharing_ab": cross(u[:, A], v[:, B]) / within(u[:, A], v[:, A]),
        "sharing_ba": cross(u[:, B], v[:, A]) / within(u[:, B], v[:, B]),
        "transfer": transfer,
        # a task mean whose squared norm is estimated ≤ 0 has no direction
        "cosine": np.where((norm_a > 0) & (norm_b > 0), transfer / np.sqrt(np.abs(norm_a * norm_b)), np.nan),
    }


def exact_null_mean(S: np.ndarray, n_a: int) -> np.ndarray:
    """Mean of the cross-group mean over every labelling with the group sizes kept."""
    n = S.shape[-1]
    vals = []
    for a in itertools.combinations(range(n), n_a):
        is_a = np.isin(np.arange(n), a)
        vals.append(S[..., is_a, :][..., :, ~is_a].astype(np.float64).mean((-2, -1)))
    return np.mean(vals, axis=0)


def effects(S_inter, S_align, is_a, n_boot=0, seed=0):
    """Effects per weight row; the cosine's no-direction rule needs resamples, so point
    estimates alone (n_boot < 2) get the sign rule only (min_z=None)."""
    wa, wb = st.effect_weights(is_a, n_boot, seed)
    mi = st.pair_means(pair_sums(S_inter, wa, wb, is_a), wa, wb)
    ma = st.pair_means(pair_sums(S_align, wa, wb, is_a), wa, wb)
    return st.interference_effects(mi), st.alignment_effects(ma, st.COSINE_MIN_Z if n_boot >= 2 else None)


# ---------------------------------------------------------------- exact pieces


@pytest.mark.parametrize("noise", ["normal", "heavy"])
def test_effects_match_gradient_reference(noise):
    rng = np.random.default_rng(1)
    n_a, n_b, p = 5, 4, 12
    mu_a, mu_b = rng.normal(size=(6, 1, p)), rng.normal(size=(6, 1, p))
    mu_b[3] = -mu_a[3]  # a conflicting slice
    g, fisher = gradients(rng, 6, n_a, n_b, p, mu_a, mu_b, noise)
    g[:, :, : p // 2] *= 10.0 ** rng.uniform(-3, 3, size=(6, 1, 1))  # slices and params on different scales
    fisher = (g**2).mean(1) + 1e-6
    inter, align = pooled_scores(g, fisher)
    is_a = np.arange(n_a + n_b) < n_a
    got_i, got_a = effects(inter, align, is_a)
    ref = reference_effects(g, fisher, n_a)
    for k in ("sharing_ab", "sharing_ba"):
        np.testing.assert_allclose(got_i[k][:, 0], ref[k], rtol=2e-5, err_msg=k)
    np.testing.assert_allclose(got_a["transfer"][:, 0], ref["transfer"], rtol=2e-5, atol=1e-5 * np.abs(align).max())
    np.testing.assert_allclose(got_a["cosine"][:, 0], np.clip(ref["cosine"], -1, 1), rtol=1e-4, atol=1e-6)
    assert got_a["transfer"][3, 0] < 0 and got_a["cosine"][3, 0] < -0.5
    assert (np.abs(got_a["cosine"]) <= 1).all()
    # effect = mean − the mean over every labelling (35 of them), not a Monte Carlo estimate
    for got, S in ((got_i, inter), (got_a, align)):
        want = S[:, :n_a, n_a:].astype(np.float64).mean((-2, -1)) - exact_null_mean(S, n_a)
        np.testing.assert_allclose(got["effect"][:, 0], want, rtol=1e-9, atol=1e-12 * np.abs(S).max())


def test_effects_are_neutral_for_identical_tasks():
    """Task B = a copy of task A: sharing 1 both ways, cosine 1, transfer = ‖μ‖², effect 0."""
    rng = np.random.default_rng(2)
    g, _ = gradients(rng, 3, 6, 0, 10, mu_a=rng.normal(size=(3, 1, 10)))
    g = np.concatenate([g, g], axis=1)
    fisher = (g**2).mean(1) + 1e-3
    inter, align = pooled_scores(g, fisher, np.float64)
    # "within A" leaves out i = i' but the copy of i in B is another sample: compare with
    # the same pairs, i.e. the reference on the duplicated data
    got_i, got_a = effects(inter, align, np.arange(12) < 6)
    ref = reference_effects(g, fisher, 6)
    for k in ("sharing_ab", "sharing_ba"):
        np.testing.assert_allclose(got_i[k][:, 0], ref[k], rtol=1e-12)
        assert (np.abs(got_i[k][:, 0] - 1) < 0.5).all()  # ≈ 1 up to the diagonal term of B
    np.testing.assert_allclose(got_a["cosine"][:, 0], 1.0)  # clipped: the copy pairs make it ≥ 1


def _sharing_rows(g, metric, is_a, n_boot=200, seed=0):
    """sharing, sharing_ab, sharing_ba per weight row (row 0 observed, then the resamples) of
    gradients g [F, N, P] in a fixed metric [F, P] (the Fisher held fixed, as the run has it)."""
    inter, _ = pooled_scores(g, metric, np.float64)
    got, _ = effects(inter, inter, is_a, n_boot=n_boot, seed=seed)
    return got


def test_sharing_is_free_of_gradient_size_and_reads_0_and_1():
    """sharing = √(sharing_ab · sharing_ba): scaling one task's gradients by c leaves it (and
    every bootstrap replicate, hence its CI) unchanged, while each direction moves (by c and
    1/c: the size ratio the per-direction numbers carry); disjoint supports give 0;
    identically distributed tasks give 1 within the CI."""
    rng = np.random.default_rng(21)
    n_a, n_b, p = 9, 8, 12
    is_a = np.arange(n_a + n_b) < n_a
    g, _ = gradients(rng, 3, n_a, n_b, p, rng.normal(size=(3, 1, p)), 0.5 * rng.normal(size=(3, 1, p)))
    metric = rng.uniform(0.5, 2.0, size=(3, p))
    base = _sharing_rows(g, metric, is_a)
    scaled_g = g.copy()
    scaled_g[:, n_a:] *= 7.0
    scaled = _sharing_rows(scaled_g, metric, is_a)
    np.testing.assert_allclose(scaled["sharing"], base["sharing"], rtol=1e-10)
    np.testing.assert_allclose(scaled["sharing_ab"], 7.0 * base["sharing_ab"], rtol=1e-10)
    np.testing.assert_allclose(scaled["sharing_ba"], base["sharing_ba"] / 7.0, rtol=1e-10)
    np.testing.assert_allclose(base["sharing"], np.sqrt(base["sharing_ab"] * base["sharing_ba"]), rtol=1e-12)

    disjoint = g.copy()
    disjoint[:, :n_a, p // 2 :] = 0.0  # A's gradients on the first half of the weights, B's on the second
    disjoint[:, n_a:, : p // 2] = 0.0
    np.testing.assert_array_equal(_sharing_rows(disjoint, metric, is_a)["sharing"][:, 0], 0.0)

    n = 40  # both tasks drawn from one distribution (heavy-tailed, a shared non-zero mean)
    mu = rng.normal(size=(4, 1, p))
    same, _ = gradients(rng, 4, n, n, p, mu, mu, noise="heavy")
    rows = _sharing_rows(same, rng.uniform(0.5, 2.0, size=(4, p)), np.arange(2 * n) < n, n_boot=400, seed=1)
    lo, hi = st.bootstrap_interval(np.moveaxis(rows["sharing"][:, 1:], -1, 0), 0.95)
    print(f"\nidentically distributed tasks: sharing {np.round(rows['sharing'][:, 0], 3)}, "
          f"95% CI lows {np.round(lo, 3)}, highs {np.round(hi, 3)}")
    assert ((lo <= 1.0) & (1.0 <= hi)).all()
    assert (np.abs(rows["sharing"][:, 0] - 1.0) < 0.1).all()


def test_cosine_rule_boundary():
    """cosine is NaN (no direction) exactly where a task-mean norm estimate is fewer than
    min_z bootstrap standard errors above 0: finite just above the boundary, NaN just below;
    a task with no mean gradient gives NaN where the old rule (norm estimate > 0, clip to
    ±1) reported a direction."""
    rng = np.random.default_rng(22)
    n_a, n_b, p = 12, 10, 16
    is_a = np.arange(n_a + n_b) < n_a
    mu = rng.normal(size=(2, 1, p))
    g, _ = gradients(rng, 2, n_a, n_b, p, 0.8 * mu, -0.3 * mu)
    _, align = pooled_scores(g, np.ones((2, p)), np.float64)
    wa, wb = st.effect_weights(is_a, 300, 5)
    means = st.pair_means(pair_sums(align, wa, wb, is_a), wa, wb)
    z = np.minimum(st.norm_z(means["aa"]), st.norm_z(means["bb"]))
    # z by hand: the estimate over the sd of its bootstrap replicates
    aa = means["aa"]
    np.testing.assert_allclose(st.norm_z(aa), aa[:, 0] / np.nanstd(aa[:, 1:], axis=1, ddof=1), rtol=1e-12)
    assert np.isfinite(z).all() and (z > 0).all()
    above = st.alignment_effects(means, min_z=float(z[0]) * (1 - 1e-9))["cosine"]
    below = st.alignment_effects(means, min_z=float(z[0]) * (1 + 1e-9))["cosine"]
    assert np.isfinite(above[0, 0]) and np.isnan(below[0]).all()  # below: the observed value and every replicate
    positive = (means["aa"][0, 1:] > 0) & (means["bb"][0, 1:] > 0)  # above: a replicate needs its own norms > 0
    np.testing.assert_array_equal(np.isfinite(above[0, 1:]), positive)
    assert st.alignment_effects(means)["cosine_norm_z"].tolist() == z.tolist()

    # task B has no mean gradient: its norm is noise, so the cosine has no direction
    g0, _ = gradients(rng, 200, n_a, n_b, p, 2.0 * rng.normal(size=(200, 1, p)), None)
    _, align0 = pooled_scores(g0, np.ones((200, p)), np.float64)
    wa, wb = st.effect_weights(is_a, 200, 6)
    m0 = st.pair_means(pair_sums(align0, wa, wb, is_a), wa, wb)
    old = st.alignment_effects(m0, min_z=None)["cosine"][:, 0]  # the sign rule alone
    new = st.alignment_effects(m0)["cosine"][:, 0]
    print(f"\nno mean gradient in B: old rule gave a direction in {np.isfinite(old).mean():.2f} of slices "
          f"({(np.abs(old) == 1).mean():.2f} clipped to ±1), the z rule in {np.isfinite(new).mean():.2f}")
    assert np.isfinite(old).mean() > 0.3 and np.isfinite(new).mean() < 0.1


def test_chunked_sums_add_up():
    rng = np.random.default_rng(3)
    is_a = rng.random(13) < 0.5  # interleaved labels, as an `is_a` coord may have them
    S = rng.normal(size=(2, 3, 13, 13))
    wa, wb = st.effect_weights(is_a, 20, seed=4)
    whole = pair_sums(S, wa, wb, is_a)
    margins = ab_margins(S, is_a)
    parts, mparts = np.zeros_like(whole), np.zeros_like(margins)
    for r0, c0 in itertools.product(range(0, 13, 5), range(0, 13, 4)):
        chunk = S[..., r0 : r0 + 5, c0 : c0 + 4]
        parts += pair_sums(chunk, wa, wb, is_a, (r0, c0))
        mparts += ab_margins(chunk, is_a, (r0, c0))
    np.testing.assert_allclose(parts, whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mparts, margins, rtol=1e-12, atol=1e-12)
    a, b = np.flatnonzero(is_a), np.flatnonzero(~is_a)
    np.testing.assert_allclose(margins[..., a], S[..., a, :][..., b].sum(-1))
    np.testing.assert_allclose(margins[..., b], S[..., a, :][..., b].sum(-2))


def test_bootstrap_rows_match_resampling_reference():
    """Each bootstrap row = the effect on the resampled data, where a sample drawn twice
    forms no within-task pair with itself (only pairs of different samples count)."""
    rng = np.random.default_rng(5)
    n_a, n_b, p = 6, 5, 8
    g, fisher = gradients(rng, 2, n_a, n_b, p, rng.normal(size=(2, 1, p)), rng.normal(size=(2, 1, p)))
    inter, align = pooled_scores(g, fisher, np.float64)
    is_a = np.arange(n_a + n_b) < n_a
    got_i, got_a = effects(inter, align, is_a, n_boot=30, seed=6)
    w_a, w_b = st.bootstrap_weights(n_a, n_b, 30, seed=6)
    for r in range(30):
        ia = np.repeat(np.arange(n_a), w_a[r].astype(int))
        ib = n_a + np.repeat(np.arange(n_b), w_b[r].astype(int))

        def mean(S, rows, cols):
            vals = [S[:, i, j] for i in rows for j in cols if i != j]
            return np.mean(vals, axis=0)

        assert np.allclose(got_i["sharing_ab"][:, r + 1], mean(inter, ia, ib) / mean(inter, ia, ia), rtol=1e-12)
        assert np.allclose(got_i["sharing_ba"][:, r + 1], mean(inter, ib, ia) / mean(inter, ib, ib), rtol=1e-12)
        assert np.allclose(got_a["transfer"][:, r + 1], mean(align, ia, ib), rtol=1e-12)
        pooled = np.concatenate([ia, ib])
        assert np.allclose(got_a["effect"][:, r + 1], mean(align, ia, ib) - mean(align, pooled, pooled), rtol=1e-10)


def test_degenerate_slices_and_direction():
    is_a = np.arange(7) < 4
    zero = np.zeros((1, 7, 7))
    got_i, got_a = effects(zero, zero, is_a, n_boot=10)
    assert np.isnan(got_i["sharing_ab"]).all() and np.isnan(got_a["cosine"]).all()
    assert (got_a["transfer"] == 0).all() and (got_a["effect"] == 0).all()
    test = st.transfer_test(ab_margins(zero, is_a), is_a)
    assert test["p"][0] == 1.0 and test["t"][0] == 0.0
    lo, hi = st.bootstrap_interval(np.full((10, 1), np.nan), 0.95)
    assert np.isnan(lo).all() and np.isnan(hi).all()
    reps = np.arange(100.0)[:, None].repeat(2, 1)
    reps[:2, 0] = np.nan  # 2% undefined: dropped; 4%: more than a 2.5% tail -> NaN
    reps[:4, 1] = np.nan
    lo, hi = st.bootstrap_interval(reps, 0.95)
    assert np.isfinite(lo[0]) and np.isnan(lo[1]) and np.isnan(hi[1])
    d = st.direction(np.array([2.0, -1.0, 3.0, np.nan, -0.5]), np.array([True, True, False, True, True]))
    assert d.dtype == np.int8 and d.tolist() == [1, -1, 0, 0, -1]


def test_transfer_test_by_hand():
    rng = np.random.default_rng(7)
    S = rng.normal(size=(9, 9)) + 0.3
    is_a = np.arange(9) < 5
    ab = S[:5, 5:]
    r, c = ab.mean(1), ab.mean(0)
    vr, vc = r.var(ddof=1) / 5, c.var(ddof=1) / 4
    df = (vr + vc) ** 2 / (vr**2 / 4 + vc**2 / 3)
    t = ab.mean() / np.sqrt(vr + vc)
    got = st.transfer_test(ab_margins(S, is_a), is_a)
    np.testing.assert_allclose([got["t"], got["df"], got["p"]], [t, df, 2 * scipy.stats.t.sf(abs(t), df)], rtol=1e-12)


# ---------------------------------------------------------------- validity by simulation


def _orthogonal_means(rng, f, p, scale=1.0):
    mu_a = rng.normal(size=(f, 1, p))
    mu_b = rng.normal(size=(f, 1, p))
    mu_b -= (mu_a * mu_b).sum(-1, keepdims=True) / (mu_a**2).sum(-1, keepdims=True) * mu_a  # ⟨μ_A, μ_B⟩ = 0
    return scale * mu_a, scale * mu_b


def transfer_p(rng, f, n_a, n_b, p, mu_a, mu_b, noise="normal", fixed_metric=True):
    """p-values of the transfer test for F slices; the metric is fixed per slice (the
    Fisher is estimated once per run and treated as given by every statistic)."""
    g, fisher = gradients(rng, f, n_a, n_b, p, mu_a, mu_b, noise)
    metric = np.ones((f, p)) if fixed_metric else fisher
    _, align = pooled_scores(g, metric, np.float64)
    is_a = np.arange(n_a + n_b) < n_a
    return st.transfer_test(ab_margins(align, is_a), is_a), align, is_a


@pytest.mark.parametrize("noise", ["normal", "heavy"])
def test_transfer_test_null_calibration(noise):
    """Null: the task means are non-zero but orthogonal in the metric (true transfer 0)."""
    rng = np.random.default_rng([8, noise == "heavy"])
    f, n_a, n_b, p = 3000, 24, 20, 16
    mu_a, mu_b = _orthogonal_means(rng, f, p, 0.6)
    test, align, is_a = transfer_p(rng, f, n_a, n_b, p, mu_a, mu_b, noise)
    pv = test["p"]
    ks = scipy.stats.kstest(pv, "uniform")
    lo, hi = scipy.stats.binom.interval(0.99, f, ALPHA)
    fp = int((pv <= ALPHA).sum())
    # a test that can fail: the one-sample t on A's row means ignores B's sampling variance
    r = align[:, is_a][:, :, ~is_a].mean(-1)
    naive = 2 * scipy.stats.t.sf(np.abs(r.mean(1) / (r.std(1, ddof=1) / np.sqrt(n_a))), n_a - 1)
    print(f"\ntransfer test ({noise}): KS p={ks.pvalue:.3f}, FPR {fp / f:.4f} (99% band {lo / f:.4f}-{hi / f:.4f});"
          f" naive one-sample FPR {(naive <= ALPHA).mean():.4f}")
    assert ks.pvalue > 0.01
    assert lo <= fp <= hi
    assert (naive <= ALPHA).sum() > hi


def test_transfer_test_conservative_when_both_means_vanish():
    """Both task means 0: the U-statistic is degenerate and the variance estimate counts
    the interaction twice, so the test is conservative (documented), never liberal."""
    rng = np.random.default_rng(9)
    test, _, _ = transfer_p(rng, 3000, 24, 20, 16, None, None)
    fpr = (test["p"] <= ALPHA).mean()
    print(f"\ntransfer test, both means 0: FPR {fpr:.4f}")
    assert fpr <= ALPHA


def test_transfer_test_power_and_bh():
    rng = np.random.default_rng(10)
    f, planted, n_a, n_b, p = 400, 40, 24, 20, 16
    mu_a, mu_b = _orthogonal_means(rng, f, p, 0.6)
    mu_b[:planted] -= 0.25 * mu_a[:planted] / (mu_a[:planted] ** 2).sum(-1, keepdims=True) * p  # conflict
    test, align, is_a = transfer_p(rng, f, n_a, n_b, p, mu_a, mu_b)
    q = st.bh_qvalues(test["p"])
    hit = q <= ALPHA
    labels = st.direction(align[:, is_a][:, :, ~is_a].mean((-2, -1)), hit)
    fdp = hit[planted:].sum() / max(hit.sum(), 1)
    power = hit[:planted].mean()
    print(f"\ntransfer BH: power {power:.3f}, FDP {fdp:.3f}, planted conflicts labelled -1: {(labels[:planted] == -1).mean():.3f}")
    assert power >= 0.8 and fdp <= 0.15
    assert (labels[:planted][hit[:planted]] == -1).all()


def test_transfer_ci_coverage():
    """Two-way percentile bootstrap of transfer (and cosine) covers the known values."""
    reps, n_a, n_b, p = 300, 30, 25, 6
    metric = np.array([[1.0, 2.0, 0.5, 1.0, 4.0, 1.0]])
    mu_a = np.array([1.0, 0.5, -0.5, 0.2, 0.8, 0.0])
    mu_b = np.array([0.3, 1.0, 0.4, -0.6, -0.5, 0.7])
    w = 1.0 / metric[0]
    true_t = (mu_a * w * mu_b).sum()
    true_cos = true_t / np.sqrt((mu_a * w * mu_a).sum() * (mu_b * w * mu_b).sum())
    cov_t = cov_c = 0
    for r in range(reps):
        rng = np.random.default_rng([11, r])
        g, _ = gradients(rng, 1, n_a, n_b, p, mu_a, mu_b)
        _, align = pooled_scores(g, metric, np.float64)
        _, eff = effects(align, align, np.arange(n_a + n_b) < n_a, n_boot=1000, seed=r)
        lo, hi = st.bootstrap_interval(eff["transfer"][0, 1:], 0.95)
        cov_t += lo <= true_t <= hi
        lo, hi = st.bootstrap_interval(eff["cosine"][0, 1:], 0.95)
        cov_c += lo <= true_cos <= hi
    print(f"\ntransfer {true_t:.3f}: 95% CI coverage {cov_t / reps:.3f}; cosine {true_cos:.3f}: {cov_c / reps:.3f}")
    assert 0.90 <= cov_t / reps <= 0.99
    assert 0.88 <= cov_c / reps <= 0.99


# ---------------------------------------------------------------- layer → head


def test_group_pvalues_against_loop_reference():
    rng = np.random.default_rng(12)
    k, f = 99, 7
    t_obs, t_null = rng.normal(size=f), rng.normal(size=(k, f))
    t_obs[2] += 3
    t_null[:, 5] = t_obs[5] = 1.0  # no spread: p = 1 for every value, contributes log 1 = 0
    groups = np.array([0, 0, 0, 1, 1, 2, 2])
    for alt, comb in itertools.product(("greater", "less", "two-sided"), st.GROUP_COMBINE):
        got = st.group_pvalues(t_obs, t_null, groups, alt, comb)
        allv = np.vstack([t_obs, t_null])  # [K+1, F]
        m = allv.mean(0)
        x = {"greater": allv, "less": -allv, "two-sided": np.abs(allv - m)}[alt]
        pt = np.array([[np.mean(x[:, s] >= x[i, s] - 1e-9) for s in range(f)] for i in range(k + 1)])
        pt[:, 5] = 1.0
        np.testing.assert_allclose(pt[0], st.p_values(t_obs, t_null, alt))
        for g in range(3):
            lp = -np.log(pt[:, groups == g])
            c = lp.sum(1) if comb == "fisher" else lp.max(1)
            assert got[g] == pytest.approx(np.mean(c >= c[0] - 1e-9)), (alt, comb, g)
    # a NaN slice is left out; a group of only NaN slices is NaN
    t_obs2 = t_obs.copy()
    t_obs2[[3, 4]] = np.nan
    got = st.group_pvalues(t_obs2, t_null, groups)
    assert np.isnan(got[1]) and got[0] == st.group_pvalues(t_obs, t_null, groups)[0]
    with pytest.raises(ValueError, match="combine"):
        st.group_pvalues(t_obs, t_null, groups, combine="stouffer")


def _family(rng, n_groups, heads, n, k, seed, planted: dict[int, int], factor=2.2):
    """A family of interference-like slices (n_groups × heads), planted[g] = number of
    heads of group g with a real A/B difference. Returns (t_obs, t_null, groups, truth)."""
    f = n_groups * heads
    u = np.abs(rng.normal(size=(f, 2 * n, 5))) * 10.0 ** rng.uniform(-2, 2, size=(f, 1, 1))
    v = np.abs(rng.normal(size=(f, 2 * n, 5)))
    truth = np.zeros(f, bool)
    for g, m in planted.items():
        truth[g * heads : g * heads + m] = True
    u[truth, :n] *= factor
    S = u @ v.transpose(0, 2, 1)
    ind_a, ind_b = st.permutation_indicators(n, n, k, seed)
    t_null = st.null_statistics(S, ind_a, ind_b).T
    return st.observed_statistic(S, np.arange(2 * n) < n), t_null, np.repeat(np.arange(n_groups), heads), truth


@pytest.mark.parametrize("combine", st.GROUP_COMBINE)
def test_group_pvalues_null_calibration(combine):
    rng = np.random.default_rng([13, combine == "fisher"])
    p = np.concatenate([
        st.group_pvalues(*_family(rng, 60, 6, 10, 199, seed, {})[:3], "two-sided", combine) for seed in range(10)
    ])
    ks = scipy.stats.kstest(p, "uniform")
    lo, hi = scipy.stats.binom.interval(0.99, p.size, ALPHA)
    fp = int((p <= ALPHA).sum())
    print(f"\nlayer test ({combine}) under the null: KS p={ks.pvalue:.3f}, FPR {fp / p.size:.4f} (99% band {lo / p.size:.3f}-{hi / p.size:.3f})")
    assert ks.pvalue > 0.001  # permutation p-values are discrete (steps of 1/200)
    assert fp <= hi
    if combine == "fisher":  # Tippett's max −log p ties often at K = 199 and ties count: conservative
        assert lo <= fp


def test_hierarchical_fdr_by_hand():
    p_group = np.array([0.001, 0.02, 0.5, np.nan])
    p_member = np.array([0.001, 0.04, 0.9, 0.01, 0.03, 0.001, 0.2])
    member_group = np.array([0, 0, 0, 1, 1, 2, 3])
    out = st.hierarchical_fdr(p_group, p_member, member_group, 0.05)
    # BH over the 3 finite groups: q = [0.003, 0.03, 0.5]; R = 2 selected of G = 3
    np.testing.assert_allclose(out["group_q"][:3], [0.003, 0.03, 0.5])
    assert out["group_selected"].tolist() == [True, True, False, False]
    within0 = np.array([0.003, 0.06, 0.9])  # BH inside group 0
    within1 = np.array([0.02, 0.03])
    np.testing.assert_allclose(out["member_q"][:3], np.minimum(within0 * 3 / 2, 1))
    np.testing.assert_allclose(out["member_q"][3:5], within1 * 3 / 2)
    assert out["member_q"][5] == 1.0 and out["member_q"][6] == 1.0  # unselected groups
    assert out["member_significant"].tolist() == [True, False, False, True, True, False, False]
    none = st.hierarchical_fdr(np.array([0.5, 0.9]), p_member[:2], np.array([0, 1]), 0.05)
    assert not none["member_significant"].any()


def test_hierarchical_fdr_calibration_and_power():
    """Layer → head testing on permutation p-values of planted effects: FDR over layers,
    average within-layer FDR over selected layers, and overall head FDR all ≤ α; power
    compared with flat BH over every head."""
    reps, n_groups, heads = 40, 20, 6
    planted = {0: 3, 1: 1, 2: 6, 3: 2, 4: 1, 5: 4}
    rows = []
    for r in range(reps):
        rng = np.random.default_rng([14, r])
        t_obs, t_null, groups, truth = _family(rng, n_groups, heads, 10, 999, r, planted, factor=3.0)
        p_head = st.p_values(t_obs, t_null, "two-sided")
        p_layer = st.group_pvalues(t_obs, t_null, groups, "two-sided", "fisher")
        out = st.hierarchical_fdr(p_layer, p_head, groups, ALPHA)
        layer_true = np.array([truth[groups == g].any() for g in range(n_groups)])
        sel, hit = out["group_selected"], out["member_significant"]
        within = [(hit[groups == g] & ~truth[groups == g]).sum() / max(hit[groups == g].sum(), 1) for g in np.flatnonzero(sel)]
        flat = st.bh_qvalues(p_head) <= ALPHA
        rows.append((
            (sel & ~layer_true).sum() / max(sel.sum(), 1),
            np.mean(within) if within else 0.0,
            (hit & ~truth).sum() / max(hit.sum(), 1),
            hit[truth].mean(), sel[layer_true].mean(), flat[truth].mean(), (flat & ~truth).sum() / max(flat.sum(), 1),
        ))
    m = np.array(rows).mean(0)
    se = np.array(rows).std(0) / np.sqrt(reps)
    print(f"\nhierarchical FDR ({reps} reps, {n_groups} layers x {heads} heads, {sum(planted.values())} planted heads):"
          f" layer FDR {m[0]:.4f}, avg within-layer FDR {m[1]:.4f}, head FDR {m[2]:.4f};"
          f" head power {m[3]:.3f}, layer power {m[4]:.3f}; flat BH power {m[5]:.3f}, FDR {m[6]:.4f}")
    assert m[0] <= ALPHA + 3 * se[0]
    assert m[1] <= ALPHA + 3 * se[1]
    assert m[2] <= ALPHA + 3 * se[2]
    assert m[4] >= 0.6 and m[3] >= 0.6  # measured at 300 reps: 0.73, 0.71 (flat BH 0.78)


# ---------------------------------------------------------------- in the stats stage

N_A, N_B, LAYERS, HEADS, KV = 6, 5, 2, 4, 2
STAGE_SETTINGS = dict(n_permutations=199, n_bootstrap=200, seed=3, alternative="two-sided")


def synthetic_run_scores(seed: int = 0):
    """A scores dataset built from per-sample gradients with the exact formulas: slices of
    4 blocks × LAYERS × HEADS (K/V equal within a KV group, as the score stage writes
    them), the pooled matrices chunked along both sample axes. Returns (ds, g, fisher)."""
    import xarray as xr

    from qkov.pipeline import schema as S

    rng = np.random.default_rng(seed)
    kv_head = np.arange(HEADS) // (HEADS // KV)
    shape = (4, LAYERS, HEADS)
    f = int(np.prod(shape))
    mu_a, mu_b = rng.normal(size=(f, 1, 10)), rng.normal(size=(f, 1, 10))
    mu_a[:3] *= 3.0
    mu_b[:3] = -mu_a[:3]  # strong conflict in the first three Q slices
    g, fisher = gradients(rng, f, N_A, N_B, 10, 0.7 * mu_a, 0.7 * mu_b)
    g, fisher = g.reshape(*shape, N_A + N_B, 10), fisher.reshape(*shape, 10)
    for b in (1, 2):  # K, V: one gradient per KV group
        g[b], fisher[b] = g[b][:, kv_head], fisher[b][:, kv_head]
    inter, align = pooled_scores(g.reshape(f, N_A + N_B, 10), fisher.reshape(f, 10))
    ids = [f"a{i}" for i in range(N_A)] + [f"b{i}" for i in range(N_B)]
    p5 = (S.BLOCK, S.LAYER, S.HEAD, S.SAMPLE_I, S.SAMPLE_J)
    ds = xr.Dataset(
        {S.pooled_name("interference"): (p5, inter.reshape(*shape, 11, 11)),
         S.pooled_name("alignment"): (p5, align.reshape(*shape, 11, 11))},
        coords={S.BLOCK: list(S.BLOCKS), S.LAYER: np.arange(LAYERS), S.HEAD: np.arange(HEADS),
                S.KV_HEAD: (S.HEAD, kv_head), S.SAMPLE_I: ids, S.SAMPLE_J: ids,
                S.IS_A: (S.SAMPLE_I, np.arange(11) < N_A)},
        attrs={S.ATTR_N_A: N_A, S.ATTR_N_B: N_B},
    ).chunk({S.BLOCK: 1, S.LAYER: 1, S.HEAD: 2, S.SAMPLE_I: 4, S.SAMPLE_J: 5})
    return ds, g, fisher


def test_stage_effects_match_gradients_and_pure_math():
    from qkov.pipeline.spec import StatsSpec
    from qkov.pipeline.stats_stage import compute_stats

    ds, g, fisher = synthetic_run_scores()
    settings = StatsSpec(**STAGE_SETTINGS)
    out = compute_stats(ds, settings)
    is_a = np.arange(11) < N_A
    # every new variable says which question it answers, in which unit, which way
    new = ["effect", "direction", "q_value_hier", "significant_hier", "layer_p_value", "layer_q_value",
           "layer_significant", "sharing_ab", "sharing_ba", "transfer", "transfer_p_value", "transfer_q_value",
           "transfer_direction", "cosine", "cosine_norm_z", "sharing"] + [
               f"{v}_ci_{e}" for v in ("effect", "sharing", "sharing_ab", "sharing_ba", "transfer", "cosine") for e in ("low", "high")]
    for v in new:
        assert {"question", "units", "direction"} <= set(out[v].attrs), v
    assert out["layer_p_value"].dims == ("score", "block", "layer")
    assert out["sharing_ab"].dims == ("block", "layer", "head") and out["sharing_ab"].attrs["score"] == "interference"
    assert out["transfer_direction"].attrs["flag_meanings"] == "conflict not_significant synergy"

    ref = reference_effects(g.reshape(-1, 11, 10), fisher.reshape(-1, 10), N_A)
    ref = {k: v.reshape(4, LAYERS, HEADS) for k, v in ref.items()}
    # the cosine where both task-mean norms clear the stated rule, NaN (no direction) elsewhere
    clear = out["cosine_norm_z"].values >= out["cosine"].attrs["cosine_min_z"]
    assert out["cosine"].attrs["cosine_min_z"] == st.COSINE_MIN_Z and "standard errors" in out["cosine"].attrs["cosine_rule"]
    assert 0 < clear.sum() < clear.size  # both cases occur in this run
    ref["cosine"] = np.where(clear, np.clip(ref["cosine"], -1, 1), np.nan)
    ref["sharing"] = np.sqrt(ref["sharing_ab"] * ref["sharing_ba"])
    for k in ("sharing", "sharing_ab", "sharing_ba", "transfer", "cosine"):
        np.testing.assert_allclose(out[k].values, ref[k], rtol=5e-5, atol=1e-6, err_msg=k)
    assert np.isnan(out["cosine_ci_low"].values[~clear]).all()
    np.testing.assert_allclose(out["transfer"].values, out["mean"].sel(score="alignment").values, rtol=1e-9)
    assert (out["transfer_direction"].values.reshape(-1)[:3] == -1).all()  # the planted conflicts

    fam = out["in_family"].values
    ind_a, ind_b = st.permutation_indicators(N_A, N_B, 199, 3)
    for score in ("interference", "alignment"):
        S = ds[f"pooled_{score}"].values.astype(np.float64)
        o = out.sel(score=score)
        # chunked Dask sums = the pure functions on the whole matrices
        summ = st.effect_summary(score, pair_sums(S, *st.effect_weights(is_a, 200, 3), is_a),
                                 ab_margins(S, is_a), is_a, 200, 3, 0.95)
        for k, v in summ.items():
            got = o[k].values if k.startswith("effect") else out[k].values
            np.testing.assert_allclose(got, v, rtol=1e-9, atol=1e-12, err_msg=(score, k))
        offdiag = (S.sum((-2, -1)) - np.trace(S, axis1=-2, axis2=-1)) / (11 * 10)
        np.testing.assert_allclose(o["effect"].values, S[..., :N_A, N_A:].mean((-2, -1)) - offdiag, rtol=1e-9)
        np.testing.assert_array_equal(o["direction"].values, st.direction(o["effect"].values, o["significant"].values))
        # layer tests from the same permutations as the head p-values
        t_obs = st.observed_statistic(S, is_a)
        t_null = np.moveaxis(st.null_statistics(S, ind_a, ind_b), -1, 0)
        fam3 = np.broadcast_to(fam[:, None, :], (4, LAYERS, HEADS))
        bl = np.nonzero(fam3)
        groups = np.unique(bl[0] * LAYERS + bl[1], return_inverse=True)[1]
        lt = st.layer_head_tests(t_obs[fam3], t_null[:, fam3], groups, o["p_value"].values[fam3], "two-sided", 0.05)
        np.testing.assert_allclose(o["layer_p_value"].values.reshape(-1), lt["layer_p_value"])
        np.testing.assert_allclose(o["q_value_hier"].values[fam3], lt["q_value_hier"])
    # duplicated K/V query heads repeat their KV head
    for v in ("sharing_ab", "cosine", "transfer_direction"):
        kv = out[v].sel(block=["K", "V"]).values
        np.testing.assert_array_equal(kv[..., 1], kv[..., 0])


def test_effects_of_a_real_run_against_stored_gradients(tmp_path):
    """A tiny model run end to end; the stats group's effects against a float64
    reference from the stored per-sample gradients, Fisher and damping; `qkov stats`
    (qkov.run_stats) reruns compute them too."""
    import qkov
    from qkov.pipeline.store import RunStore
    from qkov.testing import tiny_job

    job = tiny_job(tmp_path, "llama_gqa", n_a=7, n_b=6, stats={"n_permutations": 99, "n_bootstrap": 100})
    qkov.run(job, inline=True)
    store = RunStore.of(job)
    grads, fish, out = store.open_gradients().load(), store.open_fisher().load(), store.open_stats()
    is_a = grads["task"].values == grads["task"].values[0]
    order = np.concatenate([np.flatnonzero(is_a), np.flatnonzero(~is_a)])
    kv = out["kv_head"].values
    checked = 0
    for blk in ("Q", "K", "V", "O"):
        hdim = "kv_head" if blk in "KV" else "head"
        for layer in out["layer"].values:
            for h in range(out.sizes["head"]):
                hh = kv[h] if blk in "KV" else h
                g = grads[blk].sel(layer=layer).isel({hdim: hh}).values.astype(np.float64)[order]
                reg = fish[blk].sel(layer=layer).isel({hdim: hh}).values.astype(np.float64) + float(fish["damping"].sel(block=blk, layer=layer))
                ref = reference_effects(g[None], reg[None], int(is_a.sum()))
                ref["sharing"] = np.sqrt(ref["sharing_ab"] * ref["sharing_ba"])
                clear = float(out["cosine_norm_z"].sel(block=blk, layer=layer, head=h)) >= st.COSINE_MIN_Z
                for k in ("sharing", "sharing_ab", "sharing_ba", "transfer", "cosine"):
                    got = float(out[k].sel(block=blk, layer=layer, head=h))
                    want = float(np.clip(ref[k][0], -1, 1)) if k == "cosine" else float(ref[k][0])
                    if k == "cosine" and not clear:  # no direction: a task-mean norm within min_z SEs of 0
                        want = np.nan
                    if np.isnan(want):  # only a cosine can be undefined
                        assert k == "cosine" and np.isnan(got), (k, blk, layer, h)
                        continue
                    scale = abs(want) if k != "transfer" else max(abs(want), 1e-3 * float(np.abs(g).max() ** 2 / reg.min()))
                    assert abs(got - want) <= 1e-4 * scale + 1e-7, (k, blk, layer, h, got, want)
                    checked += 1
    print(f"\n{checked} effect values checked against the stored gradients")
    assert checked >= 4 * 4 * 2 * 4  # sharing (both ways and their mean) and transfer of every slice, plus the defined cosines
    again = qkov.run_stats(job.output.path, n_permutations=49, name="rerun")
    for v in ("sharing_ab", "transfer", "cosine", "layer_p_value", "q_value_hier"):
        assert v in again and v in store.open_stats("rerun")
    np.testing.assert_allclose(again["transfer"].values, out["transfer"].values, rtol=1e-12, equal_nan=True)
