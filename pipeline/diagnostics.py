"""Numerical health of each slice's metric, and which samples dominate its scores (issue 19).

The score stage writes the `diagnostics` group from what the run already stores (the
Fisher, the stored gradients or their sketches, the pooled scores it has just written):
no pass over the model, one Dask graph of reductions.

Per (block, layer, head) slice, from Î (the stored Fisher) and λ (its damping):
  fisher_min / fisher_median / fisher_max of Î over the slice's P entries;
  damping λ; damped_share = share of entries with λ > Î (the metric 1/(Î+λ) is set by the
  damping, not the curvature, there); effective_dim = Σ_p Î/(Î+λ) (≈ the entries where the
  curvature counts; P when λ ≪ Î everywhere, 0 when λ swamps it);
  ill_conditioned ⇔ damped_share > ILL_SHARE (= 0.5, i.e. the slice's median Î is below λ):
  most of the slice is weighted by 1/λ, so its scores are ≈ (1/λ)-scaled Euclidean products
  of gradients, not Fisher-normalised ones.
Per (block, layer, head, sample):
  grad_norm = ‖g_i‖ over the slice; fisher_norm = √A_ii (the diagonal of the pooled
  alignment: the sample's norm in the (Î+λ)⁻¹ metric, which bounds |A_ij| ≤ √A_ii √A_jj and
  equals Σ_p of its interference operand g_i²/(Î+λ));
  interference_row_mean = mean over the other task's samples k of M[i, k] (how heavily the
  other task's gradients land on the weights this sample's loss depends on);
  interference_col_mean = mean over the other task's samples k of M[k, i] (how heavily this
  sample's gradient lands on the weights the other task's losses depend on);
  outlier_score = the larger of the modified z-scores (Iglewicz & Hoaglin: 0.6745·(x −
  median)/MAD) of log grad_norm and log fisher_norm among the samples of the same task in the
  slice; outlier ⇔ outlier_score > OUTLIER_Z (= 3.5). One-sided: only norms far *above*
  their task's others dominate the scores.

Sketch mode stores no gradients: grad_norm is ‖S(|g|)‖ and fisher_norm √(S(w)·S(w)), the
sketch's unbiased estimates of ‖g‖² and A_ii under the root (relative error about √(2/k) on
the squares, k = sketch_dim); the marginals are means of the sketched scores (what the
statistics use); the Fisher health is exact (the Fisher is stored whole in both modes).

The rules (OUTLIER_Z, ILL_SHARE) and reading the group back live in `health` (readers use
them without importing this stage).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from qkov.workers.fisher import REG_FLOOR
from qkov.workers.parts import DiagnosticParts

from . import codec
from . import schema as S
from .errors import StoreError
from .health import HEALTH_VARS, ILL_RULE, ILL_SHARE, OUTLIER_RULE, OUTLIER_Z
from .slice_reductions import other_weights
from .store import RunStore, decoded, has_scalars, provenance, scores_view
from .tiling import heads_per_task

# question, units, direction of every stored variable (the house rule for numbers users read)
DOCS: dict[str, tuple[str, str, str]] = {
    S.FISHER_MIN: ("Smallest Fisher entry Î of the slice", "Fisher units (squared loss gradient)", "-"),
    S.FISHER_MEDIAN: ("Median Fisher entry Î of the slice", "Fisher units (squared loss gradient)", "-"),
    S.FISHER_MAX: ("Largest Fisher entry Î of the slice", "Fisher units (squared loss gradient)", "-"),
    S.DAMPING: ("Damping lambda added to the Fisher (per block and layer tensor)", "Fisher units", "-"),
    S.DAMPED_SHARE: ("On what share of the slice's entries does lambda exceed the Fisher (damping, not "
                     "curvature, sets the metric there)?", "fraction of entries", "0 = curvature everywhere; 1 = damping everywhere"),
    S.EFFECTIVE_DIM: ("How many entries does the curvature govern? sum over the slice of I/(I + lambda)",
                      "entries (of n_params)", "n_params = Fisher-dominated throughout; 0 = damping-dominated"),
    S.N_PARAMS: ("Entries per slice of this block", "entries", "-"),
    S.ILL_CONDITIONED: ("Is the slice's metric set mostly by the damping? (" + ILL_RULE + ")", "1",
                        "True = read this slice's scores as 1/lambda-weighted gradient products"),
    S.GRAD_NORM: ("Size of the sample's gradient in this slice, ||g_i||", "loss gradient units",
                  "larger = the sample moves these weights more"),
    S.FISHER_NORM: ("Size of the sample's gradient in the slice's Fisher metric, sqrt(A_ii) (the pooled "
                    "alignment diagonal)", "sqrt of alignment units", "larger = larger |A_ij| and M rows for this sample"),
    S.ROW_MEAN: ("How heavily do the other task's gradients land on the weights this sample's loss depends "
                 "on? mean over the other task's samples k of M[i, k]", "interference units",
                 "larger = more exposed to the other task"),
    S.COL_MEAN: ("How heavily does this sample's gradient land on the weights the other task's losses depend "
                 "on? mean over the other task's samples k of M[k, i]", "interference units",
                 "larger = interferes more with the other task"),
    S.OUTLIER_SCORE: ("How far above its own task's samples is this sample's gradient size in the slice? "
                      "(" + OUTLIER_RULE + ")", "robust z (MAD units)", f"> {OUTLIER_Z} = outlier"),
    S.OUTLIER: ("Is the sample a norm outlier in this slice? (" + OUTLIER_RULE + ")", "1",
                "True = it can dominate the slice's top pairs"),
}


# ---------------------------------------------------------------- pure math


def fisher_health(fisher: np.ndarray, lam) -> np.ndarray:
    """fisher (..., P) Î of slices and their λ (broadcasting against (...)) → (..., 5):
    min, median, max, share of entries with λ > Î, Σ Î/(Î+λ). In float64."""
    f = np.asarray(fisher, dtype=np.float64)
    lam = np.asarray(lam, dtype=np.float64)[..., None]
    reg = np.maximum(f + lam, REG_FLOOR)  # as the score stage forms 1/(Î+λ)
    return np.stack([f.min(-1), np.median(f, -1), f.max(-1), (lam > f).mean(-1), (f / reg).sum(-1)], -1)


def modified_z(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Modified z-scores 0.6745 (x − median)/MAD of x (..., N) along the last axis, within each
    group of `groups` (N,). NaN entries stay NaN and take no part. MAD = 0 (half the values
    equal): 1.2533 × the mean absolute deviation instead (Iglewicz & Hoaglin); both 0: z = 0."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.shape, np.nan)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups give NaN, as they should
        for g in np.unique(groups):
            m = np.asarray(groups) == g
            xs = x[..., m]
            med = np.nanmedian(xs, -1, keepdims=True)
            dev = np.abs(xs - med)
            mad = np.nanmedian(dev, -1, keepdims=True) / 0.6745
            mean_ad = 1.2533 * np.nanmean(dev, -1, keepdims=True)
            scale = np.where(mad > 0, mad, mean_ad)
            z = np.where(scale > 0, (xs - med) / np.where(scale > 0, scale, 1.0), 0.0)
            out[..., m] = np.where(np.isnan(xs), np.nan, z)
    return out


def _log_pos(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)


def outlier_scores(grad_norm: np.ndarray, fisher_norm: np.ndarray, is_a: np.ndarray) -> np.ndarray:
    """(..., N) per-sample norms of slices → (..., N) outlier_score (see the module doc).
    A sample whose norms are 0 (nothing to dominate with) gets NaN."""
    z = np.stack([modified_z(_log_pos(grad_norm), is_a), modified_z(_log_pos(fisher_norm), is_a)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(z, axis=0)


def other_task_means(m: np.ndarray, is_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column means over the other task of pooled score matrices m (..., N, N):
    row[i] = mean over k of the other task of m[i, k]; col[i] = mean over such k of m[k, i]."""
    w = other_weights(is_a)
    is_a = np.asarray(is_a, dtype=bool)
    rows, cols = m @ w, np.swapaxes(m, -1, -2) @ w  # (..., N, 2)
    pick = lambda r: np.where(is_a, r[..., 1], r[..., 0])  # noqa: E731  A rows: mean over B; B rows: over A
    return pick(rows), pick(cols)


# ---------------------------------------------------------------- chunk kernels (run in Dask tasks)


def _sq_norms(block: np.ndarray, encoding: str | None) -> np.ndarray:
    """Stored gradient (or sketch) chunk (..., P) → Σ_p x² (...), float64."""
    x = codec.decode(block, encoding).astype(np.float64)
    return np.einsum("...p,...p->...", x, x)


def _health_chunk(f: np.ndarray, lam: np.ndarray) -> np.ndarray:
    return fisher_health(f, lam[..., 0])  # f (1, H, P), lam (1, 1, 1) → (1, H, 5)


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class _BlockParts:
    """One block's lazy reductions: the Fisher health (L, H_b, 5) and the `DiagnosticParts`
    (samples first, on the block's own heads)."""
    health: Any
    parts: DiagnosticParts

    def flat(self) -> list:
        p = self.parts
        return [self.health, p.sq, p.rows, p.cols, p.diag]

    @classmethod
    def unflat(cls, values) -> "_BlockParts":
        health, sq, rows, cols, diag = values
        return cls(health, DiagnosticParts(sq, rows, cols, diag))


def _compute(executor, blocks: dict[str, _BlockParts], *before, **kw) -> dict[str, _BlockParts]:
    """Compute every block's parts in one graph (after `before`, whose results are dropped)."""
    flat = [x for p in blocks.values() for x in p.flat()]
    if executor is None:
        import dask

        done = dask.compute(*before, *flat, **kw)
    else:
        done = executor.compute(*before, *flat, **kw)
    done = done[len(before):]
    return {b: _BlockParts.unflat(done[5 * i : 5 * i + 5]) for i, b in enumerate(blocks)}


