"""A Hugging Face checkpoint's tensors as ONNX initializers, without reading them.

`modec.hf` traces a model whose parameters hold no data (fake tensors); this module then
gives every initializer of the traced graph its bytes from the checkpoint:

1. `read_index` reads the header of every ``*.safetensors`` shard (8-byte length, JSON): each
   tensor's dtype, shape and byte range. No tensor is read.
2. `plan_weights` finds, for every entry of the model's state dict, the checkpoint tensors it is
   made of, with transformers' own key renamings and conversions
   (`transformers.conversion_mapping.get_model_conversion_mapping`, as ``from_pretrained``
   applies them): a checkpoint tensor as it is (`Stored`), or an expression over them — experts
   stacked from per-expert tensors (``MergeModulelist`` → `Stack`), gate and up projections
   concatenated (``Concatenate`` → `Cat`), a transpose (``Transpose`` → `Swap`). Any other
   conversion (quantized checkpoints, fused-QKV chunks…) is `CannotBind`: `modec.hf` then
   exports the old way, with the whole model loaded (and says so in a log line).
3. `bind` replaces each fake initializer by
   - an **external-data reference into the shard** (location, offset, length: a
     ``.safetensors`` file is raw little-endian tensor bytes after its header) when the
     tensor is a checkpoint tensor byte for byte, or a transpose of one (the transpose is then a
     ``Transpose`` node in the graph) — only when the ``.onnx`` is written in the directory
     that holds the shards (onnx, onnx-ir and onnxruntime all refuse external data reached
     through a link or lying outside the model's directory); else
   - a tensor **written to the export's own data file**, streamed with plain reads and
     writes (no memory map): a checkpoint tensor a chunk at a time, a stack or concatenation
     part by part (one expert at a time where the parts interleave); only a transpose is
     computed in memory, one tensor (or one expert's slice) at a time.
   A stored dtype that is not the graph's (a bf16/fp16 checkpoint; the graph computes in
   float32) stays in the file and is converted by a ``Cast`` node after the initializer (after
   the ``Gather``/``GatherND`` that reads it, for embedding tables and stacked experts, so that
   only the rows used are converted), the form `tools.scale_model` writes and modec reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modec.errors import ModelError

log = logging.getLogger(__name__)

__all__ = [
    "BindStats",
    "CannotBind",
    "Cat",
    "Expr",
    "Stack",
    "Stored",
    "Swap",
    "bind",
    "cast_after_gathers",
    "empty_model",
    "fake_parameters",
    "plan_weights",
    "read_index",
    "sources",
    "state_keys",
]

#: safetensors dtype tag -> numpy dtype name (``bfloat16`` is ml_dtypes', as onnx-ir's).
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
#: A safetensors header larger than this is not a safetensors file (the format's own limit).
MAX_HEADER = 100 * 2**20
#: Tensors in the export's data file start at multiples of this many bytes.
ALIGN = 64
#: Bytes copied at a time from a shard to the data file.
COPY_CHUNK = 16 * 2**20
#: Initializers read by a ``Gather``/``GatherND`` (data input): the ``Cast`` goes after it.
_GATHERS = frozenset({"Gather", "GatherND"})


class CannotBind(Exception):
    """The checkpoint's tensors cannot be bound to the traced model (the message says why)."""


