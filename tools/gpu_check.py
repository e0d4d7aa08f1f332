"""The prepared GPU check of CUDA artifacts: build here, run once on the GPU.

GPU time is scarce and the GPU machine has no TVM compiler, so the check has two halves:

    python -m tools.gpu_check prepare --dir .gpu     # here: TVM compiler + nvcc, no GPU needed
    python -m tools.gpu_check run --dir .gpu --out OUT   # the GPU machine

``prepare`` writes into DIR everything ``run`` needs: the kernel modules (compiled ahead of
time into fatbins, `modec.kernels.cuda_aot`) and a JSON list of them, the bundled digits-vlm
compiled for CUDA (``modec compile ... --target cuda``) with the simulated model's logits on
the first eval batches and its accuracy on the whole eval set, the C++ runtime and its example
app, and the TVM runtime libraries (``lib/``), which the Python runtime finds through
``MODEC_TVM_LIBRARY_PATH``. ``run`` needs numpy, torch (timing with CUDA events, the copy
bandwidth, the fp16 ``matmul`` baseline) and ``apache-tvm-ffi``; it imports no TVM compiler.

``run`` checks and measures, each section on its own (one failing section does not stop the
rest), and writes ``results.json`` and ``results.md`` (the table, also printed last):

1. every kernel against the numpy reference (`modec.numerics.packing`), on fresh random
   inputs, the output poisoned with NaN before the call: ‖y − ref‖ / ‖ref‖; the routing
   sorts against numpy's stable argsort, exactly;
2. the HBM bound: a device-to-device copy (bytes read + written per second);
3. the decode GEMV (one token) at 2/3/4/8 bits: GB/s (packed codes + scales + zeros + x + y
   over the median time), % of the bound, and against torch fp16 ``matmul`` on a weight of
   the same shape (time ratio);
4. the grouped MoE kernel at the paper's shapes (128 experts, hidden 2048, intermediate 768,
   top-8) for 1, 8 and 64 tokens: GB/s over the experts the routing touches;
5. the CUDA artifact against the simulated model on the bundled eval set: the largest relative
   logit difference on the stored batches, and the accuracy on all of it;
   end-to-end generation on the paper-shaped decoder (2 layers of Qwen3-VL-30B-A3B's
   decoder, random weights: model.so and the manifest travel, the weights are filled with
   random values on the GPU machine), prefill and decode tokens/s at batch 1 and 8, dense
   weights as stored and at 4 bits, against the HBM bound;
6. the C++ example app (``modec_run --device cuda``) on one batch against the Python runtime.

Timing: a region of ``--iters`` launches between CUDA events, its median over ``--repeats``
regions, weights rotated over copies that together exceed the L2 several times so that no
launch reads from cache. Launches of the small grouped kernels are captured into a CUDA graph
where possible (the Python launch costs more than the kernel).

``tools/gpu_check.sh`` runs both halves on a machine with a GPU and modec installed, or
``run`` alone on a prepared directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: Group size of every kernel here (the paper's and our default).
GROUP = 128
BITS = (2, 3, 4, 8)
#: Decode GEMV shape: a 70B-class FFN projection (N x K), large enough to leave the L2.
GEMV_N, GEMV_K = 28672, 8192
#: Paper MoE layer (Qwen3-VL-30B-A3B): experts, hidden, intermediate, top-k.
PAPER_E, PAPER_H, PAPER_I, PAPER_TOPK = 128, 2048, 768, 8
MOE_TOKENS = (1, 8, 64)
#: The paper-shaped decoder of the end-to-end decode (tools/paper_checkpoint.py): its layers,
#: prompt tokens, new tokens and batches, and the build variants (dense weights as stored, or
#: --dense-bits 4; 0: none). Only model.so, the manifest and the weights' safetensors header travel:
#: the GPU machine fills the weights with random values of the right dtypes and shapes.
PAPER_LAYERS, PAPER_PROMPT, PAPER_NEW, PAPER_BATCHES = 2, 256, 32, (1, 8)
PAPER_VARIANTS = {"paper-cuda": 0, "paper-cuda-dense4": 4}
#: Tokens the routing sort is checked and timed at (decode, batched decode, prefill).
SORT_TOKENS = (1, 8, 64, 4096)
#: Small odd shapes (padding in N and K) for correctness.
SMALL_N, SMALL_K, SMALL_E = 37, 200, 3
#: Eval prompts the generation check decodes from, and the tokens it generates.
GEN_ROWS, GEN_TOKENS = 4, 16
#: Eval batches whose simulated logits are stored (64 samples each).
REFERENCE_BATCHES = 4
BATCH = 64


# ---- prepare (the build machine) ------------------------------------------------------------


def _kernel_specs() -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for bits in BITS:
        specs.append(dict(kind="dense", bits=bits, n=SMALL_N, k=SMALL_K, m=1, group=64))
        specs.append(dict(kind="dense", bits=bits, n=SMALL_N, k=SMALL_K, m=None, group=64))
        specs.append(dict(kind="grouped", bits=bits, n=SMALL_N, k=SMALL_K, e=SMALL_E, group=64))
        specs.append(dict(kind="dense", bits=bits, n=GEMV_N, k=GEMV_K, m=1, group=GROUP))
        specs.append(dict(kind="grouped", bits=bits, n=PAPER_I, k=PAPER_H, e=PAPER_E, group=GROUP))
        specs.append(dict(kind="grouped", bits=bits, n=PAPER_H, k=PAPER_I, e=PAPER_E, group=GROUP))
    for i, s in enumerate(specs):
        m = {None: "m", 1: "m1"}.get(s.get("m"), "")
        s["file"] = f"k{i:02d}_{s['kind']}_w{s['bits']}_{s['n']}x{s['k']}{m}.so"
    # The routing sort: block-parallel and the one-thread serial kernel it replaces.
    for e, topk, parallel in ((PAPER_E, PAPER_TOPK, True), (PAPER_E, PAPER_TOPK, False),
                              (SMALL_E + 2, 3, True)):  # fmt: skip
        name = "parallel" if parallel else "serial"
        specs.append(dict(kind="sort", e=e, topk=topk, parallel=parallel,
                          file=f"k{len(specs):02d}_sort_{name}_e{e}_k{topk}.so"))  # fmt: skip
    return specs


def _build_kernels(out: Path, archs: list[str]) -> None:
    import tvm

    from modec.kernels import dequant_matmul, grouped_moe
    from modec.kernels.cuda_aot import export_cuda_library
    from modec.kernels.target import resolve_target
    from modec.lowering.moe_sort import sort_primfunc
    from modec.numerics.schemes import QuantScheme

    tgt = resolve_target({"kind": "cuda", "arch": archs})
    specs = _kernel_specs()
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    for s in specs:
        if s["kind"] == "sort":
            f = sort_primfunc(s["e"], s["topk"], gpu=True, parallel=s["parallel"])
            mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
        elif s["kind"] == "dense":
            scheme = QuantScheme(s["bits"], s["group"])
            mod = dequant_matmul.primfunc(scheme, s["n"], s["k"], tgt, m=s["m"])
        else:
            scheme = QuantScheme(s["bits"], s["group"])
            mod = grouped_moe.primfunc(scheme, s["n"], s["k"], s["e"], tgt, index_dtype="int32")
        with tgt:
            ex = tvm.compile(mod, target=tgt)
        export_cuda_library(ex, str(out / "kernels" / s["file"]), archs, ["-Wl,--strip-debug"])
        print(f"  built {s['file']}", flush=True)
    (out / "kernels.json").write_text(json.dumps(specs, indent=1))


def _compile_bundled(out: Path, archs: list[str]) -> None:
    ex = ROOT / "examples" / "digits-vlm"
    target = json.dumps({"kind": "cuda", "arch": archs})
    art = out / "digits-cuda"
    cmd = [sys.executable, "-m", "modec.cli", "compile", str(ex / "model.onnx"), "--calib",
           str(ex / "calib.npz"), "--budget", "3.0", "--target", target, "-o", str(art),
           "--force"]  # fmt: skip
    subprocess.run(cmd, check=True)


def _compile_cached(out: Path, archs: list[str]) -> None:
    """digits-vlm exported with a KV cache, compiled for CUDA (RTN 4-bit: the generation
    check needs the cache, not MODE's allocation), and four eval prompts."""
    import tempfile

    from modec import data
    from modec.driver import CompileOptions, compile_model
    from tools.digits_vlm.export import export_cached, trained_from_onnx

    ex = ROOT / "examples" / "digits-vlm"
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model_kv.onnx"
        export_cached(trained_from_onnx(ex / "model.onnx"), onnx_path)
        for name in ("tokenizer.json", "processor.json"):
            shutil.copyfile(ex / name, Path(tmp) / name)
        target = json.dumps({"kind": "cuda", "arch": archs})
        o = CompileOptions(method="uniform", quantizer="rtn", budget=4.0, target=target,
                           cache_dir=None)  # fmt: skip
        compile_model(onnx_path, ex / "calib.npz", out / "cached-cuda", o, force=True)
    (out / "cached-cuda" / "model.sim.onnx").unlink()
    ds = data.load(ex / "eval.npz")
    _, feeds = next(ds.subset(np.arange(GEN_ROWS)).batches(GEN_ROWS))
    for name, a in feeds.items():
        np.save(out / f"gen_in_{name}.npy", a)


def _compile_paper(out: Path, archs: list[str], work: Path) -> None:
    """The paper-shaped decoder (random weights) compiled for CUDA, uniform 3-bit RTN
    experts, dense weights as stored and at 4 bits; into ``out`` go model.so, the manifest
    and the safetensors header of the weights. ``work`` keeps the checkpoint, its export and
    the analysis cache (GBs; `tools.bench_decode`'s ``WORK/paper-L2`` is the same
    checkpoint), not the builds."""
    from dataclasses import replace

    from modec.driver import CompileOptions, compile_model
    from tools import paper_checkpoint
    from tools.bench_decode import random_calib

    d = work / "hf"
    if not (d / "config.json").exists():
        paper_checkpoint.build(d, PAPER_LAYERS)
    calib = random_calib(work / "calib.npz")
    target = json.dumps({"kind": "cuda", "arch": archs})
    o = CompileOptions(method="uniform", quantizer="rtn", budget=3.0, target=target,
                       cache_dir=str(work / "cache"))  # fmt: skip
    for name, dense_bits in PAPER_VARIANTS.items():
        art = work / name
        compile_model(d, calib, art, replace(o, dense_bits=dense_bits), force=True)
        dest = out / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in ("manifest.json", "model.so"):
            shutil.copy2(art / f, dest / f)
        with open(art / "weights.safetensors", "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            (dest / "weights.header").write_bytes(int(n).to_bytes(8, "little") + fh.read(n))
        shutil.rmtree(art)  # GBs (the simulated model above all); the header is what travels


def _fill_weights(art: Path, seed: int = 0) -> float:
    """Write ``art/weights.safetensors`` from ``art/weights.header``: every tensor random
    (floats ~N(0, 0.02) but norms 1, packed codes any bits, zero points and scales small),
    then the manifest's size and SHA-256 of it. Returns the seconds it took."""
    import hashlib

    t = time.perf_counter()
    head = (art / "weights.header").read_bytes()
    header = json.loads(head[8:])
    rng = np.random.default_rng(seed)
    dtypes = {"F32": np.float32, "F16": np.float16, "U32": np.uint32, "U8": np.uint8,
              "I64": np.int64, "BF16": np.uint16}  # fmt: skip
    path = art / "weights.safetensors"
    with open(path, "wb") as fh:
        fh.write(head)
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: kv[1]["data_offsets"][0],
        )
        at = 0
        for name, e in entries:
            lo, hi = e["data_offsets"]
            fh.write(bytes(lo - at))
            dt, shape = dtypes[e["dtype"]], tuple(e["shape"])
            if dt == np.uint32:
                a = rng.integers(0, 2**32, shape, dtype=np.uint32)
            elif dt == np.uint8:
                a = rng.integers(0, 4, shape, dtype=np.uint8)
            elif name.endswith(".scale"):
                a = (rng.random(shape, dtype=np.float32) * 0.01 + 0.005).astype(dt)
            elif "norm" in name:
                a = np.ones(shape, dt)
            elif dt in (np.float32, np.float16):
                a = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)
            else:
                a = np.zeros(shape, dt)
            assert a.nbytes == hi - lo, name
            fh.write(a.tobytes())
            at = hi
    data_bytes = path.read_bytes()
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = {
        "bytes": len(data_bytes), "sha256": hashlib.sha256(data_bytes).hexdigest()
    }  # fmt: skip
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return time.perf_counter() - t


