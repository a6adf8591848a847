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

`qkov stats --exclude` helpers live here too: `resolve_samples` maps the user's ids to the
pooled rows and refuses unknown or ambiguous ones; `without_samples` drops them from an
opened scores dataset (rows and columns), so the statistics are recomputed from the stored
scores, with the Fisher (and λ) still the one estimated from every sample.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from qkov.workers.fisher import REG_FLOOR

from . import schema as S
from .errors import StoreError, UsageError, param
from .store import RunStore, decoded, provenance, scores_view

OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut for the modified z-score
ILL_SHARE = 0.5  # ill_conditioned when λ exceeds Î on more than this share of the slice
ILL_RULE = (f"ill_conditioned = damped_share > {ILL_SHARE}: lambda exceeds the Fisher on most of the slice "
            "(its median Fisher is below lambda), so the slice's scores are weighted mostly by 1/lambda, "
            "not by the curvature")
OUTLIER_RULE = (f"outlier = outlier_score > {OUTLIER_Z}; outlier_score = max of the modified z-scores "
                "0.6745 (x - median) / MAD of x = log grad_norm and x = log fisher_norm among the samples of "
                "the same task in the slice (MAD = 0: 1.2533 x mean absolute deviation instead)")

HEALTH_VARS = (S.FISHER_MIN, S.FISHER_MEDIAN, S.FISHER_MAX, S.DAMPED_SHARE, S.EFFECTIVE_DIM)

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
    w = _other_weights(is_a)
    is_a = np.asarray(is_a, dtype=bool)
    rows, cols = m @ w, np.swapaxes(m, -1, -2) @ w  # (..., N, 2)
    pick = lambda r: np.where(is_a, r[..., 1], r[..., 0])  # noqa: E731  A rows: mean over B; B rows: over A
    return pick(rows), pick(cols)


def _other_weights(is_a: np.ndarray) -> np.ndarray:
    """(N, 2): column 0 averages over task A, column 1 over task B."""
    is_a = np.asarray(is_a, dtype=bool)
    return np.stack([is_a / max(1, is_a.sum()), ~is_a / max(1, (~is_a).sum())], 1).astype(np.float64)


# ---------------------------------------------------------------- chunk kernels (run in Dask tasks)


def _sq_norms(block: np.ndarray, encoding: str | None) -> np.ndarray:
    """Stored gradient (or sketch) chunk (..., P) → Σ_p x² (...), float64."""
    x = S.decode(block, encoding).astype(np.float64)
    return np.einsum("...p,...p->...", x, x)


def _health_chunk(f: np.ndarray, lam: np.ndarray) -> np.ndarray:
    return fisher_health(f, lam[..., 0])  # f (1, H, P), lam (1, 1, 1) → (1, H, 5)


# ---------------------------------------------------------------- the stage


