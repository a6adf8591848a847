"""`qkov report`: what the statistics answer, drawn so that it cannot be misread, in one page.

The page answers three questions, each with its own numbers (docs/results.md, "Which number
answers which question"): where the tasks *conflict* (alignment: the transfer test against 0,
drawn as the cosine of the task-mean gradients), which heads they *share* (interference:
`sharing`, the geometric mean of both directions' ratios, in which each task's gradient size
cancels; 1 = the tasks load the weights alike, → 0 = separated) and where they *differ* from
chance (the label-permutation test, drawn as the effect relative to chance). The effect maps
(differ, conflict) use a diverging, colour-blind-safe ColorBrewer scale centred on the
neutral value; sharing, which lives in [0, ~1] with no neutral middle, a sequential one from
its smallest to its largest value. One scale is shared by the Q/K/V/O panels, so colour and
the ▲/▼ marks always agree, and on the effect maps a cell whose own test is not significant
is muted (pale, hatched): the deepest colours sit only on significant heads. Raw means are a
collapsed extra with per-block scales. "Evidence per block" plots each table's own test: the
transfer test behind conflict/synergy, the label-permutation test behind "differ".

Files: `report.html` (one self-contained page: inline CSS, SVG and script, the data as
embedded JSON, no network), each figure as a 300-dpi PNG and an SVG for papers, and
`run_info.json`. The page is interactive: hovering a cell shows its mean, chance, effect
with CI and q; clicking it shows the head's top sample pairs (embedded, with `qkov query`'s
outlier warning) and, for alignment, the samples that drive a conflict most; tables sort by
any column and filter by block, layer, head and significance. Machine paths are never
written: the run is named relative to the report folder, other files by their name.

A run of more than two tasks gets this report per task pair (`<out>/<x>-<y>/`, from the pair's
sub-run) and an overview `index.html`: per pair the counts of conflict and synergy slices and
of slices whose cross-task interference is above / below chance, by the pair's own tests (BH within the pair), the heads where pairs conflict,
and the statistics' settings; its numbers also in `overview.json`.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot), so making a report
never switches the backend of the caller's session (e.g. a notebook); user text (task names)
is never read as mathtext or LaTeX. K/V are drawn per KV head: under GQA/MQA the query heads
of a group share one K/V slice, which is one test in the family, so one column per KV head
shows each test once.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, to_hex
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from . import schema
from .errors import UsageError, option
from .schema import STATS_VARS as V
from .query import (QUESTIONS, describe_values, direction_words, head_label, headline_cells, headline_tables,
                    headline_title, slice_table)
from .store import RunStore, local_path

REPORT_HTML = "report.html"
DPI = 300  # written figures (papers, slides); the page draws its own SVG
SCREEN_DPI = 110
NAN_COLOUR = "#d9d9d9"  # no statistic: neutral grey, distinct from every colour of the maps

# The heatmaps. Each: the score it reads, the value drawn, the ColorBrewer map (colour-blind
# safe; red = the "worse" end: more interference than chance, conflict), the words at both
# ends, what the marks mean, the flag variable of the map's own test (marks and muting) and
# whether the scale is sequential (sharing: no neutral middle) instead of centred.
HEATMAPS: dict[str, dict[str, Any]] = {
    "differ": {
        "score": "interference",
        "title": "Where the tasks differ: cross-task interference vs chance",
        "value": "(mean − chance) / chance of the A×B interference, in % (chance = the exact mean over all label permutations)",
        "cbar": "interference vs chance (%)",
        "cmap": "RdBu_r", "low": "less than random pairs", "high": "more than random pairs",
        "marks": ("significantly above chance (q ≤ α)", "significantly below chance (q ≤ α)"),
        "flag": V.direction, "test": "the label-permutation test",
        "nan": "no value",
    },
    "sharing": {
        "score": "interference",
        "title": "Which heads the tasks share: sharing",
        "value": "sharing = √(sharing_ab · sharing_ba), the geometric mean of both directions' interference ratios "
                 "(mean over A×B / a task's own mean over pairs of different samples), in which each task's gradient "
                 "size cancels: 1 = the tasks' gradients fall on the weights alike (as one task's would), → 0 = "
                 "disjoint weights",
        "cbar": "sharing (unitless)",
        "cmap": "YlGnBu", "sequential": True, "low": "separated (→ 0)", "high": "shared (1 = alike)",
        "marks": None,
        "flag": None, "test": None,
        "nan": "no value (a task's own mean interference is not positive)",
    },
    "conflict": {
        "score": "alignment",
        "title": "Where the tasks conflict: cosine of the task-mean gradients",
        "value": "cosine of ḡ_A and ḡ_B in the (Î+λ)⁻¹ metric (transfer / the task-mean norms)",
        "cbar": "cosine (alignment)",
        "cmap": "RdBu", "low": "conflict (a step on B raises A's loss)", "high": "synergy",
        "marks": ("significant synergy (transfer q ≤ α)", "significant conflict (transfer q ≤ α)"),
        "flag": V.transfer_direction, "test": "the transfer test",
        "nan": "no direction (a task's mean gradient is indistinguishable from 0 here)",
    },
}
MUTE = 0.8  # a not-significant cell keeps 20% of its colour over white: never the deepest on the map
MUTE_EDGE = "#8c959f"  # its hatching
RAW_LABEL = {
    "interference": "mean interference M (≥ 0)",
    "alignment": "mean alignment A (signed)",
}


# ---------------------------------------------------------------- data shaping (pure)


def block_columns(stats: xr.Dataset, block: str) -> dict[str, Any]:
    """The columns one block is drawn with: every head for Q/O; one column per KV head for
    K/V under GQA/MQA (its first query head stands for it). Returns head indices (positions
    along `head`), column labels, x label, KV groups (or None) and layers."""
    heads = stats[schema.HEAD].values
    kv = stats[schema.KV_HEAD].values if schema.KV_HEAD in stats.coords else heads
    cols = np.arange(heads.size)
    groups = None
    if schema.head_dim(block) == schema.KV_HEAD and np.unique(kv).size < heads.size:
        fam = np.asarray(stats[V.in_family].sel({schema.BLOCK: block}).values, dtype=bool)
        cols = np.flatnonzero(fam)
        groups = [[int(h) for h in heads[kv == kv[c]]] for c in cols]
    return {
        "cols": cols,
        "heads": [int(heads[c]) for c in cols],
        "labels": [int(kv[c]) for c in cols] if groups else [int(heads[c]) for c in cols],
        "xlabel": "KV head" if groups else "head",
        "groups": groups,
        "layers": [int(x) for x in stats[schema.LAYER].values],
    }


def slice_id(block: str, layer: int, head: int) -> str:
    """A slice's key in the page (anchors, embedded data): block-layer-head (K/V: the first
    query head of its KV group)."""
    return f"{block}-{layer}-{head}"


def _matrix(stats: xr.Dataset, var: str, score: str | None, block: str, cols: np.ndarray) -> np.ndarray:
    if var not in stats:
        return np.full((stats.sizes[schema.LAYER], cols.size), np.nan)
    v = stats[var]
    if schema.SCORE in v.dims:
        v = v.sel({schema.SCORE: score})
    return np.asarray(v.sel({schema.BLOCK: block}).transpose(schema.LAYER, schema.HEAD).values, dtype=float)[:, cols]


def sharing_of(stats: xr.Dataset) -> xr.DataArray | None:
    """`sharing` per (block, layer, head): the stored variable; for statistics written before
    it, √(sharing_ab · sharing_ba) from the stored directions (the same number: each task's
    gradient size cancels). None when the run has neither."""
    if V.sharing in stats:
        return stats[V.sharing]
    if V.sharing_ab in stats and V.sharing_ba in stats:
        with np.errstate(invalid="ignore"):
            return np.sqrt(stats[V.sharing_ab] * stats[V.sharing_ba])
    return None


def heatmap_data(stats: xr.Dataset, kind: str) -> dict[str, Any] | None:
    """What one heatmap draws, per block: values, marks (+1 ▲ / −1 ▼ / 0), `muted` (finite
    cells whose own test is not significant; none for sharing, which has no test), slice ids;
    and the one colour scale all blocks share (effect maps: symmetric about the neutral value,
    which is 0 on the drawn scale; sharing: from its smallest to its largest value). None
    when the run lacks the variables."""
    spec = HEATMAPS[kind]
    score = spec["score"]
    if score not in [str(s) for s in stats[schema.SCORE].values]:
        return None
    share = sharing_of(stats) if kind == "sharing" else None
    panels = {}
    for b in (str(x) for x in stats[schema.BLOCK].values):
        c = block_columns(stats, b)
        cols = c["cols"]
        if kind == "differ":
            mean, null = _matrix(stats, V.mean, score, b, cols), _matrix(stats, V.null_mean, score, b, cols)
            eff = _matrix(stats, V.effect, score, b, cols) if V.effect in stats else mean - null
            with np.errstate(divide="ignore", invalid="ignore"):
                v = 100.0 * eff / np.abs(mean - eff)  # chance = mean − effect, as in the tables
        elif kind == "sharing":
            v = (np.full((stats.sizes[schema.LAYER], cols.size), np.nan) if share is None else
                 np.asarray(share.sel({schema.BLOCK: b}).transpose(schema.LAYER, schema.HEAD).values, dtype=float)[:, cols])
        else:
            v = _matrix(stats, V.cosine, None, b, cols)
        marks = np.zeros(v.shape, dtype=int)
        if spec["flag"] == V.direction:
            if V.direction in stats:
                marks = np.nan_to_num(_matrix(stats, V.direction, score, b, cols)).astype(int)
            else:  # statistics written before `direction`: significant, signed by the effect
                sig = np.nan_to_num(_matrix(stats, V.significant, score, b, cols)) > 0
                marks = np.where(sig, np.sign(np.nan_to_num(v)), 0).astype(int)
        elif spec["flag"]:
            marks = np.nan_to_num(_matrix(stats, spec["flag"], None, b, cols)).astype(int)
        muted = np.isfinite(v) & (marks == 0) if spec["flag"] else np.zeros(v.shape, dtype=bool)
        panels[b] = {**c, "values": v, "marks": marks, "muted": muted,
                     "ids": [[slice_id(b, layer, h) for h in c["heads"]] for layer in c["layers"]]}
    every = np.concatenate([p["values"].ravel() for p in panels.values()])
    every = every[np.isfinite(every)]
    if every.size == 0:
        # every cosine undefined (no task-mean direction anywhere) is an answer to draw: grey
        # cells with their transfer marks; a run without the variable is not
        if kind != "conflict" or V.cosine not in stats:
            return None
        every = np.array([1.0])
    if spec.get("sequential"):
        # where the values live: a scale from 0 to 1 would paint a run whose sharing spans
        # 0.93–1.0 in one colour; the bar's ticks say where the values sit
        lo, hi = float(every.min()), float(every.max())
        if hi - lo < 1e-3 * max(abs(hi), 1e-12):
            lo, hi = lo - 0.05 * max(abs(lo), 1e-3), hi + 0.05 * max(abs(hi), 1e-3)
        return {"kind": kind, **spec, "panels": panels, "vmin": lo, "vmax": hi, "clipped": False}
    mag = np.abs(every)
    lim = float(mag.max()) or 1.0
    # one outlying cell must not wash out every other: beyond 1.5× the 98th percentile of
    # |value| the scale stops there, the outliers take the end colours and the bar says ≤ / ≥
    robust = float(np.percentile(mag, 98)) if mag.size >= 50 else lim
    clipped = 0 < robust and lim > 1.5 * robust
    if clipped:
        lim = robust
    if kind == "conflict":
        lim = min(lim, 1.0)
    return {"kind": kind, **spec, "panels": panels, "vmin": -lim, "vmax": lim, "clipped": clipped}


def _mute(rgb: tuple) -> tuple:
    return tuple((1 - MUTE) * float(x) + MUTE for x in rgb[:3])


def colour_of(data: dict[str, Any]):
    """(value, muted=False) → hex colour on the heatmap's shared scale (NaN → grey; muted: the
    colour kept at 1 − MUTE over white); the page and the written figures use this same map."""
    cmap = matplotlib.colormaps[data["cmap"]]
    norm = Normalize(data["vmin"], data["vmax"])

    def f(v: float, muted: bool = False) -> str:
        if not np.isfinite(v):
            return NAN_COLOUR
        rgb = cmap(norm(v))
        return to_hex(_mute(rgb) if muted else rgb)
    return f


def tick_label(kind: str, v: float, edge: int = 0) -> str:
    """What a colour-bar tick at drawn value v reads: %, the sharing ratio or a cosine; `edge`
    −1 / +1 marks the ends of a clipped scale (≤ / ≥)."""
    if kind == "sharing":
        text = f"{v:.3g}"
    elif kind == "differ":
        text = f"{v:+.3g}%" if v else "0 (chance)"
    else:
        text = f"{v:+.2g}" if v else "0"
    return {-1: "≤ ", 1: "≥ "}.get(edge, "") + text


def _group_note(kv_heads: list[int], groups: list[list[int]]) -> str:
    """'KV 0: q-heads 0–3; KV 1: q-heads 4–7' (contiguous groups as ranges)."""
    spans = [f"{g[0]}–{g[-1]}" if len(g) > 1 and g == list(range(g[0], g[-1] + 1)) else ",".join(map(str, g)) for g in groups]
    return "; ".join(f"KV {k}: q-heads {s}" for k, s in zip(kv_heads, spans))


def _ticks(n: int, cell: float, label_inches: float) -> np.ndarray:
    """Every k-th index so that tick labels (about label_inches each) do not overlap."""
    step = max(1, int(np.ceil(label_inches / cell)))
    return np.arange(0, n, step)


# ---------------------------------------------------------------- written figures


def _label_panel(ax, panel: dict, block: str, n_layers: int, cell: float) -> None:
    """Ticks, axis labels and title of one block's layer × head panel (every heatmap draws them alike)."""
    xt, yt = _ticks(len(panel["cols"]), cell, 0.24), _ticks(n_layers, cell, 0.15)
    ax.set_xticks(xt, [str(panel["labels"][i]) for i in xt])
    ax.set_yticks(yt, [str(panel["layers"][i]) for i in yt])
    ax.set_xlabel(panel["xlabel"])
    ax.set_ylabel("layer")
    ax.tick_params(labelsize=8)
    ax.set_title(block + ("\n(per KV head)" if panel["groups"] else ""), fontsize=10)


