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

from qkov.workers.reductions import ab_margins

from . import schema
from .errors import UsageError
from .schema import STATS_VARS as V
from .store import RunStore

# the labels-null test's numbers shown for a slice, in the order shown
STAT_VARS: tuple[str, ...] = (V.mean, V.ci_low, V.ci_high, V.p_value, V.q_value, V.p_fwer, V.significant)
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


# effect sizes shown with a head's statistics when the run has them (issue 16): per score,
# and per slice of one score (sharing: interference; transfer, cosine: alignment)
EFFECT_VARS, OWN_VARS = schema.HEAD_EFFECT_VARS, schema.OWN_VARS


def _slice_stats(stats: xr.Dataset, score: str, block: str, layer: int, head: int) -> dict[str, Any]:
    where = {schema.BLOCK: block, schema.LAYER: layer, schema.HEAD: head}
    s = stats.sel({schema.SCORE: score, **where})
    out = {v: _num(s[v].values) for v in STAT_VARS}
    # what label permutations give; absent in runs written before it was recorded
    out["null_mean"] = _num(s[V.null_mean].values) if V.null_mean in s else None
    out.update({v: _num(s[v].values) for v in EFFECT_VARS if v in s})
    own = stats.sel(where)
    out.update({v: _num(own[v].values) for v in OWN_VARS.get(score, ()) if v in stats})
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


def kept_pairs(scores: xr.Dataset, score: str) -> int | None:
    """How many pairs per slice a keep_pairs = "top" run kept of `score` (its top_k), else None
    (keep_pairs = "all" keeps every pair; "none" keeps none and lists none)."""
    name = schema.top_name(score)
    return int(scores[name].shape[-1]) if score not in scores and name in scores else None


def _pairs(scores: xr.Dataset, layer: int, head: int, block: str, top: int, score: str) -> list[dict]:
    """Top pairs from `score.top_pairs`. Interference: highest first. Alignment: most
    negative first, the conflicting pairs (a natural-gradient step on j raises i's loss).
    A keep_pairs = "top" run lists at most the top_k pairs it kept."""
    from .pairs import top_pairs

    kept = kept_pairs(scores, score)
    top = top if kept is None else min(top, kept)

    if score == "alignment" and score in scores:  # (keep_pairs = "top" stores the most negative ones already)
        neg = scores[[score]].copy()
        neg[score] = -neg[score]
        out = top_pairs(neg, layer, head, block, top, score)
        return [{**p, score: -p[score]} for p in out]
    return top_pairs(scores, layer, head, block, top, score)


# What the alignment marginals answer (stated with every number, as the stats' attrs are).
MARGINAL_DOCS = {
    "question": "Which samples drive the transfer between the tasks in this slice? Per sample of A, its mean "
                "alignment with B's samples (row mean of the A x B block); per sample of B, its mean alignment "
                "with A's samples (column mean). transfer is the mean of either set, so the most negative ones "
                "drive a conflict",
    "units": "alignment units (as transfer); contribution = marginal / the task's sample count, which sums to "
             "transfer over the task's samples",
    "direction": "negative = the sample conflicts with the other task (a step on one raises the other's loss); "
                 "most negative first",
}


def alignment_marginals(scores: xr.Dataset, block: str, layer: int, head: int, top: int = 5) -> dict | None:
    """The samples whose mean alignment with the other task drives the slice's transfer
    most negative (a conflict): the row/column means of the A×B block that the transfer test
    uses (`qkov.workers.reductions.ab_margins`), from the statistics' stored sums where the score stage kept
    them (their last N entries) or the pooled alignment. None without either (a run without
    alignment). Keys: question, units, direction, transfer, n_a, n_b, and per task (`a`, `b`)
    up to `top` samples with a negative marginal, most negative first: sample, marginal,
    contribution (marginal / n, adds up to transfer over the task)."""
    from . import stats as st

    where = {schema.BLOCK: block, schema.LAYER: layer, schema.HEAD: head}
    n = scores.sizes[schema.SAMPLE_I]
    if schema.IS_A in scores.coords:
        is_a = np.asarray(scores[schema.IS_A].values, dtype=bool)
    else:  # store order is A then B
        is_a = np.arange(n) < int(scores.attrs[schema.ATTR_N_A])
    sums, pooled = schema.stat_sums_name("alignment"), schema.pooled_name("alignment")
    if sums in scores:  # A x B margins, raw sums, at the end of the slice's sums
        margins = np.asarray(scores[sums].sel(where).values, dtype=np.float64)[-n:]
    elif pooled in scores:
        margins = ab_margins(np.asarray(scores[pooled].sel(where).values, dtype=np.float64), is_a)
    else:
        return None
    n_a, n_b = int(is_a.sum()), int((~is_a).sum())
    ids = [str(x) for x in scores[schema.SAMPLE_I].values]
    out: dict[str, Any] = dict(MARGINAL_DOCS, n_a=n_a, n_b=n_b)
    for key, mask, other, own in (("a", is_a, n_b, n_a), ("b", ~is_a, n_a, n_b)):
        idx = np.flatnonzero(mask)
        marg = margins[idx] / other
        if key == "a":
            out["transfer"] = _num(marg.mean())
        order = [k for k in np.argsort(marg, kind="stable") if marg[k] < 0][:top]
        out[key] = [{"sample": ids[idx[k]], "marginal": _num(marg[k]), "contribution": _num(marg[k] / own)} for k in order]
    return out


def ranking(score: str) -> str:
    return "most negative alignment first (conflicting pairs)" if score == "alignment" else f"highest {score} first"


def _chosen_blocks(stats: xr.Dataset, layer: int, head: int, block: str | None) -> list[str]:
    """The blocks a head query shows, once `layer`, `head` and `block` are known to be the run's."""
    blocks = [str(b) for b in stats[schema.BLOCK].values]
    _check_choice("layer", layer, [int(x) for x in stats[schema.LAYER].values])
    _check_choice("head", head, [int(x) for x in stats[schema.HEAD].values])
    if block is None:
        return blocks
    _check_choice("block", block.upper(), blocks)
    return [block.upper()]


