"""The ``accuracy`` section (``summary.accuracy``): fp32 against quantized accuracy."""

from __future__ import annotations

import math
from typing import Any

from modec.report.data import Report
from modec.report.html import NUM, esc, figure, ncell, pct, table
from modec.report.svg import COLOR_FP32, COLOR_QUANT, grouped_bars

_SPLITS = (("overall", "overall"), ("multimodal", "multimodal"), ("text-only", "text_only"))


def _get(doc: dict[str, Any], key: str, family: bool) -> dict[str, Any]:
    """The ``{"n", "correct", "accuracy"}`` triple of a split or a family ({} if absent)."""
    src = (doc.get("families") or {}) if family else doc
    value = src.get(key)
    return value if isinstance(value, dict) else {}


def render(report: Report) -> str:
    acc = (report.get("summary") or {}).get("accuracy")
    out = ["<h2>Accuracy</h2>"]
    if not isinstance(acc, dict) or "fp32" not in acc or "quantized" not in acc:
        return out[0] + (
            '<p class="not-run">not measured: run <code>modec compile ... --eval DATA</code> '
            "to compare against the fp32 model.</p>"
        )
    base, quant = acc["fp32"], acc["quantized"]
    fam_names = sorted(set(base.get("families") or {}) | set(quant.get("families") or {}))
    rows: list[list[str]] = []
    cats: list[str] = []
    a_vals: list[float] = []
    b_vals: list[float] = []
    for label, key, fam in [(lbl, k, False) for lbl, k in _SPLITS] + [
        (f"  {f}", f, True) for f in fam_names
    ]:
        a, b = _get(base, key, fam), _get(quant, key, fam)
        av = float(a.get("accuracy", float("nan")))
        bv = float(b.get("accuracy", float("nan")))
        delta = (bv - av) * 100 if math.isfinite(av) and math.isfinite(bv) else float("nan")
        rows.append(
            [
                esc(label).replace("  ", "&nbsp;&nbsp;"),
                ncell(a.get("n")),
                NUM + pct(av),
                NUM + pct(bv),
                NUM + ("n/a" if math.isnan(delta) else f"{delta:+.2f} pt"),
            ]
        )
        cats.append(label.strip())
        a_vals.append(100 * av)
        b_vals.append(100 * bv)
    out.append(
        figure(
            "plot-accuracy",
            grouped_bars(
                "accuracy",
                cats,
                [("fp32", COLOR_FP32, a_vals), ("quantized", COLOR_QUANT, b_vals)],
                ylabel="accuracy (%)",
                ymax=100.0,
                fmt=lambda v: f"{v:.1f}",
            ),
            "Accuracy of the fp32 model and the simulated-quantization model on the "
            "evaluation set.",
        )
    )
    out.append(
        table(["split", "samples", "fp32", "quantized", "change"], rows, id="table-accuracy")
    )
    return "".join(out)