def _cell_inches(n_layers: int, n_cols: int) -> float:
    # cells shrink for big models so the figure stays about page-sized
    return float(min(0.34, 9.0 / max(n_layers, 1), 11.0 / max(n_cols, 1)))


MARK_STYLE = {1: dict(marker="^", color="white", markeredgecolor="black", linestyle="none"),
              -1: dict(marker="v", color="white", markeredgecolor="black", linestyle="none")}


def _mute_overlay(ax, muted: np.ndarray) -> None:
    """Pale and hatch the not-significant cells of a panel drawn by imshow: white at MUTE over
    them (so the figure's colour is `colour_of(…)(v, muted=True)`), thin hatching on top."""
    if not muted.any():
        return
    over = np.zeros(muted.shape + (4,))
    over[muted] = (1.0, 1.0, 1.0, MUTE)
    ax.imshow(over, aspect="auto", interpolation="nearest")
    rows, cols = np.nonzero(muted)
    ax.add_collection(PatchCollection([Rectangle((c - 0.5, r - 0.5), 1, 1) for r, c in zip(rows, cols)],
                                      facecolor="none", edgecolor=MUTE_EDGE, linewidth=0, hatch="////"))


def _scale_words(data: dict[str, Any]) -> str:
    if data.get("sequential"):
        return "; one sequential scale for all blocks, from the smallest to the largest value (no test: no muting)"
    return (f"; one scale for all blocks, centred on the neutral value; pale, hatched = not significant by "
            f"{data['test']} (q > α), so the deepest colours sit only on significant heads")


def effect_figure(data: dict[str, Any], tasks: tuple[str, str], notes: list[str]) -> Figure:
    """One row of layer × head panels (one per block) on the shared scale, one colour bar whose
    ends say what they mean, ▲/▼ on significant cells, not-significant cells muted (pale,
    hatched), a legend saying the same."""
    panels = data["panels"]
    blocks = list(panels)
    n_layers = len(next(iter(panels.values()))["layers"])
    cell = _cell_inches(n_layers, sum(len(p["cols"]) for p in panels.values()))
    widths = [max(len(p["cols"]) * cell, 0.6) + 0.6 for p in panels.values()]
    fig = Figure(figsize=(max(sum(widths) + 2.2, 7.0), n_layers * cell + 3.1), dpi=SCREEN_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(blocks), width_ratios=widths, squeeze=False)[0]
    cmap = matplotlib.colormaps[data["cmap"]].with_extremes(bad=NAN_COLOUR)
    marker_size = float(np.clip(cell * 72 * 0.45, 3.0, 9.0))
    im = None
    for ax, b in zip(axes, blocks):
        p = panels[b]
        im = ax.imshow(p["values"], cmap=cmap, vmin=data["vmin"], vmax=data["vmax"], aspect="auto",
                       interpolation="nearest")
        _mute_overlay(ax, p["muted"])
        for sign, style in MARK_STYLE.items():
            rows, cols = np.nonzero(p["marks"] == sign)
            ax.plot(cols, rows, markersize=marker_size, markeredgewidth=1.0, **style)
        _label_panel(ax, p, b, n_layers, cell)
    clipped = data.get("clipped", False)
    cb = fig.colorbar(im, ax=list(axes), shrink=0.9, aspect=25, pad=0.02, extend="both" if clipped else "neither")
    ticks = np.linspace(data["vmin"], data["vmax"], 5)
    edges = [-1, 0, 0, 0, 1] if clipped else [0] * 5
    cb.set_ticks(ticks, labels=[tick_label(data["kind"], float(t), e) for t, e in zip(ticks, edges)])
    cb.set_label(data["cbar"], fontsize=8)
    cb.ax.tick_params(labelsize=7)
    # what the two ends mean, at the ends
    cb.ax.text(0.5, 1.06 if clipped else 1.02, textwrap.fill("↑ " + data["high"], 18), transform=cb.ax.transAxes, ha="center", va="bottom", fontsize=6.5)
    cb.ax.text(0.5, -0.06 if clipped else -0.02, textwrap.fill("↓ " + data["low"], 18), transform=cb.ax.transAxes, ha="center", va="top", fontsize=6.5)
    # task names are the user's text: never mathtext ("a$b_c^d")
    fig.suptitle(f"{data['title']} ({tasks[0]} × {tasks[1]}), by layer × head", fontsize=11, parse_math=False)
    handles, labels = [], []
    if data["marks"]:
        for sign, text in zip((1, -1), data["marks"]):
            handles.append(Line2D([], [], markersize=7, markeredgewidth=1.0, **MARK_STYLE[sign]))
            labels.append(text)
    if any(p["muted"].any() for p in panels.values()):
        handles.append(Rectangle((0, 0), 1, 1, facecolor=_mute((0.6, 0.6, 0.6)), edgecolor=MUTE_EDGE, hatch="////", linewidth=0))
        labels.append(f"not significant by {data['test']} (pale, hatched)")
    if any((~np.isfinite(p["values"])).any() for p in panels.values()):
        handles.append(Rectangle((0, 0), 1, 1, facecolor=NAN_COLOUR, linewidth=0))
        labels.append("grey: " + data["nan"])
    text = textwrap.fill("colour: " + data["value"] + _scale_words(data)
                         + ("; it stops at the 98th percentile of |value|, cells beyond take the end colours"
                            if clipped else ""), 130)
    for n in notes:
        text += "\n" + textwrap.fill(n, 130)
    handles.append(Line2D([], [], linestyle="none"))
    labels.append(text)
    fig.legend(handles, labels, loc="outside lower center", frameon=False, fontsize=7, ncols=1)
    return fig


