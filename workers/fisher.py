"""The diagonal empirical Fisher as an EMA over batches, written as a weighted sum.

F_t = β F_{t-1} + (1-β) mean_{x∈batch t} g(x)²,  F_0 = 0,  Î = F_T / (1 - β^T)
unrolls to Î = Σ_t c_t · mean_{batch t} g² with c_t = (1-β) β^{T-t} / (1-β^T), i.e.
Î = Σ_i w_i g_i² with one weight per sample. Extraction shards therefore add up
their own Σ w_i g_i² independently (in any order, on any worker) and the driver
sums the shards: no sequential pass over batches.
"""
from __future__ import annotations

import numpy as np


def ema_sample_weights(n: int, batch_size: int, beta: float) -> np.ndarray:
    """Weight of each sample of a Fisher stream of `n` samples (stream order)."""
    if n < 1:
        raise ValueError("the Fisher stream is empty: fisher.source selects no samples")
    n_batches = -(-n // batch_size)
    t = np.arange(n) // batch_size  # 0-based batch of each sample
    size = np.minimum(batch_size, n - t * batch_size)  # last batch may be short
    coef = (1.0 - beta) * np.power(beta, (n_batches - 1 - t).astype(np.float64)) / (1.0 - beta**n_batches)
    return coef / size


def task_stream_weights(sizes, members, batch_size: int, beta: float) -> np.ndarray:
    """Per-sample Fisher weights over the store's samples (tasks of `sizes` one after another)
    for the stream of the tasks `members` (their samples in store order); 0 outside it."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    rows = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in sorted(members)])
    w = np.zeros(int(offsets[-1]), dtype=np.float64)
    w[rows] = ema_sample_weights(rows.size, batch_size, beta)
    return w


def stream_weights(n_a: int, n_b: int, source: str, batch_size: int, beta: float) -> np.ndarray:
    """Per-sample Fisher weights over a two-task store's samples (A then B); 0 outside the source
    ("pooled" and "pair" are both tasks there)."""
    members = {"pooled": [0, 1], "pair": [0, 1], "a": [0], "b": [1]}.get(source)
    if members is None:
        raise ValueError(f"fisher.source must be pooled, pair, a or b, not {source!r}")
    return task_stream_weights([n_a, n_b], members, batch_size, beta)


# The smallest Î+λ the score weights are formed from: float32's smallest normal number.
# The scores multiply float32 (or bf16) operands by 1/(Î+λ) and 1/√(Î+λ); below this floor
# those weights leave float32's range, and an entry whose gradient is 0 (Î = 0 there too)
# became inf·0 = NaN where the formula gives 0. Î itself is stored in float32, so nothing
# representable is lost: a damping that would fall under the floor is raised to it.
REG_FLOOR = float(np.finfo(np.float32).tiny)  # 1.18e-38: 1/REG_FLOOR = 8.5e37 and its root fit float32


def damping(fisher: np.ndarray, rel: float, abs_: float) -> np.ndarray:
    """λ per layer for one block: max(λ_abs, λ_rel · mean of Î over the layer's whole tensor),
    and never below REG_FLOOR (a tiny accepted λ_rel on a near-zero Fisher would otherwise
    make 1/(Î+λ) overflow float32).

    `fisher` is (layer, head, param). Per tensor, never per head slice, so that
    per-head scores add up exactly to the whole tensor's score.
    """
    mean = fisher.reshape(fisher.shape[0], -1).astype(np.float64).mean(axis=1)
    return np.maximum(np.maximum(abs_, rel * mean), REG_FLOOR)


def inverse_regularised(fisher: np.ndarray, lam) -> np.ndarray:
    """1/(Î+λ) in float64, with Î+λ taken as at least REG_FLOOR so that the weight and its
    square root are finite in float32 (a run stored before λ had that floor included): an
    entry whose gradients are 0 (Î = 0, e.g. a fully ablated head group) then scores 0,
    never inf·0 = NaN.
    `lam` broadcasts against `fisher` (a scalar, or λ per layer shaped to fit).
    A torch tensor (a float32 Fisher on a device) gets the same float64 operations there: each
    is correctly rounded, so the values are numpy's to the bit."""
    if not isinstance(fisher, np.ndarray) and hasattr(fisher, "double"):  # a torch tensor
        return (fisher.double() + lam).clamp_min_(REG_FLOOR).reciprocal_()
    reg = np.asarray(fisher, dtype=np.float64) + lam
    return 1.0 / np.maximum(reg, REG_FLOOR)


def inverse_damped_fisher(fisher, block: str):
    """1/(Î+λ) per (layer, head, param) in float64, lazily from a stored `fisher` dataset (one
    chunk per (layer, head), so no large array is embedded in the graph). The score stage and
    the sketch pass both use this, so exact and sketch mode normalise identically."""
    import dask.array as da

    from qkov.pipeline import schema

    f = fisher[block].data
    f = (f if isinstance(f, da.Array) else da.from_array(f)).rechunk((1, 1, -1))
    lam = np.asarray(fisher[schema.DAMPING].sel(block=block).values, dtype=np.float64)[:, None, None]
    return da.map_blocks(inverse_regularised, f, da.from_array(lam, chunks=(1, 1, 1)), dtype=np.float64)