def _pair_row(info: dict, tasks: tuple[str, str], score: str, p: dict, rank: int) -> dict:
    """One top pair with both samples' text preview, token count and loss."""
    a, b = info.get((tasks[0], p["sample_a"]), {}), info.get((tasks[1], p["sample_b"]), {})
    return {"rank": rank, "sample_a": p["sample_a"], "sample_b": p["sample_b"], score: p[score],
            "text_a": a.get("text"), "text_b": b.get("text"),
            "pretokenised_a": a.get("pretokenised"), "pretokenised_b": b.get("pretokenised"),
            "n_tokens_a": a.get("n_tokens"), "n_tokens_b": b.get("n_tokens"),
            "loss_a": a.get("loss"), "loss_b": b.get("loss")}


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
    chosen = _chosen_blocks(stats, layer, head, block)
    kv = int(stats[schema.KV_HEAD].sel({schema.HEAD: head}).values)
    grouped = _grouped(stats)
    task_a, task_b = str(scores.attrs[schema.ATTR_TASK_A]), str(scores.attrs[schema.ATTR_TASK_B])
    info = _sample_info(store)
    from .health import head_diagnostics, open_diagnostics

    diag = open_diagnostics(store)  # None for runs written before diagnostics were recorded
    per_block = []
    for b in chosen:
        shared = grouped and schema.head_dim(b) == schema.KV_HEAD
        pairs = _pairs(scores, layer, head, b, top, score)
        per_block.append({
            "block": b,
            "alignment_marginals": alignment_marginals(scores, b, layer, head, top=5),
            "kv_head": kv if shared else None,
            "in_family": bool(stats[V.in_family].sel({schema.BLOCK: b, schema.HEAD: head}).values),
            "stats": {s: _slice_stats(stats, s, b, layer, head) for s in (str(x) for x in stats[schema.SCORE].values)},
            "top_pairs": [_pair_row(info, (task_a, task_b), score, p, r + 1) for r, p in enumerate(pairs)],
            "diagnostics": None if diag is None else head_diagnostics(diag, b, layer, head, pairs, run=store.path),
        })
    return {
        "run": store.path,
        "layer": layer,
        "head": head,
        "kv_head": kv if grouped else None,
        "score": score,
        "ranking": ranking(score),
        "top_asked": top,
        "top_kept": kept_pairs(scores, score),  # keep_pairs = "top": the pairs per slice the run kept
        "tasks": {"a": task_a, "b": task_b},
        "n_a": int(scores.sizes[schema.SAMPLE_A]),
        "n_b": int(scores.sizes[schema.SAMPLE_B]),
        "stats_group": schema.stats_group(stats_name),
        "excluded_samples": list(stats.attrs.get(schema.ATTR_EXCLUDED) or []),  # `qkov stats --exclude`
        "settings": {k: stats.attrs.get(k) for k in SETTINGS_SHOWN if k in stats.attrs},
        "blocks": per_block,
    }


# ---------------------------------------------------------------- ranking (pure, on a stats dataset)

# What each headline table answers. The three questions differ, and so do their numbers:
# "conflict" reads the transfer test (alignment: is <g_A, g_B> below 0?), "shared" the
# sharing ratios (interference), "differ" the label-permutation test (mean vs chance).
QUESTIONS: dict[str, str] = {
    "conflict": "heads where the tasks conflict",
    "shared": "heads the tasks share most",
    "differ": "heads where the tasks differ most",
}
# labels of the flag variables: direction (vs chance) and transfer_direction (vs 0)
DIRECTION_WORDS = {1: "▲ above chance", -1: "▼ below chance", 0: "not significant"}
TRANSFER_WORDS = {-1: "conflict", 1: "synergy", 0: "not significant"}


