"""The interactive report in a real headless Chromium (Debian's `chromium`), driven over the
DevTools protocol (websocket-client): hovering a cell shows its numbers, clicking it shows its
top pairs, the tables sort and filter, nothing is fetched, no script error.

Chromium comes from the project's own test setup (`tests/system-deps.sh`, run by `make test`
and, when the browser is missing, by this module). The tests skip only where it cannot be
installed (not root, or no apt-get): on a fresh Debian/Ubuntu machine run as root they run.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from qkov.pipeline import schema

ROOT = Path(__file__).resolve().parent.parent


def _find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_or_skip() -> str:
    exe = _find_chromium()
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if exe is None and can_install:  # a fresh machine: the project's setup installs it
        subprocess.run(["bash", str(ROOT / "tests" / "system-deps.sh")], check=False, timeout=900)
        exe = _find_chromium()
    if exe is None:
        if can_install:
            pytest.fail("tests/system-deps.sh did not install chromium")
        pytest.skip("no Chromium and no way to install it here (needs root and apt-get: apt-get install -y chromium)")
    return exe


class Chromium:
    """One headless Chromium with a fresh profile and one page, over the DevTools websocket."""

    def __init__(self, exe: str, tmp: Path, width: int = 1280, height: int = 1400):
        import websocket  # websocket-client

        profile = tmp / "profile"
        self.log = open(tmp / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             "--disable-extensions", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--window-size={width},{height}", "about:blank"],
            stdout=self.log, stderr=self.log)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 90
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start: " + (tmp / "chromium.log").read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expr: str):
        res = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 20):
        """Polls a JS expression until it is truthy (events such as hashchange run as later tasks)."""
        deadline = time.monotonic() + timeout
        while not (value := self.js(expr)):
            if time.monotonic() > deadline:
                raise TimeoutError(expr)
            time.sleep(0.05)
        return value

    def centre(self, selector: str) -> tuple[float, float]:
        """Scrolls the element into view; its centre in viewport pixels."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
                      " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        return box[0], box[1]

    def mouse(self, kind: str, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left" if kind != "mouseMoved" else "none",
                  clickCount=1 if kind != "mouseMoved" else 0)

    def click(self, selector: str) -> None:
        x, y = self.centre(selector)
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def screenshot(self, path: Path) -> np.ndarray:
        from PIL import Image

        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return np.asarray(Image.open(path).convert("RGB"))

    def errors(self) -> list[str]:
        self.js("1")  # drain pending events
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:500])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:500])
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


@pytest.fixture(scope="module")
def run(report_run) -> str:  # the session's shared tiny run (tests/conftest.py)
    return report_run


@pytest.fixture(scope="module")
def report(report_page) -> Path:
    return report_page


@pytest.fixture(scope="module")
def browser(tmp_path_factory, report):
    exe = chromium_or_skip()
    b = Chromium(exe, tmp_path_factory.mktemp("chromium"))
    try:
        b.open(report.resolve().as_uri())
        yield b
    finally:
        b.close()


@pytest.fixture
def page(browser, report):
    """The page as loaded, no hash, no filter, no sort."""
    browser.js("history.replaceState(null, '', location.pathname)")
    browser.send("Page.reload", ignoreCache=True)
    browser.wait_event("Page.loadEventFired")
    return browser


def _stats(run: str) -> xr.Dataset:
    return xr.open_zarr(run, group=schema.STATS, consolidated=False).load()


def _numbers(text: str, label: str) -> float:
    m = re.search(rf"{label} (−|-)?([0-9.]+(?:e[-+]?[0-9]+)?)", text)
    assert m, (label, text)
    return float(m.group(2)) * (-1 if m.group(1) else 1)


def test_page_loads_offline_without_errors(page, run, tmp_path):
    img = page.screenshot(tmp_path / "top.png")
    assert img.shape[0] > 1000 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text and colour, not blank
    # diverging map colours on screen (red and blue cells), not only grey text
    red = ((img[..., 0].astype(int) - img[..., 2]) > 60).mean()
    blue = ((img[..., 2].astype(int) - img[..., 0]) > 60).mean()
    assert red > 0 or blue > 0
    assert page.errors() == []
    urls = page.requests()
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls  # nothing from the network
    n_cells = page.js("document.querySelectorAll('svg.heat rect[data-id]').length")
    fam = int(_stats(run).attrs["family_size"])
    assert n_cells == 3 * fam  # differ + sharing + conflict maps: one cell per family slice (family_size is per score)


