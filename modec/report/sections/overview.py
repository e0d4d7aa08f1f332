"""The ``overview`` section: the pipeline, the result in brief, and every option."""

from __future__ import annotations

from modec.report.data import Report
from modec.report.html import esc, kv, num, short, table


def render(report: Report) -> str:
    opts = report.get("options") or {}
    summary = report.get("summary") or {}
    out = ["<h2>Pipeline</h2>"]
    out.append(
        kv(
            [
                ("schema", esc(report.get("schema", "?"))),
                ("pipeline name", esc(report.get("pipeline_name", "?"))),
                ("model", esc(opts.get("model", "?"))),
                ("calibration data", esc(opts.get("calib", "?"))),
            ]
        )
    )
    out.append(f'<pre id="pipeline-text">{esc(report.get("pipeline", ""))}</pre>')
    if summary:
        hist = summary.get("histogram") or {}
        out.append("<h3>Result</h3>")
        out.append(
            kv(
                [
                    ("method", esc(summary.get("method", "?"))),
                    ("budget (average bits)", num(summary.get("budget"))),
                    ("average bits", num(summary.get("average_bits"))),
                    (
                        "widths",
                        esc(", ".join(f"{b}-bit: {n}" for b, n in sorted(hist.items()))),
                    ),
                    ("output", esc(summary.get("out", "?"))),
                ]
            )
        )
    out.append("<h3>Options</h3>")
    rows = [[esc(k), f"<code>{esc(short(opts[k]))}</code>"] for k in sorted(opts)]
    out.append(table(["option", "value"], rows, id="table-options"))
    return "".join(out)
