"""CUDA variants of the kernels (fp16 activations, fp32 accumulation), target sm_90.

Simple, correct schedules: one thread per output element (dense) or per output row and
expert token (grouped), threads of a warp on consecutive rows so that the N-interleaved
words of `n16k32` are read coalesced. They build with nvcc; they have not been tuned on a
GPU (none on the development machines).

TVM 0.27 compiles CUDA through NVRTC by default; NVRTC is absent here, so `build` selects
nvcc through TVM's `TVM_CUDA_COMPILE_MODE` switch for the duration of the build.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

from modec.kernels._decode import centered, code_expr
from modec.numerics.packing import BLOCK, LANES, padded_k, padded_n
from modec.numerics.schemes import QuantScheme

logger = logging.getLogger(__name__)

#: Threads per block.
THREADS = 128


def nvcc_available() -> bool:
    """Whether an nvcc binary is on PATH (or in CUDA_HOME/bin)."""
    if shutil.which("nvcc"):
        return True
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(home and os.path.exists(os.path.join(home, "bin", "nvcc")))


@contextlib.contextmanager
def nvcc_compile_mode() -> Iterator[None]:
    """Make TVM's CUDA compile callback use nvcc (fatbin) instead of NVRTC, then restore."""
    key = "TVM_CUDA_COMPILE_MODE"
    old = os.environ.get(key)
    os.environ[key] = "nvcc"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def schedule_dequant_matmul(func: tirx.PrimFunc, n: int, gemv: bool) -> tvm.IRModule:
    """Thread per output element; the group partial sum and accumulator in registers."""
    del gemv  # same mapping for M = 1 and symbolic M
    sch = tvm.s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("qz"))
    acc = sch.get_sblock("acc")
    i, row, g = sch.get_loops(acc)
    fused = sch.fuse(i, row)
    bx, tx = sch.split(fused, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    y = sch.get_sblock("Y")
    sch.reverse_compute_at(y, tx)
    sch.set_scope(acc, 0, "local")
    part = sch.get_sblock("part")
    sch.compute_at(part, g)
    sch.set_scope(part, 0, "local")
    sch.unroll(sch.get_loops(part)[-1])
    sch.decompose_reduction(acc, g)
    return sch.mod


def grouped_primfunc(
    scheme: QuantScheme, n: int, k: int, num_experts: int, index_dtype: str
) -> tirx.PrimFunc:
    """Grouped MoE kernel for CUDA: blockIdx over 128-row tiles, threadIdx over rows."""
    bits, gs = scheme.bits, scheme.group_size
    groups = scheme.num_groups(k)
    np_, kp = padded_n(n), padded_k(k, scheme)
    nb, kb = np_ // LANES, kp // BLOCK
    blocks = (np_ + THREADS - 1) // THREADS
    kblocks = gs // BLOCK
    short_k = kp != k
    e_count = num_experts

    def xval(x: Any, t: Any, kk: Any) -> Any:
        v = T.Cast("float32", x[t, tirx.min(kk, k - 1)])
        if short_k:
            return tirx.if_then_else(kk < k, v, tirx.const(0.0, "float32"))
        return v

    def qz(codes: Any, zero: Any, e: Any, row: Any, g: Any, blk: Any, j: Any) -> Any:
        b, lane = row // LANES, row % LANES
        q = code_expr(lambda w: codes[e, b, g * kblocks + blk, w, lane], j, bits)
        return centered(q, zero[e, b, g, lane])

    @T.prim_func(private=True, s_tir=False)
    def grouped(
        var_x: T.handle,
        indptr: T.Buffer((e_count + 1,), index_dtype),  # type: ignore[valid-type]
        codes: T.Buffer((e_count, nb, kb, bits, LANES), "uint32"),  # type: ignore[valid-type]
        scale: T.Buffer((e_count, nb, groups, LANES), "float16"),  # type: ignore[valid-type]
        zero: T.Buffer((e_count, nb, groups, LANES), "uint8"),  # type: ignore[valid-type]
        var_y: T.handle,
    ) -> None:
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        x = T.match_buffer(var_x, (t, k), "float16")
        y = T.match_buffer(var_y, (t, n), "float16")
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                acc = T.alloc_buffer((1,), "float32", scope="local")
                part = T.alloc_buffer((1,), "float32", scope="local")
                for e in T.serial(e_count):
                    t0 = T.Cast("int64", indptr[e])
                    t1 = T.Cast("int64", indptr[e + 1])
                    for tok in T.serial(t1 - t0):
                        acc[0] = T.float32(0)
                        for g in T.serial(groups):
                            part[0] = T.float32(0)
                            for blk in T.serial(kblocks):
                                for j in T.unroll(BLOCK):
                                    part[0] = part[0] + xval(
                                        x, t0 + tok, g * gs + blk * BLOCK + j
                                    ) * qz(
                                        codes,
                                        zero,
                                        e,
                                        T.min(bx * THREADS + tx, np_ - 1),
                                        g,
                                        blk,
                                        j,
                                    )
                            acc[0] = acc[0] + part[0] * T.Cast(
                                "float32",
                                scale[
                                    e,
                                    T.min(bx * THREADS + tx, np_ - 1) // LANES,
                                    g,
                                    T.min(bx * THREADS + tx, np_ - 1) % LANES,
                                ],
                            )
                        if bx * THREADS + tx < n:
                            y[t0 + tok, bx * THREADS + tx] = T.Cast("float16", acc[0])

    return grouped


def cuda_source(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    """The CUDA C source TVM generates for a CUDA-scheduled module."""
    with target:
        ex = tvm.compile(mod, target=target)
    return str(ex.mod.imports[0].inspect_source())


def compile_fatbin(mod: tvm.IRModule, target: tvm.target.Target) -> bytes:
    """Generate CUDA source for `mod` and compile it with nvcc into a fatbin.

    TVM 0.27's `tvm.compile` keeps the CUDA kernels as source in the module (format
    ``cuda``); its CUDA runtime compiles them when the module is loaded, through the
    ``tvm_callback_cuda_compile`` global function. Without a GPU that never happens, so
    this is the explicit nvcc step that proves the generated code compiles.

    Raises:
        RuntimeError: nvcc is not installed.
    """
    return fatbin_from_source(cuda_source(mod, target), target)


def fatbin_from_source(src: str, target: tvm.target.Target) -> bytes:
    """Compile CUDA C source that TVM generated for ``target`` into a fatbin with nvcc.

    Raises:
        RuntimeError: nvcc is not installed.
    """
    if not nvcc_available():
        raise RuntimeError("nvcc not found; install the CUDA toolkit or set CUDA_HOME")
    from tvm.support import nvcc

    arch = str(target.attrs.get("arch", "sm_90"))
    # nvcc.compile_cuda reads the compute version from the current target as well.
    with nvcc_compile_mode(), target:
        return bytes(nvcc.compile_cuda(src, target_format="fatbin", arch=arch, compiler="nvcc"))
