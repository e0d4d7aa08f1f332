"""``report.html``: one self-contained page that shows a ``report.json`` (docs/report.md).

The page needs no network: the CSS is inline and every plot is an inline SVG drawn here
(no plotting library, so the output is byte-for-byte deterministic and ``import modec``
stays light). Every figure has a stable ``id`` that tests and links rely on:

- ``plot-pass-times``: seconds per pass;
- ``plot-frequencies-layer-{l}``: text / vision / key-vision frequency per expert, with the
  global frequency beside them (collect-routing);
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
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modec.errors import BadInputError

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
COLOR_TEXT = "#0072B2"
COLOR_VISION = "#E69F00"
COLOR_KEY = "#D55E00"
COLOR_GLOBAL = "#999999"
COLOR_FP32 = "#999999"
COLOR_FP16 = "#C8C8C8"
COLOR_QUANT = "#009E73"
COLOR_CODES = "#0072B2"
COLOR_SCALES = "#E69F00"
COLOR_ZEROS = "#CC79A7"
COLOR_BAD = "#D55E00"

# Viridis at five stops, linearly interpolated (perceptually ordered, colour-blind safe).
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))

_FONT = "font-family:system-ui,sans-serif;font-size:11px"

_CSS = """
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


# --------------------------------------------------------------------------- formatting


def _e(value: object) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    """A number for a table cell: integers with thousands separators, floats to ``digits``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}" if abs(value) >= 1000 else f"{value:g}"
        return f"{value:.{digits}g}"
    return _e(value)


def _bytes(n: Any) -> str:
    """Bytes as ``1,234,567 B (1.18 MiB)``."""
    if not isinstance(n, int | float):
        return "–"
    n = int(n)
    if n >= 2**20:
        return f"{n:,} B ({n / 2**20:.2f} MiB)"
    if n >= 2**10:
        return f"{n:,} B ({n / 2**10:.1f} KiB)"
    return f"{n:,} B"


def _pct(x: Any) -> str:
    if not isinstance(x, int | float) or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.2f}%"


def _f(x: float) -> str:
    """A coordinate: two decimals, no trailing zeros (keeps the SVG small and stable)."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, id: str | None = None) -> str:
    """A table of pre-escaped cells; a cell starting with ``\\x00num`` is right-aligned."""
    out = [f"<table{f' id={_q(id)}' if id else ''}>", "<tr>"]
    out += [f"<th>{_e(h)}</th>" for h in header]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>")
        for cell in row:
            if cell.startswith("\x00num"):
                out.append(f'<td class="num">{cell[4:]}</td>')
            else:
                out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _n(value: Any, digits: int = 4) -> str:
    """A right-aligned numeric table cell."""
    return "\x00num" + _num(value, digits)


def _q(value: str) -> str:
    return f'"{_e(value)}"'