def _family_index(stats: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block, layer, head) indices of the family: every Q/O head, one head per KV group for K/V."""
    fam = np.asarray(stats[V.in_family].transpose(schema.BLOCK, schema.HEAD).values, dtype=bool)
    fam3 = np.broadcast_to(fam[:, None, :], (fam.shape[0], stats.sizes[schema.LAYER], fam.shape[1]))
    return np.nonzero(fam3)


def _values(stats: xr.Dataset, var: str, score: str | None, idx: tuple[np.ndarray, ...]) -> np.ndarray:
    """`var` at the family indices as float; NaN where the run lacks it (older statistics)."""
    n = idx[0].size
    if var not in stats:
        return np.full(n, np.nan)
    v = stats[var]
    if schema.SCORE in v.dims:
        if score not in [str(s) for s in stats[schema.SCORE].values]:
            return np.full(n, np.nan)
        v = v.sel({schema.SCORE: score})
    dims = [d for d in (schema.BLOCK, schema.LAYER, schema.HEAD) if d in v.dims]
    arr = np.asarray(v.transpose(*dims).values, dtype=float)
    return arr[tuple(i for d, i in zip((schema.BLOCK, schema.LAYER, schema.HEAD), idx) if d in v.dims)]


def slice_table(stats: xr.Dataset, score: str) -> dict[str, np.ndarray]:
    """Every family slice's numbers for one score, as flat arrays (the tables and the report's
    hover text read these): ids, the labels-null test, its effect vs chance with CI and
    direction, and the score's own effect sizes. Runs whose statistics predate `effect`
    get effect = mean − null_mean (CI shifted by the same amount)."""
    idx = _family_index(stats)
    bi, li, hi = idx
    blocks, layers, heads = stats[schema.BLOCK].values, stats[schema.LAYER].values, stats[schema.HEAD].values
    kv = stats[schema.KV_HEAD].values
    grouped = _grouped(stats)
    t: dict[str, np.ndarray] = {
        "block": np.array([str(blocks[b]) for b in bi], dtype=object),
        "layer": np.array([int(layers[l]) for l in li]),
        "head": np.array([int(heads[h]) for h in hi]),
        "kv_head": np.array([int(kv[h]) if grouped and schema.head_dim(str(blocks[b])) == schema.KV_HEAD else -1
                             for b, h in zip(bi, hi)]),
    }
    for v in (*STAT_VARS, V.null_mean, *EFFECT_VARS, *OWN_VARS.get(score, ()), V.layer_q_value, V.layer_significant):
        t[v] = _values(stats, v, score, idx)
    if V.effect not in stats:
        t[V.effect] = t[V.mean] - t[V.null_mean]
        t[V.effect_ci_low], t[V.effect_ci_high] = t[V.ci_low] - t[V.null_mean], t[V.ci_high] - t[V.null_mean]
    if V.direction not in stats:
        t[V.direction] = np.where(t[V.significant] > 0, np.sign(np.nan_to_num(t[V.effect])), 0.0)
    # chance as the effect defines it (the exact mean over all label permutations; null_mean is
    # its Monte Carlo estimate), so that mean − chance = effect in every table
    t["chance"] = t[V.mean] - t[V.effect]
    # effect relative to chance: unitless, so slices of different blocks compare (interference > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t["effect_rel"] = t[V.effect] / np.abs(t["chance"])
        if score == "interference" and V.sharing not in stats:  # statistics written before `sharing`
            t[V.sharing] = np.sqrt(t[V.sharing_ab] * t[V.sharing_ba])  # its point estimate; no CI
    return t


def _strength(t: dict[str, np.ndarray], score: str, alternative: str | None) -> np.ndarray:
    """The effect size that breaks q-value ties (many slices sit at the permutation floor),
    larger = stronger in the tested direction; NaN = weakest. Interference: effect / chance
    (comparable across blocks); alignment: effect."""
    e = t["effect_rel"] if score == "interference" else t[V.effect]
    e = {"greater": e, "less": -e}.get(alternative or "", np.abs(e))
    return np.where(np.isfinite(e), e, -np.inf)


def _rows(t: dict[str, np.ndarray], order: np.ndarray, score: str) -> list[dict]:
    out = []
    for k in order:
        r = {"block": str(t["block"][k]), "layer": int(t["layer"][k]), "head": int(t["head"][k]),
             "kv_head": int(t["kv_head"][k]) if t["kv_head"][k] >= 0 else None, "score": score}
        r.update({v: _num(a[k]) for v, a in t.items() if v not in r and v not in ("kv_head",)})
        for flag in (V.significant, V.significant_hier, V.layer_significant):
            if r.get(flag) is not None:
                r[flag] = bool(r[flag])
        for flag in (V.direction, V.transfer_direction):
            if r.get(flag) is not None:
                r[flag] = int(r[flag])
        out.append(r)
    return out


def significant_heads(run: "str | RunStore", score: str = "interference", top: int = 10, storage_options: dict | None = None,
                      stats_name: str | None = None, only_significant: bool = False) -> list[dict]:
    """The `top` in-family slices with the smallest q-values of the labels-null test ("where do
    the tasks differ?"); ties, e.g. at the permutation floor, broken by effect size.

    Each entry: block, layer, head, kv_head (a K/V entry's KV head under GQA/MQA, else
    None), score, the slice's statistics, chance (`null_mean`), `effect` with CI,
    `effect_rel` (effect / chance) and `direction` (+1 above chance, −1 below, 0 not
    significant). `only_significant` drops slices with q > alpha.
    """
    if score not in schema.SCORES:
        raise UsageError(f"score {score!r} is unknown; choose one of {', '.join(schema.SCORES)}")
    stats = load_stats(run, stats_name, storage_options)
    return rank_heads(stats, score, top, only_significant)


def rank_heads(stats: xr.Dataset, score: str, top: int = 10, only_significant: bool = False) -> list[dict]:
    """`significant_heads` on an opened stats dataset (pure; the report uses it too)."""
    if score not in [str(s) for s in stats[schema.SCORE].values]:
        return []
    t = slice_table(stats, score)
    keep = ~np.isnan(t[V.q_value])
    if only_significant:
        keep &= t[V.significant] > 0
    cand = np.flatnonzero(keep)
    strength = _strength(t, score, stats.attrs.get("alternative"))[cand]
    order = cand[np.lexsort((-strength, t[V.q_value][cand]))][:top]
    rows = _rows(t, order, score)
    for r in rows:  # non-significant rows are listed too: their verdict depends on the test's side
        r["alternative"] = stats.attrs.get("alternative")
    return rows


def headline_tables(stats: xr.Dataset, top: int = 10, differ_scores: tuple[str, ...] = ("interference",)) -> list[dict]:
    """The answers a reader should see first, one table per question (`QUESTIONS`):

    * conflict — slices whose transfer (alignment, ⟨ḡ_A, ḡ_B⟩) is significantly below 0
      (transfer test, BH over the family), smallest q first, ties by the more negative cosine;
    * shared — the largest `sharing` (interference; the geometric mean of both directions,
      free of the tasks' gradient sizes) over every slice where it is defined, with its CI,
      each direction's ratio and the labels-null verdict beside them;
    * differ — per score in `differ_scores`, slices whose mean differs from chance (labels
      null, q ≤ α), smallest q first, ties by effect size; direction always shown.

    Each table: key, question, score, rows (dicts as `rank_heads`), n_found, family, alpha,
    and `note` (what it counts, or why the table is empty)."""
    alpha, alt = stats.attrs.get("alpha"), stats.attrs.get("alternative")
    scores = [str(s) for s in stats[schema.SCORE].values]
    tables = [_conflict_table(stats, top, alpha)] if "alignment" in scores else []
    tables += [_shared_table(stats, top, alpha, alt)] if "interference" in scores else []
    tables += [_differ_table(stats, score, top, alpha, alt) for score in differ_scores if score in scores]
    if "approximate" in stats.attrs:  # answers or sketch mode: which of the numbers shown are exact (docs/answers.md)
        first_order = {"conflict": "the CIs", "shared": "the CIs and the labels verdicts beside them",
                       "differ": "the CIs and the labels test"}
        for t in tables:
            t["note"] = t.get("note", "") + (f"; {stats.attrs.get('mode')} mode: the estimates are exact, {first_order[t['key']]} "
                                             "approximate (stats attrs `exact`, `approximate`)")
    return tables


def _conflict_table(stats: xr.Dataset, top: int, alpha) -> dict:
    """Slices whose transfer is significantly below 0, smallest q first, ties by the more negative cosine."""
    t, table = _table(stats, "conflict", "alignment", alpha)
    fam = table["family"]
    if np.isnan(t[V.transfer]).all():
        table["note"] = ("this run's statistics have no transfer test: rerun `qkov stats` to add it" if V.transfer not in stats
                         else "the transfer test is undefined (NaN) in every slice (e.g. zero gradients); rerunning `qkov stats` cannot change that")
        return table
    d = t[V.transfer_direction]
    conflict = np.flatnonzero(d == -1)
    order = conflict[np.lexsort((t[V.transfer][conflict], np.nan_to_num(t[V.cosine][conflict], nan=0.0),
                                 t[V.transfer_q_value][conflict]))]
    table.update(rows=_rows(t, order[:top], "alignment"), n_found=int(conflict.size))
    table["note"] = (f"{conflict.size} of {fam} slices conflict (transfer < 0, BH q ≤ {alpha}: a step on "
                     f"one task's loss raises the other's); {int((d == 1).sum())} show synergy (transfer > 0)")
    return table


def _shared_table(stats: xr.Dataset, top: int, alpha, alt) -> dict:
    """The largest sharing ratios, each with the labels null's verdict beside it."""
    t, table = _table(stats, "shared", "interference", alpha)
    if np.isnan(t[V.sharing]).all():
        table["note"] = ("this run's statistics have no sharing ratios: rerun `qkov stats` to add them"
                         if V.sharing not in stats and V.sharing_ab not in stats
                         else "the sharing ratio is undefined (NaN) in every slice (e.g. zero gradients); rerunning `qkov stats` cannot change that")
        return table
    # ranked on `sharing` alone, which every mode computes exactly: a filter on the labels test would
    # let that test (approximate in answers and sketch mode) decide which heads are listed
    ok = np.flatnonzero(np.isfinite(t[V.sharing]))
    order = ok[np.argsort(-t[V.sharing][ok], kind="stable")]
    rows = order[:top]
    below = int((t[V.direction][rows] == -1).sum())
    table.update(rows=_rows(t, rows, "interference"), n_found=int(ok.size))
    table["note"] = (f"the {rows.size} largest sharing values of {ok.size} slices. sharing = √(B→A · A→B), where "
                     "X→Y = how heavily X's gradients land on the weights Y's loss depends on, relative to Y's own "
                     "samples; the tasks' gradient sizes cancel: 1 = the tasks load the weights alike, → 0 = separated. "
                     f"Beside each, the labels test's verdict (a separate question: is the cross-task interference "
                     f"above or below chance?); {below} of these rows are significantly below chance")
    if alt == "greater":
        table["note"] += ("; the labels null here is one-sided (greater), which cannot flag a slice below "
                          "chance: rerun `qkov stats --alternative two-sided` to see which are")
    return table


def _differ_table(stats: xr.Dataset, score: str, top: int, alpha, alt) -> dict:
    """Slices whose mean differs from chance (labels null, q ≤ α), smallest q first, ties by effect size."""
    t, table = _table(stats, "differ", score, alpha)
    fam = table["family"]
    sig = np.flatnonzero((t[V.significant] > 0) & ~np.isnan(t[V.q_value]))
    strength = _strength(t, score, alt)[sig]
    order = sig[np.lexsort((-strength, t[V.q_value][sig]))]
    up, down = int((t[V.direction][sig] > 0).sum()), int((t[V.direction][sig] < 0).sum())
    what = "interfere" if score == "interference" else "align"
    table.update(rows=_rows(t, order[:top], score), n_found=int(sig.size))
    table["note"] = (f"{sig.size} of {fam} slices differ from chance ({score}, label-permutation null, {alt}, "
                     f"BH q ≤ {alpha}): {up} above chance (cross-task pairs {what} more than random pairs of the "
                     f"pooled samples), {down} below (less)")
    return table


def _table(stats: xr.Dataset, key: str, score: str, alpha) -> tuple[dict, dict]:
    """One headline table's slice table and its empty frame (rows and note filled by the caller)."""
    t = slice_table(stats, score)
    return t, {"key": key, "question": QUESTIONS[key], "score": score, "family": t["block"].size, "alpha": alpha,
               "rows": [], "n_found": 0}


# ---------------------------------------------------------------- answers: one tidy table

# One row per family slice and question: what the headline tables show (conflict / synergy,
# shared, differ from chance), each row saying its question in words and the unit of its
# estimate. Columns that do not apply to a question hold NaN.
ANSWER_KEYS: tuple[str, ...] = ("block", "layer", "head", "kv_head", "score", "question", "asks", "units")
ANSWER_VALUES: tuple[str, ...] = ("estimate", "ci_low", "ci_high", "p_value", "q_value", "significant", "direction", "verdict")
ANSWER_EXTRAS: tuple[str, ...] = (
    "mean", "chance", "effect_rel", "p_fwer", "q_value_hier", "layer_q_value",  # differ
    "cosine", "cosine_ci_low", "cosine_ci_high",  # transfer
    "sharing_ab", "sharing_ab_ci_low", "sharing_ab_ci_high", "sharing_ba", "sharing_ba_ci_low", "sharing_ba_ci_high",  # shared
)
ANSWER_COLUMNS: tuple[str, ...] = ANSWER_KEYS + ANSWER_VALUES + ANSWER_EXTRAS
PLAIN_DIRECTION = {1: "above chance", -1: "below chance", 0: "not significant"}


def _answer_texts(question: str, score: str, a: str, b: str, stats: xr.Dataset) -> tuple[str, str]:
    """(the question in words, the unit of its estimate), with the tasks' names."""
    if question == "differ":
        return (f"Do {a} and {b} differ in this slice: is the mean {score} over {a} x {b} pairs above or below "
                "chance (the mean under random task labels)?",
                f"{score} score units; estimate = mean - chance")
    if question == "transfer":
        units = stats[V.transfer].attrs.get("units") if V.transfer in stats else None
        return (f"Does a natural-gradient step on {b}'s loss, through this slice, raise {a}'s loss (conflict) "
                "or lower it (synergy)?",
                units or "minus the first-order change of A's loss per unit natural-gradient step on B")
    return (f"Do {a} and {b} load the same weights of this slice, whatever the size of their gradients?",
            f"unitless ratio sqrt({b}->{a} * {a}->{b}), free of the tasks' gradient sizes: 1 = the tasks load the "
            f"weights alike, -> 0 = separated; X->Y = how heavily X's gradients land on the weights Y's loss depends "
            f"on, relative to Y's own samples (sharing_ab = {b}->{a}, sharing_ba = {a}->{b}; each scales with X's "
            "gradient size)")


def answers_table(stats: xr.Dataset, tasks: tuple[str, str] = ("A", "B")):
    """`qkov.answers` on an opened stats dataset (pure): a pandas DataFrame with one row per
    family slice and question, in the order differ (per score), transfer, shared; within a
    question by block, layer, head. `kv_head` is the KV head the row's head reads (K/V rows
    are that KV head's slice); `estimate` with `ci_low`/`ci_high` is the effect (differ: mean −
    chance), transfer, or sharing ratio; p/q/significant/direction belong to the question's
    test (NaN, False and 0 for `shared`, which has none). `attrs` hold the statistics' settings."""
    import pandas as pd

    a, b = tasks
    scores = [str(s) for s in stats[schema.SCORE].values]
    n = _family_index(stats)[0].size
    frames = []

    def frame(t: dict, score: str, question: str, values: dict) -> None:
        asks, units = _answer_texts(question, score, a, b, stats)
        kv_of = np.array([int(kv[heads.index(h)]) for h in t["head"]], dtype=np.int64)
        cols = {"block": t["block"].astype(str), "layer": t["layer"].astype(np.int64), "head": t["head"].astype(np.int64),
                "kv_head": kv_of, "score": score, "question": question, "asks": asks, "units": units}
        cols.update(values)
        frames.append(pd.DataFrame({c: cols.get(c, np.full(n, np.nan)) for c in ANSWER_COLUMNS}))

    kv = np.asarray(stats[schema.KV_HEAD].values)
    heads = [int(h) for h in stats[schema.HEAD].values]
    alt = stats.attrs.get("alternative")
    for score in scores:
        t = slice_table(stats, score)
        direction = np.nan_to_num(t[V.direction]).astype(np.int64)
        frame(t, score, "differ", {
            "estimate": t[V.effect], "ci_low": t[V.effect_ci_low], "ci_high": t[V.effect_ci_high],
            "p_value": t[V.p_value], "q_value": t[V.q_value], "significant": np.nan_to_num(t[V.significant]) > 0,
            "direction": direction,
            "verdict": np.array([direction_words({"direction": d, "effect": _num(e)}, alternative=alt).replace("▲ ", "")
                                 .replace("▼ ", "") for d, e in zip(direction, t[V.effect])], dtype=object),
            **{v: t[v] for v in (V.mean, "chance", V.p_fwer, V.q_value_hier, V.layer_q_value)},
            "effect_rel": t["effect_rel"] if score == "interference" else np.full(n, np.nan)})
    if "alignment" in scores and V.transfer in stats:
        t = slice_table(stats, "alignment")
        direction = np.nan_to_num(t[V.transfer_direction]).astype(np.int64)
        frame(t, "alignment", "transfer", {
            "estimate": t[V.transfer], "ci_low": t[V.transfer_ci_low], "ci_high": t[V.transfer_ci_high],
            "p_value": t[V.transfer_p_value], "q_value": t[V.transfer_q_value], "significant": direction != 0,
            "direction": direction, "verdict": np.array([TRANSFER_WORDS[d] for d in direction], dtype=object),
            **{v: t[v] for v in (V.cosine, V.cosine_ci_low, V.cosine_ci_high)}})
    if "interference" in scores and V.sharing_ab in stats:
        t = slice_table(stats, "interference")
        frame(t, "interference", "shared", {
            "estimate": t[V.sharing], "ci_low": t[V.sharing_ci_low], "ci_high": t[V.sharing_ci_high],
            "significant": np.zeros(n, dtype=bool), "direction": np.zeros(n, dtype=np.int64),
            "verdict": "no test (a ratio)",
            **{v: t[v] for v in ANSWER_EXTRAS if v.startswith("sharing_")}})
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ANSWER_COLUMNS))
    df.attrs.update({k: stats.attrs[k] for k in SETTINGS_SHOWN if k in stats.attrs})
    return df


