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
4. ``act_bits=8`` (``--dense-act-bits 8``): the activation each quantized matmul reads is
   rounded to int8 per group of ``group_size`` along K, once per activation (the query,
   key and value projections share theirs), in standard ONNX operators
   (`modec.method.dense.int8_rows`); the artifact multiplies the int8 codes by the weights'
   codes (`modec.kernels.grouped_moe_a8.dense_primfunc`, AVX-512 VNNI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_ir as ir

from modec.defaults import DENSE_BITS, GROUP_SIZE
from modec.errors import BadInputError
from modec.facts import CanonicalMoE, QuantizedDense
from modec.numerics.activations import ACT_BITS
from modec.pipeline import Pass, PassContext, PassResult, register

if TYPE_CHECKING:
    from modec.method.dense import DenseWeight

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
    #: 8: the quantized matmuls take int8 activations per group (rule 4); 0: float32.
    act_bits: int = 0

    def __post_init__(self) -> None:
        if self.width not in DENSE_BITS:
            raise BadInputError(f"--dense-bits {self.width}: choose one of {list(DENSE_BITS)}")
        if self.act_bits not in (0, *ACT_BITS):
            raise BadInputError(
                f"quantize-dense act_bits={self.act_bits}: the dense int8 kernels take 8; "
                "use 8, or 0 for float32 activations"
            )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.method.dense import dense_weights, dequantized_dense, weight_rows
        from modec.numerics.quant import quantize_rtn
        from modec.numerics.schemes import QuantScheme

        scheme = QuantScheme(self.width, self.group_size)
        found = dense_weights(model)
        result = QuantizedDense(self.width, self.group_size, act_bits=self.act_bits)
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
        if self.act_bits:
            self._round_inputs(model, found, result)
        if not found:
            log.warning("quantize-dense: no dense matmul weight in the text decoder")
        ctx.facts.put(result)
        ctx.stat("dense_weights", len(found))
        ctx.section().update(
            bits=self.width, group_size=self.group_size, weights=rows,
            bytes_before=before, bytes_after=after, act_bits=self.act_bits,
            int8_inputs=len(result.act_inputs),
        )  # fmt: skip
        return PassResult(model, modified=bool(found))

    def _round_inputs(
        self, model: ir.Model, found: list[DenseWeight], result: QuantizedDense
    ) -> None:
        """Rule 4: each distinct activation of the quantized matmuls, rounded once, read by
        all of them."""
        from modec.method.dense import int8_rows

        opset = model.opset_imports.get("", 1)
        readers: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
        for dw in found:
            assert dw.value.name is not None
            k = int(result.weights[dw.value.name].q.shape[1])
            for mm in dw.matmuls:
                x = mm.inputs[0]
                assert x is not None  # dense_weights keeps matmuls with an activation
                readers.setdefault(x, []).append((mm, k))
        for x, uses in readers.items():
            (k,) = {kk for _, kk in uses}
            graph = x.graph or model.graph
            rounded, nodes = int8_rows(graph, x, k, self.group_size, opset)
            for mm, _ in uses:
                mm.replace_input_with(0, rounded)
            assert rounded.name is not None and x.name is not None
            result.act_inputs[rounded.name] = x.name
            result.act_nodes.update(n.name for n in nodes if n.name is not None)