def _lazy_parts(grads: xr.Dataset, fisher: xr.Dataset, scores: xr.Dataset, readers: dict | None = None,
                device: str = "auto", side: dict | None = None) -> dict[str, Any]:
    """The Dask reductions: per block the squared gradient norms (N, L, H_b) and the Fisher
    health (L, H_b, 5); over the pooled scores the alignment diagonal and the other-task
    row/column means of the interference (block, L, H, N)."""
    keep = np.flatnonzero(np.asarray(grads[S.FINITE].values, dtype=bool))
    sketched = grads.attrs.get(S.ATTR_MODE) == "sketch"
    blocks = [str(b) for b in scores[S.BLOCK].values]
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    side = side or {}
    parts: dict[str, Any] = {}
    for b in blocks:
        var = grads[S.sketch_var(b, "v") if sketched else b]  # sketch mode: S(|g|), ‖S(|g|)‖² ≈ ‖g‖²
        enc = var.attrs.get(S.ATTR_ENCODING) if var.dtype == np.uint16 else None
        reader = (readers or {}).get(b)
        if f"sq_{b}" in side:  # computed by the score tasks
            parts[f"sq_{b}"] = side[f"sq_{b}"]
        elif reader is not None and reader.shape == var.shape and not sketched:  # read by the tasks themselves
            from qkov.workers.kernels import direct_sq_norms

            from .score import heads_per_task

            n_l, n_h = reader.shape[1], reader.shape[2]
            hc = heads_per_task(n_h, keep.size, reader.shape[3], reader.dtype.itemsize)
            sq = da.blockwise(direct_sq_norms, "lhn", da.arange(n_l, chunks=1), "l", da.arange(n_h, chunks=hc), "h",
                              da.from_array(keep, chunks=-1), "n", dtype=np.float64, concatenate=True,
                              meta=np.empty((0, 0, 0), np.float64), reader=reader, encoding=enc, device=device)
            parts[f"sq_{b}"] = sq.transpose(2, 0, 1)
        else:
            raw = var.data[keep].rechunk({3: -1})
            parts[f"sq_{b}"] = raw.map_blocks(_sq_norms, enc, drop_axis=3, dtype=np.float64)
        f = fisher[b].data
        f = (f if isinstance(f, da.Array) else da.from_array(f)).rechunk((1, -1, -1))
        lam = np.asarray(fisher[S.DAMPING].sel({S.BLOCK: b}).values, dtype=np.float64)[:, None, None]
        lam_d = da.from_array(lam, chunks=(1, 1, 1))
        parts[f"health_{b}"] = da.map_blocks(_health_chunk, f, lam_d, dtype=np.float64,
                                             chunks=(f.chunks[0], f.chunks[1], (5,)))
    w = _other_weights(is_a)
    reduced = [f"{k}_{b}" for b in blocks for k in ("orows", "ocols", "odiag")]
    if all(k in side for k in reduced):  # reduced by the score tasks from the tiles they held
        parts.update({k: side[k] for k in reduced})
    elif S.pooled_name("interference") in scores and S.pooled_name("alignment") in scores:
        m = scores[S.pooled_name("interference")].data
        parts["rows"] = da.matmul(m, w)
        parts["cols"] = da.matmul(da.swapaxes(m, 3, 4), w)
        parts["diag"] = da.diagonal(scores[S.pooled_name("alignment")].data, axis1=3, axis2=4)
    else:  # `score.keep_pairs` stored no N×N matrices: the same means from the operands
        for b in blocks:
            parts.update({f"{k}_{b}": x for k, x in _operand_parts(grads, fisher, b, keep, w, sketched).items()})
    return parts


def _operand_parts(grads: xr.Dataset, fisher: xr.Dataset, b: str, keep: np.ndarray, w: np.ndarray,
                   sketched: bool) -> dict[str, da.Array]:
    """Row/column means over the other task and A_ii of one block without the N×N scores.
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
    return {"orows": da.einsum("nlhp,tlhp->nlht", u, vbar), "ocols": da.einsum("nlhp,tlhp->nlht", v, ubar),
            "odiag": a_ii}


def _attrs(var: str) -> dict[str, str]:
    q, u, d = DOCS[var]
    return {"question": q, "units": u, "direction": d, "description": q}


def diagnostics_parts(grads: xr.Dataset, fisher: xr.Dataset, scores: xr.Dataset, readers: dict | None = None,
                      device: str = "auto", side: dict | None = None) -> dict[str, Any]:
    """The lazy reductions `diagnostics_from_parts` assembles. `scores` may be the stored
    scores or the score stage's own lazy dataset (`scores_view` of it): computed in the same
    graph as the score writes, each score tile is then reduced while it is in memory instead
    of being read back; `side` holds parts the score tasks computed beside the scores
    (`compact_scores`), used instead of computing them again."""
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
    computed = executor.compute(writes, *parts.values(), **progress)[1:]
    return diagnostics_from_parts(dict(zip(parts, computed)), grads, fisher, view)


def diagnostics_dataset(grads: xr.Dataset, fisher: xr.Dataset, scores: xr.Dataset, executor=None, *,
                        readers: dict | None = None, device: str = "auto") -> xr.Dataset:
    """The (loaded) `diagnostics` dataset of a run's gradients, Fisher and pooled scores."""
    parts = diagnostics_parts(grads, fisher, scores, readers, device)
    if executor is None:
        import dask

        computed = dask.compute(*parts.values())
    else:
        computed = executor.compute(*parts.values())
    return diagnostics_from_parts(dict(zip(parts, computed)), grads, fisher, scores)


