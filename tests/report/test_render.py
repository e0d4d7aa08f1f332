"""report.html: rendering, validity, "not run" sections, the CLI, and the compile driver."""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys

import pytest

from modec.errors import BadInputError
from modec.report import REPORT_HTML, REPORT_JSON, render_report, write_report_html
from modec.report.sections import SECTIONS
from tests.report.conftest import (
    check_html,
    figure_html,
    plot_ids,
    split_layout,
    synthetic_report,
)

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


def test_passes_table_shows_each_pass_peak_rss_and_the_largest():
    report = synthetic_report()
    for i, p in enumerate(report["passes"]):
        p["peak_rss_bytes"] = (i + 1) * 2**29  # 0.5, 1.0, 1.5 ... GiB
    del report["passes"][0]["peak_rss_bytes"]  # a platform that gave none for a pass
    doc = render_report(report)
    table = doc[doc.index('id="table-passes"') :]
    table = table[: table.index("</table>")]
    assert "peak RSS (GiB)" in table
    cells = re.findall(r'<td class="num">(\d+\.\d\d)</td>', table)
    n = len(report["passes"])
    want = [f"{(i + 1) * 0.5:.2f}" for i in range(1, n)] + [f"{n * 0.5:.2f}"]
    assert [c for c in cells if c in want] == want  # per pass, then the total row's max
    assert table.count("<td>–</td>") >= 1


def test_time_per_worker_table_lists_each_worker_of_each_pass_that_ran_tasks():
    report = synthetic_report()
    report["engine"] = {
        "kind": "ray", "parallelism": 2, "threads_per_task": 1, "address": "local",
        "nodes": [{"node": "abc", "address": "10.0.0.1", "cpus": 2}], "retries": 3,
    }  # fmt: skip
    probe = report["passes"][1]
    probe["workers"] = {
        "maps": [{"label": "probes layer 0", "tasks": 4, "seconds": 3.0},
                 {"label": "probes layer 1", "tasks": 4, "seconds": 1.0}],
        "per_worker": [{"worker": "10.0.0.1:11", "node": "abc", "tasks": 5, "seconds": 3.0},
                       {"worker": "10.0.0.1:12", "node": "abc", "tasks": 3, "seconds": 2.0}],
    }  # fmt: skip
    doc = render_report(report)
    assert "Tasks ran Ray, local, 1 node(s), 2 CPUs: 2 at once, 1 thread(s) each." in doc
    table = doc[doc.index('id="table-workers"') :]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]
    assert len(rows) == 2  # the one pass that ran tasks, one row per worker
    assert "10.0.0.1:11" in rows[0] and "10.0.0.1:12" in rows[1]
    cells = [re.findall(r'<td class="num">([^<]*)</td>', r) for r in rows]
    assert cells == [["5", "3", "4"], ["3", "2", "4"]]  # tasks, busy s, the maps' wall s
    assert "75.00%" in rows[0] and "50.00%" in rows[1]
    del report["engine"]  # an older report: no engine, no table
    assert 'id="table-workers"' not in render_report(report)


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
    with caplog.at_level(logging.WARNING, logger="modec.report"):
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


# --------------------------------------------------------------------------- the key-vision split


def test_split_layout_has_every_plot_and_the_key_vision_section():
    report = split_layout(synthetic_report(layers=3))
    doc = render_report(report)
    c = check_html(doc)
    for pid in [*plot_ids(3), "plot-key-vision"]:
        assert pid in c.ids, pid
    for sid in [s.id for s in SECTIONS]:
        assert sid in c.ids, sid
    assert "table-key-vision" in c.ids and "table-coverage" in c.ids
    assert "not run" not in doc and "could not render" not in doc
    fig = figure_html(doc, "plot-key-vision")
    assert fig.count("<svg") == 3 and fig.count("<rect") > 30


def test_frequency_plot_is_the_same_in_both_layouts():
    """The same numbers in the earlier and the current layout draw the same figure."""
    legacy = synthetic_report(layers=2)
    split = split_layout(legacy)
    a, b = render_report(legacy), render_report(split)
    for layer in range(2):
        pid = f"plot-frequencies-layer-{layer}"
        assert figure_html(a, pid) == figure_html(b, pid), pid
    # text, all vision, key vision and global: four bars per expert
    fig = figure_html(b, "plot-frequencies-layer-0")
    for name in ("text", "vision (all)", "key vision", "global"):
        assert fig.count(f"e0 {name}: ") == 1, name
    f_key = split["sections"]["select-key-vision"]["f_key"][1][3]
    f_all = split["sections"]["collect-routing"]["f_vision"][1][3]
    fig = figure_html(b, "plot-frequencies-layer-1")
    assert f"e3 key vision: {f_key:.3f}<" in fig and f"e3 vision (all): {f_all:.3f}<" in fig


