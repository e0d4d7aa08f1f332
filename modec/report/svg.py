"""Inline SVG plots of ``report.html``: colours, value scales, bars and heatmaps.

No plotting library: every plot is a string built here, so the page is byte-for-byte
deterministic and ``import modec`` stays light. Coordinates are written with at most two
decimals (:func:`coord`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from modec.report.html import esc, num

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
COLOR_TEXT = "#0072B2"
COLOR_VISION = "#E69F00"
COLOR_KEY = "#D55E00"
COLOR_REDUNDANT = "#56B4E9"
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


def coord(x: float) -> str:
    """A coordinate: two decimals, no trailing zeros (keeps the SVG small and stable)."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def viridis(t: float) -> str:
    """Colour of ``t`` in [0, 1] on the viridis ramp."""
    t = 0.0 if math.isnan(t) else min(1.0, max(0.0, t))
    pos = t * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    frac = pos - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    r, g, bl = (round(a[k] + (b[k] - a[k]) * frac) for k in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


def ink(t: float) -> str:
    """Text colour readable on ``viridis(t)``."""
    return "#000" if t > 0.55 else "#fff"


class Scale:
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
        text = f"{kind} colour scale from {num(float(self.lo))} to {num(float(self.hi))}"
        if self.log and self.zeros:
            text += f" ({self.zeros} zero value(s) drawn at the bottom colour)"
        return text


def svg_open(width: float, height: float, label: str) -> str:
    """The opening ``<svg>`` tag of a plot ``width`` × ``height`` pixels."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{coord(width)}" '
        f'height="{coord(height)}" viewBox="0 0 {coord(width)} {coord(height)}" role="img" '
        f'aria-label="{esc(label)}" style="{_FONT}">'
    )


def legend(items: Sequence[tuple[str, str]], x: float, y: float) -> str:
    """A row of colour swatches with names, starting at (x, y)."""
    out = []
    for name, color in items:
        out.append(
            f'<rect x="{coord(x)}" y="{coord(y - 9)}" width="10" height="10" fill="{color}"/>'
        )
        out.append(f'<text x="{coord(x + 14)}" y="{coord(y)}">{esc(name)}</text>')
        x += 22 + 6.5 * len(name)
    return "".join(out)


def nice_max(v: float) -> float:
    """A round axis maximum at or above ``v``."""
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10.0 ** math.floor(math.log10(v))
    # Multiples whose quarter (the tick step) is itself round.
    for m in (1, 1.2, 1.6, 2, 2.4, 4, 6, 8, 10):
        if m * exp >= v * (1 - 1e-9):
            return m * exp
    return 10 * exp


def grouped_bars(
    label: str,
    categories: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float]]],
    *,
    ylabel: str,
    ymax: float | None = None,
    fmt: Callable[[float], str] = lambda v: f"{v:.4g}",
    hline: tuple[float, str] | None = None,
) -> str:
    """Vertical grouped bars: one group per category, one bar per (name, colour, values)."""
    n_cat, n_ser = len(categories), len(series)
    bar_w = max(2.0, min(max(14.0, 40.0 / max(1, n_ser)), 900.0 / max(1, n_cat * (n_ser + 1))))
    group_w = bar_w * (n_ser + 1)
    left, top, plot_h, bottom = 52.0, 26.0, 180.0, 44.0
    width = left + group_w * n_cat + 20
    width = max(width, 360.0)
    height = top + plot_h + bottom
    values = [v for _, _, vs in series for v in vs if math.isfinite(v)]
    top_v = ymax if ymax is not None else nice_max(max(values, default=0.0))
    if hline is not None:
        top_v = max(top_v, nice_max(hline[0]))
    out = [svg_open(width, height, label)]
    out.append(legend([(name, color) for name, color, _ in series], left, 14))
    for k in range(5):  # horizontal grid and y ticks
        v = top_v * k / 4
        y = top + plot_h - plot_h * k / 4
        out.append(
            f'<line x1="{coord(left)}" y1="{coord(y)}" x2="{coord(width - 10)}" y2="{coord(y)}" '
            f'stroke="#e4e4e4"/><text x="{coord(left - 4)}" y="{coord(y + 3)}" '
            f'text-anchor="end">{esc(fmt(v))}</text>'
        )
    out.append(
        f'<text transform="translate(12,{coord(top + plot_h / 2)}) rotate(-90)" '
        f'text-anchor="middle">{esc(ylabel)}</text>'
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
                f'<rect x="{coord(x)}" y="{coord(top + plot_h - h)}" width="{coord(bar_w)}" '
                f'height="{coord(h)}" fill="{color}"><title>{esc(cat)} {esc(name)}: '
                f"{esc(fmt(v))}</title></rect>"
            )
        if c % label_every == 0:
            cx = gx + n_ser * bar_w / 2
            out.append(
                f'<text x="{coord(cx)}" y="{coord(top + plot_h + 13)}" '
                f'text-anchor="middle">{esc(cat)}</text>'
            )
    if hline is not None:
        y = top + plot_h - plot_h * min(hline[0], top_v) / top_v
        out.append(
            f'<line x1="{coord(left)}" y1="{coord(y)}" x2="{coord(width - 10)}" y2="{coord(y)}" '
            f'stroke="{COLOR_BAD}" stroke-dasharray="5,3" stroke-width="1.5"/>'
            f'<text x="{coord(width - 12)}" y="{coord(y - 4)}" text-anchor="end" '
            f'fill="{COLOR_BAD}">{esc(hline[1])}</text>'
        )
    out.append(
        f'<line x1="{coord(left)}" y1="{coord(top + plot_h)}" x2="{coord(width - 10)}" '
        f'y2="{coord(top + plot_h)}" stroke="#444"/>'
    )
    out.append("</svg>")
    return "".join(out)


def hbars(
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
    out = [svg_open(width, height, label)]
    seen: dict[str, str] = {}
    for _, parts in rows:
        for name, color, _ in parts:
            seen.setdefault(name, color)
    if len(seen) > 1:
        out.append(legend(list(seen.items()), label_w, 13))
    for i, (name, parts) in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(
            f'<text x="{coord(label_w - 6)}" y="{coord(y + bar_h - 5)}" '
            f'text-anchor="end">{esc(name)}</text>'
        )
        x = label_w
        for part, color, v in parts:
            w = plot_w * v / total_max
            out.append(
                f'<rect x="{coord(x)}" y="{coord(y)}" width="{coord(w)}" '
                f'height="{coord(bar_h)}" fill="{color}"><title>{esc(name)} {esc(part)}: '
                f"{esc(fmt(v))}</title></rect>"
            )
            x += w
        total = sum(v for _, _, v in parts)
        out.append(f'<text x="{coord(x + 6)}" y="{coord(y + bar_h - 5)}">{esc(fmt(total))}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap(
    label: str,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    matrix: Sequence[Sequence[float | None]],
    scale: Scale,
    *,
    fmt: Callable[[float], str],
    title: str = "",
    marks: set[tuple[int, int]] | None = None,
    mark_note: str = "",
    show_values: bool | None = None,
) -> str:
    """A heatmap, rows top to bottom; ``marks`` cells get a red outline, missing ones grey."""
    n_rows, n_cols = len(row_labels), len(col_labels)
    cell_w = max(5.0, min(48.0, 960.0 / max(1, n_cols)))
    cell_h = max(5.0, min(22.0, 640.0 / max(1, n_rows)))
    if show_values is None:
        show_values = cell_w >= 44 and cell_h >= 14
    left = 10.0 + 6.6 * max((len(r) for r in row_labels), default=2)
    top = 34.0 if title else 18.0
    width = max(left + n_cols * cell_w + 12, 200.0)
    height = top + n_rows * cell_h + 8
    out = [svg_open(width, height, label)]
    if title:
        out.append(f'<text x="{coord(left)}" y="12" font-weight="600">{esc(title)}</text>')
    col_every = max(1, math.ceil(22.0 / cell_w))
    for c, name in enumerate(col_labels):
        if c % col_every == 0:
            out.append(
                f'<text x="{coord(left + (c + 0.5) * cell_w)}" y="{coord(top - 4)}" '
                f'text-anchor="middle">{esc(name)}</text>'
            )
    row_every = max(1, math.ceil(11.0 / cell_h))
    for r, name in enumerate(row_labels):
        y = top + r * cell_h
        if r % row_every == 0:
            out.append(
                f'<text x="{coord(left - 4)}" y="{coord(y + cell_h / 2 + 4)}" '
                f'text-anchor="end">{esc(name)}</text>'
            )
        row = matrix[r] if r < len(matrix) else []
        for c in range(n_cols):
            v = row[c] if c < len(row) else None
            x = left + c * cell_w
            if v is None or not isinstance(v, int | float) or not math.isfinite(v):
                fill, t, text = "#dddddd", 0.0, "n/a"
            else:
                t = scale(v)
                fill, text = viridis(t), fmt(v)
            mark = marks is not None and (r, c) in marks
            note = f" ({mark_note})" if mark and mark_note else ""
            out.append(
                f'<rect x="{coord(x)}" y="{coord(y)}" width="{coord(cell_w)}" '
                f'height="{coord(cell_h)}" fill="{fill}" stroke="#fff" stroke-width="0.5">'
                f"<title>{esc(name)}, {esc(col_labels[c])}: {esc(text)}{esc(note)}</title></rect>"
            )
            if mark:
                out.append(
                    f'<rect x="{coord(x + 1)}" y="{coord(y + 1)}" width="{coord(cell_w - 2)}" '
                    f'height="{coord(cell_h - 2)}" fill="none" stroke="{COLOR_BAD}" '
                    f'stroke-width="2"/>'
                )
            if show_values:
                color = "#000" if fill == "#dddddd" else ink(t)
                out.append(
                    f'<text x="{coord(x + cell_w / 2)}" y="{coord(y + cell_h / 2 + 4)}" '
                    f'text-anchor="middle" fill="{color}">{esc(text)}</text>'
                )
    out.append("</svg>")
    return "".join(out)


def colorbar(scale: Scale, fmt: Callable[[float], str]) -> str:
    """A small horizontal legend for a continuous heatmap colour scale."""
    width, steps, left = 220.0, 22, 80.0
    out = [svg_open(width + left + 90, 30, "colour scale")]
    for i in range(steps):
        out.append(
            f'<rect x="{coord(left + i * width / steps)}" y="4" '
            f'width="{coord(width / steps + 0.5)}" height="10" '
            f'fill="{viridis(i / (steps - 1))}"/>'
        )
    out.append(f'<text x="{coord(left - 4)}" y="13" text-anchor="end">{esc(fmt(scale.lo))}</text>')
    out.append(f'<text x="{coord(left + width + 4)}" y="13">{esc(fmt(scale.hi))}</text>')
    out.append(
        f'<text x="{coord(left)}" y="27" fill="#555">'
        f"{'log' if scale.log else 'linear'} scale</text>"
    )
    out.append("</svg>")
    return "".join(out)


def swatches(scale: Scale, values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """A legend with one swatch per discrete value (the candidate widths)."""
    items = [(fmt(v), viridis(scale(v))) for v in values]
    width = 20.0 + sum(22 + 6.5 * len(name) for name, _ in items)
    return svg_open(width, 20, "legend") + legend(items, 10, 14) + "</svg>"
