"""Reading a run's `diagnostics` back: one slice's health and the samples that dominate it
(`qkov query`), the run-wide summary (`qkov report`) and its rendering. The rules that flag
slices and samples are defined here, once, for the stage that writes them and for readers.
A reader's helper: imports no stage."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xarray as xr

from . import schema as S
from .store import RunStore

OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut for the modified z-score
ILL_SHARE = 0.5  # ill_conditioned when λ exceeds Î on more than this share of the slice
ILL_RULE = (f"ill_conditioned = damped_share > {ILL_SHARE}: lambda exceeds the Fisher on most of the slice "
            "(its median Fisher is below lambda), so the slice's scores are weighted mostly by 1/lambda, "
            "not by the curvature")
OUTLIER_RULE = (f"outlier = outlier_score > {OUTLIER_Z}; outlier_score = max of the modified z-scores "
                "0.6745 (x - median) / MAD of x = log grad_norm and x = log fisher_norm among the samples of "
                "the same task in the slice (MAD = 0: 1.2533 x mean absolute deviation instead)")

HEALTH_VARS = (S.FISHER_MIN, S.FISHER_MEDIAN, S.FISHER_MAX, S.DAMPED_SHARE, S.EFFECTIVE_DIM)


def open_diagnostics(store: RunStore) -> xr.Dataset | None:
    """The run's `diagnostics` (loaded), or None for a run written before they were recorded."""
    if not store.is_complete(S.DIAGNOSTICS):
        return None
    return store.open_dataset(S.DIAGNOSTICS, "reading diagnostics").load()



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