# ---- the checkpoint's index ---------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors shard (or a leading-axis slice of one).

    Attributes:
        key: the checkpoint key.
        path: the shard file.
        dtype: numpy dtype name.
        shape: its shape.
        offset: absolute byte offset of its data in ``path``.
    """

    key: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    def index0(self, e: int) -> Stored:
        """``x[e]``: a contiguous part of the same bytes."""
        step = math.prod(self.shape[1:]) * _itemsize(self.dtype)
        return Stored(f"{self.key}[{e}]", self.path, self.dtype, self.shape[1:],
                      self.offset + e * step)  # fmt: skip


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else int(np.dtype(dtype).itemsize)


def read_index(files: Sequence[Path]) -> dict[str, Stored]:
    """Every tensor of the shards ``files``, from their headers (no tensor data is read).

    A file that is not safetensors, a tensor whose byte range disagrees with its dtype and
    shape or runs past the end of the file, and a key held by two shards are one-line
    `ModelError`s naming the file.
    """
    index: dict[str, Stored] = {}
    for path in files:
        for key, stored in _read_header(path.resolve()).items():
            if key in index:
                raise ModelError(
                    f"{path}: tensor {key!r} is also in {index[key].path.name}; a checkpoint "
                    "holds each tensor once: re-save the model with save_pretrained"
                )
            index[key] = stored
    return index


def _read_header(path: Path) -> dict[str, Stored]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise ModelError(
                    f"{path}: not a safetensors file (header length {n}, file size {size}); "
                    "re-save the model with save_pretrained(safe_serialization=True)"
                )
            header = json.loads(f.read(n))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror}); check the file") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"{path}: not a safetensors file (its header is not JSON: {exc}); re-save the "
            "model with save_pretrained(safe_serialization=True)"
        ) from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not a JSON object)")
    start = 8 + n
    out: dict[str, Stored] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            tag, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            dims = tuple(int(d) for d in shape)
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelError(f"{path}: tensor {key!r} has a malformed header entry") from exc
        dtype = SAFETENSORS_DTYPES.get(str(tag))
        if dtype is None:
            raise ModelError(
                f"{path}: tensor {key!r} is {tag}, which modec does not read (float64/32/16, "
                "bfloat16 and integer tensors only); dequantize the checkpoint first"
            )
        stored = Stored(key, path, dtype, dims, start + int(begin))
        if int(end) - int(begin) != stored.nbytes or start + int(end) > size:
            raise ModelError(
                f"{path}: tensor {key!r} ({tag} {list(dims)}) has bytes {begin}..{end} in a "
                f"file of {size} bytes; the file is truncated or corrupt: copy it again"
            )
        out[key] = stored
    return out


# ---- what each parameter is made of -------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """``torch.stack(items, dim)`` (``MergeModulelist``)."""

    items: tuple[Expr, ...]
    dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.items[0].shape
        return (*s[: self.dim], len(self.items), *s[self.dim :])

    @property
    def dtype(self) -> str:
        return self.items[0].dtype


@dataclass(frozen=True)
class Cat:
    """``torch.cat(items, dim)`` (``Concatenate``)."""

    items: tuple[Expr, ...]
    dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.items[0].shape
        return (*s[: self.dim], sum(i.shape[self.dim] for i in self.items), *s[self.dim + 1 :])

    @property
    def dtype(self) -> str:
        return self.items[0].dtype


@dataclass(frozen=True)
class Swap:
    """``torch.transpose(x, dim0, dim1)`` (``Transpose``)."""

    x: Expr
    dim0: int
    dim1: int

    @property
    def perm(self) -> list[int]:
        p = list(range(len(self.x.shape)))
        p[self.dim0], p[self.dim1] = p[self.dim1], p[self.dim0]
        return p

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[a] for a in self.perm)

    @property
    def dtype(self) -> str:
        return self.x.dtype


Expr = Stored | Stack | Cat | Swap


def _make_stack(items: Sequence[Expr], dim: int) -> Expr:
    shapes = {i.shape for i in items}
    dtypes = {i.dtype for i in items}
    if not items or len(shapes) != 1 or len(dtypes) != 1:
        raise CannotBind(
            f"cannot stack tensors of shapes {sorted(shapes)}, dtypes {sorted(dtypes)}"
        )
    return Stack(tuple(items), _dim(dim, len(items[0].shape) + 1))


def _make_cat(items: Sequence[Expr], dim: int) -> Expr:
    if not items:
        raise CannotBind("nothing to concatenate")
    nd = len(items[0].shape)
    d = _dim(dim, nd)
    rest = {i.shape[:d] + i.shape[d + 1 :] for i in items if len(i.shape) == nd}
    if (
        len(rest) != 1
        or any(len(i.shape) != nd for i in items)
        or len({i.dtype for i in items}) != 1
    ):
        raise CannotBind(f"cannot concatenate tensors of shapes {[i.shape for i in items]}")
    return items[0] if len(items) == 1 else Cat(tuple(items), d)


def _dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise CannotBind(f"dimension {dim} out of range for {ndim} dimensions")
    return dim % ndim


def _index0(x: Expr, e: int) -> Expr | None:
    """``x[e]`` as an expression, or None where it is not one without computing."""
    if isinstance(x, Stored):
        return x.index0(e)
    if isinstance(x, Stack):
        if x.dim == 0:
            return x.items[e]
        parts = _every([_index0(i, e) for i in x.items])
        return None if parts is None else Stack(parts, x.dim - 1)
    if isinstance(x, Cat):
        if x.dim == 0:
            for item in x.items:
                if e < item.shape[0]:
                    return _index0(item, e)
                e -= item.shape[0]
            raise IndexError(e)
        parts = _every([_index0(i, e) for i in x.items])
        return None if parts is None else Cat(parts, x.dim - 1)
    if 0 in (x.dim0, x.dim1):
        return None
    inner = _index0(x.x, e)
    return None if inner is None else Swap(inner, x.dim0 - 1, x.dim1 - 1)


def _every(parts: list[Expr | None]) -> tuple[Expr, ...] | None:
    kept = tuple(p for p in parts if p is not None)
    return kept if len(kept) == len(parts) else None


def sources(x: Expr) -> Iterator[Stored]:
    """The checkpoint tensors ``x`` is made of."""
    if isinstance(x, Stored):
        yield x
    elif isinstance(x, Swap):
        yield from sources(x.x)
    else:
        for item in x.items:
            yield from sources(item)


def plan_weights(model: Any, index: dict[str, Stored]) -> dict[str, Expr]:
    """What each entry of ``model``'s state dict is made of (see the module docstring).

    Follows the first half of transformers' ``convert_and_load_state_dict_in_model``: each
    checkpoint key (in transformers' natural order) is renamed by the model's conversion
    mapping and collected into its target; then each target's conversion operations are
    applied to expressions instead of tensors. Tied parameters take their source's expression.
    Checkpoint keys the model has no place for are ignored (as transformers does); a parameter
    the checkpoint does not hold is a `ModelError` (transformers would initialize it at random).

    Raises:
        CannotBind: a conversion this module does not express (``Chunk``, quantization…).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        Transpose,
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    state = {k: tuple(int(d) for d in v.shape) for k, v in model.state_dict().items()}
    meta = {k: True for k in state}  # rename_source_key only asks whether a key is present
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    # target key -> (converter or None, {source pattern: [checkpoint keys]})
    groups: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    for key in sorted(index, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta)
        if renamed not in meta:
            log.debug("checkpoint tensor %s has no place in the model (ignored)", key)
            continue
        converter = by_pattern[pattern] if pattern is not None else None
        groups.setdefault(renamed, (converter, {}))[1].setdefault(pattern or key, []).append(key)

    plan: dict[str, Expr] = {}
    for target, (converter, collected) in groups.items():
        values: dict[str, Any] = {p: [index[k] for k in ks] for p, ks in collected.items()}
        if converter is None:
            ((stored,),) = values.values()
            plan[target] = stored
            continue
        sources_, targets = list(converter.source_patterns), list(converter.target_patterns)
        for op in converter.operations:
            if isinstance(op, MergeModulelist):
                n = len(values)
                merged: dict[str, Any] = {}
                for p, v in values.items():
                    name = p if n > 1 else _single(targets, op)
                    merged[name] = v if not isinstance(v, list) else _make_stack(v, op.dim)
                values = merged
            elif isinstance(op, Concatenate):
                items: list[Expr] = []
                for p in sources_:
                    v = values.get(p)
                    if v is not None:
                        items.extend(v if isinstance(v, list) else [v])
                values = {_single(targets, op): _make_cat(items, op.dim)}
            elif isinstance(op, Transpose):
                ((v,),) = [values.values()]
                x = v[0] if isinstance(v, list) else v
                name = targets[0] if len(targets) == 1 else _single(sources_, op)
                if op.check_dims and x.shape == state.get(target):
                    values = {name: x}
                else:
                    nd = len(x.shape)
                    values = {name: Swap(x, _dim(op.dim0, nd), _dim(op.dim1, nd))}
            else:
                raise CannotBind(
                    f"{target}: the checkpoint conversion {type(op).__name__} is not one modec "
                    "binds (MergeModulelist, Concatenate, Transpose)"
                )
        if len(values) != 1:
            raise CannotBind(f"{target}: a conversion with {len(values)} results")
        ((value,),) = [values.values()]
        plan[target] = value[0] if isinstance(value, list) else value
    _add_tied(model, plan)
    for key, shape in state.items():
        got = plan.get(key)
        if got is not None and got.shape != shape:
            raise ModelError(
                f"checkpoint tensor for {key} has shape {list(got.shape)}, the model built "
                f"from config.json {list(shape)}; config.json and the weights disagree"
            )
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(k for k in params if k not in plan)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(
            f"the checkpoint has no tensor for parameter {missing[0]}{more} (transformers would "
            "initialize it at random); check config.json and the safetensors files"
        )
    return plan


def _single(names: list[str], op: Any) -> str:
    if len(names) != 1:
        raise CannotBind(f"{type(op).__name__} with several targets")
    return names[0]


def _add_tied(model: Any, plan: dict[str, Expr]) -> None:
    """Parameters that are one tensor under several names share one expression."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for group in [*names.values(), *([t, s] for t, s in dict(tied).items())]:
        found = [plan[n] for n in group if n in plan]
        if found:
            for n in group:
                plan.setdefault(n, found[0])


# ---- a model with no weights --------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device (no storage), as
    accelerate's ``init_empty_weights(include_buffers=False)``: buffers computed in
    ``__init__`` (rotary frequencies…) keep their values. The CPU tensor a module creates
    before registering it is freed at once; transformers' modules create it with
    ``torch.empty`` (never written, so never resident), and initialize after registering
    (on meta: nothing is computed)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: Any, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(directory: Path, vlm: bool) -> Any:
    """The model of ``directory``'s ``config.json``, float32, parameters without storage.

    Built as `modec.hf.load_model` loads it (batched_mm experts, eager attention), but with
    no weight read or allocated: parameters are on the meta device, buffers computed as
    transformers computes them. `fake_parameters` then makes it traceable.
    """
    import torch
    import transformers

    cls: Any = (
        transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    )
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        raise CannotBind("a quantized checkpoint (quantization_config in config.json)")
    with _parameters_on_meta():
        model: Any = cls.from_config(
            config, dtype=torch.float32, experts_implementation="batched_mm",
            attn_implementation="eager",
        )  # fmt: skip
    model = model.eval()
    model.config.use_cache = False
    return model


def fake_parameters(model: Any) -> None:
    """Replace every meta parameter by a CPU fake tensor of its shape and dtype (tied
    parameters stay one object), so that ``torch.export`` traces the model without data
    (it lifts parameters as graph inputs and never reads their values)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    done: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                with mode:
                    data = torch.empty(tuple(p.shape), dtype=p.dtype)
                done[id(p)] = torch.nn.Parameter(data, requires_grad=False)
            module._parameters[name] = done[id(p)]


# ---- binding ------------------------------------------------------------------------------


@dataclass
class BindStats:
    """What `bind` did: tensors referenced in the shards, written to the data file, kept."""

    referenced: int = 0
    referenced_bytes: int = 0
    written: int = 0
    written_bytes: int = 0
    kept: int = 0
    casts: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)


