"""`qkov report`: heatmaps that cannot be misread (effects diverging and centred, sharing on a
sequential scale where its values live, one scale for all blocks, marks that agree with the
colour, not-significant cells muted), each table's own test as its evidence, 300-dpi PNG + SVG
files, and one self-contained page without machine paths; a run with planted conflict and
sharing heads reads the right way round (`qkov.testing.plant_heads`). The page's interaction
is tested in Chromium by tests/test_report_browser.py."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import to_rgb

from qkov.pipeline import schema
from qkov.pipeline.errors import QkovError
from qkov.pipeline.report import HEATMAPS, colour_of, effect_figure, heatmap_data, heatmap_svg, make_report

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
    from qkov.pipeline.query import QUESTIONS, headline_tables
    from qkov.pipeline.store import RunStore

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
    assert "(mean − chance) / chance" in legend[-1]

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
    assert np.allclose(s["panels"]["Q"]["values"], 1.0)  # no stored `sharing`: the geometric mean of 0.5 and 2


def test_one_outlying_cell_does_not_wash_out_the_scale():
    """Beyond 1.5× the 98th percentile of |effect| the shared scale stops (the demo: one head at
    −99.7% of chance, the next at −59%); the outlier takes the end colour and the bar says ≤."""
    from qkov.pipeline.report import tick_label

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
    from qkov.pipeline.query import headline_tables
    from qkov.pipeline.store import RunStore

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


def _depth(hex_colour: str) -> float:
    """How deep a colour is: its distance from white (0 = white)."""
    return float(np.linalg.norm(1.0 - np.array(to_rgb(hex_colour))))


def test_not_significant_cells_are_muted_and_sharing_reads_on_a_sequential_scale():
    """Issue 29: the cosine map's deepest colour sat on a non-significant head while a
    significant conflict was near white; sharing (≤ 1 everywhere) was painted on a scale
    centred on 1, all on the "separated" side. Here a non-significant cosine of −0.9 must be
    paler than a significant −0.3 (muted, hatched, on the page and in the figure alike), and
    sharing values of 0.90–0.99 must span the sequential scale, the stored `sharing` winning
    over the geometric mean of the directions."""
    from qkov.pipeline.report import MUTE, sharing_of

    L, H = 2, 4
    kv, fam = np.arange(H), np.ones((4, H), dtype=bool)
    shape = (2, 4, L, H)
    zeros = np.zeros(shape, dtype=np.int8)
    cosine = np.full((4, L, H), 0.05)
    tdir = np.zeros((4, L, H), dtype=np.int8)
    cosine[0, 0, 0] = -0.9  # deep, but its transfer test is not significant
    cosine[3, 1, 2], tdir[3, 1, 2] = -0.3, -1  # a significant conflict
    cosine[1, 1, 1] = np.nan  # no direction
    ds = _synthetic(np.zeros(shape), np.full(shape, 10.0), zeros, cosine, tdir, kv, fam)
    share = np.linspace(0.90, 0.99, 4 * L * H).reshape(4, L, H)
    ds["sharing"] = (("block", "layer", "head"), share)

    c = heatmap_data(ds, "conflict")
    colour = colour_of(c)
    muted = {b: p["muted"] for b, p in c["panels"].items()}
    assert muted["Q"][0, 0] and not muted["O"][1, 2] and not muted["K"][1, 1]  # NaN: no value, not muted
    assert sum(int(m.sum()) for m in muted.values()) == 4 * L * H - 2
    deep = max((_depth(colour(float(p["values"][r, k]), bool(p["muted"][r, k]))), b, r, k)
               for b, p in c["panels"].items() for r in range(L) for k in range(H))
    assert deep[1:] == ("O", 1, 2)  # the significant conflict is the deepest colour on the map
    assert _depth(colour(-0.9, True)) < _depth(colour(-0.3))
    svg = heatmap_svg(c)
    assert f"data-id='Q-0-0' data-v='-0.9' data-muted=1" in svg and f"fill='{colour(-0.9, True)}'" in svg
    assert "data-id='O-1-2' data-v='-0.3' x=" in svg and svg.count("class='hatch'") == 4 * L * H - 2
    fig = effect_figure(c, ("math", "code"), [])
    q_ax = [ax for ax in fig.axes if ax.images][0]
    over = q_ax.images[1].get_array()  # white at MUTE over the muted cells: the page's colour
    assert over[0, 0, 3] == pytest.approx(MUTE) and np.isnan(c["panels"]["Q"]["values"]).sum() == 0
    assert any("not significant by the transfer test" in t.get_text() for t in fig.legends[0].get_texts())
    assert any("no direction" in t.get_text() for t in fig.legends[0].get_texts())
    d = heatmap_data(ds, "differ")  # nothing significant vs chance: every finite cell muted
    assert all(p["muted"][np.isfinite(p["values"])].all() for p in d["panels"].values())

    s = heatmap_data(ds, "sharing")
    assert sharing_of(ds).identical(ds["sharing"]) and np.allclose(s["panels"]["Q"]["values"], share[0])
    assert (s["vmin"], s["vmax"]) == pytest.approx((0.90, 0.99))  # where the values live, not centred on 1
    assert not any(p["muted"].any() for p in s["panels"].values())
    col = colour_of(s)
    assert _depth(col(0.99)) - _depth(col(0.90)) > 0.8  # the run's range spans the scale
    del ds["sharing"]
    assert np.allclose(sharing_of(ds).values, 1.0)  # older statistics: √(sharing_ab · sharing_ba)


def test_figures_show_task_names_with_mathtext_characters_as_written(run):
    """Issue 32: a task named with `$` (and `_`, `^`, `\\`) crashed the report in matplotlib's
    mathtext. Every figure the report draws renders, with the names as plain text, even
    where the caller's session asks for LaTeX."""
    import matplotlib

    from qkov.pipeline.report import figure_bytes, raw_mean_figure
    from qkov.pipeline.store import RunStore

    stats = RunStore(run).open_stats()
    tasks = ("a$b_c^d", "b_1_2$c\\")  # between the two $ of a title: "b_c^d × b_1_2", a double subscript
    with matplotlib.rc_context({"text.usetex": True}):  # the caller's LaTeX setting must not reach user text
        figs = [effect_figure(heatmap_data(stats, "differ"), tasks, []), raw_mean_figure(stats, "interference", tasks)]
        for fig in figs:
            assert figure_bytes(fig, "svg")  # draws every text as the PNG does
    title = figs[0]._suptitle
    assert tasks[0] in title.get_text() and title._preprocess_math(title.get_text()) == (title.get_text(), False)


