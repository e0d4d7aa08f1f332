"""The ``routing`` section (collect-routing): frequencies, coverage, attention fallbacks.

Two layouts of ``report.json`` are drawn:

- the current one, where ``collect-routing.f_vision`` is the frequency over all vision
  tokens and the key vision tokens have their own pass, ``select-key-vision`` (``f_key``);
- the earlier one, where collect-routing also chose the key tokens: ``f_vision`` was the
  key-vision frequency, ``f_vision_all`` the all-vision one, and ``count_key``,
  ``count_redundant``, ``f_redundant``, ``key_ratio`` and ``key_source`` lived here. Such a
  report renders exactly as it did before the split.

``plot-frequencies-layer-{l}`` shows text / all-vision / key-vision / global per expert in
both layouts.
"""

from __future__ import annotations

import math
from typing import Any

from modec.report.data import Report, floats, layer_value, num_layers, section
from modec.report.html import esc, figure, kv, ncell, not_run, short, table, val
from modec.report.svg import COLOR_GLOBAL, COLOR_KEY, COLOR_TEXT, COLOR_VISION, grouped_bars

# The keys that moved from collect-routing to select-key-vision; any of them in
# collect-routing marks a report written before the split.
_MOVED = ("f_vision_all", "count_key", "count_redundant", "f_redundant", "key_ratio", "key_source")

# Routed-token counts per layer: (label, report key), in the collect-routing section.
_COUNT_SERIES: tuple[tuple[str, str], ...] = (
    ("all", "count_all"),
    ("text", "count_text"),
    ("vision", "count_vision"),
)
# The earlier layout also counted key and redundant vision tokens here.
_LEGACY_COUNT_SERIES: tuple[tuple[str, str], ...] = (
    *_COUNT_SERIES,
    ("key vision", "count_key"),
    ("redundant vision", "count_redundant"),
)
SOURCE_HEADER = {"key_source": "key tokens chosen by", "score_source": "vision tokens scored by"}


def legacy_layout(report: Report) -> bool:
    """Whether collect-routing holds the key-vision statistics (a report from before the
    select-key-vision pass existed)."""
    sec = section(report, "collect-routing")
    return (
        section(report, "select-key-vision") is None
        and isinstance(sec, dict)
        and any(k in sec for k in _MOVED)
    )


def render(report: Report) -> str:
    sec = section(report, "collect-routing")
    out = ["<h2>Routing frequencies</h2>"]
    if not sec:
        return out[0] + not_run("collect-routing", "routing statistics")
    legacy = legacy_layout(report)
    key_sec = section(report, "select-key-vision")
    n_layers = num_layers(report)
    out.append(
        "<p>Share of each modality's routed tokens that go to each expert, normalised to 1 "
        "within the layer (MODE §3): text, all vision tokens, the key vision tokens that "
        "MODE counts, and all tokens (global) beside them.</p>"
    )
    general = [
        (k, v) for k, v in sorted(sec.items()) if not isinstance(v, list | dict) and k != "layers"
    ]
    if general:
        out.append(kv([(k, val(v)) for k, v in general]))
    # (label, colour, section, key): which record each plotted frequency comes from.
    sources: list[tuple[str, str, Any, str]] = [
        ("text", COLOR_TEXT, sec, "f_text"),
        ("vision (all)", COLOR_VISION, sec, "f_vision_all" if legacy else "f_vision"),
        *(
            [("key vision", COLOR_KEY, sec, "f_vision")]
            if legacy
            else [("key vision", COLOR_KEY, key_sec, "f_key")]
            if isinstance(key_sec, dict)
            else []
        ),
        ("global", COLOR_GLOBAL, sec, "f_global"),
    ]
    for layer in range(n_layers):
        series = []
        for name, color, src, key in sources:
            vals = floats(layer_value(src, layer, key))
            if vals:
                series.append((name, color, vals))
        if not series:
            continue
        n_exp = max(len(s[2]) for s in series)
        cats = [f"e{e}" for e in range(n_exp)]
        out.append(f"<h3>Layer {layer}</h3>")
        out.append(
            figure(
                f"plot-frequencies-layer-{layer}",
                grouped_bars(
                    f"routing frequencies, layer {layer}",
                    cats,
                    series,
                    ylabel="frequency",
                    fmt=lambda v: f"{v:.3f}",
                ),
                f"Layer {layer}: routing frequency per expert by modality.",
            )
        )
    out.append(_specialization(sec, n_layers))
    out.append(_coverage(sec, n_layers, legacy))
    out.append(_attention_fallbacks(sec.get("attention_fallbacks")))
    return "".join(out)


def text_shares(sec: dict[str, Any], layer: int) -> tuple[list[float], float] | None:
    """Per expert, the share of its routed calibration tokens that are text (NaN for an
    expert no token chose), and the layer's share over all experts; None without counts."""
    text = floats(layer_value(sec, layer, "count_text"))
    vision = floats(layer_value(sec, layer, "count_vision"))
    if not text or len(text) != len(vision):
        return None
    shares = [t / (t + v) if t + v > 0 else float("nan") for t, v in zip(text, vision, strict=True)]
    total = sum(text) + sum(vision)
    return shares, (sum(text) / total if total > 0 else float("nan"))