def _task_names(store: RunStore) -> tuple[str, str]:
    attrs = store.group_attrs(schema.SCORES_GROUP) or {}
    return str(attrs.get(schema.ATTR_TASK_A, "A")), str(attrs.get(schema.ATTR_TASK_B, "B"))


def answers(run: "str | RunStore", stats: str | None = None, storage_options: dict | None = None):
    """The run's answers as a tidy pandas DataFrame (`answers_table`) from `stats` (or `stats_<name>`)."""
    store = RunStore.coerce(run, storage_options)
    return answers_table(store.open_stats(stats), _task_names(store))


def answers_all_pairs(run: "str | RunStore", stats: str | None = None, storage_options: dict | None = None):
    """Every task pair's answers in one DataFrame (a run of more than two tasks; a two-task run
    gives its one pair): `task_a`, `task_b` first, then `answers`' columns, plus
    `q_value_across_pairs`: BH over every pair's p-values of the same question and score,
    for ranking slices over all pairs (`q_value` controls the FDR within its own pair only)."""
    import pandas as pd

    from .stats import bh_qvalues

    store = RunStore.coerce(run, storage_options)
    frames = []
    for p in store.pair_runs():
        names = _task_names(p)
        df = answers_table(p.open_stats(stats), names)
        df.insert(0, "task_b", names[1])
        df.insert(0, "task_a", names[0])
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["q_value_across_pairs"] = np.nan
    for _, rows in out.groupby(["question", "score"]).groups.items():
        p_values = out.loc[rows, "p_value"].to_numpy(dtype=float)
        tested = ~np.isnan(p_values)
        if tested.any():
            q = np.full(p_values.shape, np.nan)
            q[tested] = bh_qvalues(p_values[tested])
            out.loc[rows, "q_value_across_pairs"] = q
    out.attrs = dict(frames[0].attrs)
    return out