def _kv(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column key/value table of pre-escaped values."""
    body = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _not_run(pass_name: str, what: str) -> str:
    return f'<p class="not-run">{_e(pass_name)}: not run — no {_e(what)} in this report.</p>'


def _figure(fig_id: str, body: str, caption: str) -> str:
    return f'<figure id="{_e(fig_id)}">{body}<figcaption>{caption}</figcaption></figure>'


# --------------------------------------------------------------------------- colours


def _viridis(t: float) -> str:
    """Colour of ``t`` in [0, 1] on the viridis ramp."""
    t = 0.0 if math.isnan(t) else min(1.0, max(0.0, t))
    pos = t * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    frac = pos - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    r, g, bl = (round(a[k] + (b[k] - a[k]) * frac) for k in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


def _ink(t: float) -> str:
    """Text colour readable on ``_viridis(t)``."""
    return "#000" if t > 0.55 else "#fff"


class _Scale:
    """Maps values to [0, 1]: linear, or logarithmic when the positive values span > 100×.

    KL sensitivities and GPTQ losses span orders of magnitude, so a linear scale would paint
    all but the largest the same colour. On a log scale, zeros (an expert whose output did
    not change) take the bottom colour; negative values rule the log scale out.
    """

    def __init__(self, values: Sequence[float], *, force_linear: bool = False) -> None:
        finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
        positive = [v for v in finite if v > 0]
        self.zeros = sum(v == 0 for v in finite)
        self.log = (
            not force_linear
            and bool(positive)
            and all(v >= 0 for v in finite)
            and max(positive) / min(positive) > 100
        )
        data = positive if self.log else finite
        self.lo = min(data) if data else 0.0
        self.hi = max(data) if data else 1.0

    def __call__(self, v: float) -> float:
        if not isinstance(v, int | float) or not math.isfinite(v):
            return float("nan")
        if self.hi <= self.lo:
            return 0.5
        if self.log:
            if v <= 0:
                return 0.0
            return (math.log10(v) - math.log10(self.lo)) / (
                math.log10(self.hi) - math.log10(self.lo)
            )
        return (v - self.lo) / (self.hi - self.lo)

    def describe(self) -> str:
        kind = "log" if self.log else "linear"
        text = f"{kind} colour scale from {_num(float(self.lo))} to {_num(float(self.hi))}"
        if self.log and self.zeros:
            text += f" ({self.zeros} zero value(s) drawn at the bottom colour)"
        return text


# --------------------------------------------------------------------------- SVG plots


def _svg_open(width: float, height: float, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_f(width)}" height="{_f(height)}" '
        f'viewBox="0 0 {_f(width)} {_f(height)}" role="img" aria-label="{_e(label)}" '
        f'style="{_FONT}">'
    )


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> str:
    out = []
    for name, color in items:
        out.append(f'<rect x="{_f(x)}" y="{_f(y - 9)}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{_f(x + 14)}" y="{_f(y)}">{_e(name)}</text>')
        x += 22 + 6.5 * len(name)
    return "".join(out)


def _nice_max(v: float) -> float:
    """A round axis maximum at or above ``v``."""
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    # Multiples whose quarter (the tick step) is itself round.
    for m in (1, 1.2, 1.6, 2, 2.4, 4, 6, 8, 10):
        if m * exp >= v * (1 - 1e-9):
            return m * exp
    return 10 * exp


def _grouped_bars(
    label: str,
    categories: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float]]],
    *,
    ylabel: str,
    ymax: float | None = None,
    fmt: Callable[[float], str] = lambda v: f"{v:.4g}",
    hline: tuple[float, str] | None = None,
) -> str:
    """Vertical grouped bars: one group per category, one bar per series."""
    n_cat, n_ser = len(categories), len(series)
    bar_w = max(2.0, min(max(14.0, 40.0 / max(1, n_ser)), 900.0 / max(1, n_cat * (n_ser + 1))))
    group_w = bar_w * (n_ser + 1)
    left, top, plot_h, bottom = 52.0, 26.0, 180.0, 44.0
    width = left + group_w * n_cat + 20
    width = max(width, 360.0)
    height = top + plot_h + bottom
    values = [v for _, _, vs in series for v in vs if math.isfinite(v)]
    top_v = ymax if ymax is not None else _nice_max(max(values, default=0.0))
    if hline is not None:
        top_v = max(top_v, _nice_max(hline[0]))
    out = [_svg_open(width, height, label)]
    out.append(_legend([(name, color) for name, color, _ in series], left, 14))
    for k in range(5):  # horizontal grid and y ticks
        v = top_v * k / 4
        y = top + plot_h - plot_h * k / 4
        out.append(
            f'<line x1="{_f(left)}" y1="{_f(y)}" x2="{_f(width - 10)}" y2="{_f(y)}" '
            f'stroke="#e4e4e4"/><text x="{_f(left - 4)}" y="{_f(y + 3)}" '
            f'text-anchor="end">{_e(fmt(v))}</text>'
        )
    out.append(
        f'<text transform="translate(12,{_f(top + plot_h / 2)}) rotate(-90)" '
        f'text-anchor="middle">{_e(ylabel)}</text>'
    )
    label_every = max(1, math.ceil(n_cat * 24 / max(1.0, group_w * n_cat)))
    for c, cat in enumerate(categories):
        gx = left + c * group_w + bar_w / 2
        for s, (name, color, vs) in enumerate(series):
            v = vs[c] if c < len(vs) else float("nan")
            if not math.isfinite(v):
                continue
            h = plot_h * max(0.0, min(v, top_v)) / top_v
            x = gx + s * bar_w
            out.append(
                f'<rect x="{_f(x)}" y="{_f(top + plot_h - h)}" width="{_f(bar_w)}" '
                f'height="{_f(h)}" fill="{color}"><title>{_e(cat)} {_e(name)}: '
                f"{_e(fmt(v))}</title></rect>"
            )
        if c % label_every == 0:
            cx = gx + n_ser * bar_w / 2
            out.append(
                f'<text x="{_f(cx)}" y="{_f(top + plot_h + 13)}" '
                f'text-anchor="middle">{_e(cat)}</text>'
            )
    if hline is not None:
        y = top + plot_h - plot_h * min(hline[0], top_v) / top_v
        out.append(
            f'<line x1="{_f(left)}" y1="{_f(y)}" x2="{_f(width - 10)}" y2="{_f(y)}" '
            f'stroke="{COLOR_BAD}" stroke-dasharray="5,3" stroke-width="1.5"/>'
            f'<text x="{_f(width - 12)}" y="{_f(y - 4)}" text-anchor="end" '
            f'fill="{COLOR_BAD}">{_e(hline[1])}</text>'
        )
    out.append(
        f'<line x1="{_f(left)}" y1="{_f(top + plot_h)}" x2="{_f(width - 10)}" '
        f'y2="{_f(top + plot_h)}" stroke="#444"/>'
    )
    out.append("</svg>")
    return "".join(out)


def _hbars(
    label: str,
    rows: Sequence[tuple[str, Sequence[tuple[str, str, float]]]],
    *,
    fmt: Callable[[float], str],
) -> str:
    """Horizontal stacked bars: ``rows`` of (label, [(part, colour, value)])."""
    label_w = 8.0 + 6.6 * max((len(r[0]) for r in rows), default=4)
    plot_w, bar_h, gap, top = 560.0, 18.0, 8.0, 22.0
    total_max = max((sum(v for _, _, v in parts) for _, parts in rows), default=0.0)
    total_max = total_max if total_max > 0 else 1.0
    width = label_w + plot_w + 170
    height = top + len(rows) * (bar_h + gap) + 6
    out = [_svg_open(width, height, label)]
    seen: dict[str, str] = {}
    for _, parts in rows:
        for name, color, _ in parts:
            seen.setdefault(name, color)
    if len(seen) > 1:
        out.append(_legend(list(seen.items()), label_w, 13))
    for i, (name, parts) in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(
            f'<text x="{_f(label_w - 6)}" y="{_f(y + bar_h - 5)}" '
            f'text-anchor="end">{_e(name)}</text>'
        )
        x = label_w
        for part, color, v in parts:
            w = plot_w * v / total_max
            out.append(
                f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(w)}" height="{_f(bar_h)}" '
                f'fill="{color}"><title>{_e(name)} {_e(part)}: {_e(fmt(v))}</title></rect>'
            )
            x += w
        total = sum(v for _, _, v in parts)
        out.append(f'<text x="{_f(x + 6)}" y="{_f(y + bar_h - 5)}">{_e(fmt(total))}</text>')
    out.append("</svg>")
    return "".join(out)


def _heatmap(
    label: str,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    matrix: Sequence[Sequence[float | None]],
    scale: _Scale,
    *,
    fmt: Callable[[float], str],
    title: str = "",
    marks: set[tuple[int, int]] | None = None,
    mark_note: str = "",
    show_values: bool | None = None,
) -> str:
    """A heatmap, rows top to bottom; ``marks`` cells get a red outline."""
    n_rows, n_cols = len(row_labels), len(col_labels)
    cell_w = max(5.0, min(48.0, 960.0 / max(1, n_cols)))
    cell_h = max(5.0, min(22.0, 640.0 / max(1, n_rows)))
    if show_values is None:
        show_values = cell_w >= 44 and cell_h >= 14
    left = 10.0 + 6.6 * max((len(r) for r in row_labels), default=2)
    top = 34.0 if title else 18.0
    width = max(left + n_cols * cell_w + 12, 200.0)
    height = top + n_rows * cell_h + 8
    out = [_svg_open(width, height, label)]
    if title:
        out.append(f'<text x="{_f(left)}" y="12" font-weight="600">{_e(title)}</text>')
    col_every = max(1, math.ceil(22.0 / cell_w))
    for c, name in enumerate(col_labels):
        if c % col_every == 0:
            out.append(
                f'<text x="{_f(left + (c + 0.5) * cell_w)}" y="{_f(top - 4)}" '
                f'text-anchor="middle">{_e(name)}</text>'
            )
    row_every = max(1, math.ceil(11.0 / cell_h))
    for r, name in enumerate(row_labels):
        y = top + r * cell_h
        if r % row_every == 0:
            out.append(
                f'<text x="{_f(left - 4)}" y="{_f(y + cell_h / 2 + 4)}" '
                f'text-anchor="end">{_e(name)}</text>'
            )
        row = matrix[r] if r < len(matrix) else []
        for c in range(n_cols):
            v = row[c] if c < len(row) else None
            x = left + c * cell_w
            if v is None or not isinstance(v, int | float) or not math.isfinite(v):
                fill, t, text = "#dddddd", 0.0, "n/a"
            else:
                t = scale(v)
                fill, text = _viridis(t), fmt(v)
            mark = marks is not None and (r, c) in marks
            note = f" ({mark_note})" if mark and mark_note else ""
            out.append(
                f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(cell_w)}" height="{_f(cell_h)}" '
                f'fill="{fill}" stroke="#fff" stroke-width="0.5"><title>{_e(name)}, '
                f"{_e(col_labels[c])}: {_e(text)}{_e(note)}</title></rect>"
            )
            if mark:
                out.append(
                    f'<rect x="{_f(x + 1)}" y="{_f(y + 1)}" width="{_f(cell_w - 2)}" '
                    f'height="{_f(cell_h - 2)}" fill="none" stroke="{COLOR_BAD}" '
                    f'stroke-width="2"/>'
                )
            if show_values:
                ink = "#000" if fill == "#dddddd" else _ink(t)
                out.append(
                    f'<text x="{_f(x + cell_w / 2)}" y="{_f(y + cell_h / 2 + 4)}" '
                    f'text-anchor="middle" fill="{ink}">{_e(text)}</text>'
                )
    out.append("</svg>")
    return "".join(out)


def _colorbar(scale: _Scale, fmt: Callable[[float], str]) -> str:
    """A small horizontal legend for a continuous heatmap colour scale."""
    width, steps, left = 220.0, 22, 80.0
    out = [_svg_open(width + left + 90, 30, "colour scale")]
    for i in range(steps):
        out.append(
            f'<rect x="{_f(left + i * width / steps)}" y="4" width="{_f(width / steps + 0.5)}" '
            f'height="10" fill="{_viridis(i / (steps - 1))}"/>'
        )
    out.append(f'<text x="{_f(left - 4)}" y="13" text-anchor="end">{_e(fmt(scale.lo))}</text>')
    out.append(f'<text x="{_f(left + width + 4)}" y="13">{_e(fmt(scale.hi))}</text>')
    out.append(
        f'<text x="{_f(left)}" y="27" fill="#555">{"log" if scale.log else "linear"} scale</text>'
    )
    out.append("</svg>")
    return "".join(out)


def _swatches(scale: _Scale, values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """A legend with one swatch per discrete value (the candidate widths)."""
    items = [(fmt(v), _viridis(scale(v))) for v in values]
    width = 20.0 + sum(22 + 6.5 * len(name) for name, _ in items)
    return _svg_open(width, 20, "legend") + _legend(items, 10, 14) + "</svg>"


def _compact(v: float) -> str:
    """At most about six characters: 0.0123, 4.56, 1.2e-5."""
    if v == 0:
        return "0"
    if 1e-2 <= abs(v) < 1e4:
        return f"{v:.3g}"
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant}e{int(exp)}"


# --------------------------------------------------------------------------- helpers


def _floats(values: Any) -> list[float]:
    """A list of floats from a JSON list (None and non-numbers become NaN)."""
    if not isinstance(values, list | tuple):
        return []
    return [float(v) if isinstance(v, int | float) else float("nan") for v in values]


def _layer_value(sec: dict[str, Any], layer: int, *keys: str) -> Any:
    """``sec["layers"][layer][key]`` or ``sec[key][layer]``, for the first key present."""
    layers = sec.get("layers")
    entry = layers[layer] if isinstance(layers, list) and layer < len(layers) else None
    for key in keys:
        if isinstance(entry, dict) and key in entry:
            return entry[key]
        top = sec.get(key)
        if isinstance(top, list) and layer < len(top):
            return top[layer]
    return None


def _num_layers(report: dict[str, Any]) -> int:
    """How many MoE layers the report describes (from whichever section has them)."""
    sections = report.get("sections") or {}
    best = 0
    for name, key in (
        ("find-moe", "layers"),
        ("allocate-bits", "widths"),
        ("quantize-experts", "layers"),
        ("collect-routing", "layers"),
        ("collect-routing", "f_text"),
        ("measure-sensitivity", "delta_text"),
        ("measure-sensitivity", "layers"),
    ):
        value = (sections.get(name) or {}).get(key)
        if isinstance(value, list):
            best = max(best, len(value))
    return best


def _val(value: Any) -> str:
    """A scalar for a key/value table: numbers formatted, anything else as short JSON."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _num(value)
    return _e(_short(value))


def _short(value: Any, limit: int = 160) -> str:
    """Compact JSON of an option or statistic value."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _guard(name: str, fn: Callable[[dict[str, Any]], str], report: dict[str, Any]) -> str:
    """Render one section; a malformed section is reported on the page, not raised."""
    try:
        return fn(report)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        log.warning(
            "report.html: could not render section %s: %s: %s", name, type(exc).__name__, exc
        )
        return (
            f'<p class="error">could not render this section ({_e(type(exc).__name__)}: '
            f"{_e(exc)}); the report may come from another modec version.</p>"
        )


# --------------------------------------------------------------------------- sections


def _overview(report: dict[str, Any]) -> str:
    opts = report.get("options") or {}
    summary = report.get("summary") or {}
    out = ["<h2>Pipeline</h2>"]
    out.append(
        _kv(
            [
                ("schema", _e(report.get("schema", "?"))),
                ("pipeline name", _e(report.get("pipeline_name", "?"))),
                ("model", _e(opts.get("model", "?"))),
                ("calibration data", _e(opts.get("calib", "?"))),
            ]
        )
    )
    out.append(f'<pre id="pipeline-text">{_e(report.get("pipeline", ""))}</pre>')
    if summary:
        hist = summary.get("histogram") or {}
        out.append("<h3>Result</h3>")
        out.append(
            _kv(
                [
                    ("method", _e(summary.get("method", "?"))),
                    ("budget (average bits)", _num(summary.get("budget"))),
                    ("average bits", _num(summary.get("average_bits"))),
                    (
                        "widths",
                        _e(", ".join(f"{b}-bit: {n}" for b, n in sorted(hist.items()))),
                    ),
                    ("output", _e(summary.get("out", "?"))),
                ]
            )
        )
    out.append("<h3>Options</h3>")
    rows = [[_e(k), f"<code>{_e(_short(opts[k]))}</code>"] for k in sorted(opts)]
    out.append(_table(["option", "value"], rows, id="table-options"))
    return "".join(out)


def _passes(report: dict[str, Any]) -> str:
    passes = report.get("passes") or []
    out = ["<h2>Passes</h2>"]
    if not passes:
        return out[0] + '<p class="not-run">no pass ran.</p>'
    total = sum(float(p.get("seconds", 0.0)) for p in passes)
    rows = []
    for p in passes:
        stats = p.get("stats") or {}
        st = ", ".join(f"{k}={_short(stats[k], 40)}" for k in sorted(stats))
        rows.append(
            [
                f"<code>{_e(p.get('name', '?'))}</code>",
                _n(float(p.get("seconds", 0.0)), 3),
                _pct(float(p.get("seconds", 0.0)) / total) if total > 0 else "–",
                "yes" if p.get("modified") else "no",
                _e(st),
            ]
        )
    rows.append(["<b>total</b>", _n(total, 3), "", "", ""])
    out.append(
        _table(
            ["pass", "seconds", "share", "modified graph", "statistics"], rows, id="table-passes"
        )
    )
    bars = [
        (str(p.get("name", "?")), [("seconds", COLOR_TEXT, float(p.get("seconds", 0.0)))])
        for p in passes
    ]
    out.append(
        _figure(
            "plot-pass-times",
            _hbars("seconds per pass", bars, fmt=lambda v: f"{v:.2f} s"),
            "Wall-clock seconds per pass (the runner's timing instrument).",
        )
    )
    texts = "".join(
        f"<tr><td><code>{_e(p.get('name', '?'))}</code></td><td><code>{_e(p.get('text', ''))}"
        "</code></td></tr>"
        for p in passes
    )
    out.append(
        f"<details><summary>pass text with options</summary><table>{texts}</table></details>"
    )
    return "".join(out)


def _proj_order(d: dict[str, Any]) -> list[str]:
    """gate, up, down first, then any other key sorted (stable across JSON round trips)."""
    fixed = [k for k in ("gate", "up", "down") if k in d]
    return fixed + sorted(k for k in d if k not in fixed)


def _moe_layers(report: dict[str, Any]) -> str:
    sec = (report.get("sections") or {}).get("find-moe")
    out = ["<h2>MoE layers</h2>"]
    if not sec or not isinstance(sec.get("layers"), list):
        return out[0] + _not_run("find-moe", "MoE layer list")
    att = ((report.get("sections") or {}).get("find-attention") or {}).get("layers")
    rows = []
    for i, r in enumerate(sec["layers"]):
        tap = att[i] if isinstance(att, list) and i < len(att) else "not run"
        weights = r.get("weights") or {}
        router = r.get("router") or {}
        shared = r.get("shared_expert")
        rows.append(
            [
                _n(r.get("index")),
                f"<code>{_e(r.get('name', ''))}</code>",
                _n(r.get("num_experts")),
                _n(r.get("top_k")),
                _e(router.get("scoring", "?")),
                _e(r.get("form", "?")),
                _e(r.get("activation", "?")),
                _e(", ".join(f"{k} {weights[k]}" for k in _proj_order(weights))),
                _n(r.get("expert_parameters")),
                _e("none" if shared is None else _short(shared, 60)),
                _e(tap.get("kind", "?") if isinstance(tap, dict) else tap or "none found"),
            ]
        )
    out.append(
        _table(
            [
                "layer",
                "name",
                "experts",
                "top-k",
                "scoring",
                "form",
                "activation",
                "weights [E, N, K]",
                "expert parameters",
                "shared expert",
                "attention (find-attention)",
            ],
            rows,
            id="table-moe-layers",
        )
    )
    return "".join(out)


# Frequencies drawn per layer: (label, colour, report key); see passes/collect_routing.py.
_FREQ_SERIES: tuple[tuple[str, str, str], ...] = (
    ("text", COLOR_TEXT, "f_text"),
    ("vision (all)", COLOR_VISION, "f_vision_all"),
    ("key vision", COLOR_KEY, "f_vision"),
    ("global", COLOR_GLOBAL, "f_global"),
)
# Routed-token counts per layer: (label, report key).
_COUNT_SERIES: tuple[tuple[str, str], ...] = (
    ("all", "count_all"),
    ("text", "count_text"),
    ("vision", "count_vision"),
    ("key vision", "count_key"),
    ("redundant vision", "count_redundant"),
)


def _routing(report: dict[str, Any]) -> str:
    sec = (report.get("sections") or {}).get("collect-routing")
    out = ["<h2>Routing frequencies</h2>"]
    if not sec:
        return out[0] + _not_run("collect-routing", "routing statistics")
    n_layers = _num_layers(report)
    out.append(
        "<p>Share of each modality's routed tokens that go to each expert, normalised to 1 "
        "within the layer (MODE §3): text, all vision tokens, the key vision tokens that "
        "MODE counts, and all tokens (global) beside them.</p>"
    )
    general = [
        (k, v) for k, v in sorted(sec.items()) if not isinstance(v, list | dict) and k != "layers"
    ]
    if general:
        out.append(_kv([(k, _val(v)) for k, v in general]))
    for layer in range(n_layers):
        series = []
        for name, color, key in _FREQ_SERIES:
            vals = _floats(_layer_value(sec, layer, key))
            if vals:
                series.append((name, color, vals))
        if not series:
            continue
        n_exp = max(len(s[2]) for s in series)
        cats = [f"e{e}" for e in range(n_exp)]
        out.append(f"<h3>Layer {layer}</h3>")
        out.append(
            _figure(
                f"plot-frequencies-layer-{layer}",
                _grouped_bars(
                    f"routing frequencies, layer {layer}",
                    cats,
                    series,
                    ylabel="frequency",
                    fmt=lambda v: f"{v:.3f}",
                ),
                f"Layer {layer}: routing frequency per expert by modality.",
            )
        )
    out.append(_coverage(sec, n_layers))
    out.append(_attention_fallbacks(sec.get("attention_fallbacks")))
    return "".join(out)


def _attention_fallbacks(fallbacks: Any) -> str:
    """The layers whose key vision tokens were not chosen by attention, and why."""
    out = ["<h3>Attention fallbacks</h3>"]
    if not fallbacks:
        out.append(
            '<p id="table-attention-fallbacks">none: key vision tokens were chosen by the '
            "attention the question pays them in every layer.</p>"
        )
        return "".join(out)
    rows = []
    for f in fallbacks if isinstance(fallbacks, list) else [fallbacks]:
        f = f if isinstance(f, dict) else {"reason": f}
        rows.append(
            [
                _n(f.get("layer")),
                _n(f.get("samples")) if "samples" in f else "all",
                _e(f.get("reason", "")),
                _e(f.get("rule", "")),
            ]
        )
    out.append(
        _table(
            ["layer", "samples", "reason", "rule used instead"],
            rows,
            id="table-attention-fallbacks",
        )
    )
    return "".join(out)


def _coverage(sec: dict[str, Any], n_layers: int) -> str:
    """Token counts per modality, and the experts that got too few calibration tokens."""
    out = ["<h3>Calibration coverage</h3>"]
    cov = sec.get("coverage")
    header = [
        "layer",
        *(name for name, _ in _COUNT_SERIES),
        "key tokens chosen by",
        "starved experts",
    ]
    rows = []
    for layer in range(n_layers):
        cells = [_n(layer)]
        for _, key in _COUNT_SERIES:
            vals = _floats(_layer_value(sec, layer, key))
            cells.append(_n(int(sum(v for v in vals if math.isfinite(v)))) if vals else "–")
        source = _layer_value(sec, layer, "key_source")
        cells.append(_e(source) if source is not None else "–")
        cells.append(_starved_cell(cov, layer))
        rows.append(cells)
    out.append(
        "<p>Routed tokens per layer (summed over experts, so a token counts once for each of "
        "its top-k experts); <i>attention</i> means the key vision tokens were chosen by the "
        "attention the question pays them, <i>hidden</i> by the fallback score.</p>"
    )
    out.append(_table(header, rows, id="table-coverage"))
    if isinstance(cov, dict):
        general = [(k, v) for k, v in sorted(cov.items()) if not isinstance(v, list | dict)]
        if general:
            out.append(_kv([(k, _val(v)) for k, v in general]))
    out.append(
        '<p class="muted">A starved expert received fewer than <code>min_tokens</code> '
        "calibration tokens of a modality; its statistics for that modality are unreliable."
        "</p>"
    )
    return "".join(out)


def _starved_cell(cov: Any, layer: int) -> str:
    """The starved experts of one layer per modality, from the coverage record."""
    if cov is None:
        return '<span class="muted">not recorded</span>'
    per_layer: Any = None
    if isinstance(cov, dict):
        layers = cov.get("layers")
        if isinstance(layers, list) and layer < len(layers):
            per_layer = layers[layer]
        else:
            per_layer = {
                k: v[layer] for k, v in cov.items() if isinstance(v, list) and layer < len(v)
            }
    elif isinstance(cov, list) and layer < len(cov):
        per_layer = cov[layer]
    if isinstance(per_layer, dict):
        parts = []
        for k in sorted(per_layer):
            v = per_layer[k]
            if isinstance(v, list):
                txt = ", ".join(f"e{x}" for x in v) if v else "none"
                cls = ' class="bad"' if v else ""
                parts.append(f"{_e(k)}: <span{cls}>{_e(txt)}</span>")
            elif not isinstance(v, dict):
                parts.append(f"{_e(k)}: {_e(_short(v, 60))}")
        return "<br>".join(parts) if parts else "none"
    if isinstance(per_layer, list):
        return _e(", ".join(f"e{x}" for x in per_layer)) if per_layer else "none"
    return '<span class="muted">not recorded</span>'


def _sensitivity(report: dict[str, Any]) -> str:
    sections = report.get("sections") or {}
    sec = sections.get("measure-sensitivity")
    out = ["<h2>Sensitivity</h2>"]
    if not sec:
        return out[0] + _not_run("measure-sensitivity", "sensitivity matrix")
    bits = sec.get("bits") or (sections.get("allocate-bits") or {}).get("bits") or []
    out.append(
        "<p>δ(e, b): mean KL divergence of the next-token distribution when only expert e is "
        "RTN-quantized to b bits for the tokens of one modality (MODE §3.2). Text and vision "
        "of one layer share a colour scale; grey cells belong to an expert that no token of "
        "that modality reached in the subset (δ = 0, nothing to measure).</p>"
    )
    general = [(k, _val(v)) for k, v in sorted(sec.items()) if not isinstance(v, list | dict)]
    subset = sec.get("subset")
    if isinstance(subset, dict):
        general.append(("subset", _e(", ".join(f"{k} {subset[k]}" for k in sorted(subset)))))
    if general:
        out.append(_kv(general))
    unused = sec.get("unused") if isinstance(sec.get("unused"), dict) else {}
    timings = sec.get("layers") if isinstance(sec.get("layers"), list) else []
    rows = []
    for layer in range(_num_layers(report)):
        text = _layer_value(sec, layer, "delta_text")
        vision = _layer_value(sec, layer, "delta_vision")
        if not isinstance(text, list) and not isinstance(vision, list):
            continue
        mats: list[tuple[str, list[list[float | None]]]] = []
        for name, m in (("text", text), ("vision", vision)):
            if not isinstance(m, list):
                continue
            skip = {e for l_, e in unused.get(name, []) if l_ == layer}
            mats.append(
                (name, [[None if e in skip else v for v in _floats(r)] for e, r in enumerate(m)])
            )
        n_exp = max(len(m) for _, m in mats)
        n_bits = max((len(r) for _, m in mats for r in m), default=0)
        cols = [f"{b}-bit" for b in bits][:n_bits]
        cols += [f"w{j}" for j in range(len(cols), n_bits)]
        scale = _Scale([v for _, m in mats for r in m for v in r if v is not None])
        # Experts across, widths down: paper-scale layers (128 experts) stay one screen wide.
        body = []
        for name, m in mats:
            transposed = [[r[j] if j < len(r) else None for r in m] for j in range(n_bits)]
            body.append(
                _heatmap(
                    f"{name} sensitivity, layer {layer}",
                    cols,
                    [f"e{e}" for e in range(n_exp)],
                    transposed,
                    scale,
                    fmt=_compact,
                    title=f"δ_{name}",
                )
            )
        body.append(_colorbar(scale, _compact))
        out.append(f"<h3>Layer {layer}</h3>")
        out.append(
            _figure(
                f"plot-sensitivity-layer-{layer}",
                "<br>".join(body),
                f"Layer {layer}: sensitivity per expert (columns) and width (rows); "
                f"{_e(scale.describe())}.",
            )
        )
        t = timings[layer] if layer < len(timings) and isinstance(timings[layer], dict) else {}
        rows.append(
            [
                _n(layer),
                _n(t.get("seconds"), 3),
                _n(t.get("runs")),
                _e(", ".join(f"e{e}" for l_, e in unused.get("text", []) if l_ == layer) or "–"),
                _e(", ".join(f"e{e}" for l_, e in unused.get("vision", []) if l_ == layer) or "–"),
            ]
        )
    if rows:
        out.append("<h3>Per layer</h3>")
        out.append(
            _table(
                ["layer", "seconds", "re-runs", "unused by text", "unused by vision"],
                rows,
                id="table-sensitivity-layers",
            )
        )
        if not timings:
            out.append(
                '<p class="muted">no per-layer timings (the result came from the cache).</p>'
            )
    return "".join(out)


def _allocation(report: dict[str, Any]) -> str:
    sec = (report.get("sections") or {}).get("allocate-bits")
    out = ["<h2>Bit allocation</h2>"]
    if not sec or not isinstance(sec.get("widths"), list):
        return out[0] + _not_run("allocate-bits", "allocation")
    widths: list[list[int]] = sec["widths"]
    bits = sec.get("bits") or sorted({w for row in widths for w in row})
    hist = sec.get("histogram") or {}
    out.append(
        _kv(
            [
                ("method", _e(sec.get("method", "?"))),
                ("budget (average bits)", _num(sec.get("budget"))),
                ("candidate widths", _e(", ".join(str(b) for b in bits))),
                ("average bits", _num(sec.get("average_bits"))),
                ("objective", _num(sec.get("objective"))),
                ("histogram", _e(", ".join(f"{b}-bit: {n}" for b, n in sorted(hist.items())))),
                *([("note", _e(sec["note"]))] if sec.get("note") else []),
                *([("VEQ γ", _num(sec["veq_gamma"]))] if "veq_gamma" in sec else []),
            ]
        )
    )
    n_exp = max((len(r) for r in widths), default=0)
    scale = _Scale([float(b) for b in bits] or [0.0, 1.0], force_linear=True)
    out.append(
        _figure(
            "plot-widths",
            _heatmap(
                "expert widths",
                [f"layer {i}" for i in range(len(widths))],
                [f"e{e}" for e in range(n_exp)],
                [[float(w) for w in row] for row in widths],
                scale,
                fmt=lambda v: f"{v:.0f}",
                show_values=n_exp <= 32,
            )
            + "<br>"
            + _swatches(scale, [float(b) for b in bits], lambda v: f"{v:.0f}-bit"),
            "Width (bits) of every expert: layers down, experts across.",
        )
    )
    budget = sec.get("budget")
    per_layer = [sum(r) / len(r) if r else float("nan") for r in widths]
    hline = (float(budget), f"budget {budget}") if isinstance(budget, int | float) else None
    out.append("<h3>Budget use</h3>")
    out.append(
        _figure(
            "plot-budget",
            _grouped_bars(
                "average width per layer",
                [f"L{i}" for i in range(len(widths))],
                [("average width", COLOR_QUANT, per_layer)],
                ylabel="bits",
                fmt=lambda v: f"{v:.2f}",
                hline=hline,
            ),
            "Average width of each layer's experts; the dashed line is the budget.",
        )
    )
    solver = sec.get("layers")
    if isinstance(solver, list) and solver:
        rows = []
        for i, s in enumerate(solver):
            used = sum(widths[i]) if i < len(widths) and len(solver) == len(widths) else None
            rows.append(
                [
                    _n(i) if len(solver) == len(widths) else "all",
                    _e(s.get("status", "?")),
                    _n(s.get("objective")),
                    _n(s.get("gap")),
                    _n(s.get("target")),
                    _n(used),
                    _n(s.get("solve_seconds"), 3),
                    "yes" if s.get("rounded") else "no",
                ]
            )
        out.append("<h3>Solver</h3>")
        out.append(
            _table(
                [
                    "layer",
                    "status",
                    "objective",
                    "gap",
                    "bit target",
                    "bits used",
                    "seconds",
                    "target rounded",
                ],
                rows,
                id="table-solver",
            )
        )
    return "".join(out)


def _sizes(report: dict[str, Any]) -> str:
    summary = report.get("summary") or {}
    sizes = summary.get("sizes")
    out = ["<h2>Size</h2>"]
    if not isinstance(sizes, dict):
        return out[0] + (
            '<p class="not-run">no size summary in this report (it is added by '
            "<code>modec compile</code> after the passes ran).</p>"
        )
    opts = report.get("options") or {}
    budget_bytes = opts.get("budget_bytes") or 0
    rows = [
        ("experts fp32", [("fp32", COLOR_FP32, float(sizes.get("experts_fp32", 0)))]),
        ("experts fp16", [("fp16", COLOR_FP16, float(sizes.get("experts_fp16", 0)))]),
        (
            "experts quantized",
            [
                ("codes", COLOR_CODES, float(sizes.get("experts_codes", 0))),
                ("scales", COLOR_SCALES, float(sizes.get("experts_scales", 0))),
                ("zeros", COLOR_ZEROS, float(sizes.get("experts_zeros", 0))),
            ],
        ),
    ]
    if budget_bytes:
        rows.append(("byte budget", [("budget", COLOR_BAD, float(budget_bytes))]))
    out.append(
        _figure(
            "plot-sizes",
            _hbars("expert bytes", rows, fmt=lambda v: f"{v / 2**20:.3f} MiB"),
            "Bytes of the routed experts' weights; quantized = codes + fp16 scales + "
            "uint8 zero points.",
        )
    )
    q = sizes.get("experts_quantized") or 0
    m = sizes.get("model_quantized") or 0
    table = [
        ["expert parameters", _n(sizes.get("expert_params")), ""],
        ["experts fp32", "\x00num" + _bytes(sizes.get("experts_fp32")), ""],
        [
            "experts fp16",
            "\x00num" + _bytes(sizes.get("experts_fp16")),
            _ratio(sizes.get("experts_fp16"), q),
        ],
        ["experts quantized", "\x00num" + _bytes(q), _ratio(sizes.get("experts_fp32"), q)],
        ["&nbsp;&nbsp;codes", "\x00num" + _bytes(sizes.get("experts_codes")), ""],
        ["&nbsp;&nbsp;scales", "\x00num" + _bytes(sizes.get("experts_scales")), ""],
        ["&nbsp;&nbsp;zeros", "\x00num" + _bytes(sizes.get("experts_zeros")), ""],
        ["rest of the model (fp32)", "\x00num" + _bytes(sizes.get("other_fp32")), ""],
        ["model fp32", "\x00num" + _bytes(sizes.get("model_fp32")), ""],
        ["model quantized", "\x00num" + _bytes(m), _ratio(sizes.get("model_fp32"), m)],
    ]
    if budget_bytes:
        table.append(
            ["byte budget", "\x00num" + _bytes(budget_bytes), f"{_pct(q / budget_bytes)} used"]
        )
    out.append(_table(["what", "bytes", "compression"], table, id="table-sizes"))
    avg, budget = summary.get("average_bits"), summary.get("budget")
    if isinstance(avg, int | float) and isinstance(budget, int | float) and budget > 0:
        out.append(
            f"<p>Bit budget use: average {avg:.3f} bits of {budget:g} ({_pct(avg / budget)}).</p>"
        )
    return "".join(out)


def _ratio(a: Any, b: Any) -> str:
    if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
        return f"{a / b:.2f}× smaller quantized"
    return ""


def _quantization(report: dict[str, Any]) -> str:
    sec = (report.get("sections") or {}).get("quantize-experts")
    out = ["<h2>Quantization (GPTQ)</h2>"]
    if not sec or not isinstance(sec.get("layers"), list):
        return out[0] + _not_run("quantize-experts", "per-expert quantization record")
    layers: list[list[dict[str, Any]]] = sec["layers"]
    projs = ("gate", "up", "down")
    out.append(
        _kv(
            [
                ("quantizer", _e(sec.get("method", "?"))),
                ("group size", _num(sec.get("group_size"))),
                ("RTN fallbacks (experts)", _num(sec.get("fallbacks"))),
            ]
        )
    )
    n_exp = max((len(r) for r in layers), default=0)
    loss: list[list[float | None]] = []
    marks: set[tuple[int, int]] = set()
    fallback_rows: list[list[str]] = []
    detail_rows: list[list[str]] = []
    for li, row in enumerate(layers):
        loss_row: list[float | None] = []
        for ei, ex in enumerate(row):
            total, have = 0.0, False
            for p in projs:
                rec = ex.get(p)
                if not isinstance(rec, dict):
                    continue
                if isinstance(rec.get("loss"), int | float):
                    total += float(rec["loss"])
                    have = True
                if rec.get("method") == "rtn":
                    marks.add((li, ei))
                    fallback_rows.append(
                        [
                            _n(li),
                            _n(ei),
                            _e(p),
                            _n(ex.get("bits")),
                            _n(ex.get("tokens")),
                            _e(rec.get("reason") or ""),
                        ]
                    )
            loss_row.append(total if have else None)
            cells = [_n(li), _n(ex.get("expert", ei)), _n(ex.get("bits")), _n(ex.get("tokens"))]
            for p in projs:
                rec = ex.get(p)
                if isinstance(rec, dict):
                    m = _e(rec.get("method", "?"))
                    cells.append(
                        f'<span class="bad">{m}</span>' if rec.get("method") == "rtn" else m
                    )
                    cells.append(_n(rec.get("loss")))
                    cells.append(_n(rec.get("output_mse")))
                else:
                    cells += ["–", "–", "–"]
            detail_rows.append(cells)
        loss.append(loss_row)
    if any(v is not None for row in loss for v in row):
        scale = _Scale([v for row in loss for v in row if v is not None])
        out.append(
            _figure(
                "plot-gptq-loss",
                _heatmap(
                    "GPTQ loss per expert",
                    [f"layer {i}" for i in range(len(layers))],
                    [f"e{e}" for e in range(n_exp)],
                    loss,
                    scale,
                    fmt=_compact,
                    marks=marks,
                    mark_note="RTN fallback",
                )
                + "<br>"
                + _colorbar(scale, _compact),
                "GPTQ loss per expert (gate + up + down, Frantar et al. 2022); a red "
                "outline marks an expert with at least one projection quantized by RTN; "
                "grey cells have no GPTQ loss.",
            )
        )
    else:
        out.append('<p class="muted">no GPTQ loss recorded (quantizer RTN).</p>')
    out.append("<h3>RTN fallbacks</h3>")
    if fallback_rows:
        out.append(
            _table(
                ["layer", "expert", "projection", "bits", "tokens", "reason"],
                fallback_rows,
                id="table-fallbacks",
            )
        )
    else:
        out.append('<p id="table-fallbacks">none: every projection was quantized with GPTQ.</p>')
    header = ["layer", "expert", "bits", "tokens"]
    for p in projs:
        header += [f"{p} method", f"{p} loss", f"{p} output MSE"]
    out.append(
        "<details><summary>every expert</summary>"
        + _table(header, detail_rows, id="table-experts")
        + "</details>"
    )
    return "".join(out)


def _accuracy(report: dict[str, Any]) -> str:
    acc = (report.get("summary") or {}).get("accuracy")
    out = ["<h2>Accuracy</h2>"]
    if not isinstance(acc, dict) or "fp32" not in acc or "quantized" not in acc:
        return out[0] + (
            '<p class="not-run">not measured: run <code>modec compile ... --eval DATA</code> '
            "to compare against the fp32 model.</p>"
        )
    base, quant = acc["fp32"], acc["quantized"]
    splits = [("overall", "overall"), ("multimodal", "multimodal"), ("text-only", "text_only")]
    fam_names = sorted(set(base.get("families") or {}) | set(quant.get("families") or {}))

    def get(doc: dict[str, Any], key: str, family: bool) -> dict[str, Any]:
        src = (doc.get("families") or {}) if family else doc
        value = src.get(key)
        return value if isinstance(value, dict) else {}

    rows, cats, a_vals, b_vals = [], [], [], []
    for label, key, fam in [(lbl, k, False) for lbl, k in splits] + [
        (f"  {f}", f, True) for f in fam_names
    ]:
        a, b = get(base, key, fam), get(quant, key, fam)
        av = float(a.get("accuracy", float("nan")))
        bv = float(b.get("accuracy", float("nan")))
        delta = (bv - av) * 100 if math.isfinite(av) and math.isfinite(bv) else float("nan")
        rows.append(
            [
                _e(label).replace("  ", "&nbsp;&nbsp;"),
                _n(a.get("n")),
                "\x00num" + _pct(av),
                "\x00num" + _pct(bv),
                "\x00num" + ("n/a" if math.isnan(delta) else f"{delta:+.2f} pt"),
            ]
        )
        cats.append(label.strip())
        a_vals.append(100 * av)
        b_vals.append(100 * bv)
    out.append(
        _figure(
            "plot-accuracy",
            _grouped_bars(
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
        _table(["split", "samples", "fp32", "quantized", "change"], rows, id="table-accuracy")
    )
    return "".join(out)


_SECTIONS: tuple[tuple[str, str, Callable[[dict[str, Any]], str]], ...] = (
    ("overview", "Pipeline", _overview),
    ("passes", "Passes", _passes),
    ("moe-layers", "MoE layers", _moe_layers),
    ("routing", "Routing", _routing),
    ("sensitivity", "Sensitivity", _sensitivity),
    ("allocation", "Allocation", _allocation),
    ("sizes", "Size", _sizes),
    ("quantization", "GPTQ", _quantization),
    ("accuracy", "Accuracy", _accuracy),
)


def render_report(report: dict[str, Any]) -> str:
    """The HTML page of one ``report.json`` document (schema ``modec.report/1``).

    Args:
        report: the parsed ``report.json`` (see docs/report.md). Sections of passes that
            did not run, and a missing ``summary``, are shown as "not run".

    Returns:
        One self-contained HTML document: inline CSS and inline SVG, no scripts, no
        external resources, nothing that depends on the time it was rendered.
    """
    schema = report.get("schema")
    if schema != "modec.report/1":
        log.warning("report.html: schema %r, expected 'modec.report/1'; rendering anyway", schema)
    name = str(report.get("pipeline_name", "modec"))
    model = str((report.get("options") or {}).get("model", ""))
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in _SECTIONS)
    body = "".join(
        f'<section id="{sid}">{_guard(sid, fn, report)}</section>' for sid, _, fn in _SECTIONS
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>modec report: {_e(name)}{' — ' + _e(Path(model).name) if model else ''}"
        f"</title><style>{_CSS}</style></head><body>"
        f"<header><h1>modec report</h1><p>{_e(name)} pipeline"
        f"{' on ' + _e(model) if model else ''} · schema {_e(schema)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


def write_report_html(out_dir: str | os.PathLike[str]) -> Path:
    """Render ``out_dir/report.json`` into ``out_dir/report.html`` (atomically).

    Args:
        out_dir: a modec output directory.

    Returns:
        The path of the written ``report.html``.

    Raises:
        BadInputError: ``report.json`` is missing, unreadable or not a JSON object.
    """
    d = Path(out_dir)
    src = d / REPORT_JSON
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
    dest = d / REPORT_HTML
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(render_report(report), encoding="utf-8")
    os.replace(tmp, dest)
    log.debug("wrote %s", dest)
    return dest
