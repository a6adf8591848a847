"""`qkov query`: a head's stats and top pairs, checked against the stored groups read directly."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xarray as xr

from qkov.pipeline.errors import QkovError
from qkov.pipeline import schema
from qkov.pipeline.query import format_query, format_significant, query_head, significant_heads

WORDS = ["<unk>", "<s>"] + "one two three four five plus minus equals times def return print if else for in range x y z".split()
MAX_LENGTH = 64  # tokens; 64 words are > 200 characters, so long rows show the preview cut
STAT_VARS = ("mean", "ci_low", "ci_high", "p_value", "q_value", "p_fwer", "significant")


def _word_tokenizer():
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A real run: task A from text (long and short rows), task B pre-tokenised; Llama GQA (4 q-heads, 2 KV)."""
    from qkov.pipeline.run import run_job
    from qkov.testing import save_model, tiny_job, tiny_model

    tmp = tmp_path_factory.mktemp("query")
    save_model(tiny_model("llama_gqa", seed=0), _word_tokenizer(), tmp / "model-llama_gqa-0")  # tiny_job reuses it
    rng = np.random.default_rng(1)
    texts = {}
    with (tmp / "words.jsonl").open("w") as f:
        for k in range(9):
            n = 80 if k % 3 == 0 else int(rng.integers(3, 10))  # some rows longer than the 200-char preview
            # the run keeps the text its first max_length tokens cover (one token per word here)
            texts[f"w{k}"] = " ".join(rng.choice(WORDS[2:], n))
            f.write(json.dumps({"id": f"w{k}", "text": texts[f"w{k}"]}) + "\n")
    texts = {k: " ".join(t.split()[:MAX_LENGTH]) for k, t in texts.items()}
    job = tiny_job(tmp, "llama_gqa", n_a=9, n_b=7, model={"max_length": MAX_LENGTH},
                   tasks={"a": {"name": "words", "path": str(tmp / "words.jsonl")}, "b": {"name": "ids"}})
    run_job(job)
    return job.output.path, texts


def _stored(run: str, group: str) -> xr.Dataset:
    return xr.open_zarr(run, group=group, consolidated=False)


def test_stats_equal_the_stats_group(text_run):
    run, _ = text_run
    stats = _stored(run, schema.STATS).load()
    for layer, head in [(0, 0), (1, 3)]:  # head 3 shares KV head 1 with head 2: K/V not in the family
        res = query_head(run, layer, head, top=2)
        assert [b["block"] for b in res["blocks"]] == ["Q", "K", "V", "O"]
        assert res["kv_head"] == int(stats["kv_head"].sel(head=head))
        for blk in res["blocks"]:
            assert blk["in_family"] == bool(stats["in_family"].sel(block=blk["block"], head=head))
            assert (blk["kv_head"] is not None) == (blk["block"] in ("K", "V"))
            for score in ("interference", "alignment"):
                want = stats.sel(score=score, block=blk["block"], layer=layer, head=head)
                for v in STAT_VARS:
                    got = blk["stats"][score][v]
                    assert got == (bool(want[v]) if v == "significant" else pytest.approx(float(want[v]), rel=1e-12)), v
        assert res["tasks"] == {"a": "words", "b": "ids"} and (res["n_a"], res["n_b"]) == (9, 7)
        assert res["settings"]["n_permutations"] == stats.attrs["n_permutations"]
        json.dumps(res, allow_nan=False)  # JSON-able, as `qkov query --json` prints it


