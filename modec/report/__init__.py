"""``report.html``: one self-contained page that shows a ``report.json`` (docs/report.md).

The page needs no network: the CSS is inline and every plot is an inline SVG drawn here
(no plotting library, so the output is byte-for-byte deterministic and ``import modec``
stays light). Every figure has a stable ``id`` that tests and links rely on:

- ``plot-pass-times``: seconds per pass;
- ``plot-frequencies-layer-{l}``: text / all-vision / key-vision frequency per expert,
  with the global frequency beside them (collect-routing, select-key-vision);
- ``plot-key-vision``: key against redundant vision tokens per expert, one plot per layer
  (select-key-vision);
- ``plot-sensitivity-layer-{l}``: δ_text and δ_vision per expert and width
  (measure-sensitivity);
- ``plot-widths``: the width of every expert, layer × expert (allocate-bits);
- ``plot-budget``: average width per layer against the budget;
- ``plot-sizes``: expert bytes at fp32 / fp16 / quantized (codes, scales, zeros);
- ``plot-gptq-loss``: GPTQ loss per expert, RTN fallbacks marked (quantize-experts);
- ``plot-accuracy``: fp32 against quantized accuracy (when the compile evaluated).

A section whose pass did not run is shown as "not run"; a section that cannot be drawn
(a report from another version) says so on the page and in the log instead of failing the
whole page.

Layout: :mod:`~modec.report.html` (escaping, numbers, tables), :mod:`~modec.report.svg`
(scales, colours, plots), :mod:`~modec.report.page` (assembly, CSS, the section guard) and
one module per section in :mod:`modec.report.sections`, listed in ``SECTIONS``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from modec.errors import BadInputError
from modec.report.data import Report
from modec.report.page import render_report

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def _read_report(src: Path) -> Report:
    """The parsed ``report.json`` at ``src``; BadInputError when it is not one."""
    try:
        report = json.loads(src.read_text())
    except FileNotFoundError as exc:
        raise BadInputError(f"{src}: no such file; run `modec compile` first") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(
            f"{src}: not a readable report ({type(exc).__name__}: {exc}); run `modec compile` again"
        ) from exc
    if not isinstance(report, dict):
        raise BadInputError(f"{src}: not a modec report (not a JSON object); run `modec compile`")
    return report


def write_report_html(out_dir: str | os.PathLike[str], report: Report | None = None) -> Path:
    """Render a report into ``out_dir/report.html`` (atomically).

    Args:
        out_dir: a modec output directory.
        report: the report to render, already in memory; when ``None``,
            ``out_dir/report.json`` is read.

    Returns:
        The path of the written ``report.html``.

    Raises:
        BadInputError: no ``report`` was given and ``report.json`` is missing, unreadable
            or not a JSON object.
    """
    d = Path(out_dir)
    if report is None:
        report = _read_report(d / REPORT_JSON)
    dest = d / REPORT_HTML
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(render_report(report), encoding="utf-8")
    os.replace(tmp, dest)
    log.debug("wrote %s", dest)
    return dest


__all__ = ["REPORT_HTML", "REPORT_JSON", "render_report", "write_report_html"]