def diagnostics_from_parts(values: dict[str, np.ndarray], grads: xr.Dataset, fisher: xr.Dataset,
                           scores: xr.Dataset) -> xr.Dataset:
    """The `diagnostics` dataset from the computed `diagnostics_parts`."""
    ids = np.asarray(scores[S.SAMPLE_I].values).astype(object)
    blocks = [str(b) for b in scores[S.BLOCK].values]
    kv_of = np.asarray(scores[S.KV_HEAD].values)
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    per_head = lambda b, x: x[:, kv_of] if S.head_dim(b) == S.KV_HEAD else x  # noqa: E731  (L, H_b, …) → (L, H, …)
    health = np.stack([per_head(b, values[f"health_{b}"]) for b in blocks])  # (block, L, H, 5)
    gnorm = np.sqrt(np.stack([per_head(b, values[f"sq_{b}"].transpose(1, 2, 0)) for b in blocks]))  # (block, L, H, N)
    if "diag" in values:  # from the pooled scores
        diag, rows, cols = values["diag"], values["rows"], values["cols"]  # (block, L, H, N[, 2])
    else:  # from the operands: (N, L, H_b[, 2]) per block
        diag = np.stack([per_head(b, np.moveaxis(values[f"odiag_{b}"], 0, -1)) for b in blocks])
        rows, cols = (np.stack([per_head(b, np.moveaxis(values[f"{k}_{b}"], 0, -2)) for b in blocks]) for k in ("orows", "ocols"))
    fnorm = np.sqrt(np.maximum(diag, 0.0))  # a sketched A_ii is ≥ 0 too; float32 rounding only
    row_mean = np.where(is_a, rows[..., 1], rows[..., 0])
    col_mean = np.where(is_a, cols[..., 1], cols[..., 0])
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
    sketched = grads.attrs.get(S.ATTR_MODE) == "sketch"
    attrs = {
        "ill_conditioned_rule": ILL_RULE,
        "outlier_rule": OUTLIER_RULE,
        "outlier_z": OUTLIER_Z,
        "ill_share": ILL_SHARE,
        "mode": "sketch" if sketched else "exact",
        "source": ("grad_norm = ||S(|g|)|| and fisher_norm = sqrt(S(w).S(w)) estimate ||g|| and sqrt(A_ii) from the "
                   "sketches (relative error about sqrt(2/k) on the squares); marginals are means of the sketched "
                   "scores; the Fisher health is exact") if sketched else
                  "exact: norms from the stored gradients, fisher_norm and marginals from the stored pooled scores",
        "kv": "K/V rows of query heads that share a KV head repeat that KV head's values",
        S.ATTR_N_A: int(is_a.sum()), S.ATTR_N_B: int((~is_a).sum()), S.ATTR_TASK_A: task_a, S.ATTR_TASK_B: task_b,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def run_diagnostics(store: RunStore, executor=None, *, scores_complete: bool = True, config=None,
                    config_hash: str | None = None, device: str = "auto") -> xr.Dataset:
    """Compute and write the `diagnostics` group of a run from its stored gradients, Fisher and
    scores (the score stage calls this before it marks the scores complete, hence
    `scores_complete=False` there). Returns the loaded dataset."""
    scores = store.open_dataset(S.SCORES_GROUP, "the diagnostics", complete=scores_complete)
    grads = store.open_gradients(decode=False)
    readers = store.direct_chunks(S.GRADIENTS)
    ds = diagnostics_dataset(grads, store.open_fisher(), scores, executor, readers=readers, device=device)
    write_diagnostics(store, ds, config, config_hash)
    return ds


def write_diagnostics(store: RunStore, ds: xr.Dataset, config=None, config_hash: str | None = None) -> None:
    ds.attrs.update(provenance(config, config_hash, stage="diagnostics"))
    store.write_dataset(ds, S.DIAGNOSTICS, complete=True)


def open_diagnostics(store: RunStore) -> xr.Dataset | None:
    """The run's `diagnostics` (loaded), or None for a run written before they were recorded."""
    if not store.is_complete(S.DIAGNOSTICS):
        return None
    return store.open_dataset(S.DIAGNOSTICS, "reading diagnostics").load()


# ---------------------------------------------------------------- reading them back


def head_diagnostics(diag: xr.Dataset, block: str, layer: int, head: int, pairs: Sequence[dict],
                     top: int = 5, run: str = "RUN") -> dict[str, Any]:
    """One slice's health, its flagged samples, its most interfering samples in both
    directions and a warning when flagged samples dominate `pairs` (the top pairs shown)."""
    d = diag.sel({S.BLOCK: block, S.LAYER: layer, S.HEAD: head})
    num = lambda x: None if not np.isfinite(float(x)) else float(x)  # noqa: E731
    health = {v: num(d[v].values) for v in (*HEALTH_VARS, S.DAMPING)}
    health[S.N_PARAMS] = int(d[S.N_PARAMS].values)
    health[S.ILL_CONDITIONED] = bool(d[S.ILL_CONDITIONED].values)
    ids = [str(x) for x in d[S.SAMPLE_I].values]
    is_a = np.asarray(d[S.IS_A].values, dtype=bool)
    task = [str(x) for x in d[S.TASK].values]
    flag = np.asarray(d[S.OUTLIER].values, dtype=bool)
    z = np.asarray(d[S.OUTLIER_SCORE].values, dtype=np.float64)
    row, col = np.asarray(d[S.ROW_MEAN].values), np.asarray(d[S.COL_MEAN].values)
    gn, fn = np.asarray(d[S.GRAD_NORM].values), np.asarray(d[S.FISHER_NORM].values)

    def sample(k: int) -> dict[str, Any]:
        return {"task": task[k], "sample": ids[k], "col_mean": num(col[k]), "row_mean": num(row[k]),
                "grad_norm": num(gn[k]), "fisher_norm": num(fn[k]), "outlier_score": num(z[k]), "outlier": bool(flag[k])}

    def most(mask: np.ndarray) -> list[dict]:
        idx = np.flatnonzero(mask)
        return [sample(int(k)) for k in idx[np.argsort(-col[idx], kind="stable")][:top]]

    flagged = [sample(int(k)) for k in np.flatnonzero(flag)[np.argsort(-z[flag], kind="stable")]]
    flagged_a = {ids[k] for k in np.flatnonzero(flag & is_a)}
    flagged_b = {ids[k] for k in np.flatnonzero(flag & ~is_a)}
    hit = [p for p in pairs if p["sample_a"] in flagged_a or p["sample_b"] in flagged_b]
    warning = None
    if pairs and 2 * len(hit) >= len(pairs):
        who = sorted({p["sample_a"] for p in hit if p["sample_a"] in flagged_a} | {p["sample_b"] for p in hit if p["sample_b"] in flagged_b})
        warning = (f"{len(hit)} of the {len(pairs)} top pairs involve samples flagged as norm outliers in this slice "
                   f"({', '.join(who)}); the ranking says more about those samples' gradient size than about the head. "
                   f"Check them, or compare `qkov stats {run} --exclude {','.join(who)} --name without-outliers`.")
    return {"health": health, "flagged": flagged, "warning": warning,
            "a_on_b": most(is_a), "b_on_a": most(~is_a), "n_flagged_in_top_pairs": len(hit)}


def health_summary(diag: xr.Dataset, top: int = 10) -> dict[str, Any]:
    """Run-wide: ill-conditioned slices (K/V counted once per KV head) and the samples
    flagged as outliers in the most slices."""
    kv = np.asarray(diag[S.KV_HEAD].values)
    first = np.array([int(np.flatnonzero(kv == g)[0]) == h for h, g in enumerate(kv)])
    blocks = [str(b) for b in diag[S.BLOCK].values]
    fam = np.array([first if S.head_dim(b) == S.KV_HEAD else np.ones_like(first) for b in blocks])  # (block, head)
    fam3 = np.broadcast_to(fam[:, None, :], diag[S.ILL_CONDITIONED].shape)
    ill = np.asarray(diag[S.ILL_CONDITIONED].values, dtype=bool) & fam3
    share = np.asarray(diag[S.DAMPED_SHARE].values)
    bi, li, hi = np.nonzero(ill)
    order = np.argsort(-share[bi, li, hi], kind="stable")
    layers, heads = diag[S.LAYER].values, diag[S.HEAD].values
    ill_rows = [{"block": blocks[bi[k]], "layer": int(layers[li[k]]), "head": int(heads[hi[k]]),
                 "damped_share": float(share[bi[k], li[k], hi[k]]),
                 "effective_dim": float(diag[S.EFFECTIVE_DIM].values[bi[k], li[k], hi[k]])} for k in order]
    flags = np.asarray(diag[S.OUTLIER].values, dtype=bool) & fam3[..., None]
    count = flags.sum(axis=(0, 1, 2))
    n_slices = int(fam3.sum())
    ids, task = [str(x) for x in diag[S.SAMPLE_I].values], [str(x) for x in diag[S.TASK].values]
    zmax = np.nanmax(np.where(fam3[..., None], np.asarray(diag[S.OUTLIER_SCORE].values, dtype=np.float64), np.nan),
                     axis=(0, 1, 2)) if n_slices else np.full(len(ids), np.nan)
    top_idx = [int(k) for k in np.argsort(-count, kind="stable") if count[k] > 0][:top]
    return {
        "n_slices": n_slices,
        "n_ill_conditioned": int(ill.sum()),
        "ill_conditioned": ill_rows,
        "n_flags": int(flags.sum()),
        "n_samples": len(ids),
        "n_flagged_samples": int((count > 0).sum()),
        "samples": [{"task": task[k], "sample": ids[k], "slices_flagged": int(count[k]),
                     "max_outlier_score": float(zmax[k])} for k in top_idx],
        "median_damped_share": float(np.median(share[fam3])) if n_slices else None,
        "ill_rule": ILL_RULE,
        "outlier_rule": OUTLIER_RULE,
    }


# ---------------------------------------------------------------- `qkov stats --exclude`


def resolve_samples(scores: xr.Dataset, requested: Sequence[str]) -> np.ndarray:
    """Positions in the pooled rows (sample_i) of the samples named in `requested`.

    Each entry is a sample id, `TASK:ID` (when an id occurs in both tasks), or several of
    those separated by commas (an entry that is itself an id is taken whole). Unknown or
    ambiguous ids are a UsageError naming them: nothing is dropped silently."""
    ids = np.array([str(x) for x in scores[S.SAMPLE_I].values], dtype=object)  # StringDType: no fixed-width cast
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    tasks = {str(scores.attrs.get(S.ATTR_TASK_A)): is_a, str(scores.attrs.get(S.ATTR_TASK_B)): ~is_a}
    found: set[int] = set()
    unknown: list[str] = []
    ambiguous: list[str] = []

    # compared as Python strings: `ids == token` makes numpy turn `token` into a fixed-width
    # string, which drops trailing NULs ("a\0" would match sample "a")
    def matches(token: str) -> np.ndarray:
        return np.array([i == token for i in ids], dtype=bool)

    def one(token: str) -> bool:
        hits = np.flatnonzero(matches(token))
        if hits.size == 1:
            found.add(int(hits[0]))
            return True
        if hits.size > 1:
            ambiguous.append(token)
            return True
        for name, mask in tasks.items():
            if token.startswith(name + ":"):
                hits = np.flatnonzero(matches(token[len(name) + 1:]) & mask)
                if hits.size == 1:
                    found.add(int(hits[0]))
                    return True
        return False

    for entry in requested:
        entry = str(entry)
        if one(entry):
            continue
        parts = [p.strip() for p in entry.split(",") if p.strip()]
        for p in parts if "," in entry else [entry]:
            if not one(p):
                unknown.append(p)
    if ambiguous:
        names = list(tasks)
        raise UsageError(f"{param('exclude')}: sample id(s) {ambiguous[:5]} occur in both tasks; write "
                         f"'{names[0]}:ID' or '{names[1]}:ID'")
    if unknown:
        raise UsageError(f"{param('exclude')}: {len(unknown)} id(s) are not among the run's scored samples: {unknown[:5]}"
                         f"{' …' if len(unknown) > 5 else ''} (e.g. {', '.join(ids[:3])}; samples skipped for "
                         "non-finite gradients are not in the scores)")
    return np.array(sorted(found), dtype=np.int64)


def without_samples(scores: xr.Dataset, drop: np.ndarray) -> xr.Dataset:
    """The scores dataset with the pooled rows `drop` removed: their rows and columns of the
    pooled matrices and of the A×B blocks; n_a / n_b follow. Needs ≥ 2 samples left per task
    (the within-task means of the effect sizes take pairs of different samples)."""
    if not any(S.pooled_name(s) in scores for s in S.SCORES):
        raise UsageError(f"{param('exclude')} recomputes the statistics from the stored pair scores, and this run stored none "
                         f"(score.keep_pairs = {scores.attrs.get('keep_pairs')!r}); rerun with keep_pairs = \"all\" to "
                         "leave samples out afterwards, or drop them from the task files")
    is_a = np.asarray(scores[S.IS_A].values, dtype=bool)
    keep = np.ones(is_a.size, dtype=bool)
    keep[np.asarray(drop, dtype=np.int64)] = False
    left_a, left_b = int((keep & is_a).sum()), int((keep & ~is_a).sum())
    if min(left_a, left_b) < 2:
        raise UsageError(f"{param('exclude')} leaves {left_a} sample(s) of task {scores.attrs.get(S.ATTR_TASK_A)!r} and {left_b} of "
                         f"{scores.attrs.get(S.ATTR_TASK_B)!r}; the statistics need at least 2 per task")
    idx = np.flatnonzero(keep)
    sums = [v for v in scores.data_vars if v.startswith(S.stat_sums_name(""))]  # reduced over every sample: not these
    out = scores.drop_vars(sums).isel({S.SAMPLE_I: idx, S.SAMPLE_J: idx, S.SAMPLE_A: np.flatnonzero(keep[is_a]),
                                       S.SAMPLE_B: np.flatnonzero(keep[~is_a])})
    out.attrs.update({S.ATTR_N_A: left_a, S.ATTR_N_B: left_b})
    out.attrs.pop(S.ATTR_SUMS_SETTINGS, None)
    return out


def format_head_diagnostics(result: dict, blk: dict):
    """A rich renderable of one block's `diagnostics` entry in `qkov query`'s result: the
    slice's health line, a warning when flagged samples dominate its top pairs, and the samples
    that interfere most in each direction. None when the run has no diagnostics."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    dg = blk.get("diagnostics")
    if not dg:
        return None
    h = dg["health"]
    fmt = lambda x, spec=".3g": "–" if x is None else format(x, spec)  # noqa: E731
    kv = f" (kv {blk['kv_head']})" if blk.get("kv_head") is not None else ""
    line = Text(f"{blk['block']}{kv} health: Fisher min/median/max {fmt(h[S.FISHER_MIN])} / {fmt(h[S.FISHER_MEDIAN])} / "
                f"{fmt(h[S.FISHER_MAX])}, λ {fmt(h[S.DAMPING])}; λ > Î on {100 * (h[S.DAMPED_SHARE] or 0):.1f}% of "
                f"{h[S.N_PARAMS]} entries; effective dimension Σ Î/(Î+λ) = {fmt(h[S.EFFECTIVE_DIM], '.1f')}")
    parts: list = [line]
    if h[S.ILL_CONDITIONED]:
        parts.append(Text("  ill-conditioned: damping exceeds the Fisher on most of this slice, so its scores are "
                          "mostly 1/λ-weighted gradient products, not Fisher-normalised ones", style="bold yellow"))
    if dg["warning"]:
        parts.append(Text("  warning: " + dg["warning"], style="bold yellow"))
    elif dg["flagged"]:
        parts.append(Text(f"  {len(dg['flagged'])} sample(s) flagged as norm outliers here: "
                          + ", ".join(f"{f['task']}:{f['sample']} (z {fmt(f['outlier_score'], '.1f')})" for f in dg["flagged"][:5])))
    if result.get("excluded_samples") and blk is result["blocks"][0]:
        parts.insert(0, Text(f"statistics above computed without {len(result['excluded_samples'])} excluded sample(s): "
                             + ", ".join(result["excluded_samples"]) + " (qkov stats --exclude)", style="italic"))
    a, b = result["tasks"]["a"], result["tasks"]["b"]
    for key, who, whom in (("b_on_a", b, a), ("a_on_b", a, b)):
        rows = dg[key]
        if not rows:
            continue
        t = Table(title=Text(f"{blk['block']} · {who} samples that interfere most with {whom} (mean M[{whom} sample, this "
                             f"sample] over {whom}; higher = its gradient lands more on weights {whom} depends on)"),
                  title_justify="left")
        for col in ("sample", f"interferes with {whom}", f"hit by {whom}", "‖g‖", "√A_ii", "outlier z"):
            t.add_column(Text(col), justify="left" if col == "sample" else "right")
        for r in rows:
            t.add_row(Text(r["sample"]), fmt(r["col_mean"], ".4g"), fmt(r["row_mean"], ".4g"), fmt(r["grad_norm"]),
                      fmt(r["fisher_norm"]), Text(fmt(r["outlier_score"], ".1f") + (" ⚑" if r["outlier"] else "")))
        parts.append(t)
    return Group(*parts)
