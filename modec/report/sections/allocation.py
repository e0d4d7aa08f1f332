"""The ``allocation`` section (allocate-bits): widths, budget use, the ILP solves."""

from __future__ import annotations

from typing import Any

from modec.report.data import Report, section
from modec.report.html import esc, figure, kv, ncell, not_run, num, table
from modec.report.svg import COLOR_QUANT, Scale, grouped_bars, heatmap, swatches


def render(report: Report) -> str:
    sec = section(report, "allocate-bits")
    out = ["<h2>Bit allocation</h2>"]
    if not sec or not isinstance(sec.get("widths"), list):
        return out[0] + not_run("allocate-bits", "allocation")
    widths: list[list[int]] = sec["widths"]
    bits = sec.get("bits") or sorted({w for row in widths for w in row})
    hist = sec.get("histogram") or {}
    out.append(
        kv(
            [
                ("method", esc(sec.get("method", "?"))),
                ("budget (average bits)", num(sec.get("budget"))),
                ("candidate widths", esc(", ".join(str(b) for b in bits))),
                ("average bits", num(sec.get("average_bits"))),
                ("objective", num(sec.get("objective"))),
                ("histogram", esc(", ".join(f"{b}-bit: {n}" for b, n in sorted(hist.items())))),
                *([("note", esc(sec["note"]))] if sec.get("note") else []),
                *([("VEQ γ", num(sec["veq_gamma"]))] if "veq_gamma" in sec else []),
            ]
        )
    )
    n_exp = max((len(r) for r in widths), default=0)
    scale = Scale([float(b) for b in bits] or [0.0, 1.0], force_linear=True)
    out.append(
        figure(
            "plot-widths",
            heatmap(
                "expert widths",
                [f"layer {i}" for i in range(len(widths))],
                [f"e{e}" for e in range(n_exp)],
                [[float(w) for w in row] for row in widths],
                scale,
                fmt=lambda v: f"{v:.0f}",
                show_values=n_exp <= 32,
            )
            + "<br>"
            + swatches(scale, [float(b) for b in bits], lambda v: f"{v:.0f}-bit"),
            "Width (bits) of every expert: layers down, experts across.",
        )
    )
    budget = sec.get("budget")
    per_layer = [sum(r) / len(r) if r else float("nan") for r in widths]
    hline = (float(budget), f"budget {budget}") if isinstance(budget, int | float) else None
    out.append("<h3>Budget use</h3>")
    out.append(
        figure(
            "plot-budget",
            grouped_bars(
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
    calibrated = sec.get("calibrated")
    if isinstance(calibrated, dict) and isinstance(calibrated.get("scale"), list):
        out.append(_calibrated(calibrated))
    joint = sec.get("joint")
    if isinstance(joint, dict) and isinstance(joint.get("candidates"), list):
        out.append(_joint(joint))
    solver = sec.get("layers")
    if isinstance(solver, list) and solver:
        rows = []
        for i, s in enumerate(solver):
            used = sum(widths[i]) if i < len(widths) and len(solver) == len(widths) else None
            rows.append(
                [
                    ncell(i) if len(solver) == len(widths) else "all",
                    esc(s.get("status", "?")),
                    ncell(s.get("objective")),
                    ncell(s.get("gap")),
                    ncell(s.get("target")),
                    ncell(used),
                    ncell(s.get("solve_seconds"), 3),
                    "yes" if s.get("rounded") else "no",
                ]
            )
        out.append("<h3>Solver</h3>")
        out.append(
            table(
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


def _calibrated(cal: dict[str, Any]) -> str:
    """``--calibrate-costs``: per layer and width, Σ δ, the layer's joint KL and their ratio."""
    bits = cal.get("bits") or []
    additive, joint = cal.get("additive") or [], cal.get("joint") or []

    def at(rows: list[Any], li: int, j: int) -> Any:
        return rows[li][j] if li < len(rows) and j < len(rows[li]) else None

    rows = [
        [ncell(li), ncell(b), ncell(at(additive, li, j)), ncell(at(joint, li, j)),
         ncell(at(cal["scale"], li, j), 3)]
        for li in range(len(cal["scale"])) for j, b in enumerate(bits)
    ]  # fmt: skip
    note = (
        f"<p>Each layer's costs at each width were multiplied by the KL to fp32 of the model "
        f"with every expert of that layer at that width ({esc(str(cal.get('quantizer', '?')))}"
        + (", cross-fitted" if cal.get("quantizer") == "gptq" else "")
        + f"; the other layers fp32) over the sum of the experts' δ, both on "
        f"{cal.get('samples', '?')} samples at the {esc(str(cal.get('positions', '?')))} "
        f'positions, in {num(cal.get("seconds"))} s (docs/joint.md, "Calibrated costs").</p>'
    )
    return (
        "<h3>Calibrated costs</h3>"
        + note
        + table(["layer", "bits", "Σ δ", "joint KL", "scale"], rows, id="table-calibrated")
    )


def _joint(joint: dict[str, Any]) -> str:
    """The joint check (``--joint select``): every width range's allocation and its KL."""
    rows = []
    chosen, default = joint.get("chosen"), joint.get("default")
    for i, c in enumerate(joint["candidates"]):
        hist = c.get("histogram") or {}
        same = c.get("same_as")
        vs = c.get("kl_vs_default")
        diff = (
            f"{vs[0]:+.3g} [{vs[1]:+.3g}, {vs[2]:+.3g}]"
            if isinstance(vs, list) and len(vs) == 3 and i != default
            else ""
        )
        mark = ["default"] if i == default else []
        mark += ["<b>chosen</b>"] if i == chosen else []
        rows.append(
            [
                esc("{" + ", ".join(str(b) for b in c.get("widths", [])) + "}"),
                esc(", ".join(f"{b}-bit: {n}" for b, n in sorted(hist.items()))),
                ncell(c.get("objective")),
                ncell(c.get("kl")),
                ncell(c.get("kl_multimodal")),
                ncell(c.get("kl_text_only")),
                esc(diff) + (" (better)" if c.get("better") else ""),
                esc(f"as {{{', '.join(str(b) for b in joint['candidates'][same]['widths'])}}}")
                if isinstance(same, int) and same != i
                else "",
                ", ".join(mark),
            ]
        )
    infeasible = joint.get("infeasible") or []
    note = (
        f"<p>Every contiguous range of the candidate widths was solved with the method's costs; "
        f"each distinct allocation ran on {joint.get('samples', '?')} calibration samples "
        f"({joint.get('positions', '?')} KL positions) with every expert quantized at its "
        f"width ({esc(str(joint.get('quantizer', '?')))}"
        + (
            "; each half of the samples judged by experts fitted to the other half"
            if joint.get("quantizer") == "gptq"
            else ""
        )
        + f"), in {num(joint.get('seconds'))} s. "
        + (
            "Uniform where the budget is one of the widths, else the paper's allocation (the "
            "default; guard rule)"
            if joint.get("rule") == "guard"
            else "The narrowest range (the default)"
        )
        + " is kept unless another range's joint KL to fp32 is lower with a 95% paired "
        "bootstrap interval below zero (better); then the lowest of those"
        + (
            ", the multimodal and the text-only samples weighing half each"
            if joint.get("weighting") == "balanced"
            else ""
        )
        + ". The first row is the paper's allocation."
        + (
            " Ranges that cannot meet the budget: "
            + esc("; ".join("{" + ", ".join(map(str, r)) + "}" for r in infeasible))
            + "."
            if infeasible
            else ""
        )
        + "</p>"
    )
    return (
        "<h3>Joint check</h3>"
        + note
        + table(
            [
                "widths allowed",
                "histogram",
                "additive objective",
                "joint KL",
                "KL multimodal",
                "KL text-only",
                "KL − default's [95%]",
                "allocation",
                "",
            ],
            rows,
            id="table-joint",
        )
    )
