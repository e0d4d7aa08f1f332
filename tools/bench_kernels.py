"""Benchmark the mixed-precision kernels against onnxruntime and numpy (not a test).

    OMP_NUM_THREADS=2 TVM_NUM_THREADS=2 python tools/bench_kernels.py [--quick] [--no-dram]

Per shape (N, K) and M in {1, 16, 64}, per width: modec TVM kernel (GEMV for M=1, symbolic-M
GEMM otherwise) vs onnxruntime com.microsoft::MatMulNBits (same group size), onnxruntime fp32
MatMul and numpy fp32 matmul on the dequantized weight; and the bandwidth bound = packed bytes
÷ DRAM read rate, where the read rate is onnxruntime's fp32 GEMV streaming 1 GiB of weights.
The grouped section times the MoE kernel (E experts of one width, token ranges from an
indptr) against E calls of the dense kernel doing the same work. The DRAM section runs each
kernel as one wide GEMV (K=2048) over >= 1 GiB of packed weights, so nothing stays in the
last-level cache, and beside it an XOR-reduction of the same codes in the same order (the
layout's read rate without decoding). Times are medians of 7 runs, in microseconds.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

THREADS = 2
GROUP = 128
SHAPES = [(512, 128), (128, 256), (768, 2048), (2048, 768)]  # (N, K)
WIDTHS = (2, 3, 4, 8)
GIB = 1 << 30


def timeit(fn: Callable[[], Any], runs: int = 7, min_s: float = 0.02) -> float:
    """Median seconds per call over `runs` runs of enough calls to last `min_s`."""
    fn()
    reps, t0 = 1, time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(min_s / one))
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)


def ort_session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_matmul(w_kn: np.ndarray, m: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_kn.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w_kn, "w")],
    )
    return ort_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def ort_matmulnbits(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, m: int) -> Any:
    """MatMulNBits with codes q[N, K] (K multiple of GROUP), float scales, uint8 zeros."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = q.shape
    blocks = k // GROUP
    per = 8 // bits
    qb = q.reshape(n, blocks, GROUP // per, per).astype(np.uint8)
    packed = np.zeros((n, blocks, GROUP // per), np.uint8)
    for i in range(per):  # element i of a byte sits at bits [i*bits, (i+1)*bits)
        packed |= qb[..., i] << (i * bits)
    zpb = (blocks * bits + 7) // 8
    zp = np.zeros((n, zpb), np.uint8)
    for b in range(blocks):
        byte, sh = divmod(b * bits, 8)
        zp[:, byte] |= (zero[:, b] << sh).astype(np.uint8)
    inits = [
        numpy_helper.from_array(packed, "B"),
        numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "scales"),
        numpy_helper.from_array(zp.reshape(-1), "zp"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales", "zp"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=GROUP,
    )
    g = helper.make_graph(
        [node],
        "nb",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return ort_session(helper.make_model(g, opset_imports=ops))


def random_packed_words(
    rng: np.random.Generator, s: Any, n: int, k: int, lead: tuple[int, ...] = ()
) -> list[np.ndarray]:
    """Random packed codes, fp16 scales and zeros of an [*lead, N, K] weight in `n16k32`.

    Every uint32 pattern is a valid packing, so random words stand for packed codes.
    """
    from modec.numerics.packing import codes_shape, params_shape

    return [
        rng.integers(0, 2**32, (*lead, *codes_shape(n, k, s)), dtype=np.uint32),
        (rng.random((*lead, *params_shape(n, k, s))) * 0.02).astype(np.float16),
        rng.integers(0, s.qmax + 1, (*lead, *params_shape(n, k, s)), dtype=np.uint8),
    ]


def dram_read_rate(trials: int = 3) -> float:
    """Bytes/s of onnxruntime's fp32 GEMV over a 1 GiB weight (K=2048, N=131072).

    The median of 7 calls swings between about 16 and 30 GB/s from one session to the next
    on this machine, so the rate is the best of `trials` sessions' medians (each printed):
    the highest demonstrated rate gives the tightest bound.
    """
    k, n = 2048, GIB // (4 * 2048)
    x = np.ones((1, k), np.float32)
    rates = []
    for _ in range(trials):
        w = np.ones((k, n), np.float32)
        sess = ort_matmul(w, 1)
        t = timeit(functools.partial(sess.run, None, {"x": x}), runs=7, min_s=0.0)
        rates.append(w.nbytes / t)
        del sess, w
    print(f"# onnxruntime fp32 GEMV read rates over 1 GiB: {[round(r / 1e9, 2) for r in rates]}")
    return max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="only the paper shapes and M=1")
    ap.add_argument("--no-dram", action="store_true", help="skip the 1 GiB streaming section")
    ap.add_argument(
        "--sections", default="dense,grouped,dram",
        help="comma-separated sections to run: dense, grouped, dram (default: all), and "
        "decode (GEMV with and without in-place decoding, side by side; not in the default)",
    )  # fmt: skip
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if args.no_dram:
        sections.discard("dram")
    known = {"dense", "grouped", "dram", "decode"}
    if sections - known:
        ap.error(f"--sections: unknown {sorted(sections - known)}; choose from {sorted(known)}")
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(THREADS)
    blas = [(i.get("internal_api"), i.get("architecture")) for i in threadpool_info()]
    print(f"# threads={THREADS} blas={blas} load={os.getloadavg()}")
    bw = dram_read_rate()
    print(f"# DRAM read rate (best onnxruntime fp32 GEMV over 1 GiB): {bw / 1e9:.2f} GB/s")
    rng = np.random.default_rng(0)
    shapes = SHAPES[2:] if args.quick else SHAPES
    ms = (1,) if args.quick else (1, 16, 64)
    if "dense" in sections:
        dense_table(rng, shapes, ms, bw)
    if "grouped" in sections:
        grouped_table(rng)
    if "dram" in sections:
        dram_table(rng, bw)
    if "decode" in sections:
        decode_table(rng)


def dense_table(rng: np.random.Generator, shapes: list[tuple[int, int]], ms: tuple[int, ...],
                bw: float) -> None:  # fmt: skip
    """The per-shape table: modec vs MatMulNBits, onnxruntime fp32, numpy, the bound."""
    import tvm

    from modec.kernels import build_dequant_matmul
    from modec.numerics.packing import dequantize, pack
    from modec.numerics.schemes import QuantScheme

    dev = tvm.cpu()
    print(
        "| N | K | M | bits | modec µs | MatMulNBits µs | ORT fp32 µs | numpy fp32 µs | "
        "bound µs | NBits/modec | fp32/modec | bound/modec |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, k in shapes:
        for m in ms:
            x = rng.standard_normal((m, k)).astype(np.float32)
            t_fp32: float | None = None
            t_np: float | None = None
            for bits in WIDTHS:
                s = QuantScheme(bits, GROUP)
                g = s.num_groups(k)
                q = rng.integers(0, s.qmax + 1, (n, k), dtype=np.uint8)
                sc = (rng.random((n, g)) * 0.02 + 0.001).astype(np.float16)
                z = rng.integers(0, s.qmax + 1, (n, g), dtype=np.uint8)
                pw = pack(q, sc, z, s)
                kern = build_dequant_matmul(s, n, k, m=1 if m == 1 else None)
                targs = [tvm.runtime.tensor(a, dev) for a in (x, pw.codes, pw.scale, pw.zero)]
                targs.append(tvm.runtime.empty((m, n), "float32", dev))
                t_modec = timeit(functools.partial(kern.run, *targs))
                if t_fp32 is None:
                    w = dequantize(q, sc, z, s)
                    wt = np.ascontiguousarray(w.T)
                    sess = ort_matmul(wt, m)
                    t_fp32 = timeit(functools.partial(sess.run, None, {"x": x}))
                    t_np = timeit(functools.partial(np.matmul, x, wt))
                t_nb: float | None = None
                if bits in (2, 4, 8):
                    try:
                        nb = ort_matmulnbits(q, sc, z, bits, m)
                        t_nb = timeit(functools.partial(nb.run, None, {"A": x}))
                    except Exception as exc:  # report, do not hide, an unsupported width
                        print(f"# MatMulNBits bits={bits}: {type(exc).__name__}: {exc!s:.120}")
                bound = pw.nbytes / bw
                nb_s = f"{t_nb * 1e6:.1f}" if t_nb else "n/a"
                nb_r = f"{t_nb / t_modec:.2f}" if t_nb else "n/a"
                assert t_np is not None
                print(
                    f"| {n} | {k} | {m} | {bits} | {t_modec * 1e6:.1f} | {nb_s} | "
                    f"{t_fp32 * 1e6:.1f} | {t_np * 1e6:.1f} | {bound * 1e6:.1f} | {nb_r} | "
                    f"{t_fp32 / t_modec:.2f} | {bound / t_modec:.2f} |",
                    flush=True,
                )


def grouped_table(rng: np.random.Generator) -> None:
    """The grouped MoE kernel against one dense kernel call per expert (same total work)."""
    import tvm

    from modec.kernels import build_dequant_matmul, build_grouped_moe_matmul
    from modec.numerics.schemes import QuantScheme

    dev = tvm.cpu()
    print("\n## Grouped MoE kernel (E experts of one width, `tok` tokens each)")
    print("| N | K | bits | E | tok | grouped µs | E x dense µs | dense/grouped |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in SHAPES[2:]:
        for bits in WIDTHS:
            s = QuantScheme(bits, GROUP)
            for e, tok in ((4, 1), (1, 16), (4, 16), (1, 64)):
                codes, sc, zs = random_packed_words(rng, s, n, k, (e,))
                x = rng.standard_normal((e * tok, k)).astype(np.float32)
                indptr = np.arange(e + 1, dtype=np.int64) * tok
                grouped = build_grouped_moe_matmul(s, n, k, e)
                gargs = [tvm.runtime.tensor(a, dev) for a in (x, indptr, codes, sc, zs)]
                gargs.append(tvm.runtime.empty((e * tok, n), "float32", dev))
                t_g = timeit(functools.partial(grouped.run, *gargs))
                dense = build_dequant_matmul(s, n, k, m=1 if tok == 1 else None)
                calls: list[Callable[[], Any]] = []
                for i in range(e):
                    a = [x[i * tok : (i + 1) * tok], codes[i], sc[i], zs[i]]
                    targs = [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in a]
                    targs.append(tvm.runtime.empty((tok, n), "float32", dev))
                    calls.append(functools.partial(dense.run, *targs))
                t_d = timeit(functools.partial(_run_all, calls))
                print(
                    f"| {n} | {k} | {bits} | {e} | {tok} | {t_g * 1e6:.1f} | "
                    f"{t_d * 1e6:.1f} | {t_d / t_g:.2f} |",
                    flush=True,
                )


def decode_table(rng: np.random.Generator) -> None:
    """The GEMV with shift-and-subtract decoding against in-place decoding, side by side."""
    import tvm

    from modec.kernels import dequant_matmul
    from modec.kernels.target import resolve_target
    from modec.numerics.schemes import QuantScheme

    dev, tgt = tvm.cpu(), resolve_target("llvm")
    print("\n## GEMV decode: shift + magic-float subtract vs in place (CPU_GEMV_IN_PLACE)")
    print("| N | K | bits | shift µs | in place µs | speed-up |")
    print("|---|---|---|---|---|---|")
    default = dequant_matmul.CPU_GEMV_IN_PLACE
    try:
        for n, k in SHAPES[2:]:
            for bits in WIDTHS:
                s = QuantScheme(bits, GROUP)
                a = [rng.standard_normal((1, k)).astype(np.float32)]
                a += random_packed_words(rng, s, n, k)
                targs = [tvm.runtime.tensor(v, dev) for v in a]
                targs.append(tvm.runtime.empty((1, n), "float32", dev))
                times = []
                for in_place in (False, True):
                    dequant_matmul.CPU_GEMV_IN_PLACE = in_place
                    mod = dequant_matmul.primfunc(s, n, k, tgt, m=1)
                    kern = tvm.compile(mod, target=tgt)
                    times.append(timeit(functools.partial(kern, *targs)))
                print(
                    f"| {n} | {k} | {bits} | {times[0] * 1e6:.1f} | {times[1] * 1e6:.1f} | "
                    f"{times[0] / times[1]:.2f} |",
                    flush=True,
                )
    finally:
        dequant_matmul.CPU_GEMV_IN_PLACE = default


def _run_all(calls: list[Callable[[], Any]]) -> None:
    for call in calls:
        call()


def dram_table(rng: np.random.Generator, bw: float) -> None:
    """One wide GEMV per width over >= 1 GiB of packed weights (DRAM-bound)."""
    import tvm

    from modec.kernels import build_dequant_matmul
    from modec.numerics.packing import codes_shape
    from modec.numerics.schemes import QuantScheme

    dev = tvm.cpu()
    print("\n## DRAM-streaming GEMV (M=1, K=2048, >= 1 GiB of packed weights per call)")
    print(
        "| bits | N | packed GiB | modec ms | GB/s | G weights/s | bound ms | bound/modec "
        "| MatMulNBits ms | layout read GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    k = 2048
    x = rng.standard_normal((1, k)).astype(np.float32)
    for bits in WIDTHS:
        s = QuantScheme(bits, GROUP)
        n = int(np.ceil(GIB * 8 / (k * bits) / 16) * 16)
        codes, sc, zs = random_packed_words(rng, s, n, k)
        nbytes = codes.nbytes + sc.nbytes + zs.nbytes
        kern = build_dequant_matmul(s, n, k, m=1)
        targs = [tvm.runtime.tensor(a, dev) for a in (x, codes, sc, zs)]
        targs.append(tvm.runtime.empty((1, n), "float32", dev))
        del codes
        t = timeit(functools.partial(kern.run, *targs), runs=7, min_s=0.0)
        read = layout_read_kernel(codes_shape(n, k, s))
        out = tvm.runtime.empty((codes_shape(n, k, s)[0] // READ_TILE, 16), "uint32", dev)
        t_read = timeit(functools.partial(read, targs[1], out), runs=7, min_s=0.0)
        del targs
        t_nb_s = "n/a"
        if bits == 4:
            qn = rng.integers(0, 16, (n, k), dtype=np.uint8)
            nb = ort_matmulnbits(
                qn, sc.swapaxes(1, 2).reshape(n, -1), zs.swapaxes(1, 2).reshape(n, -1), 4, 1
            )
            del qn
            t_nb = timeit(functools.partial(nb.run, None, {"A": x}), runs=7, min_s=0.0)
            t_nb_s = f"{t_nb * 1e3:.1f}"
            del nb
        print(
            f"| {bits} | {n} | {nbytes / GIB:.2f} | {t * 1e3:.1f} | {nbytes / t / 1e9:.2f} | "
            f"{n * k / t / 1e9:.1f} | "
            f"{nbytes / bw * 1e3:.1f} | {nbytes / bw / t:.2f} | {t_nb_s} | "
            f"{nbytes / t_read / 1e9:.2f} |",
            flush=True,
        )


#: Row blocks per thread tile of `layout_read_kernel` (the GEMV's `CPU_NI`).
READ_TILE = 4


def layout_read_kernel(shape: tuple[int, ...]) -> Any:
    """XOR-reduce packed codes [nb, kb, bits, 16] in the GEMV's access order, no decode.

    Threads over tiles of `READ_TILE` row blocks; per k-block, every row block's `bits` words
    of 16 lanes. Its read rate is what the GEMV could reach if decoding were free: the
    layout's own limit, separate from the decode cost.
    """
    import tvm
    from tvm.script import tirx as T

    from modec.kernels.target import resolve_target

    nb, kb, bits, lanes = shape
    tiles = nb // READ_TILE

    @T.prim_func(s_tir=False)
    def read(
        codes: T.Buffer((nb, kb, bits, lanes), "uint32"),  # type: ignore[valid-type]
        out: T.Buffer((tiles, lanes), "uint32"),  # type: ignore[valid-type]
    ) -> None:
        for tb in T.parallel(tiles):
            acc = T.alloc_buffer((lanes,), "uint32", scope="local")
            for lane in T.vectorized(lanes):
                acc[lane] = T.uint32(0)
            for blk in T.serial(kb):
                for ri in T.unroll(READ_TILE):
                    for w in T.unroll(bits):
                        for lane in T.vectorized(lanes):
                            acc[lane] = acc[lane] ^ codes[tb * READ_TILE + ri, blk, w, lane]
            for lane in T.vectorized(lanes):
                out[tb, lane] = acc[lane]

    return tvm.compile(read, target=resolve_target("llvm"))


if __name__ == "__main__":
    main()
