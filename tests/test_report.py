"""`qkov report`: PNGs, a self-contained HTML page that embeds them, and a page Chromium renders."""
from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline.errors import QkovError
from pipeline import schema
from pipeline.report import heatmap_figure, make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = ("heatmap_interference.png", "heatmap_alignment.png", "summary_q.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    from pipeline.run import run_job
    from qkov.testing import tiny_job

    job = tiny_job(tmp_path_factory.mktemp("report"), "llama_gqa", n_a=8, n_b=6,
                   tasks={"a": {"name": "math"}, "b": {"name": "code"}})
    run_job(job)
    return job.output.path


@pytest.fixture(scope="module")
def report(run) -> Path:
    return make_report(run)


class _Page(HTMLParser):
    """Collects every tag and its attributes, and the visible text."""

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


def test_report_writes_pngs_and_embeds_them(run, report):
    assert report == Path(str(run) + "-report") / "report.html"
    on_disk = {name: (report.parent / name).read_bytes() for name in PNGS}
    assert all(b.startswith(PNG_MAGIC) for b in on_disk.values())
    page = _parse(report)
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == len(PNGS)
    embedded = []
    for a in imgs:
        prefix = "data:image/png;base64,"
        assert a["src"].startswith(prefix) and a.get("alt")
        data = base64.b64decode(a["src"][len(prefix):], validate=True)
        assert data.startswith(PNG_MAGIC)
        embedded.append(data)
    assert sorted(embedded) == sorted(on_disk.values())  # the page shows exactly the written files
    # self-contained: no scripts, stylesheets or any other outside reference
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed")]
    refs = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href") and not v.startswith("data:")]
    assert refs == []


def test_report_names_the_run_and_ranks_heads(run, report):
    from pipeline.query import significant_heads

    text = "".join(_parse(report).text)
    stats = xr.open_zarr(run, group=schema.STATS, consolidated=False)
    for s in ("math vs code", "LlamaForCausalLM", "8 samples", "6 samples", "48 (A×B)",
              f"n_permutations={stats.attrs['n_permutations']}", "Top heads — interference", "Top heads — alignment"):
        assert s in text, s
    html = report.read_text(encoding="utf-8")
    for score in ("interference", "alignment"):
        best = significant_heads(run, score=score, top=1)[0]
        assert f"{best['q_value']:.3g}" in html
    assert html.count("<tr class=") == 2 * 10  # top-10 table per score


def test_heatmap_marks_exactly_the_significant_cells():
    """Planted significance on a GQA layout (3 layers, 6 query heads, 2 KV heads): the dots sit on
    those cells, K/V are drawn once per KV head, and the axes and titles say what is shown."""
    rng = np.random.default_rng(0)
    blocks, L, H = ["Q", "K", "V", "O"], 3, 6
    kv = np.repeat([0, 1], 3)
    sig = np.zeros((2, 4, L, H), dtype=bool)
    sig[0, 0, 1, 4] = sig[0, 0, 2, 0] = True  # Q
    sig[0, 1, 0, 3] = True  # K, KV head 1 (query head 3 represents it)
    sig[0, 2, 2, :3] = True  # V, KV head 0: all its query heads carry the same entry
    fam = np.array([[True] * 6, [True, False, False, True, False, False], [True, False, False, True, False, False], [True] * 6])
    v = rng.random((2, 4, L, H))
    ds = xr.Dataset(
        {"mean": (("score", "block", "layer", "head"), v), "significant": (("score", "block", "layer", "head"), sig),
         "q_value": (("score", "block", "layer", "head"), np.where(sig, 0.01, 0.5)), "in_family": (("block", "head"), fam)},
        coords={"score": ["interference", "alignment"], "block": blocks, "layer": [0, 1, 2], "head": np.arange(H),
                "kv_head": ("head", kv)},
        attrs={"alpha": 0.05, "family_size": 36, "alternative": "greater", "n_permutations": 99},
    )
    fig = heatmap_figure(ds, "interference", ("math", "code"))
    panels = fig.axes
    assert [ax.get_title().split("\n")[0] for ax in panels] == [f"{b} · interference" for b in blocks]
    want = {"Q": {(4, 1), (0, 2)}, "K": {(1, 0)}, "V": {(0, 2)}, "O": set()}
    for ax, b in zip(panels, blocks):
        dots = {(x, y) for line in ax.lines for x, y in zip(np.asarray(line.get_xdata()).tolist(), np.asarray(line.get_ydata()).tolist())}
        assert dots == want[b], b
        assert ax.get_ylabel() == "layer"
        assert ax.get_xlabel() == ("KV head" if b in "KV" else "head")
        assert ax.images[0].get_array().shape == (L, 2 if b in "KV" else H)
    assert "math×code" in fig._suptitle.get_text()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "BH q ≤ α = 0.05" in labels[0] and "KV 0: q-heads 0–2; KV 1: q-heads 3–5" in labels[0]
    cbar_labels = [c.get_ylabel() for ax in panels for c in ax.child_axes]  # colorbars sit in inset axes
    assert cbar_labels == ["mean interference M (≥ 0)"] * 4


def test_heatmap_marks_direction_against_the_null():
    """Significant cells above the permutation null's mean get ▲, below it ▼."""
    L, H = 2, 3
    sig = np.zeros((1, 1, L, H), dtype=bool)
    sig[0, 0, 0, 1] = sig[0, 0, 1, 2] = True
    mean = np.ones((1, 1, L, H))
    null = np.ones((1, 1, L, H))
    null[0, 0, 0, 1], null[0, 0, 1, 2] = 0.5, 2.0  # (0,1) above chance, (1,2) below
    dims = ("score", "block", "layer", "head")
    ds = xr.Dataset(
        {"mean": (dims, mean), "null_mean": (dims, null), "significant": (dims, sig), "q_value": (dims, np.where(sig, 0.01, 0.5)),
         "in_family": (("block", "head"), np.ones((1, H), dtype=bool))},
        coords={"score": ["interference"], "block": ["Q"], "layer": [0, 1], "head": np.arange(H), "kv_head": ("head", np.arange(H))},
        attrs={"alpha": 0.05, "family_size": 6, "alternative": "two-sided", "n_permutations": 99},
    )
    (ax,) = heatmap_figure(ds, "interference", ("a", "b")).axes[:1]
    by_marker = {line.get_marker(): set(zip(np.asarray(line.get_xdata()).tolist(), np.asarray(line.get_ydata()).tolist()))
                 for line in ax.lines}
    assert by_marker == {"^": {(1, 0)}, "v": {(2, 1)}}


def test_remote_run_needs_an_out_dir():
    with pytest.raises(ValueError, match="pass out_dir"):
        make_report("s3://bucket/run")


def test_missing_stats_names_the_stage(run, tmp_path):
    cut = tmp_path / "no-stats"
    shutil.copytree(run, cut, ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(cut / schema.STATS)
    with pytest.raises(QkovError, match=r"no 'stats' group; run the stats stage"):
        make_report(str(cut))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get install -y chromium); "
                                                 "the page-rendering check needs a headless browser")
def test_page_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           "--enable-logging=stderr", "--v=0", report.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page_errors = [ln for ln in proc.stderr.splitlines() if "Uncaught" in ln or "ERROR:CONSOLE" in ln]
    assert page_errors == []
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (2000, 1280, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text and heatmaps, not a blank page
    # the figures were drawn: the viridis/RdBu colours of the heatmaps are on screen
    assert (img.std(axis=2) > 40).mean() > 0.01
