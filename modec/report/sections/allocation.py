"""The ``allocation`` section (allocate-bits): widths, budget use, the ILP solves."""

from __future__ import annotations

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