def bind(
    model: ir.Model,
    keys: dict[str, str],
    plan: dict[str, Expr],
    out_dir: Path,
    data_name: str,
    in_place: bool,
) -> BindStats:
    """Give every initializer of ``model`` (its names mapped to state-dict keys by ``keys``)
    its checkpoint bytes (see the module docstring).

    Args:
        model: the traced graph, its initializers fake tensors named by ``keys``.
        keys: initializer name -> state-dict key, for the initializers to bind.
        plan: `plan_weights`' result.
        out_dir: the directory of the ``.onnx`` to be written (external data is relative to it).
        data_name: the file, in ``out_dir``, written for tensors that are not referenced.
        in_place: reference the shards (``out_dir`` must be their directory); else write
            every bound tensor to ``data_name``.

    Returns:
        What was referenced, written and kept.
    """
    graph = model.graph
    stats = BindStats()
    todo: list[tuple[ir.Value, Expr]] = []
    for name, value in list(graph.initializers.items()):
        key = keys.get(name)
        if key is None or key not in plan:
            raw = getattr(value.const_value, "raw", None)
            if _is_fake(raw):
                raise ModelError(f"initializer {name!r} has no checkpoint tensor (internal error)")
            stats.kept += 1
            continue
        todo.append((value, plan[key]))
    data_path = out_dir / data_name
    tmp = data_path.with_name(f".{data_name}.tmp-{os.getpid()}")
    written = False
    try:
        with open(tmp, "wb") as f:
            for value, expr in todo:
                ref = _reference(expr, out_dir) if in_place else None
                if ref is None:
                    pad = -f.tell() % ALIGN
                    f.write(b"\0" * pad)
                    offset = f.tell()
                    _write_expr(expr, f)
                    tensor = _external(data_name, offset, expr.dtype, expr.shape, out_dir)
                    perm = None
                    stats.written += 1
                    stats.written_bytes += math.prod(expr.shape) * _itemsize(expr.dtype)
                    written = True
                else:
                    tensor, perm = ref
                    stats.referenced += 1
                    stats.referenced_bytes += tensor.nbytes
                stats.dtypes[expr.dtype] = stats.dtypes.get(expr.dtype, 0) + 1
                stats.casts += _attach(graph, value, tensor, perm)
        if written:
            os.replace(tmp, data_path)
        else:  # an earlier export to the same path may have left one
            data_path.unlink(missing_ok=True)
    finally:
        if tmp.exists():
            tmp.unlink()
    return stats