def _records(df) -> list[dict]:
    """DataFrame rows as JSON-able dicts (NaN → None)."""
    return [{k: _num(v) if isinstance(v, (float, np.floating, np.integer, np.bool_, bool)) else v for k, v in r.items()}
            for r in df.to_dict(orient="records")]


def select_slices(df, stats: xr.Dataset, layer: int | None = None, head: int | None = None, block: str | None = None):
    """The answers rows of the slices a `qkov query` selection names: `head` selects Q/O rows of
    that query head and the K/V rows of its KV head (K/V slices are stored once per KV head)."""
    keep = np.ones(len(df), dtype=bool)
    if layer is not None:
        keep &= (df["layer"] == layer).to_numpy()
    if block is not None:
        keep &= (df["block"] == block).to_numpy()
    if head is not None:
        kv = int(stats[schema.KV_HEAD].sel({schema.HEAD: head}).values)
        shared = df["block"].map(lambda b: schema.head_dim(b) == schema.KV_HEAD).to_numpy() & _grouped(stats)
        keep &= np.where(shared, (df["kv_head"] == kv).to_numpy(), (df["head"] == head).to_numpy())
    return df[keep].reset_index(drop=True)


def query(run: "str | RunStore", layer: int | None = None, head: int | None = None, block: str | None = None,
          top: int = 10, score: str = "interference", stats: str | None = None,
          storage_options: dict | None = None) -> dict[str, Any]:
    """`qkov query` with any subset of layer, head and block (none: the whole run). Always:
    `slices`, the `answers` rows of the selected slices (JSON-able), and what the run is.
    With both `layer` and `head`, also the head's statistics per block, its top `top` pairs by
    `score` and its health (`query_head`'s keys)."""
    store = RunStore.coerce(run, storage_options)
    if layer is not None and head is not None:
        res = query_head(store, layer, head, block=block, top=top, score=score, stats_name=stats)
        st = store.open_stats(stats)
        block = res["blocks"][0]["block"] if block is not None else None
    else:
        if score not in schema.SCORES:
            raise UsageError(f"score {score!r} is unknown; choose one of {', '.join(schema.SCORES)}")
        store.require(schema.SCORES_GROUP)
        st = store.open_stats(stats)
        for what, value, valid in (("layer", layer, [int(x) for x in st[schema.LAYER].values]),
                                   ("head", head, [int(x) for x in st[schema.HEAD].values]),
                                   ("block", None if block is None else block.upper(), [str(b) for b in st[schema.BLOCK].values])):
            if value is not None:
                _check_choice(what, value, valid)
        block = None if block is None else block.upper()
        a, b = _task_names(store)
        scores_attrs = store.group_attrs(schema.SCORES_GROUP) or {}
        res = {"run": store.path, "layer": layer, "head": head, "block": block, "tasks": {"a": a, "b": b},
               "n_a": scores_attrs.get(schema.ATTR_N_A), "n_b": scores_attrs.get(schema.ATTR_N_B),
               "stats_group": schema.stats_group(stats),
               "excluded_samples": list(st.attrs.get(schema.ATTR_EXCLUDED) or []),
               "settings": {k: st.attrs.get(k) for k in SETTINGS_SHOWN if k in st.attrs}}
    df = select_slices(answers_table(st, (res["tasks"]["a"], res["tasks"]["b"])), st, layer, head, block)
    res["slices"] = _records(df)
    return res