@pytest.mark.parametrize("score", ["interference", "alignment"])
def test_top_pairs_follow_an_argsort_of_the_stored_scores(text_run, score):
    run, _ = text_run
    from qkov.pipeline.store import RunStore

    scores = RunStore(run).open_scores()  # the logical view of the compactly stored scores
    layer, head, top = 1, 2, 7
    res = query_head(run, layer, head, top=top, score=score)
    for blk in res["blocks"]:
        m = scores[score].sel(block=blk["block"], layer=layer, head=head).values.astype(np.float64)
        # interference: highest first; alignment: most negative (conflicting) first
        flat = -m.ravel() if score == "interference" else m.ravel()
        order = np.argsort(flat, kind="stable")[:top]
        ia, ib = np.unravel_index(order, m.shape)
        want = [(str(scores.sample_a.values[i]), str(scores.sample_b.values[j]), m[i, j]) for i, j in zip(ia, ib)]
        got = [(p["sample_a"], p["sample_b"], p[score]) for p in blk["top_pairs"]]
        assert [g[:2] for g in got] == [w[:2] for w in want]
        np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=0, atol=0)
        assert [p["rank"] for p in blk["top_pairs"]] == list(range(1, top + 1))


def test_pairs_carry_the_texts_of_the_samples(text_run):
    run, texts = text_run
    grads = _stored(run, schema.GRADIENTS)
    n_tok = dict(zip(map(str, grads.sample_id.values), grads.n_tokens.values))
    loss = dict(zip(map(str, grads.sample_id.values), grads.loss.values.astype(float)))
    res = query_head(run, 0, 1, block="q", top=63)  # every pair; block name case-insensitive
    (blk,) = res["blocks"]
    assert blk["block"] == "Q" and len(blk["top_pairs"]) == 63
    for p in blk["top_pairs"]:
        assert p["text_a"] == texts[p["sample_a"]][:200] and p["pretokenised_a"] is False
        assert p["text_b"] is None and p["pretokenised_b"] is True
        assert (p["n_tokens_a"], p["n_tokens_b"]) == (n_tok[p["sample_a"]], n_tok[p["sample_b"]])
        assert (p["loss_a"], p["loss_b"]) == (loss[p["sample_a"]], loss[p["sample_b"]])
    assert max(len(p["text_a"]) for p in blk["top_pairs"]) == 200  # the long rows are cut to the preview

    from rich.console import Console

    con = Console(record=True, width=220)
    con.print(format_query(query_head(run, 0, 1, top=3)))
    out = con.export_text()
    first = blk["top_pairs"][0]
    for s in ("layer 0 · head 1", "words × ids", first["sample_a"], first["sample_b"], "pre-tokenised",
              "does the A×B mean differ from chance?", "vs chance", "effect [CI]", "sharing [CI]", "ids→words [CI]",
              "words→ids [CI]",
              "transfer [CI]", "cosine [CI]"):
        assert s in out, s
    stats = _stored(run, schema.STATS).load()
    for score in ("interference", "alignment"):  # each row: its direction in words and chance = mean − effect
        x = stats.sel(score=score, block="Q", layer=0, head=1)
        row = next(ln for ln in out.splitlines() if f" {score} " in ln and ln.startswith("│"))
        assert {1: "▲ above chance", -1: "▼ below chance", 0: "not significant"}[int(x.direction)] in row
        assert f"{float(x['mean'] - x.effect):.4g}" in row
    verdict = {1: "synergy", -1: "conflict", 0: "not significant"}[int(stats.transfer_direction.sel(block="Q", layer=0, head=1))]
    assert any(ln.startswith("│ Q") and verdict in ln and f"{float(stats.transfer.sel(block='Q', layer=0, head=1)):.3g}" in ln
               for ln in out.splitlines())


@pytest.mark.parametrize("kw, match", [
    (dict(layer=2, head=0), r"layer 2 is out of range; this run has layers 0\.\.1"),
    (dict(layer=-1, head=0), r"layers 0\.\.1"),
    (dict(layer=0, head=4), r"head 4 is out of range; this run has heads 0\.\.3"),
    (dict(layer=0, head=0, block="X"), r"block 'X' is out of range; this run has blocks Q, K, V, O"),
    (dict(layer=0, head=0, score="cosine"), r"score 'cosine' is unknown"),
])
def test_out_of_range_is_a_clear_error(text_run, kw, match):
    with pytest.raises(ValueError, match=match):
        query_head(text_run[0], **kw)


