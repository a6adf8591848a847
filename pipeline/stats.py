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

from typing import Literal

import numpy as np

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


def cross_sums(S: np.ndarray, left: np.ndarray, right: np.ndarray, max_bytes: int = 64 * 2**20) -> np.ndarray:
    """Σ_ij left[k, i] · S[..., i, j] · right[k, j] for every weight row k.

    S: [..., n, m] (any float dtype; accumulated in float64), left: [K, n],
    right: [K, m] -> [..., K]. Computed as rowsum((left @ S) * right), with the slices
    side by side in one matmul (one BLAS call, not one per small slice), in groups that
    keep the [K, slices·m] intermediate under `max_bytes`.
    """
    S = np.asarray(S, dtype=np.float64)
    lead, (n, m) = S.shape[:-2], S.shape[-2:]
    k = left.shape[0]
    if S.size == 0:  # e.g. a sample chunk with no A rows: contributes nothing
        return np.zeros((*lead, k))
    flat = S.reshape(-1, n, m)
    out = np.empty((flat.shape[0], k))
    step = max(1, max_bytes // (8 * k * max(m, 1)))
    for s0 in range(0, flat.shape[0], step):
        part = flat[s0 : s0 + step]
        g = part.shape[0]
        prod = (left @ part.transpose(1, 0, 2).reshape(n, g * m)).reshape(k, g, m)
        out[s0 : s0 + g] = np.einsum("kgm,km->gk", prod, right)
    return out.reshape(*lead, k)


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


def p_values(t_obs: np.ndarray, t_null: np.ndarray, alternative: Alternative = "greater") -> np.ndarray:
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


def maxt_pvalues(t_obs: np.ndarray, t_null: np.ndarray, alternative: Alternative = "greater") -> np.ndarray:
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