# ---------------------------------------------------------------- rich rendering


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _ci(r: dict, var: str, spec: str = ".3g") -> str:
    lo, hi = r.get(f"{var}_ci_low"), r.get(f"{var}_ci_high")
    return "" if lo is None and hi is None else f" [{_fmt(lo, spec)}, {_fmt(hi, spec)}]"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def head_label(r: dict) -> str:
    return f"{r['head']} (kv {r['kv_head']})" if r.get("kv_head") is not None else str(r["head"])


def direction_words(r: dict, key: str = "direction", alternative: str | None = None) -> str:
    """The verdict of a row's test in words. Against chance under a one-sided `alternative`,
    an effect on the untested side reads "not tested (greater)" rather than "not significant":
    a one-sided test cannot find it, however large it is."""
    d = r.get(key)
    words = TRANSFER_WORDS if key == "transfer_direction" else DIRECTION_WORDS
    if d is None:
        return "?"
    if key == "direction" and int(d) == 0 and alternative in ("greater", "less") and r.get("effect") is not None:
        if (r["effect"] < 0) if alternative == "greater" else (r["effect"] > 0):
            return f"not tested ({alternative}: one-sided)"
    return words[int(d)]


def cosine_text(r: dict) -> str:
    """The cosine with its CI, or "no direction" where a task-mean norm is not told apart from 0
    (the stats' cosine rule); "–" where the row has no transfer at all."""
    if r.get("cosine") is None:
        return "no direction" if r.get("transfer") is not None else "–"
    return _fmt(r.get("cosine"), ".2f") + _ci(r, "cosine", ".2f")


# (header, cell) per headline table; one spec for the console and the report's tables.
# Each cell is (text, sort value).
def _cells(kind: str, r: dict) -> list[tuple[str, str, Any]]:
    q_key = "transfer_q_value" if kind == "conflict" else "q_value"
    out = [("block", r["block"], r["block"]), ("layer", str(r["layer"]), r["layer"]), ("head", head_label(r), r["head"])]
    if kind == "conflict":
        out += [("direction", direction_words(r, "transfer_direction"), r.get("transfer_direction")),
                ("transfer [CI]", _fmt(r.get("transfer"), ".3g") + _ci(r, "transfer"), r.get("transfer")),
                ("cosine [CI]", cosine_text(r), r.get("cosine"))]
    elif kind == "shared":
        # sharing_ab = B's gradients on A's weights (B→A); sharing_ba = A→B
        out += [("sharing [CI]", _fmt(r.get("sharing"), ".3f") + _ci(r, "sharing", ".3f"), r.get("sharing")),
                ("B→A [CI]", _fmt(r.get("sharing_ab"), ".3f") + _ci(r, "sharing_ab", ".3f"), r.get("sharing_ab")),
                ("A→B [CI]", _fmt(r.get("sharing_ba"), ".3f") + _ci(r, "sharing_ba", ".3f"), r.get("sharing_ba")),
                ("vs chance", direction_words(r), r.get("direction")),
                ("mean", _fmt(r.get("mean")), r.get("mean")), ("chance", _fmt(r.get("chance")), r.get("chance"))]
    else:
        out += [("direction", direction_words(r, alternative=r.get("alternative")), r.get("direction")),
                ("mean", _fmt(r.get("mean")), r.get("mean")), ("chance", _fmt(r.get("chance")), r.get("chance")),
                ("effect [CI]", _fmt(r.get("effect"), ".3g") + _ci(r, "effect"), r.get("effect"))]
        if r["score"] == "interference":
            out.append(("effect / chance", _pct(r.get("effect_rel")), r.get("effect_rel")))
    out.append(("q", _fmt(r.get(q_key), ".3g"), r.get(q_key)))
    if kind == "differ":
        out.append(("p_fwer", _fmt(r.get("p_fwer"), ".3g"), r.get("p_fwer")))
    return out


def headline_cells(table: dict) -> tuple[list[str], list[list[tuple[str, Any]]]]:
    """Column headers and, per row, (text, sort value) cells of a `headline_tables` table."""
    rows = [_cells(table["key"], r) for r in table["rows"]]
    headers = [h for h, _, _ in rows[0]] if rows else []
    return headers, [[(txt, v) for _, txt, v in row] for row in rows]


def headline_title(table: dict) -> str:
    what = {"conflict": "alignment: transfer test, vs 0", "shared": "interference: sharing, free of gradient sizes",
            "differ": f"{table['score']}: mean vs chance"}[table["key"]]
    return f"{table['question'].capitalize()} ({what})"


def _plain(x: Any):
    """Text the user wrote (sample ids, text previews, task and group names) as a rich Text,
    so that rich never reads it as markup: `ordered[mid]` stays as written, `[/]` is shown."""
    from rich.text import Text

    return Text(str(x))


def _dir_style(text: str) -> str:
    return {"▲": "bold red", "▼": "bold blue", "c": "bold red", "s": "bold blue"}.get(text[:1], "dim")