def test_missing_groups_name_the_stage(text_run, tmp_path):
    run, _ = text_run
    cut = tmp_path / "no-stats"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / schema.STATS)
    with pytest.raises(QkovError, match=r"no 'stats' group; run the stats stage \(`qkov stats"):
        query_head(str(cut), 0, 0)
    with pytest.raises(QkovError, match=r"no 'stats' group"):
        significant_heads(str(cut))
    shutil.rmtree(cut / schema.SCORES_GROUP)
    with pytest.raises(QkovError, match=r"no 'scores' group; run the score stage"):
        query_head(str(cut), 0, 0)
    with pytest.raises(QkovError, match="no qkov run"):
        query_head(str(tmp_path / "nowhere"), 0, 0)


@pytest.mark.parametrize("score", ["interference", "alignment"])
def test_significant_heads_sorted_by_q_then_effect(text_run, score):
    """Smallest q first; ties (e.g. at the permutation floor) broken by effect size in the tested
    direction: effect / chance for interference, effect for alignment."""
    run, _ = text_run
    s = _stored(run, schema.STATS).load().sel(score=score)
    alt = s.attrs["alternative"]
    rows = []
    for b in s["block"].values:
        for layer in s["layer"].values:
            for h in s["head"].values:
                if bool(s.in_family.sel(block=b, head=h)):
                    x = s.sel(block=b, layer=layer, head=h)
                    e = float(x.effect) / abs(float(x["mean"] - x.effect)) if score == "interference" else float(x.effect)
                    e = {"greater": e, "less": -e}.get(alt, abs(e))
                    rows.append((float(x.q_value), -e, str(b), int(layer), int(h)))
    want = sorted(rows)[:5]
    got = significant_heads(run, score=score, top=5)
    assert [(r["block"], r["layer"], r["head"]) for r in got] == [w[2:] for w in want]
    assert [r["q_value"] for r in got] == pytest.approx([w[0] for w in want])
    assert all(r["score"] == score for r in got)
    for r in got:  # every row carries chance, effect with CI and direction
        x = s.sel(block=r["block"], layer=r["layer"], head=r["head"])
        assert r["effect"] == pytest.approx(float(x.effect)) and r["direction"] == int(x.direction)
        assert r["chance"] == pytest.approx(float(x["mean"] - x.effect))
        assert r["effect_ci_low"] == pytest.approx(float(x.effect_ci_low))
    assert len(significant_heads(run, score=score, top=100)) == len(rows) == int(s.attrs["family_size"])
    sig_only = significant_heads(run, score=score, top=100, only_significant=True)
    assert all(r["significant"] for r in sig_only)
    assert len(sig_only) == sum(1 for r in rows if r[0] <= s.attrs["alpha"])

    from rich.console import Console

    con = Console(record=True, width=200)
    con.print(format_significant(got))
    text = con.export_text()
    assert f"Heads where the tasks differ most ({score}: mean vs chance): top 5 slices by q-value" in text
    for r in got:
        assert {1: "▲ above chance", -1: "▼ below chance", 0: "not significant"}[r["direction"]] in text


