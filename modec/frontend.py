"""Frontends: everything that enters modec becomes one in-memory onnx-ir graph here.

- ONNX files: `load_onnx` reads the graph (never the weights held in external data), checks
  it and shape-infers it, turning each failure into a one-line `ModelError` that names the
  file and the cause. Weights in external data stay on disk as `onnx_ir.ExternalTensor`s
  (memory-mapped when read; ``release()`` drops the mapping), so a model of any size loads
  in the memory its graph takes. `tensor_chunks` reads a weight a bounded chunk at a time.
- PyTorch modules: `from_torch` exports with ``torch.onnx.export`` (dynamo) and then
  continues as for an ONNX file.
- Local Hugging Face model directories: `modec.hf` checks, loads and exports them (the CLI
  and the driver take a directory wherever they take an ``.onnx``); `from_hf_dir` is the
  same export followed by `load_onnx`.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from modec import kv_cache
from modec.data import InputSpec
from modec.errors import ModelError

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

#: protobuf's limit on one serialized message (a larger model keeps weights outside).
PROTO_LIMIT = 2**31 - 1

#: Bytes of a weight `tensor_chunks` and `tensor_bytes` hand out at a time.
CHUNK_BYTES = 16 * 2**20

#: ONNX tensor element types modec handles, as numpy dtype names (``bfloat16`` is
#: ml_dtypes', registered with numpy by onnx / onnx-ir).
ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def load_onnx(path: str | os.PathLike[str]) -> ir.Model:
    """The onnx-ir model of an ONNX file, read, checked and shape-inferred (see `_read`).

    Weights held in external data become `onnx_ir.ExternalTensor`s resolved against the
    model's directory: nothing of them is read here (each is memory-mapped when first read;
    ``release()`` unmaps it; `tensor_chunks` reads one without mapping it). Weights inside
    the ``.onnx`` are in memory, as the file is.
    """
    proto, base_dir, external = _read(path)
    model = ir.serde.deserialize_model(proto)
    if external:
        ir.external_data.set_base_dir(model.graph, base_dir)
        for function in model.functions.values():
            ir.external_data.set_base_dir(function.graph, base_dir)
    return model


def load_onnx_proto(path: str | os.PathLike[str], *, external_data: bool = True) -> onnx.ModelProto:
    """The checked, shape-inferred ModelProto of an ONNX file; `ModelError` on failure.

    With ``external_data`` (the default) weights held in external data are read into the
    proto, as ``onnx.load`` does: that takes the whole model in memory, so a caller that
    needs the weights of a large model takes `load_onnx` instead. With
    ``external_data=False`` the proto is the graph alone: its external tensors still refer to
    their files, relative to the model's directory (onnxruntime resolves them from the path).
    """
    proto, base_dir, external = _read(path)
    if external and external_data:
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, base_dir)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{path}: cannot read its external data ({type(exc).__name__}: {exc}); "
                "copy the data files next to the model"
            ) from exc
    return proto


def _read(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, str, bool]:
    """Read an ONNX file without its external data, check it and shape-infer it.

    Returns the proto, the model's directory (absolute) and whether it holds external data.
    Every reference to external data is checked first (`_check_external_data`: file present,
    inside the model's directory, long enough) without reading it. The ONNX checker then runs
    on the proto in memory, or, with external data, on the file: the path-based checker
    parses the graph again and resolves each data file against the model's directory with a
    ``stat`` (it reads no weight; the in-memory checker would resolve them against the
    working directory). Shape inference runs on the weightless proto in memory, whatever
    the model's size.
    """
    p = str(path)
    if not os.path.exists(p):
        raise ModelError(f"{p}: no such model file; pass the path of an .onnx file")
    if os.path.isdir(p):
        raise ModelError(
            f"{p}: is a directory; pass an .onnx file or a Hugging Face model directory "
            "(config.json + *.safetensors) to modec compile / inspect"
        )
    try:
        proto = onnx.load(p, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError… by case
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{p}: not a readable ONNX model ({type(exc).__name__}: {cause}); the file is "
            "truncated or not ONNX: re-export it"
        ) from exc
    if not proto.graph.node:
        raise ModelError(f"{p}: not a readable ONNX model (the graph has no nodes); re-export it")
    base_dir = os.path.dirname(os.path.abspath(p))
    external = [t for t in _tensor_protos(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        _check_external_data(p, base_dir, external)
    try:
        onnx.checker.check_model(p if external else proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        cause = str(exc).strip().splitlines()[0]
        raise ModelError(f"{p}: fails the ONNX checker ({cause}); re-export the model") from exc
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # inference is best-effort: log, keep the unannotated model
        log.warning("%s: shape inference failed (%s); continuing without inferred shapes", p, exc)
    return proto, base_dir, bool(external)


def _tensor_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of ``model``: initializers and attribute tensors, subgraphs too."""

    def of_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for node in g.node:
            yield from of_node(node)

    def of_node(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from of_graph(a.g)
            for g in a.graphs:
                yield from of_graph(g)

    yield from of_graph(model.graph)
    for f in model.functions:
        for node in f.node:
            yield from of_node(node)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _proto_nbytes(t: onnx.TensorProto) -> int | None:
    """The bytes ``t``'s data takes (packed for sub-byte types); None for an unknown type."""
    try:
        bits = int(ir.DataType(t.data_type).bitwidth)
    except (TypeError, ValueError):
        return None
    return (int(math.prod(t.dims)) * bits + 7) // 8


def _check_external_data(p: str, base_dir: str, tensors: list[onnx.TensorProto]) -> None:
    """Each external reference names a plain file under ``base_dir`` that holds its bytes.

    Only ``stat`` calls: nothing is read. The rules are those onnx-ir applies when it maps a
    tensor (inside the directory, also after resolving links; one hard link), checked here so
    that a broken copy fails at load with the file's name instead of in the middle of a pass.
    """
    base_real = os.path.realpath(base_dir)
    files: dict[str, os.stat_result] = {}
    for t in tensors:
        name = t.name or "?"
        try:
            info = onnx.external_data_helper.ExternalDataInfo(t)
        except ValueError as exc:
            raise ModelError(
                f"{p}: tensor {name!r} has invalid external data ({exc}); re-export the model"
            ) from exc
        loc = str(info.location)
        if not loc:
            raise ModelError(
                f"{p}: tensor {name!r} is stored as external data but names no file; "
                "re-export the model"
            )
        full = os.path.normpath(os.path.join(base_dir, loc))
        if os.path.isabs(loc) or not _inside(full, base_dir):
            raise ModelError(
                f"{p}: the external data file {loc!r} of tensor {name!r} lies outside the "
                f"model's directory {base_dir}: copy it next to the model and give its "
                "location relative to the model"
            )
        st = files.get(full)
        if st is None:
            real = os.path.realpath(full)
            if not _inside(real, base_real):
                raise ModelError(
                    f"{p}: the external data file {loc!r} of tensor {name!r} is a link to "
                    f"{real}, outside the model's directory, which onnx-ir refuses to read: "
                    "copy the file itself next to the model"
                )
            try:
                st = os.stat(real)
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise ModelError(
                    f"{p}: the external data file {loc!r} is missing (tensor {name!r} is "
                    f"stored there): copy it next to the model, into {base_dir}"
                )
            if st.st_nlink > 1:
                raise ModelError(
                    f"{p}: the external data file {loc!r} has {st.st_nlink} hard links, and "
                    "onnx-ir refuses to read a hard-linked data file: replace it with a "
                    "plain copy (cp, not ln)"
                )
            files[full] = st
        nbytes = _proto_nbytes(t)
        length = info.length
        if length is not None and nbytes is not None and length < nbytes:
            raise ModelError(
                f"{p}: tensor {name!r} has {length} bytes in {loc!r} but its shape and type "
                f"take {nbytes}; re-export the model"
            )
        need = (info.offset or 0) + max(nbytes or 0, length or 0)
        if st.st_size < need:
            raise ModelError(
                f"{p}: the external data file {loc!r} is truncated ({st.st_size} bytes, "
                f"tensor {name!r} needs {need}): copy it next to the model again, whole"
            )


def tensor_chunks(
    tensor: ir.TensorProtocol, chunk_bytes: int | None = None
) -> Iterator[np.ndarray]:
    """The elements of ``tensor`` in order, as 1-D arrays of at most ``chunk_bytes`` bytes
    (default `CHUNK_BYTES`); numeric types only.

    An `onnx_ir.ExternalTensor` is read from its file with plain reads into one reused
    buffer: the memory held is one chunk whatever the tensor's size, the pages read stay in
    the page cache (not in this process), and the tensor is left as it was (mapped or not).
    **Each chunk is valid until the next one is requested**: copy what you keep. An
    in-memory tensor yields views of its array. Sub-byte types (int4, float4…) come as one
    unpacked array.
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    dtype = tensor.dtype
    if isinstance(tensor, ir.ExternalTensor) and dtype.bitwidth % 8 == 0:
        np_dtype = np.dtype(dtype.numpy()).newbyteorder("<")
        step = max(1, chunk_bytes // np_dtype.itemsize) * np_dtype.itemsize
        for chunk in _file_chunks(tensor, step):
            yield np.frombuffer(chunk, dtype=np_dtype)
        return
    arr = np.asarray(tensor.numpy()).reshape(-1)
    step = max(1, chunk_bytes // max(1, arr.dtype.itemsize))
    for start in range(0, arr.size, step):
        yield arr[start : start + step]


def tensor_bytes(
    tensor: ir.TensorProtocol, chunk_bytes: int | None = None
) -> Iterator[memoryview | bytes]:
    """The bytes of ``tensor`` as ONNX stores them (little-endian, sub-byte types packed),
    at most ``chunk_bytes`` at a time; read as `tensor_chunks` reads (same validity rule).
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if isinstance(tensor, ir.ExternalTensor):
        yield from _file_chunks(tensor, max(1, chunk_bytes))
        return
    if tensor.dtype.bitwidth % 8 != 0:
        yield tensor.tobytes()
        return
    arr = np.asarray(tensor.numpy())
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    raw = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    for start in range(0, len(raw), max(1, chunk_bytes)):
        yield raw[start : start + chunk_bytes]


def _file_chunks(tensor: ir.ExternalTensor, step: int) -> Iterator[memoryview]:
    """``tensor.nbytes`` bytes from its file and offset, ``step`` at a time, one buffer."""
    remaining = tensor.nbytes
    offset = tensor.offset or 0
    buf = memoryview(bytearray(min(step, remaining)))
    try:
        f = open(tensor.path, "rb")  # noqa: SIM115 (closed below, also when not exhausted)
    except OSError as exc:
        raise ModelError(
            f"the external data file {tensor.path!r} is missing (tensor {tensor.name!r} is "
            f"stored there; {exc.strerror}): copy it next to the model"
        ) from exc
    with f:
        f.seek(offset)
        while remaining > 0:
            n = f.readinto(buf[: min(step, remaining)])
            if not n:
                raise ModelError(
                    f"the external data file {tensor.path!r} is truncated (tensor "
                    f"{tensor.name!r} needs {offset + tensor.nbytes} bytes): copy it next to "
                    "the model again, whole"
                )
            remaining -= n
            yield buf[:n]


def input_specs(model: onnx.ModelProto | ir.Model) -> list[InputSpec]:
    """The graph inputs that are not initializers, with dtype and shape (str = symbolic)."""
    if isinstance(model, ir.Model):
        return _ir_input_specs(model)
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
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


def _ir_input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        dims: list[int | str | None] = []
        for d in v.shape or ():
            dims.append(d if isinstance(d, int) else d.value)
        elem = v.dtype.value if isinstance(v.type, ir.TensorType) and v.dtype else 0
        specs.append(InputSpec(v.name or "", ONNX_DTYPES.get(elem, str(elem)), tuple(dims)))
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
        # The graph alone: the session reads the weights itself, from the file.
        proto = load_onnx_proto(path, external_data=False)
        self.inputs = input_specs(proto)
        self.cache = kv_cache.find(self.inputs)
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
        out = self.session.run([self.output], kv_cache.with_cache(feeds, self.cache))[0]
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
