"""What `modec.runtime.load` checks before TVM sees an artifact, as strictly as the C++ runtime
(runtime/src/artifact_check.cc) so that both accept and refuse the same artifacts.

Every refusal is one `ModelError` line. Beyond `modec.artifact.read_manifest` / `verify_files`:
JSON that Python alone would take (``NaN``, ``Infinity``, duplicate keys: the C++ reader takes
the first of two equal keys, Python the last) or that nests past the interpreter's limit; a
field of the wrong JSON type (``1.5``, ``true`` or ``"3"`` as a dim, a number as a name); an
unknown dtype or a negative dim in ``inputs`` / ``outputs`` (the params' are caught when the
weights load); a file name that is empty or holds a control character; a file that cannot
be read (a directory, a name too long); and a safetensors header with a bad length or
duplicate tensor names. The params' entries in the safetensors header are checked by
`weight_slices`, which follows the C++ ``CheckSafetensors`` rule for rule.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np

from modec.artifact import (
    MANIFEST,
    SAFETENSORS_DTYPES,
    SCHEMA,
    WEIGHTS,
    Manifest,
    TensorSpec,
    verify_files,
)
from modec.cuda_arch import ARCH
from modec.errors import ModelError

#: the safetensors header cap (the format's, and the C++ runtime's)
MAX_HEADER = 100 << 20
#: the most levels of values the C++ reader takes (``[[1]]`` has 3)
MAX_DEPTH = 65
#: the integers the C++ reader reads (int64)
INT64 = range(-(2**63), 2**63)


class _JsonRefused(ValueError):
    """A document Python's json module would accept but the artifact format does not."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JsonRefused(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> NoReturn:
    raise _JsonRefused(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JsonRefused(f"number {text} is out of range")
    return value


def _depth(obj: Any) -> int:
    """Levels of values: 1 for a scalar, 2 for ``[1]`` or ``[[]]``."""
    depth, level = 0, [obj]
    while level:
        depth += 1
        nxt: list[Any] = []
        for x in level:
            if isinstance(x, dict):
                nxt.extend(x.values())
            elif isinstance(x, list):
                nxt.extend(x)
        level = nxt
    return depth


def parse_json(text: str | bytes) -> Any:
    """`json.loads` as strict as runtime/src/json.cc: no NaN / Infinity / out-of-range
    numbers, no repeated key, at most `MAX_DEPTH` levels of values.

    Raises:
        ValueError: not such a JSON document (its message says why, on one line).
    """
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                         parse_float=_finite)  # fmt: skip
    except RecursionError as exc:
        raise _JsonRefused("nesting too deep") from exc
    if _depth(obj) > MAX_DEPTH:
        raise _JsonRefused("nesting too deep")
    return obj


def _malformed(where: str, what: str) -> NoReturn:
    raise ModelError(f"{where}: malformed field ({what}); rebuild the artifact")


def _field(obj: dict[str, Any], key: str, kind: type, where: str, ctx: str = "") -> Any:
    if key not in obj:
        _malformed(where, f"missing field '{ctx}{key}'")
    value = obj[key]
    if not isinstance(value, kind) or (
        kind is int and (isinstance(value, bool) or value not in INT64)
    ):
        _malformed(where, f"{ctx}{key} is not {_KIND_NAMES[kind]}: {value!r}"[:200])
    return value


_KIND_NAMES = {str: "a string", int: "an integer", list: "an array", dict: "an object"}


def plain_file_name(name: str) -> bool:
    """A name inside the artifact directory: not empty, no path, not hidden, no control char."""
    return (
        bool(name)
        and not name.startswith(".")
        and not any(c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in name)
    )


def _check_specs(obj: dict[str, Any], key: str, kind: str, where: str) -> None:
    for i, spec in enumerate(_field(obj, key, list, where)):
        if not isinstance(spec, dict):
            _malformed(where, f"{key}[{i}] is not an object")
        name = _field(spec, "name", str, where, f"{key}[{i}].")
        dtype = _field(spec, "dtype", str, where, f"{key}[{i}].")
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelError(f"{where}: {kind} {name!r} has unsupported dtype {dtype!r}; rebuild "
                             "the artifact")  # fmt: skip
        for dim in _field(spec, "shape", list, where, f"{key}[{i}]."):
            if isinstance(dim, str):
                if kind == "param":
                    raise ModelError(f"{where}: param {name!r} has a symbolic dim; rebuild the "
                                     "artifact")  # fmt: skip
            elif not isinstance(dim, int) or isinstance(dim, bool) or dim not in INT64:
                _malformed(where, f"{kind} {name!r}: dim {dim!r} is not an integer or a symbol")
            elif dim < 0:
                raise ModelError(f"{where}: {kind} {name!r} has a negative dim; rebuild the "
                                 "artifact")  # fmt: skip