def _planted_stats() -> xr.Dataset:
    """Stats with known answers on 1 layer × 6 heads of Q and O (no GQA): interference below
    chance at the permutation floor in O heads 0-2 (effects −10%, −40%, −20% of chance) and
    above chance in Q head 1 (+5%, q larger); conflicts (transfer < 0) in Q heads 2 and 4 at one
    q (cosines −0.1, −0.6), synergy in O head 5; sharing ratios 0.2 … 1.2."""
    d4, d3 = ("score", "block", "layer", "head"), ("block", "layer", "head")
    shape = (2, 2, 1, 6)
    chance = np.full(shape, 100.0)
    effect = np.zeros(shape)
    q = np.full(shape, 0.6)
    for h, e in ((0, -10.0), (1, -40.0), (2, -20.0)):
        effect[0, 1, 0, h], q[0, 1, 0, h] = e, 0.004
    effect[0, 0, 0, 1], q[0, 0, 0, 1] = 5.0, 0.03
    sig = q <= 0.05
    direction = np.where(sig, np.sign(effect), 0).astype(np.int8)
    transfer = np.full((2, 1, 6), 0.5)
    tq = np.full((2, 1, 6), 0.7)
    cosine = np.full((2, 1, 6), 0.05)
    transfer[0, 0, 2], transfer[0, 0, 4], transfer[1, 0, 5] = -3.0, -1.0, 2.0
    tq[0, 0, 2] = tq[0, 0, 4] = tq[1, 0, 5] = 0.01
    cosine[0, 0, 2], cosine[0, 0, 4], cosine[1, 0, 5] = -0.1, -0.6, 0.4
    tdir = np.where(tq <= 0.05, np.sign(transfer), 0).astype(np.int8)
    sharing = np.linspace(0.2, 1.2, 12).reshape(2, 1, 6)
    zeros = np.zeros(shape)
    return xr.Dataset(
        {"mean": (d4, chance + effect), "null_mean": (d4, chance), "effect": (d4, effect),
         "effect_ci_low": (d4, effect - 1), "effect_ci_high": (d4, effect + 1), "direction": (d4, direction),
         "p_value": (d4, q / 4), "q_value": (d4, q), "significant": (d4, sig), "p_fwer": (d4, q), "ci_low": (d4, zeros),
         "ci_high": (d4, zeros), "transfer": (d3, transfer), "transfer_q_value": (d3, tq), "transfer_direction": (d3, tdir),
         "cosine": (d3, cosine), "sharing_ab": (d3, sharing), "sharing_ba": (d3, sharing),
         "in_family": (("block", "head"), np.ones((2, 6), dtype=bool))},
        coords={"score": ["interference", "alignment"], "block": ["Q", "O"], "layer": [7], "head": np.arange(6),
                "kv_head": ("head", np.arange(6))},
        attrs={"alpha": 0.05, "alternative": "two-sided", "family_size": 12, "n_permutations": 999},
    )


def test_headline_tables_answer_each_question_with_its_direction():
    from rich.console import Console

    from qkov.pipeline.query import QUESTIONS, format_headlines, headline_tables

    tables = {t["key"]: t for t in headline_tables(_planted_stats(), top=10)}
    assert {k: t["question"] for k, t in tables.items()} == QUESTIONS
    conflict = tables["conflict"]
    assert [(r["block"], r["head"]) for r in conflict["rows"]] == [("Q", 4), ("Q", 2)]  # q tie: the more negative cosine first
    assert all(r["transfer_direction"] == -1 for r in conflict["rows"]) and conflict["n_found"] == 2
    assert "1 show synergy" in conflict["note"]
    differ = tables["differ"]
    # the floor tie (q = 0.004) broken by |effect| / chance: −40% before −20% before −10%; then the +5%
    assert [(r["block"], r["head"], r["direction"]) for r in differ["rows"]] == [("O", 1, -1), ("O", 2, -1), ("O", 0, -1), ("Q", 1, 1)]
    assert [r["effect_rel"] for r in differ["rows"]] == pytest.approx([-0.4, -0.2, -0.1, 0.05])
    assert "1 above chance" in differ["note"] and "3 below" in differ["note"]
    shared = tables["shared"]
    assert [r["sharing"] for r in shared["rows"]][:3] == pytest.approx([1.2, 1.2 - 1 / 11, 1.2 - 2 / 11])
    # ranked on sharing alone (exact in every mode); O heads 0-2, below chance, keep their place and their mark
    assert [(r["block"], r["head"], r["direction"]) for r in shared["rows"]] == [
        ("O", 5, 0), ("O", 4, 0), ("O", 3, 0), ("O", 2, -1), ("O", 1, -1), ("O", 0, -1),
        ("Q", 5, 0), ("Q", 4, 0), ("Q", 3, 0), ("Q", 2, 0)]
    assert shared["n_found"] == 12 and "3 of these rows are significantly below chance" in shared["note"]
    stored = _planted_stats()  # the stored size-free `sharing` wins over the per-direction ratios
    stored["sharing"] = stored["sharing_ab"] * 0 + np.arange(12.0).reshape(2, 1, 6)[::-1]
    assert [r["sharing"] for r in {t["key"]: t for t in headline_tables(stored)}["shared"]["rows"]][:2] == [11.0, 10.0]

    con = Console(record=True, width=220)
    con.print(format_headlines(list(tables.values())))
    text = con.export_text()
    for q in QUESTIONS.values():
        assert q.capitalize() in text
    assert "top interference" not in text.lower()
    con = Console(record=True, width=220)
    con.print(format_headlines([differ]))
    rows = [ln for ln in con.export_text().splitlines() if ln.startswith(("│ O ", "│ Q "))]
    assert len(rows) == 4
    for ln, pct in zip(rows, ("-40.0%", "-20.0%", "-10.0%", "+5.0%")):  # direction and the signed effect side by side
        assert ("▼ below chance" if pct[0] == "-" else "▲ above chance") in ln and pct in ln