def test_key_vision_section_shows_the_numbers():
    report = split_layout(synthetic_report(layers=2, experts=6))
    key = report["sections"]["select-key-vision"]
    doc = render_report(report)
    section = doc[doc.index('<section id="key-vision">') :]
    section = section[: section.index("</section>")]
    table = section[section.index('id="table-key-vision"') :]
    table = table[: table.index("</table>")]
    for layer in range(2):
        k, r = sum(key["count_key"][layer]), sum(key["count_redundant"][layer])
        assert f'<td class="num">{k:,}</td><td class="num">{r:,}</td>' in table
        assert f"{100 * k / (k + r):.2f}%" in table
    assert "<td>attention</td>" in table and "<td>attention+hidden</td>" in table
    assert 'key_vision: <span class="bad">e1</span>' in table
    assert "key_ratio" in section and "0.2" in section
    # the key-vision coverage is the new section's; collect-routing keeps text and vision
    routing = doc[doc.index('<section id="routing">') :]
    routing = routing[: routing.index("</section>")]
    assert "key_vision" not in routing and "key tokens chosen by" not in routing
    assert "vision tokens scored by" in routing
    for layer in range(2):  # tokens chosen: key_tokens of vision_tokens
        n, k = key["vision_tokens"][layer], key["key_tokens"][layer]
        assert (
            f'<td class="num">{layer}</td><td class="num">{n}</td><td class="num">{k}</td>' in table
        )
    fig = figure_html(doc, "plot-key-vision")
    for layer in range(2):
        for e in range(6):
            assert f"e{e} key: {key['count_key'][layer][e]:,}<" in fig
            assert f"e{e} redundant: {key['count_redundant'][layer][e]:,}<" in fig


def test_key_vision_not_run_without_its_pass():
    report = split_layout(synthetic_report())
    del report["sections"]["select-key-vision"]
    doc = render_report(report)
    c = check_html(doc)
    assert "select-key-vision: not run" in doc
    assert "plot-key-vision" not in c.ids and "key-vision" in c.ids
    # the frequency plot draws what collect-routing has: text, all vision, global
    fig = figure_html(doc, "plot-frequencies-layer-0")
    assert "e0 vision (all): " in fig and "key vision" not in fig


def test_legacy_report_has_no_key_vision_section():
    """A report from before select-key-vision keeps its page: key vision under Routing."""
    doc = render_report(synthetic_report())
    c = check_html(doc)
    assert "key-vision" not in c.ids and 'href="#key-vision"' not in doc
    assert "key tokens chosen by" in doc and "plot-key-vision" not in c.ids


@pytest.mark.parametrize("section", [s for s in SECTIONS if s.pass_name is not None])
def test_every_pass_section_says_not_run_without_its_pass(section):
    report = split_layout(synthetic_report())
    del report["sections"][section.pass_name]
    doc = render_report(report)
    c = check_html(doc)
    assert f"{section.pass_name}: not run" in doc
    assert section.id in c.ids and "could not render" not in doc


def test_sections_registry_is_consistent():
    ids = [s.id for s in SECTIONS]
    assert len(set(ids)) == len(ids)
    assert ids[:2] == ["overview", "passes"] and ids.index("routing") < ids.index("key-vision")
    doc = render_report(split_layout(synthetic_report()))
    nav = doc[doc.index("<nav>") : doc.index("</nav>")]
    assert re.findall(r'href="#([a-z-]+)"', nav) == ids


# --------------------------------------------------------------------------- files and CLI


def test_write_report_html_atomic(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(synthetic_report()))
    path = write_report_html(tmp_path)
    assert path == tmp_path / "report.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]
    assert path.read_text() == render_report(json.loads((tmp_path / "report.json").read_text()))


def test_write_report_html_from_memory(tmp_path):
    """Given the report, write_report_html renders it and reads no report.json."""
    report = split_layout(synthetic_report())
    path = write_report_html(tmp_path, report)
    assert path == tmp_path / REPORT_HTML
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_HTML]
    assert path.read_text() == render_report(report)
    (tmp_path / REPORT_JSON).write_text(json.dumps(synthetic_report(seed=1)))
    assert write_report_html(tmp_path, report).read_text() == render_report(report)


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


@pytest.mark.parametrize("method", ["mc-moe", "mode"])
def test_compile_summary_and_accuracy_in_one_render(tiny_vlm, tmp_path, method):
    """The real pipeline end to end: summary and accuracy are on the page, rendered once."""
    from modec.driver import CompileOptions, compile_model

    res = compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / "out",
                        CompileOptions(sensitivity_samples=8, method=method, target="none"),
                        eval_path=tiny_vlm["eval"])  # fmt: skip
    page = res.out / "report.html"
    doc = page.read_text()
    c = check_html(doc)
    assert res.allocation is not None
    layers = len(res.allocation.widths)
    expected = set(plot_ids(layers))
    if method != "mode":  # mc-moe needs no sensitivities
        expected -= {f"plot-sensitivity-layer-{i}" for i in range(layers)}
        assert "measure-sensitivity: not run" in doc
    assert expected <= set(c.ids), expected - set(c.ids)
    assert "plot-key-vision" in c.ids and "plot-sizes" in c.ids and "plot-accuracy" in c.ids
    assert "could not render" not in doc
    assert doc == render_report(json.loads((res.out / "report.json").read_text()))


