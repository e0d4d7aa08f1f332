"""Prefill and decode speed of a generating artifact against onnxruntime, side by side.

    python -m tools.bench_decode [--work /tmp/modec-bench-decode] [--batches 1 8]
        [--new-tokens 16] [--repeats 5] [--budget 3.0] [--threads 2] [--json PATH]

On the bundled digits-vlm (trained weights, its KV-cache export, `tools.digits_vlm.export`):

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
   copy of a 256 MiB buffer, bytes read per second).

Prints a Markdown table; ``--json`` writes everything. Generated tokens are checked equal
between modec and onnxruntime where the quantized model agrees with fp32 (reported, not
asserted: the experts are 3-bit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def prompts(batch: int) -> dict[str, np.ndarray]:
    from modec import data

    ds = data.load(BUNDLED / "eval.npz")
    rows = np.flatnonzero(ds.multimodal)[:batch]
    _, feeds = next(ds.subset(rows).batches(batch))
    return dict(feeds)


def copy_bandwidth(repeats: int) -> float:
    """Bytes read per second by a numpy copy of a 256 MiB buffer (median)."""
    src = np.ones(256 * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return src.nbytes / statistics.median(times[1:])


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


class OrtDecoder:
    """onnxruntime with a KV cache: the full model for the prompt, the text decoder after."""

    def __init__(self, paths: dict[str, Path], threads: int) -> None:
        import onnxruntime as ort

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
        out = self.full.run(None, {**feeds, **empty})
        t1 = time.perf_counter()
        mask = feeds["attention_mask"]
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


def step_bytes(out: Path, mean_len: float) -> dict[str, float]:
    """The bytes a batch-1 decode step reads (see the module docstring)."""
    from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig

    manifest = json.loads((out / "manifest.json").read_text())
    cfg = DigitsVLMConfig()
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "uint32": 4, "uint8": 1, "int64": 8}
    total = expert = 0.0
    for p in manifest["params"]:
        nbytes = float(np.prod(p["shape"])) * sizes[p["dtype"]]
        total += nbytes
        if p["name"].startswith("moe") and p["name"].rsplit(".", 1)[-1] in PACKED:
            expert += nbytes
    vision = DigitsVLM(cfg).parameter_counts()["vision"] * 4.0
    dense = total - expert - vision
    active = expert * cfg.top_k / cfg.num_experts
    kv = 2 * cfg.num_layers * cfg.hidden * mean_len * 4.0
    return {"dense": dense, "experts_active": active, "kv": kv, "total": dense + active + kv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/modec-bench-decode"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    # 16: the bundled model has 96 positions and its multimodal prompts take up to ~80.
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    paths = build(args.work, args.budget)
    ort_dec = OrtDecoder(paths, args.threads)
    modec_dec = ModecDecoder(paths["out"])
    bw = copy_bandwidth(args.repeats)
    rows: list[dict[str, Any]] = []
    for b in args.batches:
        feeds = prompts(b)
        prompt_tokens = int(feeds["attention_mask"].sum())
        n = args.new_tokens
        runners: list[tuple[str, Any]] = [("modec", modec_dec), ("onnxruntime fp32", ort_dec)]
        for name, fn in runners:
            fn(feeds, n)  # warm-up
            runs = [fn(feeds, n) for _ in range(args.repeats)]
            pre = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1] for r in runs)
            rows.append({
                "runtime": name, "batch": b, "prompt_tokens": prompt_tokens,
                "prefill_s": pre, "prefill_tok_s": prompt_tokens / pre,
                "decode_s": dec, "decode_tok_s": b * (n - 1) / dec, "tokens": runs[0][2],
            })  # fmt: skip
    mean_len = float(prompts(1)["attention_mask"].sum()) + args.new_tokens / 2
    need = step_bytes(paths["out"], mean_len)
    bound = bw / need["total"]
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; a batch-1 decode step reads "
          f"{need['total'] / 2**20:.2f} MiB (dense {need['dense'] / 2**20:.2f}, active experts "
          f"{need['experts_active'] / 2**20:.2f}, KV {need['kv'] / 2**20:.3f}) -> bound "
          f"{bound:.0f} tokens/s\n")  # fmt: skip
    print("| runtime | batch | prompt tokens | prefill tokens/s | decode tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['batch']} | {r['prompt_tokens']} | "
              f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} |")  # fmt: skip
    for b in args.batches:
        m, o = (next(r for r in rows if r["runtime"] == k and r["batch"] == b)
                for k in ("modec", "onnxruntime fp32"))  # fmt: skip
        same = sum(x == y for x, y in zip(m["tokens"], o["tokens"], strict=True))
        pre = m["prefill_tok_s"] / o["prefill_tok_s"]
        dec = m["decode_tok_s"] / o["decode_tok_s"]
        print(f"batch {b}: modec / onnxruntime: prefill {pre:.2f}x, decode {dec:.2f}x; rows "
              f"with equal tokens {same}/{b}")  # fmt: skip
    if args.json:
        doc = {"bandwidth_bytes_s": bw, "step_bytes": need, "bound_tok_s": bound, "rows": rows,
               "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