def test_named_stats_and_url_runs(text_run):
    """`stats_name` reads the statistics written by `qkov stats --name`; a run behind an fsspec URL reads the same."""
    import fsspec

    from qkov.pipeline.spec import StatsSpec
    import qkov

    run, _ = text_run
    with pytest.raises(QkovError, match=r"no 'stats_loose' group; run the stats stage \(`qkov stats .* --name loose`\)"):
        query_head(run, 0, 0, stats_name="loose")
    qkov.run_stats(run, alpha=0.3, n_permutations=19, n_bootstrap=9, name="loose")
    loose = _stored(run, "stats_loose").load()
    res = query_head(run, 1, 1, block="O", top=3, stats_name="loose")
    assert res["stats_group"] == "stats_loose" and res["settings"]["alpha"] == 0.3
    assert res["blocks"][0]["stats"]["interference"]["q_value"] == pytest.approx(
        float(loose.q_value.sel(score="interference", block="O", layer=1, head=1)))

    fs = fsspec.filesystem("memory")
    fs.put(run, "/qkov-query-run", recursive=True)
    try:
        remote = query_head("memory://qkov-query-run", 1, 1, top=4, score="alignment")
        local = query_head(run, 1, 1, top=4, score="alignment")
        assert {**remote, "run": None} == {**local, "run": None}
        assert significant_heads("memory://qkov-query-run", top=3) == significant_heads(run, top=3)
    finally:
        fs.rm("/qkov-query-run", recursive=True)


def test_every_stats_variable_and_score_says_question_units_direction(text_run):
    """The house rule on a real run: every variable of the stats group (the labels-null ones,
    `in_family`, the effects and layer tests alike) and the logical scores' `interference` and
    `alignment` carry `question`, `units` and `direction`."""
    from qkov.pipeline.store import RunStore

    store = RunStore(text_run[0])
    stats, scores = store.open_stats(), store.open_scores()
    missing = [f"stats/{v}" for v in stats.data_vars if not {"question", "units", "direction"} <= set(stats[v].attrs)]
    missing += [f"scores/{v}" for v in ("interference", "alignment") if not {"question", "units", "direction"} <= set(scores[v].attrs)]
    assert not missing, missing
    assert {"mean", "null_mean", "p_value", "q_value", "significant", "p_fwer", "ci_low", "ci_high", "in_family",
            "sharing", "sharing_ci_low", "cosine", "cosine_norm_z"} <= set(stats.data_vars)
    assert stats["cosine"].attrs["cosine_min_z"] > 0 and "cosine_rule" in stats["cosine"].attrs
    # every stored name is the schema's: STATS_VARS names each variable the stage writes, once, as itself
    assert set(stats.data_vars) == set(schema.STATS_VARS) and len(set(schema.STATS_VARS)) == len(schema.STATS_VARS)
    assert all(getattr(schema.STATS_VARS, v) == v for v in schema.STATS_VARS)


