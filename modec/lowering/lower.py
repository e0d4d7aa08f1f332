"""Lower a canonical, quantized MoE model into a modec artifact (model.so + weights).

`lower_model` is the whole of lower-tvm without the pass plumbing, so that the pass, the
benchmarks and the tests call one function:

1. `modec.kernels.target.check_target` refuses a target modec cannot build for.
2. `modec.lowering.moe_plan.plan_layers` groups every MoE layer's experts by width and
   declares their packed weights (packed when written); `modec.lowering.moe.MoELowering`
   turns each ``ai.modec::MoE`` node into the mixed-precision Relax of the grouped kernels.
3. `lowering_proto` gives the graph the importer reads and the dense weights, unread;
   `modec.lowering.build.build_artifact` imports the rest of the graph (dense ops, computed
   in fp32), compiles it and writes the artifact with the ``moe`` and ``pipeline`` manifest
   sections.

Memory (issue #15): no weight is read before the artifact is written. Each dense weight is
a `modec.moe.lazy.LazyArray` over the model's tensor (memory-mapped external data for a
model loaded from disk), declared to the importer by shape and dtype only, and read once,
one tensor at a time, when ``weights.safetensors`` is written (copied out of the map, which
is released at once); the packed experts are packed from the quantized codes the same
way, each expert's mapped codes handed back (`modec.pages.release`) once packed. lower-tvm
itself then holds one tensor at a time, whatever the number of layers. A model
stored in fp16/bf16 keeps its dense weights in that dtype in the artifact (the bytes of the
source); the compiled graph casts them to float32 where it reads them, and the scheduled
projections read them as stored. An fp32 model's artifact is what it was before this scheme.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modec.artifact import Manifest
from modec.facts import QuantizedDense, QuantizedExperts
from modec.kernels.target import check_target, is_cuda, resolve_target
from modec.lowering.build import build_artifact
from modec.lowering.decode_entry import add_decode_entry, generation_section
from modec.lowering.dense import DenseModule
from modec.lowering.kv_in_place import cache_in_place
from modec.lowering.moe import MoELowering
from modec.lowering.moe_plan import moe_section, plan_layers
from modec.moe import lazy
from modec.moe.lazy import LazyArray
from modec.moe.reference import INPUT_NAMES

__all__ = ["LoweringResult", "lower_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoweringResult:
    """What `lower_model` wrote and the counters the lower-tvm pass reports.

    Attributes:
        manifest: the written artifact's manifest.
        moe_layers: MoE layers lowered.
        moe_kernel_launches: grouped-kernel launches over all layers (one per width group
            and projection).
        params: number of parameters in the artifact.
        packed_expert_bytes: bytes of the packed experts (codes, scales and zeros).
    """

    manifest: Manifest
    moe_layers: int
    moe_kernel_launches: int
    params: int
    packed_expert_bytes: int


def lowering_proto(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, LazyArray]]:
    """The model as the Relax importer reads it, and its dense weights, none of them read.

    - Each MoE node's expert weights (gate, up, down) are left out: the grouped kernels read
      the packed codes, and the fp32 stacks (four bytes per weight, every layer) would not
      fit in memory or in one protobuf message at paper scale. The node keeps empty inputs
      in their slots.
    - The dense weights — float initializers of at least `WEIGHT_MIN_BYTES` bytes — stay
      in the proto as references without data (`modec.executor.weightless_proto`); the
      returned map holds their values as `LazyArray` s over the model's tensors (nothing is
      read: an external tensor is mapped when the artifact writer reads it), for
      `modec.lowering.onnx_import.import_onnx`'s ``weights``.
    - Every other initializer is inline (read once from external data if it lives there).
    - A model stored in fp16/bf16 is lowered in float32 (`modec.executor.upcast_float16`):
      the dense kernels are float32, as the analysis measured them. Its dense weights keep
      their stored dtype (``import_onnx(..., upcast=True)`` casts them where they are read);
      the smaller initializers become float32.
    """
    from modec.executor import upcast_float16, weightless_proto

    dropped = _expert_stacks(model)
    proto = weightless_proto(model)
    for node in proto.graph.node:
        if node.domain == "ai.modec" and node.op_type == "MoE":
            for i in _EXPERT_SLOTS:
                if i < len(node.input) and node.input[i] in dropped:
                    node.input[i] = ""
    values = model.graph.initializers
    half = False
    kept: list[onnx.TensorProto] = []
    weights: dict[str, LazyArray] = {}
    for t in proto.graph.initializer:
        if t.name in dropped:
            continue
        src = values[t.name].const_value
        assert src is not None
        if t.data_type in _FLOATS and t.dims and src.nbytes >= WEIGHT_MIN_BYTES:
            weights[t.name] = _read_when_written(src)
        elif t.data_location == onnx.TensorProto.EXTERNAL:
            t = ir.serde.serialize_tensor(ir.tensor(np.asarray(src.numpy()), name=t.name))
        half = half or t.data_type in _HALF
        kept.append(t)
    del proto.graph.initializer[:]
    if half:
        # The weights stay as stored: upcast the graph without them, then put them back.
        proto.graph.initializer.extend(t for t in kept if t.name not in weights)
        upcast_float16(proto)
        upcast = {t.name: t for t in proto.graph.initializer}
        kept = [t if t.name in weights else upcast[t.name] for t in kept]
        del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto, weights


def dense_section(dense: QuantizedDense) -> dict[str, Any]:
    """The manifest's ``dense`` section: the quantized dense weights and their packed bytes."""
    weights = {}
    for name, qw in dense.weights.items():
        n, k = (int(d) for d in qw.q.shape)
        weights[name] = {"n": n, "k": k, "bytes": sum(qw.scheme.nbytes(n, k).values())}
    return {"bits": dense.bits, "group_size": dense.group_size, "layout": "n16k32",
            "act_bits": dense.act_bits, "weights": weights}  # fmt: skip