def _sq_parts(grads: xr.Dataset, b: str, keep: np.ndarray, sketched: bool, reader, device: str) -> da.Array:
    """Σ g² (N, L, H_b) of a block's kept rows (sketch mode: ‖S(|g|)‖² ≈ ‖g‖²), read by tasks
    of their own where a direct reader fits, else through Dask."""
    var = grads[S.sketch_var(b, "v") if sketched else b]
    enc = var.attrs.get(S.ATTR_ENCODING) if var.dtype == np.uint16 else None
    if reader is not None and reader.shape == var.shape and not sketched:
        from qkov.workers.kernels import direct_sq_norms

        n_l, n_h = reader.shape[1], reader.shape[2]
        hc = heads_per_task(n_h, keep.size, reader.shape[3], reader.dtype.itemsize)
        sq = da.blockwise(direct_sq_norms, "lhn", da.arange(n_l, chunks=1), "l", da.arange(n_h, chunks=hc), "h",
                          da.from_array(keep, chunks=-1), "n", dtype=np.float64, concatenate=True,
                          meta=np.empty((0, 0, 0), np.float64), reader=reader, encoding=enc, device=device)
        return sq.transpose(2, 0, 1)
    raw = var.data[keep].rechunk({3: -1})
    return raw.map_blocks(_sq_norms, enc, drop_axis=3, dtype=np.float64)


def _health_parts(fisher: xr.Dataset, b: str) -> da.Array:
    f = fisher[b].data
    f = (f if isinstance(f, da.Array) else da.from_array(f)).rechunk((1, -1, -1))
    lam = np.asarray(fisher[S.DAMPING].sel({S.BLOCK: b}).values, dtype=np.float64)[:, None, None]
    lam_d = da.from_array(lam, chunks=(1, 1, 1))
    return da.map_blocks(_health_chunk, f, lam_d, dtype=np.float64, chunks=(f.chunks[0], f.chunks[1], (5,)))


