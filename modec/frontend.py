"""Frontends: everything that enters modec becomes one in-memory onnx-ir graph here.

- ONNX files: `load_onnx` reads (external data too), checks and shape-infers, turning each
  failure into a one-line `ModelError` that names the file and the cause.
- PyTorch modules: `from_torch` exports with ``torch.onnx.export`` (dynamo) and then
  continues as for an ONNX file.
- Local Hugging Face model directories: `modec.hf` checks, loads and exports them (the CLI
  and the driver take a directory wherever they take an ``.onnx``); `from_hf_dir` is the
  same export followed by `load_onnx`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from modec.data import InputSpec
from modec.errors import ModelError

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

#: protobuf's limit on one serialized message (a larger model keeps weights outside).
PROTO_LIMIT = 2**31 - 1

#: ONNX tensor element types modec handles, as numpy dtype names.
ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def load_onnx_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read, check and shape-infer an ONNX file; raise `ModelError` with one line on failure."""
    p = str(path)
    if not os.path.exists(p):
        raise ModelError(f"{p}: no such model file; pass the path of an .onnx file")
    if os.path.isdir(p):
        raise ModelError(
            f"{p}: is a directory; pass an .onnx file or a Hugging Face model directory "
            "(config.json + *.safetensors) to modec compile / inspect"
        )
    try:
        proto = onnx.load(p, load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError… by case
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{p}: not a readable ONNX model ({type(exc).__name__}: {cause}); the file is "
            "truncated or not ONNX: re-export it"
        ) from exc
    if not proto.graph.node:
        raise ModelError(f"{p}: not a readable ONNX model (the graph has no nodes); re-export it")
    # A model over protobuf's 2 GiB limit (weights in external data) is checked from its file
    # and not shape-inferred (onnx can do neither in memory past the limit).
    large = proto.ByteSize() >= PROTO_LIMIT
    try:
        onnx.checker.check_model(p if large else proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        cause = str(exc).strip().splitlines()[0]
        raise ModelError(f"{p}: fails the ONNX checker ({cause}); re-export the model") from exc
    if large:
        log.info("%s: over 2 GiB; skipping shape inference", p)
        return proto
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # inference is best-effort: log, keep the unannotated model
        log.warning("%s: shape inference failed (%s); continuing without inferred shapes", p, exc)
    return proto


def load_onnx(path: str | os.PathLike[str]) -> ir.Model:
    """The onnx-ir model of an ONNX file (see `load_onnx_proto` for the checks)."""
    return ir.serde.deserialize_model(load_onnx_proto(path))


def input_specs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, with dtype and shape (str = symbolic)."""
    inits = {i.name for i in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(
            InputSpec(vi.name, ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), tuple(dims))
        )
    return specs


def ort_session(
    model: str | os.PathLike[str] | bytes, threads: int = 2
) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session with a fixed thread count (deterministic and comparable)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _has_custom_ops(proto: onnx.ModelProto) -> bool:
    return any(n.domain == "ai.modec" for n in proto.graph.node)


class OrtRunner:
    """Runs an ONNX file in onnxruntime; ``run(feeds)`` returns the first output."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 2) -> None:
        self.path = str(path)
        proto = load_onnx_proto(path)
        self.inputs = input_specs(proto)
        self.output = proto.graph.output[0].name
        self.proto = proto
        # From the file: it reads external data beside it, and a model past 2 GiB cannot be
        # serialized back into one message.
        self.session = None if _has_custom_ops(proto) else ort_session(self.path, threads)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.session is None:
            raise ModelError(
                f"{self.path}: holds ai.modec nodes that onnxruntime cannot run; run it with "
                "modec's executor (modec eval picks it automatically)"
            )
        out = self.session.run([self.output], feeds)[0]
        return np.asarray(out)


def from_torch(
    module: Any,
    example_inputs: tuple[Any, ...],
    path: str | os.PathLike[str],
    input_names: list[str],
    dynamic_shapes: dict[str, Any] | None = None,
    opset: int = 18,
    kwargs: dict[str, Any] | None = None,
) -> ir.Model:
    """Export an ``nn.Module`` with the dynamo exporter to ``path`` and load it back.

    Hugging Face MoE models must use ``experts_implementation="batched_mm"``
    (`from_hf_dir` sets it); other expert implementations do not export faithfully.
    """
    import torch

    try:
        prog = torch.onnx.export(
            module,
            example_inputs,
            kwargs=kwargs,
            input_names=input_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
        )
    except Exception as exc:
        raise ModelError(
            f"torch.onnx.export failed for {type(module).__name__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); export "
            "the model to ONNX yourself and pass the file"
        ) from exc
    assert prog is not None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prog.save(str(path))
    return load_onnx(path)


def from_hf_dir(
    directory: str | os.PathLike[str], path: str | os.PathLike[str], seq_len: int = 8
) -> ir.Model:
    """Export a local Hugging Face model directory to ``path`` and load it (`modec.hf`).

    Only local directories are accepted: modec never downloads. The model is loaded with
    ``experts_implementation="batched_mm"`` so its experts export as stacked gathers.
    ``seq_len`` is kept for callers; the sample length no longer matters (dynamic axes).
    """
    from modec import hf

    del seq_len
    hf.export_onnx(directory, path)
    return load_onnx(path)