def _is_fake(raw: Any) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - torch is there whenever a fake tensor is
        return False
    return isinstance(raw, FakeTensor) or getattr(raw, "is_meta", False) is True


_IR_DTYPES = {
    "float64": ir.DataType.DOUBLE, "float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16,
    "bfloat16": ir.DataType.BFLOAT16, "int64": ir.DataType.INT64, "int32": ir.DataType.INT32,
    "int16": ir.DataType.INT16, "int8": ir.DataType.INT8, "uint8": ir.DataType.UINT8,
    "bool": ir.DataType.BOOL,
}  # fmt: skip


def _external(
    location: str, offset: int, dtype: str, shape: tuple[int, ...], base_dir: Path
) -> ir.ExternalTensor:
    return ir.ExternalTensor(
        location, offset, math.prod(shape) * _itemsize(dtype), _IR_DTYPES[dtype],
        shape=ir.Shape(shape), name="", base_dir=str(base_dir),
    )  # fmt: skip


def _reference(expr: Expr, out_dir: Path) -> tuple[ir.ExternalTensor, list[int] | None] | None:
    """A reference into a shard in ``out_dir`` for a checkpoint tensor or its transpose."""
    perm = None
    if isinstance(expr, Swap) and isinstance(expr.x, Stored):
        perm, expr = expr.perm, expr.x
    if not isinstance(expr, Stored) or expr.path.parent != out_dir:
        return None
    return _external(expr.path.name, expr.offset, expr.dtype, expr.shape, out_dir), perm


