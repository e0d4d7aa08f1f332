"""Ahead-of-time CUDA: the kernels of a CUDA build go into ``model.so`` compiled (a fatbin).

TVM 0.27 generates CUDA C for a CUDA target and, on a machine without the CUDA driver (so
without its CUDA runtime module), keeps that *source* in the module it exports (format
``cuda``); the module that loads it later must compile it through
``tvm_callback_cuda_compile``, which only the Python ``tvm`` compiler package registers. So
neither the C++ runtime nor a Python process without the compiler could run such an artifact.

Here the export packs the imported modules itself (`export_library`'s ``fpack_imports``
hook): it takes the blob TVM would embed (``runtime.ModulePackImportsToTensor``), compiles
the source of every CUDA module in it with nvcc into one fatbin holding SASS for each
requested architecture, rewrites that module's record as TVM's CUDA runtime module writes a
compiled one (``[fmt][function table][code]``, fmt ``fatbin``), and links the blob into the
library as ``__tvm_ffi__library_bin`` (an assembler ``.incbin``: no multi-megabyte C array).
TVM's CUDA runtime then loads the code with ``cuModuleLoadData``; loading needs the driver
only.

Blob layout (tvm-ffi ``ProcessLibraryBin``): ``<nbytes u64> <indptr vec<u64>> <children
vec<u64>>`` then per module ``<kind str>`` and, except for the ``_lib`` placeholder, ``<bytes
str>``; strings and vectors are a u64 count then the items, little-endian.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modec.cuda_arch import parse_arch
from modec.errors import BadInputError, ModecError

_U64 = struct.Struct("<Q")


def target_archs(target: Any) -> list[str]:
    """The architectures a CUDA target asks for, lowest first, without duplicates.

    ``target`` is what `modec.kernels.target.resolve_target` takes: a dict (or its JSON)
    whose ``arch`` is one name or a list of names, "cuda" (sm_90), or a ``tvm.target.Target``.
    """
    if isinstance(target, str):
        if target == "cuda":
            return ["sm_90"]
        target = json.loads(target) if target.lstrip().startswith("{") else {}
    if isinstance(target, dict):
        raw = target.get("arch", "sm_90")
    else:  # a tvm.target.Target
        raw = str(target.attrs.get("arch", "sm_90"))
    names = [raw] if isinstance(raw, str) else list(raw)
    if not names or not all(isinstance(n, str) for n in names):
        raise BadInputError(
            f"CUDA target arch {raw!r}: give a name or a list such as ['sm_80', 'sm_90']"
        )
    return sorted(set(names), key=lambda n: (parse_arch(n), n))


def nvcc_gpu_codes() -> set[str]:
    """The SASS architectures this nvcc can build (``nvcc --list-gpu-code``)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BadInputError("nvcc not found: --target cuda needs the CUDA toolkit on PATH")
    out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=False)
    return set(out.stdout.split())


def compile_fatbin(source: str, archs: Sequence[str]) -> bytes:
    """Compile TVM-generated CUDA C into one fatbin with SASS for each of ``archs``.

    The flags are TVM's own (`tvm.support.nvcc.compile_cuda`); no PTX is embedded, so a GPU
    outside ``archs`` is refused at load time instead of JIT-compiling. The temporary file
    names do not reach the output (same source and archs give the same bytes).

    Raises:
        ModecError: nvcc failed (its message attached).
    """
    import tvm
    from tvm.support import nvcc

    gencode: list[str] = []
    for arch in archs:
        suffix = arch[len("sm_") :]
        gencode += ["-gencode", f"arch=compute_{suffix},code=sm_{suffix}"]
    with tvm.target.Target({"kind": "cuda", "arch": archs[0]}):
        try:
            return bytes(
                nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc")
            )
        except RuntimeError as exc:
            raise ModecError(
                f"nvcc failed on the generated CUDA kernels: {str(exc)[-2000:]}"
            ) from exc


class _Reader:
    def __init__(self, data: bytes, at: int = 0) -> None:
        self.data, self.at = data, at

    def u64(self) -> int:
        if self.at + 8 > len(self.data):
            raise ModecError("TVM's packed module blob ends early; is this TVM 0.27?")
        (v,) = _U64.unpack_from(self.data, self.at)
        self.at += 8
        return int(v)

    def raw(self) -> bytes:
        n = self.u64()
        if self.at + n > len(self.data):
            raise ModecError("TVM's packed module blob ends early; is this TVM 0.27?")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out


def _pack(b: bytes) -> bytes:
    return _U64.pack(len(b)) + b


def _compiled_cuda_record(
    record: bytes, sources: Sequence[bytes], compile_source: Callable[[str], bytes]
) -> bytes:
    """A CUDA module record with its source replaced by the compiled fatbin.

    ``sources``: the CUDA source of every CUDA module of the tree; the record's code (its last
    field) must be one of them, which locates the opaque function table before it.
    """
    r = _Reader(record)
    if r.raw() != b"cuda":
        return record  # compiled already (a machine with the CUDA runtime compiled it)
    for src in sources:
        tail = _pack(src)
        if record.endswith(tail) and len(record) - len(tail) >= r.at:
            fmap = record[r.at : len(record) - len(tail)]
            return _pack(b"fatbin") + fmap + _pack(compile_source(src.decode()))
    raise ModecError("a CUDA module record holds none of the generated sources; is this TVM 0.27?")


