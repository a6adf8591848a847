"""`qkov report`: effect heatmaps that cannot be misread (diverging, centred, one scale for all
blocks, marks that agree with the colour), 300-dpi PNG + SVG files, and one self-contained
page without machine paths. The page's interaction is tested in Chromium by
tests/test_report_browser.py."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import to_rgb

from pipeline import schema
from pipeline.errors import QkovError
from pipeline.report import HEATMAPS, colour_of, effect_figure, heatmap_data, heatmap_svg, make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("heatmap_differ", "heatmap_sharing", "heatmap_conflict", "summary_q")


@pytest.fixture(scope="module")
def run(report_run) -> str:  # the session's shared tiny run (tests/conftest.py)
    return report_run


@pytest.fixture(scope="module")
def report(report_page) -> Path:
    return report_page


class _Page(HTMLParser):
    """Collects every tag and its attributes, and the visible text (not the script's)."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data):
        if not self._in_script:
            self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_report_writes_300dpi_png_and_svg_and_one_self_contained_page(run, report):
    from PIL import Image

    assert report == Path(str(run) + "-report") / "report.html"
    for stem in FIGURES:
        png = report.parent / f"{stem}.png"
        assert png.read_bytes().startswith(PNG_MAGIC)
        assert Image.open(png).info["dpi"] == pytest.approx((300, 300), abs=0.5)
        svg = (report.parent / f"{stem}.svg").read_text(encoding="utf-8")
        assert "<svg" in svg and "</svg>" in svg
    page = _parse(report)
    # self-contained: inline style and script only; images as data URIs; links to the page
    # itself or to the figure files written beside it
    scripts = [a for t, a in page.tags if t == "script"]
    assert len(scripts) == 2 and all("src" not in a for a in scripts)
    assert not [t for t, _ in page.tags if t in ("link", "iframe", "object", "embed")]
    for t, a in page.tags:
        if "src" in a:
            assert a["src"].startswith("data:image/"), a
        if t == "a" and "href" in a:
            href = a["href"]
            assert href.startswith("#") or (report.parent / href).is_file(), href


def test_report_shows_no_machine_paths(run, report):
    """The run is named relative to the report, other files by their name only."""
    html = report.read_text(encoding="utf-8")
    info = json.loads((report.parent / "run_info.json").read_text(encoding="utf-8"))
    tmp_root = str(Path(run).parent.parent)
    for text in (html, json.dumps(info)):
        assert tmp_root not in text and str(Path.home()) + "/" not in text
    assert info["run"] == f"../{Path(run).name}"
    assert info["task_a"]["path"].startswith(("../", "…/")) and not info["task_a"]["path"].startswith("/")


def test_report_tables_name_their_question_and_direction(run, report):
    from pipeline.query import QUESTIONS, headline_tables
    from pipeline.store import RunStore

    page = _parse(report)
    text = "".join(page.text)
    for s in ("math vs code", "LlamaForCausalLM", "8 samples", "6 samples", "48 (A×B)"):
        assert s in text, s
    for q in QUESTIONS.values():
        assert q.capitalize() in text, q
    assert "Top heads" not in text and "top interference" not in text.lower()
    stats = RunStore(run).open_stats()
    html = report.read_text(encoding="utf-8")
    for tb in headline_tables(stats, 10, differ_scores=("interference",)):
        table_id = f"t-{tb['key']}-{tb['score']}"
        assert (table_id in html) == bool(tb["rows"]), table_id
        for r in tb["rows"]:
            assert f"#pairs-{r['block']}-{r['layer']}-{r['head']}" in html


def _synthetic(effect: np.ndarray, chance: np.ndarray, direction: np.ndarray, cosine: np.ndarray,
               transfer_direction: np.ndarray, kv: np.ndarray, fam: np.ndarray) -> xr.Dataset:
    """A stats dataset with the variables the heatmaps read: [score, block, layer, head]
    for the labels-null ones, [block, layer, head] for sharing and the transfer test."""
    d4, d3 = ("score", "block", "layer", "head"), ("block", "layer", "head")
    mean = chance + effect
    sig = direction != 0
    n_s, n_b, n_l, n_h = effect.shape
    return xr.Dataset(
        {"mean": (d4, mean), "null_mean": (d4, chance * 1.01), "effect": (d4, effect), "direction": (d4, direction),
         "significant": (d4, sig), "q_value": (d4, np.where(sig, 0.001, 0.5)),
         "sharing_ab": (d3, np.full((n_b, n_l, n_h), 0.5)), "sharing_ba": (d3, np.full((n_b, n_l, n_h), 2.0)),
         "cosine": (d3, cosine), "transfer_direction": (d3, transfer_direction),
         "in_family": (("block", "head"), fam)},
        coords={"score": ["interference", "alignment"][:n_s], "block": ["Q", "K", "V", "O"][:n_b],
                "layer": np.arange(n_l), "head": np.arange(n_h), "kv_head": ("head", kv)},
        attrs={"alpha": 0.05, "family_size": int(fam.sum() * n_l), "alternative": "two-sided", "n_permutations": 999},
    )


def test_effect_heatmaps_share_one_centred_scale_and_marks_follow_direction():
    """The demo's old failure: a deep-red (large raw mean) cell carrying ▼. Here the colour
    is the effect vs chance, so a slice whose mean is large but below chance is blue with
    ▼; one scale, symmetric about 0, is shared by Q, K, V and O; K/V are drawn per KV head."""
    L, H = 3, 6
    kv = np.repeat([0, 1], 3)
    fam = np.array([[True] * 6, [True, False, False, True, False, False],
                    [True, False, False, True, False, False], [True] * 6])
    shape = (2, 4, L, H)
    chance = np.full(shape, 10.0)
    chance[:, 0] = 0.01  # Q: a block of tiny scores (relative effects compare across blocks)
    effect = np.zeros(shape)
    direction = np.zeros(shape, dtype=np.int8)
    effect[0, 2, 1, 0], direction[0, 2, 1, 0] = -4.0, -1  # V, KV head 0: 40% below chance, mean 6 (large)
    effect[0, 0, 2, 5], direction[0, 0, 2, 5] = 0.002, 1  # Q: 20% above chance on a tiny score
    effect[0, 3, 0, 1] = 1.0  # O: +10%, not significant: coloured, unmarked
    cosine = np.full((4, L, H), np.nan)
    cosine[0, 0, 0], cosine[3, 2, 4] = -0.5, 0.25
    tdir = np.zeros((4, L, H), dtype=np.int8)
    tdir[0, 0, 0] = -1
    ds = _synthetic(effect, chance, direction, cosine, tdir, kv, fam)

    d = heatmap_data(ds, "differ")
    assert d["vmin"] == -d["vmax"] == pytest.approx(-40.0)  # max |effect / chance| over every block, in %
    assert [len(p["labels"]) for p in d["panels"].values()] == [6, 2, 2, 6]
    v = d["panels"]["V"]
    assert v["values"][1, 0] == pytest.approx(-40.0) and v["marks"][1, 0] == -1 and v["xlabel"] == "KV head"
    assert d["panels"]["Q"]["values"][2, 5] == pytest.approx(20.0) and d["panels"]["Q"]["marks"][2, 5] == 1
    assert d["panels"]["O"]["marks"][0, 1] == 0 and d["panels"]["O"]["values"][0, 1] == pytest.approx(10.0)
    colour = colour_of(d)
    r, g, b = to_rgb(colour(-40.0))
    assert b > r + 0.3  # below chance is blue on RdBu_r ...
    r, g, b = to_rgb(colour(20.0))
    assert r > b + 0.2  # ... above chance red
    assert min(to_rgb(colour(0.0))) > 0.9  # chance itself is (near) white
    assert colour(float("nan")) == "#d9d9d9"

    fig = effect_figure(d, ("math", "code"), [])
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["Q", "K", "V", "O"]
    assert {ax.images[0].get_clim() for ax in panels} == {(-40.0, 40.0)}  # one scale for every block
    marks = {}
    for ax, blk in zip(panels, "QKVO"):
        for line in ax.lines:
            for x, y in zip(line.get_xdata(), line.get_ydata()):
                marks[(blk, int(y), int(x))] = line.get_marker()
    assert marks == {("V", 1, 0): "v", ("Q", 2, 5): "^"}
    assert len([ax for ax in fig.axes if not ax.images]) == 1  # one colour bar
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == list(HEATMAPS["differ"]["marks"])
    assert "(mean − chance) / chance" in legend[2]

    # the page draws the same cells with the same colours and marks
    svg = heatmap_svg(d)
    assert f"data-id='V-1-0' data-v='-40' x=" in svg and f"fill='{colour(-40.0)}'" in svg
    assert svg.count("class='mark'") == 2 and svg.count("<rect data-id=") == (6 + 2 + 2 + 6) * L

    c = heatmap_data(ds, "conflict")
    assert (c["vmin"], c["vmax"]) == (-0.5, 0.5)
    assert c["panels"]["Q"]["marks"][0, 0] == -1  # the conflict, ▼
    r, g, b = to_rgb(colour_of(c)(-0.5))
    assert r > b + 0.2  # conflict is red on RdBu
    s = heatmap_data(ds, "sharing")
    assert np.allclose(s["panels"]["Q"]["values"], 0.0)  # geometric mean of 0.5 and 2 = 1: the neutral value


def test_one_outlying_cell_does_not_wash_out_the_scale():
    """Beyond 1.5× the 98th percentile of |effect| the shared scale stops (the demo: one head at
    −99.7% of chance, the next at −59%); the outlier takes the end colour and the bar says ≤."""
    from pipeline.report import tick_label

    L, H = 10, 6
    kv = np.repeat([0, 1], 3)
    fam = np.array([[True] * 6, [True, False, False, True, False, False],
                    [True, False, False, True, False, False], [True] * 6])
    rng = np.random.default_rng(0)
    chance = np.full((2, 4, L, H), 10.0)
    effect = rng.uniform(-0.5, 0.5, chance.shape)  # within ±5% of chance
    effect[0, 0, 4, 2] = -9.9  # one slice at −99%
    zeros = np.zeros(chance.shape, dtype=np.int8)
    ds = _synthetic(effect, chance, zeros, np.zeros((4, L, H)), zeros[0], kv, fam)
    d = heatmap_data(ds, "differ")
    assert d["clipped"] and 4.5 < d["vmax"] <= 5.0 and d["vmin"] == -d["vmax"]
    colour = colour_of(d)
    assert colour(d["panels"]["Q"]["values"][4, 2]) == colour(d["vmin"])  # the end colour
    assert tick_label("differ", d["vmin"], -1).startswith("≤ −") or tick_label("differ", d["vmin"], -1).startswith("≤ -")
    fig = effect_figure(d, ("a", "b"), [])
    bar = [ax for ax in fig.axes if not ax.images][0]
    assert [t.get_text()[:1] for t in bar.get_yticklabels()][::4] == ["≤", "≥"]
    effect[0, 0, 4, 2] = -0.6  # no outlier: the full range, unclipped
    assert not heatmap_data(_synthetic(effect, chance, zeros, np.zeros((4, L, H)), zeros[0], kv, fam), "differ")["clipped"]


def test_old_statistics_without_effect_sizes_still_report(run, tmp_path):
    """Statistics written before the effect sizes: the differ map and table fall back to
    mean − null_mean; sharing and conflict say they need a rerun of `qkov stats`."""
    from pipeline.query import headline_tables
    from pipeline.store import RunStore

    stats = RunStore(run).open_stats()
    old = stats[["mean", "null_mean", "p_value", "q_value", "significant", "p_fwer", "ci_low", "ci_high", "in_family"]]
    assert heatmap_data(old, "sharing") is None and heatmap_data(old, "conflict") is None
    d = heatmap_data(old, "differ")
    m = old.sel(score="interference", block="O", layer=0, head=1)
    assert d["panels"]["O"]["values"][0, 1] == pytest.approx(100 * float((m["mean"] - m.null_mean) / m.null_mean))
    notes = {t["key"]: t.get("note", "") for t in headline_tables(old)}
    assert "rerun `qkov stats`" in notes["conflict"] and "rerun `qkov stats`" in notes["shared"]


def test_remote_run_needs_an_out_dir():
    with pytest.raises(ValueError, match="pass out_dir"):
        make_report("s3://bucket/run")


def test_missing_stats_names_the_stage(run, tmp_path):
    cut = tmp_path / "no-stats"
    shutil.copytree(run, cut, ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(cut / schema.STATS)
    with pytest.raises(QkovError, match=r"no 'stats' group; run the stats stage"):
        make_report(str(cut))