CONFLICT, SHARING = ("K", 1, 2), ("O", 0, 1)  # planted; K under GQA: KV head 1, drawn in query head 2's column


@pytest.fixture(scope="module")
def planted(run, tmp_path_factory):
    """A copy of the tiny run with a planted conflict head and a planted sharing head (every
    other slice: separated tasks, orthogonal task means), its statistics two-sided, one sample
    flagged as a norm outlier where it fills the conflict head's top pairs, and its report."""
    import zarr

    from qkov.pipeline.store import RunStore
    from qkov.testing import plant_heads

    dst = tmp_path_factory.mktemp("planted") / "run"
    shutil.copytree(run, dst)
    plant_heads(dst, conflict=[CONFLICT], sharing=[SHARING], alternative="two-sided")
    m = RunStore(str(dst)).open_scores()["interference"].sel(block="K", layer=CONFLICT[1], head=CONFLICT[2])
    top5 = np.argsort(-m.values.ravel(), kind="stable")[:5]  # the top pairs the page embeds
    ids = [str(m["sample_a"].values[k // m.shape[1]]) for k in top5]
    heavy = max(set(ids), key=ids.count)
    assert ids.count(heavy) >= 3  # it fills the top pairs: query and the page must warn
    diag = zarr.open_group(str(dst / schema.DIAGNOSTICS), mode="r+")
    sample = [str(x) for x in diag["sample_i"][:]].index(heavy)
    diag["outlier"][1, CONFLICT[1], :, sample] = True  # block K, every head of the layer
    page = make_report(str(dst))
    return str(dst), RunStore(str(dst)).open_stats(), page, heavy


def _svg_cells(html: str, kind: str) -> dict[str, tuple[str, bool]]:
    """slice id -> (fill, muted) of one heatmap on the page."""
    import re

    svg = html[html.index(f"<svg class='heat' data-kind='{kind}'"):]
    svg = svg[:svg.index("</svg>")]
    return {m[0]: (m[2], bool(m[1])) for m in re.findall(r"<rect data-id='([^']+)' data-v='[^']*'( data-muted=1)? x='[^']*' "
                                                          r"y='[^']*' width='[^']*' height='[^']*' fill='([^']+)'", svg)}


def test_planted_heads_cannot_be_read_backwards(planted):
    """Issue 29, acceptance: on a run with a planted conflict head and a planted sharing head,
    the conflict is listed under conflict with a negative transfer and is the deepest colour
    of the cosine map, where every other head is muted; the sharing head tops "share most"
    and the sharing map; each table's own test is what "Evidence per block" plots; the
    samples driving the conflict are named; the top pairs panel carries `qkov query`'s
    outlier warning."""
    from qkov.pipeline.health import head_diagnostics, open_diagnostics
    from qkov.pipeline.query import DIRECTION_WORDS, headline_tables, query_head
    from qkov.pipeline.report import evidence_figure, sharing_of
    from qkov.pipeline.store import RunStore

    run, stats, page, heavy = planted
    html = page.read_text(encoding="utf-8")
    cid, sid = "-".join(map(str, CONFLICT)), "-".join(map(str, SHARING))
    tables = {t["key"]: t for t in headline_tables(stats, 10)}
    top = tables["conflict"]["rows"][0]
    assert (top["block"], top["layer"], top["head"], top["transfer_direction"]) == (*CONFLICT, -1) and top["transfer"] < 0
    assert tables["conflict"]["n_found"] == 1 and f"href='#pairs-{cid}'" in html.split("id='t-conflict-alignment'")[1][:3000]
    first = tables["shared"]["rows"][0]
    assert (first["block"], first["layer"], first["head"]) == SHARING
    # the page's share table lists the planted head first, ranked on sharing alone, each row with its verdict
    shared_html = html.split("id='t-shared-interference'")[1].split("</table>")[0]
    assert shared_html.index(f"#pairs-{sid}'") == min(shared_html.index(f"#pairs-{r['block']}-{r['layer']}-{r['head']}'")
                                                    for r in tables["shared"]["rows"])
    for r in tables["shared"]["rows"]:
        row = shared_html.split(f"#pairs-{r['block']}-{r['layer']}-{r['head']}'")[1].split("</tr>")[0]
        assert DIRECTION_WORDS[r["direction"]] in row, r

    for kind in HEATMAPS:
        data = heatmap_data(stats, kind)
        colour = colour_of(data)
        cells = _svg_cells(html, kind)
        assert len(cells) == int(stats.attrs["family_size"])
        drawn = {p["ids"][r][c]: (float(p["values"][r, c]), bool(p["muted"][r, c]), int(p["marks"][r, c]))
                 for p in data["panels"].values() for r in range(len(p["layers"])) for c in range(len(p["cols"]))}
        assert {k: (colour(v, m), m) for k, (v, m, _) in drawn.items()} == cells  # page = data = figure colours
        deepest = max(cells, key=lambda k: _depth(cells[k][0]))
        if kind == "conflict":
            assert deepest == cid and drawn[cid][0] < 0 and drawn[cid][2] == -1 and not drawn[cid][1]
            assert all(m or not np.isfinite(v) for k, (v, m, _) in drawn.items() if k != cid)  # the rest muted
        elif kind == "sharing":
            assert deepest == sid and drawn[sid][0] == pytest.approx(data["vmax"]) and drawn[sid][0] > 0.8
            assert sharing_of(stats).sel(block="O", layer=0, head=1) == pytest.approx(drawn[sid][0])
        else:  # differ: muted exactly where the label-permutation test is not significant
            assert all(m == (d == 0) for v, m, d in drawn.values() if np.isfinite(v))

    # Evidence per block: the transfer test behind conflict, the labels null behind differ
    fig = evidence_figure(stats)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "transfer test" in titles[0] and "label-permutation" in titles[1]
    counts = [t.get_text() for t in fig.axes[0].texts]
    assert counts == ["0/8", "1/4", "0/4", "0/8"]  # Q K V O: the one planted conflict, in K

    # the samples that drive the conflict: the most negative row / column means of its A×B alignment
    al = RunStore(run).open_scores()["alignment"].sel(block="K", layer=CONFLICT[1], head=CONFLICT[2]).values.astype(float)
    ids_a = [str(x) for x in RunStore(run).open_scores()["sample_a"].values]
    drivers = html.split("id='t-drivers'")[1].split("</table>")[0]
    assert f"{ids_a[int(np.argmin(al.mean(axis=1)))]} (" in drivers.split("<td>")[-2][:20]
    assert float(np.mean(al.mean(axis=1))) == pytest.approx(top["transfer"], rel=1e-4)  # the means average to it

    # the pairs panel's outlier warning: query's own words, with RUN for the path
    data = json.loads(html.split("id='qkov-data'>")[1].split("</script>")[0])
    want = query_head(run, CONFLICT[1], CONFLICT[2], block="K", top=5)["blocks"][0]["diagnostics"]["warning"]
    assert want and data["warnings"][cid]["interference"] == want.replace(run, "RUN") and heavy in want
    shown = [{"sample_a": ids_a[i], "sample_b": "-"} for i, _, _ in data["pairs"][sid]["interference"]]
    assert (head_diagnostics(open_diagnostics(RunStore(run)), *SHARING, shown)["warning"] is None) == (sid not in data["warnings"])
