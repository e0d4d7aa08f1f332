"""report.html in a real browser: headless Chromium draws every section and every plot.

Needs ``chromium`` on PATH (Debian/Ubuntu: ``apt-get install -y chromium``); skipped
without it. Nothing is fetched: the page is a local file with no external references.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from modec.report import write_report_html
from modec.report.sections import SECTIONS
from modec.report.svg import COLOR_KEY, COLOR_REDUNDANT, COLOR_TEXT
from tests.report.conftest import plot_ids, split_layout, synthetic_report


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(
    _chromium() is None,
    reason="chromium is not on PATH (install it with `apt-get install -y chromium`)",
)

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with a throwaway profile; its stdout is the result."""
    exe = _chromium()
    assert exe is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [exe, *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


# SVG elements that draw something.
_SHAPES = {"rect", "line", "circle", "ellipse", "path", "polygon", "polyline"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}  # fmt: skip


class _Dom(HTMLParser):
    """Ids, ``class="error"`` elements, and the SVG shapes inside each ``<figure id>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.errors: list[str] = []
        self.figures: dict[str, dict[str, int]] = {}  # id -> {"svg": n, "shapes": n}
        self._stack: list[tuple[str, str | None]] = []  # (tag, the figure id it is in)

    def _figure(self) -> str | None:
        return self._stack[-1][1] if self._stack else None

    def _element(self, tag: str, attrs: list[tuple[str, str | None]]) -> str | None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if "error" in (a.get("class") or "").split():
            self.errors.append(tag)
        fig = self._figure()
        if tag == "figure" and a.get("id"):
            fig = str(a["id"])
            self.figures[fig] = {"svg": 0, "shapes": 0}
        elif fig is not None and tag == "svg":
            self.figures[fig]["svg"] += 1
        elif fig is not None and tag in _SHAPES:
            self.figures[fig]["shapes"] += 1
        return fig

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        fig = self._element(tag, attrs)
        if tag not in _VOID:
            self._stack.append((tag, fig))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        while self._stack:  # tolerate an unclosed element the serialiser left implicit
            if self._stack.pop()[0] == tag:
                break


@needs_chromium
def test_every_section_and_plot_drawn_in_headless_chromium(tmp_path: Path) -> None:
    """A full current-layout report: the DOM Chromium builds has every section and plot,
    no section failed, and the screenshot is a real, colourful image."""
    image = pytest.importorskip("PIL.Image")
    layers = 2
    report = split_layout(synthetic_report(layers=layers, experts=8))
    page = write_report_html(tmp_path, report)

    dumped = chromium("--dump-dom", page.as_uri())
    assert "</html>" in dumped.stdout, dumped.stderr[-2000:]
    dom = _Dom()
    dom.feed(dumped.stdout)
    dom.close()
    for sid in [s.id for s in SECTIONS]:
        assert sid in dom.ids, f"section {sid} missing"
    expected = {*plot_ids(layers), "plot-key-vision"}
    assert expected <= set(dom.figures), expected - set(dom.figures)
    for fig, n in sorted(dom.figures.items()):
        assert n["svg"] >= 1 and n["shapes"] >= 3, (fig, n)
    assert not dom.errors, "a section could not be drawn"
    assert "could not render" not in dumped.stdout and "not run" not in dumped.stdout

    shot = tmp_path / "shot.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri())
    assert shot.exists(), f"chromium wrote no screenshot: {run.stderr[-2000:]}"
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    with image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 4000)
        colours = {c for _, c in rgb.getcolors(maxcolors=1 << 20) or []}
    assert len(colours) > 50, "the screenshot is (nearly) one colour"
    # The header, the text-frequency bars, and the key and redundant token bars are drawn.
    for color in ((0x1F, 0x2A, 0x44), _rgb(COLOR_TEXT), _rgb(COLOR_KEY), _rgb(COLOR_REDUNDANT)):
        assert color in colours, color


@pytest.mark.slow
@needs_chromium
def test_screenshot_in_headless_chromium(tmp_path: Path) -> None:
    """The page renders in a real browser: the plots' colours appear on screen."""
    image = pytest.importorskip("PIL.Image")
    (tmp_path / "report.json").write_text(json.dumps(synthetic_report()))
    page = write_report_html(tmp_path)
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert shot.exists(), "chromium wrote no screenshot"
    with image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 2000)
        colours = {c for _, c in rgb.getcolors(maxcolors=1 << 20) or []}
    # The header colour, the text-frequency bars and the pass-time bars are drawn.
    assert (0x1F, 0x2A, 0x44) in colours
    assert (0x00, 0x72, 0xB2) in colours
    assert len(colours) > 50
