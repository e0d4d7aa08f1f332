"""Prefill and decode speed of a generating artifact against onnxruntime and llama.cpp.

    python -m tools.bench_decode [--model bundled|paper] [--work /tmp/modec-bench-decode]
        [--batches 1 8] [--new-tokens 16] [--repeats 5] [--budget 3.0] [--threads 2]
        [--layers 2] [--prompt-tokens 256] [--llama-cpp-src DIR] [--profile | --profile-only]
        [--act8] [--no-ort] [--dense-only] [--cxx] [--json PATH]

``--model bundled`` (default), on the bundled digits-vlm (trained weights, its KV-cache
export, `tools.digits_vlm.export`):

1. builds, once, in WORK: ``model_kv.onnx`` (the cached decoder with its vision tower),
   ``model_text_kv.onnx`` (the same without ``pixel_values``: the text decoder an
   onnxruntime-genai-style pipeline runs after the prompt) and ``out/``, a modec compile of
   ``model_kv.onnx`` (``--method uniform --budget 3.0``: 3-bit GPTQ experts; the speed does
   not depend on which experts get which width, only on the packed bytes);
2. for each batch size, on the first multimodal prompts of ``eval.npz``:
   - **modec**: `modec.runtime.Session.generate` (greedy): ``main`` for the prompt, the
     ``decode`` entry per token, the cache kept in the VM's tensors;
   - **onnxruntime fp32**: ``model_kv.onnx`` for the prompt, ``model_text_kv.onnx`` per token,
     each step's ``present.*`` fed back as ``past_key_values.*`` (numpy arrays), greedy
     argmax;
   both with ``--threads`` threads, ``--repeats`` runs, medians reported: prefill tokens/s
   (prompt tokens / prefill time) and decode tokens/s (generated tokens after the first /
   decode time, token picking included);
3. the physical bound of a batch-1 decode step: the bytes it must read (the active experts'
   packed bytes, ``top_k`` per layer; every dense weight of the decode graph; the KV cache at
   the mean length) over this machine's copy bandwidth, measured in the same run (numpy
   copy of a 256 MiB buffer, bytes read and written per second): once before the runs and
   once in every round of the round robin (below), the bound taken from the median of the
   rounds (this shared machine's bandwidth drifts during a run as the runtimes' speeds do:
   29.0-31.5 GB/s before runs of one day).

``--model paper``: a random-weight Qwen3-MoE checkpoint with the paper model's decoder
layer (hidden 2048, 128 experts of intermediate 768, top-8, 32/4 heads of 128;
`tools.paper_checkpoint`, ``--layers`` layers, vocabulary 8192, float32) in
WORK/paper-L{layers}/:

1. ``hf/`` the checkpoint; ``out-{budget}/`` ``modec compile hf/`` (``--method uniform
   --quantizer rtn``: the speed depends on the packed widths only, and RTN saves GPTQ's
   ~200 s per layer) from 16 random prompts; the ONNX export modec made of the directory
   (with its KV cache, `modec.hf`) is the onnxruntime fp32 model, for the prompt (in
   pieces of 16 token-rows: its expert gathers would not fit otherwise, `OrtDecoder`) and
   the steps; ``hf-bf16/`` the same weights in bfloat16 and ``out-{budget}-bf16/`` its
   compile (the row "modec, bf16 checkpoint": dense weights kept in bf16, as from a real
   checkpoint);
2. with ``--llama-cpp-src`` (the ``vendor/llama.cpp`` folder of the ``llama-cpp-python``
   source package: ``pip download --no-binary :all: --no-deps llama-cpp-python`` and
   unpack; the ``llama_cpp`` module itself must be installed), llama.cpp's own converter
   (``convert_hf_to_gguf.py``, told that the locally trained tokenizer pre-tokenizes as
   ``qwen2``) writes an f16 GGUF and ``llama_model_quantize`` the ``--gguf-types`` (default
   Q4_K_M, Q3_K_M, Q2_K); each runs through llama.cpp's C API (`LlamaCppDecoder`: the rows
   as independent sequences of one context, every prompt in one batch, then one token per
   row per step, greedy, ``--threads`` threads), at every ``--batches`` size;
3. prompts of ``--prompt-tokens`` random tokens; the bound as above, the embedding table
   left out (a step reads one row of it), for modec and for each GGUF (its tensors' sizes,
   `gguf_step_bytes`; llama.cpp keeps its cache in float16).

The repeats go round robin (repeat r of every runtime before repeat r + 1 of any), after
one warm-up each, so that the speed drifts of a shared machine reach every runtime alike.
``--act8`` adds, for each ``--dense-bits`` compile, the same with ``--expert-act-bits 8``
(int8 expert inputs, docs/expert_activations.md) and with ``--expert-act-bits 8
--dense-act-bits 8`` (int8 inputs of every quantized matmul); ``--no-ort`` leaves
onnxruntime fp32 out (its paper-model prompts, gathered experts in pieces of 16 rows, take
minutes); ``--dense-only`` leaves modec's fp32 and bf16 checkpoint rows out (most of a run's
time), so that more repeats of the rest fit.

``--cxx`` adds every modec artifact again through the C++ runtime (`CxxDecoder`: its C API
loaded with ctypes from a CMake build of ``runtime/`` in WORK/runtime-build, the loop of
``modec_generate_from`` in C++), with its greedy tokens compared to the Python runtime's.

``--profile`` adds, and ``--profile-only`` prints alone, where one batch-1 decode step of
each modec artifact spends its time, per kernel (`profile_step`).

Prints a Markdown table; ``--json`` writes everything. Generated tokens are checked equal
between modec and onnxruntime where the quantized model agrees with fp32 (reported, not
asserted: the experts are 3-bit).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tools import c_api

BUNDLED = Path(__file__).resolve().parents[1] / "examples" / "digits-vlm"
#: The packed expert tensors of a MoE layer (``moe{l}.{proj}.w{bits}.{part}``).
PACKED = ("codes", "scale", "zero")


def build(work: Path, budget: float) -> dict[str, Path]:
    """The two exports and the compiled artifact (reused when present)."""
    from modec.driver import CompileOptions, compile_model
    from tools.digits_vlm.export import export_cached, trained_from_onnx

    work.mkdir(parents=True, exist_ok=True)
    paths = {"onnx": work / "model_kv.onnx", "text": work / "model_text_kv.onnx",
             "out": work / f"out-{budget}"}  # fmt: skip
    if not paths["onnx"].exists() or not paths["text"].exists():
        model = trained_from_onnx(BUNDLED / "model.onnx")
        export_cached(model, paths["onnx"])
        export_cached(model, paths["text"], text_only=True)
    if not (paths["out"] / "manifest.json").exists():
        o = CompileOptions(method="uniform", budget=budget, target="llvm", cache_dir=None)
        compile_model(paths["onnx"], BUNDLED / "calib.npz", paths["out"], o, force=True)
    return paths


def random_calib(path: Path) -> Path:
    """``path``, written once: 16 random prompts of 64 tokens (ids 2..1999), text only, the
    calibration set of the random-weight benchmark decoders (their speed does not depend on
    it)."""
    from modec import data

    if not path.exists():
        ids = np.random.default_rng(1).integers(2, 2000, (16, 64)).astype(np.int64)
        data.save(path, {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                  modality=np.ones_like(ids, dtype=np.uint8))  # fmt: skip
    return path


def build_paper(
    work: Path, layers: int, budget: float, llama_src: Path | None, gguf_types: list[str],
    dense_bits: Sequence[int] = (), act8: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The paper-shaped checkpoint, its modec compile and export, and the GGUFs (reused
    when present; see the module docstring). ``act8``: each dense-bits compile also with
    ``--expert-act-bits 8``, and with it and ``--dense-act-bits 8``."""
    from modec import hf
    from modec.driver import CompileOptions, compile_model
    from tools import paper_checkpoint

    root = work / f"paper-L{layers}"
    d, cache = root / "hf", root / "cache"
    if not (d / "config.json").exists():
        paper_checkpoint.build(d, layers)
    calib = random_calib(root / "calib.npz")
    o = CompileOptions(method="uniform", quantizer="rtn", budget=budget, target="llvm",
                       cache_dir=str(cache))  # fmt: skip
    out = root / f"out-{budget}"
    if not (out / "manifest.json").exists():
        compile_model(d, calib, out, o, force=True)
    # The same weights in bfloat16, as real checkpoints ship: modec keeps dense weights in
    # their stored dtype, so a step reads half the dense bytes.
    d16, out16 = root / "hf-bf16", root / f"out-{budget}-bf16"
    if not (d16 / "config.json").exists():
        paper_checkpoint.build(d16, layers, dtype="bfloat16")
    if not (out16 / "manifest.json").exists():
        compile_model(d16, calib, out16, o, force=True)
    paths: dict[str, Any] = {"out": out, "out_bf16": out16, "hf": d, "ggufs": {}}
    # The attention projections and the head quantized too (--dense-bits), as llama.cpp's
    # K-quants do: the fp32 checkpoint, experts as above.
    for bits in dense_bits:
        outd = root / f"out-{budget}-dense{bits}"
        if not (outd / "manifest.json").exists():
            compile_model(d, calib, outd, replace(o, dense_bits=bits), force=True)
        paths[f"out_dense{bits}"] = outd
        if act8:  # the experts' inputs as int8 too (VNNI kernels), as llama.cpp's Q8_K
            out8 = root / f"out-{budget}-dense{bits}-act8"
            if not (out8 / "manifest.json").exists():
                compile_model(d, calib, out8, replace(o, dense_bits=bits, expert_act_bits=8),
                              force=True)  # fmt: skip
            paths[f"out_dense{bits}_act8"] = out8
            out88 = root / f"out-{budget}-dense{bits}-all8"  # and the dense matmuls' inputs
            if not (out88 / "manifest.json").exists():
                compile_model(d, calib, out88, replace(o, dense_bits=bits, expert_act_bits=8,
                                                       dense_act_bits=8), force=True)  # fmt: skip
            paths[f"out_dense{bits}_all8"] = out88
    paths["onnx"] = paths["text"] = hf.cached_export(d, cache)
    if llama_src is not None:
        f16 = root / "model-f16.gguf"
        if not f16.exists():
            convert_gguf(llama_src, d, f16)
        for kind in gguf_types:
            q = root / f"model-{kind}.gguf"
            if not q.exists():
                quantize_gguf(f16, q, kind)
            paths["ggufs"][kind] = q
    return paths


#: Run by `convert_gguf` in a child process: llama.cpp's converter, with the pre-tokenizer
#: of our locally trained byte-level BPE named (the converter recognizes released
#: tokenizers by the hash of their output and refuses others).
_CONVERT = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert_gguf(llama_src: Path, hf_dir: Path, out: Path) -> None:
    import subprocess
    import sys

    tmp = out.with_suffix(".tmp")
    cmd = [sys.executable, "-c", _CONVERT, str(llama_src), str(hf_dir), "--outtype", "f16",
           "--outfile", str(tmp)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp's converter failed:\n{r.stderr[-3000:]}")
    tmp.replace(out)


def quantize_gguf(src: Path, out: Path, kind: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                        ctypes.byref(params))  # fmt: skip
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {kind} failed ({rc})")
    tmp.replace(out)


def paper_prompts(batch: int, tokens: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(batch).integers(2, 2000, (batch, tokens)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def prompts(batch: int) -> dict[str, np.ndarray]:
    from modec import data

    ds = data.load(BUNDLED / "eval.npz")
    rows = np.flatnonzero(ds.multimodal)[:batch]
    _, feeds = next(ds.subset(rows).batches(batch))
    return dict(feeds)


def bandwidth_line(rounds: list[float], before: float) -> str:
    """The copy bandwidth a bound uses (the median of ``rounds``, measured after each round of
    the runtimes) and what else was measured, as the benchmarks print it."""
    return (f"copy bandwidth {statistics.median(rounds) / 1e9:.1f} GB/s (read + written; "
            f"median of {len(rounds)} rounds, {min(rounds) / 1e9:.1f}-{max(rounds) / 1e9:.1f}; "
            f"{before / 1e9:.1f} before the runs)")  # fmt: skip


def copy_bandwidth(repeats: int, threads: int = 1) -> float:
    """Bytes moved per second by a numpy copy of a 256 MiB buffer split over ``threads``
    threads (the runtimes' own thread count; numpy releases the GIL while it copies), read
    and written (STREAM's convention: a copy reads and writes as many bytes; median). A
    decode step only reads, and reads stream at about this total rate: counted as bytes read
    only, the paper model's modec steps ran at 125% of the "bound"; measured with one thread
    while the runtimes use two, at 110%."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(256 * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))
            times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times[1:])


class ModecDecoder:
    """The artifact through `modec.runtime.Session.generate` (greedy)."""

    def __init__(self, out: Path) -> None:
        import modec.runtime

        self.sess = modec.runtime.load(out)

    def __call__(
        self, feeds: dict[str, np.ndarray], n: int
    ) -> tuple[float, float, list[list[int]]]:
        g = self.sess.generate(feeds, max_new_tokens=n)
        return g.prefill_seconds, g.decode_seconds, g.tokens


class CxxDecoder:
    """The artifact through the C++ runtime's C API (`modec_prefill`, then
    `modec_generate_from`: greedy), loaded into this process with ctypes from a build of
    `runtime/` (``libmodec_runtime.so``, `tools.c_api`): what a C or C++ application
    embedding modec gets, without Python between the decode steps. Prefill and decode are
    timed around the two calls, as `ModecDecoder` times `Session.generate`'s phases."""

    def __init__(self, library: Path, out: Path) -> None:
        self.lib = c_api.load(library)
        self.session = c_api.Handle()
        self._check(self.lib.modec_open(str(out).encode(), b"cpu", ctypes.byref(self.session)))

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"the C++ runtime: {self.lib.modec_last_error().decode()}")

    def __call__(
        self, feeds: dict[str, np.ndarray], n: int
    ) -> tuple[float, float, list[list[int]]]:
        arrays = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        shapes = [(ctypes.c_int64 * v.ndim)(*v.shape) for v in arrays.values()]
        inputs = (c_api.Tensor * len(arrays))(*(
            c_api.Tensor(k.encode(), c_api.DTYPES.index(str(v.dtype)), v.ndim, shape,
                         v.ctypes.data)
            for (k, v), shape in zip(arrays.items(), shapes, strict=True)
        ))  # fmt: skip
        config = c_api.GenerationConfig()
        self.lib.modec_generation_config_default(ctypes.byref(config))
        config.max_new_tokens = n
        batch = int(arrays["input_ids"].shape[0])
        tokens = np.empty(batch * max(n, 1), np.int64)
        lengths = np.empty(batch, np.int32)
        gen = c_api.Handle()
        t0 = time.perf_counter()
        self._check(self.lib.modec_prefill(self.session, inputs, len(arrays), ctypes.byref(gen)))
        t1 = time.perf_counter()
        try:
            self._check(self.lib.modec_generate_from(
                gen, ctypes.byref(config), None, None, tokens.ctypes.data, lengths.ctypes.data
            ))  # fmt: skip
            t2 = time.perf_counter()
        finally:
            self.lib.modec_generation_free(gen)
        return t1 - t0, t2 - t1, [tokens[i * n : i * n + lengths[i]].tolist() for i in range(batch)]

    def close(self) -> None:
        self.lib.modec_close(self.session)
        self.session = c_api.Handle()


class OrtDecoder:
    """onnxruntime with a KV cache: the full model for the prompt, the text decoder after.

    ``chunk``: the prompt goes in pieces of ``chunk // batch`` tokens (each fed the cache of
    the previous ones). A transformers ``batched_mm`` export gathers every token's top-k
    expert weights before its matmuls: a 256-token prompt of the paper model would need
    25.8 GB for one gather, so the paper run feeds 16 token-rows at a time.
    """

    def __init__(self, paths: dict[str, Path], threads: int, chunk: int | None = None) -> None:
        import onnxruntime as ort

        self.chunk = chunk

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.full = ort.InferenceSession(str(paths["onnx"]), so, providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(paths["text"]), so, providers=["CPUExecutionProvider"])
        self.past = [i.name for i in self.full.get_inputs() if i.name.startswith("past_")]
        self.shapes = {i.name: i.shape for i in self.full.get_inputs()}

    def __call__(
        self, feeds: dict[str, np.ndarray], n: int
    ) -> tuple[float, float, list[list[int]]]:
        b = feeds["input_ids"].shape[0]
        empty = {p: np.zeros((b, self.shapes[p][1], 0, self.shapes[p][3]), np.float32)
                 for p in self.past}  # fmt: skip
        t0 = time.perf_counter()
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        step = max(1, self.chunk // b) if self.chunk else ids.shape[1]
        cache = empty
        for s in range(0, ids.shape[1], step):
            part = {"input_ids": ids[:, s : s + step], "attention_mask": mask[:, : s + step]}
            out = self.full.run(None, {**feeds, **part, **cache})
            cache = dict(zip(self.past, out[1:], strict=True))
        t1 = time.perf_counter()
        tokens: list[list[int]] = [[] for _ in range(b)]
        nxt = out[0][:, -1].argmax(-1)
        for _ in range(n - 1):
            for r in range(b):
                tokens[r].append(int(nxt[r]))
            mask = np.concatenate([mask, np.ones((b, 1), mask.dtype)], axis=1)
            step = {"input_ids": nxt[:, None].astype(np.int64), "attention_mask": mask}
            step.update(zip(self.past, out[1:], strict=True))
            out = self.text.run(None, step)
            nxt = out[0][:, -1].argmax(-1)
        for r in range(b):
            tokens[r].append(int(nxt[r]))
        return t1 - t0, time.perf_counter() - t1, tokens


class LlamaCppDecoder:
    """A GGUF through llama.cpp's C API (`llama_cpp`'s low-level bindings): the rows are
    independent sequences of one context (``n_seq_max`` = the largest batch, a unified KV
    cache); the prefill decodes every row's prompt in one batch (in ``n_batch`` pieces),
    each step one token per row, greedy on each row's last logits."""

    def __init__(self, gguf: Path, threads: int, ctx: int, rows: int = 1) -> None:
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
            n_batch=512, verbose=False,
        )  # fmt: skip
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = ctx * rows
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = rows
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {rows} sequences")
        self.batch = llama_cpp.llama_batch_init(512, 0, rows)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))
        self.rows = rows

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> dict[int, np.ndarray]:
        """Decode (token, position, row, wants logits) items; the logits by row."""
        lc, b = self.lc, self.batch
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(items), 512):
            part = items[start : start + 512]
            b.n_tokens = len(part)
            for i, (tok, pos, row, want) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                b.seq_id[i][0] = row
                b.logits[i] = want
            if lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            for i, (_, _, row, want) in enumerate(part):
                if want:
                    ptr = lc.llama_get_logits_ith(self.ctx, i)
                    out[row] = np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy()
        return out

    def __call__(
        self, feeds: dict[str, np.ndarray], n: int
    ) -> tuple[float, float, list[list[int]]]:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        rows = ids.shape[0]
        if rows > self.rows:
            raise ValueError(f"this context holds {self.rows} sequences, not {rows}")
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        prompts = [ids[r][mask[r] == 1].tolist() for r in range(rows)]
        t0 = time.perf_counter()
        items = [(tok, p, r, p == len(pr) - 1) for r, pr in enumerate(prompts)
                 for p, tok in enumerate(pr)]  # fmt: skip
        logits = self._decode(items)
        t1 = time.perf_counter()
        tokens = [[int(np.argmax(logits[r]))] for r in range(rows)]
        for step in range(n - 1):
            logits = self._decode([(tokens[r][-1], len(prompts[r]) + step, r, True)
                                   for r in range(rows)])  # fmt: skip
            for r in range(rows):
                tokens[r].append(int(np.argmax(logits[r])))
        return t1 - t0, time.perf_counter() - t1, tokens


