"""Page assembly of ``report.html``: the CSS, the navigation, and the section guard.

A section that cannot be drawn (a malformed report, or one from another modec version)
says so in place — "could not render this section" — and in the log; the rest of the page
still renders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from modec.report.data import Report
from modec.report.html import esc
from modec.report.sections import SECTIONS

log = logging.getLogger(__name__)

#: The report schemas this page draws: /2 gave the key-vision step its own section.
SCHEMAS = ("modec.report/1", "modec.report/2")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#222;
background:#fafafa;line-height:1.4}
header{background:#1f2a44;color:#fff;padding:16px 28px}
header h1{margin:0 0 4px 0;font-size:22px}
header p{margin:0;color:#cfd6e6;font-size:13px}
nav{padding:8px 28px;background:#e8ebf2;font-size:13px}
nav a{margin-right:14px;color:#1f2a44}
main{padding:8px 28px 40px 28px;max-width:1400px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:10px 18px;
margin:16px 0}
h2{font-size:18px;margin:6px 0 10px 0;color:#1f2a44}
h3{font-size:14px;margin:14px 0 6px 0}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f2f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f4f4f4;padding:8px;overflow-x:auto;white-space:pre-wrap;word-break:break-all;
font-size:12px}
figure{margin:10px 0 16px 0;overflow-x:auto}
figcaption{font-size:12px;color:#555;margin-top:2px}
.not-run{color:#888;font-style:italic}
.error{color:#b00020}
.bad{color:#b00020;font-weight:600}
.muted{color:#777}
p{font-size:13px;margin:6px 0}
li{font-size:13px}
.kv td:first-child{font-weight:600;background:#f8f9fb}
details{margin:6px 0}
summary{cursor:pointer;font-size:13px}
"""


def guard(name: str, fn: Callable[[Report], str | None], report: Report) -> str | None:
    """Render one section; a malformed section is reported on the page, not raised."""
    try:
        return fn(report)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        log.warning(
            "report.html: could not render section %s: %s: %s", name, type(exc).__name__, exc
        )
        return (
            f'<p class="error">could not render this section ({esc(type(exc).__name__)}: '
            f"{esc(exc)}); the report may come from another modec version.</p>"
        )


def render_report(report: Report) -> str:
    """The HTML page of one ``report.json`` document (schema ``modec.report/1`` or ``/2``).

    Args:
        report: the parsed ``report.json`` (see docs/report.md). Sections of passes that
            did not run, and a missing ``summary``, are shown as "not run".

    Returns:
        One self-contained HTML document: inline CSS and inline SVG, no scripts, no
        external resources, nothing that depends on the time it was rendered.
    """
    schema = report.get("schema")
    if schema not in SCHEMAS:
        log.warning("report.html: schema %r, expected one of %r; rendering anyway", schema,
                    SCHEMAS)  # fmt: skip
    name = str(report.get("pipeline_name", "modec"))
    model = str((report.get("options") or {}).get("model", ""))
    drawn = [(s, guard(s.id, s.render, report)) for s in SECTIONS]
    shown = [(s, html) for s, html in drawn if html is not None]
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s, _ in shown)
    body = "".join(f'<section id="{s.id}">{html}</section>' for s, html in shown)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>modec report: {esc(name)}{' — ' + esc(Path(model).name) if model else ''}"
        f"</title><style>{CSS}</style></head><body>"
        f"<header><h1>modec report</h1><p>{esc(name)} pipeline"
        f"{' on ' + esc(model) if model else ''} · schema {esc(schema)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )
