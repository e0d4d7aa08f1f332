"""HTML building blocks of ``report.html``: escaping, number formatting, tables.

Every function returns a piece of HTML (or text to put in one). Table cells are passed
pre-escaped; a cell that starts with :data:`NUM` is drawn right-aligned (a number).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence

# Prefix of a right-aligned (numeric) table cell; stripped when the table is drawn.
NUM = "\x00num"


def esc(value: object) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


def attr(value: str) -> str:
    """``value`` as a quoted, escaped attribute value."""
    return f'"{esc(value)}"'


def num(value: object, digits: int = 4) -> str:
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
    return esc(value)


def ncell(value: object, digits: int = 4) -> str:
    """A right-aligned numeric table cell."""
    return NUM + num(value, digits)


def fmt_bytes(n: object) -> str:
    """Bytes as ``1,234,567 B (1.18 MiB)``."""
    if not isinstance(n, int | float):
        return "–"
    n = int(n)
    if n >= 2**20:
        return f"{n:,} B ({n / 2**20:.2f} MiB)"
    if n >= 2**10:
        return f"{n:,} B ({n / 2**10:.1f} KiB)"
    return f"{n:,} B"


def pct(x: object) -> str:
    """A fraction as a percentage with two decimals; ``n/a`` for NaN or a non-number."""
    if not isinstance(x, int | float) or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.2f}%"


def compact(v: float) -> str:
    """At most about six characters: 0.0123, 4.56, 1.2e-5."""
    if v == 0:
        return "0"
    if 1e-2 <= abs(v) < 1e4:
        return f"{v:.3g}"
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def short(value: object, limit: int = 160) -> str:
    """Compact JSON of an option or statistic value (a string as itself)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def val(value: object) -> str:
    """A scalar for a key/value table: numbers formatted, anything else as short JSON."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return num(value)
    return esc(short(value))


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, id: str | None = None) -> str:
    """A table of pre-escaped cells; a cell starting with :data:`NUM` is right-aligned."""
    out = [f"<table{f' id={attr(id)}' if id else ''}>", "<tr>"]
    out += [f"<th>{esc(h)}</th>" for h in header]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>")
        for cell in row:
            if cell.startswith(NUM):
                out.append(f'<td class="num">{cell[len(NUM) :]}</td>')
            else:
                out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def kv(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column key/value table of pre-escaped values."""
    body = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def not_run(pass_name: str, what: str) -> str:
    """The note of a section whose pass did not run."""
    return f'<p class="not-run">{esc(pass_name)}: not run — no {esc(what)} in this report.</p>'


def figure(fig_id: str, body: str, caption: str) -> str:
    """A figure with a stable ``id``; ``caption`` is pre-escaped."""
    return f'<figure id="{esc(fig_id)}">{body}<figcaption>{caption}</figcaption></figure>'
