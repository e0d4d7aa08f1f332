"""report.html: rendering, validity, "not run" sections, the CLI, and the compile driver."""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from typing import Any

import pytest

from modec.errors import BadInputError
from modec.report_html import render_report, write_report_html

# HTML elements that have no end tag.
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}  # fmt: skip


class _Checker(HTMLParser):
    """Collects ids, external references and tag-balance errors of one document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def _attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for k, v in attrs:
            if k == "id" and v is not None:
                self.ids.append(v)
            if k in ("src", "href", "xlink:href", "action", "data") and v is not None:
                self.refs.append(v)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()


def check_html(doc: str) -> _Checker:
    """Parse ``doc`` and assert it is balanced, self-contained and has unique ids."""
    assert doc.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(doc)
    c.close()
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed: {c.stack}"
    external = [r for r in c.refs if not r.startswith("#")]
    assert not external, external
    assert not re.search(r"url\(\s*['\"]?https?:", doc), "CSS must not load anything"
    assert "script" not in c.tags
    dupes = {i for i in c.ids if c.ids.count(i) > 1}
    assert not dupes, dupes
    return c


# --------------------------------------------------------------------------- a report


def _norm(v: list[float]) -> list[float]:
    s = sum(v)
    return [x / s for x in v]


def synthetic_report(layers: int = 2, experts: int = 6, seed: int = 0) -> dict[str, Any]:
    """A report shaped like the passes write it (see passes/*.py and docs/report.md)."""
    rng = random.Random(seed)
    bits = [2, 3, 4]

    def vec() -> list[float]:
        return _norm([rng.random() + 0.01 for _ in range(experts)])

    def counts(hi: int) -> list[list[int]]:
        return [[rng.randint(0, hi) for _ in range(experts)] for _ in range(layers)]

    widths = [[rng.choice(bits) for _ in range(experts)] for _ in range(layers)]
    flat = [w for row in widths for w in row]
    hist = {str(b): flat.count(b) for b in sorted(set(flat))}

    def proj(layer: int, e: int) -> dict[str, Any]:
        if (layer, e) == (layers - 1, 1):  # one starved expert fell back to RTN
            return {"method": "rtn", "reason": "3 tokens < min_tokens 32", "loss": None,
                    "output_mse": 1e-2}  # fmt: skip
        return {"method": "gptq", "reason": None, "loss": rng.random(), "output_mse": 1e-4}

    names = ["find-moe", "canonicalize-moe", "find-attention", "collect-routing",
             "measure-sensitivity", "allocate-bits", "quantize-experts"]  # fmt: skip
    return {
        "schema": "modec.report/1",
        "pipeline": "find-moe,canonicalize-moe,find-attention,collect-routing{key_ratio=0.2},"
        "measure-sensitivity{bits=2:3:4,group_size=128,samples=8},allocate-bits{budget=3.0},"
        "quantize-experts",
        "pipeline_name": "mode",
        "options": {"budget": 3.0, "bits": bits, "group_size": 128, "budget_bytes": 0,
                    "model": "/data/model.onnx", "calib": "/data/calib.npz", "seed": 0},
        "passes": [
            {"name": n, "text": n, "seconds": 0.1 * (i + 1), "modified": n in
             ("canonicalize-moe", "quantize-experts"), "stats": {"layers": layers}}
            for i, n in enumerate(names)
        ],
        "sections": {
            "find-moe": {"layers": [
                {"index": i, "name": f"/layers.{i}/moe", "num_experts": experts, "top_k": 2,
                 "router": {"scoring": "softmax", "norm_topk_prob": True}, "form":
                 "stacked_gather", "gate_layout": "separate", "activation": "silu",
                 "weights": {"gate": [experts, 32, 32], "up": [experts, 32, 32],
                             "down": [experts, 32, 32]},
                 "expert_parameters": experts * 3 * 32 * 32, "shared_expert": None, "nodes": 29}
                for i in range(layers)
            ]},
            "canonicalize-moe": {"nodes": [f"moe_{i}" for i in range(layers)]},
            "find-attention": {"layers": [
                {"kind": "probs", "node": f"/layers.{i}/attn/Softmax", "value": f"probs_{i}",
                 "q": None, "k": None} for i in range(layers)
            ]},
            "collect-routing": {  # as passes/collect_routing.py writes it
                "key_ratio": 0.2, "samples": 27,
                "count_all": counts(200), "count_text": counts(80), "count_vision": counts(120),
                "count_key": counts(30), "count_redundant": counts(90),
                "mean_weight": [vec() for _ in range(layers)],
                "f_text": [vec() for _ in range(layers)],
                "f_vision": [vec() for _ in range(layers)],
                "f_vision_all": [vec() for _ in range(layers)],
                "f_redundant": [vec() for _ in range(layers)],
                "f_global": [vec() for _ in range(layers)],
                "key_source": ["attention"] * (layers - 1) + ["attention+hidden"],
                "coverage": {"min_tokens": 16, "starved": layers + 1, "layers": [
                    {"text": [], "vision": [1] if i == layers - 1 else [], "key_vision": [1]}
                    for i in range(layers)]},
                "attention_fallbacks": [
                    {"layer": layers - 1, "samples": 2, "rule": "cosine similarity of vision MoE "
                     "inputs to the mean question MoE input",
                     "reason": "2 sample(s) have no text after their image"}],
            },
            "measure-sensitivity": {  # as passes/measure_sensitivity.py writes it
                "bits": bits, "group_size": 128, "samples": 8, "positions": "answer",
                "workers": 1, "subset": {"multimodal": 5, "text_only": 3, "seed": 0},
                "unused": {"text": [], "vision": [[0, experts - 1]]},
                "cache_hit": False, "cache_key": None, "cache_path": None, "seconds": 1.5,
                "layers": [{"seconds": 0.5, "runs": 3 * experts} for _ in range(layers)],
                "delta_text": [[[rng.random() * 10.0**-j for j in range(3)]
                                for _ in range(experts)] for _ in range(layers)],
                "delta_vision": [[[rng.random() * 10.0**-j for j in range(3)]
                                  for _ in range(experts)] for _ in range(layers)],
            },
            "allocate-bits": {
                "method": "mode", "budget": 3.0, "bits": bits, "widths": widths,
                "costs": [[[rng.random() for _ in bits] for _ in range(experts)]
                          for _ in range(layers)],
                "average_bits": sum(flat) / len(flat), "histogram": hist, "objective": 0.5,
                "layers": [{"status": "OPTIMAL", "objective": 0.25, "gap": 0.0,
                            "solve_seconds": 0.01, "rounded": False, "target": 3 * experts}
                           for _ in range(layers)],
            },
            "quantize-experts": {
                "method": "gptq", "group_size": 128, "fallbacks": 1,
                "layers": [[{"expert": e, "bits": widths[i][e], "tokens": 40,
                             **{p: proj(i, e) for p in ("gate", "up", "down")}}
                            for e in range(experts)] for i in range(layers)],
            },
        },
        "summary": {
            "out": "/data/out", "method": "mode", "budget": 3.0,
            "average_bits": sum(flat) / len(flat), "histogram": hist,
            "sizes": {"expert_params": 36864, "experts_fp32": 147456, "experts_fp16": 73728,
                      "experts_codes": 13824, "experts_scales": 1152, "experts_zeros": 576,
                      "experts_quantized": 15552, "other_fp32": 40000, "model_fp32": 187456,
                      "model_quantized": 55552},
            "seconds": {n: 0.1 for n in names},
            "report": "/data/out/report.json",
            "accuracy": {
                "fp32": _acc(36, 30, {"cell": (4, 3), "sum": (4, 4)}),
                "quantized": _acc(36, 27, {"cell": (4, 2), "sum": (4, 4)}),
            },
        },
    }  # fmt: skip


def _acc(n: int, correct: int, families: dict[str, tuple[int, int]]) -> dict[str, Any]:
    def s(n: int, c: int) -> dict[str, Any]:
        return {"n": n, "correct": c, "accuracy": c / n}

    fams = {k: s(*v) for k, v in families.items()}
    return {"samples": n, "overall": s(n, correct), "multimodal": s(20, correct - 14),
            "text_only": s(16, 14), "families": fams}  # fmt: skip


def plot_ids(layers: int) -> list[str]:
    per_layer = [f"plot-{kind}-layer-{i}" for kind in ("frequencies", "sensitivity")
                 for i in range(layers)]  # fmt: skip
    return ["plot-pass-times", "plot-widths", "plot-budget", "plot-sizes", "plot-gptq-loss",
            "plot-accuracy", *per_layer]  # fmt: skip


# --------------------------------------------------------------------------- rendering


def test_full_report_has_every_plot_and_is_self_contained():
    report = synthetic_report(layers=3)
    doc = render_report(report)
    c = check_html(doc)
    for pid in plot_ids(3):
        assert pid in c.ids, pid
    assert "plot-frequencies-layer-3" not in c.ids
    assert "not run" not in doc and "could not render" not in doc
    assert report["pipeline"].replace("{", "") in doc.replace("{", "")
    # Each plot is an inline SVG with marks in it.
    for pid in ("plot-widths", "plot-frequencies-layer-0", "plot-sensitivity-layer-2"):
        fig = doc[doc.index(f'id="{pid}"') :]
        fig = fig[: fig.index("</figure>")]
        assert "<svg" in fig and fig.count("<rect") > 10, pid


def test_page_shows_the_numbers():
    report = synthetic_report()
    doc = render_report(report)
    # sizes in bytes, compression against fp32 and fp16
    assert "147,456 B" in doc and "15,552 B" in doc
    assert f"{147456 / 15552:.2f}× smaller" in doc and f"{73728 / 15552:.2f}× smaller" in doc
    # the RTN fallback and its reason; the starved expert
    assert "3 tokens &lt; min_tokens 32" in doc
    assert 'class="bad">e1</span>' in doc
    # the attention fallback, and where key tokens came from
    assert "2 sample(s) have no text after their image" in doc and "attention+hidden" in doc
    # an expert no vision token reached has no vision sensitivity: grey, listed
    fig = doc[doc.index('id="plot-sensitivity-layer-0"') :]
    fig = fig[: fig.index("</figure>")]
    e_last = len(report["sections"]["allocate-bits"]["widths"][0]) - 1
    assert fig.count(f"2-bit, e{e_last}: n/a") == 1
    assert f"<td>e{e_last}</td>" in doc
    # routed-token totals per layer
    total = sum(report["sections"]["collect-routing"]["count_key"][0])
    assert f'<td class="num">{total:,}</td>' in doc
    # accuracy change in percentage points
    assert f"{100 * (27 - 30) / 36:+.2f} pt" in doc
    # every expert's width is in the widths plot (as cell text and tooltip)
    widths = report["sections"]["allocate-bits"]["widths"]
    fig = doc[doc.index('id="plot-widths"') :]
    fig = fig[: fig.index("</figure>")]
    cells = re.findall(r"<title>layer (\d+), e(\d+): (\d)</title>", fig)
    assert {(int(a), int(b)): int(w) for a, b, w in cells} == {
        (i, e): w for i, row in enumerate(widths) for e, w in enumerate(row)
    }


def test_sensitivity_colour_scale_is_log_over_decades_with_zeros():
    report = synthetic_report(layers=1, experts=2)
    sec = report["sections"]["measure-sensitivity"]
    sec["unused"] = {"text": [], "vision": []}
    sec["delta_text"] = [[[1.0, 1e-2, 1e-4], [0.0, 0.0, 0.0]]]
    sec["delta_vision"] = [[[0.5, 1e-3, 1e-5], [2e-2, 2e-3, 0.0]]]
    doc = render_report(report)
    assert "log colour scale from 1e-05 to 1 (4 zero value(s) drawn at the bottom colour)" in doc
    sec["delta_vision"] = [[[0.5, 0.4, 0.3], [0.2, 0.1, 0.05]]]
    sec["delta_text"] = [[[0.5, 0.4, 0.3], [0.2, 0.1, 0.0]]]
    assert "linear colour scale from 0 to 0.5" in render_report(report)


def test_missing_sections_say_not_run():
    report = synthetic_report()
    for name in ("collect-routing", "measure-sensitivity", "allocate-bits", "quantize-experts"):
        del report["sections"][name]
    del report["summary"]
    report["passes"] = report["passes"][:3]
    doc = render_report(report)
    c = check_html(doc)
    for name in ("collect-routing", "measure-sensitivity", "allocate-bits", "quantize-experts"):
        assert f"{name}: not run" in doc, name
    assert "not measured" in doc and "no size summary" in doc
    assert not [i for i in c.ids if i.startswith("plot-") and i != "plot-pass-times"]
    assert "table-moe-layers" in c.ids


def test_empty_report_renders():
    c = check_html(render_report({}))
    assert "overview" in c.ids and "plot-pass-times" not in c.ids


def test_deterministic_and_independent_of_key_order():
    report = synthetic_report()
    doc = render_report(report)
    assert render_report(copy.deepcopy(report)) == doc
    shuffled = json.loads(json.dumps(report, sort_keys=True))
    assert render_report(shuffled) == doc


def test_text_is_escaped():
    report = synthetic_report()
    report["options"]["model"] = "<script>alert(1)</script>.onnx"
    report["sections"]["quantize-experts"]["layers"][1][1]["gate"]["reason"] = "<b>x</b> & y"
    doc = render_report(report)
    check_html(doc)
    assert "<script>" not in doc and "&lt;script&gt;" in doc
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in doc


def test_malformed_section_is_shown_and_logged_not_raised(caplog):
    report = synthetic_report()
    report["sections"]["allocate-bits"]["widths"] = [[2, 3], ["four", 4]]
    with caplog.at_level(logging.WARNING, logger="modec.report_html"):
        doc = render_report(report)
    check_html(doc)
    assert "could not render this section" in doc
    assert any("allocation" in r.getMessage() for r in caplog.records)
    assert "plot-gptq-loss" in doc, "the other sections still render"


def test_paper_scale_stays_reasonable():
    doc = render_report(synthetic_report(layers=4, experts=128))
    c = check_html(doc)
    assert "plot-sensitivity-layer-3" in c.ids
    assert len(doc) < 3_000_000


# --------------------------------------------------------------------------- files and CLI


def test_write_report_html_atomic(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(synthetic_report()))
    path = write_report_html(tmp_path)
    assert path == tmp_path / "report.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]
    assert path.read_text() == render_report(json.loads((tmp_path / "report.json").read_text()))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file; run `modec compile` first"), ("{oops", "not a readable report"),
     ("[1, 2]", "not a modec report")],
)  # fmt: skip
def test_write_report_html_bad_input(tmp_path, content, message):
    if content is not None:
        (tmp_path / "report.json").write_text(content)
    with pytest.raises(BadInputError, match=re.escape(message)) as info:
        write_report_html(tmp_path)
    assert str(tmp_path / "report.json") in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "report.html").exists()


def modec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modec.cli", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_report(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(synthetic_report()))
    r = modec("report", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "report.html")
    check_html((tmp_path / "report.html").read_text())


def test_cli_report_without_report_json(tmp_path):
    r = modec("report", str(tmp_path))
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modec: error:"), r.stderr
    assert str(tmp_path / "report.json") in lines[0] and "modec compile" in lines[0]
    assert not (tmp_path / "report.html").exists()


# --------------------------------------------------------------------------- the driver


def test_compile_writes_report_html(tiny_vlm, tmp_path):
    """The analysis passes alone: report.html sits beside report.json, later passes not run."""
    from modec.driver import compile_model

    out = tmp_path / "out"
    compile_model(tiny_vlm["model"], tiny_vlm["calib"], out,
                  pipeline="find-moe,canonicalize-moe,find-attention")  # fmt: skip
    c = check_html((out / "report.html").read_text())
    assert "table-moe-layers" in c.ids and "plot-pass-times" in c.ids
    doc = (out / "report.html").read_text()
    assert "collect-routing: not run" in doc and "allocate-bits: not run" in doc
    assert doc == render_report(json.loads((out / "report.json").read_text()))


def _registered(*names: str) -> bool:
    import modec.passes  # noqa: F401
    from modec.pipeline import REGISTRY

    return set(names) <= set(REGISTRY)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("mc-moe", marks=pytest.mark.skipif(
            not _registered("collect-routing"), reason="passes/collect_routing.py not written")),
        pytest.param("mode", marks=pytest.mark.skipif(
            not _registered("collect-routing", "measure-sensitivity"),
            reason="passes/measure_sensitivity.py not written")),
    ],
)  # fmt: skip
def test_compile_summary_and_accuracy_rerender(tiny_vlm, tmp_path, method):
    """The real pipeline end to end; summarize and record_accuracy refresh report.html."""
    from modec.driver import CompileOptions, compile_model, record_accuracy, summarize

    res = compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / "out",
                        CompileOptions(sensitivity_samples=8, method=method))  # fmt: skip
    page = res.out / "report.html"
    doc = page.read_text()
    c = check_html(doc)
    layers = len(res.allocation.widths)
    expected = set(plot_ids(layers)) - {"plot-sizes", "plot-accuracy"}
    if method != "mode":  # mc-moe needs no sensitivities
        expected -= {f"plot-sensitivity-layer-{i}" for i in range(layers)}
        assert "measure-sensitivity: not run" in doc
    assert expected <= set(c.ids), expected - set(c.ids)
    assert "plot-sizes" not in c.ids and "could not render" not in doc
    assert doc == render_report(json.loads((res.out / "report.json").read_text()))
    summarize(res)
    assert "plot-sizes" in check_html(page.read_text()).ids
    record_accuracy(res.out, synthetic_report()["summary"]["accuracy"])
    doc = page.read_text()
    assert "plot-accuracy" in check_html(doc).ids
    assert "could not render" not in doc
    assert doc == render_report(json.loads((res.out / "report.json").read_text()))


# --------------------------------------------------------------------------- a browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install chromium)")
def test_screenshot_in_headless_chromium(tmp_path):
    """The page renders in a real browser: the plots' colours appear on screen."""
    image = pytest.importorskip("PIL.Image")
    exe = _chromium()
    assert exe is not None
    (tmp_path / "report.json").write_text(json.dumps(synthetic_report()))
    page = write_report_html(tmp_path)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", f"--screenshot={shot}",
             "--window-size=1200,2000", page.as_uri()],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
    assert shot.exists(), "chromium wrote no screenshot"
    with image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 2000)
        colours = {c for _, c in rgb.getcolors(maxcolors=1 << 20) or []}
    # The header colour, the text-frequency bars and the pass-time bars are drawn.
    assert (0x1F, 0x2A, 0x44) in colours
    assert (0x00, 0x72, 0xB2) in colours
    assert len(colours) > 50
