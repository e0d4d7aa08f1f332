"""Reading a parsed ``report.json`` defensively (docs/report.md).

The page must render reports from other modec versions, so nothing here trusts a shape:
lists may be short, values may be ``None`` or strings, sections may be absent.
"""

from __future__ import annotations

from typing import Any

# A parsed report.json document (JSON: the values are only known after isinstance checks).
Report = dict[str, Any]


def section(report: Report, name: str) -> Any:
    """``report["sections"][name]``, or ``None`` when the pass recorded nothing."""
    return (report.get("sections") or {}).get(name)


def floats(values: object) -> list[float]:
    """A list of floats from a JSON list (None and non-numbers become NaN)."""
    if not isinstance(values, list | tuple):
        return []
    return [float(v) if isinstance(v, int | float) else float("nan") for v in values]


def layer_value(sec: dict[str, Any], layer: int, *keys: str) -> Any:
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


def num_layers(report: Report) -> int:
    """How many MoE layers the report describes (from whichever section has them)."""
    sections = report.get("sections") or {}
    best = 0
    for name, key in (
        ("find-moe", "layers"),
        ("allocate-bits", "widths"),
        ("quantize-experts", "layers"),
        ("collect-routing", "layers"),
        ("collect-routing", "f_text"),
        ("select-key-vision", "f_key"),
        ("measure-sensitivity", "delta_text"),
        ("measure-sensitivity", "layers"),
    ):
        value = (sections.get(name) or {}).get(key)
        if isinstance(value, list):
            best = max(best, len(value))
    return best