def _specialization(sec: dict[str, Any], n_layers: int) -> str:
    """Modality specialization: per expert, the text share of its routed tokens."""
    out = ["<h3>Modality specialization</h3>"]
    per_layer = [text_shares(sec, layer) for layer in range(n_layers)]
    if not any(per_layer):
        return out[0] + '<p class="muted">no per-expert token counts recorded.</p>'
    out.append(
        "<p>Per expert, the share of its routed calibration tokens that are text, in %; the "
        "last column is the layer's share over all experts. An expert far above it serves "
        "mostly text, one near 0 mostly vision.</p>"
    )
    width = max(len(p[0]) for p in per_layer if p)
    rows = []
    for layer, p in enumerate(per_layer):
        cells = [ncell(layer)]
        shares, mix = p if p else ([], float("nan"))
        cells += [f"{100 * v:.0f}" if math.isfinite(v) else "–" for v in shares]
        cells += ["–"] * (width - len(shares))
        cells.append(f"{100 * mix:.1f}" if math.isfinite(mix) else "–")
        rows.append(cells)
    out.append(table(["layer", *(f"e{e}" for e in range(width)), "layer"], rows,
                     id="table-specialization"))  # fmt: skip
    for layer, p in enumerate(per_layer):
        if not p:
            continue
        shares, mix = p
        out.append(
            figure(
                f"plot-specialization-layer-{layer}",
                grouped_bars(
                    f"text share of routed tokens, layer {layer}",
                    [f"e{e}" for e in range(len(shares))],
                    [("text share", COLOR_TEXT, [100 * v for v in shares])],
                    ylabel="% text",
                    ymax=100.0,
                    fmt=lambda v: f"{v:.0f}",
                    hline=(100 * mix, "layer") if math.isfinite(mix) else None,
                ),
                f"Layer {layer}: share of each expert's routed tokens that are text "
                f"(line: the layer's share, {100 * mix:.1f}%).",
            )
        )
    return "".join(out)


def _attention_fallbacks(fallbacks: object) -> str:
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
                ncell(f.get("layer")),
                ncell(f.get("samples")) if "samples" in f else "all",
                esc(f.get("reason", "")),
                esc(f.get("rule", "")),
            ]
        )
    out.append(
        table(
            ["layer", "samples", "reason", "rule used instead"],
            rows,
            id="table-attention-fallbacks",
        )
    )
    return "".join(out)


def token_total(sec: dict[str, Any], layer: int, key: str) -> str:
    """A table cell: the routed tokens of one layer summed over experts, or "–"."""
    vals = floats(layer_value(sec, layer, key))
    return ncell(int(sum(v for v in vals if math.isfinite(v)))) if vals else "–"


def _coverage(sec: dict[str, Any], n_layers: int, legacy: bool) -> str:
    """Token counts per modality, and the experts that got too few calibration tokens."""
    out = ["<h3>Calibration coverage</h3>"]
    cov = sec.get("coverage")
    counts = _LEGACY_COUNT_SERIES if legacy else _COUNT_SERIES
    # The earlier layout names what chose the key tokens; the current one what scored the
    # vision tokens (select-key-vision picks the key tokens by that score).
    source_key = "key_source" if legacy else "score_source"
    has_source = legacy or isinstance(sec.get(source_key), list)
    header = [
        "layer",
        *(name for name, _ in counts),
        *([SOURCE_HEADER[source_key]] if has_source else []),
        "starved experts",
    ]
    rows = []
    for layer in range(n_layers):
        cells = [ncell(layer)]
        cells += [token_total(sec, layer, key) for _, key in counts]
        if has_source:
            source = layer_value(sec, layer, source_key)
            cells.append(esc(source) if source is not None else "–")
        cells.append(starved_cell(cov, layer))
        rows.append(cells)
    if legacy:
        out.append(
            "<p>Routed tokens per layer (summed over experts, so a token counts once for each "
            "of its top-k experts); <i>attention</i> means the key vision tokens were chosen by "
            "the attention the question pays them, <i>hidden</i> by the fallback score.</p>"
        )
    else:
        out.append(
            "<p>Routed tokens per layer (summed over experts, so a token counts once for each "
            "of its top-k experts); <i>attention</i> means the vision tokens were scored by "
            "the attention the question pays them, <i>hidden</i> by the fallback score.</p>"
        )
    out.append(table(header, rows, id="table-coverage"))
    out.append(coverage_notes(cov))
    return "".join(out)


def coverage_notes(cov: object) -> str:
    """The scalar coverage fields (``min_tokens``, ``starved``) and what starved means."""
    out = []
    if isinstance(cov, dict):
        general = [(k, v) for k, v in sorted(cov.items()) if not isinstance(v, list | dict)]
        if general:
            out.append(kv([(k, val(v)) for k, v in general]))
    out.append(
        '<p class="muted">A starved expert received fewer than <code>min_tokens</code> '
        "calibration tokens of a modality; its statistics for that modality are unreliable."
        "</p>"
    )
    return "".join(out)


def starved_cell(cov: object, layer: int) -> str:
    """The starved experts of one layer per modality, from a coverage record."""
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
                parts.append(f"{esc(k)}: <span{cls}>{esc(txt)}</span>")
            elif not isinstance(v, dict):
                parts.append(f"{esc(k)}: {esc(short(v, 60))}")
        return "<br>".join(parts) if parts else "none"
    if isinstance(per_layer, list):
        return esc(", ".join(f"e{x}" for x in per_layer)) if per_layer else "none"
    return '<span class="muted">not recorded</span>'
