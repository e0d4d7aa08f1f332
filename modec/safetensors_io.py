"""Write safetensors files one tensor at a time, byte-identical to ``safetensors.save_file``.

``safetensors.numpy.save_file`` converts every tensor to ``bytes`` before writing, so a file
costs twice its size in RAM; for a paper-sized model's packed experts that is tens of GB.
`write_safetensors` takes each tensor as an array or as a function that produces it, writes
the header from the declared dtypes and shapes, then each tensor's bytes in file order, so
at most one tensor is held (and a lazily produced one is freed after it is written).

The layout follows the safetensors format and the reference implementation's choices
(checked byte for byte against ``save_file`` in tests/test_safetensors_io.py):

- an 8-byte little-endian header length, the JSON header, then the data;
- tensors ordered by dtype (widest alignment first, in the reference implementation's
  dtype order) and then by name; ``__metadata__`` first in the header;
- compact JSON; the header padded with spaces so the data starts at a multiple of 8.

With ``align=N`` (the artifact's ``weights.safetensors`` uses 64), every tensor's data starts
at a file offset that is a multiple of N, so that a loader that maps the file can hand each
tensor to kernels that assume aligned data (TVM's CPU kernels load 64-byte vectors with
aligned instructions). The file stays valid safetensors: the header is padded with spaces to
a multiple of N, and where a tensor would start unaligned, a padding tensor ``__pad.K``
(uint8, zeros, shape ``[bytes]``) fills the gap, so the offsets stay contiguous as the
format requires. Readers see the padding tensors as ordinary tensors and ignore them by
name. The default (no alignment) writes exactly what ``save_file`` writes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from modec.errors import ModelError
from modec.pages import release

__all__ = ["DTYPE_TAGS", "PAD_PREFIX", "TensorEntry", "write_safetensors"]

#: numpy dtype name -> safetensors dtype tag.
DTYPE_TAGS = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32",
    "float64": "F64", "int64": "I64", "uint64": "U64",
}  # fmt: skip

#: The reference implementation's dtype order (tensors are written widest first).
_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
          "F32", "F64", "I64", "U64"]  # fmt: skip
_RANK = {tag: i for i, tag in enumerate(_ORDER)}

#: Name prefix of the padding tensors ``write_safetensors(align=...)`` inserts.
PAD_PREFIX = "__pad."


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its array, or a function producing it (called once)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | Callable[[], np.ndarray]

    @classmethod
    def of(cls, name: str, arr: np.ndarray) -> TensorEntry:
        return cls(name, str(arr.dtype), tuple(int(d) for d in arr.shape), arr)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _itemsize(self.dtype)


def _padding(name: str, size: int) -> TensorEntry:
    return TensorEntry(name, "uint8", (size,), lambda: np.zeros(size, np.uint8))


def _itemsize(dtype: str) -> int:
    if dtype == "bfloat16":
        return 2
    return int(np.dtype(dtype).itemsize)


def write_safetensors(
    path: str | os.PathLike[str],
    entries: Sequence[TensorEntry],
    metadata: Mapping[str, str] | None = None,
    align: int = 0,
) -> None:
    """Write ``entries`` to ``path`` as one safetensors file (see the module doc).

    Args:
        path: the file to write.
        entries: the tensors (arrays or functions producing them).
        metadata: the ``__metadata__`` string map, if any.
        align: 0 (the reference layout), or a power of two: every tensor's data then starts
            at a file offset that is a multiple of it (padding tensors ``__pad.K`` fill the
            gaps; see the module doc).
    """
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ModelError("safetensors: duplicate tensor names")
    if align < 0 or align & (align - 1):
        raise ModelError(f"safetensors: align={align} is not 0 or a power of two")
    if align and any(n.startswith(PAD_PREFIX) for n in names):
        raise ModelError(f"safetensors: tensor names starting with {PAD_PREFIX!r} are reserved "
                         "for padding when align is set")  # fmt: skip
    for e in entries:
        if e.dtype not in DTYPE_TAGS:
            raise ModelError(
                f"tensor {e.name!r} has dtype {e.dtype}, which safetensors cannot hold"
            )
    ordered: list[TensorEntry] = []
    offset = pads = 0
    for e in sorted(entries, key=lambda e: (-_RANK[DTYPE_TAGS[e.dtype]], e.name)):
        if align and offset % align:
            ordered.append(_padding(f"{PAD_PREFIX}{pads}", align - offset % align))
            offset += ordered[-1].nbytes
            pads += 1
        ordered.append(e)
        offset += e.nbytes
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in ordered:
        n = e.nbytes
        header[e.name] = {
            "dtype": DTYPE_TAGS[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % max(8, align))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for e in ordered:
            arr = e.data() if callable(e.data) else e.data
            a = np.asarray(arr)
            if not a.flags.c_contiguous:
                a = a.copy(order="C")
            if tuple(a.shape) != e.shape or str(a.dtype) != e.dtype:
                raise ModelError(
                    f"tensor {e.name!r}: produced {a.dtype}{list(a.shape)}, declared "
                    f"{e.dtype}{list(e.shape)}"
                )
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(a.reshape(-1).view(np.uint8).data)
            if isinstance(arr, np.ndarray):
                release(arr)  # a mapped source's pages leave the resident set once written
            del arr, a
    # Reading one tensor can map pages of a neighbour written before (see `modec.pages`).
    release(*(e.data for e in entries if isinstance(e.data, np.ndarray)))