def test_alignment_marginals_are_the_transfer_tests_row_and_column_means(text_run):
    """Per sample of A its mean alignment with B (and per sample of B with A): the most negative
    first, each contribution adding up to transfer over its task."""
    from rich.console import Console

    from qkov.pipeline.store import RunStore

    run, _ = text_run
    scores = RunStore(run).open_scores()
    stats = _stored(run, schema.STATS).load()
    res = query_head(run, 1, 2, top=2)
    for blk in res["blocks"]:
        m = blk["alignment_marginals"]
        ab = scores["alignment"].sel(block=blk["block"], layer=1, head=2).values.astype(np.float64)
        assert m["transfer"] == pytest.approx(float(stats.transfer.sel(block=blk["block"], layer=1, head=2)), rel=1e-6)
        for key, means, ids in (("a", ab.mean(1), scores.sample_a.values), ("b", ab.mean(0), scores.sample_b.values)):
            order = [k for k in np.argsort(means, kind="stable") if means[k] < 0][:5]
            assert [r["sample"] for r in m[key]] == [str(ids[k]) for k in order]
            assert [r["marginal"] for r in m[key]] == pytest.approx(means[order], rel=1e-9)
            assert [r["contribution"] for r in m[key]] == pytest.approx(means[order] / means.size, rel=1e-9)
        assert {"question", "units", "direction"} <= set(m)
    con = Console(record=True, width=250)
    con.print(format_query(res))
    assert "alignment marginals: which samples drive the conflict?" in con.export_text()


def test_one_sided_verdicts_do_not_read_not_significant():
    """Under a one-sided labels null an effect on the untested side is "not tested", never "not
    significant" beside a CI far from 0; two-sided keeps "not significant"."""
    from qkov.pipeline.query import direction_words, one_sided_words

    row = {"direction": 0, "effect": -130.0}
    assert direction_words(row, alternative="greater") == "not tested (greater: one-sided)"
    assert direction_words(row, alternative="less") == "not significant"
    assert direction_words(row, alternative="two-sided") == "not significant"
    assert "below chance is never flagged" in one_sided_words("greater") and one_sided_words("two-sided") == ""


def test_a_top_pairs_run_shows_the_pairs_it_kept(tmp_path):
    """keep_pairs = "top" with top_k = 3: the default --top 10 shows the 3 and says why (issue 32);
    the alignment marginals come from the statistics' stored sums."""
    from rich.console import Console

    import qkov
    from qkov.testing import tiny_job

    job = tiny_job(tmp_path, "llama_gqa", n_a=4, n_b=4, score={"keep_pairs": "top", "top_k": 3},
                   stats={"n_permutations": 19, "n_bootstrap": 19})
    qkov.run(job, inline=True, progress=False)
    res = qkov.query(job.output.path, layer=0, head=1, score="alignment")
    assert [len(b["top_pairs"]) for b in res["blocks"]] == [3, 3, 3, 3]
    assert (res["top_asked"], res["top_kept"]) == (10, 3)
    stats = qkov.open_stats(job.output.path)
    for blk in res["blocks"]:
        m = blk["alignment_marginals"]
        assert m is not None and m["n_a"] == 4 and m["n_b"] == 4
        assert m["transfer"] == pytest.approx(float(stats.transfer.sel(block=blk["block"], layer=0, head=1)), rel=1e-6)
    con = Console(record=True, width=250)
    con.print(format_query(res))
    assert "shown 3 of the 10 asked: the run kept the top 3 pairs per slice" in " ".join(con.export_text().split())