def step_bytes(
    out: Path, active_share: float, kv: float, skip: tuple[str, ...] = ()
) -> dict[str, float]:
    """The bytes a batch-1 decode step reads: the packed experts times ``active_share``
    (top-k over experts), every other weight of the artifact except those whose name
    contains one of ``skip``, and ``kv`` bytes of cache."""
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "uint32": 4, "uint8": 1, "int64": 8}
    dense = expert = 0.0
    for p in manifest["params"]:
        nbytes = float(np.prod(p["shape"])) * sizes[p["dtype"]]
        if p["name"].startswith("moe") and p["name"].rsplit(".", 1)[-1] in PACKED:
            expert += nbytes
        elif not any(k in p["name"] for k in skip):
            dense += nbytes
    active = expert * active_share
    return {"dense": dense, "experts_active": active, "kv": kv, "total": dense + active + kv}


def bundled_step_bytes(out: Path, mean_len: float) -> dict[str, float]:
    """`step_bytes` of the bundled model (its vision tower does not run in a step)."""
    from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig

    cfg = DigitsVLMConfig()
    need = step_bytes(
        out, cfg.top_k / cfg.num_experts, 2 * cfg.num_layers * cfg.hidden * mean_len * 4.0
    )
    vision = DigitsVLM(cfg).parameter_counts()["vision"] * 4.0
    need["dense"] -= vision
    need["total"] -= vision
    return need