def test_specialization_table_shows_each_experts_text_share():
    report = split_layout(synthetic_report(layers=2, experts=6))
    sec = report["sections"]["collect-routing"]
    doc = render_report(report)
    check_html(doc)
    table = doc[doc.index('id="table-specialization"') :]
    table = table[: table.index("</table>")]
    for layer in range(2):
        text, vision = sec["count_text"][layer], sec["count_vision"][layer]
        cells = [f"{100 * t / (t + v):.0f}" for t, v in zip(text, vision, strict=True)]
        mix = f"{100 * sum(text) / (sum(text) + sum(vision)):.1f}"
        row = "".join(f"<td>{c}</td>" for c in [*cells, mix])
        assert row in table, (row, table)
        fig = figure_html(doc, f"plot-specialization-layer-{layer}")
        assert fig.count("<rect") >= 6


def _table_rows(doc: str, table_id: str) -> list[str]:
    """The body rows of table ``table_id`` of a checked report page."""
    check_html(doc)
    table = doc[doc.index(f'id="{table_id}"') :]
    return table[: table.index("</table>")].split("<tr>")[2:]


def test_joint_check_table_lists_every_range_and_marks_the_chosen_one():
    report = synthetic_report(layers=2)
    sec = report["sections"]["allocate-bits"]
    assert "table-joint" not in render_report(report)  # only with --joint select
    sec["joint"] = {
        "candidates": [
            {"widths": [2, 3, 4], "histogram": {"2": 3, "4": 3}, "objective": 0.5, "kl": 0.25,
             "kl_multimodal": 0.125, "kl_text_only": 0.5, "same_as": 0,
             "kl_vs_default": [0.1875, 0.125, 0.25], "better": False},
            {"widths": [2], "histogram": {"2": 6}, "objective": 0.75, "kl": 0.0625,
             "kl_multimodal": 0.03125, "kl_text_only": None, "same_as": 1,
             "kl_vs_default": [0.0, 0.0, 0.0], "better": False},
            {"widths": [2, 3], "histogram": {"2": 6}, "objective": 0.75, "kl": 0.0625,
             "kl_multimodal": 0.03125, "kl_text_only": None, "same_as": 1,
             "kl_vs_default": [0.0, 0.0, 0.0], "better": False},
        ],
        "default": 1, "chosen": 1, "infeasible": [[3], [3, 4], [4]], "positions": 40,
        "samples": 32, "seconds": 1.5, "quantizer": "gptq",
    }  # fmt: skip
    doc = render_report(report)
    rows = _table_rows(doc, "table-joint")
    assert len(rows) == 3
    assert "{2, 3, 4}" in rows[0] and "0.25" in rows[0] and "chosen" not in rows[0]
    assert "+0.188 [+0.125, +0.25]" in rows[0] and "(better)" not in rows[0]
    assert "{2}" in rows[1] and "0.0625" in rows[1] and "default, <b>chosen</b>" in rows[1]
    assert "as {2}" in rows[2] and "chosen" not in rows[2]
    assert "32 calibration samples" in doc and "{3}; {3, 4}; {4}" in doc
    assert "(gptq; each half of the samples judged by experts fitted to the other half)" in doc
    assert "The narrowest range (the default) is kept" in doc and "half each" not in doc
    sec["joint"].update(rule="guard", weighting="balanced", default=0)
    doc = render_report(report)
    check_html(doc)
    assert "else the paper's allocation (the default; guard rule) is kept" in doc
    assert "the multimodal and the text-only samples weighing half each" in doc


def test_calibrated_costs_table_lists_every_layer_and_width():
    report = synthetic_report(layers=2)
    sec = report["sections"]["allocate-bits"]
    assert "table-calibrated" not in render_report(report)  # only with --calibrate-costs
    sec["calibrated"] = {
        "bits": [2, 4], "positions": "answer", "samples": 32, "quantizer": "gptq",
        "additive": [[0.5, 0.125], [0.25, 0.0]], "joint": [[0.25, 0.0625], [0.125, 0.0]],
        "scale": [[0.5, 0.5], [0.5, 1.0]], "seconds": 2.5,
    }  # fmt: skip
    doc = render_report(report)
    rows = _table_rows(doc, "table-calibrated")
    assert len(rows) == 4
    cells = [re.findall(r">([^<]*)</td>", row) for row in rows]
    assert cells == [["0", "2", "0.5", "0.25", "0.5"], ["0", "4", "0.125", "0.0625", "0.5"],
                     ["1", "2", "0.25", "0.125", "0.5"], ["1", "4", "0", "0", "1"]]  # fmt: skip
    assert "32 samples at the answer positions" in doc and "gptq, cross-fitted" in doc