def test_hover_shows_mean_chance_effect_ci_and_q(page, run):
    stats = _stats(run)
    # a K cell under GQA: the column is the KV head, the numbers are its representative's
    sid = page.js("document.querySelector('svg.heat[data-kind=differ] rect[data-id^=\"K-1-\"]').dataset.id")
    block, layer, head = sid.split("-")
    x, y = page.centre(f"svg.heat[data-kind=differ] rect[data-id='{sid}']")
    page.mouse("mouseMoved", x, y)
    page.wait_for("getComputedStyle(document.getElementById('tip')).display === 'block'")
    text = page.js("document.getElementById('tip').innerText")
    s = stats.sel(score="interference", block=block, layer=int(layer), head=int(head))
    assert f"{block} · layer {layer} · head {head} (KV head {int(s.kv_head)})" in text
    # chance = the exact mean over label permutations = mean − effect (null_mean: its Monte Carlo estimate)
    want = {"mean": float(s["mean"]), "chance": float(s["mean"] - s.effect), "effect": float(s.effect), "q": float(s.q_value)}
    for label, value in want.items():
        assert _numbers(text, label) == pytest.approx(value, rel=2e-3, abs=1e-12), label
    ci = re.search(r"effect \S+ \[(\S+), (\S+)\]", text)
    assert ci and [float(v.replace("−", "-")) for v in ci.groups()] == pytest.approx(
        [float(s.effect_ci_low), float(s.effect_ci_high)], rel=5e-3)
    words = {1: "above chance", -1: "below chance", 0: "not significant"}[int(s.direction)]
    assert words in text
    # the conflict map's hover reads alignment and its transfer test
    sid2 = page.js("document.querySelector('svg.heat[data-kind=conflict] rect[data-id^=\"O-0-\"]').dataset.id")
    x, y = page.centre(f"svg.heat[data-kind=conflict] rect[data-id='{sid2}']")
    page.mouse("mouseMoved", x, y)
    text = page.js("document.getElementById('tip').innerText")
    _, l2, h2 = sid2.split("-")
    a = stats.sel(block="O", layer=int(l2), head=int(h2))
    assert "alignment vs chance" in text
    assert _numbers(text, "transfer") == pytest.approx(float(a.transfer), rel=2e-3)
    assert _numbers(text, "mean") == pytest.approx(float(a["mean"].sel(score="alignment")), rel=2e-3)
    # moving off the maps hides it
    page.mouse("mouseMoved", 2, 2)
    assert page.js("getComputedStyle(document.getElementById('tip')).display") == "none"


@pytest.mark.parametrize("block", ["V", "O"])
def test_clicking_a_cell_shows_its_top_pairs(page, run, block):
    from qkov.pipeline.query import query_head

    sid = page.js(f"document.querySelector('svg.heat[data-kind=sharing] rect[data-id^=\"{block}-1-\"]').dataset.id")
    page.click(f"svg.heat[data-kind=sharing] rect[data-id='{sid}']")
    assert page.js("location.hash") == f"#pairs-{sid}"
    page.wait_for(f"document.getElementById('pairs').dataset.id === {json.dumps(sid)} && "
                  "document.getElementById('pairs').classList.contains('open')")
    _, layer, head = sid.split("-")
    for score in ("interference", "alignment"):
        want = query_head(run, int(layer), int(head), block=block, top=5, score=score)["blocks"][0]["top_pairs"]
        got = page.js(f"Array.from(document.querySelectorAll('#pairs table[data-score={score}] tr')).slice(1)"
                      ".map(r => [r.cells[1].innerText, r.cells[2].innerText, +r.cells[3].innerText])")
        assert [g[:2] for g in got] == [[p["sample_a"], p["sample_b"]] for p in want], score
        assert [g[2] for g in got] == pytest.approx([p[score] for p in want], rel=2e-3)
    page.click("#pairs .close")
    assert not page.js("document.getElementById('pairs').classList.contains('open')")


def test_tables_sort_and_filter(page, run):
    stats = _stats(run)
    rows = "Array.from(document.querySelectorAll('#t-all tbody tr')).filter(r => !r.hidden)"
    n_all = page.js(f"{rows}.length")
    assert n_all == 2 * int(stats.attrs["family_size"])
    q_col = page.js("Array.from(document.querySelectorAll('#t-all thead th')).findIndex(th => th.innerText.startsWith('q'))")
    page.click(f"#t-all thead th:nth-child({q_col + 1})")
    qs = page.js(f"{rows}.map(r => r.cells[{q_col}].dataset.v).filter(v => v !== '').map(Number)")
    assert qs == sorted(qs) and len(qs) == n_all
    page.click(f"#t-all thead th:nth-child({q_col + 1})")
    qs = page.js(f"{rows}.map(r => r.cells[{q_col}].dataset.v).filter(v => v !== '').map(Number)")
    assert qs == sorted(qs, reverse=True)

    def set_filter(name: str, value: str) -> None:
        page.js(f"(() => {{ const el = document.querySelector('.filters[data-table=t-all] [data-f={name}]'); el.value = {json.dumps(value)};"
                f" el.dispatchEvent(new Event(el.tagName === 'INPUT' ? 'input' : 'change')); }})()")

    set_filter("block", "V")
    got = page.js(f"{rows}.map(r => [r.dataset.block, +r.dataset.layer, r.dataset.score])")
    fam_v = int(stats.in_family.sel(block="V").sum())
    assert {g[0] for g in got} == {"V"} and len(got) == 2 * fam_v * stats.sizes["layer"]
    set_filter("layer", "1")
    set_filter("score", "interference")
    got = page.js(f"{rows}.map(r => [r.dataset.block, +r.dataset.layer, r.dataset.score])")
    assert got and all(g == ["V", 1, "interference"] for g in got) and len(got) == fam_v
    assert page.js("document.querySelector('.filters[data-table=t-all] .count').textContent") == f"{fam_v} of {n_all} rows shown"
    set_filter("block", "")
    set_filter("layer", "0-1")
    set_filter("sig", "1")
    fam = np.broadcast_to(stats.in_family.values[:, None, :], stats.significant.sel(score="interference").shape)
    want = int((stats.significant.sel(score="interference").values & fam).sum())
    assert page.js(f"{rows}.length") == want
    assert page.js(f"{rows}.every(r => r.dataset.sig === '1')")
