"""The ``sizes`` section (``summary.sizes``): expert bytes before and after quantization."""

from __future__ import annotations

from modec.report.data import Report
from modec.report.html import NUM, figure, fmt_bytes, ncell, pct, table
from modec.report.svg import (
    COLOR_BAD,
    COLOR_CODES,
    COLOR_FP16,
    COLOR_FP32,
    COLOR_SCALES,
    COLOR_ZEROS,
    hbars,
)


def _ratio(a: object, b: object) -> str:
    if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
        return f"{a / b:.2f}× smaller quantized"
    return ""


def render(report: Report) -> str:
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
        figure(
            "plot-sizes",
            hbars("expert bytes", rows, fmt=lambda v: f"{v / 2**20:.3f} MiB"),
            "Bytes of the routed experts' weights; quantized = codes + fp16 scales + "
            "uint8 zero points.",
        )
    )
    q = sizes.get("experts_quantized") or 0
    m = sizes.get("model_quantized") or 0
    rows_t = [
        ["expert parameters", ncell(sizes.get("expert_params")), ""],
        ["experts fp32", NUM + fmt_bytes(sizes.get("experts_fp32")), ""],
        [
            "experts fp16",
            NUM + fmt_bytes(sizes.get("experts_fp16")),
            _ratio(sizes.get("experts_fp16"), q),
        ],
        ["experts quantized", NUM + fmt_bytes(q), _ratio(sizes.get("experts_fp32"), q)],
        ["&nbsp;&nbsp;codes", NUM + fmt_bytes(sizes.get("experts_codes")), ""],
        ["&nbsp;&nbsp;scales", NUM + fmt_bytes(sizes.get("experts_scales")), ""],
        ["&nbsp;&nbsp;zeros", NUM + fmt_bytes(sizes.get("experts_zeros")), ""],
        ["rest of the model (fp32)", NUM + fmt_bytes(sizes.get("other_fp32")), ""],
        ["model fp32", NUM + fmt_bytes(sizes.get("model_fp32")), ""],
        ["model quantized", NUM + fmt_bytes(m), _ratio(sizes.get("model_fp32"), m)],
    ]
    if budget_bytes:
        rows_t.append(
            ["byte budget", NUM + fmt_bytes(budget_bytes), f"{pct(q / budget_bytes)} used"]
        )
    out.append(table(["what", "bytes", "compression"], rows_t, id="table-sizes"))
    avg, budget = summary.get("average_bits"), summary.get("budget")
    if isinstance(avg, int | float) and isinstance(budget, int | float) and budget > 0:
        out.append(
            f"<p>Bit budget use: average {avg:.3f} bits of {budget:g} ({pct(avg / budget)}).</p>"
        )
    return "".join(out)