def _evidence_panels(stats: xr.Dataset, differ_scores: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each headline table's own test, as the evidence figure plots it: conflict/synergy → the
    transfer test (transfer_q_value, transfer_direction: −1 conflict / +1 synergy); differ →
    the label-permutation test of each differ score (q_value, direction: ±1 above/below
    chance). Sharing has no test."""
    scores = [str(s) for s in stats[schema.SCORE].values]
    out = []
    if "alignment" in scores and V.transfer_q_value in stats:
        out.append({"title": "conflict / synergy (alignment): transfer test vs 0, two-sided",
                    "q": V.transfer_q_value, "flag": V.transfer_direction, "score": None,
                    "labels": {-1: ("conflict (transfer < 0)", "#b2182b"), 1: ("synergy (transfer > 0)", "#2166ac")},
                    "floor": False})
    for score in differ_scores:
        if score in scores:
            alt = stats.attrs.get("alternative") or "?"
            out.append({"title": f"differ ({score}): mean vs chance, label-permutation test ({alt})",
                        "q": V.q_value, "flag": V.direction if V.direction in stats else V.significant, "score": score,
                        "labels": {1: ("above chance", "#b2182b"), -1: ("below chance", "#2166ac")}, "floor": True})
    return out


def evidence_figure(stats: xr.Dataset, differ_scores: tuple[str, ...] = ("interference",)) -> Figure:
    """−log10 BH q of every family slice, per block, for each headline table's own test
    (`_evidence_panels`), coloured by the direction the table reads; α and, for the
    permutation test, the smallest attainable p."""
    panels = _evidence_panels(stats, differ_scores)
    blocks = [str(b) for b in stats[schema.BLOCK].values]
    alpha = float(stats.attrs.get("alpha", 0.05))
    n_perm = stats.attrs.get("n_permutations")
    fig = Figure(figsize=(5.4 * max(len(panels), 1) + 0.6, 4.6), dpi=SCREEN_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(panels), 1), sharey=True, squeeze=False)[0]
    rng = np.random.default_rng(0)  # fixed jitter: the same run gives the same picture
    floor = np.log10(1 + n_perm) if n_perm else None
    top = -np.log10(alpha)
    fam_all = np.asarray(stats[V.in_family].transpose(schema.BLOCK, schema.HEAD).values, dtype=bool)
    handles, labels = {}, {}
    for ax, pan in zip(axes, panels):
        for i, b in enumerate(blocks):
            fam = fam_all[i]
            q = _matrix(stats, pan["q"], pan["score"], b, np.flatnonzero(fam)).ravel()
            d = np.nan_to_num(_matrix(stats, pan["flag"], pan["score"], b, np.flatnonzero(fam)).ravel())
            if pan["flag"] == V.significant:  # statistics written before `direction`
                eff = _matrix(stats, V.mean, pan["score"], b, np.flatnonzero(fam)).ravel() - \
                    _matrix(stats, V.null_mean, pan["score"], b, np.flatnonzero(fam)).ravel()
                d = np.where(d > 0, np.sign(np.nan_to_num(eff)), 0)
            y = -np.log10(np.clip(q, 1e-300, 1.0))
            top = max(top, float(np.nanmax(y)) if np.isfinite(y).any() else 0.0)
            x = i + rng.uniform(-0.22, 0.22, y.size)
            ns = d == 0
            handles["ns"] = ax.scatter(x[ns], y[ns], s=14, color="#9e9e9e", alpha=0.8, linewidths=0)
            labels["ns"] = "not significant"
            for sign, (word, colour) in pan["labels"].items():
                m = d == sign
                h = ax.scatter(x[m], y[m], s=22, color=colour, edgecolors="black", linewidths=0.5,
                               marker="v" if sign < 0 else "^")
                if m.any() or (pan["title"], sign) not in labels:
                    handles[(pan["title"], sign)], labels[(pan["title"], sign)] = h, word
            ax.annotate(f"{int((d != 0).sum())}/{d.size}", (i, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, -4), textcoords="offset points", ha="center", va="top", fontsize=8)
        ax.axhline(-np.log10(alpha), color="#b2182b", linestyle="--", linewidth=1)
        if floor and pan["floor"]:
            ax.axhline(floor, color="#555555", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_xlim(-0.6, len(blocks) - 0.4)
        ax.set_xlabel("block")
        ax.set_title(textwrap.fill(pan["title"], 80) + "\nBH q of each slice (significant / family)", fontsize=9)
        ax.grid(axis="y", color="#eeeeee")
    if not panels:
        axes[0].text(0.5, 0.5, "these statistics have no test to plot", ha="center", va="center", transform=axes[0].transAxes)
    axes[0].set_ylabel("−log10 q  (higher = stronger evidence)")
    axes[0].set_ylim(0, top * 1.18 + 0.05)
    hs = [handles[k] for k in handles if k != "ns"] + ([handles["ns"]] if "ns" in handles else [])
    ls = [labels[k] for k in handles if k != "ns"] + (["not significant"] if "ns" in handles else [])
    hs.append(Line2D([], [], color="#b2182b", linestyle="--"))
    ls.append(f"α = {alpha}")
    if floor and any(p["floor"] for p in panels):
        hs.append(Line2D([], [], color="#555555", linestyle=":"))
        ls.append(f"smallest attainable permutation p = 1/(1+{n_perm})")
    fig.legend(hs, ls, loc="outside lower center", ncols=min(len(ls), 4), frameon=False, fontsize=8)
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """PNG at 300 dpi, or SVG (text kept as text, no timestamp: the same run gives the same file).
    No text of a figure is parsed as mathtext or LaTeX (the caller's rcParams may ask for
    usetex): task names such as "a$b_c^d" are the user's text, shown as written."""
    for t in fig.findobj(Text):
        t.set_usetex(False)
        t.set_parse_math(False)
    buf = io.BytesIO()
    if fmt == "svg":
        fig.savefig(buf, format="svg", facecolor="white", metadata={"Date": None})
    else:
        fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


# ---------------------------------------------------------------- run information (I/O)


def shown_path(path: Any, out: Path | None, run_parent: Path | None) -> str | None:
    """A path as the page may show it: URLs as they are; a local path relative to the report
    folder when it lies beside the run (the run itself, files next to it), else only its
    last component after '…/'. The page never carries a machine's absolute paths."""
    if path in (None, ""):
        return None
    p = str(path)
    if (local := local_path(p)) is None:
        return p
    local = local.expanduser()
    if not local.is_absolute():
        return p if ".." not in local.parts else f"…/{local.name}"
    if out is not None and run_parent is not None:
        try:
            local.resolve().relative_to(run_parent.resolve())
            return os.path.relpath(local.resolve(), out.resolve())
        except ValueError:
            pass
    return f"…/{local.name}"


def _score_settings(score: dict) -> dict[str, Any]:
    """The [score] settings the header shows: the sketch's only in sketch mode (an exact run's
    config still carries the default sketch_dim, which described nothing it did)."""
    shown = ("mode", "sketch_dim", "sketch_seed", "storage_dtype", "include_bias") if score.get("mode") == "sketch" else (
        "mode", "storage_dtype", "include_bias")
    return {k: score[k] for k in shown if k in score}


def _loss_of(task: dict) -> str:
    """What each sample's loss averages, as the run's config recorded it (absent: every token)."""
    if task.get("loss", "all") == "completion":
        return "completion tokens only (the prompt is context, labels -100)"
    return "every next token"


def _task_name(store: RunStore, grads: dict, which: str) -> str | None:
    """Task A's ("a") or B's name: as extracted (a pair's sub-run: as its scores record it, the
    gradients being the whole run's), else as configured."""
    attrs = grads if store.parent is None else (store.group_attrs(schema.SCORES_GROUP) or {})
    return attrs.get(schema.ATTR_TASK_A if which == "a" else schema.ATTR_TASK_B) or store.task_config(which).get("name")


def run_info(store: RunStore, stats: xr.Dataset, stats_group: str = schema.STATS, out: Path | None = None) -> dict[str, Any]:
    """What the page header shows: model, tasks, sample counts, settings, provenance (paths as
    `shown_path` writes them, relative to `out`)."""
    grads = store.group_attrs(schema.GRADIENTS) or {}
    prov = store.provenance(schema.GRADIENTS)
    cfg = prov.get("config") or store.config()
    model = cfg.get("model", {})
    layout = prov.get("layout", {})
    fisher = store.group_attrs(schema.FISHER) or {}
    # a pair's sub-run lies inside its run: paths beside the run are shown as for a two-task run
    parent = None if (lp := local_path(store.base.path)) is None else lp.expanduser().resolve().parent
    where = lambda p: shown_path(p, out, parent)  # noqa: E731
    task = lambda w: {"name": _task_name(store, grads, w), "path": where(store.task_config(w).get("path")),  # noqa: E731
                      "n": stats.attrs.get(schema.ATTR_N_A if w == "a" else schema.ATTR_N_B),
                      "loss": _loss_of(store.task_config(w))}
    return {
        "run": where(store.path),
        "model": model.get("name") or where(model.get("path")) or "?",
        "model_class": layout.get("model_class"),
        "dtype": model.get("dtype"),
        "weights_hash": grads.get(schema.ATTR_WEIGHTS_HASH),
        "heads": f"{layout.get('n_heads', '?')} query heads, {layout.get('n_kv_heads', '?')} KV heads, "
                 f"head_dim {layout.get('head_dim', '?')}",
        "layers": describe_values([int(x) for x in stats[schema.LAYER].values]) + f" (of {layout.get('n_layers', '?')})",
        "task_a": task("a"),
        "task_b": task("b"),
        "skipped": list(grads.get(schema.ATTR_SKIPPED_SAMPLES, [])),
        "max_length": model.get("max_length"),
        "fisher": {k: fisher.get(k) for k in ("source", "beta", "batch_size", "damping_rel", "damping_abs") if k in fisher},
        "score": _score_settings(cfg.get("score", {})),
        "stats": {k: stats.attrs.get(k) for k in ("null", "alternative", "n_permutations", "n_bootstrap", "alpha",
                                                 "ci_level", "seed", "family_size") if k in stats.attrs},
        "stats_group": stats_group,
        "stats_created": (stats.attrs.get(schema.ATTR_PROVENANCE) or {}).get("created"),
        "config_hash": prov.get("config_hash"),
        "created": prov.get("created"),
        "versions": prov.get("versions", {}),
    }


PREVIEW_CHARS = 160


def top_pairs_by_slice(store: RunStore, stats: xr.Dataset, n: int = 5, budget: int = 200_000_000) -> dict[str, Any]:
    """The page's embedded pairs: per family slice and score, the n highest interference pairs
    and the n most negative alignment pairs (conflicting: a natural-gradient step on j raises
    i's loss), as [index into A, index into B, value]; the samples once, with a text preview.

    Reads each (block, layer) of `scores` once. Above `budget` pair values in all, no pairs
    are embedded (the page then points to `qkov query`)."""
    from .query import _sample_info

    scores = store.open_scores()
    present = [s for s in schema.SCORES if s in scores and s in [str(x) for x in stats[schema.SCORE].values]]
    n_a, n_b = scores.sizes[schema.SAMPLE_A], scores.sizes[schema.SAMPLE_B]
    blocks = [str(b) for b in stats[schema.BLOCK].values]
    layers = [int(x) for x in stats[schema.LAYER].values]
    cols = {b: block_columns(stats, b) for b in blocks}
    n_slices = sum(len(c["cols"]) for c in cols.values()) * len(layers)
    task_a, task_b = str(scores.attrs[schema.ATTR_TASK_A]), str(scores.attrs[schema.ATTR_TASK_B])
    info = _sample_info(store)
    result = {"n": n, "samples": {"a": _previews(info, scores[schema.SAMPLE_A].values, task_a),
                                   "b": _previews(info, scores[schema.SAMPLE_B].values, task_b)}, "pairs": {},
              "marginals": conflict_marginals(scores, stats)}
    if n <= 0 or n_slices * n_a * n_b * len(present) > budget:
        result["n"] = 0
        return result
    where = (blocks, layers, cols)
    _kept_top_pairs(result["pairs"], scores, stats, where, [s for s in map(str, stats[schema.SCORE].values) if s not in present], n)
    _matrix_top_pairs(result["pairs"], scores, where, present, min(n, n_a * n_b))
    result["warnings"] = outlier_warnings(store, scores, result["pairs"])
    return result


def _previews(info: dict, ids, task: str) -> list[list[str]]:
    """[id, text preview] per sample of one task."""
    out = []
    for i in ids:
        s = info.get((task, str(i)), {})
        text = s.get("text")
        prev = (f"(pre-tokenised, {s.get('n_tokens')} tokens)" if s.get("pretokenised") or text is None
                else " ".join(text.split())[:PREVIEW_CHARS])
        out.append([str(i), prev])
    return out


def _kept_top_pairs(pairs: dict, scores: xr.Dataset, stats: xr.Dataset, where: tuple, kept: list[str], n: int) -> None:
    """Into `pairs`: of scores whose pair matrices the run did not keep (keep_pairs = "top" |
    "none"), the pairs `qkov query` lists."""
    from .errors import QkovError
    from .pairs import top_pairs

    blocks, layers, cols = where
    index = {"a": {str(x): i for i, x in enumerate(scores[schema.SAMPLE_A].values)},
             "b": {str(x): i for i, x in enumerate(scores[schema.SAMPLE_B].values)}}
    for score in kept:
        for b in blocks:
            for layer in layers:
                for h in cols[b]["heads"]:
                    try:
                        got = top_pairs(scores, layer, h, b, n, score)
                    except QkovError:  # fewer kept than asked, or none kept
                        continue
                    if got:
                        pairs.setdefault(slice_id(b, layer, h), {})[score] = [
                            [index["a"][p["sample_a"]], index["b"][p["sample_b"]], float(p[score])] for p in got]


def _matrix_top_pairs(pairs: dict, scores: xr.Dataset, where: tuple, present: list[str], k: int) -> None:
    """Into `pairs`: the k top pairs of each slice of the scores whose A×B matrices the run keeps."""
    blocks, layers, cols = where
    n_a, n_b = scores.sizes[schema.SAMPLE_A], scores.sizes[schema.SAMPLE_B]
    for b in blocks:
        heads = cols[b]["heads"]
        for layer in layers:
            for score in present:
                m = np.asarray(scores[score].sel({schema.BLOCK: b, schema.LAYER: layer})
                               .isel({schema.HEAD: cols[b]["cols"]})
                               .transpose(schema.HEAD, schema.SAMPLE_A, schema.SAMPLE_B).values, dtype=float)
                flat = (m if score == "interference" else -m).reshape(m.shape[0], -1)
                flat = np.where(np.isfinite(flat), flat, -np.inf)
                part = np.argpartition(-flat, k - 1, axis=1)[:, :k]
                for hi, h in enumerate(heads):
                    best = part[hi][np.argsort(-flat[hi, part[hi]], kind="stable")]
                    ia, ib = np.unravel_index(best, (n_a, n_b))
                    pairs.setdefault(slice_id(b, layer, h), {})[score] = [
                        [int(i), int(j), float(m[hi, i, j])] for i, j in zip(ia, ib)]


def conflict_marginals(scores: xr.Dataset, stats: xr.Dataset, top: int = 5) -> dict[str, dict]:
    """Per slice id of a significant conflict (transfer_direction = −1, family slices), the
    samples that drive it: `qkov query`'s alignment marginals (`query.alignment_marginals`:
    each sample's mean alignment with the other task's samples, the most negative first,
    with its question, units and direction)."""
    from .query import alignment_marginals

    if V.transfer_direction not in stats:
        return {}
    out = {}
    for b in (str(x) for x in stats[schema.BLOCK].values):
        c = block_columns(stats, b)
        d = _matrix(stats, V.transfer_direction, None, b, c["cols"])
        for li, hi in zip(*np.nonzero(d == -1)):
            layer, head = c["layers"][li], c["heads"][hi]
            m = alignment_marginals(scores, b, layer, head, top=top)
            if m is not None:
                out[slice_id(b, layer, head)] = m
    return out


def outlier_warnings(store: RunStore, scores: xr.Dataset, pairs: dict[str, dict[str, list]]) -> dict[str, dict[str, str]]:
    """Per slice id and score, `qkov query`'s warning that flagged norm outliers dominate the
    embedded top pairs (`diagnostics.head_diagnostics`, the same rule and words; the run
    written as RUN, never a machine path). Only slices whose pairs involve a flagged sample
    are asked: no other can warn."""
    from .health import head_diagnostics, open_diagnostics

    diag = open_diagnostics(store)
    if diag is None or not pairs:
        return {}
    ids_a, ids_b = [str(x) for x in scores[schema.SAMPLE_A].values], [str(x) for x in scores[schema.SAMPLE_B].values]
    flag = np.asarray(diag[schema.OUTLIER].transpose(schema.BLOCK, schema.LAYER, schema.HEAD, schema.SAMPLE_I).values, dtype=bool)
    d_ids = [str(x) for x in diag[schema.SAMPLE_I].values]
    d_is_a = np.asarray(diag[schema.IS_A].values, dtype=bool)
    pos = {str(b): k for k, b in enumerate(diag[schema.BLOCK].values)}
    lpos = {int(x): k for k, x in enumerate(diag[schema.LAYER].values)}
    hpos = {int(x): k for k, x in enumerate(diag[schema.HEAD].values)}
    out: dict[str, dict[str, str]] = {}
    for sid, per in pairs.items():
        b, layer, h = sid.split("-")
        f = flag[pos[b], lpos[int(layer)], hpos[int(h)]]
        fa = {d_ids[k] for k in np.flatnonzero(f & d_is_a)}
        fb = {d_ids[k] for k in np.flatnonzero(f & ~d_is_a)}
        for score, rows in per.items():
            shown = [{"sample_a": ids_a[i], "sample_b": ids_b[j]} for i, j, _ in rows]
            if not any(p["sample_a"] in fa or p["sample_b"] in fb for p in shown):
                continue
            w = head_diagnostics(diag, b, int(layer), int(h), shown, top=0, run="RUN")["warning"]
            if w:
                out.setdefault(sid, {})[score] = w
    return out


def _with_sharing(stats: xr.Dataset, t: dict[str, np.ndarray], score: str) -> dict[str, np.ndarray]:
    """A `slice_table` with `sharing` (and its CI where stored) from `sharing_of`, whatever
    the table computed itself."""
    from .query import _family_index

    if score != "interference":
        return t
    share = sharing_of(stats)
    idx = _family_index(stats)
    dims = (schema.BLOCK, schema.LAYER, schema.HEAD)
    for var, arr in ((V.sharing, share), (V.sharing_ci_low, stats.get(V.sharing_ci_low)),
                     (V.sharing_ci_high, stats.get(V.sharing_ci_high))):
        if arr is not None:
            t[var] = np.asarray(arr.transpose(*dims).values, dtype=float)[idx]
    return t


def slice_data(stats: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Per family slice (by `slice_id`) and score, the numbers the page's hover shows."""
    keys = {V.mean: "mean", "chance": "chance", V.effect: "effect", V.effect_ci_low: "lo", V.effect_ci_high: "hi",
            "effect_rel": "rel", V.q_value: "q", V.p_fwer: "pf", V.direction: "dir", V.ci_low: "mlo", V.ci_high: "mhi",
            V.sharing: "sh", V.sharing_ci_low: "shlo", V.sharing_ci_high: "shhi",
            V.sharing_ab: "sab", V.sharing_ab_ci_low: "sablo", V.sharing_ab_ci_high: "sabhi", V.sharing_ba: "sba",
            V.sharing_ba_ci_low: "sbalo", V.sharing_ba_ci_high: "sbahi", V.transfer: "tr", V.transfer_ci_low: "trlo",
            V.transfer_ci_high: "trhi", V.transfer_q_value: "trq", V.transfer_direction: "trdir", V.cosine: "cos",
            V.cosine_ci_low: "coslo", V.cosine_ci_high: "coshi", V.layer_q_value: "lq"}
    out: dict[str, dict[str, Any]] = {}
    for score in (str(s) for s in stats[schema.SCORE].values):
        t = _with_sharing(stats, slice_table(stats, score), score)
        for i in range(t["block"].size):
            sid = slice_id(str(t["block"][i]), int(t["layer"][i]), int(t["head"][i]))
            row = out.setdefault(sid, {"b": str(t["block"][i]), "l": int(t["layer"][i]), "h": int(t["head"][i]),
                                       "kv": int(t["kv_head"][i]) if t["kv_head"][i] >= 0 else None})
            vals = {}
            for var, short in keys.items():
                if var in t:
                    x = float(t[var][i])
                    vals[short] = None if not np.isfinite(x) else (round(x, 6) if short in ("dir", "trdir") else x)
            row[score] = vals
    return out


def raw_mean_figure(stats: xr.Dataset, score: str, tasks: tuple[str, str]) -> Figure:
    """The raw A×B means (optional, `raw_means=True`): one panel per block with its own scale,
    since the blocks' scores have different magnitudes; not compared with chance."""
    blocks = [str(b) for b in stats[schema.BLOCK].values]
    cols = {b: block_columns(stats, b) for b in blocks}
    n_layers = stats.sizes[schema.LAYER]
    cell = _cell_inches(n_layers, sum(len(c["cols"]) for c in cols.values()))
    widths = [max(len(c["cols"]) * cell, 0.9) + 1.3 for c in cols.values()]
    fig = Figure(figsize=(max(sum(widths) + 0.8, 7.0), n_layers * cell + 2.4), dpi=SCREEN_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(blocks), width_ratios=widths, squeeze=False)[0]
    for ax, b in zip(axes, blocks):
        c = cols[b]
        v = _matrix(stats, V.mean, score, b, c["cols"])
        if score == "alignment":
            lim = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
            im = ax.imshow(v, cmap=matplotlib.colormaps["RdBu"].with_extremes(bad=NAN_COLOUR), vmin=-(lim or 1.0),
                           vmax=lim or 1.0, aspect="auto", interpolation="nearest")
        else:
            im = ax.imshow(v, cmap=matplotlib.colormaps["viridis"].with_extremes(bad=NAN_COLOUR), aspect="auto",
                           interpolation="nearest")
        _label_panel(ax, c, b, n_layers, cell)
        cax = ax.inset_axes([1.04, 0.0, 0.13 / max(len(c["cols"]) * cell, 0.9), 1.0])
        cb = fig.colorbar(im, cax=cax)
        cb.set_label(RAW_LABEL.get(score, f"mean {score}"), fontsize=8)
        cb.ax.tick_params(labelsize=7)
        cb.formatter.set_powerlimits((-3, 4))
    fig.suptitle(f"raw mean {score} over {tasks[0]}×{tasks[1]} pairs (each block its own scale; not compared with chance)",
                 fontsize=11, parse_math=False)
    return fig


# ---------------------------------------------------------------- HTML (pure)

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1280px;
     color:#1f2328;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.1em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .2em}
.sub{color:#57606a;margin-top:0} code{background:#f6f8fa;padding:1px 4px;border-radius:4px;font-size:.92em}
table{border-collapse:collapse;font-size:.88em;margin:.4em 0}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th.sort{cursor:pointer;user-select:none} th.sort:after{content:" ⇅";color:#8c959f}
th[aria-sort=ascending]:after{content:" ▲";color:#1f2328} th[aria-sort=descending]:after{content:" ▼";color:#1f2328}
.up{color:#b2182b;font-weight:600} .down{color:#2166ac;font-weight:600} .ns{color:#6e7781}
.filters{font-size:.85em;color:#57606a;margin:.3em 0} .filters input,.filters select{font-size:1em;margin:0 .6em 0 .2em}
.scroll{max-height:32em;overflow:auto;border:1px solid #eaeef2}
figure{margin:.6em 0 1.4em} figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:.9em;margin-top:.3em;max-width:1000px} .note{color:#57606a;font-size:.9em}
svg.heat a rect{stroke:#fff;stroke-width:.5} svg.heat a:hover rect,svg.heat a:focus rect{stroke:#000;stroke-width:2}
svg.heat a rect.hatch,svg.heat a:hover rect.hatch,svg.heat a:focus rect.hatch{stroke:none;pointer-events:none}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:4px 8px;font-size:.9em}
svg.heat text{font-size:10px;fill:#1f2328} svg.heat text.mark{pointer-events:none;paint-order:stroke;stroke:#fff;stroke-width:2.2px;fill:#000}
#tip{position:fixed;display:none;pointer-events:none;background:#fff;border:1px solid #8c959f;border-radius:6px;
     box-shadow:0 4px 14px rgba(0,0,0,.18);padding:6px 9px;font-size:12.5px;max-width:430px;z-index:10}
#tip b{font-size:13px} #tip div{margin:1px 0}
#pairs{position:fixed;right:14px;bottom:14px;width:min(760px,94vw);max-height:62vh;overflow:auto;background:#fff;
       border:1px solid #8c959f;border-radius:8px;box-shadow:0 6px 22px rgba(0,0,0,.25);padding:8px 14px;display:none;z-index:9}
#pairs.open{display:block} #pairs .close{float:right;cursor:pointer;font-size:1.1em;border:none;background:none}
#pairs td.txt{max-width:260px;font-size:.92em;color:#424a53}
"""

# Sorting, filtering, hover and the pairs panel; plain DOM, no library, nothing fetched.
_JS = r"""
(function(){
const DATA = JSON.parse(document.getElementById('qkov-data').textContent);
const A = DATA.tasks.a, B = DATA.tasks.b;
function f(x, p){ if (x === null || x === undefined) return '–'; p = p || 4;
  const a = Math.abs(x); if (x !== 0 && (a >= 1e5 || a < 1e-3)) return x.toExponential(2);
  return String(+x.toPrecision(p)); }
function ci(lo, hi, p){ return (lo === null && hi === null) || lo === undefined ? '' : ' [' + f(lo, p || 3) + ', ' + f(hi, p || 3) + ']'; }
function pct(x){ return x === null || x === undefined ? '–' : (x >= 0 ? '+' : '') + (100 * x).toFixed(1) + '%'; }
const DIR = {'1': '<span class="up">▲ above chance</span>', '-1': '<span class="down">▼ below chance</span>', '0': '<span class="ns">not significant</span>'};
const TDIR = {'-1': '<span class="up">conflict</span>', '1': '<span class="down">synergy</span>', '0': '<span class="ns">not significant</span>'};
function esc(s){ return String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c])); }
function headName(s){ return s.b + ' · layer ' + s.l + ' · head ' + s.h + (s.kv === null ? '' : ' (KV head ' + s.kv + ')'); }
function tipHtml(id, kind){
  const s = DATA.slices[id]; if (!s) return '';
  const score = kind === 'conflict' ? 'alignment' : 'interference';
  const v = s[score] || {};
  // the map's own answer first, then the labels-null test of the same score
  // sharing: both directions in one size-free number; each direction (sharing_ab = B's gradients
  // onto the weights A depends on) also carries the tasks' gradient-size ratio
  const share = v.sh === undefined ? '' : '<div>sharing ' + f(v.sh, 3) + ci(v.shlo, v.shhi) + ' (1 = the tasks load the weights alike, → 0 = separated)</div>'
    + (v.sab === undefined ? '' : '<div class="ns">per direction, scaled by the tasks\' gradient-size ratio: ' + esc(B) + ' onto ' + esc(A) + ' ' + f(v.sab, 3) + ci(v.sablo, v.sabhi) + ' · ' + esc(A) + ' onto ' + esc(B) + ' ' + f(v.sba, 3) + ci(v.sbalo, v.sbahi) + '</div>');
  const transfer = v.tr === undefined ? '' : '<div>transfer ' + f(v.tr, 3) + ci(v.trlo, v.trhi) + ': ' + (TDIR[String(v.trdir)] || '–') + ', q ' + f(v.trq, 3) + '</div><div>cosine ' + (v.cos === null ? 'no direction (a task\'s mean gradient is indistinguishable from 0 here)' : f(v.cos, 2) + ci(v.coslo, v.coshi, 2)) + '</div>';
  const differ = '<div>' + score + ' vs chance (labels null): ' + (DIR[String(v.dir)] || '–') + '</div>'
    + '<div>mean ' + f(v.mean) + ' · chance ' + f(v.chance) + '</div>'
    + '<div>effect ' + f(v.effect, 3) + ci(v.lo, v.hi) + (score === 'interference' ? ' (' + pct(v.rel) + ' of chance)' : '') + '</div>'
    + '<div>q ' + f(v.q, 3) + ' · p_fwer ' + f(v.pf, 3) + (v.lq === undefined ? '' : ' · layer q ' + f(v.lq, 3)) + '</div>';
  let h = '<b>' + esc(headName(s)) + '</b>';
  h += kind === 'conflict' ? transfer + differ : kind === 'sharing' ? share + differ : differ + share;
  return h + '<div class="ns">click for the top pairs</div>';
}
const tip = document.getElementById('tip');
document.querySelectorAll('svg.heat').forEach(svg => {
  const kind = svg.dataset.kind;
  svg.addEventListener('mouseover', e => { const r = e.target.closest('[data-id]'); if (!r) return;
    tip.innerHTML = tipHtml(r.dataset.id, kind); tip.style.display = 'block'; });
  svg.addEventListener('mousemove', e => { const w = tip.offsetWidth, hh = tip.offsetHeight;
    let x = e.clientX + 14, y = e.clientY + 14;
    if (x + w > innerWidth - 4) x = e.clientX - w - 14; if (y + hh > innerHeight - 4) y = e.clientY - hh - 14;
    tip.style.left = Math.max(2, x) + 'px'; tip.style.top = Math.max(2, y) + 'px'; });
  svg.addEventListener('focusin', e => { const r = e.target.querySelector && e.target.querySelector('[data-id]'); if (!r) return;
    tip.innerHTML = tipHtml(r.dataset.id, kind); tip.style.display = 'block'; const b = r.getBoundingClientRect();
    tip.style.left = Math.min(b.right + 8, innerWidth - tip.offsetWidth - 4) + 'px'; tip.style.top = Math.min(b.bottom + 8, innerHeight - tip.offsetHeight - 4) + 'px'; });
  svg.addEventListener('focusout', () => { tip.style.display = 'none'; });
  svg.addEventListener('mouseout', e => { if (!e.relatedTarget || !e.relatedTarget.closest || !e.relatedTarget.closest('[data-id]')) tip.style.display = 'none'; });
});
const panel = document.getElementById('pairs');
function pairsTable(id, score){
  const p = (DATA.pairs[id] || {})[score]; if (!p) return '';
  const order = score === 'alignment' ? 'most negative alignment first (conflicting pairs: a natural-gradient step on the ' + esc(B) + ' sample raises the ' + esc(A) + ' sample\'s loss)' : 'highest interference first';
  // qkov query's outlier warning (the same rule), above the pairs it is about
  const w = (DATA.warnings[id] || {})[score];
  let h = '<h3>' + score + ': ' + order + '</h3>' + (w ? '<p class="warn" data-score="' + score + '">⚠ warning: ' + esc(w) + '</p>' : '')
    + '<table class="pairs" data-score="' + score + '"><tr><th>#</th><th>' + esc(A) + ' id</th><th>' + esc(B) + ' id</th><th>' + score + '</th><th>' + esc(A) + ' text</th><th>' + esc(B) + ' text</th></tr>';
  p.forEach((r, k) => { const a = DATA.samples.a[r[0]], b = DATA.samples.b[r[1]];
    h += '<tr><td class="num">' + (k + 1) + '</td><td>' + esc(a[0]) + '</td><td>' + esc(b[0]) + '</td><td class="num">' + f(r[2]) + '</td><td class="txt">' + esc(a[1]) + '</td><td class="txt">' + esc(b[1]) + '</td></tr>'; });
  return h + '</table>';
}
function marginalsHtml(mg){
  // qkov query's alignment marginals, with the question, units and direction they carry
  let h = '<h3>alignment: the samples that drive the conflict most</h3><p class="note">' + esc(mg.question) + '. Units: ' + esc(mg.units) + '. Direction: ' + esc(mg.direction) + '. Transfer ' + f(mg.transfer, 3) + '.</p>';
  const text = {}; ['a', 'b'].forEach(k => DATA.samples[k].forEach(x => { text[k + ':' + x[0]] = x[1]; }));
  [['a', A, B], ['b', B, A]].forEach(([k, who, other]) => { const rows = mg[k] || []; if (!rows.length) return;
    h += '<table class="marg" data-task="' + k + '"><tr><th>' + esc(who) + ' sample</th><th>mean alignment with ' + esc(other) + '</th><th>contribution to transfer</th><th>text</th></tr>';
    rows.forEach(r => { h += '<tr><td>' + esc(r.sample) + '</td><td class="num">' + f(r.marginal) + '</td><td class="num">' + f(r.contribution) + '</td><td class="txt">' + esc(text[k + ':' + r.sample] || '') + '</td></tr>'; });
    h += '</table>'; });
  return h;
}
function showPairs(){
  const m = location.hash.match(/^#pairs-(.+)$/);
  if (!m) { panel.classList.remove('open'); return; }
  const id = decodeURIComponent(m[1]), s = DATA.slices[id];
  if (!s) { panel.classList.remove('open'); return; }
  let h = '<button class="close" title="close" aria-label="close">✕</button><h2 style="margin-top:.2em">Top pairs — ' + esc(headName(s)) + '</h2>';
  if (!DATA.pairs_n) h += '<p class="note">This run is too large to embed pairs; use <code>qkov query RUN --layer ' + s.l + ' --head ' + s.h + ' --block ' + s.b + '</code>.</p>';
  else { const t = pairsTable(id, 'interference') + pairsTable(id, 'alignment');
    h += t || '<p class="note">This run keeps no sample pairs for this slice ([score] keep_pairs = "none").</p>'; }
  const mg = (DATA.marginals || {})[id];
  if (mg) h += marginalsHtml(mg);
  else if (s.alignment) h += '<p class="note">Not a significant conflict: the samples that drive its transfer are listed by <code>qkov query RUN --layer ' + s.l + ' --head ' + s.h + ' --block ' + s.b + '</code>.</p>';
  h += '<p class="note">The same with full texts: <code>qkov query RUN --layer ' + s.l + ' --head ' + s.h + ' --block ' + s.b + '</code></p>';
  panel.innerHTML = h; panel.classList.add('open'); panel.dataset.id = id; panel.scrollTop = 0;
  panel.querySelector('.close').addEventListener('click', () => { history.replaceState(null, '', '#'); panel.classList.remove('open'); });
}
window.addEventListener('hashchange', showPairs); showPairs();

function inRange(spec, v){ spec = spec.trim(); if (!spec) return true;
  return spec.split(',').some(part => { const m = part.trim().match(/^(\d+)\s*(?:-|\.\.)\s*(\d+)$/);
    if (m) return v >= +m[1] && v <= +m[2]; return part.trim() !== '' && +part.trim() === v; }); }
document.querySelectorAll('table.qt').forEach(t => {
  const bar = document.querySelector('.filters[data-table="' + t.id + '"]');
  const rows = Array.from(t.tBodies[0].rows);
  function apply(){ let n = 0; const get = k => { const el = bar && bar.querySelector('[data-f="' + k + '"]'); return el ? el.value : ''; };
    rows.forEach(r => { const ok = (!get('block') || r.dataset.block === get('block')) && (!get('score') || r.dataset.score === get('score'))
      && inRange(get('layer'), +r.dataset.layer) && inRange(get('head'), +r.dataset.head) && (!get('sig') || r.dataset.sig === get('sig'));
      r.hidden = !ok; if (ok) n++; });
    if (bar) bar.querySelector('.count').textContent = n + ' of ' + rows.length + ' rows shown'; }
  if (bar) bar.querySelectorAll('input,select').forEach(el => el.addEventListener(el.tagName === 'INPUT' ? 'input' : 'change', apply));
  Array.from(t.tHead.rows[0].cells).forEach((th, i) => { th.classList.add('sort'); th.tabIndex = 0;
    const go = () => { const asc = th.getAttribute('aria-sort') !== 'ascending';
      Array.from(t.tHead.rows[0].cells).forEach(c => c.removeAttribute('aria-sort')); th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      const key = r => { const c = r.cells[i], v = c.dataset.v; if (v === undefined || v === '') return null; const x = +v; return isNaN(x) ? v : x; };
      const sorted = rows.slice().sort((a, b) => { const x = key(a), y = key(b);
        if (x === null) return y === null ? 0 : 1; if (y === null) return -1;
        const c = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c; });
      sorted.forEach(r => t.tBodies[0].appendChild(r)); };
    th.addEventListener('click', go); th.addEventListener('keydown', e => { if (e.key === 'Enter') go(); }); });
  apply();
});
})();
"""


def _e(x: Any) -> str:
    return html.escape("–" if x is None else str(x))


def _num(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _settings(d: dict) -> str:
    return ", ".join(f"{_e(k)}=<code>{_e(v)}</code>" for k, v in d.items()) or "–"


def _json_script(obj: Any) -> str:
    """JSON inside <script type=application/json>: '<', '>' and '&' escaped so no text of a
    sample can close the element."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _dir_class(text: str) -> str:
    return {"▲": "up", "▼": "down", "c": "up", "s": "down"}.get(text[:1], "ns")


def _sv(v: Any) -> str:
    """A cell's sort value."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return _e(v)


def _filters(table_id: str, blocks: list[str], scores: list[str] | None = None) -> str:
    opts = "".join(f"<option>{_e(b)}</option>" for b in blocks)
    score = ("score <select data-f='score'><option value=''>all</option>"
             + "".join(f"<option>{_e(s)}</option>" for s in scores) + "</select>") if scores else ""
    return (f"<div class='filters' data-table='{table_id}'>{score}block <select data-f='block'><option value=''>all</option>{opts}"
            "</select>layer <input data-f='layer' size='7' placeholder='18 or 12-20'>head <input data-f='head' size='6' "
            "placeholder='3 or 0-4'><select data-f='sig' aria-label='significance'><option value=''>significant or not</option>"
            "<option value='1'>significant only</option><option value='0'>not significant only</option></select>"
            "<span class='count'></span></div>")


def _table(table_id: str, headers: list[str], rows: list[tuple[dict, list[tuple[str, Any]]]], blocks: list[str],
           scores: list[str] | None = None) -> str:
    """A sortable, filterable table: rows of (row attributes, [(text, sort value)])."""
    head = "".join(f"<th scope='col'>{_e(h)}</th>" for h in headers)
    body = []
    for attrs, cells in rows:
        a = "".join(f" data-{k}='{_e(v)}'" for k, v in attrs.items())
        tds = []
        for h, (txt, v) in zip(headers, cells):
            if h == "head" and attrs.get("id"):
                tds.append(f"<td class='num' data-v='{_sv(v)}'><a href='#pairs-{_e(attrs['id'])}'>{_e(txt)}</a></td>")
            elif h in ("direction", "vs chance"):
                tds.append(f"<td data-v='{_sv(v)}'><span class='{_dir_class(txt)}'>{_e(txt)}</span></td>")
            elif h in ("block", "score", "selected"):
                tds.append(f"<td data-v='{_sv(v)}'>{_e(txt)}</td>")
            else:
                tds.append(f"<td class='num' data-v='{_sv(v)}'>{_e(txt)}</td>")
        body.append(f"<tr{a}>{''.join(tds)}</tr>")
    return (_filters(table_id, blocks, scores)
            + f"<div class='scroll'><table class='qt' id='{table_id}'><thead><tr>{head}</tr></thead>"
              f"<tbody>{''.join(body)}</tbody></table></div>")


def _headline_html(tb: dict, blocks: list[str]) -> str:
    headers, cells = headline_cells(tb)
    sig_key = {"conflict": "transfer_direction", "shared": "direction", "differ": "direction"}[tb["key"]]
    title = f"<h3 id='q-{tb['key']}-{tb['score']}'>{_e(headline_title(tb))}</h3><p class='note'>{_e(tb.get('note', ''))}</p>"
    if not cells:
        return title + "<p><b>None.</b></p>"
    rows = []
    for r, c in zip(tb["rows"], cells):
        rows.append(({"id": slice_id(r["block"], r["layer"], r["head"]), "block": r["block"], "layer": r["layer"],
                      "head": r["head"], "sig": int(bool(r.get(sig_key)))}, c))
    return title + _table(f"t-{tb['key']}-{tb['score']}", headers, rows, blocks)


def _ci_text(r: dict, var: str, spec: str) -> str:
    lo, hi = r.get(f"{var}_ci_low"), r.get(f"{var}_ci_high")
    return "" if lo is None and hi is None else f" [{_num(lo, spec)}, {_num(hi, spec)}]"


def _drivers_html(rows: list[dict], embedded: dict[str, Any], tasks: tuple[str, str], k: int = 3) -> str:
    """Under the conflict table: per listed head, the k samples of each task that drive the
    conflict most (`conflict_marginals`), with what the numbers are."""
    marg = embedded.get("marginals") or {}
    body, docs = [], None
    for r in rows:
        sid = slice_id(r["block"], r["layer"], r["head"])
        m = marg.get(sid)
        if not m:
            continue
        docs = m
        cells = "".join("<td>" + ", ".join(f"{_e(x['sample'])} ({_num(x['marginal'], '.3g')})" for x in m[key][:k]) + "</td>"
                        for key in ("a", "b"))
        body.append(f"<tr data-id='{_e(sid)}'><td>{_e(r['block'])}</td><td class='num'>{r['layer']}</td><td class='num'>"
                    f"<a href='#pairs-{_e(sid)}'>{_e(head_label(r))}</a></td><td class='num'>{_num(m.get('transfer'), '.3g')}"
                    f"</td>{cells}</tr>")
    if not body:
        return ""
    a, b = tasks
    return (f"<h4 id='drivers'>Which samples drive each conflict</h4><p class='note'>{_e(docs['question'])}. Units: "
            f"{_e(docs['units'])}. Direction: {_e(docs['direction'])}. Per conflict head, the {k} most negative of each "
            "task (as <code>qkov query</code> lists them); click a head for more, with texts.</p>"
            f"<table id='t-drivers'><tr><th>block</th><th>layer</th><th>head</th><th>transfer</th><th>{_e(a)} samples (mean "
            f"alignment with {_e(b)})</th><th>{_e(b)} samples (mean alignment with {_e(a)})</th></tr>{''.join(body)}</table>")


def _all_slices_html(stats: xr.Dataset, blocks: list[str], tasks: tuple[str, str] = ("A", "B")) -> str:
    headers = ["block", "layer", "head", "score", "vs chance", "mean", "chance", "effect [CI]", "effect / chance", "q",
               "p_fwer", "task effect size"]
    rows = []
    scores = [str(s) for s in stats[schema.SCORE].values]
    for score in scores:
        t = _with_sharing(stats, slice_table(stats, score), score)
        for i in range(t["block"].size):
            num = lambda k, _i=i: None if not np.isfinite(t[k][_i]) else float(t[k][_i])  # noqa: E731
            r = {k: num(k) for k in t if k not in ("block", "layer", "head", "kv_head")}
            r.update(block=str(t["block"][i]), layer=int(t["layer"][i]), head=int(t["head"][i]),
                     kv_head=int(t["kv_head"][i]) if t["kv_head"][i] >= 0 else None)
            d = direction_words(r)
            if score == "interference":
                # sharing_ab = B's gradients on the weights A depends on: "B onto A"; each direction
                # carries the tasks' gradient-size ratio, `sharing` does not
                own = (f"sharing {_num(r.get('sharing'), '.3f')}{_ci_text(r, 'sharing', '.3f')} (per direction, "
                       f"scaled by the tasks' gradient-size ratio: {tasks[1]} onto {tasks[0]} {_num(r.get('sharing_ab'), '.3f')}, "
                       f"{tasks[0]} onto {tasks[1]} {_num(r.get('sharing_ba'), '.3f')})", r.get("sharing"))
            else:
                cos = "no direction" if r.get("cosine") is None else _num(r.get("cosine"), ".2f")
                own = (f"cosine {cos}; transfer {_num(r.get('transfer'), '.3g')} "
                       f"{direction_words(r, 'transfer_direction')} (q {_num(r.get('transfer_q_value'), '.3g')})",
                       r.get("cosine"))
            rel = r.get("effect_rel") if score == "interference" else None
            cells = [(r["block"], r["block"]), (str(r["layer"]), r["layer"]), (head_label(r), r["head"]), (score, score),
                     (d, r.get("direction")), (_num(r.get("mean")), r.get("mean")),
                     (_num(r.get("chance")), r.get("chance")),
                     (f"{_num(r.get('effect'), '.3g')} [{_num(r.get('effect_ci_low'), '.3g')}, "
                      f"{_num(r.get('effect_ci_high'), '.3g')}]", r.get("effect")),
                     ("–" if rel is None else f"{100 * rel:+.1f}%", rel), (_num(r.get("q_value"), ".3g"), r.get("q_value")),
                     (_num(r.get("p_fwer"), ".3g"), r.get("p_fwer")), own]
            rows.append(({"id": slice_id(r["block"], r["layer"], r["head"]), "block": r["block"], "layer": r["layer"],
                          "head": r["head"], "score": score, "sig": int(bool(r.get("significant")))}, cells))
    return _table("t-all", headers, rows, blocks, scores)


def _layers_html(stats: xr.Dataset, blocks: list[str]) -> str | None:
    if V.layer_q_value not in stats:
        return None
    scores = [str(s) for s in stats[schema.SCORE].values]
    headers = ["score", "block", "layer", "selected", "layer p", "layer q", "heads significant (layer → head)"]
    rows = []
    for score in scores:
        for b in blocks:
            for layer in (int(x) for x in stats[schema.LAYER].values):
                sel = {schema.SCORE: score, schema.BLOCK: b, schema.LAYER: layer}
                p, q = float(stats[V.layer_p_value].sel(sel)), float(stats[V.layer_q_value].sel(sel))
                chosen = bool(stats[V.layer_significant].sel(sel))
                n_hier = None
                if V.significant_hier in stats:
                    fam = np.asarray(stats[V.in_family].sel({schema.BLOCK: b}).values, dtype=bool)
                    n_hier = int(np.asarray(stats[V.significant_hier].sel(sel).values, dtype=bool)[fam].sum())
                cells = [(score, score), (b, b), (str(layer), layer), ("yes" if chosen else "no", int(chosen)),
                         (_num(p, ".3g"), p), (_num(q, ".3g"), q), ("–" if n_hier is None else str(n_hier), n_hier)]
                rows.append(({"block": b, "layer": layer, "head": -1, "score": score, "sig": int(chosen)}, cells))
    return _table("t-layers", headers, rows, blocks, scores)


def heatmap_svg(data: dict[str, Any]) -> str:
    """The page's interactive heatmap: the same cells, colours and marks as `effect_figure`, each
    cell a link to its top pairs carrying its slice id (hover text comes from the embedded data)."""
    panels = data["panels"]
    colour = colour_of(data)
    n_layers = len(next(iter(panels.values()))["layers"])
    total = sum(len(p["cols"]) for p in panels.values())
    cw = int(np.clip(760 // max(total, 1), 7, 24))
    ch = int(np.clip(560 // max(n_layers, 1), 7, 22))
    left, top, bottom, gap = 46, 30, 38, 18
    x = left
    hatch_id = f"hatch-{data['kind']}"
    parts = [f"<defs><pattern id='{hatch_id}' width='4' height='4' patternUnits='userSpaceOnUse' "
             f"patternTransform='rotate(45)'><line x1='0' y1='0' x2='0' y2='4' stroke='{MUTE_EDGE}' stroke-width='0.8'/>"
             "</pattern></defs>"]
    for b, p in panels.items():
        w = len(p["cols"]) * cw
        parts.append(f"<text x='{x + w / 2:.1f}' y='{top - 8}' text-anchor='middle' font-weight='600'>{_e(b)}</text>")
        for r, layer in enumerate(p["layers"]):
            for c, _ in enumerate(p["cols"]):
                v = float(p["values"][r, c])
                sid = p["ids"][r][c]
                muted = bool(p["muted"][r, c])
                # the hatch is drawn over the cell inside its link, so hover and click still reach it
                hatch = (f"<rect class='hatch' x='{x + c * cw}' y='{top + r * ch}' width='{cw}' height='{ch}' "
                         f"fill='url(#{hatch_id})'/>" if muted else "")
                parts.append(f"<a href='#pairs-{sid}' aria-label='{_e(sid)}'><rect data-id='{sid}' "
                             f"data-v='{'' if not np.isfinite(v) else format(v, '.6g')}'{' data-muted=1' if muted else ''} "
                             f"x='{x + c * cw}' y='{top + r * ch}' width='{cw}' height='{ch}' fill='{colour(v, muted)}'/>"
                             f"{hatch}</a>")
                m = int(p["marks"][r, c])
                if m:
                    parts.append(f"<text class='mark' data-mark='{m}' x='{x + c * cw + cw / 2:.1f}' "
                                 f"y='{top + r * ch + ch * 0.72:.1f}' text-anchor='middle' "
                                 f"style='font-size:{max(7, int(min(cw, ch) * 0.7))}px'>{'▲' if m > 0 else '▼'}</text>")
        step = max(1, int(np.ceil(16 / cw)))
        for c in range(0, len(p["cols"]), step):
            parts.append(f"<text x='{x + c * cw + cw / 2:.1f}' y='{top + n_layers * ch + 12}' text-anchor='middle'>"
                         f"{p['labels'][c]}</text>")
        parts.append(f"<text x='{x + w / 2:.1f}' y='{top + n_layers * ch + 28}' text-anchor='middle' fill='#57606a'>"
                     f"{p['xlabel']}</text>")
        x += w + gap
    step = max(1, int(np.ceil(12 / ch)))
    for r, layer in enumerate(next(iter(panels.values()))["layers"]):
        if r % step == 0:
            parts.append(f"<text x='{left - 6}' y='{top + r * ch + ch * 0.72:.1f}' text-anchor='end'>{layer}</text>")
    parts.append(f"<text transform='translate(12,{top + n_layers * ch / 2:.0f}) rotate(-90)' text-anchor='middle' "
                 "fill='#57606a'>layer</text>")
    # the colour bar: the map sampled on the shared scale, top = high (tall enough for its ticks)
    h = max(n_layers * ch, 120)
    bx = x + 8
    cmap = matplotlib.colormaps[data["cmap"]]
    stops = "".join(f"<stop offset='{k / 20:.2f}' stop-color='{to_hex(cmap(1 - k / 20))}'/>" for k in range(21))
    gid = f"grad-{data['kind']}"
    parts.append(f"<defs><linearGradient id='{gid}' x1='0' y1='0' x2='0' y2='1'>{stops}</linearGradient></defs>")
    parts.append(f"<rect x='{bx}' y='{top}' width='14' height='{h}' fill='url(#{gid})' stroke='#8c959f'/>")
    for k in range(5):
        v = data["vmax"] - k * (data["vmax"] - data["vmin"]) / 4
        y = top + k * h / 4
        edge = (1 if k == 0 else -1 if k == 4 else 0) if data.get("clipped") else 0
        parts.append(f"<line x1='{bx + 14}' x2='{bx + 18}' y1='{y:.1f}' y2='{y:.1f}' stroke='#57606a'/>"
                     f"<text class='tick' x='{bx + 21}' y='{y + 3.5:.1f}'>{_e(tick_label(data['kind'], float(v), edge))}</text>")
    parts.append(f"<text x='{bx}' y='{top - 8}' fill='#57606a'>↑ {_e(data['high'])}</text>"
                 f"<text x='{bx}' y='{top + h + 14}' fill='#57606a'>↓ {_e(data['low'])}</text>")
    width = bx + 8 + 6.2 * max(len(data["high"]), len(data["low"]), 12)
    height = top + max(h + 34, n_layers * ch + bottom)
    return (f"<svg class='heat' data-kind='{data['kind']}' role='img' aria-label='{_e(data['title'])}' "
            f"xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
            f"viewBox='0 0 {width:.0f} {height:.0f}'>{''.join(parts)}</svg>")


def _heatmap_caption(data: dict[str, Any], alpha: Any, family: Any, alternative: Any, files: list[str],
                     note: str = "") -> str:
    marks = ""
    if data["marks"]:
        marks = f" ▲ {_e(data['marks'][0])}; ▼ {_e(data['marks'][1])} (BH over the family of {_e(family)} slices, α = {_e(alpha)}" \
                + (f", labels null {_e(alternative)}" if data["kind"] == "differ" else ", transfer test two-sided") + ")."
    links = " · ".join(f"<a href='{_e(f)}'>{_e(f)}</a>" for f in files)
    rng = f"{_e(tick_label(data['kind'], data['vmin']))} to {_e(tick_label(data['kind'], data['vmax']))}"
    if data.get("sequential"):
        scale = (f"Sequential scale (ColorBrewer {_e(data['cmap'])}, colour-blind safe) from the smallest to the largest "
                 f"value of this run, shared by all blocks: {rng}. There is no test of sharing (its bootstrap CI is in "
                 f"the hover), so no cell is muted")
    else:
        scale = (f"Diverging scale (ColorBrewer {_e(data['cmap'].removesuffix('_r'))}, colour-blind safe) centred on the "
                 f"neutral value and shared by all blocks: {rng}"
                 + ("; the scale stops at the 98th percentile of |value|, cells beyond it take the end colours "
                    "(hover for their value)" if data.get("clipped") else "")
                 + f"; <b>pale, hatched</b> = not significant by {_e(data['test'])} (q &gt; α): its colour is kept at "
                   f"{100 * (1 - MUTE):.0f}%, so the deepest colours sit only on significant heads")
    return (f"<figcaption>Colour: {_e(data['value'])}. {scale}; grey = {_e(data['nan'])}.{_e(note) and ' ' + _e(note)}"
            f"{marks} Hover a cell for its numbers; click it for its top pairs. Files: {links}</figcaption>")


def render_html(info: dict, sections: list[str], data: dict[str, Any]) -> str:
    """The page: header, run table, the given HTML sections, the embedded data and the script."""
    a, b = info["task_a"], info["task_b"]
    title = f"qkov report — {a['name']} vs {b['name']}"
    st = info["stats"]
    rows = [
        ("run", f"<code>{_e(info['run'])}</code>"),
        ("model", f"<code>{_e(info['model'])}</code> ({_e(info['model_class'])}, {_e(info['dtype'])}), "
                  f"weights hash <code>{_e(info['weights_hash'])}</code>"),
        ("attention", f"{_e(info['heads'])}; layers {_e(info['layers'])}"),
        ("task A", f"<b>{_e(a['name'])}</b>: {_e(a['n'])} samples from <code>{_e(a['path'])}</code>; "
                   f"loss over {_e(a.get('loss'))}"),
        ("task B", f"<b>{_e(b['name'])}</b>: {_e(b['n'])} samples from <code>{_e(b['path'])}</code>; "
                   f"loss over {_e(b.get('loss'))}"),
        ("pairs", f"{_e((a['n'] or 0) * (b['n'] or 0))} (A×B) per slice; max_length {_e(info['max_length'])}"
                  + (f"; skipped for non-finite gradients: {_e(', '.join(info['skipped']))}" if info["skipped"] else "")),
        ("fisher", _settings(info["fisher"])),
        ("score", _settings(info["score"])),
        ("statistics", f"group <code>{_e(info['stats_group'])}</code> ({_e(info['stats_created'])}): " + _settings(st)),
        ("provenance", f"config hash <code>{_e(info['config_hash'])}</code>, extracted {_e(info['created'])}; "
                       + ", ".join(f"{_e(k)} {_e(v)}" for k, v in info["versions"].items())),
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='sub'>where the two tasks conflict, share and differ inside "
        f"<code>{_e(info['model'])}</code>, per attention head</p>"
        f"{_kv_table(rows)}{''.join(sections)}"
        "<div id='tip' role='tooltip'></div><aside id='pairs' aria-live='polite'></aside>"
        f"<script type='application/json' id='qkov-data'>{_json_script(data)}</script>"
        f"<script>{_JS}</script></body></html>"
    )


# ---------------------------------------------------------------- entry point


def _default_out(run: "str | RunStore", out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        if (out := local_path(str(out_dir))) is None:
            raise UsageError(f"out_dir must be a local folder, got {out_dir}")
        return out
    if isinstance(run, RunStore) and run.parent is not None:
        # a pair's sub-run lies inside its run: its report goes where the all-pairs report puts it
        return _default_out(run.parent, None) / schema.pair_id(*run.pair_tasks())
    run = run.path if isinstance(run, RunStore) else run
    if (local := local_path(run)) is None:
        raise UsageError(f"the run {run} is remote: pass out_dir (a local folder) for the report")
    # beside the run, not inside it: a plain folder inside the Zarr group makes
    # xarray.open_datatree warn about an unknown hierarchy member
    local = local.expanduser().resolve()  # `qkov report .` from inside the run
    return local.with_name(local.name + "-report")


REPORT_FILES = (REPORT_HTML, "run_info.json")  # and heatmap_*, summary_q.*, mean_*  (.png/.svg)
FIGURE_PREFIXES = ("heatmap_", "summary_q", "mean_")


def _check_out_dir(out: Path) -> None:
    """The report folder is new, empty, or an earlier qkov report (its run_info.json says so):
    a user's own report.html (or a file where the folder should be) is never overwritten."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"cannot write the report to {out}: it is a file, not a folder. Choose another {option('out', 'DIR')}.")
    if not out.is_dir():
        return
    ours = False
    try:
        ours = "run" in json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        pass
    clash = sorted(p.name for p in out.iterdir() if p.name in REPORT_FILES
                   or (p.name.startswith(FIGURE_PREFIXES) and p.suffix in (".png", ".svg")))
    if clash and not ours:
        raise UsageError(f"{out} holds {', '.join(clash)} that qkov did not write; refusing to overwrite them. "
                         f"Choose another {option('out', 'DIR')} (a new or empty folder, or an earlier qkov report).")


def make_report(run: "str | RunStore", out_dir: str | Path | None = None, storage_options: dict | None = None,
                stats_name: str | None = None, top: int = 10, pairs: int = 5, raw_means: bool = False) -> Path:
    """Write `report.html` (self-contained, interactive), the effect heatmaps and the q-value
    summary as 300-dpi PNG + SVG, and `run_info.json`; returns the HTML path. A run of more than
    two tasks gets that report per task pair in `<out>/<x>-<y>/` and the overview `index.html`
    (`make_overview`), whose path is returned.

    `out_dir` defaults to `<run>-report` (beside the run; a pair's sub-run: `<run>-report/<x>-<y>`)
    for local runs and is required for URLs.
    `stats_name` reports `stats_<name>` instead of `stats`; `top` rows per headline table;
    `pairs` top pairs embedded per slice and score; `raw_means` also draws the raw A×B means.
    """
    store = RunStore.coerce(run, storage_options)
    out = _default_out(store, out_dir)
    store.require(schema.GRADIENTS, "the report")
    if store.is_multi():
        return make_overview(store, out, stats_name, top, pairs, raw_means)
    return _two_task_report(store, out, stats_name, top, pairs, raw_means)[0]


def _two_task_report(store: RunStore, out: Path, stats_name: str | None, top: int, pairs: int,
                     raw_means: bool) -> tuple[Path, xr.Dataset, dict[str, Any]]:
    """The report of a two-task run or of one pair's sub-run: (page, its statistics, run_info)."""
    stats = store.open_stats(stats_name)
    info = run_info(store, stats, schema.stats_group(stats_name), out)
    tasks = (str(info["task_a"]["name"]), str(info["task_b"]["name"]))
    _check_out_dir(out)
    embedded = top_pairs_by_slice(store, stats, pairs)
    try:
        path = _write_report(out, stats, info, tasks, top, embedded, raw_means)
        _add_health_panel(path, store, stats)
        return path, stats, info
    except OSError as e:
        raise _unwritable(out, e) from None


def _unwritable(out: Path, e: OSError) -> UsageError:
    return UsageError(f"cannot write the report to {out}: {e.strerror or e}. Choose a writable {option('out', 'DIR')}.")


def _add_health_panel(page: Path, store: RunStore, stats: xr.Dataset, top: int = 10) -> None:
    """Issue 19: a compact "Numerical health" section (ill-conditioned slices, samples flagged as
    norm outliers most often, samples the statistics exclude) appended to the written page."""
    from .health import health_summary, open_diagnostics

    diag = open_diagnostics(store)
    if diag is None:
        body = "<p class='note'>This run has no <code>diagnostics</code> group (scored before qkov recorded them).</p>"
    else:
        h = health_summary(diag, top)
        cell = lambda x, spec: f"<td class='num'>{format(x, spec)}</td>"  # noqa: E731
        ill = "".join(f"<tr><td>{_e(r['block'])}</td><td class='num'>{r['layer']}</td><td class='num'>{r['head']}</td>"
                      f"{cell(r['damped_share'], '.1%')}{cell(r['effective_dim'], '.1f')}</tr>" for r in h["ill_conditioned"][:top])
        smp = "".join(f"<tr><td>{_e(r['task'])}</td><td>{_e(r['sample'])}</td>{cell(r['slices_flagged'], 'd')}"
                      f"{cell(r['max_outlier_score'], '.1f')}</tr>" for r in h["samples"])
        med = h["median_damped_share"]
        body = (
            f"<p>{h['n_ill_conditioned']} of {h['n_slices']} slices are ill-conditioned (damping λ exceeds the Fisher Î on more "
            f"than half of the slice's entries, so its scores are mostly 1/λ-weighted gradient products); median share of "
            f"entries with λ &gt; Î over all slices: {_e('–' if med is None else format(med, '.2%'))}.</p>"
            + (f"<table><tr><th>block</th><th>layer</th><th>head</th><th>λ &gt; Î on</th><th>effective dim Σ Î/(Î+λ)</th></tr>"
               f"{ill}</table>" if ill else "")
            + f"<p>{h['n_flagged_samples']} of {h['n_samples']} samples are norm outliers in at least one slice ({h['n_flags']} "
            "sample-slice flags): a sample is flagged where its gradient norm or Fisher-weighted norm √A<sub>ii</sub> lies "
            f"more than {_e(diag.attrs.get('outlier_z'))} robust z (median/MAD) above its own task's samples; such samples can "
            "dominate a head's top pairs (<code>qkov query</code> warns), and <code>qkov stats RUN --exclude ID --name NAME</code> "
            "recomputes the statistics without them.</p>"
            + (f"<table><tr><th>task</th><th>sample</th><th>slices flagged (of {h['n_slices']})</th><th>largest outlier z</th></tr>"
               f"{smp}</table>" if smp else "")
        )
    excluded = list(stats.attrs.get(schema.ATTR_EXCLUDED) or [])
    if excluded:
        body += f"<p><b>These statistics exclude {len(excluded)} sample(s):</b> {_e(', '.join(excluded))}.</p>"
    text, end = page.read_text(encoding="utf-8"), "</body>"
    cut = text.rfind(end) if end in text else len(text)  # the page's own end tag, never one quoted in a script
    page.write_text(f"{text[:cut]}<h2>Numerical health and outlier samples</h2>{body}{text[cut:]}", encoding="utf-8")


def _write_figure(out: Path, stem: str, fig: Figure) -> list[str]:
    names = []
    for fmt in ("png", "svg"):
        (out / f"{stem}.{fmt}").write_bytes(figure_bytes(fig, fmt))
        names.append(f"{stem}.{fmt}")
    return names


def _write_report(out: Path, stats: xr.Dataset, info: dict, tasks: tuple[str, str], top: int,
                  embedded: dict[str, Any], raw_means: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    scores = [str(s) for s in stats[schema.SCORE].values]
    blocks = [str(b) for b in stats[schema.BLOCK].values]
    st = info["stats"]
    alpha, family, alternative = st.get("alpha"), st.get("family_size"), st.get("alternative")
    notes = [f"K/V: GQA groups share one K/V slice (one test each), drawn once per KV head — {_group_note(c['labels'], c['groups'])}"
             for c in (block_columns(stats, b) for b in blocks) if c["groups"]][:1]

    written: list[str] = []
    sections = ["<h2>Answers</h2><p class='note'>Each table answers one question with its own numbers; "
                "<b>direction</b> says which way. <i>Conflict</i>: does a step on one task's loss raise the other's "
                "(transfer = ⟨ḡ<sub>A</sub>, ḡ<sub>B</sub>⟩ in the (Î+λ)⁻¹ metric, tested against 0)? <i>Share</i>: do "
                "the two tasks load the same weights (sharing: the geometric mean of both directions' ratios, in which "
                "each task's gradient size cancels; 1 = alike, → 0 = separated)? <i>Differ</i>: is the cross-task mean above or below chance (label permutations)? "
                "Below chance means cross-task pairs interfere <i>less</i> than random pairs, not that they do not "
                "interfere. Click a head for its top pairs; click a column to sort.</p>"]
    differ = tuple(s for s in ("interference",) if s in scores) or tuple(scores[:1])
    for tb in headline_tables(stats, top, differ_scores=differ):
        sections.append(_headline_html(tb, blocks))
        if tb["key"] == "conflict" and tb["rows"]:
            sections.append(_drivers_html(tb["rows"], embedded, tasks))

    for kind in HEATMAPS:
        data = heatmap_data(stats, kind)
        if data is not None:
            section, files = _heatmap_section(out, stats, kind, data, tasks, notes, (alpha, family, alternative))
            sections.append(section)
            written += files

    layers = _layers_html(stats, blocks)
    if layers:
        sections.append("<h2>Which layers carry it</h2><p class='note'>Per score, block and layer: does any head differ "
                        "from chance (the heads' permutation p-values combined over the same permutations)? BH over "
                        "layer-blocks selects; heads are then tested inside the selected ones (Benjamini–Bogomolov), "
                        "counted in the last column.</p>" + layers)
    sections.append("<h2>Every slice</h2><p class='note'>One row per family slice and score (K/V once per KV head). "
                    "Mean, chance and effect are in the score's units; q is the label-permutation test's BH q-value. "
                    "Filter, sort, and click a head for its top pairs.</p>" + _all_slices_html(stats, blocks, tasks))

    section, files = _evidence_section(out, stats, differ)
    sections.append(section)
    written += files
    if raw_means:
        section, files = _raw_means_section(out, stats, scores, tasks)
        sections.append(section)
        written += files

    # an earlier qkov report in this folder (checked by _check_out_dir) may hold figures this one
    # does not draw (older versions, raw means): they would contradict the page beside them
    for p in out.iterdir():
        if p.name.startswith(FIGURE_PREFIXES) and p.suffix in (".png", ".svg") and p.name not in written:
            p.unlink()

    data = {"tasks": {"a": tasks[0], "b": tasks[1]}, "slices": slice_data(stats), "pairs": embedded["pairs"],
            "pairs_n": embedded["n"], "samples": embedded["samples"], "warnings": embedded.get("warnings", {}),
            "marginals": embedded.get("marginals", {})}
    path = out / REPORT_HTML
    path.write_text(render_html(info, sections, data), encoding="utf-8")
    (out / "run_info.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
    return path


def _heatmap_section(out: Path, stats: xr.Dataset, kind: str, data: dict, tasks: tuple[str, str], notes: list[str],
                     test: tuple) -> tuple[str, list[str]]:
    """One effect heatmap: its figure files written, and its page section (inline SVG, caption)."""
    files = _write_figure(out, f"heatmap_{kind}", effect_figure(data, tasks, notes))
    rule = ""
    if kind == "conflict" and V.cosine in stats and stats[V.cosine].attrs.get("cosine_rule"):
        rule = f"No direction (NaN) by the stored rule: {stats[V.cosine].attrs['cosine_rule']}"
    return (f"<h2 id='map-{kind}'>{_e(data['title'])}</h2><figure>{heatmap_svg(data)}"
            f"{_heatmap_caption(data, *test, files, rule)}</figure>"), files


def _evidence_section(out: Path, stats: xr.Dataset, differ: tuple[str, ...]) -> tuple[str, list[str]]:
    """The q-value figure per block: its files written, and its page section."""
    fig = evidence_figure(stats, differ)
    files = _write_figure(out, "summary_q", fig)
    svg = figure_bytes(fig, "svg")
    tests = "; ".join(p["title"] for p in _evidence_panels(stats, differ)) or "none"
    return ("<h2>Evidence per block</h2><figure><img alt='BH q-value of every slice per block, per table test' "
            f"src='data:image/svg+xml;base64,{base64.b64encode(svg).decode('ascii')}'>"
            "<figcaption>−log10 BH q-value of every slice in the family, per block, for the test behind each "
            f"table ({_e(tests)}): the transfer test for conflict / synergy (▼ red conflict, ▲ blue synergy), the "
            "label-permutation test for “differ” (▲ red above chance, ▼ blue below). Points above the dashed "
            "line are significant. Sharing has no test (its CI is in the hover and the tables). "
            f"Files: {' · '.join(f'<a href={chr(39)}{n}{chr(39)}>{n}</a>' for n in files)}</figcaption></figure>"), files


def _raw_means_section(out: Path, stats: xr.Dataset, scores: list[str], tasks: tuple[str, str]) -> tuple[str, list[str]]:
    """`--raw-means`: each score's raw A×B means, files written, in a collapsed section."""
    raw, written = [], []
    for score in scores:
        fig = raw_mean_figure(stats, score, tasks)
        names = _write_figure(out, f"mean_{score}", fig)
        written += names
        svg = figure_bytes(fig, "svg")
        raw.append(f"<figure><img alt='raw mean {_e(score)}' src='data:image/svg+xml;base64,"
                   f"{base64.b64encode(svg).decode('ascii')}'><figcaption>Files: "
                   + " · ".join(f"<a href='{n}'>{n}</a>" for n in names) + "</figcaption></figure>")
    return ("<details><summary>Raw means (each block its own scale; not compared with chance)</summary>"
            + "".join(raw) + "</details>"), written


# ---------------------------------------------------------------- runs of more than two tasks

OVERVIEW_HTML = "index.html"
OVERVIEW_JSON = "overview.json"  # the overview's numbers; also marks the folder as qkov's

_OVERVIEW_CSS = """
table.tt td.pair{min-width:12em} table.tt td.pair a{color:inherit;text-decoration:none;display:block}
table.tt td.pair a:hover,table.tt td.pair a:focus{background:#f6f8fa;outline:1px solid #8c959f}
table.tt td.none{background:#f6f8fa} dl.defs dt{font-weight:600;margin-top:.4em} dl.defs dd{margin-left:1.2em}
"""


def pair_counts(stats: xr.Dataset) -> dict[str, int | None]:
    """One pair's answers as the overview counts them, in family slices (K/V once per KV head),
    by the rules of its headline tables (`headline_tables`): `conflict` / `synergy` =
    transfer_direction −1 / +1 (transfer test vs 0, BH q ≤ α within the pair); `more_overlap` /
    `less_overlap` = a defined `sharing` whose interference is significantly above / below chance
    (labels null, q ≤ α: `sharing` itself has no test; the "share most" table shows this verdict
    beside each row). None where the statistics lack the test."""
    scores = [str(s) for s in stats[schema.SCORE].values]
    out: dict[str, int | None] = {"conflict": None, "synergy": None, "more_overlap": None, "less_overlap": None}
    if "alignment" in scores and V.transfer_direction in stats:
        d = slice_table(stats, "alignment")[V.transfer_direction]
        out.update(conflict=int((d == -1).sum()), synergy=int((d == 1).sum()))
    if "interference" in scores and sharing_of(stats) is not None:
        t = slice_table(stats, "interference")
        finite = np.isfinite(t[V.sharing])
        out.update(more_overlap=int((finite & (t[V.direction] == 1)).sum()),
                   less_overlap=int((finite & (t[V.direction] == -1)).sum()))
    from .query import _family_index

    out["family"] = int(_family_index(stats)[0].size)
    return out


def conflict_slices(stats: xr.Dataset) -> list[dict[str, Any]]:
    """The pair's slices that conflict (transfer_direction = −1): block, layer, head (K/V: the
    first query head of its KV group, as `slice_id`), kv_head (K/V under GQA, else None), q."""
    if "alignment" not in [str(s) for s in stats[schema.SCORE].values] or V.transfer_direction not in stats:
        return []
    t = slice_table(stats, "alignment")
    return [{"block": str(t["block"][i]), "layer": int(t["layer"][i]), "head": int(t["head"][i]),
             "kv_head": int(t["kv_head"][i]) if t["kv_head"][i] >= 0 else None,
             "q": float(t[V.transfer_q_value][i])} for i in np.flatnonzero(t[V.transfer_direction] == -1)]


def head_answers(stats: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Per head ("layer/head"; a K/V slice under its KV group's first query head, as
    `conflict_slices`), what one pair answers there: the blocks that conflict and that show
    synergy (transfer test, BH q ≤ α within the pair) and the range of `sharing` over the
    head's blocks (1 = the tasks load the weights alike, → 0 = separated)."""
    out: dict[str, dict[str, Any]] = {}

    def at(layer, head) -> dict[str, Any]:
        return out.setdefault(f"{int(layer)}/{int(head)}", {"conflict": [], "synergy": [], "sharing": []})

    scores = [str(x) for x in stats[schema.SCORE].values]
    if "alignment" in scores and V.transfer_direction in stats:
        t = slice_table(stats, "alignment")
        for b, layer, head, d in zip(t["block"], t["layer"], t["head"], t[V.transfer_direction]):
            if d != 0:
                at(layer, head)["conflict" if d < 0 else "synergy"].append(str(b))
    if "interference" in scores and V.sharing in (t := slice_table(stats, "interference")):
        for layer, head, v in zip(t["layer"], t["head"], t[V.sharing]):
            if np.isfinite(v):
                at(layer, head)["sharing"].append(float(v))
    for cell in out.values():
        cell["sharing"] = [min(cell["sharing"]), max(cell["sharing"])] if cell["sharing"] else None
    return out


def _check_overview_dir(out: Path, keys: list[str]) -> None:
    """As `_check_out_dir`: the overview's folder is new, empty or an earlier qkov overview (its
    overview.json says so), and each pair's folder may take that pair's report."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"cannot write the report to {out}: it is a file, not a folder. Choose another {option('out', 'DIR')}.")
    ours = False
    try:
        ours = "run" in json.loads((out / OVERVIEW_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        pass
    clash = [n for n in (OVERVIEW_HTML, OVERVIEW_JSON) if (out / n).exists()]
    if clash and not ours:
        raise UsageError(f"{out} holds {', '.join(clash)} that qkov did not write; refusing to overwrite them. "
                         f"Choose another {option('out', 'DIR')} (a new or empty folder, or an earlier qkov report).")
    for key in keys:  # before any pair is written: a clash in the last must not leave the first ones half done
        _check_out_dir(out / key)


def make_overview(store: RunStore, out: Path, stats_name: str | None = None, top: int = 10, pairs: int = 5,
                  raw_means: bool = False) -> Path:
    """A run of more than two tasks: each task pair's report (the two-task page) in
    `<out>/<x>-<y>/`, then the overview `index.html` (task × task counts, the heads where pairs
    conflict, the statistics' settings) and its numbers as `overview.json`; returns the page."""
    names = store.task_names()
    keys = [schema.pair_id(x, y) for x, y in store.pair_keys()]
    _check_overview_dir(out, keys)
    rows = []
    for (x, y), key in zip(store.pair_keys(), keys):
        page, stats, info = _two_task_report(store.pair(x, y), out / key, stats_name, top, pairs, raw_means)
        rows.append({"key": key, "tasks": [x, y], "names": [names[x], names[y]], "report": f"{key}/{page.name}",
                     "n": [info["task_a"]["n"], info["task_b"]["n"]], "counts": pair_counts(stats),
                     "conflicts": conflict_slices(stats), "heads": head_answers(stats),
                     "stats": info["stats"], "stats_group": info["stats_group"],
                     "excluded": list(stats.attrs.get(schema.ATTR_EXCLUDED) or [])})
    head = _overview_info(store, rows, info, out)
    try:
        path = out / OVERVIEW_HTML
        path.write_text(overview_html(head, rows, top), encoding="utf-8")
        (out / OVERVIEW_JSON).write_text(json.dumps({**head, "pairs": rows}, indent=1, default=str), encoding="utf-8")
        return path
    except OSError as e:
        raise _unwritable(out, e) from None


def _overview_info(store: RunStore, rows: list[dict], info: dict, out: Path) -> dict[str, Any]:
    """The overview's header: the run, every task (name, samples, file, loss) and what all pairs
    share (model, attention, Fisher, score settings, provenance: `info` of any pair)."""
    parent = None if (lp := local_path(store.path)) is None else lp.expanduser().resolve().parent
    cfg = store.config().get("tasks") or {}
    n = {}
    for r in rows:  # a task's sample count as its pairs' statistics count it
        for k, m in zip(r["tasks"], r["n"]):
            n.setdefault(k, m)
    tasks = [{"key": k, "name": name, "n": n.get(k), "path": shown_path(cfg.get(k, {}).get("path"), out, parent),
              "loss": _loss_of(cfg.get(k, {}))} for k, name in store.task_names().items()]
    shared = {k: info[k] for k in ("model_class", "dtype", "weights_hash", "heads", "layers", "max_length",
                                   "fisher", "score", "config_hash", "created", "versions")}
    model = store.config().get("model") or {}  # `info` shows its path relative to the pair's folder
    return {"run": shown_path(store.path, out, parent), "tasks": tasks,
            "model": model.get("name") or shown_path(model.get("path"), out, parent) or "?", **shared}


# ---------------------------------------------------------------- the overview page (pure)


def _count_html(n: int | None, word: str, cls: str) -> str:
    if n is None:
        return f"<span class='ns'>– {_e(word)} (no test)</span>"
    return f"<span class='{cls if n else 'ns'}' data-n='{n}'>{n} {_e(word)}</span>"


def _pair_cell(r: dict) -> str:
    c = r["counts"]
    return (f"<td class='pair' data-pair='{_e(r['key'])}'><a href='{_e(r['report'])}' title='the full report of "
            f"{_e(r['names'][0])} vs {_e(r['names'][1])}'>"
            f"{_count_html(c['conflict'], 'conflict', 'up')}<br>{_count_html(c['synergy'], 'synergy', 'down')}<br>"
            f"{_count_html(c['more_overlap'], '▲ more overlap', 'up')} · {_count_html(c['less_overlap'], '▼ less overlap', 'down')}<br>"
            f"<span class='ns'>of {c['family']} slices</span></a></td>")


def _task_matrix_html(tasks: list[dict], rows: list[dict]) -> str:
    """Rows: task A, columns: task B of each pair (A is the earlier task of the job file); each
    unordered pair once, in the upper triangle."""
    by = {tuple(r["tasks"]): r for r in rows}
    keys = [t["key"] for t in tasks]
    name = {t["key"]: t["name"] for t in tasks}
    head = "".join(f"<th scope='col'>B = {_e(name[k])}</th>" for k in keys[1:])
    body = []
    for a in keys[:-1]:
        cells = "".join(_pair_cell(by[(a, b)]) if (a, b) in by else "<td class='none'></td>" for b in keys[1:])
        body.append(f"<tr><th scope='row'>A = {_e(name[a])}</th>{cells}</tr>")
    return f"<table class='tt' id='t-tasks'><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _count_defs(alpha: Any, alternative: Any) -> str:
    """What each number of a pair's cell answers, its unit and its direction."""
    return (
        "<dl class='defs'>"
        "<dt><span class='up'>conflict</span></dt><dd>Question: does a natural-gradient step on B's loss, through this "
        "slice, <i>raise</i> A's loss? Counted: slices where transfer = ⟨ḡ<sub>A</sub>, ḡ<sub>B</sub>⟩ in the (Î+λ)⁻¹ "
        f"metric is below 0 by the transfer test (two-sided, vs 0), BH q ≤ α ({_e(alpha)}) within the pair. Unit: family "
        "slices (block, layer, head; K/V once per KV head). More = more places where training one task hurts the other.</dd>"
        "<dt><span class='down'>synergy</span></dt><dd>The same test with transfer above 0: a step on B's loss "
        "<i>lowers</i> A's loss there. Unit: family slices.</dd>"
        "<dt><span class='up'>▲ more overlap</span> · <span class='down'>▼ less overlap</span></dt><dd>Question: do "
        "the tasks' gradients land on each other's weights more (▲) or less (▼) than random task labels give (not: is "
        "the slice shared or separated, which `sharing` answers)? Counted: slices with a defined "
        "sharing (√(B→A · A→B), 1 = the tasks load the weights alike, → 0 = separated) whose cross-task interference is "
        f"significantly above / below chance (label-permutation null, {_e(alternative)}, BH q ≤ α within the pair). "
        "sharing itself is a ratio without a test; the pair's “heads the tasks share most” table marks the ▼ slices "
        "among its rows. Unit: family slices.</dd></dl>"
    )


def _heads_html(rows: list[dict], top: int) -> str:
    """Per (layer, head), the pairs that conflict there (any block), the heads most pairs
    conflict in first; each block a link to that slice in its pair's report."""
    at: dict[tuple[int, int], dict[str, list[dict]]] = {}
    for r in rows:
        for c in r["conflicts"]:
            at.setdefault((c["layer"], c["head"]), {}).setdefault(r["key"], []).append(c)
    if not at:
        return "<p><b>None.</b> No slice conflicts in any pair (transfer &lt; 0 at BH q ≤ α).</p>"
    by_key = {r["key"]: r for r in rows}
    order = sorted(at, key=lambda lh: (-len(at[lh]), lh))
    body = []
    for layer, h in order[:top]:
        which = []
        for key, slices in at[(layer, h)].items():
            r = by_key[key]
            blocks = ", ".join(f"<a href='{_e(r['report'])}#pairs-{_e(slice_id(c['block'], layer, h))}'>{_e(c['block'])}"
                               + ("" if c["kv_head"] is None else f" (KV {c['kv_head']})") + "</a>" for c in slices)
            which.append(f"<li>{_e(r['names'][0])} × {_e(r['names'][1])}: {blocks}</li>")
        body.append(f"<tr data-layer='{layer}' data-head='{h}'><td class='num'>{layer}</td><td class='num'>{h}</td>"
                    f"<td class='num'>{len(at[(layer, h)])}</td><td><ul style='margin:0;padding-left:1.1em'>"
                    f"{''.join(which)}</ul></td></tr>")
    return (f"<p class='note'>{len(at)} heads (layer, head) conflict in at least one of the {len(rows)} pairs; "
            f"{'all' if len(at) <= top else f'the {top} with the most pairs'} shown, most pairs first. A K/V slice (one "
            "per KV head) is listed under its KV group's first query head, as in each pair's report.</p>"
            "<table id='t-heads'><thead><tr><th>layer</th><th>head</th><th>pairs that conflict here (of "
            f"{len(rows)})</th><th>which pairs (A × B) and in which blocks: transfer &lt; 0, BH q ≤ α within the pair"
            f"</th></tr></thead><tbody>{''.join(body)}</tbody></table>")


def _head_matrix_html(rows: list[dict], top: int) -> str:
    """Task × task per head: one row per head where some pair conflicts or shows synergy (most
    conflicting pairs first, then most synergy), one column per pair with that pair's answer
    at the head: its conflicting and synergy blocks and its sharing range over the blocks."""
    heads = {h for r in rows for h, c in r["heads"].items() if c["conflict"] or c["synergy"]}
    if not heads:
        return "<p><b>None.</b> No slice conflicts or shows synergy in any pair.</p>"

    def n(h: str, what: str) -> int:
        return sum(bool(r["heads"].get(h, {}).get(what)) for r in rows)

    order = sorted(heads, key=lambda h: (-n(h, "conflict"), -n(h, "synergy"), *map(int, h.split("/"))))[:top]
    cols = "".join(f"<th>{_e(r['names'][0])} × {_e(r['names'][1])}</th>" for r in rows)
    body = []
    for h in order:
        cells = []
        for r in rows:
            c = r["heads"].get(h) or {"conflict": [], "synergy": [], "sharing": None}
            parts = ([f"<span class='up'>conflict {_e(' '.join(c['conflict']))}</span>"] if c["conflict"] else []) + (
                [f"<span class='down'>synergy {_e(' '.join(c['synergy']))}</span>"] if c["synergy"] else [])
            share = c["sharing"]
            parts.append(f"<span class='ns'>sharing {share[0]:.2f}–{share[1]:.2f}</span>" if share else "<span class='ns'>–</span>")
            cells.append(f"<td data-pair='{_e(r['key'])}'>{'<br>'.join(parts)}</td>")
        layer, head = h.split("/")
        body.append(f"<tr data-layer='{layer}' data-head='{head}'><td class='num'>{layer}</td><td class='num'>{head}</td>"
                    f"{''.join(cells)}</tr>")
    return (f"<p class='note'>{len(heads)} heads (layer, head) conflict or show synergy in at least one pair; "
            f"{'all' if len(heads) <= top else f'the {top} with the most conflicting pairs'} shown. Per pair (A × B): "
            "the blocks where a step on B's loss raises A's loss (conflict) or lowers it (synergy), transfer test, BH "
            "q ≤ α within the pair; and the range of <i>sharing</i> over the head's blocks (1 = the tasks load the "
            "weights alike, → 0 = separated; a ratio without a test). K/V slices count under their KV group's first "
            "query head.</p><table id='t-head-matrix'><thead><tr><th>layer</th><th>head</th>"
            f"{cols}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _stats_html(rows: list[dict]) -> str:
    """Which statistics the counts come from, and the multiple-testing family each q-value is in."""
    alike = all(r["stats"] == rows[0]["stats"] and r["stats_group"] == rows[0]["stats_group"] for r in rows)
    fam = sorted({r["counts"]["family"] for r in rows})
    text = (f"<p>Each pair is its own multiple-testing family: its q-values are Benjamini–Hochberg <b>within that "
            f"pair</b>, over its {_e(' / '.join(map(str, fam)))} family slices (per score; the transfer test over the "
            f"alignment family), <b>not across the {len(rows)} pairs</b>. Each pair's false discovery rate is controlled at "
            "its own α; the table holds that many separate families, so a few discoveries over all pairs are expected "
            "by chance, and counts are not a jointly corrected list.</p>")
    if alike:
        st = rows[0]["stats"]
        return text + _kv_table([("statistics", f"group <code>{_e(rows[0]['stats_group'])}</code>, the same in every "
                                                 f"pair: {_settings(st)}")]) + _excluded_html(rows)
    body = "".join(f"<tr><td><a href='{_e(r['report'])}'>{_e(r['names'][0])} × {_e(r['names'][1])}</a></td>"
                   f"<td><code>{_e(r['stats_group'])}</code></td><td>{_settings(r['stats'])}</td></tr>" for r in rows)
    return (text + "<p class='note'>The pairs' statistics settings differ:</p><table><thead><tr><th>pair</th>"
            f"<th>group</th><th>settings</th></tr></thead><tbody>{body}</tbody></table>" + _excluded_html(rows))


def _excluded_html(rows: list[dict]) -> str:
    ex = [f"{_e(r['names'][0])} × {_e(r['names'][1])}: {_e(', '.join(r['excluded']))}" for r in rows if r["excluded"]]
    return f"<p><b>Excluded samples</b> (these pairs' statistics leave them out): {'; '.join(ex)}.</p>" if ex else ""


def overview_html(info: dict, rows: list[dict], top: int = 10) -> str:
    """The overview page of a run of more than two tasks: header, task × task counts, the heads
    where pairs conflict, the statistics; self-contained (inline style, no script, no network)."""
    names = ", ".join(t["name"] for t in info["tasks"])
    title = f"qkov report — {len(info['tasks'])} tasks: {names}"
    st = rows[0]["stats"] if rows else {}
    head = [("run", f"<code>{_e(info['run'])}</code>"),
            ("model", f"<code>{_e(info['model'])}</code> ({_e(info['model_class'])}, {_e(info['dtype'])}), "
                      f"weights hash <code>{_e(info['weights_hash'])}</code>"),
            ("attention", f"{_e(info['heads'])}; layers {_e(info['layers'])}")]
    head += [(f"task {t['key']}", f"<b>{_e(t['name'])}</b>: {_e(t['n'])} samples from <code>{_e(t['path'])}</code>; "
                                  f"loss over {_e(t['loss'])}") for t in info["tasks"]]
    head += [("fisher", _settings(info["fisher"])), ("score", _settings(info["score"])),
             ("provenance", f"config hash <code>{_e(info['config_hash'])}</code>, extracted {_e(info['created'])}; "
                            + ", ".join(f"{_e(k)} {_e(v)}" for k, v in info["versions"].items()))]
    sections = [
        "<h2 id='tasks'>Task × task: where each pair conflicts and shares</h2><p class='note'>One cell per task pair "
        "(row: its task A, column: its task B); each counts the pair's family slices by its own tests, and links to "
        "the pair's full report (heatmaps, tables, top sample pairs).</p>",
        _task_matrix_html(info["tasks"], rows), _count_defs(st.get("alpha"), st.get("alternative")),
        "<h2 id='heads'>Heads where pairs conflict</h2>", _heads_html(rows, top),
        "<h2 id='head-matrix'>Task × task per head: which pairs conflict, show synergy, share</h2>",
        _head_matrix_html(rows, top),
        "<h2 id='stats'>Statistics and multiple testing</h2>", _stats_html(rows),
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{_CSS}{_OVERVIEW_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class='sub'>where each pair of tasks conflicts and shares inside "
            f"<code>{_e(info['model'])}</code>, per attention head; one full report per pair</p>"
            f"{_kv_table(head)}{''.join(sections)}</body></html>")