def paper_step_bytes(
    out: Path, mean_len: float, share: float | None = None
) -> dict[str, float]:  # fmt: skip
    """`step_bytes` of a decoder artifact: its cache as the manifest's generation section
    lists it (float32), the embedding table left out; ``share`` the experts' top-k over
    experts (default: the paper decoder's)."""
    from tools.paper_checkpoint import PAPER_DECODER

    gen = json.loads((out / "manifest.json").read_text())["sections"]["generation"]
    kv = sum(c["heads"] * c["head_dim"] * 4.0 for c in gen["cache"]) * mean_len
    if share is None:
        share = PAPER_DECODER["num_experts_per_tok"] / PAPER_DECODER["num_experts"]
    return step_bytes(out, share, kv, ("embed_tokens",))


def gguf_step_bytes(path: Path, mean_len: float) -> dict[str, float]:
    """What a batch-1 llama.cpp decode step reads from ``path``: every tensor but the token
    embedding (one row read), the expert tensors (``*_exps``) times top-k over experts, and
    its KV cache (float16, llama.cpp's default) of the paper model's shape."""
    from gguf import GGUFReader

    from tools.paper_checkpoint import PAPER_DECODER as P

    dense = expert = 0.0
    layers = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("token_embd"):
            continue
        if "_exps" in t.name:
            expert += float(t.n_bytes)
        else:
            dense += float(t.n_bytes)
        if t.name.endswith("attn_norm.weight"):
            layers += 1
    active = expert * P["num_experts_per_tok"] / P["num_experts"]
    kv = 2.0 * layers * P["num_key_value_heads"] * P["head_dim"] * mean_len * 2
    return {"dense": dense, "experts_active": active, "kv": kv, "total": dense + active + kv}