def _pooled_parts(scores: xr.Dataset, bi: int, b: str, w: np.ndarray) -> DiagnosticParts:
    """The other-task means and A_ii of one block from the pooled scores (the block's own
    heads: K/V once per KV head), samples first (no `sq`)."""
    kv_of = np.asarray(scores[S.KV_HEAD].values)
    heads = (np.array([np.flatnonzero(kv_of == g)[0] for g in range(int(kv_of.max()) + 1)])
             if S.head_dim(b) == S.KV_HEAD else np.arange(kv_of.size))
    m = scores[S.pooled_name("interference")].data[bi][:, heads]
    a = scores[S.pooled_name("alignment")].data[bi][:, heads]
    return DiagnosticParts(sq=None, rows=da.matmul(m, w).transpose(2, 0, 1, 3),
                           cols=da.matmul(da.swapaxes(m, 2, 3), w).transpose(2, 0, 1, 3),
                           diag=da.diagonal(a, axis1=2, axis2=3).transpose(2, 0, 1))


def _operand_parts(grads: xr.Dataset, fisher: xr.Dataset, b: str, keep: np.ndarray, w: np.ndarray,
                   sketched: bool) -> DiagnosticParts:
    """Row/column means over the other task and A_ii of one block without the N×N scores (no `sq`).
    M is bilinear, M[i, k] = u_i · v_k with u = g²/(Î+λ), v = |g| (sketch mode: their stored
    sketches), so mean over k of M[i, k] = u_i · v̄ and mean over k of M[k, i] = ū · v_i with
    the task means ū, v̄; A_ii = Σ u_i (sketch mode: S(w_i)·S(w_i)). Two reads of the operands."""
    if sketched:
        u, v, ww = (decoded(grads[S.sketch_var(b, p)]).data[keep].rechunk({3: -1}) for p in S.SKETCH_PARTS)
        u, v, ww = (x.astype(np.float64) for x in (u, v, ww))
        a_ii = (ww * ww).sum(-1)
    else:
        from qkov.workers.fisher import inverse_damped_fisher

        g = decoded(grads[b]).data[keep].rechunk({3: -1}).astype(np.float64)
        inv = inverse_damped_fisher(fisher, b).rechunk({0: 1, 1: 1, 2: -1})
        u, v = g * g * inv[None], abs(g)
        a_ii = u.sum(-1)
    wd = da.from_array(w)  # (N, 2): task-A mean, task-B mean
    ubar, vbar = da.einsum("nlhp,nt->tlhp", u, wd), da.einsum("nlhp,nt->tlhp", v, wd)
    return DiagnosticParts(sq=None, rows=da.einsum("nlhp,tlhp->nlht", u, vbar), cols=da.einsum("nlhp,tlhp->nlht", v, ubar),
                           diag=a_ii)


def _lazy_parts(grads: xr.Dataset, fisher: xr.Dataset, scores: xr.Dataset, readers: dict | None = None,
                device: str = "auto", side: dict | None = None) -> dict[str, _BlockParts]:
    """The Dask reductions per block: the Fisher health, the squared gradient norms and the
    alignment diagonal and other-task row/column means of the interference: from the parts
    the score tasks reduced (`side`, every block), else from the pooled scores, else (no N×N
    scores stored) from the operands."""
    keep = np.flatnonzero(np.asarray(grads[S.FINITE].values, dtype=bool))
    sketched = grads.attrs.get(S.ATTR_MODE) == "sketch"
    blocks = [str(b) for b in scores[S.BLOCK].values]
    w = other_weights(np.asarray(scores[S.IS_A].values, dtype=bool))
    side = side or {}
    pooled = S.pooled_name("interference") in scores and S.pooled_name("alignment") in scores
    out = {}
    for bi, b in enumerate(blocks):
        sq = side[b].sq if b in side else _sq_parts(grads, b, keep, sketched, (readers or {}).get(b), device)
        if all(x in side for x in blocks):  # reduced by the score tasks from the tiles they held
            means = side[b]
        elif pooled:
            means = _pooled_parts(scores, bi, b, w)
        else:  # `score.keep_pairs` stored no N×N matrices: the same means from the operands
            means = _operand_parts(grads, fisher, b, keep, w, sketched)
        out[b] = _BlockParts(_health_parts(fisher, b), DiagnosticParts(sq, means.rows, means.cols, means.diag))
    return out


