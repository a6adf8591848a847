"""`qkov report` on a run of more than two tasks: one two-task report per task pair (each naming
its own tasks and task files) and a self-contained overview whose counts are each pair's own
answers, recounted here from the pair's statistics; `pair=` writes one pair's report only."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import qkov
from qkov.pipeline import schema
from qkov.pipeline.errors import UsageError
from qkov.pipeline.report import make_report
from qkov.pipeline.store import RunStore

PAIRS = {"a-b": ("alpha", "beta"), "a-c": ("alpha", "gamma"), "b-c": ("beta", "gamma")}
FILES = {"alpha": "a-0-10.jsonl", "beta": "b-0-7.jsonl", "gamma": "c-0-6.jsonl"}  # tiny_job's task files


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A finished three-task run with planted conflicts: alpha × gamma in Q 1·2 and V 0 (KV 0),
    beta × gamma in Q 1·2 and O 0·3, so head (1, 2) conflicts in two pairs (every other slice:
    separated tasks, `plant_heads`)."""
    from qkov.pipeline.run import run_job
    from qkov.testing import plant_heads, tiny_job

    job = tiny_job(tmp_path_factory.mktemp("pairs"), more=(6,))
    assert [FILES[n] for n in ("alpha", "beta", "gamma")] == [Path(job.tasks[k].path).name for k in "abc"]
    run_job(job)
    path = job.output.path
    plant_heads(f"{path}/{schema.pair_group('a', 'c')}", conflict=[("Q", 1, 2), ("V", 0, 0)], sharing=[("O", 1, 1)])
    plant_heads(f"{path}/{schema.pair_group('b', 'c')}", conflict=[("Q", 1, 2), ("O", 0, 3)], n_features=60)
    return path


@pytest.fixture(scope="module")
def overview(run) -> Path:
    return make_report(run)


class _Page(HTMLParser):
    """Every tag with its attributes, and the visible text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _header_row(html: str, label: str) -> str:
    """The text of one row of a page's header table (`<tr><th>label</th><td>…</td></tr>`)."""
    m = re.search(rf"<tr><th>{re.escape(label)}</th><td>(.*?)</td></tr>", html)
    assert m, label
    return re.sub(r"<[^>]+>", "", m.group(1))


def _recount(stats) -> dict[str, int]:
    """A pair's answers counted straight from its stats variables: family slices (K/V once per KV
    head) with transfer_direction −1 / +1, and with a finite sharing whose interference is
    significantly above / below chance."""
    fam = np.asarray(stats[schema.STATS_VARS.in_family].transpose("block", "head").values, dtype=bool)[:, None, :]
    fam = np.broadcast_to(fam, (fam.shape[0], stats.sizes["layer"], fam.shape[2]))
    td = stats["transfer_direction"].transpose("block", "layer", "head").values
    d = stats["direction"].sel(score="interference").transpose("block", "layer", "head").values
    ok = fam & np.isfinite(stats["sharing"].transpose("block", "layer", "head").values)
    return {"conflict": int((fam & (td == -1)).sum()), "synergy": int((fam & (td == 1)).sum()),
            "more_overlap": int((ok & (d == 1)).sum()), "less_overlap": int((ok & (d == -1)).sum()), "family": int(fam.sum())}


