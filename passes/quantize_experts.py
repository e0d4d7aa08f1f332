"""quantize-experts: GPTQ every routed expert at its allocated width.

Reads: ``moe.canonical``, ``allocation``, ``routing.stats`` (the input Hessians). Writes:
``quantized`` (``ctx.artifacts["quantized"]``: `QuantizedExperts`). Modifies: the expert
weights of each canonical MoE node become their dequantized values, so the graph is the
simulated-quantization model (run it with the executor to measure accuracy without kernels).

Rules:
1. gate and up use H_in = Σ x xᵀ of the tokens routed to the expert; down uses
   H_act = Σ a aᵀ of the activations a = act(x·gateᵀ)·(x·upᵀ) (GPTQ, Frantar et al. 2022).
2. Group-wise asymmetric at ``group_size`` (128), dampening 0.01, block size 128.
3. An expert with fewer than ``min_tokens`` routed tokens, or whose Hessian cannot be
   factorised, falls back to round-to-nearest; each fallback is logged and listed in the
   report with its reason. ``method=rtn`` quantizes every expert with RTN.
4. The router, biases, shared expert and vision tower are never quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from modec.errors import BadInputError
from modec.numerics.quant import QuantizedWeight
from modec.pipeline import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)

PROJECTIONS = ("gate", "up", "down")
_INPUT_INDEX = {"gate": 3, "up": 4, "down": 5}


@dataclass(frozen=True, eq=False)
class QuantizedExperts:
    """Codes of every expert projection: ``layers[l][proj][e]`` (None when absent)."""

    group_size: int
    widths: tuple[tuple[int, ...], ...]
    layers: list[dict[str, list[QuantizedWeight]]] = field(default_factory=list)


@register
@dataclass
class QuantizeExpertsPass(Pass):
    """Quantize every routed expert at its width; see the module docstring."""

    name = "quantize-experts"
    reads = ("moe.canonical", "allocation", "routing.stats")
    writes = ("quantized",)
    group_size: int = 128
    method: Literal["gptq", "rtn"] = "gptq"
    min_tokens: int = 32
    percdamp: float = 0.01
    blocksize: int = 128

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.moe.canonical import is_moe_node
        from modec.numerics.gptq import gptq_quantize
        from modec.numerics.quant import quantize_rtn
        from modec.numerics.schemes import QuantScheme

        alloc = ctx.artifacts["allocation"]
        stats = ctx.artifacts["routing.stats"]
        nodes = [n for n in model.graph if is_moe_node(n)]
        if len(nodes) != len(alloc.widths):
            raise BadInputError(
                f"the allocation covers {len(alloc.widths)} MoE layers but the model has "
                f"{len(nodes)}; re-run allocate-bits on this model"
            )
        result = QuantizedExperts(self.group_size, alloc.widths)
        experts_report: list[list[dict[str, object]]] = []
        fallbacks = 0
        total = sum(len(w) for w in alloc.widths)
        with ctx.bar(total, "GPTQ experts") as bar:
            for layer, node in enumerate(nodes):
                per_proj: dict[str, list[QuantizedWeight]] = {}
                rows: list[dict[str, object]] = [{} for _ in alloc.widths[layer]]
                for proj in PROJECTIONS:
                    value = node.inputs[_INPUT_INDEX[proj]]
                    if value is None or value.const_value is None:
                        continue
                    stacked = np.asarray(value.const_value.numpy(), dtype=np.float32)
                    deq = np.empty_like(stacked)
                    codes: list[QuantizedWeight] = []
                    for e, width in enumerate(alloc.widths[layer]):
                        scheme = QuantScheme(int(width), self.group_size)
                        h = (
                            stats.hessian_act[layer][e]
                            if proj == "down"
                            else stats.hessian_in[layer][e]
                        )
                        n_tok = int(stats.tokens[layer][e])
                        if self.method == "rtn":
                            qw = quantize_rtn(stacked[e], scheme)
                            deq[e] = qw.dequantize()
                            entry: dict[str, object] = {"method": "rtn", "reason": "method=rtn"}
                        else:
                            res = gptq_quantize(
                                stacked[e], h, scheme, n_tokens=n_tok, min_tokens=self.min_tokens,
                                percdamp=self.percdamp, blocksize=self.blocksize,
                                name=f"layer {layer} expert {e} {proj}",
                            )  # fmt: skip
                            qw, deq[e] = res.qweight, res.dequantized
                            entry = {
                                "method": res.method,
                                "reason": res.fallback_reason,
                                "loss": res.loss,
                                "output_mse": res.output_mse,
                            }
                        codes.append(qw)
                        rows[e][proj] = entry
                        rows[e]["bits"] = int(width)
                        rows[e]["tokens"] = n_tok
                    value.const_value = ir.tensor(deq, name=value.name)
                    per_proj[proj] = codes
                for e, row in enumerate(rows):
                    if any(isinstance(v, dict) and v.get("method") == "rtn" for v in row.values()):
                        fallbacks += self.method != "rtn"
                    bar.update(1)
                    row["expert"] = e
                result.layers.append(per_proj)
                experts_report.append(rows)
        ctx.artifacts["quantized"] = result
        ctx.stat("experts", total)
        ctx.stat("rtn_fallbacks", fallbacks)
        ctx.section().update(
            method=self.method, group_size=self.group_size, layers=experts_report,
            fallbacks=fallbacks,
        )  # fmt: skip
        return PassResult(model, modified=True)