def format_headlines(tables: list[dict]):
    """The run summary: one rich table per question, each titled with the question, its
    count line under it; direction in words (and colour) in every row."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = []
    for tb in tables:
        headers, rows = headline_cells(tb)
        t = Table(title=_plain(headline_title(tb)), caption=_plain(tb.get("note", "")), title_justify="left",
                  caption_justify="left", title_style="bold")
        if not rows:
            parts += [Text(headline_title(tb), style="bold"), Text("  none. " + tb.get("note", ""))]
            continue
        for h in headers:
            t.add_column(h, justify="left" if h in ("block", "direction", "vs chance") else "right")
        for row in rows:
            cells = []
            for h, (txt, _) in zip(headers, row):
                cells.append(Text(txt, style=_dir_style(txt)) if h in ("direction", "vs chance") else _plain(txt))
            t.add_row(*cells)
        parts.append(t)
    return Group(*parts)


def _preview(text: str | None, pretok: bool | None, n_tokens: int | None, width: int = 60) -> str:
    if pretok or text is None:
        return f"(pre-tokenised, {n_tokens} tokens)"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _stats_table(res: dict):
    from rich.table import Table
    from rich.text import Text

    settings = res["settings"]
    kv = f" (KV head {res['kv_head']})" if res["kv_head"] is not None else ""
    t = Table(title=_plain(f"layer {res['layer']} · head {res['head']}{kv} — "
                           f"{res['tasks']['a']} × {res['tasks']['b']}, {res['n_a']}×{res['n_b']} pairs: "
                           "does the A×B mean differ from chance?"),
              caption=_plain(f"{res['stats_group']}: labels null ({settings.get('alternative')}, "
                             f"{settings.get('n_permutations')} permutations), BH q ≤ α={settings.get('alpha')}"
                             f"{one_sided_words(settings.get('alternative'))}; "
                             "chance = the mean over all label permutations, effect = mean − chance; p_fwer = max-T; "
                             f"CIs {settings.get('ci_level')} two-way bootstrap"),
              title_justify="left", caption_justify="left")
    for col, just in (("block", "left"), ("score", "left"), ("vs chance", "left"), ("mean", "right"),
                      ("chance", "right"), ("effect [CI]", "right"), ("q", "right"), ("p_fwer", "right")):
        t.add_column(col, justify=just)
    for blk in res["blocks"]:
        label = blk["block"] + (f" (kv {blk['kv_head']})" if blk["kv_head"] is not None else "")
        for i, (score, s) in enumerate(blk["stats"].items()):
            words = direction_words(s, alternative=settings.get("alternative"))
            if s.get("direction") is None and s.get("null_mean") is None:
                words = "✔ significant" if s["significant"] else "not significant"
            effect, chance = s.get("effect"), s.get("null_mean")
            if effect is None and chance is not None and s.get("mean") is not None:
                effect = s["mean"] - chance
            elif effect is not None and s.get("mean") is not None:
                chance = s["mean"] - effect  # the exact chance level the effect is measured from
            t.add_row(label if i == 0 else "", score, Text(words, style=_dir_style(words)), _fmt(s["mean"]),
                      _fmt(chance), _plain(_fmt(effect, ".3g") + _ci(s, "effect")),
                      _fmt(s["q_value"], ".3g"), _fmt(s["p_fwer"], ".3g"), end_section=i == len(blk["stats"]) - 1)
    return t


def one_sided_words(alternative: str | None) -> str:
    """What a one-sided labels null hides, for captions ("" for two-sided)."""
    if alternative not in ("greater", "less"):
        return ""
    hidden = "below" if alternative == "greater" else "above"
    return (f" (one-sided: a slice {hidden} chance is never flagged, however far; `qkov stats --alternative two-sided` "
            "tests both ways)")


def _effects_table(res: dict):
    """The head's task effect sizes per block: sharing (interference) and transfer/cosine
    (alignment), or None for statistics written before them."""
    from rich.table import Table
    from rich.text import Text

    rows = [(blk, blk["stats"].get("interference", {}), blk["stats"].get("alignment", {})) for blk in res["blocks"]]
    if not any(i.get("sharing_ab") is not None or a.get("transfer") is not None for _, i, a in rows):
        return None
    a, b = res["tasks"]["a"], res["tasks"]["b"]
    t = Table(title=_plain("do the tasks share this head, and does a step on one help or hurt the other?"),
              caption=_plain(f"sharing = √({b}→{a} · {a}→{b}), unitless, free of the tasks' gradient sizes (1 = the tasks "
                             f"load the weights alike, → 0 = separated); X→Y = how heavily X's gradients land on the "
                             f"weights Y's loss depends on, relative to Y's own samples (scales with X's gradient size); "
                             f"transfer = <g_{a}, g_{b}> in the (Î+λ)⁻¹ metric, tested against 0 (two-sided; < 0 conflict: "
                             "a step on one task's loss raises the other's); cosine: no direction where a task-mean "
                             "gradient is not told apart from 0"),
              title_justify="left", caption_justify="left")
    for col, just in (("block", "left"), ("sharing [CI]", "right"), (f"{b}→{a} [CI]", "right"), (f"{a}→{b} [CI]", "right"),
                      ("transfer [CI]", "right"), ("verdict", "left"), ("q", "right"), ("cosine [CI]", "right")):
        t.add_column(_plain(col), justify=just)
    for blk, i, al in rows:
        verdict = direction_words(al, "transfer_direction") if al.get("transfer") is not None else "–"
        t.add_row(blk["block"] + (f" (kv {blk['kv_head']})" if blk["kv_head"] is not None else ""),
                  _plain(_fmt(i.get("sharing"), ".3f") + _ci(i, "sharing", ".3f")),
                  _plain(_fmt(i.get("sharing_ab"), ".3f") + _ci(i, "sharing_ab", ".3f")),
                  _plain(_fmt(i.get("sharing_ba"), ".3f") + _ci(i, "sharing_ba", ".3f")),
                  _plain(_fmt(al.get("transfer"), ".3g") + _ci(al, "transfer")), Text(verdict, style=_dir_style(verdict)),
                  _fmt(al.get("transfer_q_value"), ".3g"), _plain(cosine_text(al)))
    return t


def _pairs_table(res: dict, blk: dict):
    from rich.table import Table

    score = res["score"]
    shown, asked, kept = len(blk["top_pairs"]), res.get("top_asked"), res.get("top_kept")
    note = (f" (shown {shown} of the {asked} asked: the run kept the top {kept} pairs per slice, keep_pairs = \"top\")"
            if kept is not None and asked is not None and asked > shown else "")
    t = Table(title=_plain(f"{blk['block']} · top {shown} pairs, {res['ranking']}{note}"),
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


def _marginals_table(res: dict, blk: dict):
    """The samples of each task whose mean alignment with the other task is most negative (what
    drives a conflict), with the question, unit and direction in the title; None without any."""
    from rich.table import Table

    m = blk.get("alignment_marginals")
    if not m or not (m["a"] or m["b"]):
        return None
    a, b = res["tasks"]["a"], res["tasks"]["b"]
    kv = f" (kv {blk['kv_head']})" if blk.get("kv_head") is not None else ""
    t = Table(title=_plain(f"{blk['block']}{kv} · alignment marginals: which samples drive the conflict? transfer "
                           f"{_fmt(m['transfer'], '.3g')} = the mean over {a}'s samples of their mean alignment with {b}, "
                           f"and the mean over {b}'s of theirs with {a}"),
              caption=_plain(f"marginal: alignment units (as transfer), negative = the sample conflicts with the other "
                             f"task, most negative first (only negative ones); contribution = marginal / the task's "
                             f"{m['n_a']} or {m['n_b']} samples, adding up to transfer over the task"),
              title_justify="left", caption_justify="left")
    for col, just in (("task", "left"), ("sample", "left"), ("mean alignment with the other task", "right"),
                      ("contribution to transfer", "right")):
        t.add_column(_plain(col), justify=just)
    for key, task in (("a", a), ("b", b)):
        for r in m[key]:
            t.add_row(_plain(task), _plain(r["sample"]), _fmt(r["marginal"], ".4g"), _fmt(r["contribution"], ".3g"))
    return t


def format_query(result: dict):
    """A rich renderable of `query_head`'s result: the stats table, then each block's top pairs."""
    from rich.console import Group

    parts = [_stats_table(result)]
    effects = _effects_table(result)
    parts += [effects] if effects is not None else []
    parts += [_pairs_table(result, blk) for blk in result["blocks"] if blk["top_pairs"]]
    parts += [m for m in (_marginals_table(result, blk) for blk in result["blocks"]) if m is not None]
    from .health import format_head_diagnostics  # health, outlier warning, most interfering samples

    parts += [d for d in (format_head_diagnostics(result, blk) for blk in result["blocks"]) if d is not None]
    return Group(*parts)


def _selection_words(res: dict) -> str:
    parts = [f"{k} {res[k]}" for k in ("block", "layer", "head") if res.get(k) is not None]
    return ", ".join(parts) if parts else "every slice"


def format_slices(res: dict):
    """A rich table of `query`'s selected slices, one row per (block, layer, head): does the
    slice's interference differ from chance, do the tasks share it, does a step on one task
    help or hurt the other through it. Every number in full (cells fold, never cut)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    a, b = res["tasks"]["a"], res["tasks"]["b"]
    by_slice: dict[tuple, dict[str, dict]] = {}
    for r in res["slices"]:
        key = (r["block"], r["layer"], r["head"], r["kv_head"])
        by_slice.setdefault(key, {})[f"{r['question']}/{r['score']}"] = r
    settings = res["settings"]
    alt = settings.get("alternative")
    t = Table(title=_plain(f"{_selection_words(res)} — {a} × {b}, {len(by_slice)} slice(s): do the tasks differ, share, "
                           "conflict?"),
              caption=_plain(f"{res['stats_group']}: vs chance = interference vs the labels null ({alt}, "
                             f"{settings.get('n_permutations')} permutations, BH q ≤ {settings.get('alpha')}"
                             f"{one_sided_words(alt)}), effect = (mean − chance) / chance; sharing = √({b}→{a} · {a}→{b}) "
                             "with its CI, unitless and free of the tasks' gradient sizes (1 = the tasks load the weights "
                             "alike, → 0 = separated); transfer = <g_A, g_B> tested against 0, two-sided (conflict < 0 < "
                             "synergy); cosine: no direction where a task-mean gradient is not told apart from 0; K/V rows "
                             "are their KV head's slice. Every number with its CI: --format csv or json."),
              title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    cols = (("block", "left"), ("layer", "right"), ("head", "right"), ("vs chance", "left"), ("effect", "right"),
            ("q", "right"), ("sharing", "right"), ("transfer", "left"), ("transfer [CI]", "right"), ("q", "right"),
            ("cosine [CI]", "right"))
    for col, just in cols:
        t.add_column(_plain(col), justify=just, overflow="fold")
    grouped = any(r["kv_head"] != r["head"] for r in res["slices"])
    for (blk, layer, head, kv), rows in by_slice.items():
        d = rows.get("differ/interference", {})
        tr = rows.get("transfer/alignment", {})
        label = f"{head} (kv {kv})" if grouped and schema.head_dim(blk) == schema.KV_HEAD else str(head)
        vs = direction_words({"direction": d.get("direction"), "effect": d.get("estimate")}, alternative=alt)
        verdict = tr.get("verdict", "–")
        t.add_row(blk, str(layer), label, Text(vs, style=_dir_style(vs)), _pct(d.get("effect_rel")),
                  _fmt(d.get("q_value"), ".3g"), _plain(_shared_text(rows.get("shared/interference", {}))),
                  Text(verdict, style=_dir_style(verdict)),
                  _plain(_fmt(tr.get("estimate"), ".3g") + _ci({"e_ci_low": tr.get("ci_low"), "e_ci_high": tr.get("ci_high")}, "e")),
                  _fmt(tr.get("q_value"), ".3g"), _plain(cosine_text({**tr, "transfer": tr.get("estimate")})))
    return t


def _shared_text(r: dict) -> str:
    return _fmt(r.get("estimate"), ".3f") + _ci({"e_ci_low": r.get("ci_low"), "e_ci_high": r.get("ci_high")}, "e", ".3f")


def format_significant(rows: list[dict]):
    """A rich table of `significant_heads`: where the tasks differ from chance, with direction."""
    from rich.table import Table
    from rich.text import Text

    if not rows:
        return Text("no statistics to rank (no in-family slices with a q-value)")
    score = rows[0]["score"]
    n_sig = sum(bool(r["significant"]) for r in rows)
    t = Table(title=f"{QUESTIONS['differ'].capitalize()} ({score}: mean vs chance): top {len(rows)} slices by q-value, "
                    f"{n_sig} of them significant", title_justify="left")
    headers, cells = headline_cells({"key": "differ", "rows": rows})
    for h in headers:
        t.add_column(h, justify="left" if h in ("block", "direction") else "right")
    for row in cells:
        t.add_row(*[Text(txt, style=_dir_style(txt)) if h == "direction" else _plain(txt)
                    for h, (txt, _) in zip(headers, row)])
    return t