def _read_when_written(src: ir.TensorProtocol) -> LazyArray:
    """``src``'s value as a `LazyArray` that copies it out of the source and releases the
    source's memory map at once: the writer then holds one weight at a time, not the mapped
    pages of every weight written so far."""
    value = lazy.source(src)

    def read() -> np.ndarray:
        with lazy.reading([src]):
            return np.array(value.numpy(), copy=True)

    return lazy.computed(value.shape, value.dtype, read)


#: Smallest dense weight (bytes) declared rather than read: smaller float initializers are
#: read into the proto (and made float32 in a 16-bit model), since some frontend converters
#: need their values (Resize scales, OneHot values, Pad's constant). The same bound as
#: `modec.executor.weightless_proto`'s, below which initializers stay inline.
WEIGHT_MIN_BYTES = 4096

_FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})
_HALF = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})

#: Input slots of the expert stacks on a canonical MoE node (docs/ir.md).
_EXPERT_SLOTS = tuple(INPUT_NAMES.index(n) for n in ("gate", "up", "down"))


def _expert_stacks(model: ir.Model) -> set[str]:
    """Names of the MoE nodes' expert weight stacks (gate, up, down)."""
    from modec.moe.canonical import is_moe_node

    return {
        str(v.name)
        for n in model.graph
        if is_moe_node(n)
        for i in _EXPERT_SLOTS
        if i < len(n.inputs) and (v := n.inputs[i]) is not None and v.const_value is not None
    }


def lower_model(
    model: ir.Model,
    quantized: QuantizedExperts,
    out_dir: str | os.PathLike[str],
    target: str,
    *,
    pipeline: Mapping[str, str],
    step: Callable[[str], None] | None = None,
    dense: QuantizedDense | None = None,
) -> LoweringResult:
    """Compile the canonical model with its quantized experts into an artifact directory.

    Args:
        model: the canonical model (MoE layers are ``ai.modec::MoE`` nodes); not modified.
        quantized: the codes of every expert projection, one width per expert.
        out_dir: the artifact directory (written atomically).
        target: ``llvm`` (this CPU) or a CUDA target (``cuda``: fp16 expert kernels).
        pipeline: the manifest's ``pipeline`` section (e.g. the pipeline text and the
            lower-tvm options), recorded as given.
        step: called with the name of each `modec.lowering.build.BUILD_STEPS` phase once
            it is done (progress bars).
        dense: the dense weights quantize-dense quantized, lowered to dequant-matmul
            kernels (`modec.lowering.dense_quant`); None: every dense weight as stored.

    Returns:
        The manifest and the lowering counters.

    Raises:
        UsageError: the target is not one modec builds for.
        ModelError: the quantized experts do not match the model's MoE layers, or an op
            cannot be imported.
    """
    check_target(target)
    plans = plan_layers(model, quantized)
    lowering = MoELowering(plans, target)
    proto, weights = lowering_proto(model)
    lowering.omitted_weights = len(_expert_stacks(model))
    moe = moe_section(plans)
    sections: dict[str, Any] = {"moe": moe, "pipeline": dict(pipeline)}
    converters: dict[str, Any] = {"MoE": lowering.convert}
    if dense is not None and dense.weights:
        from modec.lowering.dense_quant import OP, DenseQLowering, replace_matmuls

        lowering.omitted_weights += replace_matmuls(proto, weights, dense)
        converters[OP] = DenseQLowering(dense, lowering.new_param, target).convert
        sections["dense"] = dense_section(dense)

    def decode_entry(dm: DenseModule) -> DenseModule:
        # After the MoE kernels are in main, so that decode calls the same ones. Sections are
        # written after the hooks: the generation section goes in here (cache models only).
        dm, entry = add_decode_entry(dm)
        in_place = None
        if not is_cuda(resolve_target(target)):  # CUDA: the concatenating decode (kv_in_place)
            dm, in_place = cache_in_place(dm, entry)
        section = generation_section(dm, entry, in_place)
        if section is not None:
            sections["generation"] = section
        return dm

    manifest = build_artifact(
        proto,
        Path(out_dir),
        target,
        hooks=[lowering.add_params, decode_entry],
        op_converters=converters,
        sections=sections,
        step=step,
        weights=weights,
        upcast=True,
    )
    launches = sum(len(k) for k in lowering.kernels)
    packed = sum(
        b for layer in moe["layers"] for g in layer["groups"]
        for sizes in g["bytes"].values() for b in sizes.values()
    )  # fmt: skip
    logger.info("lower-tvm: wrote %s (%d MoE kernel launches)", out_dir, launches)
    return LoweringResult(
        manifest=manifest,
        moe_layers=len(plans),
        moe_kernel_launches=launches,
        params=len(manifest.params),
        packed_expert_bytes=packed,
    )