def profile_step(out: Path, prompt_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Where a batch-1 decode step of the artifact spends its time: every call the Relax VM
    makes in one step after a ``prompt_tokens`` prompt (the ``decode`` entry), timed around
    the call with the VM's instrument hook (TVM 0.27's Python VM has no profiler), medians
    over ``repeats`` steps. Kernels: ``modec_dense_*`` the dense projections and the head,
    ``modec_moe_*`` the experts, ``modec_bmm_*`` attention's batched matmuls,
    ``modec_a8_quant_*`` the int8 rounding of matmul inputs, the rest
    Relax's fused element-wise, norm and softmax kernels, the cache's appends
    (``modec_kv_append_*``; cache-concat kernels where the cache is not updated in place) and
    the VM's builtins. Returns one row per callee name, slowest first."""
    import tvm
    import tvm_ffi
    from modec.runtime import _generation, _map_weights
    from tvm import relax

    from modec import kv_cache
    from modec.artifact import read_manifest

    manifest = read_manifest(out)
    with open(out / "weights.safetensors", "rb") as f:
        weights = _map_weights(f, out / "weights.safetensors", manifest.params)
    params = [tvm.runtime.tensor(np.ascontiguousarray(w)) for w in weights]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    gen = _generation.read_section(manifest, out)
    assert gen is not None, f"{out} has no KV cache"
    ids = np.random.default_rng(0).integers(2, 2000, (1, prompt_tokens)).astype(np.int64)
    empty = kv_cache.empty_inputs(gen.cache, 1).values()
    mask = np.ones((1, prompt_tokens), np.int64)
    res = vm["main"](tvm.runtime.tensor(ids), tvm.runtime.tensor(mask),
                     *(tvm.runtime.tensor(e) for e in empty), *params)  # fmt: skip
    cache: list[Any] = list(res)[1:]
    step = [tvm.runtime.tensor(np.array([[7]], np.int64)),
            tvm.runtime.tensor(np.ones((1, prompt_tokens + 1), np.int64))]  # fmt: skip
    if gen.cache_in_place:  # buffers with room for the step, and the positions they hold
        room = [np.pad(c.numpy(), [(0, 0), (0, 0), (0, 1), (0, 0)]) for c in cache]
        cache = [tvm.runtime.tensor(c) for c in room] + [tvm_ffi.Shape((prompt_tokens,))]
    entry = vm[gen.decode_entry]
    entry(*step, *cache, *params)  # warm-up
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    started: list[float] = []

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            started.append(time.perf_counter())
        else:
            totals[symbol] = totals.get(symbol, 0.0) + time.perf_counter() - started.pop()
            calls[symbol] = calls.get(symbol, 0) + 1
        return 0  # run the call

    per: dict[str, list[float]] = {}
    vm.set_instrument(instrument)
    for _ in range(repeats):
        totals.clear()
        calls.clear()
        entry(*step, *cache, *params)
        for name, t in totals.items():
            per.setdefault(name, []).append(t * 1e6)
    n_calls = dict(calls)
    rows = [{"name": n, "us": statistics.median(ts), "count": n_calls.get(n, 0)}
            for n, ts in per.items()]  # fmt: skip
    return sorted(rows, key=lambda r: -r["us"])