def _reference(out: Path) -> None:
    """The simulated model's logits on the first batches and its accuracy on all of eval."""
    from modec import data
    from modec.evaluate import evaluate
    from modec.output import SIM_MODEL
    from modec.runners import SimulatedRunner

    art = out / "digits-cuda"
    ds = data.load(ROOT / "examples" / "digits-vlm" / "eval.npz")
    sim = SimulatedRunner(art)
    logits: dict[str, Any] = {}
    for b, (_, feeds) in enumerate(ds.batches(BATCH)):
        if b == REFERENCE_BATCHES:
            break
        logits[f"b{b}"] = sim(feeds).astype(np.float32)
        if b == 0:
            for name, a in feeds.items():
                np.save(out / f"cxx_in_{name}.npy", a)
    np.savez_compressed(out / "sim_logits.npz", **logits)
    acc = evaluate(sim, ds, BATCH)
    (out / "sim_accuracy.json").write_text(
        json.dumps({k: getattr(acc, k).accuracy for k in ("overall", "multimodal", "text_only")})
    )
    # The simulated model stays here: the GPU machine compares against the stored logits.
    (art / SIM_MODEL).unlink()


def _copy_libraries(out: Path) -> None:
    import importlib.util

    from tools.cxx import build_runtime

    lib = out / "lib"
    lib.mkdir(parents=True, exist_ok=True)

    def package_lib(name: str) -> Path:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        return Path(spec.origin).parent / "lib"

    tvm_dir, ffi_dir = package_lib("tvm"), package_lib("tvm_ffi")
    for name in ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so"):
        shutil.copy2(tvm_dir / name, lib / name)
    shutil.copy2(ffi_dir / "libtvm_ffi.so", lib / "libtvm_ffi.so")
    cudart = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "lib" / "libcudart.so.13"
    if cudart.exists():
        shutil.copy2(cudart, lib / cudart.name)
    build = out / "cxx-build"
    if build_runtime(build):
        for p in build.iterdir():
            if p.name.startswith("libmodec") or p.name == "modec_run":
                shutil.copy2(p, lib / p.name, follow_symlinks=True)
        shutil.rmtree(build)


