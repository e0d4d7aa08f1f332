"""The ``sensitivity`` section (measure-sensitivity): δ heatmaps per layer, timings."""

from __future__ import annotations

from typing import Any

from modec.report.data import Report, floats, layer_value, num_layers, section
from modec.report.html import compact, esc, figure, kv, ncell, not_run, table, val
from modec.report.svg import Scale, colorbar, heatmap


def render(report: Report) -> str:
    sec = section(report, "measure-sensitivity")
    out = ["<h2>Sensitivity</h2>"]
    if not sec:
        return out[0] + not_run("measure-sensitivity", "sensitivity matrix")
    bits = sec.get("bits") or (section(report, "allocate-bits") or {}).get("bits") or []
    out.append(
        "<p>δ(e, b): mean KL divergence of the next-token distribution when only expert e is "
        "RTN-quantized to b bits for the tokens of one modality (MODE §3.2). Text and vision "
        "of one layer share a colour scale; grey cells belong to an expert that no token of "
        "that modality reached in the subset (δ = 0, nothing to measure).</p>"
    )
    out.append(_how(sec))
    general = [(k, val(v)) for k, v in sorted(sec.items()) if not isinstance(v, list | dict)]
    subset = sec.get("subset")
    if isinstance(subset, dict):
        general.append(("subset", esc(", ".join(f"{k} {subset[k]}" for k in sorted(subset)))))
    if general:
        out.append(kv(general))
    unused = sec.get("unused") if isinstance(sec.get("unused"), dict) else {}
    timings = sec.get("layers") if isinstance(sec.get("layers"), list) else []
    rows = []
    for layer in range(num_layers(report)):
        text = layer_value(sec, layer, "delta_text")
        vision = layer_value(sec, layer, "delta_vision")
        if not isinstance(text, list) and not isinstance(vision, list):
            continue
        mats: list[tuple[str, list[list[float | None]]]] = []
        for name, m in (("text", text), ("vision", vision)):
            if not isinstance(m, list):
                continue
            skip = {e for l_, e in unused.get(name, []) if l_ == layer}
            mats.append(
                (name, [[None if e in skip else v for v in floats(r)] for e, r in enumerate(m)])
            )
        n_exp = max(len(m) for _, m in mats)
        n_bits = max((len(r) for _, m in mats for r in m), default=0)
        cols = [f"{b}-bit" for b in bits][:n_bits]
        cols += [f"w{j}" for j in range(len(cols), n_bits)]
        scale = Scale([v for _, m in mats for r in m for v in r if v is not None])
        # Experts across, widths down: paper-scale layers (128 experts) stay one screen wide.
        body = []
        for name, m in mats:
            transposed = [[r[j] if j < len(r) else None for r in m] for j in range(n_bits)]
            body.append(
                heatmap(
                    f"{name} sensitivity, layer {layer}",
                    cols,
                    [f"e{e}" for e in range(n_exp)],
                    transposed,
                    scale,
                    fmt=compact,
                    title=f"δ_{name}",
                )
            )
        body.append(colorbar(scale, compact))
        out.append(f"<h3>Layer {layer}</h3>")
        out.append(
            figure(
                f"plot-sensitivity-layer-{layer}",
                "<br>".join(body),
                f"Layer {layer}: sensitivity per expert (columns) and width (rows); "
                f"{esc(scale.describe())}.",
            )
        )
        t = timings[layer] if layer < len(timings) and isinstance(timings[layer], dict) else {}
        rows.append(
            [
                ncell(layer),
                ncell(t.get("seconds"), 3),
                ncell(t.get("runs")),
                esc(", ".join(f"e{e}" for l_, e in unused.get("text", []) if l_ == layer) or "–"),
                esc(", ".join(f"e{e}" for l_, e in unused.get("vision", []) if l_ == layer) or "–"),
            ]
        )
    if rows:
        out.append("<h3>Per layer</h3>")
        out.append(
            table(
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


def _how(sec: dict[str, Any]) -> str:
    """One sentence: how δ was measured and, under ``auto``, why that way."""
    mode, option = sec.get("sensitivity"), sec.get("sensitivity_option")
    if mode == "fisher":
        what = ("estimated by the O(L) second-order estimate δ ≈ ½ Δᵀ G Δ (one backward pass "
                "per Fisher direction; docs/sensitivity_estimator.md)")  # fmt: skip
    elif mode == "exact":
        what = "measured exactly: the model re-run behind every probe"
    else:
        return ""
    why = ""
    n, limit = sec.get("expert_params"), sec.get("fisher_min_expert_params")
    if option == "auto" and isinstance(n, int) and isinstance(limit, int):
        side = "at least" if n >= limit else "below"
        why = f" — <code>--sensitivity auto</code>: {n:,} expert weights, {side} {limit:,}"
        if sec.get("sensitivity_fallback"):
            why += f"; the estimate fell back to exact ({esc(str(sec['sensitivity_fallback']))})"
    return f"<p>δ was {what}{why}.</p>"
