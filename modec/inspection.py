"""``modec inspect``: what a model or a modec output contains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modec.errors import ModelError


def inspect_model(path: str) -> dict[str, Any]:
    """MoE layers (E, top-k, router, form, shapes, shared expert, attention) and totals."""
    from modec.frontend import input_specs, load_onnx
    from modec.moe.attention import find_attention
    from modec.moe.canonical import canonicalize_moe
    from modec.moe.describe import describe_region
    from modec.moe.discover import find_moe

    model = load_onnx(path)  # weights in external data stay on disk
    specs = input_specs(model)
    regions = find_moe(model)
    layers = [describe_region(r) for r in regions]
    total = sum(
        int(v.const_value.size)
        for v in model.graph.initializers.values()
        if v.const_value is not None
    )
    experts = sum(int(x["expert_parameters"]) for x in layers)  # type: ignore[call-overload]
    if regions:
        canonicalize_moe(model, regions)
        for layer, tap in zip(layers, find_attention(model), strict=True):
            layer["attention"] = (
                None
                if tap is None
                else {"kind": tap.kind, "node": tap.node.name,
                      "value": tap.probs.name if tap.probs is not None else None}
            )  # fmt: skip
    return {
        "kind": "model",
        "path": path,
        "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in
                   specs],
        "moe_layers": layers,
        "num_moe_layers": len(layers),
        "num_experts": sum(int(x["num_experts"]) for x in layers),  # type: ignore[call-overload]
        "parameters": {"total": total, "experts": experts, "other": total - experts,
                       "expert_share": experts / total if total else 0.0},
    }  # fmt: skip


def inspect_output(path: Path) -> dict[str, Any]:
    """A modec output directory: allocation, sizes, passes."""
    from modec.output import ALLOCATION_FILE, REPORT_FILE

    try:
        report = json.loads((path / REPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable {REPORT_FILE} ({exc}); recompile") from exc
    alloc = None
    if (path / ALLOCATION_FILE).exists():
        alloc = json.loads((path / ALLOCATION_FILE).read_text())
    return {
        "kind": "output",
        "path": str(path),
        "pipeline": report.get("pipeline"),
        "passes": [{"name": p["name"], "seconds": p["seconds"]} for p in report["passes"]],
        "allocation": alloc,
        "summary": report.get("summary"),
        "files": sorted(p.name for p in path.iterdir()),
    }


def inspect_path(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        return inspect_output(p)
    return inspect_model(path)


def format_info(info: dict[str, Any]) -> str:
    if info["kind"] == "output":
        lines = [f"modec output {info['path']}", f"  pipeline  {info['pipeline']}"]
        alloc = info.get("allocation")
        if alloc:
            lines.append(f"  method    {alloc['method']} at {alloc['budget']} bits")
            for i, w in enumerate(alloc["widths"]):
                lines.append(f"  layer {i:<3} widths {' '.join(str(b) for b in w)}")
        lines.append(f"  files     {', '.join(info['files'])}")
        return "\n".join(lines)
    par = info["parameters"]
    lines = [
        f"{info['path']}: {info['num_moe_layers']} MoE layer(s), {info['num_experts']} experts",
        f"  parameters {par['total']:,} total, {par['experts']:,} in experts "
        f"({100 * par['expert_share']:.1f}%)",
    ]
    for x in info["moe_layers"]:
        r = x["router"]
        att = x.get("attention")
        shapes = ", ".join(f"{k} {v}" for k, v in x["weights"].items())
        lines.append(
            f"  [{x['index']}] {x['name']}: E={x['num_experts']} top-{x['top_k']} "
            f"{r['scoring']}{' renorm' if r['norm_topk_prob'] else ''} | {x['form']} "
            f"({x['gate_layout']}, {x['activation']}) | {shapes} | shared: "
            f"{'yes' if x['shared_expert'] else 'no'} | attention: "
            f"{att['kind'] + ' ' + str(att['value']) if att else 'not found'}"
        )
    return "\n".join(lines)