def _check_fields(obj: dict[str, Any], where: str) -> None:
    """The field types of a manifest whose schema is right (artifact_check.cc's order)."""
    if "entry" in obj:
        _field(obj, "entry", str, where)
    target = _field(obj, "target", dict, where)
    device = _field(target, "device", str, where, "target.")
    if device == "cpu" and "machine" in target:
        _field(target, "machine", str, where, "target.")
    if device == "cuda":
        archs = target.get("archs")
        if not (
            isinstance(archs, list)
            and archs
            and all(isinstance(a, str) and ARCH.match(a) for a in archs)
        ):
            raise ModelError(
                f"{where}: target.archs is missing or malformed (an artifact from before "
                "compiled CUDA kernels?); rebuild it with modec compile ... --target cuda"
            )
    _check_specs(obj, "inputs", "input", where)
    _check_specs(obj, "outputs", "output", where)
    _check_specs(obj, "params", "param", where)
    for name, entry in _field(obj, "files", dict, where).items():
        if not plain_file_name(name):
            raise ModelError(f"{where}: file name {name!r} is not a plain file name")
        if not isinstance(entry, dict):
            _malformed(where, f"files[{name!r}] is not an object")
        _field(entry, "sha256", str, where, f"files[{name!r}].")
        _field(entry, "bytes", int, where, f"files[{name!r}].")


def read_manifest(base: Path) -> Manifest:
    """Read and validate ``base/manifest.json`` (the messages of `modec.artifact.read_manifest`).

    Raises:
        ModelError: missing or unreadable, not JSON, wrong schema, a malformed field.
    """
    path = base / MANIFEST
    _regular(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ModelError(f"{path} not found; is {base} a modec artifact directory?") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}; rebuild the artifact") from exc
    try:
        obj = parse_json(text)
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from exc
    if isinstance(obj, dict) and obj.get("schema") == SCHEMA:
        _check_fields(obj, str(path))
    try:
        return Manifest.from_json(obj, str(path))  # refuses another schema
    except OverflowError as exc:  # not reachable after _check_fields; kept as a net
        raise ModelError(f"{path}: malformed field ({exc}); rebuild the artifact") from exc


def _regular(path: Path) -> None:
    if path.exists() and not path.is_file():
        raise ModelError(f"{path} is not a regular file; copy the whole artifact directory")


def verify(base: Path, manifest: Manifest) -> BinaryIO:
    """`modec.artifact.verify_files`, with a file that cannot be read as a ModelError.

    Returns:
        ``weights.safetensors`` open at offset 0: the handle its checksum was read through.
    """
    try:
        for name in sorted(manifest.files):
            _regular(base / name)  # names are plain (`_check_fields`)
        weights = verify_files(base, manifest, keep=WEIGHTS)
    except (OSError, ValueError) as exc:  # a name too long, a file that cannot be read...
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = getattr(exc, "filename", None) or base
        raise ModelError(f"cannot read {where}: {what}; copy the artifact again") from exc
    assert weights is not None  # verify_files requires WEIGHTS in the manifest
    return weights


def read_weights_header(f: BinaryIO, path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """The safetensors header of the open weights file (``size`` bytes), read with ``read()``
    (as runtime/src/artifact_check.cc reads it): its length and JSON.

    Returns:
        (the file offset where the data starts, the header object).

    Raises:
        ModelError: too short, header length out of range, header not JSON (or duplicates).
    """
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise ModelError(f"{path} is too short for a safetensors file; copy the artifact again")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise ModelError(f"{path}: header length out of range; copy the artifact again")
    raw = f.read(n)
    try:
        header = parse_json(raw)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ModelError(
            f"{path}: header is not valid JSON ({exc}); copy the artifact again"
        ) from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path}: malformed header (not an object); copy the artifact again")
    return 8 + n, header


