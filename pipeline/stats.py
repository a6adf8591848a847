"""Permutation statistics for per-slice cross-task scores (pure numpy, float64).

For one slice s with pooled score matrix S (N × N, rows/columns = samples A then B),
the statistic is the cross-group mean T = mean_{i∈A, j∈B} S[i, j]. T is bilinear in
the group indicators: T = a^T S b / (n_a n_b). So every relabelling π of the pooled
samples, and every bootstrap reweighting, is a row of a weight matrix, and all of them
come out of one matmul: T_k = rowsum((L @ S) * R)_k. No rescoring, no K × N × N cube.

Conventions (DESIGN §3):
* p = (1 + #{T^π ≥ T_obs}) / (1 + K) for `greater`; `less` counts T^π ≤ T_obs;
  `two-sided` counts |T^π − m| ≥ |T_obs − m| with m the mean of the K + 1 values
  {T_obs, T^π} (the null is not symmetric in general, so centring at m, not 0, is the
  fair choice; including T_obs makes m a symmetric function of the permutation set,
  which keeps the test exact).
* Max-T standardises each slice by the mean and sd of its K + 1 values, for the same
  reason: centring/scaling by the K null values alone makes T_obs look more extreme
  than its exchangeable peers (measured: FWER 0.067 instead of 0.05 on skewed scores).
* Comparisons allow a tie tolerance of 1e-12 × the slice's null scale: values equal up to
  float rounding count as exceedances (conservative; makes p independent of BLAS order).
* A slice whose null has no spread (e.g. all-zero scores of an ablated head) carries no
  evidence: p = 1 and p_fwer = 1, and it never enters the max-T maximum. A slice with
  any non-finite statistic gets NaN p-values, which BH leaves out of the family.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from qkov.workers.reductions import cross_sums  # the sums' numpy and torch twins live side by side there

from .schema import COSINE_MIN_Z, COSINE_RULE  # stored as attrs with the cosine; the rule is applied here

Alternative = Literal["greater", "less", "two-sided"]
ALTERNATIVES: tuple[str, ...] = ("greater", "less", "two-sided")

_TIE_RTOL = 1e-12  # relative to the slice's null scale
_Z_TOL = 1e-9  # ties in standardised units
# independent random streams derived from one user seed
_PERM_STREAM = 0x5045524D
_BOOT_STREAM = 0x424F4F54


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, int(seed) % 2**63])


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


# ---------------------------------------------------------------- weight matrices


def permutation_indicators(n_a: int, n_b: int, n_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """K = n_perm random relabellings of the pooled positions 0..N-1 (group sizes kept).

    Returns float64 indicators (ind_a, ind_b), each [K, N]; ind_b = 1 − ind_a. The same
    seed gives the same sequence everywhere, so all slices share it (dependence kept).
    """
    if n_a < 1 or n_b < 1 or n_perm < 1:
        raise ValueError(f"need n_a, n_b, n_perm >= 1, got {n_a}, {n_b}, {n_perm}")
    n = n_a + n_b
    perms = _rng(seed, _PERM_STREAM).random((n_perm, n)).argsort(axis=1)  # uniform permutations
    ind_a = np.zeros((n_perm, n))
    np.put_along_axis(ind_a, perms[:, :n_a], 1.0, axis=1)
    return ind_a, 1.0 - ind_a


def bootstrap_weights(n_a: int, n_b: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-way bootstrap as multinomial counts: (w_a [B, n_a], w_b [B, n_b]), float64.

    Row r resamples A with replacement (w_a[r] sums to n_a) and, independently, B.
    """
    if n_a < 1 or n_b < 1 or n_boot < 1:
        raise ValueError(f"need n_a, n_b, n_boot >= 1, got {n_a}, {n_b}, {n_boot}")
    rng = _rng(seed, _BOOT_STREAM)
    w_a = rng.multinomial(n_a, np.full(n_a, 1.0 / n_a), size=n_boot).astype(np.float64)
    w_b = rng.multinomial(n_b, np.full(n_b, 1.0 / n_b), size=n_boot).astype(np.float64)
    return w_a, w_b


# ---------------------------------------------------------------- bilinear statistics


def null_statistics(S: np.ndarray, ind_a: np.ndarray, ind_b: np.ndarray) -> np.ndarray:
    """T^π for every permutation: S [..., N, N], indicators [K, N] -> [..., K]."""
    n_a = ind_a[0].sum()
    n_b = ind_b[0].sum()
    return cross_sums(S, ind_a, ind_b) / (n_a * n_b)


