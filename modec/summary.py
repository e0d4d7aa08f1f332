"""The end-of-compile summary: sizes, widths, timings, accuracy (also stored in the report)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from modec.facts import BitAllocation, QuantizedDense
from modec.pipeline import PassRecord


def size_summary(
    model: ir.Model,
    widths: tuple[tuple[int, ...], ...],
    group_size: int,
    dense: QuantizedDense | None = None,
) -> dict[str, int]:
    """Bytes of the expert weights (fp32, fp16, quantized: codes + scales + zeros) and the
    rest; with ``dense`` (quantize-dense), the dense weights it quantized count at their
    packed size in ``model_quantized`` (``dense_fp32`` / ``dense_quantized``)."""
    from modec.moe.canonical import is_moe_node
    from modec.moe.reference import MoEParams
    from modec.numerics.schemes import QuantScheme

    expert_params = codes = scales = zeros = 0
    expert_names: set[str] = set()
    for layer, node in enumerate(n for n in model.graph if is_moe_node(n)):
        p = MoEParams.from_node(node)
        for idx, w in ((3, p.gate), (4, p.up), (5, p.down)):
            if w is None:
                continue
            v = node.inputs[idx]
            if v is not None and v.name:
                expert_names.add(v.name)
            expert_params += int(w.size)
            for e in range(w.shape[0]):
                b = QuantScheme(int(widths[layer][e]), group_size).nbytes(w.shape[1], w.shape[2])
                codes, scales, zeros = codes + b["codes"], scales + b["scales"], zeros + b["zeros"]
    other = sum(
        int(v.const_value.nbytes)
        for name, v in model.graph.initializers.items()
        if v.const_value is not None and name not in expert_names
    )
    dense_fp32 = dense_packed = 0
    if dense is not None:
        for qw in dense.weights.values():
            n, k = (int(d) for d in qw.q.shape)
            dense_fp32 += 4 * n * k
            dense_packed += sum(qw.scheme.nbytes(n, k).values())
    return {
        "expert_params": expert_params,
        "experts_fp32": 4 * expert_params,
        "experts_fp16": 2 * expert_params,
        "experts_codes": codes,
        "experts_scales": scales,
        "experts_zeros": zeros,
        "experts_quantized": codes + scales + zeros,
        "other_fp32": other,
        "model_fp32": 4 * expert_params + other,
        "model_quantized": codes + scales + zeros + other - dense_fp32 + dense_packed,
        "dense_fp32": dense_fp32,
        "dense_quantized": dense_packed,
    }


def summarize(
    out: str,
    model: ir.Model,
    alloc: BitAllocation,
    records: list[PassRecord],
    report: str,
    dense: QuantizedDense | None = None,
) -> dict[str, Any]:
    """The summary of one compile (``accuracy`` is added when the compile evaluated)."""
    return {
        "out": out,
        "method": alloc.method,
        "budget": alloc.budget,
        "average_bits": alloc.average,
        "histogram": {str(k): v for k, v in alloc.histogram().items()},
        "sizes": size_summary(model, alloc.widths, alloc.group_size, dense),
        "seconds": {r.name: round(r.seconds, 2) for r in records},
        "report": report,
    }


def format_summary(s: dict[str, Any]) -> str:
    """One screen for the terminal."""
    mib = 2**20
    z = s["sizes"]
    hist = "  ".join(f"{b}-bit: {n}" for b, n in s["histogram"].items())
    lines = [
        f"modec compile: {s['method']} at {s['budget']} bits (average {s['average_bits']:.3f})",
        f"  widths        {hist}",
        f"  experts       {z['experts_fp32'] / mib:.2f} MiB fp32 -> "
        f"{z['experts_quantized'] / mib:.2f} MiB (codes {z['experts_codes'] / mib:.2f}, "
        f"scales {z['experts_scales'] / mib:.2f}, zeros {z['experts_zeros'] / mib:.2f})",
        *(
            [
                f"  dense         {z['dense_fp32'] / mib:.2f} MiB fp32 -> "
                f"{z['dense_quantized'] / mib:.2f} MiB (--dense-bits)"
            ]
            if z.get("dense_fp32")
            else []
        ),
        f"  model         {z['model_fp32'] / mib:.2f} MiB fp32 -> "
        f"{z['model_quantized'] / mib:.2f} MiB ({z['model_fp32'] / z['model_quantized']:.1f}x)",
        "  time          " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items()),
    ]
    acc = s.get("accuracy")
    if acc:
        for split in ("overall", "multimodal", "text_only"):
            a, b = acc["fp32"][split]["accuracy"], acc["quantized"][split]["accuracy"]
            lines.append(f"  {split:<13} fp32 {100 * a:6.2f}%  quantized {100 * b:6.2f}%")
    lines.append(f"  report        {s['report']}")
    return "\n".join(lines)
