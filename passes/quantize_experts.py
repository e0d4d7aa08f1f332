"""quantize-experts: GPTQ every routed expert at its allocated width (MODE step 5).

Reads: `CanonicalMoE`, `BitAllocation`, `Calibration` (for the input Hessians). Writes:
`QuantizedExperts`. Modifies: the expert weights of each canonical MoE node become their
dequantized values (computed from the codes when read: `dequantized_tensor`), so the graph
is the simulated-quantization model (run it with the
executor to measure accuracy without kernels). The quantizer lives in
`modec.method.quantize`.

Rules:
1. gate and up use H_in = Σ x xᵀ of the tokens routed to the expert; down uses
   H_act = Σ a aᵀ of the activations a = act(x·gateᵀ)·(x·upᵀ) (GPTQ, Frantar et al. 2022).
   The calibration set streams through the full-precision model one layer at a time
   (`modec.method.hessians`, batched as collect-routing batches it): a layer is quantized
   as soon as its Hessians are complete, so only one layer's Hessians are ever held.
2. Group-wise asymmetric at ``group_size``, dampening ``percdamp``, block size ``blocksize``.
3. An expert with fewer than ``min_tokens`` routed tokens, or whose Hessian cannot be
   factorised, falls back to round-to-nearest; each fallback is logged and listed in the
   report with its reason. ``method=rtn`` quantizes every expert with RTN.
4. The router, biases, shared expert and vision tower are never quantized.
5. ``act_bits=8`` (``--expert-act-bits 8``): every MoE node gets the attributes
   ``act_bits`` and ``act_group_size`` (the weights' group size), and its routed experts
   then take their inputs as int8 per group, in the simulated model
   (`modec.moe.reference.expert_input`) and in the kernels (`modec.kernels.grouped_moe_a8`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import onnx_ir as ir

from modec.defaults import GROUP_SIZE
from modec.errors import BadInputError
from modec.facts import BitAllocation, Calibration, CanonicalMoE, QuantizedExperts
from modec.numerics.activations import ACT_BITS
from modec.numerics.quant import QuantizedWeight
from modec.pipeline import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


@register
@dataclass
class QuantizeExpertsPass(Pass):
    """Quantize every routed expert at its width; see the module docstring."""

    name = "quantize-experts"
    reads = (CanonicalMoE, BitAllocation, Calibration)
    writes = (QuantizedExperts,)
    group_size: int = GROUP_SIZE
    method: Literal["gptq", "rtn"] = "gptq"
    min_tokens: int = 32
    percdamp: float = 0.01
    blocksize: int = 128
    #: calibration batch size of the Hessian run (collect-routing's, for identical sums).
    batch_size: int = 16
    #: 8: the routed experts take int8 activations (rule 5); 0: float32.
    act_bits: int = 0

    def __post_init__(self) -> None:
        if self.act_bits not in (0, *ACT_BITS):
            raise BadInputError(
                f"quantize-experts act_bits={self.act_bits}; the expert kernels take 8 (int8) "
                "or 0 (float32) activations"
            )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.method.hessians import layer_hessians
        from modec.method.quantize import (
            GPTQSettings,
            LayerHessians,
            dequantized_tensor,
            expert_weights,
            quantize_projection,
            spill_codes,
        )
        from modec.moe.canonical import is_moe_node

        alloc = ctx.facts.get(BitAllocation)
        ds = ctx.facts.get(Calibration).data
        nodes = [n for n in model.graph if is_moe_node(n)]
        if len(nodes) != len(alloc.widths):
            raise BadInputError(
                f"the allocation covers {len(alloc.widths)} MoE layers but the model has "
                f"{len(nodes)}; re-run allocate-bits on this model"
            )
        if alloc.group_size != self.group_size:
            raise BadInputError(
                f"allocate-bits sized the experts for group_size={alloc.group_size} but "
                f"quantize-experts has group_size={self.group_size}; give both the same"
            )
        settings = GPTQSettings(self.min_tokens, self.percdamp, self.blocksize)
        result = QuantizedExperts(self.group_size, alloc.widths)
        experts_report: list[list[dict[str, object]]] = []
        fallbacks = 0
        total = sum(len(w) for w in alloc.widths)
        # The bar counts (expert, projection) pairs: it moves during a layer's GPTQ.
        steps = sum(len(w) * len(expert_weights(n)) for w, n in zip(alloc.widths, nodes,
                                                                   strict=True))  # fmt: skip
        o = ctx.options
        # GPTQ: each layer's Hessians and fp32 weights (read once, by the Hessian run).
        hessians: Iterable[tuple[int, LayerHessians | None, Any]]
        if self.method == "gptq":
            hessians = layer_hessians(
                model, ds, batch_size=self.batch_size, threads=o.threads,
                max_memory=o.max_memory, spill_dir=o.spill_dir,
            )  # fmt: skip
        else:
            hessians = ((layer, None, None) for layer in range(len(nodes)))
        with ctx.bar(steps, f"{self.method.upper()} expert projections") as bar:
            for layer, hs, params in hessians:
                node = nodes[layer]
                per_proj: dict[str, list[QuantizedWeight]] = {}
                rows: list[dict[str, object]] = [{} for _ in alloc.widths[layer]]
                for proj, value in expert_weights(node).items():
                    assert value.const_value is not None
                    fp32 = value.const_value.numpy() if params is None else getattr(params, proj)
                    res = quantize_projection(
                        fp32, alloc.widths[layer], self.group_size,
                        method=self.method,
                        hessians=None if hs is None else (hs.h_act if proj == "down" else hs.h_in),
                        tokens=None if hs is None else hs.tokens,
                        settings=settings, label=f"layer {layer} {proj}",
                        tick=lambda: bar.update(1), engine=ctx.engine,
                    )  # fmt: skip
                    for e, entry in enumerate(res.entries):
                        rows[e][proj] = entry
                        rows[e]["bits"] = int(alloc.widths[layer][e])
                        if hs is not None:
                            rows[e]["tokens"] = int(hs.tokens[e])
                    codes = spill_codes(res.codes, o.spill_dir)
                    value.const_value = dequantized_tensor(codes, value.name)
                    per_proj[proj] = codes
                    del fp32, res
                for e, row in enumerate(rows):
                    if any(isinstance(v, dict) and v.get("method") == "rtn" for v in row.values()):
                        fallbacks += self.method != "rtn"
                    row["expert"] = e
                if self.act_bits:
                    node.attributes["act_bits"] = ir.AttrInt64("act_bits", self.act_bits)
                    node.attributes["act_group_size"] = ir.AttrInt64(
                        "act_group_size", self.group_size
                    )
                result.layers.append(per_proj)
                experts_report.append(rows)
                del hs, params  # before the next layer's Hessians are built
        ctx.facts.put(result)
        ctx.stat("experts", total)
        ctx.stat("rtn_fallbacks", fallbacks)
        ctx.section().update(
            method=self.method, group_size=self.group_size, layers=experts_report,
            fallbacks=fallbacks, act_bits=self.act_bits,
        )  # fmt: skip
        return PassResult(model, modified=True)