def _wheels(out: Path, python: str) -> None:
    """modec as a wheel (the GPU machine installs it without its dependencies) and
    ``apache-tvm-ffi`` for that machine's Python (it has no package registry)."""
    import tvm_ffi

    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)]
    subprocess.run([*pip, *build], check=True)
    ffi = f"apache-tvm-ffi=={tvm_ffi.__version__}"
    fetch = ["download", "--no-deps", "--only-binary=:all:", "--python-version", python,
             "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
             "-d", str(wheels)]  # fmt: skip
    subprocess.run([*pip, *fetch, ffi], check=True)


def prepare(args: argparse.Namespace) -> None:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    archs = list(args.arch)
    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("kernels", "kernels", lambda: _build_kernels(out, archs)),
        ("artifact", "bundled model for CUDA", lambda: _compile_bundled(out, archs)),
        ("reference", "simulated reference", lambda: _reference(out)),
        ("cached", "digits-vlm with a KV cache for CUDA", lambda: _compile_cached(out, archs)),
        (
            "paper",
            "the paper-shaped decoder for CUDA",
            lambda: _compile_paper(out, archs, Path(args.paper_work)),
        ),
        ("libs", "runtime libraries and the C++ app", lambda: _copy_libraries(out)),
        ("wheels", "wheels of modec and apache-tvm-ffi", lambda: _wheels(out, args.python)),
    ]
    for key, name, step in steps:
        if key not in args.steps:
            continue
        t = time.perf_counter()
        print(f"prepare: {name}", flush=True)
        step()
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"prepared {out}: {size / 2**20:.1f} MiB")