@pytest.mark.slow
def test_overview_links_to_each_pairs_report_and_is_self_contained(run, overview):
    out = Path(str(run) + "-report")
    assert overview == out / "index.html"
    page = _parse(overview)
    cells = [a["href"] for t, a in page.tags if t == "a" and a.get("title", "").startswith("the full report")]
    assert sorted(cells) == [f"{k}/report.html" for k in PAIRS]
    for k in PAIRS:
        assert (out / k / "report.html").is_file() and (out / k / "run_info.json").is_file()
    # self-contained: inline style, no script, nothing fetched; every link to a file written here
    assert not [t for t, _ in page.tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    for t, a in page.tags:
        if t == "a":
            assert (out / a["href"].split("#")[0]).is_file(), a["href"]
    text = " ".join(page.text)
    assert "BH q ≤ α" in text and "not across the 3 pairs" in text and "within that pair" in text
    assert str(Path(run).parent) not in overview.read_text(encoding="utf-8")  # no machine paths


def test_each_pair_report_names_its_own_tasks_and_task_files(run, overview):
    out = overview.parent
    for key, (a, b) in PAIRS.items():
        html = (out / key / "report.html").read_text(encoding="utf-8")
        row_a, row_b = _header_row(html, "task A"), _header_row(html, "task B")
        assert row_a.startswith(f"{a}:") and FILES[a] in row_a
        assert row_b.startswith(f"{b}:") and FILES[b] in row_b
        assert f"qkov report — {a} vs {b}" in html
        other = ({"alpha", "beta", "gamma"} - {a, b}).pop()
        assert FILES[other] not in html
        info = json.loads((out / key / "run_info.json").read_text(encoding="utf-8"))
        assert (info["task_a"]["name"], info["task_b"]["name"]) == (a, b)
        assert info["task_a"]["path"].endswith(FILES[a]) and info["task_b"]["path"].endswith(FILES[b])
    # the overview names every task with its file
    html = overview.read_text(encoding="utf-8")
    for k, name in zip("abc", ("alpha", "beta", "gamma")):
        row = _header_row(html, f"task {k}")
        assert row.startswith(f"{name}:") and FILES[name] in row


def test_overview_counts_are_each_pairs_own_answers(run, overview):
    store = RunStore(run)
    ov = json.loads((overview.parent / "overview.json").read_text(encoding="utf-8"))
    html = overview.read_text(encoding="utf-8")
    by_key = {r["key"]: r for r in ov["pairs"]}
    conflicts = set()
    for x, y in store.pair_keys():
        key = f"{x}-{y}"
        want = _recount(store.pair(x, y).open_stats())
        assert by_key[key]["counts"] == want, key
        # and the page's cell shows the same numbers
        cell = re.search(rf"<td class='pair' data-pair='{key}'>(.*?)</td>", html).group(1)
        shown = [int(n) for n in re.findall(r"data-n='(\d+)'", cell)]
        assert shown == [want[k] for k in ("conflict", "synergy", "more_overlap", "less_overlap")]
        assert f"of {want['family']} slices" in cell
        conflicts |= {(c["layer"], c["head"], key, c["block"]) for c in by_key[key]["conflicts"]}
    assert by_key["a-c"]["counts"]["conflict"] >= 1 and by_key["b-c"]["counts"]["conflict"] >= 1  # the planted ones
    assert by_key["a-c"]["counts"]["less_overlap"] > 0
    # the per-head table: head (1, 2) conflicts in both planted pairs and comes first, by name
    rows = re.findall(r"<tr data-layer='(\d+)' data-head='(\d+)'><td class='num'>\d+</td><td class='num'>\d+</td>"
                      r"<td class='num'>(\d+)</td><td>(.*?)</td></tr>", html)
    assert rows and rows[0][:3] == ("1", "2", "2")
    assert "alpha × gamma" in rows[0][3] and "beta × gamma" in rows[0][3]
    listed = {(int(layer), int(head)) for layer, head, _, _ in rows}
    assert listed == {(layer, head) for layer, head, _, _ in conflicts}
    for layer, head, n, _ in rows:
        assert int(n) == len({k for lh, hh, k, _ in conflicts if (lh, hh) == (int(layer), int(head))})


def test_pair_option_writes_that_pairs_report_only(run, tmp_path):
    page = qkov.report(run, out=tmp_path / "one", pair="alpha,gamma")
    assert page == tmp_path / "one" / "report.html"
    assert sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_dir()) == []
    assert not (tmp_path / "one" / "index.html").exists()
    html = page.read_text(encoding="utf-8")
    assert _header_row(html, "task A").startswith("alpha:") and _header_row(html, "task B").startswith("gamma:")
    # without `out`: where the all-pairs report puts that pair's, never inside the run
    assert qkov.report(run, pair="a,c") == Path(str(run) + "-report") / "a-c" / "report.html"


def test_overview_never_overwrites_a_users_index(run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my page", encoding="utf-8")
    with pytest.raises(UsageError, match="qkov did not write"):
        make_report(run, out_dir=mine)
    assert (mine / "index.html").read_text(encoding="utf-8") == "my page"
    assert sorted(p.name for p in mine.iterdir()) == ["index.html"]  # no pair's report started either


def test_the_per_head_task_matrix_shows_each_pairs_answer_at_the_head(run, overview):
    """Head (1, 2) conflicts in alpha × gamma and beta × gamma (planted): its row names the
    conflicting block in those two pairs' columns and not in alpha × beta's; every cell's
    sharing range is the min–max of that pair's `sharing` over the head's blocks."""
    from qkov.pipeline.report import head_answers

    data = json.loads((overview.parent / "overview.json").read_text())
    by_key = {r["key"]: r for r in data["pairs"]}
    for key in ("a-c", "b-c"):
        assert "Q" in by_key[key]["heads"]["1/2"]["conflict"]
    assert not (by_key["a-b"]["heads"].get("1/2") or {}).get("conflict")
    store = RunStore(run)
    for (x, y), key in zip(store.pair_keys(), ("a-b", "a-c", "b-c")):
        stats = store.pair(x, y).open_stats()
        assert head_answers(stats) == by_key[key]["heads"]
        sharing = stats["sharing"].sel(layer=1)  # interference only: no score dim
        want = [float(sharing.sel(block=b, head=h)) for b, h in (("Q", 2), ("O", 2))]
        got = by_key[key]["heads"]["1/2"]["sharing"]
        assert got[0] <= min(want) + 1e-12 and got[1] >= max(want) - 1e-12
    html = overview.read_text()
    assert "id='t-head-matrix'" in html and "<tr data-layer='1' data-head='2'>" in html