#: safetensors dtype tag -> numpy name (for messages)
_NUMPY_NAMES = {tag: name for name, tag in SAFETENSORS_DTYPES.items()}


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of a manifest dtype name; ``bfloat16`` is ``ml_dtypes.bfloat16``
    (numpy has none; ml_dtypes comes with onnx and is imported only for it).

    Raises:
        ModelError: ``bfloat16`` without ml_dtypes installed.
    """
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise ModelError(
                "the artifact holds bfloat16 tensors, which numpy reads through ml_dtypes; "
                "pip install ml_dtypes"
            ) from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _header_int(value: Any, path: Path, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in INT64:
        raise ModelError(f"{path}: malformed header ({what} is not an integer: {value!r}"[:200]
                         + "); copy the artifact again")  # fmt: skip
    return value


def weight_slices(
    header: dict[str, Any], base: int, size: int, specs: list[TensorSpec], path: Path
) -> list[tuple[int, int]]:
    """Where each param's bytes are in the weights file: (file offset, byte count), in
    ``specs`` order, checked as runtime/src/artifact_check.cc's ``CheckSafetensors`` does
    (the header lists every param with the manifest's dtype and shape, and in-range offsets
    that hold exactly its bytes; other tensors, such as the padding ``__pad.K``, are not
    looked at), so that both runtimes accept and refuse the same files.

    Raises:
        ModelError: a param missing, of another dtype or shape, or out of range.
    """
    body = size - base
    out = []
    for spec in specs:
        t = header.get(spec.name)
        if t is None:
            raise ModelError(f"{path} has no tensor {spec.name!r} listed in the manifest")
        if not isinstance(t, dict) or not isinstance(t.get("shape"), list):
            raise ModelError(f"{path}: malformed header (tensor {spec.name!r} has no shape "
                             "array); copy the artifact again")  # fmt: skip
        shape = [_header_int(d, path, f"a dim of {spec.name!r}") for d in t["shape"]]
        dtype = t.get("dtype")
        if not isinstance(dtype, str):
            raise ModelError(f"{path}: malformed header (tensor {spec.name!r} has no dtype "
                             "string); copy the artifact again")  # fmt: skip
        if dtype != SAFETENSORS_DTYPES[spec.dtype] or shape != list(spec.shape):
            raise ModelError(
                f"{path}: tensor {spec.name!r} is {_NUMPY_NAMES.get(dtype, dtype)}{shape}, the "
                f"manifest says {spec.dtype}{list(spec.shape)}"
            )
        offsets = t.get("data_offsets")
        if not isinstance(offsets, list):
            raise ModelError(f"{path}: malformed header (tensor {spec.name!r} has no "
                             "data_offsets array); copy the artifact again")  # fmt: skip
        if len(offsets) != 2:
            raise ModelError(f"{path}: bad data_offsets for {spec.name!r}; copy the artifact again")
        begin, end = (_header_int(o, path, f"an offset of {spec.name!r}") for o in offsets)
        itemsize = 2 if spec.dtype == "bfloat16" else np.dtype(spec.dtype).itemsize
        numel = math.prod(shape)
        if any(d < 0 for d in shape) or numel >= 2**63 or numel > (2**64 - 1) // itemsize:
            raise ModelError(f"{path}: tensor {spec.name!r} shape is too large (its byte size "
                             "overflows); copy the artifact again")  # fmt: skip
        if begin < 0 or end < begin or end > body or end - begin != numel * itemsize:
            raise ModelError(f"{path}: data_offsets of {spec.name!r} out of range; copy the "
                             "artifact again")  # fmt: skip
        out.append((base + begin, end - begin))
    return out


def check_library(data: bytes, path: Path) -> None:
    """Refuse a ``model.so`` that dlopen would map past its end: a truncated library maps
    fine and the first access to a missing page kills the process with SIGBUS. A 64-bit
    little-endian ELF must hold its program headers, each segment's file bytes and its
    section headers (runtime/src/artifact_check.cc, CheckLibrary); anything else is left to
    dlopen, which refuses it with an error.

    Raises:
        ModelError: the library is truncated.
    """
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)

    def truncated(what: str, end: int) -> NoReturn:
        raise ModelError(f"{path} is truncated ({what} ends at byte {end}, the file has "
                         f"{len(data)}); rebuild the artifact")  # fmt: skip

    if phentsize < 56:
        return
    if phoff + phnum * phentsize > len(data):
        truncated("the program header table", phoff + phnum * phentsize)
    for i in range(phnum):
        offset, _, _, filesz = struct.unpack_from("<QQQQ", data, phoff + i * phentsize + 8)
        if filesz > 0 and offset + filesz > len(data):
            truncated(f"segment {i}", offset + filesz)
    if shnum > 0 and shoff + shnum * shentsize > len(data):
        truncated("the section header table", shoff + shnum * shentsize)


def read_library(path: Path, manifest: Manifest) -> bytes:
    """``model.so``'s bytes, checked again against the manifest (these are the bytes that get
    loaded, whatever happens to the file afterwards) and by `check_library`.

    Raises:
        ModelError: unreadable, changed since `verify`, or truncated.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(
            f"cannot read {path}: {exc.strerror or exc}; copy the artifact again"
        ) from exc
    entry = manifest.files[path.name]
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ModelError(f"{path} changed while it was loaded; copy the artifact again")
    check_library(data, path)
    return data