def _attrs(var: str) -> dict[str, str]:
    q, u, d = DOCS[var]
    return {"question": q, "units": u, "direction": d, "description": q}


def diagnostics_parts(grads: xr.Dataset, fisher: xr.Dataset, scores: xr.Dataset, readers: dict | None = None,
                      device: str = "auto", side: dict | None = None) -> dict[str, _BlockParts]:
    """The lazy reductions `diagnostics_from_parts` assembles. `scores` may be the stored
    scores or the score stage's own lazy dataset (`scores_view` of it): computed in the same
    graph as the score writes, each score tile is then reduced while it is in memory instead
    of being read back; `side` {block: DiagnosticParts} holds what the score tasks computed
    beside the scores (`compact_scores`), used instead of computing it again."""
    ids = np.asarray(scores[S.SAMPLE_I].values).astype(object)
    keep = np.flatnonzero(np.asarray(grads[S.FINITE].values, dtype=bool))
    if not np.array_equal(np.asarray(grads[S.SAMPLE_ID].values).astype(object)[keep], ids):
        raise StoreError("the scores' samples are not the gradients' kept samples; the run's groups do not belong together")
    return _lazy_parts(grads, fisher, scores, readers, device, side)


def compute_with_diagnostics(executor, writes, grads: xr.Dataset, fisher: xr.Dataset, scores: xr.Dataset,
                             readers: dict | None, device: str, side: dict, on_progress=None) -> xr.Dataset:
    """Run a score stage's delayed `writes` of the lazy compact `scores` and the diagnostics'
    reductions as one graph (each score tile reduced while it is in memory; `side`: the parts
    the score tasks computed, `compact_scores`). Returns the loaded `diagnostics` dataset."""
    view = scores_view(scores)
    parts = diagnostics_parts(grads, fisher, view, readers, device, side=side)
    progress = {} if on_progress is None else {"on_progress": on_progress}
    return diagnostics_from_parts(_compute(executor, parts, writes, **progress), grads, fisher, view)


def diagnostics_dataset(grads: xr.Dataset, fisher: xr.Dataset, scores: xr.Dataset, executor=None, *,
                        readers: dict | None = None, device: str = "auto") -> xr.Dataset:
    """The (loaded) `diagnostics` dataset of a run's gradients, Fisher and pooled scores."""
    parts = diagnostics_parts(grads, fisher, scores, readers, device)
    return diagnostics_from_parts(_compute(executor, parts), grads, fisher, scores)


def _per_sample(values: dict[str, _BlockParts], scores: xr.Dataset) -> tuple[np.ndarray, ...]:
    """The computed parts on every query head (K/V repeat their KV head), (block, L, H, N):
    Fisher health (…, 5 instead of N), ‖g‖, √A_ii and the other-task means of M's rows and columns."""
    kv_of = np.asarray(scores[S.KV_HEAD].values)
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    per_head = lambda b, x: x[:, kv_of] if S.head_dim(b) == S.KV_HEAD else x  # noqa: E731  (L, H_b, …) → (L, H, …)
    stack = lambda f, move=-1: np.stack([per_head(b, np.moveaxis(f(p), 0, move)) for b, p in values.items()])  # noqa: E731
    rows, cols = stack(lambda p: p.parts.rows, -2), stack(lambda p: p.parts.cols, -2)  # samples first → (L, H_b, N, 2)
    health = np.stack([per_head(b, p.health) for b, p in values.items()])
    gnorm = np.sqrt(stack(lambda p: p.parts.sq))
    fnorm = np.sqrt(np.maximum(stack(lambda p: p.parts.diag), 0.0))  # a sketched A_ii is ≥ 0 too; float32 rounding only
    return health, gnorm, fnorm, np.where(is_a, rows[..., 1], rows[..., 0]), np.where(is_a, cols[..., 1], cols[..., 0])


