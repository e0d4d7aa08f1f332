"""The ``quantization`` section (quantize-experts): GPTQ loss, RTN fallbacks, every expert."""

from __future__ import annotations

from typing import Any

from modec.report.data import Report, section
from modec.report.html import compact, esc, figure, kv, ncell, not_run, num, table
from modec.report.svg import Scale, colorbar, heatmap

_PROJS = ("gate", "up", "down")


def render(report: Report) -> str:
    sec = section(report, "quantize-experts")
    out = ["<h2>Quantization (GPTQ)</h2>"]
    if not sec or not isinstance(sec.get("layers"), list):
        return out[0] + not_run("quantize-experts", "per-expert quantization record")
    layers: list[list[dict[str, Any]]] = sec["layers"]
    rows = [
        ("quantizer", esc(sec.get("method", "?"))),
        ("group size", num(sec.get("group_size"))),
        ("RTN fallbacks (experts)", num(sec.get("fallbacks"))),
        (
            "expert inputs",
            "int8 per group (--expert-act-bits 8)" if sec.get("act_bits") else "float32",
        ),
    ]
    dense = section(report, "quantize-dense")
    if dense and isinstance(dense.get("weights"), list):  # --dense-bits
        rows += [
            ("dense weights",
             f"{len(dense['weights'])} at {num(dense.get('bits'))} bits, RTN (--dense-bits)"),
            ("dense inputs",
             "int8 per group (--dense-act-bits 8)" if dense.get("act_bits") else "float32"),
        ]  # fmt: skip
    out.append(kv(rows))
    n_exp = max((len(r) for r in layers), default=0)
    loss: list[list[float | None]] = []
    marks: set[tuple[int, int]] = set()
    fallback_rows: list[list[str]] = []
    detail_rows: list[list[str]] = []
    for li, row in enumerate(layers):
        loss_row: list[float | None] = []
        for ei, ex in enumerate(row):
            total, have = 0.0, False
            for p in _PROJS:
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
                            ncell(li),
                            ncell(ei),
                            esc(p),
                            ncell(ex.get("bits")),
                            ncell(ex.get("tokens")),
                            esc(rec.get("reason") or ""),
                        ]
                    )
            loss_row.append(total if have else None)
            detail_rows.append(_detail_row(li, ei, ex))
        loss.append(loss_row)
    if any(v is not None for row in loss for v in row):
        scale = Scale([v for row in loss for v in row if v is not None])
        out.append(
            figure(
                "plot-gptq-loss",
                heatmap(
                    "GPTQ loss per expert",
                    [f"layer {i}" for i in range(len(layers))],
                    [f"e{e}" for e in range(n_exp)],
                    loss,
                    scale,
                    fmt=compact,
                    marks=marks,
                    mark_note="RTN fallback",
                )
                + "<br>"
                + colorbar(scale, compact),
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
            table(
                ["layer", "expert", "projection", "bits", "tokens", "reason"],
                fallback_rows,
                id="table-fallbacks",
            )
        )
    else:
        out.append('<p id="table-fallbacks">none: every projection was quantized with GPTQ.</p>')
    header = ["layer", "expert", "bits", "tokens"]
    for p in _PROJS:
        header += [f"{p} method", f"{p} loss", f"{p} output MSE"]
    out.append(
        "<details><summary>every expert</summary>"
        + table(header, detail_rows, id="table-experts")
        + "</details>"
    )
    return "".join(out)


def _detail_row(li: int, ei: int, ex: dict[str, Any]) -> list[str]:
    """One expert's row of ``table-experts``: method, loss and output MSE per projection."""
    cells = [ncell(li), ncell(ex.get("expert", ei)), ncell(ex.get("bits")), ncell(ex.get("tokens"))]
    for p in _PROJS:
        rec = ex.get(p)
        if isinstance(rec, dict):
            m = esc(rec.get("method", "?"))
            cells.append(f'<span class="bad">{m}</span>' if rec.get("method") == "rtn" else m)
            cells.append(ncell(rec.get("loss")))
            cells.append(ncell(rec.get("output_mse")))
        else:
            cells += ["–", "–", "–"]
    return cells