def _attach(
    graph: ir.Graph, value: ir.Value, tensor: ir.TensorProtocol, perm: list[int] | None
) -> int:
    """Make ``tensor`` the initializer of ``value``, whose uses expect ``value``'s dtype and
    the transposed layout: a ``Transpose`` by ``perm`` and a ``Cast`` to that dtype are
    inserted (at the top of the graph) where needed. Returns the number of Casts added."""
    want = value.dtype
    assert want is not None
    name = value.name or ""
    uses = list(value.uses())
    value.const_value = tensor
    value.dtype = tensor.dtype
    value.shape = ir.Shape(tensor.shape.numpy())
    head: list[ir.Node] = []
    out = value
    if perm is not None:
        node = ir.node("Transpose", [out], {"perm": perm}, name=f"{name}/transpose")
        _typed(node.outputs[0], f"{name}/transposed", tensor.dtype,
               ir.Shape([tensor.shape.numpy()[p] for p in perm]))  # fmt: skip
        head.append(node)
        out = node.outputs[0]
    if tensor.dtype != want:
        node = ir.node("Cast", [out], {"to": want}, name=f"{name}/cast")
        _typed(node.outputs[0], f"{name}/cast", want, out.shape)
        head.append(node)
        out = node.outputs[0]
    for use in uses:
        use.node.replace_input_with(use.idx, out)
    if head:
        if len(graph):
            graph.insert_before(graph[0], head)
        else:
            graph.extend(head)
    return int(tensor.dtype != want)


def _typed(v: ir.Value, name: str, dtype: ir.DataType, shape: ir.Shape | None) -> None:
    v.name, v.dtype, v.shape = name, dtype, shape


