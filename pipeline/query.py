"""Reading a run's results by head: `qkov query` and the run summary's top heads.

Everything returned is plain JSON-able Python (str, int, float, bool, None, lists,
dicts) so the CLI can print it as tables or `--json`; NaN statistics become None.
Sample ids are the users' ids; each pair carries the beginning of both samples'
texts from `gradients` (pre-tokenised samples have no text and say so).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from . import schema
from .errors import UsageError
from .store import RunStore

STAT_VARS: tuple[str, ...] = ("mean", "ci_low", "ci_high", "p_value", "q_value", "p_fwer", "significant")
SETTINGS_SHOWN: tuple[str, ...] = ("null", "alternative", "n_permutations", "n_bootstrap", "alpha", "ci_level", "seed")
TEXT = schema.TEXT  # the gradients coord holding each sample's first characters


def load_stats(run: "str | RunStore", stats_name: str | None = None, storage_options: dict | None = None) -> xr.Dataset:
    """The (loaded) `stats` or `stats_<name>` group; a StoreError naming the stage when it is missing."""
    return RunStore.coerce(run, storage_options).open_stats(stats_name)


def _num(x: Any) -> Any:
    """numpy scalar or 0-d array → JSON-able Python; NaN → None."""
    if isinstance(x, np.ndarray):
        x = x.item()
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    x = float(x)
    return None if math.isnan(x) else x


def describe_values(valid: list) -> str:
    """`0..31` for a contiguous integer range, else the values listed."""
    if len(valid) > 1 and all(isinstance(v, int) for v in valid) and valid == list(range(valid[0], valid[-1] + 1)):
        return f"{valid[0]}..{valid[-1]}"
    return ", ".join(map(str, valid))


def _check_choice(what: str, value: Any, valid: list) -> None:
    if value not in valid:
        raise UsageError(f"{what} {value!r} is out of range; this run has {what}s {describe_values(valid)}")


def _grouped(stats: xr.Dataset) -> bool:
    """GQA/MQA: fewer KV heads than query heads, so K/V slices are shared and named by KV head."""
    kv = stats[schema.KV_HEAD].values
    return np.unique(kv).size < kv.size


def _slice_stats(stats: xr.Dataset, score: str, block: str, layer: int, head: int) -> dict[str, Any]:
    s = stats.sel({schema.SCORE: score, schema.BLOCK: block, schema.LAYER: layer, schema.HEAD: head})
    out = {v: _num(s[v].values) for v in STAT_VARS}
    # what label permutations give; absent in runs written before it was recorded
    out["null_mean"] = _num(s["null_mean"].values) if "null_mean" in s else None
    return out


def _sample_info(store: RunStore) -> dict[tuple[str, str], dict[str, Any]]:
    """(task, sample_id) → text preview, token count, loss; keyed by task so that A and B may reuse ids."""
    g = store.open_gradients(decode=False)
    ids = [str(x) for x in g[schema.SAMPLE_ID].values]  # StringDType/object arrays: no fixed-width cast
    tasks = [str(x) for x in g[schema.TASK].values]
    texts = [str(x) for x in g[TEXT].values] if TEXT in g.coords else [""] * len(ids)
    n_tok = g[schema.N_TOKENS].values
    loss = g[schema.LOSS].values
    return {
        (t, i): {"text": x or None, "pretokenised": not x, "n_tokens": int(n), "loss": _num(lo)}
        for t, i, x, n, lo in zip(tasks, ids, texts, n_tok, loss)
    }


def _pairs(scores: xr.Dataset, layer: int, head: int, block: str, top: int, score: str) -> list[dict]:
    """Top pairs from `score.top_pairs`. Interference: highest first. Alignment: most
    negative first, the conflicting pairs (a natural-gradient step on j raises i's loss)."""
    from .score import top_pairs

    if score == "alignment":
        neg = scores[[score]].copy()
        neg[score] = -neg[score]
        out = top_pairs(neg, layer, head, block, top, score)
        return [{**p, score: -p[score]} for p in out]
    return top_pairs(scores, layer, head, block, top, score)


def ranking(score: str) -> str:
    return "most negative alignment first (conflicting pairs)" if score == "alignment" else f"highest {score} first"


def query_head(run: "str | RunStore", layer: int, head: int, block: str | None = None, top: int = 10,
               score: str = "interference", storage_options: dict | None = None,
               stats_name: str | None = None) -> dict[str, Any]:
    """One head's statistics per block (both scores) and its top `top` sample pairs by `score`.

    `layer` is the model's layer index (as stored in the run), `head` the query head;
    K/V entries are those of the head's KV head (GQA/MQA; `kv_head` is None when every
    query head has its own K/V). `stats_name` reads
    `stats_<name>` (written by `qkov stats --name`).
    """
    if score not in schema.SCORES:
        raise UsageError(f"score {score!r} is unknown; choose one of {', '.join(schema.SCORES)}")
    if top < 0:
        raise UsageError(f"top must be >= 0, got {top}")
    store = RunStore.coerce(run, storage_options)
    for group in (schema.GRADIENTS, schema.SCORES_GROUP, schema.stats_group(stats_name)):
        store.require(group)
    scores = store.open_scores()
    stats = store.open_stats(stats_name)
    layers = [int(x) for x in stats[schema.LAYER].values]
    heads = [int(x) for x in stats[schema.HEAD].values]
    blocks = [str(b) for b in stats[schema.BLOCK].values]
    _check_choice("layer", layer, layers)
    _check_choice("head", head, heads)
    if block is not None:
        block = block.upper()
        _check_choice("block", block, blocks)
    chosen = blocks if block is None else [block]
    kv = int(stats[schema.KV_HEAD].sel({schema.HEAD: head}).values)
    grouped = _grouped(stats)
    task_a, task_b = str(scores.attrs[schema.ATTR_TASK_A]), str(scores.attrs[schema.ATTR_TASK_B])
    info = _sample_info(store)

    def _pair_row(p: dict, rank: int) -> dict:
        a, b = info.get((task_a, p["sample_a"]), {}), info.get((task_b, p["sample_b"]), {})
        return {"rank": rank, "sample_a": p["sample_a"], "sample_b": p["sample_b"], score: p[score],
                "text_a": a.get("text"), "text_b": b.get("text"),
                "pretokenised_a": a.get("pretokenised"), "pretokenised_b": b.get("pretokenised"),
                "n_tokens_a": a.get("n_tokens"), "n_tokens_b": b.get("n_tokens"),
                "loss_a": a.get("loss"), "loss_b": b.get("loss")}

    from .diagnostics import head_diagnostics, open_diagnostics

    diag = open_diagnostics(store)  # None for runs written before diagnostics were recorded
    per_block = []
    for b in chosen:
        shared = grouped and schema.head_dim(b) == schema.KV_HEAD
        pairs = _pairs(scores, layer, head, b, top, score)
        per_block.append({
            "block": b,
            "kv_head": kv if shared else None,
            "in_family": bool(stats["in_family"].sel({schema.BLOCK: b, schema.HEAD: head}).values),
            "stats": {s: _slice_stats(stats, s, b, layer, head) for s in (str(x) for x in stats[schema.SCORE].values)},
            "top_pairs": [_pair_row(p, r + 1) for r, p in enumerate(pairs)],
            "diagnostics": None if diag is None else head_diagnostics(diag, b, layer, head, pairs, run=store.path),
        })
    return {
        "run": store.path,
        "layer": layer,
        "head": head,
        "kv_head": kv if grouped else None,
        "score": score,
        "ranking": ranking(score),
        "tasks": {"a": task_a, "b": task_b},
        "n_a": int(scores.sizes[schema.SAMPLE_A]),
        "n_b": int(scores.sizes[schema.SAMPLE_B]),
        "stats_group": schema.stats_group(stats_name),
        "excluded_samples": list(stats.attrs.get(schema.ATTR_EXCLUDED) or []),  # `qkov stats --exclude`
        "settings": {k: stats.attrs.get(k) for k in SETTINGS_SHOWN if k in stats.attrs},
        "blocks": per_block,
    }


def significant_heads(run: "str | RunStore", score: str = "interference", top: int = 10, storage_options: dict | None = None,
                      stats_name: str | None = None, only_significant: bool = False) -> list[dict]:
    """The `top` in-family slices with the smallest q-values (ties: larger effect first).

    Each entry: block, layer, head, kv_head (a K/V entry's KV head under GQA/MQA, else
    None), score and the slice's statistics.
    `only_significant` drops slices with q > alpha.
    """
    if score not in schema.SCORES:
        raise UsageError(f"score {score!r} is unknown; choose one of {', '.join(schema.SCORES)}")
    stats = load_stats(run, stats_name, storage_options)
    return rank_heads(stats, score, top, only_significant)


def rank_heads(stats: xr.Dataset, score: str, top: int = 10, only_significant: bool = False) -> list[dict]:
    """`significant_heads` on an opened stats dataset (pure; the report uses it too)."""
    if score not in [str(s) for s in stats[schema.SCORE].values]:
        return []
    s = stats.sel({schema.SCORE: score})
    fam = np.broadcast_to(s["in_family"].transpose(schema.BLOCK, schema.HEAD).values[:, None, :],
                          (s.sizes[schema.BLOCK], s.sizes[schema.LAYER], s.sizes[schema.HEAD]))
    arr = {v: s[v].transpose(schema.BLOCK, schema.LAYER, schema.HEAD).values for v in STAT_VARS}
    keep = fam & ~np.isnan(arr["q_value"])
    if only_significant:
        keep &= arr["significant"].astype(bool)
    bi, li, hi = np.nonzero(keep)
    # effect in the tested direction breaks q ties ("less": smaller mean is stronger)
    sign = -1.0 if stats.attrs.get("alternative") == "less" else 1.0
    order = np.lexsort((-sign * arr["mean"][bi, li, hi], arr["q_value"][bi, li, hi]))[:top]
    blocks, layers, heads = s[schema.BLOCK].values, s[schema.LAYER].values, s[schema.HEAD].values
    kv = s[schema.KV_HEAD].values
    grouped = _grouped(stats)
    out = []
    for k in order:
        b, l, h = bi[k], li[k], hi[k]
        shared = grouped and schema.head_dim(str(blocks[b])) == schema.KV_HEAD
        out.append({"block": str(blocks[b]), "layer": int(layers[l]), "head": int(heads[h]),
                    "kv_head": int(kv[h]) if shared else None, "score": score,
                    **{v: _num(arr[v][b, l, h]) for v in STAT_VARS}})
    return out


# ---------------------------------------------------------------- rich rendering


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _preview(text: str | None, pretok: bool | None, n_tokens: int | None, width: int = 60) -> str:
    if pretok or text is None:
        return f"(pre-tokenised, {n_tokens} tokens)"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _plain(x: Any):
    """Text the user wrote (sample ids, text previews, task and group names) as a rich Text,
    so that rich never reads it as markup: `ordered[mid]` stays as written, `[/]` is shown."""
    from rich.text import Text

    return Text(str(x))


def _stats_table(res: dict):
    from rich.table import Table

    settings = res["settings"]
    kv = f" (KV head {res['kv_head']})" if res["kv_head"] is not None else ""
    t = Table(title=_plain(f"layer {res['layer']} · head {res['head']}{kv} — "
                           f"{res['tasks']['a']} × {res['tasks']['b']}, {res['n_a']}×{res['n_b']} pairs"),
              caption=_plain(f"{res['stats_group']}: {settings.get('alternative')}, {settings.get('n_permutations')} "
                             f"permutations, BH q ≤ α={settings.get('alpha')} marks significant; p_fwer = max-T; "
                             f"CI {settings.get('ci_level')} bootstrap; chance = mean over the label permutations"),
              title_justify="left", caption_justify="left")
    for col, just in (("block", "left"), ("score", "left"), ("mean", "right"), ("chance", "right"), ("CI", "right"),
                      ("p", "right"), ("q (BH)", "right"), ("p_fwer", "right"), ("sig.", "center")):
        t.add_column(col, justify=just)
    for blk in res["blocks"]:
        label = blk["block"] + (f" (kv {blk['kv_head']})" if blk["kv_head"] is not None else "")
        for i, (score, s) in enumerate(blk["stats"].items()):
            t.add_row(label if i == 0 else "", score, _fmt(s["mean"]), _fmt(s.get("null_mean")),
                      _plain(f"[{_fmt(s['ci_low'], '.3g')}, {_fmt(s['ci_high'], '.3g')}]"), _fmt(s["p_value"], ".3g"), _fmt(s["q_value"], ".3g"), _fmt(s["p_fwer"], ".3g"),
                      "[bold green]✔[/]" if s["significant"] else "", end_section=i == len(blk["stats"]) - 1)
    return t


def _pairs_table(res: dict, blk: dict):
    from rich.table import Table

    score = res["score"]
    t = Table(title=_plain(f"{blk['block']} · top {len(blk['top_pairs'])} pairs, {res['ranking']}"),
              title_justify="left")
    t.add_column("#", justify="right")
    t.add_column(_plain(f"{res['tasks']['a']} id"))
    t.add_column(_plain(f"{res['tasks']['b']} id"))
    t.add_column(score, justify="right")
    t.add_column(_plain(f"{res['tasks']['a']} text"), overflow="fold")
    t.add_column(_plain(f"{res['tasks']['b']} text"), overflow="fold")
    for p in blk["top_pairs"]:
        t.add_row(str(p["rank"]), _plain(p["sample_a"]), _plain(p["sample_b"]), _fmt(p[score]),
                  _plain(_preview(p["text_a"], p["pretokenised_a"], p["n_tokens_a"])),
                  _plain(_preview(p["text_b"], p["pretokenised_b"], p["n_tokens_b"])))
    return t


def format_query(result: dict):
    """A rich renderable of `query_head`'s result: the stats table, then each block's top pairs."""
    from rich.console import Group

    parts = [_stats_table(result)]
    parts += [_pairs_table(result, blk) for blk in result["blocks"] if blk["top_pairs"]]
    from .diagnostics import format_head_diagnostics  # health, outlier warning, most interfering samples

    parts += [d for d in (format_head_diagnostics(result, blk) for blk in result["blocks"]) if d is not None]
    return Group(*parts)


def format_significant(rows: list[dict]):
    """A rich table of `significant_heads` for the run summary."""
    from rich.table import Table
    from rich.text import Text

    if not rows:
        return Text("no statistics to rank (no in-family slices with a q-value)")
    score = rows[0]["score"]
    n_sig = sum(bool(r["significant"]) for r in rows)
    t = Table(title=f"top {len(rows)} slices by q-value ({score}); {n_sig} of them significant", title_justify="left")
    for col in ("block", "layer", "head", "mean", "CI", "p", "q (BH)", "p_fwer", "sig."):
        t.add_column(col, justify="left" if col == "block" else "right")
    for r in rows:
        head = f"{r['head']} (kv {r['kv_head']})" if r["kv_head"] is not None else str(r["head"])
        t.add_row(r["block"], str(r["layer"]), head, _fmt(r["mean"]),
                  _plain(f"[{_fmt(r['ci_low'], '.3g')}, {_fmt(r['ci_high'], '.3g')}]"), _fmt(r["p_value"], ".3g"),
                  _fmt(r["q_value"], ".3g"), _fmt(r["p_fwer"], ".3g"), "[bold green]✔[/]" if r["significant"] else "")
    return t