def diagnostics_from_parts(values: dict[str, _BlockParts], grads: xr.Dataset, fisher: xr.Dataset,
                           scores: xr.Dataset) -> xr.Dataset:
    """The `diagnostics` dataset from the computed `diagnostics_parts`."""
    ids = np.asarray(scores[S.SAMPLE_I].values).astype(object)
    blocks = [str(b) for b in scores[S.BLOCK].values]
    kv_of = np.asarray(scores[S.KV_HEAD].values)
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    health, gnorm, fnorm, row_mean, col_mean = _per_sample(values, scores)
    score = outlier_scores(gnorm, fnorm, is_a)
    lam = np.stack([np.asarray(fisher[S.DAMPING].sel({S.BLOCK: b}).values, dtype=np.float64) for b in blocks])
    n_params = np.array([fisher[b].shape[-1] for b in blocks], dtype=np.int64)
    h4 = (S.BLOCK, S.LAYER, S.HEAD)
    s4 = (*h4, S.SAMPLE_I)
    data = {v: (h4, health[..., k], _attrs(v)) for k, v in enumerate(HEALTH_VARS)}
    data[S.DAMPING] = (h4, np.broadcast_to(lam[:, :, None], health.shape[:3]).copy(), _attrs(S.DAMPING))
    data[S.N_PARAMS] = ((S.BLOCK,), n_params, _attrs(S.N_PARAMS))
    data[S.ILL_CONDITIONED] = (h4, health[..., 3] > ILL_SHARE, _attrs(S.ILL_CONDITIONED))
    for v, x in ((S.GRAD_NORM, gnorm), (S.FISHER_NORM, fnorm), (S.ROW_MEAN, row_mean), (S.COL_MEAN, col_mean),
                 (S.OUTLIER_SCORE, score)):
        data[v] = (s4, np.asarray(x, dtype=np.float32), _attrs(v))
    data[S.OUTLIER] = (s4, np.nan_to_num(score, nan=-np.inf) > OUTLIER_Z, _attrs(S.OUTLIER))
    task_a, task_b = scores.attrs.get(S.ATTR_TASK_A), scores.attrs.get(S.ATTR_TASK_B)
    coords = {
        S.BLOCK: np.array(blocks, dtype=object),
        S.LAYER: scores[S.LAYER].values,
        S.HEAD: scores[S.HEAD].values,
        S.KV_HEAD: (S.HEAD, kv_of),
        S.SAMPLE_I: ids,
        S.IS_A: (S.SAMPLE_I, is_a),
        S.TASK: (S.SAMPLE_I, np.where(is_a, str(task_a), str(task_b)).astype(object)),
    }
    mode = grads.attrs.get(S.ATTR_MODE) or "exact"
    scalars = has_scalars(grads)  # each sample's scalars: exact
    attrs = {
        "ill_conditioned_rule": ILL_RULE,
        "outlier_rule": OUTLIER_RULE,
        "outlier_z": OUTLIER_Z,
        "ill_share": ILL_SHARE,
        "mode": mode,
        "source": _SOURCES["scalars" if scalars else mode if mode in _SOURCES else "exact"],
        "kv": "K/V rows of query heads that share a KV head repeat that KV head's values",
        S.ATTR_N_A: int(is_a.sum()), S.ATTR_N_B: int((~is_a).sum()), S.ATTR_TASK_A: task_a, S.ATTR_TASK_B: task_b,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


_SOURCES = {  # where the per-sample diagnostics come from, by what the run stores
    "exact": "exact: norms from the stored gradients, fisher_norm and marginals from the stored pooled scores",
    "sketch": "grad_norm = ||S(|g|)|| and fisher_norm = sqrt(S(w).S(w)) estimate ||g|| and sqrt(A_ii) from the sketches "
              "(relative error about sqrt(2/k) on the squares); marginals are means of the sketched scores; the Fisher "
              "health is exact",
    "scalars": "exact: norms, fisher_norm and marginals from each sample's scalars, reduced from its gradient against "
               "the task sums in extraction (no gradient stored)",
}


def write_diagnostics(store: RunStore, ds: xr.Dataset, config=None, config_hash: str | None = None) -> None:
    ds.attrs.update(provenance(config, config_hash, stage="diagnostics"))
    store.write_dataset(ds, S.DIAGNOSTICS, complete=True)
