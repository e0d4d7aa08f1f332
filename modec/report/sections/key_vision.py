"""The ``key-vision`` section (select-key-vision): which vision tokens MODE counts.

Per layer: the routed selections by key and by redundant (the other) vision tokens, what
chose the key tokens (``attention``, the ``hidden`` fallback score, both, or ``none``),
the experts that too few key tokens reached (``table-key-vision``), and the key against
redundant token counts per expert (``plot-key-vision``).

A report written before select-key-vision existed kept these statistics in
collect-routing, where the ``routing`` section draws them as it always did; this section
is then left out of the page, so such a report renders exactly as before.
"""

from __future__ import annotations

import math

from modec.report.data import Report, floats, layer_value, num_layers, section
from modec.report.html import NUM, esc, figure, kv, ncell, not_run, pct, table, val
from modec.report.sections.routing import (
    coverage_notes,
    legacy_layout,
    starved_cell,
    token_total,
)
from modec.report.svg import COLOR_KEY, COLOR_REDUNDANT, grouped_bars


def render(report: Report) -> str | None:
    if legacy_layout(report):
        return None  # drawn by the routing section, as before the split
    sec = section(report, "select-key-vision")
    out = ["<h2>Key vision tokens</h2>"]
    if not sec:
        return out[0] + not_run("select-key-vision", "key vision tokens")
    n_layers = num_layers(report)
    out.append(
        "<p>MODE weights an expert's vision sensitivity by how often the <i>key</i> vision "
        "tokens select it: the share <code>key_ratio</code> of each image's tokens that score "
        "highest, by the attention the question pays them or by the fallback score (MODE "
        "§3.1). The other vision tokens are "
        "<i>redundant</i>. Counts are routed selections, so a token counts once for each of "
        "its top-k experts: <i>routed key</i> and <i>routed redundant</i> sum them over "
        "the experts.</p>"
    )
    general = [(k, v) for k, v in sorted(sec.items()) if not isinstance(v, list | dict)]
    if general:
        out.append(kv([(k, val(v)) for k, v in general]))
    cov = sec.get("coverage")
    # Tokens chosen (key_tokens of vision_tokens) where the pass recorded them.
    chosen = isinstance(sec.get("key_tokens"), list)
    rows = []
    plots = []
    for layer in range(n_layers):
        key = floats(layer_value(sec, layer, "count_key"))
        redundant = floats(layer_value(sec, layer, "count_redundant"))
        source = layer_value(sec, layer, "key_source")
        k_sum = sum(v for v in key if math.isfinite(v))
        r_sum = sum(v for v in redundant if math.isfinite(v))
        cells = [ncell(layer)]
        if chosen:
            cells += [
                ncell(layer_value(sec, layer, "vision_tokens")),
                ncell(layer_value(sec, layer, "key_tokens")),
            ]
        cells += [
            token_total(sec, layer, "count_key"),
            token_total(sec, layer, "count_redundant"),
            NUM + pct(k_sum / (k_sum + r_sum)) if k_sum + r_sum > 0 else "–",
            esc(source) if source is not None else "–",
            starved_cell(cov, layer),
        ]
        rows.append(cells)
        if key or redundant:
            n_exp = max(len(key), len(redundant))
            plots.append(
                f"<h3>Layer {layer}</h3>"
                + grouped_bars(
                    f"key and redundant vision tokens, layer {layer}",
                    [f"e{e}" for e in range(n_exp)],
                    [("key", COLOR_KEY, key), ("redundant", COLOR_REDUNDANT, redundant)],
                    ylabel="routed tokens",
                    fmt=lambda v: f"{v:,.0f}",
                )
            )
    header = [
        "layer",
        *(["vision tokens", "key tokens"] if chosen else []),
        "routed key",
        "routed redundant",
        "key share",
        "key tokens chosen by",
        "starved experts",
    ]
    out.append(table(header, rows, id="table-key-vision"))
    out.append(
        "<p><i>attention</i>: chosen by the attention the question pays the image tokens; "
        "<i>hidden</i>: by the fallback score (see the attention fallbacks under Routing); "
        "<i>none</i>: the layer saw no vision token.</p>"
    )
    out.append(coverage_notes(cov))
    if plots:
        out.append(
            figure(
                "plot-key-vision",
                "".join(plots),
                "Routed selections per expert by key and by redundant vision tokens, one "
                "plot per layer.",
            )
        )
    return "".join(out)
