"""`qkov report`: layer × head heatmaps per block and score, a q-value summary, one HTML page.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot), so making a
report never switches the backend of the caller's session (e.g. a notebook).
The HTML page is self-contained: PNGs embedded as base64 data URIs, inline CSS,
no scripts, so it can be mailed or attached as one file. The PNGs are also
written beside it for slides and papers.

K/V are drawn per KV head: under GQA/MQA the query heads of a group share one
K/V slice, which is one test in the family, so one column per KV head shows each
test once (the figure names the query heads of each column).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import schema
from .errors import UsageError
from .query import describe_values, rank_heads
from .store import RunStore, is_url

REPORT_HTML = "report.html"
SCORE_LABEL = {
    "interference": "mean interference M (≥ 0)",
    "alignment": "mean alignment A (signed; < 0 = conflict)",
}
SIG_MARK = dict(marker="o", color="white", markeredgecolor="black", linestyle="none")
# direction of a significant slice: above or below what label permutations give
SIG_ABOVE = {**SIG_MARK, "marker": "^"}
SIG_BELOW = {**SIG_MARK, "marker": "v"}
DPI = 110


# ---------------------------------------------------------------- data shaping (pure)


def block_matrix(stats: xr.Dataset, score: str, block: str) -> dict[str, Any]:
    """The (layer × column) mean and significance of one block; K/V columns = KV heads.

    Returns values, significant, column labels, the x-axis label and, for shared
    K/V, the query heads of each column.
    """
    s = stats.sel({schema.SCORE: score, schema.BLOCK: block})
    heads = s[schema.HEAD].values
    kv = s[schema.KV_HEAD].values if schema.KV_HEAD in s.coords else heads
    cols = np.arange(heads.size)
    groups = None
    if schema.head_dim(block) == schema.KV_HEAD and np.unique(kv).size < heads.size:
        cols = np.flatnonzero(np.asarray(s["in_family"].values, dtype=bool))  # one representative per KV head
        groups = [[int(h) for h in heads[kv == kv[c]]] for c in cols]
    mean = s["mean"].transpose(schema.LAYER, schema.HEAD).values[:, cols]
    sig = s["significant"].transpose(schema.LAYER, schema.HEAD).values[:, cols].astype(bool)
    # runs written before null_mean existed: direction unknown, drawn as "above"
    null = s["null_mean"].transpose(schema.LAYER, schema.HEAD).values[:, cols] if "null_mean" in s else np.full(mean.shape, -np.inf)
    return {
        "values": np.asarray(mean, dtype=float),
        "significant": sig,
        "above": np.asarray(mean > null, dtype=bool),
        "columns": [int(kv[c]) for c in cols] if groups else [int(heads[c]) for c in cols],
        "xlabel": "KV head" if groups else "head",
        "groups": groups,
        "layers": [int(x) for x in s[schema.LAYER].values],
    }


def _group_note(kv_heads: list[int], groups: list[list[int]]) -> str:
    """'KV 0: q-heads 0–3; KV 1: q-heads 4–7' (contiguous groups as ranges)."""
    spans = [f"{g[0]}–{g[-1]}" if len(g) > 1 and g == list(range(g[0], g[-1] + 1)) else ",".join(map(str, g)) for g in groups]
    return "; ".join(f"KV {k}: q-heads {s}" for k, s in zip(kv_heads, spans))


def n_significant(stats: xr.Dataset, score: str) -> int:
    """Significant slices of a score, counting each K/V test once (in-family entries only)."""
    fam = stats["in_family"].transpose(schema.BLOCK, schema.HEAD).values.astype(bool)[:, None, :]
    sig = stats["significant"].sel({schema.SCORE: score}).transpose(schema.BLOCK, schema.LAYER, schema.HEAD).values
    return int((sig.astype(bool) & fam).sum())


def _ticks(n: int, cell: float, label_inches: float) -> np.ndarray:
    """Every k-th index so that tick labels (about label_inches each) do not overlap."""
    step = max(1, int(np.ceil(label_inches / cell)))
    return np.arange(0, n, step)


# ---------------------------------------------------------------- figures


def _cmap(name: str):
    # NaN cells (no statistic) in neutral grey, distinct from every colour of the maps
    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")


def _cell_inches(n_layers: int, n_cols: int) -> float:
    # cells shrink for big models so the figure stays about page-sized
    return float(min(0.34, 9.0 / max(n_layers, 1), 11.0 / max(n_cols, 1)))


def heatmap_figure(stats: xr.Dataset, score: str, tasks: tuple[str, str]) -> Figure:
    """One row of layer × head panels (Q, K, V, O present) of a score's mean, significant cells dotted."""
    blocks = [str(b) for b in stats[schema.BLOCK].values]
    mats = {b: block_matrix(stats, score, b) for b in blocks}
    n_layers = len(mats[blocks[0]]["layers"])
    total_cols = sum(len(m["columns"]) for m in mats.values())
    cell = _cell_inches(n_layers, total_cols)
    # each panel: its cells plus room for the colorbar and labels
    widths = [max(len(m["columns"]) * cell, 0.9) + 1.3 for m in mats.values()]
    fig = Figure(figsize=(max(sum(widths) + 0.8, 7.0), n_layers * cell + 2.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(blocks), width_ratios=widths, squeeze=False)[0]
    alpha = stats.attrs.get("alpha")
    marker_size = float(np.clip(cell * 72 * 0.45, 3.0, 9.0))  # points, about half a cell
    for ax, b in zip(axes, blocks):
        m = mats[b]
        v = m["values"]
        if score == "alignment":  # signed: diverging map centred on 0
            lim = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
            lim = lim or 1.0
            im = ax.imshow(v, cmap=_cmap("RdBu_r"), vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        else:
            im = ax.imshow(v, cmap=_cmap("viridis"), aspect="auto", interpolation="nearest")
        for where, mark in ((m["significant"] & m["above"], SIG_ABOVE), (m["significant"] & ~m["above"], SIG_BELOW)):
            rows, cols = np.nonzero(where)
            ax.plot(cols, rows, markersize=marker_size, markeredgewidth=1.0, **mark)
        xt, yt = _ticks(len(m["columns"]), cell, 0.24), _ticks(n_layers, cell, 0.15)
        ax.set_xticks(xt, [str(m["columns"][i]) for i in xt])
        ax.set_yticks(yt, [str(m["layers"][i]) for i in yt])
        ax.set_xlabel(m["xlabel"])
        ax.set_ylabel("layer")
        ax.tick_params(labelsize=8)
        ax.set_title(f"{b} · {score}" + ("\n(per KV head)" if m["groups"] else ""), fontsize=10)
        # a full-height bar about 0.13 in thick, whatever the panel's shape
        cax = ax.inset_axes([1.04, 0.0, 0.13 / max(len(m["columns"]) * cell, 0.9), 1.0])
        cb = fig.colorbar(im, cax=cax)
        cb.set_label(SCORE_LABEL.get(score, f"mean {score}"), fontsize=8)
        cb.ax.tick_params(labelsize=7)
        cb.formatter.set_powerlimits((-3, 4))
    fig.suptitle(f"{score} (mean over {tasks[0]}×{tasks[1]} pairs), by layer × head", fontsize=12)
    notes = [f"significant: BH q ≤ α = {alpha} over the family of {stats.attrs.get('family_size', '?')} slices "
             f"(alternative: {stats.attrs.get('alternative', '?')}); each panel has its own color scale"]
    shared = next((m for m in mats.values() if m["groups"]), None)
    if shared:
        notes.append("K/V: GQA groups share one K/V slice (one test each), drawn once per KV head — "
                     + _group_note(shared["columns"], shared["groups"]))
    handles = [Line2D([], [], markersize=7, markeredgewidth=1.0, **SIG_ABOVE),
               Line2D([], [], markersize=7, markeredgewidth=1.0, **SIG_BELOW)]
    labels = ["significant, above the permutation null (more than chance)\n" + "\n".join(notes),
              "significant, below the permutation null (less than chance)"]
    fig.legend(handles, labels, loc="outside lower center", frameon=False, fontsize=8, ncols=2)
    return fig


def summary_figure(stats: xr.Dataset) -> Figure:
    """-log10 q of every family slice, per block and score, with α and the permutation floor."""
    scores = [str(s) for s in stats[schema.SCORE].values]
    blocks = [str(b) for b in stats[schema.BLOCK].values]
    alpha = float(stats.attrs.get("alpha", 0.05))
    n_perm = stats.attrs.get("n_permutations")
    fig = Figure(figsize=(5.2 * len(scores) + 0.6, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(scores), sharey=True, squeeze=False)[0]
    rng = np.random.default_rng(0)  # fixed jitter: the same run gives the same picture
    floor = np.log10(1 + n_perm) if n_perm else None
    top = max(-np.log10(alpha), floor or 0.0)
    for ax, score in zip(axes, scores):
        for i, b in enumerate(blocks):
            s = stats.sel({schema.SCORE: score, schema.BLOCK: b})
            fam = np.asarray(s["in_family"].values, dtype=bool)
            q = s["q_value"].transpose(schema.LAYER, schema.HEAD).values[:, fam].ravel()
            sig = s["significant"].transpose(schema.LAYER, schema.HEAD).values[:, fam].ravel().astype(bool)
            y = -np.log10(np.clip(q, 1e-300, 1.0))
            top = max(top, float(np.nanmax(y)) if np.isfinite(y).any() else 0.0)
            x = i + rng.uniform(-0.22, 0.22, y.size)
            ax.scatter(x[~sig], y[~sig], s=14, color="#9e9e9e", alpha=0.8, linewidths=0)
            ax.scatter(x[sig], y[sig], s=22, color="#d62728", edgecolors="black", linewidths=0.5)
            ax.annotate(f"{int(sig.sum())}/{sig.size}", (i, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, -4), textcoords="offset points", ha="center", va="top", fontsize=8)
        ax.axhline(-np.log10(alpha), color="#d62728", linestyle="--", linewidth=1)
        if floor:
            ax.axhline(floor, color="#555555", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_xlim(-0.6, len(blocks) - 0.4)
        ax.set_xlabel("block")
        ax.set_title(f"{score}: BH q-value of each slice (significant / family per block)", fontsize=10)
        ax.grid(axis="y", color="#eeeeee")
    axes[0].set_ylabel("−log10 q  (higher = stronger evidence)")
    axes[0].set_ylim(0, top * 1.18 + 0.05)
    handles = [Line2D([], [], marker="o", color="#d62728", markeredgecolor="black", linestyle="none"),
               Line2D([], [], marker="o", color="#9e9e9e", linestyle="none"),
               Line2D([], [], color="#d62728", linestyle="--")]
    labels = ["significant slice", "not significant", f"α = {alpha}"]
    if floor:
        handles.append(Line2D([], [], color="#555555", linestyle=":"))
        labels.append(f"smallest attainable p = 1/(1+{n_perm} permutations)")
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False, fontsize=8)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


# ---------------------------------------------------------------- run information (I/O)


def run_info(store: RunStore, stats: xr.Dataset, stats_group: str = schema.STATS) -> dict[str, Any]:
    """What the page header shows: model, tasks, sample counts, settings, provenance."""
    grads = store.group_attrs(schema.GRADIENTS) or {}
    prov = store.provenance(schema.GRADIENTS)
    cfg = prov.get("config") or store.config()
    model = cfg.get("model", {})
    layout = prov.get("layout", {})
    tasks = cfg.get("tasks", {})
    fisher = store.group_attrs(schema.FISHER) or {}
    return {
        "run": store.path,
        "model": model.get("name") or model.get("path") or "?",
        "model_class": layout.get("model_class"),
        "dtype": model.get("dtype"),
        "weights_hash": grads.get(schema.ATTR_WEIGHTS_HASH),
        "heads": f"{layout.get('n_heads', '?')} query heads, {layout.get('n_kv_heads', '?')} KV heads, "
                 f"head_dim {layout.get('head_dim', '?')}",
        "layers": describe_values([int(x) for x in stats[schema.LAYER].values]) + f" (of {layout.get('n_layers', '?')})",
        "task_a": {"name": grads.get(schema.ATTR_TASK_A), "path": tasks.get("a", {}).get("path"), "n": stats.attrs.get(schema.ATTR_N_A)},
        "task_b": {"name": grads.get(schema.ATTR_TASK_B), "path": tasks.get("b", {}).get("path"), "n": stats.attrs.get(schema.ATTR_N_B)},
        "skipped": list(grads.get(schema.ATTR_SKIPPED_SAMPLES, [])),
        "max_length": model.get("max_length"),
        "fisher": {k: fisher.get(k) for k in ("source", "beta", "batch_size", "damping_rel", "damping_abs") if k in fisher},
        "score": {k: v for k, v in cfg.get("score", {}).items() if k in ("mode", "sketch_dim", "storage_dtype", "include_bias")},
        "stats": {k: stats.attrs.get(k) for k in ("null", "alternative", "n_permutations", "n_bootstrap", "alpha",
                                                 "ci_level", "seed", "family_size") if k in stats.attrs},
        "stats_group": stats_group,
        "stats_created": (stats.attrs.get(schema.ATTR_PROVENANCE) or {}).get("created"),
        "config_hash": prov.get("config_hash"),
        "created": prov.get("created"),
        "versions": prov.get("versions", {}),
    }


# ---------------------------------------------------------------- HTML (pure)

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1240px;
     color:#1f2328;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.1em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
.sub{color:#57606a;margin-top:0} code{background:#f6f8fa;padding:1px 4px;border-radius:4px;font-size:.92em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.sig td{background:#fff1f0} .grid{display:grid;grid-template-columns:max-content 1fr;gap:0}
figure{margin:.8em 0 1.6em} figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:.9em;margin-top:.3em} .note{color:#57606a;font-size:.9em}
"""


def _e(x: Any) -> str:
    return html.escape("–" if x is None else str(x))


def _num(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _pct(level: Any) -> str:
    return "–" if level is None else f"{100 * float(level):g}%"


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _settings(d: dict) -> str:
    return ", ".join(f"{_e(k)}=<code>{_e(v)}</code>" for k, v in d.items()) or "–"


def _heads_table(rows: list[dict], n_sig: int, family: Any, alpha: Any, ci_level: Any) -> str:
    if not rows:
        return "<p class='note'>no slices to rank.</p>"
    head = "".join(f"<th>{c}</th>" for c in ("#", "block", "layer", "head", "mean", f"{_pct(ci_level)} CI", "p",
                                              "q (BH)", "p_fwer (max-T)", "significant"))
    body = []
    for i, r in enumerate(rows, 1):
        hd = f"{r['head']} (KV {r['kv_head']})" if r["kv_head"] is not None else str(r["head"])
        body.append(
            f"<tr class='{'sig' if r['significant'] else ''}'><td class='num'>{i}</td><td>{_e(r['block'])}</td>"
            f"<td class='num'>{r['layer']}</td><td class='num'>{_e(hd)}</td><td class='num'>{_num(r['mean'])}</td>"
            f"<td class='num'>[{_num(r['ci_low'], '.3g')}, {_num(r['ci_high'], '.3g')}]</td>"
            f"<td class='num'>{_num(r['p_value'], '.3g')}</td><td class='num'>{_num(r['q_value'], '.3g')}</td>"
            f"<td class='num'>{_num(r['p_fwer'], '.3g')}</td><td>{'yes' if r['significant'] else 'no'}</td></tr>"
        )
    caption = (f"<p class='note'>{n_sig} of {_e(family)} family slices significant at BH q ≤ {_e(alpha)}; "
               f"the {len(rows)} smallest q-values shown (ties: larger mean first). "
               "K/V rows are one test per KV head, shown with the first query head of its group "
               "(use that head with <code>qkov query</code>).</p>")
    return f"{caption}<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(info: dict, figures: list[dict], tables: dict[str, str]) -> str:
    """The page. figures: {title, caption, png (bytes)}; tables: score → HTML table."""
    a, b = info["task_a"], info["task_b"]
    title = f"qkov report — {a['name']} vs {b['name']}"
    st = info["stats"]
    rows = [
        ("run", f"<code>{_e(info['run'])}</code>"),
        ("model", f"<code>{_e(info['model'])}</code> ({_e(info['model_class'])}, {_e(info['dtype'])}), "
                  f"weights hash <code>{_e(info['weights_hash'])}</code>"),
        ("attention", f"{_e(info['heads'])}; layers {_e(info['layers'])}"),
        ("task A", f"<b>{_e(a['name'])}</b>: {_e(a['n'])} samples from <code>{_e(a['path'])}</code>"),
        ("task B", f"<b>{_e(b['name'])}</b>: {_e(b['n'])} samples from <code>{_e(b['path'])}</code>"),
        ("pairs", f"{_e((a['n'] or 0) * (b['n'] or 0))} (A×B) per slice; max_length {_e(info['max_length'])}"
                  + (f"; skipped for non-finite gradients: {_e(', '.join(info['skipped']))}" if info["skipped"] else "")),
        ("fisher", _settings(info["fisher"])),
        ("score", _settings(info["score"])),
        ("statistics", f"group <code>{_e(info['stats_group'])}</code> ({_e(info['stats_created'])}): " + _settings(st)),
        ("provenance", f"config hash <code>{_e(info['config_hash'])}</code>, extracted {_e(info['created'])}; "
                       + ", ".join(f"{_e(k)} {_e(v)}" for k, v in info["versions"].items())),
    ]
    figs = "".join(
        f"<h2>{_e(f['title'])}</h2><figure><img alt='{_e(f['title'])}' "
        f"src='data:image/png;base64,{base64.b64encode(f['png']).decode('ascii')}'>"
        f"<figcaption>{f['caption']}</figcaption></figure>"
        for f in figures
    )
    tabs = "".join(f"<h2>Top heads — {_e(score)}</h2>{t}" for score, t in tables.items())
    how = (
        "<p class='note'>Each cell is one attention slice (block, layer, head): the mean over all "
        f"{_e(a['name'])}×{_e(b['name'])} sample pairs of the Fisher-normalised interference "
        "M = Σ g<sub>i</sub>²/(Î+λ)·|g<sub>j</sub>| or alignment A = Σ g<sub>i</sub>g<sub>j</sub>/(Î+λ). "
        f"A dot marks a slice whose label-permutation test ({_e(st.get('n_permutations'))} permutations, "
        f"alternative <code>{_e(st.get('alternative'))}</code>) survives Benjamini–Hochberg at "
        f"α = {_e(st.get('alpha'))} over the family of unique slices.</p>"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='sub'>where the two tasks interfere inside "
        f"<code>{_e(info['model'])}</code>, per attention head</p>"
        f"{_kv_table(rows)}{how}{figs}{tabs}</body></html>"
    )


# ---------------------------------------------------------------- entry point


def _default_out(run: str, out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        if is_url(str(out_dir)):
            raise UsageError(f"out_dir must be a local folder, got {out_dir}")
        return Path(str(out_dir).removeprefix("file://"))
    if is_url(run):
        raise UsageError(f"the run {run} is remote: pass out_dir (a local folder) for the report")
    # beside the run, not inside it: a plain folder inside the Zarr group makes
    # xarray.open_datatree warn about an unknown hierarchy member
    local = Path(run.removeprefix("file://")).expanduser().resolve()  # `qkov report .` from inside the run
    return local.with_name(local.name + "-report")


REPORT_FILES = (REPORT_HTML, "run_info.json", "summary_q.png")  # and heatmap_<score>.png


def _check_out_dir(out: Path) -> None:
    """The report folder is new, empty, or an earlier qkov report (its run_info.json says so):
    a user's own report.html (or a file where the folder should be) is never overwritten."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"cannot write the report to {out}: it is a file, not a folder. Choose another --out.")
    if not out.is_dir():
        return
    ours = False
    try:
        ours = "run" in json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        pass
    clash = sorted(p.name for p in out.iterdir() if p.name in REPORT_FILES or (p.name.startswith("heatmap_") and p.suffix == ".png"))
    if clash and not ours:
        raise UsageError(f"{out} holds {', '.join(clash)} that qkov did not write; refusing to overwrite them. "
                         "Choose another --out (a new or empty folder, or an earlier qkov report).")


def make_report(run: "str | RunStore", out_dir: str | Path | None = None, storage_options: dict | None = None,
                stats_name: str | None = None, top: int = 10) -> Path:
    """Write heatmap PNGs, a q-value summary PNG and `report.html` (self-contained); returns the HTML path.

    `out_dir` defaults to `<run>-report` (beside the run) for local runs and is required for URLs.
    `stats_name` reports `stats_<name>` instead of `stats`.
    """
    store = RunStore.coerce(run, storage_options)
    out = _default_out(store.path, out_dir)
    store.require(schema.GRADIENTS, "the report")
    stats = store.open_stats(stats_name)
    info = run_info(store, stats, schema.stats_group(stats_name))
    tasks = (str(info["task_a"]["name"]), str(info["task_b"]["name"]))
    _check_out_dir(out)
    try:
        path = _write_report(out, stats, info, tasks, top)
        _add_health_panel(path, store, stats)
        return path
    except OSError as e:
        raise UsageError(f"cannot write the report to {out}: {e.strerror or e}. Choose a writable --out.") from None


def _add_health_panel(page: Path, store: RunStore, stats: xr.Dataset, top: int = 10) -> None:
    """Issue 19: a compact "Numerical health" section (ill-conditioned slices, samples flagged as
    norm outliers most often, samples the statistics exclude) appended to the written page."""
    from .diagnostics import health_summary, open_diagnostics

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


def _write_report(out: Path, stats, info: dict, tasks: tuple[str, str], top: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)

    figures = []
    scores = [str(s) for s in stats[schema.SCORE].values]
    for score in scores:
        png = png_bytes(heatmap_figure(stats, score, tasks))
        (out / f"heatmap_{score}.png").write_bytes(png)
        figures.append({"title": f"{score.capitalize()} by layer × head",
                        "caption": html.escape(f"Mean {score} over {tasks[0]}×{tasks[1]} pairs per slice; "
                                               f"dots: significant slices. File heatmap_{score}.png."),
                        "png": png})
    png = png_bytes(summary_figure(stats))
    (out / "summary_q.png").write_bytes(png)
    figures.append({"title": "Evidence per block",
                    "caption": "−log10 BH q-value of every slice in the family, per block; points above the dashed "
                               "line are significant. File summary_q.png.",
                    "png": png})

    tables = {}
    alpha, family = stats.attrs.get("alpha"), stats.attrs.get("family_size")
    for score in scores:
        tables[score] = _heads_table(rank_heads(stats, score, top), n_significant(stats, score), family, alpha,
                                     stats.attrs.get("ci_level"))
    path = out / REPORT_HTML
    path.write_text(render_html(info, figures, tables), encoding="utf-8")
    (out / "run_info.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
    return path