def observed_statistic(S: np.ndarray, is_a: np.ndarray) -> np.ndarray:
    """T = mean of S[A, B] for pooled S [..., N, N] and the A mask [N] -> [...]."""
    is_a = np.asarray(is_a, dtype=bool)
    block = np.asarray(S, dtype=np.float64)[..., is_a, :][..., :, ~is_a]
    return block.mean(axis=(-2, -1))


# ---------------------------------------------------------------- tests and corrections


def _null_moments(t_obs: np.ndarray, t_null: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per slice over the K + 1 values {T_obs, T^π}: mean, sd, tie tolerance, whether
    they have no spread, and whether they are all finite."""
    both = np.vstack([t_obs[None], t_null])
    finite = np.isfinite(both).all(axis=0)
    both = np.where(finite, both, 0.0)
    mean = both.mean(axis=0)
    sd = both.std(axis=0)
    tol = _TIE_RTOL * np.abs(both).max(axis=0)
    degenerate = ~(sd > tol)
    return mean, sd, tol, degenerate, finite


def p_values(t_obs: np.ndarray, t_null: np.ndarray, alternative: Alternative = "two-sided") -> np.ndarray:
    """Permutation p-values: t_obs [F], t_null [K, F] -> [F] (see module doc)."""
    _check_alternative(alternative)
    t_obs = np.asarray(t_obs, dtype=np.float64)
    t_null = np.asarray(t_null, dtype=np.float64)
    k = t_null.shape[0]
    mean, _, tol, degenerate, finite = _null_moments(t_obs, t_null)
    if alternative == "greater":
        hits = t_null >= t_obs - tol
    elif alternative == "less":
        hits = t_null <= t_obs + tol
    else:
        hits = np.abs(t_null - mean) >= np.abs(t_obs - mean) - tol
    p = (1.0 + hits.sum(axis=0)) / (1.0 + k)
    p = np.where(degenerate, 1.0, p)
    return np.where(finite, p, np.nan)  # comparisons with NaN would fake evidence


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values over the whole array (the family), monotone, ≤ 1.

    q_(i) = min_{j ≥ i} p_(j) · m / j over the sorted p-values. NaN entries are left
    out of the family and stay NaN.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    vals = p[ok]
    m = vals.size
    if m == 0:
        return q
    order = np.argsort(vals, kind="stable")
    scaled = vals[order] * (m / np.arange(1.0, m + 1))
    monotone = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(monotone, 1.0)
    q[ok] = out
    return q


def _oriented(z: np.ndarray, alternative: str) -> np.ndarray:
    if alternative == "greater":
        return z
    if alternative == "less":
        return -z
    return np.abs(z)


def maxt_pvalues(t_obs: np.ndarray, t_null: np.ndarray, alternative: Alternative = "two-sided") -> np.ndarray:
    """Westfall–Young single-step max-T FWER-adjusted p-values over the family.

    Each slice is standardised by the mean/sd of its K + 1 values (z = (T − m)/sd) so
    slices on different scales compete fairly; p_fwer_s = (1 + #{π: max_s z^π_s ≥ z_obs_s})/(1 + K).
    Slices whose null has no spread get p_fwer = 1 and are left out of the maximum.
    The result is never below the raw p-value of the same slice.
    """
    _check_alternative(alternative)
    t_obs = np.asarray(t_obs, dtype=np.float64)
    t_null = np.asarray(t_null, dtype=np.float64)
    k = t_null.shape[0]
    mean, sd, _, degenerate, finite = _null_moments(t_obs, t_null)
    safe_sd = np.where(degenerate, 1.0, sd)
    z_null = _oriented((t_null - mean) / safe_sd, alternative)
    z_obs = _oriented((t_obs - mean) / safe_sd, alternative)
    z_null[:, degenerate | ~finite] = -np.inf
    max_null = z_null.max(axis=1) if t_null.shape[1] else np.full(k, -np.inf)  # [K]
    # count max_null >= z_obs - tol for every slice via one sort
    thresholds = z_obs - _Z_TOL
    counts = k - np.searchsorted(np.sort(max_null), thresholds, side="left")
    p_fwer = (1.0 + counts) / (1.0 + k)
    p_fwer = np.maximum(p_fwer, p_values(t_obs, t_null, alternative))
    return np.where(finite, np.where(degenerate, 1.0, p_fwer), np.nan)


# ---------------------------------------------------------------- bootstrap


def percentile_interval(t_boot: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap replicates t_boot [B, ...] at `level`."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(np.asarray(t_boot, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def bootstrap_replicates(M_ab: np.ndarray, w_a: np.ndarray, w_b: np.ndarray) -> np.ndarray:
    """T* = w_a^T M w_b / (n_a n_b) per replicate: M_ab [..., n_a, n_b] -> [..., B]."""
    n_a, n_b = M_ab.shape[-2:]
    return cross_sums(M_ab, w_a, w_b) / (n_a * n_b)


def bootstrap_ci(M_ab: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-way bootstrap percentile CI of mean(M_ab); M_ab [..., n_a, n_b] -> (low, high) [...].

    A-samples and B-samples are resampled independently; the same resamples are used
    for every slice in the leading dims.
    """
    n_a, n_b = M_ab.shape[-2:]
    w_a, w_b = bootstrap_weights(n_a, n_b, n_boot, seed)
    t_boot = np.moveaxis(bootstrap_replicates(M_ab, w_a, w_b), -1, 0)
    return percentile_interval(t_boot, level)


# ---------------------------------------------------------------- effect sizes
#
# The labels null answers "do the tasks differ in this slice?". The effect sizes answer
# "how much do they share / conflict?", from four blocks of the same pooled matrix S
# (rows = the g²/Î side of interference, A then B), per weight row r (row 0 = every
# sample once, rows 1.. = two-way bootstrap resamples as multinomial counts):
#   ab = Σ_{i∈A, j∈B} wa_i wb_j S_ij          ba = Σ_{j∈B, i∈A} wb_j wa_i S_ji
#   aa = Σ_{i≠i' ∈ A} wa_i wa_i' S_ii'          bb = Σ_{j≠j' ∈ B} wb_j wb_j' S_jj'
# Within-task sums leave the diagonal out (S_ii is a sample with itself: for alignment
# ‖g_i‖², which would bias the norm of the task mean upwards by the noise). Under
# resampling a sample drawn twice forms no pair with itself either, so the bootstrap
# normaliser is (Σw)² − Σw², not n(n−1). All four are bilinear in the weights, so
# chunked matrices contribute additive partial sums.

PAIR_PARTS: tuple[str, ...] = ("ab", "ba", "aa", "bb")
DIRECTION_MEANINGS = {-1: "below chance", 0: "not significant", 1: "above chance"}
TRANSFER_MEANINGS = {-1: "conflict", 0: "not significant", 1: "synergy"}
GROUP_COMBINE: tuple[str, ...] = ("fisher", "tippett")


def effect_weights(is_a: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight rows over the pooled positions for the effect sums: (wa, wb), each [1+B, N].

    Row 0 is every sample once; rows 1..B (n_boot ≥ 0) are the bootstrap resamples of
    `bootstrap_weights(n_a, n_b, n_boot, seed)` (the same ones as the CI of `mean`, so
    all bootstrap quantities of a run are joint). wa is zero at B positions, wb at A.
    """
    is_a = np.asarray(is_a, dtype=bool)
    n_a, n_b = int(is_a.sum()), int((~is_a).sum())
    if n_boot > 0:
        w_a, w_b = bootstrap_weights(n_a, n_b, n_boot, seed)
    else:  # the point estimates only
        w_a, w_b = np.zeros((0, n_a)), np.zeros((0, n_b))
    wa = np.zeros((1 + n_boot, is_a.size))
    wb = np.zeros((1 + n_boot, is_a.size))
    wa[0, is_a], wb[0, ~is_a] = 1.0, 1.0
    wa[1:, is_a], wb[1:, ~is_a] = w_a, w_b
    return wa, wb


def pair_means(sums: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> dict[str, np.ndarray]:
    """Means from `pair_sums` [..., R, 4]: ab, ba (cross-task), aa, bb (within-task, no
    diagonal), and pooled = the mean over all ordered pairs of distinct pooled samples,
    which is exactly the mean of T over all label permutations (E_π[T^π]; for i ≠ j,
    P(i ∈ A^π, j ∈ B^π) = n_a n_b / (N(N−1))). Each [..., R]; NaN where a resample has
    no within-task pair (one sample drawn n times)."""
    sa, sb = wa.sum(1), wb.sum(1)
    qa, qb = (wa**2).sum(1), (wb**2).sum(1)
    norms = np.stack([sa * sb, sa * sb, sa**2 - qa, sb**2 - qb], axis=-1)  # [R, 4]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(norms > 0, sums / np.where(norms > 0, norms, 1.0), np.nan)
        pooled_n = (sa + sb) ** 2 - qa - qb
        pooled = np.where(pooled_n > 0, sums.sum(-1) / np.where(pooled_n > 0, pooled_n, 1.0), np.nan)
    out = {p: means[..., i] for i, p in enumerate(PAIR_PARTS)}
    out["pooled"] = pooled
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def interference_effects(means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sharing from the block means of the interference M_ij = <u_i, v_j>, u = g²/(Î+λ), v = |g|.

    sharing_ab = mean M over A×B / mean M over pairs i ≠ i' in A = <ū_A, v̄_B> / <ū_A, v̄_A>:
    how heavily task B's gradients land on the weights task A's loss depends on (B onto A),
    relative to A's own other samples. It is direction-specific and carries B's gradient
    size: scaling B's gradients by c scales it by c. sharing_ba: the same, A onto B (× 1/c:
    u_B = g_B²/(Î+λ) grows by c², its own-sample mass ⟨ū_B, v̄_B⟩ by c³).
    sharing = √(sharing_ab · sharing_ba): the sizes cancel (c · 1/c), so it answers
    "do the tasks load the same weights?" alone: 0 = disjoint weights, 1 = the two tasks'
    gradients are spread over the weights alike (identically distributed tasks). Computed
    per weight row (observed and each bootstrap resample) from the same sums, so its CI is
    that of the geometric mean itself. effect = mean over A×B − the exact permutation-null
    mean. NaN where a within-task mean is not positive (e.g. an ablated head).
    """
    ab, ba = _ratio(means["ab"], means["aa"]), _ratio(means["ba"], means["bb"])
    with np.errstate(invalid="ignore"):
        both = ab * ba
        sharing = np.where(both >= 0, np.sqrt(np.abs(both)), np.nan)  # M ≥ 0: a negative product is damage
    return {
        "sharing_ab": ab,
        "sharing_ba": ba,
        "sharing": sharing,
        "effect": means["ab"] - means["pooled"],
    }




def norm_z(within: np.ndarray) -> np.ndarray:
    """z of a within-task mean (a squared task-mean norm) against 0: within [..., R], row 0
    the estimate, rows 1.. its bootstrap replicates -> [...] = estimate / sd(replicates).
    NaN with fewer than 2 defined replicates; ±inf where the replicates have no spread
    (every resample gives the same nonzero estimate)."""
    obs, reps = within[..., 0], within[..., 1:]
    ok = np.isfinite(reps)
    n = ok.sum(-1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        sd = np.nanstd(np.where(ok, reps, np.nan), axis=-1, ddof=1)
        z = np.where(sd > 0, obs / np.where(sd > 0, sd, 1.0), np.where(obs > 0, np.inf, np.where(obs < 0, -np.inf, np.nan)))
    return np.where(n >= 2, z, np.nan)


def alignment_effects(means: dict[str, np.ndarray], min_z: float | None = COSINE_MIN_Z) -> dict[str, np.ndarray]:
    """transfer = mean A_ij over A×B = ⟨ḡ_A, ḡ_B⟩ in the (Î+λ)⁻¹ metric (negative =
    conflict); cosine = transfer / √(‖μ_A‖² ‖μ_B‖²) with the squared norms of the task
    means estimated without bias (within-task means over i ≠ i'), NaN (no direction)
    by `COSINE_RULE`: unless both norm estimates are ≥ `min_z` bootstrap standard errors
    above 0 (`norm_z` over rows 1.., the resamples; so means [..., R] need R ≥ 3), for the
    observed row and every resample of the slice. min_z=None: point estimates without
    resamples, where only a non-positive norm estimate gives NaN. Where defined the ratio
    is clipped to [−1, 1]. cosine_norm_z = the smaller z of the two tasks (NaN with
    min_z=None). effect as for interference."""
    aa, bb = means["aa"], means["bb"]
    with np.errstate(invalid="ignore"):
        denom = np.sqrt(np.where((aa > 0) & (bb > 0), aa * bb, np.nan))
    cosine = np.clip(_ratio(means["ab"], denom), -1.0, 1.0)
    if min_z is None:
        z = np.full(aa.shape[:-1], np.nan)
    else:
        z = np.minimum(norm_z(aa), norm_z(bb))  # NaN if either is
        cosine = np.where((z >= min_z)[..., None], cosine, np.nan)  # NaN compares False: no direction
    return {
        "transfer": means["ab"],
        "cosine": cosine,
        "effect": means["ab"] - means["pooled"],
        "cosine_norm_z": z,
    }


def bootstrap_interval(t_boot: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of replicates t_boot [B, ...] that may hold NaN (ratios of a
    resample without a within-task pair, or with a non-positive norm). Undefined
    replicates are dropped; when more than a tail's share ((1 − level)/2) of them is
    undefined the interval is NaN, as they could all belong to one tail."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    t_boot = np.asarray(t_boot, dtype=np.float64)
    bad = np.isnan(t_boot).mean(axis=0) > (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        lo, hi = np.nanquantile(t_boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


def direction(effect: np.ndarray, significant: np.ndarray) -> np.ndarray:
    """+1 / −1 where significant and the effect is above / below its neutral value, else 0 (int8)."""
    effect = np.asarray(effect, dtype=np.float64)
    sign = np.where(np.isfinite(effect), np.sign(np.nan_to_num(effect)), 0.0)
    return np.where(np.asarray(significant, dtype=bool), sign, 0.0).astype(np.int8)


# ---------------------------------------------------------------- the transfer test


def transfer_test(margins: np.ndarray, is_a: np.ndarray) -> dict[str, np.ndarray]:
    """Test of E[T] = 0 for T = mean over A×B, from the A×B margins [..., N].

    T is a two-sample U-statistic of the kernel h(x_i, y_j) = S_ij. Its Hoeffding
    decomposition gives Var T = [(n_b−1)σ²_10 + (n_a−1)σ²_01 + σ²]/(n_a n_b); the
    row means r_i = mean_j S_ij and column means c_j estimate it as
    se² = var(r)/n_a + var(c)/n_b, which is unbiased up to + σ²_11/(n_a n_b) (the
    interaction variance; conservative, and negligible unless both tasks' mean gradients
    vanish in the slice). Reference: Student t with Welch–Satterthwaite df, two-sided.
    This is a sound test of a composite null (any μ_A ⊥ μ_B), which no permutation of
    labels provides, and its p-values have no 1/(B+1) floor. Returns t, df, se, p per
    slice; p = 1 where the statistic has no spread (e.g. an ablated head); NaN with
    fewer than 2 samples in a task or non-finite scores.
    """
    from scipy.special import stdtr  # Student t CDF; imported here to keep `import qkov.pipeline.stats` light

    is_a = np.asarray(is_a, dtype=bool)
    n_a, n_b = int(is_a.sum()), int((~is_a).sum())
    margins = np.asarray(margins, dtype=np.float64)
    r = margins[..., is_a] / n_b
    c = margins[..., ~is_a] / n_a
    t_obs = r.mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        v_r = r.var(-1, ddof=1) / n_a if n_a > 1 else np.full(t_obs.shape, np.nan)
        v_c = c.var(-1, ddof=1) / n_b if n_b > 1 else np.full(t_obs.shape, np.nan)
        var = v_r + v_c
        se = np.sqrt(var)
        scale = np.maximum(np.abs(r).max(-1, initial=0.0), np.abs(c).max(-1, initial=0.0))
        dead = ~(se > _TIE_RTOL * scale)
        df = var**2 / (v_r**2 / max(n_a - 1, 1) + v_c**2 / max(n_b - 1, 1))
        t = np.where(dead, 0.0, t_obs / np.where(dead, 1.0, se))
        p = np.where(dead, 1.0, 2.0 * stdtr(np.where(dead, 1.0, df), -np.abs(t)))
    bad = ~np.isfinite(var) | ~np.isfinite(t_obs)
    return {
        "t": np.where(bad, np.nan, t),
        "df": np.where(bad | dead, np.nan, df),
        "se": np.where(bad, np.nan, se),
        "p": np.where(bad, np.nan, np.minimum(p, 1.0)),
    }


# ---------------------------------------------------------------- layer → head testing


def _permutation_pvalue_table(t_obs: np.ndarray, t_null: np.ndarray, alternative: str) -> np.ndarray:
    """p-value of each of the K + 1 values {T_obs, T^π_1..K} within its slice's own
    permutation distribution: [K+1, F]. Row 0 equals `p_values`. NaN columns for
    non-finite slices, 1 for slices whose null has no spread."""
    v = np.vstack([t_obs[None], t_null])
    mean, _, tol, degenerate, finite = _null_moments(t_obs, t_null)
    x = {"greater": v, "less": -v}.get(alternative)
    if x is None:
        x = np.abs(v - mean)
    x = np.where(finite, x, 0.0)
    n = v.shape[0]
    out = np.empty(v.shape)
    for s in range(v.shape[1]):  # per slice: counts of values at least as extreme, via one sort
        srt = np.sort(x[:, s])
        out[:, s] = (n - np.searchsorted(srt, x[:, s] - tol[s], side="left")) / n
    out[:, degenerate] = 1.0
    out[:, ~finite] = np.nan
    return out


def group_pvalues(
    t_obs: np.ndarray,
    t_null: np.ndarray,
    groups: np.ndarray,
    alternative: Alternative = "two-sided",
    combine: str = "fisher",
) -> np.ndarray:
    """One permutation p-value per group of slices (e.g. the heads of one block of one
    layer) for "no slice in the group has an effect", from the same permutations.

    Nonparametric combination (Pesarin): each slice's T is turned into its permutation
    p-value, for the observed labelling and for every permutation alike; the group
    statistic C = −Σ log p (`fisher`: power against effects spread over several heads)
    or max −log p (`tippett`: one strong head) is then compared with its own K
    permuted values. A permutation relabels every slice at once, so the K + 1 values
    of C are exchangeable under the group's null and the test is exact at any
    dependence between heads. t_obs [F], t_null [K, F], groups [F] integer labels
    0..G−1 -> [G]; non-finite slices are left out, a group with none left is NaN.
    """
    _check_alternative(alternative)
    if combine not in GROUP_COMBINE:
        raise ValueError(f"combine must be one of {GROUP_COMBINE}, got {combine!r}")
    t_obs = np.asarray(t_obs, dtype=np.float64)
    t_null = np.asarray(t_null, dtype=np.float64)
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    logp = -np.log(_permutation_pvalue_table(t_obs, t_null, alternative))  # [K+1, F], ≥ 0
    k1 = logp.shape[0]
    out = np.full(n_groups, np.nan)
    for g in range(n_groups):
        cols = logp[:, (groups == g) & np.isfinite(logp[0])]
        if cols.shape[1] == 0:
            continue
        c = cols.sum(1) if combine == "fisher" else cols.max(1)
        # C takes values from sums of logs of j/(K+1): tolerance for summation order
        out[g] = np.sum(c >= c[0] - 1e-9 * max(1.0, abs(c[0]))) / k1
    return out


def hierarchical_fdr(p_group: np.ndarray, p_member: np.ndarray, member_group: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """Layer → head testing by Benjamini & Bogomolov (2014, JRSS-B 76:297), selective
    inference on families.

    1. BH at α over the G group p-values (e.g. per (block, layer)); R groups selected.
    2. In each selected group, BH at α·R/G over its members' p-values.
    This controls the FDR over groups at α and the expected average, over the selected
    groups, of the within-group false-discovery proportion at α (the correction R/G
    pays for having picked the groups by the same data). Returns group_q [G] (BH),
    group_selected [G], member_q [F] = within-group BH q × G/R clipped at 1 for members
    of selected groups and 1 elsewhere (so member_q ≤ α ⇔ rejected; R depends on α),
    member_significant [F]. NaN p-values are left out of both levels.
    """
    p_group = np.asarray(p_group, dtype=np.float64)
    p_member = np.asarray(p_member, dtype=np.float64)
    member_group = np.asarray(member_group)
    group_q = bh_qvalues(p_group)
    selected = np.nan_to_num(group_q, nan=np.inf) <= alpha
    n_groups = int(np.isfinite(p_group).sum())
    n_sel = int(selected.sum())
    member_q = np.where(np.isnan(p_member), np.nan, 1.0)
    for g in np.flatnonzero(selected):
        idx = np.flatnonzero(member_group == g)
        member_q[idx] = np.minimum(bh_qvalues(p_member[idx]) * n_groups / n_sel, 1.0)
    return {
        "group_q": group_q,
        "group_selected": selected,
        "member_q": member_q,
        "member_significant": np.nan_to_num(member_q, nan=np.inf) <= alpha,
    }


# ---------------------------------------------------------------- per-family summaries


def effect_summary(score: str, sums: np.ndarray, margins: np.ndarray, is_a: np.ndarray, n_boot: int, seed: int, level: float,
                   min_z: float = COSINE_MIN_Z) -> dict[str, np.ndarray]:
    """Point estimates and bootstrap CIs of one score's effects for F slices.

    sums [..., 1+B, 4]: `qkov.workers.reductions.pair_sums` with `effect_weights(is_a, n_boot, seed)`;
    margins [..., N]: `qkov.workers.reductions.ab_margins`. Returns, each [...]: for both scores `effect` (mean −
    exact permutation-null mean) with `_ci_low`/`_ci_high`; for interference
    `sharing`, `sharing_ab`, `sharing_ba` with CIs; for alignment `transfer`, `cosine`
    with CIs (cosine NaN by `COSINE_RULE` at `min_z`), `cosine_norm_z` and the transfer
    test's `transfer_p_value`.
    """
    if score not in ("interference", "alignment"):
        raise ValueError(f"unknown score {score!r}")
    wa, wb = effect_weights(is_a, n_boot, seed)
    means = pair_means(sums, wa, wb)
    eff = interference_effects(means) if score == "interference" else alignment_effects(means, min_z)
    out: dict[str, np.ndarray] = {}
    if "cosine_norm_z" in eff:  # one value per slice, no resamples
        out["cosine_norm_z"] = eff.pop("cosine_norm_z")
    for name, vals in eff.items():  # [..., 1+B]: row 0 observed, then the resamples
        out[name] = vals[..., 0]
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bootstrap_interval(np.moveaxis(vals[..., 1:], -1, 0), level)
    if score == "alignment":
        out["transfer_p_value"] = transfer_test(margins, is_a)["p"]
    return out


def layer_head_tests(t_obs: np.ndarray, t_null: np.ndarray, groups: np.ndarray, p_head: np.ndarray,
                     alternative: Alternative, alpha: float, combine: str = "fisher") -> dict[str, np.ndarray]:
    """Layer → head testing over one family: group p-values by `group_pvalues` from the
    same permutations as the heads' p-values, then `hierarchical_fdr`. groups [F]
    integer labels 0..G−1. Returns layer_p_value, layer_q_value, layer_significant [G]
    and q_value_hier, significant_hier [F]."""
    p_group = group_pvalues(t_obs, t_null, groups, alternative, combine)
    h = hierarchical_fdr(p_group, p_head, groups, alpha)
    return {
        "layer_p_value": p_group,
        "layer_q_value": h["group_q"],
        "layer_significant": h["group_selected"],
        "q_value_hier": h["member_q"],
        "significant_hier": h["member_significant"],
    }


# ---------------------------------------------------------------- answers mode: sums from per-sample moments


def moment_sums(mom: np.ndarray, is_a: np.ndarray, left: np.ndarray, wa: np.ndarray, wb: np.ndarray,
                labelled: bool = True) -> np.ndarray:
    """The statistics' sums of slices from their per-sample moments, without the pair matrices.

    mom [..., N, 5]: per pooled sample i (A then B) of a score matrix S, in `schema.MOMENTS`
    order: S_ii, Σ_k∈A S_ik, Σ_k∈B S_ik, Σ_k∈A S_ki, Σ_k∈B S_ki. left [1+K, N] the labellings
    (row 0 observed), wa/wb [1+B, N] `effect_weights`. Returns [..., 1+K + 4(1+B) + N] laid
    out as `qkov.workers.reductions.stat_sums_np` after `slice_reductions.sums_scale`:

    * exact: the A×B margins, and row 0 of the block sums (ab, ba, aa, bb: every point
      estimate — mean, effect, sharing, transfer, cosine — and the transfer test);
    * the K+1 labelling means: of T's first-order (Hájek) projection around the mean
      labelling, T_lin(a) = [pq S_off N/(N−1) + Σ_i (a_i − p)(q R_i − p C_i)] / (n_a n_b) with
      R, C the off-diagonal pooled row and column sums, p = n_a/N: a permutation test of T_lin
      is exact in level for T_lin; T itself differs from it by a degenerate term of order 1/N.
      labelled=False: NaN instead (the symmetric alignment's projection is (q − p) R_i, which
      vanishes for equal task sizes: no test of it is worth reporting);
    * the bootstrap rows 1..B: each block mean's first-order expansion in the resample
      weights (δ = w − 1), e.g. ab(w) ≈ ab + Σ_i∈A δ_i R^B_i + Σ_j∈B δ_j C^A_j, scaled so that
      `stats.pair_means` returns the expanded means.
    """
    mom = np.asarray(mom, dtype=np.float64)
    is_a = np.asarray(is_a, dtype=bool)
    n_a, n_b = int(is_a.sum()), int((~is_a).sum())
    n = n_a + n_b
    d, ra, rb, ca, cb = (mom[..., k] for k in range(5))
    lead = mom.shape[:-2]
    # labellings: the Hájek projection of the A×B mean
    p, q = n_a / n, n_b / n
    r_off, c_off = ra + rb - d, ca + cb - d
    s_off = r_off.sum(-1)
    centre = p * q * s_off * n / (n - 1)
    lin = (q * r_off - p * c_off) @ (left - p).T  # [..., 1+K]
    labelled = (centre[..., None] + lin) / (n_a * n_b) if labelled else np.full(lin.shape, np.nan)
    # block sums at the sample weights (exact) and their first-order bootstrap expansion
    ia, ib = is_a.astype(np.float64), (~is_a).astype(np.float64)
    da_, db_ = wa - ia, wb - ib  # [1+B, N], zero outside their task
    exact = np.stack([(rb * ia).sum(-1), (ra * ib).sum(-1), ((ra - d) * ia).sum(-1), ((rb - d) * ib).sum(-1)], -1)
    step = np.stack([rb @ da_.T + ca @ db_.T, ra @ db_.T + cb @ da_.T,
                     (ra + ca - 2 * d) @ da_.T, (rb + cb - 2 * d) @ db_.T], -1)  # [..., 1+B, 4]
    norm1 = np.array([n_a * n_b, n_a * n_b, n_a * (n_a - 1), n_b * (n_b - 1)], dtype=np.float64)
    sa, sb, qa, qb = wa.sum(1), wb.sum(1), (wa**2).sum(1), (wb**2).sum(1)
    norms = np.stack([sa * sb, sa * sb, sa**2 - qa, sb**2 - qb], -1)  # [1+B, 4]: what pair_means divides by
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(norm1 > 0, (exact[..., None, :] + step) / np.where(norm1 > 0, norm1, 1.0), np.nan)
    pairs = means * norms
    pairs[..., 0, :] = exact  # row 0 as summed, not rescaled: every point estimate exact
    margins = np.where(is_a, rb, ca)
    return np.concatenate([labelled, pairs.reshape(*lead, -1), margins], -1)


def margin_corrected(pairs, moments):
    """A sketched pooled score matrix whose diagonal and off-diagonal margins are made exact
    from the per-sample moments.

    pairs [..., N, N] (sketched S_ij, numpy or dask; N ≥ 3), moments [..., N, 5] in
    `schema.MOMENTS` order (exact: S_ii and each sample's row and column sums over A and B).
    Returns S̃_ij = Ŝ_ij + x_i + y_j off the diagonal and S_ii on it, with x, y the additive
    terms that make every off-diagonal row and column sum exact (δr_i = Σ_j≠i (S_ij − Ŝ_ij),
    δc_j likewise, s = Σδr, a = s / 2(N−1); x_i = ((N−1)(δr_i − a) + δc_i − a) / N(N−2), y_j
    symmetrically). So a statistic's first-order (Hájek) part (the labels test's linear
    term, every block mean) comes from exact numbers, and only the pairs' interaction from the
    sketch: a control variate that leaves the sketch's noise where no scalar can replace it."""
    n = pairs.shape[-1]
    diag_of = lambda m: np.diagonal(m, axis1=-2, axis2=-1)  # noqa: E731  (dask through __array_function__)
    d, sketched_d = moments[..., 0], diag_of(pairs)
    dr = moments[..., 1] + moments[..., 2] - d - (pairs.sum(-1) - sketched_d)
    dc = moments[..., 3] + moments[..., 4] - d - (pairs.sum(-2) - sketched_d)
    a = dr.sum(-1)[..., None] / (2 * (n - 1))
    x = ((n - 1) * (dr - a) + dc - a) / (n * (n - 2))
    y = ((n - 1) * (dc - a) + dr - a) / (n * (n - 2))
    out = pairs + x[..., :, None] + y[..., None, :]
    return out + (d - diag_of(out))[..., None] * np.eye(n, dtype=bool)