def cast_after_gathers(graph: ir.Graph) -> int:
    """Move each ``Cast`` of a stored-dtype initializer past the ``Gather``/``GatherND``
    nodes that read it as their table: the gather reads the stored rows and only those are
    converted (embedding tables, stacked experts), as `tools.scale_model` writes it. A Cast
    left with no user is removed. Returns the number of gathers changed.

    Run after the optimizer, which inlines the exporter's functions (before it, the experts'
    gathers are inside ``aten_index``)."""
    moved = 0
    for cast in list(graph):
        if cast.op_type != "Cast" or cast.domain not in ("", "ai.onnx"):
            continue
        source = cast.inputs[0]
        if source is None or not isinstance(source.const_value, ir.ExternalTensor):
            continue
        for use in list(cast.outputs[0].uses()):
            node = use.node
            if node.op_type not in _GATHERS or node.domain not in ("", "ai.onnx") or use.idx:
                continue
            result = node.outputs[0]
            users = list(result.uses())
            after = ir.node("Cast", [result], {"to": cast.attributes["to"].value},
                            name=f"{node.name}/cast")  # fmt: skip
            want = cast.outputs[0].dtype
            assert want is not None and source.dtype is not None
            _typed(after.outputs[0], f"{result.name}/cast", want, result.shape)
            result.dtype = source.dtype
            for u in users:
                u.node.replace_input_with(u.idx, after.outputs[0])
            owner = node.graph
            assert owner is not None
            if result.is_graph_output():
                i = list(owner.outputs).index(result)
                public = result.name
                result.name, after.outputs[0].name = f"{public}/stored", public
                owner.outputs[i] = after.outputs[0]
            node.replace_input_with(0, source)
            owner.insert_after(node, after)
            moved += 1
        if not cast.outputs[0].uses() and not cast.outputs[0].is_graph_output():
            graph.remove(cast, safe=True)
    return moved


# ---- writing derived tensors --------------------------------------------------------------


def _write_expr(x: Expr, f: Any) -> None:
    """Write ``x``'s bytes (C order, little-endian, its dtype) to ``f``: a checkpoint tensor
    is copied a chunk at a time; a stack or concatenation writes its parts in order, split
    along the leading axis where the parts interleave; a transpose is computed in memory
    (one tensor, or one leading-axis slice of it)."""
    if isinstance(x, Stored):
        _copy_bytes(x, f)
        return
    if isinstance(x, (Stack, Cat)) and x.dim == 0:
        for item in x.items:
            _write_expr(item, f)
        return
    if isinstance(x, (Stack, Cat)) or (isinstance(x, Swap) and 0 not in (x.dim0, x.dim1)):
        parts = [_index0(x, e) for e in range(x.shape[0])]
        if all(p is not None for p in parts):
            for p in parts:
                assert p is not None
                _write_expr(p, f)
            return
    f.write(np.ascontiguousarray(_evaluate(x)).reshape(-1).view(np.uint8).data)


def _evaluate(x: Expr) -> np.ndarray:
    """The value of ``x`` in memory (little-endian)."""
    if isinstance(x, Stored):
        with open(x.path, "rb") as src:
            src.seek(x.offset)
            raw = src.read(x.nbytes)
        if len(raw) != x.nbytes:
            raise ModelError(f"{x.path}: truncated (tensor {x.key!r}); copy the file again")
        return np.frombuffer(raw, dtype=_np_dtype(x.dtype)).reshape(x.shape)
    if isinstance(x, Swap):
        return np.swapaxes(_evaluate(x.x), x.dim0, x.dim1)
    arrs = [_evaluate(i) for i in x.items]
    return np.stack(arrs, x.dim) if isinstance(x, Stack) else np.concatenate(arrs, x.dim)


def _np_dtype(dtype: str) -> np.dtype[Any]:
    if dtype == "bfloat16":
        return np.dtype(ir.DataType.BFLOAT16.numpy())
    return np.dtype(dtype).newbyteorder("<")


def _copy_bytes(x: Stored, f: Any) -> None:
    remaining = x.nbytes
    with open(x.path, "rb") as src:
        src.seek(x.offset)
        while remaining > 0:
            chunk = src.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise ModelError(f"{x.path}: truncated (tensor {x.key!r}); copy the file again")
            f.write(chunk)
            remaining -= len(chunk)


# ---- names --------------------------------------------------------------------------------


def state_keys(wrapper: Any, model: Any) -> dict[str, str]:
    """Traced name (the wrapper's parameter or buffer path) -> ``model``'s state-dict key."""
    own: dict[int, str] = {}
    state = set(model.state_dict())
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:  # fmt: skip
        if name in state:
            own.setdefault(id(t), name)
    out: dict[str, str] = {}
    for name, t in [*wrapper.named_parameters(remove_duplicate=False),
                    *wrapper.named_buffers(remove_duplicate=False)]:  # fmt: skip
        key = own.get(id(t))
        if key is not None:
            out[name] = key
    return out
