"""quantize-dense: the text decoder's dense matmul weights at one width (``--dense-bits``).

Reads: `CanonicalMoE` (the experts are inside MoE nodes, so no expert weight is a matmul
weight here). Writes: `QuantizedDense`. Modifies: each quantized weight becomes its
dequantized value (float32, computed from the codes when read), so the graph stays the
simulated-quantization model.

Not part of MODE: MODE allocates the experts' widths; this pass puts the attention
projections and the output head (every dense matmul weight the token ids reach; rules in
`modec.method.dense`) at one width, so that a decode step does not read them in full
precision. Off unless asked for.

Rules:
1. Round-to-nearest, group-wise asymmetric at ``group_size`` along the reduction axis
   (the same codes, scales and zero points as the experts' RTN; no calibration).
2. The vision tower, the router, the embedding table, norms and biases stay as they are.
3. The report lists every weight quantized (shape, width) and the bytes before and after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir

from modec.defaults import DENSE_BITS, GROUP_SIZE
from modec.errors import BadInputError
from modec.facts import CanonicalMoE, QuantizedDense
from modec.pipeline import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


@register
@dataclass
class QuantizeDensePass(Pass):
    """Quantize the text decoder's dense matmul weights; see the module docstring."""

    name = "quantize-dense"
    reads = (CanonicalMoE,)
    writes = (QuantizedDense,)
    #: the width (named apart from the experts' ``bits``, an option the passes share)
    width: int = 8
    group_size: int = GROUP_SIZE

    def __post_init__(self) -> None:
        if self.width not in DENSE_BITS:
            raise BadInputError(f"--dense-bits {self.width}: choose one of {list(DENSE_BITS)}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.method.dense import dense_weights, dequantized_dense, weight_rows
        from modec.numerics.quant import quantize_rtn
        from modec.numerics.schemes import QuantScheme

        scheme = QuantScheme(self.width, self.group_size)
        found = dense_weights(model)
        result = QuantizedDense(self.width, self.group_size)
        rows: list[dict[str, object]] = []
        before = after = 0
        with ctx.bar(len(found), "dense weights") as bar:
            for dw in found:
                v = dw.value
                assert v.const_value is not None and v.name is not None
                stored = v.const_value.nbytes
                qw = quantize_rtn(weight_rows(v, dw.transposed), scheme)
                v.const_value = dequantized_dense(qw, dw.transposed, v.name)
                v.dtype = ir.DataType.FLOAT
                result.weights[v.name] = qw
                result.transposed[v.name] = dw.transposed
                n, k = qw.q.shape
                packed = sum(scheme.nbytes(n, k).values())
                before, after = before + stored, after + packed
                rows.append({"name": v.name, "shape": [n, k], "bits": self.width,
                             "matmuls": len(dw.matmuls)})  # fmt: skip
                bar.update(1)
        if not found:
            log.warning("quantize-dense: no dense matmul weight in the text decoder")
        ctx.facts.put(result)
        ctx.stat("dense_weights", len(found))
        ctx.section().update(
            bits=self.width, group_size=self.group_size, weights=rows,
            bytes_before=before, bytes_after=after,
        )  # fmt: skip
        return PassResult(model, modified=bool(found))