def cuda_sources(mod: Any) -> list[bytes]:
    """The CUDA C source of every CUDA module imported (transitively) by ``mod``."""
    out: list[bytes] = []
    stack = [mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(str(m.inspect_source("cuda")).encode())
        stack.extend(m.imports)
    return out


def compile_packed_imports(
    blob: bytes, sources: Sequence[bytes], compile_source: Callable[[str], bytes]
) -> tuple[bytes, int]:
    """Rewrite TVM's packed-imports blob with every CUDA module compiled; returns the blob
    and the number of CUDA modules compiled."""
    r = _Reader(blob)
    nbytes = r.u64()
    if nbytes + 8 != len(blob):
        raise ModecError(f"TVM's packed module blob says {nbytes} bytes, holds {len(blob) - 8}")
    start = r.at
    indptr = [r.u64() for _ in range(r.u64())]
    for _ in range(r.u64()):
        r.u64()
    out = bytearray(blob[start : r.at])
    compiled = 0
    for _ in range(len(indptr) - 1):
        kind = r.raw()
        out += _pack(kind)
        if kind == b"_lib":
            continue
        record = r.raw()
        if kind == b"cuda":
            record = _compiled_cuda_record(record, sources, compile_source)
            compiled += 1
        out += _pack(record)
    if r.at != len(blob):
        raise ModecError("TVM's packed module blob has trailing bytes; is this TVM 0.27?")
    return _U64.pack(len(out)) + bytes(out), compiled


def aot_pack_imports(archs: Sequence[str]) -> Callable[..., str]:
    """An ``fpack_imports`` for `tvm.runtime.Module.export_library` that embeds compiled CUDA.

    Returns the hook; it writes an assembler file defining ``__tvm_ffi__library_bin`` (the
    symbol TVM's library loader reads) over the rewritten blob.
    """
    archs = list(archs)

    def pack(mod: Any, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        import numpy as np
        import tvm_ffi

        if is_system_lib or prefix:
            raise ModecError(
                "CUDA artifacts are shared libraries; a system-lib prefix is not supported"
            )
        tensor = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod)
        blob = np.from_dlpack(tensor).tobytes()
        packed, compiled = compile_packed_imports(
            blob, cuda_sources(mod), lambda src: compile_fatbin(src, archs)
        )
        if compiled == 0:
            raise ModecError("a CUDA build exported no CUDA module; nothing to compile")
        work = Path(workspace_dir)
        (work / "modec_imports.bin").write_bytes(packed)
        asm = work / "modec_imports.s"
        asm.write_text(
            '\t.section .rodata.tvm_ffi_library_bin,"a"\n'
            "\t.globl __tvm_ffi__library_bin\n"
            "\t.type __tvm_ffi__library_bin, @object\n"
            "\t.p2align 6\n"
            "__tvm_ffi__library_bin:\n"
            f'\t.incbin "{work / "modec_imports.bin"}"\n'
            "\t.size __tvm_ffi__library_bin, .-__tvm_ffi__library_bin\n"
            '\t.section .note.GNU-stack,"",@progbits\n'
        )
        return str(asm)

    return pack


def export_cuda_library(
    executable: Any, path: str, archs: Sequence[str], options: Sequence[str]
) -> None:
    """Export a CUDA-target executable as a shared library with its kernels compiled."""
    with tempfile.TemporaryDirectory(prefix="modec-cuda-") as work:
        executable.mod.export_library(
            path, fpack_imports=aot_pack_imports(archs), workspace_dir=work, options=list(options)
        )


#: The first word of a fatbin (NVIDIA's FATBIN_MAGIC).
FATBIN_MAGIC = 0xBA55ED50


def fatbin_entries(fatbin: bytes) -> list[tuple[str, str]]:
    """(kind, arch) of each entry of a fatbin: kind "sass" (an ELF cubin) or "ptx".

    Layout (header: magic u32, version u16, header size u16, payload size u64; each entry:
    kind u16 (1 PTX, 2 ELF), version u16, header size u32, payload size u64, ..., the SM
    number as a u32 at byte 28), as nvcc 12-13 writes it.

    Raises:
        ModecError: not a fatbin.
    """
    if len(fatbin) < 16:
        raise ModecError("not a fatbin (too short)")
    magic, _, hsz, size = struct.unpack_from("<IHHQ", fatbin, 0)
    if magic != FATBIN_MAGIC or hsz + size > len(fatbin):
        raise ModecError("not a fatbin (bad magic or size)")
    out = []
    at = hsz
    while at < hsz + size:
        kind, _, ehsz, psize = struct.unpack_from("<HHIQ", fatbin, at)
        (sm,) = struct.unpack_from("<I", fatbin, at + 28)
        out.append(({1: "ptx", 2: "sass"}.get(kind, f"kind{kind}"), f"sm_{sm}"))
        at += ehsz + psize
    return out


def library_fatbins(library: bytes) -> list[bytes]:
    """The fatbins embedded in a shared library written by `export_cuda_library`."""
    out = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    at = library.find(magic)
    while at >= 8:
        (n,) = _U64.unpack_from(library, at - 8)  # the code field's length
        if at + n <= len(library):
            out.append(library[at : at + n])
            at = library.find(magic, at + n)
        else:
            at = library.find(magic, at + 4)
    return out