# ---- run (the GPU machine) ------------------------------------------------------------------


class Bench:
    """Kernels, timing and results on the GPU (torch for memory and events)."""

    def __init__(self, d: Path, iters: int, repeats: int) -> None:
        import torch
        import tvm_ffi
        from modec.runtime._tvm import Runtime

        self.rt = Runtime("cuda")  # loads libtvm_runtime_cuda.so
        self.torch, self.ffi, self.dir = torch, tvm_ffi, d
        self.iters, self.repeats = iters, repeats
        self.dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(0)
        self.l2 = int(getattr(props, "L2_cache_size", 60 << 20))
        self.results: dict[str, Any] = {
            "gpu": torch.cuda.get_device_name(0),
            "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(0)),
            "torch": torch.__version__,
            "host": platform.node(),
            "sections": {},
        }
        self.specs = json.loads((d / "kernels.json").read_text())
        self._mods: dict[str, Any] = {}

    # -- helpers --

    def kernel(self, spec: dict[str, Any]) -> Any:
        f = spec["file"]
        if f not in self._mods:
            self._mods[f] = self.ffi.load_module(str(self.dir / "kernels" / f))
        return self._mods[f]["main"]

    def gpu(self, a: np.ndarray) -> Any:
        """A TVM tensor on the GPU holding a copy of ``a`` (TVM's own allocation: torch's
        DLPack export of uint32 tensors varies between versions)."""
        return self.rt.tensor(a)

    def time_ms(self, launch: Callable[[int], None], graph: bool = False) -> float:
        """Median over repeats of (time of `iters` launches) / iters, in ms."""
        torch = self.torch
        for i in range(3):
            launch(i)
        torch.cuda.synchronize()
        region: Callable[[], None]
        if graph:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), self.ffi.use_torch_stream():
                for i in range(2):
                    launch(i)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            with torch.cuda.graph(g), self.ffi.use_torch_stream():
                for i in range(self.iters):
                    launch(i)
            region = g.replay
        else:

            def region() -> None:
                for i in range(self.iters):
                    launch(i)

        times = []
        for _ in range(self.repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            region()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / self.iters)
        return float(np.median(times))

    def copies(self, nbytes: int) -> int:
        """How many copies of an `nbytes` buffer to rotate over (>= 4x the L2 together)."""
        return max(1, -(-4 * self.l2 // max(nbytes, 1)))

    # -- sections --

    def hbm(self) -> dict[str, Any]:
        torch = self.torch
        n = 2 << 30
        src = torch.empty(n, dtype=torch.uint8, device=self.dev)
        src.random_(0, 255)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda i: dst.copy_(src))
        gbs = 2 * n / (ms * 1e-3) / 1e9
        self.bound = gbs
        return {"bytes": n, "ms": ms, "GB/s (read+write)": gbs}

    def correctness(self) -> list[dict[str, Any]]:
        from modec.numerics.schemes import QuantScheme

        rows = []
        rng = np.random.default_rng(int(time.time()))
        for s in self.specs:
            if s["kind"] == "sort":
                rows.append(self._sort_correct(s, rng))
                print(f"  correctness {rows[-1]}", flush=True)
                continue
            scheme = QuantScheme(s["bits"], s["group"])
            row: dict[str, Any] = {k: s[k] for k in ("kind", "bits", "n", "k")}
            try:
                pw = _random_packed(rng, scheme, s["n"], s["k"], s.get("e"))
                if s["kind"] == "dense":
                    m = 5 if s["m"] is None else 1
                    x = rng.standard_normal((m, s["k"])).astype(np.float16)
                    indptr = None
                    args: list[np.ndarray] = [x]
                else:
                    tokens = 7 if s["e"] == SMALL_E else 64 * PAPER_TOPK
                    counts = np.bincount(rng.integers(0, s["e"], tokens), minlength=s["e"])
                    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
                    x = rng.standard_normal((tokens, s["k"])).astype(np.float16)
                    args = [x, indptr]
                want, part = _reference_rows(s, x, indptr, pw)
                ts = [self.gpu(a) for a in (*args, pw.codes, pw.scale, pw.zero)]
                y = self.gpu(np.full((x.shape[0], s["n"]), np.nan, np.float16))  # poisoned
                self.kernel(s)(*ts, y)
                got = self.rt.numpy(y).astype(np.float32)[part]
                err = float(np.linalg.norm(got - want)) / max(float(np.linalg.norm(want)), 1e-30)
                row.update(
                    m=x.shape[0], rel_err=err, ok=bool(np.isfinite(got).all() and err < 5e-3)
                )
            except Exception as exc:  # a failed kernel is a row, not the end of the run
                row.update(ok=False, error=_last_line(exc))
            rows.append(row)
            print(f"  correctness {row}", flush=True)
        return rows

    def _sort_args(self, e: int, topk: int, tokens: int, rng: np.random.Generator) -> Any:
        """Routing of ``tokens`` tokens (top-k distinct experts each, a few out of range,
        which the kernel clamps), a rank permutation, NaN-free poisoned outputs."""
        experts = np.stack([rng.choice(e, topk, replace=False) for _ in range(tokens)])
        experts = experts.reshape(tokens, topk).astype(np.int64)
        if tokens:
            experts[0, 0] = e + 3
        rank = rng.permutation(e).astype(np.int64)
        outs = [np.full(tokens * topk, -7, np.int64) for _ in range(3)]
        return experts, rank, [*outs, np.full(e + 1, -7, np.int64)]

    def _sort_correct(self, s: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """The sort against numpy's stable argsort at every SORT_TOKENS: exact or fail."""
        row: dict[str, Any] = {"kind": "sort", "experts": s["e"], "top_k": s["topk"],
                               "parallel": s["parallel"]}  # fmt: skip
        try:
            bad = []
            for tokens in SORT_TOKENS:
                experts, rank, outs = self._sort_args(s["e"], s["topk"], tokens, rng)
                ts = [self.gpu(a) for a in (experts, rank, *outs)]
                self.kernel(s)(*ts)
                tok, eid, inv, offsets = (self.rt.numpy(t) for t in ts[2:])
                flat = np.clip(experts.ravel().astype(np.int64), 0, s["e"] - 1)
                order = np.argsort(rank[flat], kind="stable")
                counts = np.bincount(rank[flat], minlength=s["e"])
                ok = (
                    np.array_equal(tok, order // s["topk"])
                    and np.array_equal(eid, flat[order])
                    and np.array_equal(inv[order], np.arange(flat.size))
                    and np.array_equal(offsets, np.concatenate([[0], np.cumsum(counts)]))
                )
                if not ok:
                    bad.append(tokens)
            row.update(tokens=list(SORT_TOKENS), ok=not bad, wrong_at_tokens=bad)
        except Exception as exc:
            row.update(ok=False, error=_last_line(exc))
        return row

    def sort(self) -> list[dict[str, Any]]:
        """The routing sort at the paper's 128 experts, top-8: parallel against serial."""
        rows = []
        rng = np.random.default_rng(3)
        for s in self.specs:
            if s["kind"] != "sort" or s["e"] != PAPER_E:
                continue
            f = self.kernel(s)
            for tokens in SORT_TOKENS:
                experts, rank, outs = self._sort_args(s["e"], s["topk"], tokens, rng)
                ts = [self.gpu(a) for a in (experts, rank, *outs)]

                def launch(i: int, f: Any = f, ts: Any = ts) -> None:
                    f(*ts)

                try:
                    ms, how = self.time_ms(launch, graph=True), "graph"
                except Exception as exc:
                    print(f"  graph capture failed ({_last_line(exc)})", flush=True)
                    ms, how = self.time_ms(launch), "launches"
                rows.append({"kernel": "parallel" if s["parallel"] else "serial",
                             "tokens": tokens, "ms": ms, "timed": how})  # fmt: skip
                print(f"  sort {rows[-1]}", flush=True)
        return rows

    def gemv(self) -> list[dict[str, Any]]:
        torch = self.torch
        from modec.numerics.schemes import QuantScheme

        rows = []
        rng = np.random.default_rng(1)
        n, k = GEMV_N, GEMV_K
        # torch fp16 baseline: y = x @ W^T with W [N, K] fp16.
        wbytes = n * k * 2
        ws = [
            torch.randn(n, k, dtype=torch.float16, device=self.dev)
            for _ in range(self.copies(wbytes))
        ]
        x16 = torch.randn(1, k, dtype=torch.float16, device=self.dev)
        ms16 = self.time_ms(lambda i: torch.nn.functional.linear(x16, ws[i % len(ws)]))
        ws.clear()
        for s in self.specs:
            if s["kind"] != "dense" or s["n"] != n or s["m"] != 1:
                continue
            scheme = QuantScheme(s["bits"], s["group"])
            pw = _random_packed(rng, scheme, n, k, None)
            nbytes = pw.codes.nbytes + pw.scale.nbytes + pw.zero.nbytes + 2 * (k + n)
            sets = [tuple(self.gpu(a) for a in (pw.codes, pw.scale, pw.zero))
                    for _ in range(self.copies(nbytes))]  # fmt: skip
            x = self.gpu(x16.cpu().numpy())
            y = self.gpu(np.zeros((1, n), np.float16))
            f = self.kernel(s)

            def launch(i: int, f: Any = f, sets: Any = sets, x: Any = x, y: Any = y) -> None:
                f(x, *sets[i % len(sets)], y)

            ms = self.time_ms(launch)
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append({
                "bits": s["bits"], "N": n, "K": k, "bytes": nbytes, "ms": ms, "GB/s": gbs,
                "% of bound": 100 * gbs / self.bound, "fp16 matmul ms": ms16,
                "speedup vs fp16": ms16 / ms,
            })  # fmt: skip
            print(f"  gemv {rows[-1]}", flush=True)
            del sets
        return rows

    def moe(self) -> list[dict[str, Any]]:
        from modec.numerics.schemes import QuantScheme

        rows = []
        rng = np.random.default_rng(2)
        for s in self.specs:
            if s["kind"] != "grouped" or s["e"] != PAPER_E:
                continue
            scheme = QuantScheme(s["bits"], s["group"])
            n, k, e = s["n"], s["k"], s["e"]
            pw = _random_packed(rng, scheme, n, k, e)
            per_expert = (pw.codes.nbytes + pw.scale.nbytes + pw.zero.nbytes) // e
            sets = [tuple(self.gpu(a) for a in (pw.codes, pw.scale, pw.zero))
                    for _ in range(self.copies(per_expert * e))]  # fmt: skip
            f = self.kernel(s)
            for tokens in MOE_TOKENS:
                rows_n = tokens * PAPER_TOPK
                routes = []
                active = []
                for _ in range(16):
                    picks = np.stack(
                        [rng.choice(e, PAPER_TOPK, replace=False) for _ in range(tokens)]
                    )
                    counts = np.bincount(picks.ravel(), minlength=e)
                    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
                    routes.append(self.gpu(indptr))
                    active.append(int((counts > 0).sum()))
                x = self.gpu(rng.standard_normal((rows_n, k)).astype(np.float16))
                y = self.gpu(np.zeros((rows_n, n), np.float16))
                nbytes = float(np.mean(active)) * per_expert + 2 * rows_n * (k + n)

                def launch(i: int, f: Any = f, sets: Any = sets, x: Any = x, y: Any = y,
                           routes: Any = routes) -> None:  # fmt: skip
                    f(x, routes[i % len(routes)], *sets[i % len(sets)], y)

                try:
                    ms = self.time_ms(launch, graph=True)
                    how = "graph"
                except Exception as exc:  # graph capture unavailable: plain launches
                    print(
                        f"  graph capture failed ({_last_line(exc)}); timing launches", flush=True
                    )
                    ms = self.time_ms(launch)
                    how = "launches"
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({
                    "bits": s["bits"], "N": n, "K": k, "tokens": tokens,
                    "active experts": float(np.mean(active)), "bytes": nbytes, "ms": ms,
                    "GB/s": gbs, "% of bound": 100 * gbs / self.bound, "timed": how,
                })  # fmt: skip
                print(f"  moe {rows[-1]}", flush=True)
            del sets
        return rows

    def artifact(self) -> dict[str, Any]:
        from modec import data
        from modec.evaluate import evaluate
        from modec.runners import CompiledRunner

        art = self.dir / "digits-cuda"
        runner = CompiledRunner(art, device="cuda")
        ds = data.load(ROOT / "examples" / "digits-vlm" / "eval.npz")
        ref = np.load(self.dir / "sim_logits.npz")
        worst = 0.0
        for b, (idx, feeds) in enumerate(ds.batches(BATCH)):
            if b == REFERENCE_BATCHES:
                break
            got, want = runner(feeds), ref[f"b{b}"]
            real = ds.trimmed_modality(idx) != data.PAD
            worst = max(
                worst, float(np.abs(got[real] - want[real]).max() / np.abs(want[real]).max())
            )
            if b == 0:
                np.save(self.dir / "py_logits_b0.npy", got)
        t = time.perf_counter()
        acc = evaluate(runner, ds, BATCH)
        secs = time.perf_counter() - t
        sim = json.loads((self.dir / "sim_accuracy.json").read_text())
        out: dict[str, Any] = {"samples compared": REFERENCE_BATCHES * BATCH,
                               "max relative logit difference": worst,
                               "eval samples": len(ds), "eval seconds": secs}  # fmt: skip
        for k in ("overall", "multimodal", "text_only"):
            out[f"{k} accuracy (CUDA / simulated)"] = [getattr(acc, k).accuracy, sim[k]]
        out["accuracy equal"] = all(getattr(acc, k).accuracy == sim[k] for k in sim)
        return out

    def cxx(self) -> dict[str, Any]:
        app = self.dir / "lib" / "modec_run"
        if not app.exists():
            return {"skipped": "modec_run was not built by prepare"}
        ins = sorted(self.dir.glob("cxx_in_*.npy"))
        outdir = self.dir / "cxx-out"
        outdir.mkdir(exist_ok=True)
        cmd = [str(app), str(self.dir / "digits-cuda"), "--device", "cuda",
               *(f"{p.stem[len('cxx_in_'):]}={p}" for p in ins), "--out", str(outdir)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        res: dict[str, Any] = {"exit": proc.returncode, "stderr": proc.stderr[-500:]}
        outs = sorted(outdir.glob("*.npy"))
        py = self.dir / "py_logits_b0.npy"
        if proc.returncode == 0 and outs and py.exists():
            a, b = np.load(outs[0]), np.load(py)
            res["max |C++ - Python| / max |Python|"] = float(np.abs(a - b).max() / np.abs(b).max())
        return res

    def generation(self) -> dict[str, Any]:
        """Greedy generation on the GPU: the Python runtime with its KV cache against the same
        tokens recomputed without a cache (the whole sequence through ``main`` each step),
        and the C++ app (``modec_run --device cuda --generate``) against the Python runtime;
        decode tokens/s of the Python loop."""
        import modec.runtime as rt

        art = self.dir / "cached-cuda"
        session = rt.load(art, "cuda")
        feeds = {
            p.stem[len("gen_in_") :]: np.load(p) for p in sorted(self.dir.glob("gen_in_*.npy"))
        }
        session.generate(feeds, max_new_tokens=2)  # warm-up
        t = time.perf_counter()
        res = session.generate(feeds, max_new_tokens=GEN_TOKENS)
        secs = time.perf_counter() - t
        out: dict[str, Any] = {"rows": GEN_ROWS, "tokens per row": GEN_TOKENS,
                               "python tokens/s (prefill + decode)": GEN_ROWS * GEN_TOKENS / secs,
                               "python decode tokens/s": res.decode_tokens_per_second}  # fmt: skip
        # Recomputed without a cache.
        gen = session.manifest.sections["generation"]
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        picked = []
        for _ in range(GEN_TOKENS):
            inp = {**feeds, "input_ids": ids, "attention_mask": mask}
            for c in gen["cache"]:
                inp[c["past"]] = np.zeros((GEN_ROWS, c["heads"], 0, c["head_dim"]), np.float32)
            tok = session.run(inp)["logits"][:, -1].argmax(-1)
            picked.append(tok)
            ids = np.concatenate([ids, tok[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((GEN_ROWS, 1), mask.dtype)], axis=1)
        recomputed = np.stack(picked, axis=1).tolist()
        out["python tokens"] = res.tokens
        out["cached == recomputed"] = res.tokens == recomputed
        app = self.dir / "lib" / "modec_run"
        if app.exists():
            args = [f"{k}={self.dir / ('gen_in_' + k + '.npy')}" for k in feeds]
            cmd = [str(app), str(art), "--device", "cuda", "--generate", str(GEN_TOKENS), *args]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            rows = [[int(t) for t in line.partition(":")[2].split()]
                    for line in proc.stdout.splitlines() if line.startswith("tokens[")]  # fmt: skip
            out["C++ exit"] = proc.returncode
            out["C++ == python"] = rows == res.tokens
            out["C++ last line"] = (proc.stdout.strip().splitlines() or [proc.stderr[-300:]])[-1]
        return out

    def decode(self) -> list[dict[str, Any]]:
        """End-to-end generation on the paper-shaped decoder (random weights filled here):
        prefill and decode tokens/s at batch 1 and 8, and a batch-1 step's bytes against the
        HBM bound."""
        from modec.runtime import load

        from tools.bench_decode import paper_prompts, paper_step_bytes

        rows = []
        for name in PAPER_VARIANTS:
            art = self.dir / name
            if not (art / "weights.header").exists():
                continue
            fill_s = _fill_weights(art)
            sess = load(art, device="cuda")
            need = paper_step_bytes(art, PAPER_PROMPT + PAPER_NEW / 2)
            for b in PAPER_BATCHES:
                feeds = paper_prompts(b, PAPER_PROMPT)
                sess.generate(feeds, max_new_tokens=4)  # warm-up
                runs = [sess.generate(feeds, max_new_tokens=PAPER_NEW) for _ in range(3)]
                pre = float(np.median([g.prefill_seconds for g in runs]))
                dec = float(np.median([g.decode_seconds for g in runs]))
                row: dict[str, Any] = {"artifact": name, "batch": b, "prompt tokens": PAPER_PROMPT,
                       "prefill tok/s": b * PAPER_PROMPT / pre,
                       "decode tok/s": b * (PAPER_NEW - 1) / dec,
                       "MiB per step": need["total"] / 2**20,
                       "weights filled s": fill_s}  # fmt: skip
                if b == 1:
                    row["% of bound"] = (
                        100 * row["decode tok/s"] * need["total"] / (self.bound * 1e9)
                    )
                rows.append(row)
                print(f"  decode {row}", flush=True)
            del sess
            (art / "weights.safetensors").unlink()
        return rows

    def run(self, out: Path) -> None:
        sections: list[tuple[str, Callable[[], Any]]] = [
            ("hbm", self.hbm),
            ("correctness", self.correctness),
            ("gemv", self.gemv),
            ("moe", self.moe),
            ("sort", self.sort),
            ("artifact", self.artifact),
            ("decode", self.decode),
            ("cxx", self.cxx),
            ("generation", self.generation),
        ]
        for name, fn in sections:
            t = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                self.results["sections"][name] = fn()
            except Exception as exc:  # record and go on: the run is one shot
                traceback.print_exc()
                self.results["sections"][name] = {"error": _last_line(exc)}
            self.torch.cuda.empty_cache()
            print(f"   {time.perf_counter() - t:.1f} s", flush=True)
            (out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        md = render(self.results)
        (out / "results.md").write_text(md)
        print(md)


def _random_packed(
    rng: np.random.Generator, scheme: Any, n: int, k: int, experts: int | None
) -> Any:
    """Random packed weights, drawn packed: every uint32 word is a valid run of codes (a
    lane's `bits` words hold its 32 codes exactly), zeros in [0, qmax], fp16 scales; padding
    rows and columns hold random codes too, which the kernels must ignore."""
    from modec.numerics.packing import PackedWeight, codes_shape, params_shape

    lead = () if experts is None else (experts,)
    codes = rng.integers(0, 2**32, lead + codes_shape(n, k, scheme), dtype=np.uint32)
    shape = lead + params_shape(n, k, scheme)
    scale = (rng.random(shape, dtype=np.float32) * 0.05 + 0.01).astype(np.float16)
    zero = rng.integers(0, scheme.qmax + 1, shape, dtype=np.uint8)
    return PackedWeight(codes, scale, zero, scheme, n, k)


#: Rows of a large dense kernel's output the reference recomputes (whole 16-row blocks).
CHECK_ROWS = 256
#: Experts of a large grouped kernel whose rows the reference recomputes.
CHECK_EXPERTS = 4


def _reference_rows(
    s: dict[str, Any], x: np.ndarray, indptr: np.ndarray | None, pw: Any
) -> tuple[np.ndarray, Any]:
    """The reference output, or for large kernels a cheap part of it: (want, row/col index
    into the kernel's output). numpy dequantizes the whole weight, which takes seconds per
    large matrix: a slice of rows (dense) or the rows of a few experts (grouped) instead."""
    from modec.numerics.packing import PackedWeight, reference_grouped_matmul, reference_matmul

    x32 = x.astype(np.float32)
    if indptr is None:
        if s["n"] <= CHECK_ROWS:
            return reference_matmul(x32, pw), np.s_[:, :]
        b = CHECK_ROWS // 16
        part = PackedWeight(pw.codes[:b], pw.scale[:b], pw.zero[:b], pw.scheme, CHECK_ROWS, pw.k)
        return reference_matmul(x32, part), np.s_[:, :CHECK_ROWS]
    if s["e"] == SMALL_E:
        return reference_grouped_matmul(x32, indptr, pw), np.s_[:, :]
    stop = int(indptr[CHECK_EXPERTS])
    want = np.concatenate(
        [
            reference_matmul(x32[indptr[e] : indptr[e + 1]], pw.expert(e))
            for e in range(CHECK_EXPERTS)
        ]
    )
    return want, np.s_[:stop, :]


def _last_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


def render(r: dict[str, Any]) -> str:
    """The results as a markdown report."""
    s = r["sections"]
    out = [f"# GPU check: {r['gpu']} ({r['capability']}), torch {r['torch']}", ""]
    h = s.get("hbm", {})
    if "GB/s (read+write)" in h:
        out.append(
            f"HBM bound (device-to-device copy, read + write): {h['GB/s (read+write)']:.0f} GB/s"
        )
        out.append("")
    corr = s.get("correctness", [])
    if isinstance(corr, list):
        bad = [c for c in corr if not c.get("ok")]
        out.append(f"Kernels against the numpy reference: {len(corr) - len(bad)}/{len(corr)} pass "
                   "(‖y − ref‖/‖ref‖ < 5e-3)")  # fmt: skip
        worst = max((c.get("rel_err", 0.0) for c in corr), default=0.0)
        out.append(f"largest relative error {worst:.2e}")
        for c in bad:
            out.append(f"- FAIL {c}")
        out.append("")
    if isinstance(s.get("gemv"), list) and s["gemv"]:
        out += ["| GEMV N×K | bits | µs | GB/s | % of bound | fp16 matmul µs | speedup |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for g in s["gemv"]:
            out.append(
                f"| {g['N']}×{g['K']} | {g['bits']} | {1e3 * g['ms']:.1f} | {g['GB/s']:.0f} | "
                f"{g['% of bound']:.0f}% | {1e3 * g['fp16 matmul ms']:.1f} | "
                f"{g['speedup vs fp16']:.2f}× |"
            )
        out.append("")
    if isinstance(s.get("moe"), list) and s["moe"]:
        out += ["| grouped MoE N×K | bits | tokens | active experts | µs | GB/s | % of bound |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for g in s["moe"]:
            out.append(
                f"| {g['N']}×{g['K']} | {g['bits']} | {g['tokens']} | "
                f"{g['active experts']:.0f} | {1e3 * g['ms']:.1f} | {g['GB/s']:.0f} | "
                f"{g['% of bound']:.0f}% |"
            )
        out.append("")
    if isinstance(s.get("sort"), list) and s["sort"]:
        out += ["| routing sort (128 experts, top-8) | tokens | µs |", "|---|---|---|"]
        for g in s["sort"]:
            out.append(f"| {g['kernel']} | {g['tokens']} | {1e3 * g['ms']:.1f} |")
        out.append("")
    if isinstance(s.get("decode"), list) and s["decode"]:
        out += ["| paper-shaped decoder | batch | prefill tok/s | decode tok/s | MiB per step "
                "| % of bound |", "|---|---|---|---|---|---|"]  # fmt: skip
        for g in s["decode"]:
            share = f"{g['% of bound']:.0f}%" if "% of bound" in g else ""
            out.append(
                f"| {g['artifact']} | {g['batch']} | {g['prefill tok/s']:.0f} | "
                f"{g['decode tok/s']:.1f} | {g['MiB per step']:.1f} | {share} |"
            )
        out.append("")
    for name in ("artifact", "cxx", "generation"):
        if name in s:
            out.append(f"{name}: {json.dumps(s[name], default=str)}")
    for name in ("hbm", "correctness", "gemv", "moe", "sort", "decode"):
        if isinstance(s.get(name), dict) and "error" in s[name]:
            out.append(f"{name}: {s[name]['error']}")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build everything the GPU run needs (no GPU needed)")
    p.add_argument("--dir", default=".gpu")
    p.add_argument("--arch", nargs="+", default=["sm_90"], help="CUDA archs (default sm_90)")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (wheels)")
    p.add_argument("--paper-work", default="/tmp/modec-gpu-paper",
                   help="where the paper checkpoint and its full builds stay (GBs)")  # fmt: skip
    p.add_argument("--steps", nargs="+",
                   default=["kernels", "artifact", "reference", "cached", "paper", "libs",
                            "wheels"],
                   help="the steps to run (default: all)")  # fmt: skip
    r = sub.add_parser("run", help="check and measure on the GPU")
    r.add_argument("--dir", default=".gpu")
    r.add_argument("--out", default=".")
    r.add_argument("--iters", type=int, default=50)
    r.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args)
    else:
        d = Path(args.dir).resolve()
        os.environ.setdefault("MODEC_TVM_LIBRARY_PATH", str(d / "lib"))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        Bench(d, args.iters, args.repeats).run(out)


if __name__ == "__main__":
    main()