def _modec_variants(paths: dict[str, Any], dense_only: bool = False) -> list[tuple[str, str]]:
    """(row name, key in ``paths``) of every modec artifact built (``dense_only``: the
    ``--dense-bits`` ones only)."""
    out = [] if dense_only else [("modec", "out")]
    if "out_bf16" in paths and not dense_only:
        out.append(("modec, bf16 checkpoint", "out_bf16"))
    for key in sorted(k for k in paths if k.startswith("out_dense")):
        bits, _, act8 = key[len("out_dense") :].partition("_")
        inputs = {"": "", "act8": ", int8 expert inputs", "all8": ", int8 inputs"}[act8]
        out.append((f"modec, dense {bits}-bit{inputs}", key))
    return out


def print_profiles(
    paths: dict[str, Any], prompt: int, repeats: int, dense_only: bool = False
) -> dict[str, Any]:
    """`profile_step` of each modec artifact in ``paths``, printed: time per kernel group
    and the 8 slowest kernels."""
    profiles: dict[str, Any] = {}
    for name, key in _modec_variants(paths, dense_only):
        prof = profiles[name] = profile_step(paths[key], prompt, repeats)
        total = sum(r["us"] for r in prof)
        groups: dict[str, float] = {}
        for r in prof:
            g = next((k for k in ("modec_dense", "modec_dq", "modec_moe", "modec_bmm", "modec_a8")
                      if r["name"].startswith(k)), "other")  # fmt: skip
            groups[g] = groups.get(g, 0.0) + r["us"]
        print(
            f"\n{name}: one decode step, {total / 1e3:.2f} ms in kernels: "
            + ", ".join(
                f"{g} {t / 1e3:.2f} ms ({t / total:.0%})" for g, t in sorted(groups.items())
            )
        )
        for r in prof[:8]:
            print(f"  {r['name']}: {r['us'] / 1e3:.3f} ms ({r['count']} calls)")
    return profiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["bundled", "paper"], default="bundled")
    ap.add_argument("--work", type=Path, default=Path("/tmp/modec-bench-decode"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    # 16: the bundled model has 96 positions and its multimodal prompts take up to ~80.
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2, help="paper: decoder layers")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="paper: prompt length")
    ap.add_argument(
        "--llama-cpp-src",
        type=Path,
        default=None,
        help="paper: vendor/llama.cpp of the llama-cpp-python source package",
    )
    ap.add_argument("--gguf-types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--dense-bits", type=int, nargs="*", default=[4],
                    help="paper: also a modec compile with --dense-bits B for each B "
                         "(attention and head quantized; default 4)")  # fmt: skip
    ap.add_argument("--no-ort", action="store_true",
                    help="leave onnxruntime fp32 out (its paper prompts take minutes)")  # fmt: skip
    ap.add_argument("--act8", action="store_true",
                    help="paper: each --dense-bits compile also with --expert-act-bits 8 "
                         "(int8 expert inputs, VNNI kernels), and with --dense-act-bits 8 "
                         "as well")  # fmt: skip
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one batch-1 decode step of each modec artifact, per kernel",
    )
    ap.add_argument("--profile-only", action="store_true", help="only the profile, no timing")
    ap.add_argument("--dense-only", action="store_true",
                    help="paper: of modec's builds time only the --dense-bits ones (the fp32 "
                         "and bf16 checkpoint rows take most of a run)")  # fmt: skip
    ap.add_argument("--cxx", action="store_true",
                    help="also each modec artifact through the C++ runtime (its C API, from "
                         "a build of runtime/ in WORK/runtime-build; cmake and g++)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    n = args.new_tokens
    if args.model == "paper":
        paths = build_paper(args.work, args.layers, args.budget, args.llama_cpp_src,
                            args.gguf_types, args.dense_bits, args.act8)  # fmt: skip
        make = lambda b: paper_prompts(b, args.prompt_tokens)  # noqa: E731
        chunk: int | None = 16
    else:
        chunk = None
        paths = build(args.work, args.budget)
        make = prompts
    variants = _modec_variants(paths, args.dense_only)
    if not variants:
        raise SystemExit("--dense-only: no --dense-bits build (paper model, --dense-bits B)")
    if args.profile_only:
        print_profiles(paths, int(make(1)["attention_mask"].sum()), args.repeats, args.dense_only)
        return
    runners: list[tuple[str, Any]] = [(name, ModecDecoder(paths[key])) for name, key in variants]
    timed_variants = list(variants)
    if args.cxx:
        from tools.cxx import build_runtime

        build_dir = args.work / "runtime-build"
        if not build_runtime(build_dir):
            raise SystemExit("--cxx: cmake and g++ are needed to build the C++ runtime")
        for name, key in variants:
            cxx = f"{name}, C++ runtime"
            runners.append((cxx, CxxDecoder(build_dir / "libmodec_runtime.so", paths[key])))
            timed_variants.append((cxx, key))
    if not args.no_ort:
        runners.append(("onnxruntime fp32", OrtDecoder(paths, args.threads, chunk)))
    ctx = args.prompt_tokens + n + 8
    for kind, gguf in paths.get("ggufs", {}).items():
        runners.append(
            (f"llama.cpp {kind}", LlamaCppDecoder(gguf, args.threads, ctx, max(args.batches)))
        )
    before = copy_bandwidth(args.repeats, args.threads)
    rounds: list[float] = []  # the copy bandwidth in each round, beside the runtimes
    rows: list[dict[str, Any]] = []
    for b in args.batches:
        feeds = make(b)
        prompt_tokens = int(feeds["attention_mask"].sum())
        for _, fn in runners:
            fn(feeds, n)  # warm-up
        # Round robin: repeat r of every runtime before repeat r + 1 of any, so that a drift
        # of this shared machine's speed reaches all of them alike.
        timed: dict[str, list[Any]] = {name: [] for name, _ in runners}
        for _ in range(args.repeats):
            for name, fn in runners:
                timed[name].append(fn(feeds, n))
            rounds.append(copy_bandwidth(3, args.threads))
        for name, _ in runners:
            runs = timed[name]
            pre = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1] for r in runs)
            rows.append({
                "runtime": name, "batch": b, "prompt_tokens": prompt_tokens,
                "prefill_s": pre, "prefill_tok_s": prompt_tokens / pre,
                "decode_s": dec, "decode_tok_s": b * (n - 1) / dec, "tokens": runs[0][2],
            })  # fmt: skip
    bw = statistics.median(rounds)
    mean_len = float(make(1)["attention_mask"].sum()) + n / 2
    step_bytes = paper_step_bytes if args.model == "paper" else bundled_step_bytes
    own = {name: step_bytes(paths[key], mean_len) for name, key in timed_variants}
    bound = bw / own[variants[0][0]]["total"]
    for kind, gguf in paths.get("ggufs", {}).items():
        own[f"llama.cpp {kind}"] = gguf_step_bytes(gguf, mean_len)
    print(bandwidth_line(rounds, before))
    for name, nb in own.items():
        print(f"{name}: a batch-1 decode step reads {nb['total'] / 2**20:.2f} MiB (dense "
              f"{nb['dense'] / 2**20:.2f}, active experts {nb['experts_active'] / 2**20:.2f}, KV "
              f"{nb['kv'] / 2**20:.3f}) -> bound {bw / nb['total']:.0f} tokens/s")  # fmt: skip
    print("\n| runtime | batch | prompt tokens | prefill tokens/s | decode tokens/s | "
          "MiB read per step | decode / its bound |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        rb = own.get(r["runtime"])
        read = f"{rb['total'] / 2**20:.1f}" if rb is not None else ""
        share = f"{r['decode_tok_s'] * rb['total'] / bw:.1%}" if rb and r["batch"] == 1 else ""
        print(f"| {r['runtime']} | {r['batch']} | {r['prompt_tokens']} | {r['prefill_tok_s']:.0f}"
              f" | {r['decode_tok_s']:.1f} | {read} | {share} |")  # fmt: skip
    for b in args.batches:
        ours = [r for r in rows if r["runtime"].startswith("modec") and r["batch"] == b]
        for m in ours:
            for o in (r for r in rows if not r["runtime"].startswith("modec") and r["batch"] == b):
                same = sum(x == y for x, y in zip(m["tokens"], o["tokens"], strict=True))
                pre = m["prefill_tok_s"] / o["prefill_tok_s"]
                dec = m["decode_tok_s"] / o["decode_tok_s"]
                print(f"batch {b}: {m['runtime']} / {o['runtime']}: prefill {pre:.2f}x, decode "
                      f"{dec:.2f}x; rows with equal tokens {same}/{b}")  # fmt: skip
        for name, _ in variants:  # the two runtimes of one artifact: the same greedy tokens
            py = next((r for r in ours if r["runtime"] == name), None)
            cx = next((r for r in ours if r["runtime"] == f"{name}, C++ runtime"), None)
            if py is not None and cx is not None:
                same = sum(x == y for x, y in zip(py["tokens"], cx["tokens"], strict=True))
                print(f"batch {b}: {name}: C++ / Python runtime: prefill "
                      f"{cx['prefill_tok_s'] / py['prefill_tok_s']:.2f}x, decode "
                      f"{cx['decode_tok_s'] / py['decode_tok_s']:.2f}x; rows with equal "
                      f"tokens {same}/{b}")  # fmt: skip
    profiles = (
        print_profiles(paths, int(make(1)["attention_mask"].sum()), args.repeats, args.dense_only)
        if (args.profile)
        else {}
    )
    if args.json:
        doc = {"bandwidth_bytes_s": bw, "bandwidth_rounds": rounds,
               "bandwidth_before_bytes_s": before, "step_bytes": own, "bound_tok_s": bound,
               "rows": rows, "profiles": profiles,
               "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
