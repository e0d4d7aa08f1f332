"""Decode speed against onnxruntime's own 4-bit path (not a test).

    pip install onnxruntime-genai==0.18.0     # its model builder and runtime; not a dependency
    python -m tools.bench_ort_genai [--work /tmp/modec-bench-ortgenai] [--layers 2]
        [--prompt-tokens 256] [--new-tokens 32] [--batches 1 8] [--repeats 3] [--threads 2]
        [--act8] [--json PATH]

onnxruntime's 4-bit path for MoE models is its ``QMoE`` op (experts) with ``MatMulNBits``
(the other matmuls), as onnxruntime-genai's model builder writes them. That builder has no
Qwen3-MoE path (its MoE families: GPT-OSS, PhiMoE, GraniteMoeHybrid, LFM2-MoE, Qwen3.5-MoE),
so this benchmark uses a random-weight **GPT-OSS** decoder with the paper MoE layer's shapes:
hidden 2048, 128 experts of intermediate 768, top-8; 32 query and 4 KV heads of 64,
sliding window 128 on even layers, ``--layers`` layers, vocabulary 8192. In WORK:

1. ``hf/``: the float32 checkpoint (transformers' ``GptOssForCausalLM``, weights N(0, 0.02),
   norms 1; the tokenizer of `tools.paper_checkpoint`);
2. ``hf-ort/``: the same files plus random MXFP4 expert blocks and scales, the form GPT-OSS
   checkpoints ship and the only one the builder reads GPT-OSS experts from; its int4 path
   decodes them and requantizes to int4 (group 32) for ``QMoE``. So the two runtimes' expert
   values differ; their shapes and widths, which set the speed, do not;
3. ``ort-int4/``: ``python -m onnxruntime_genai.models.builder -p int4 -e cpu`` (attention
   projections, router and head ``MatMulNBits`` int4; embedding float32), run with
   ``intra_op_num_threads = --threads``;
4. ``out/``: ``modec compile hf/ --method uniform --quantizer rtn --budget 4.0
   --dense-bits 4`` (every expert and every dense projection and the head at 4 bits, group
   128), run with ``TVM_NUM_THREADS = --threads``;
5. with ``--act8``, ``out-int8/``: the same with ``--expert-act-bits 8 --dense-act-bits 8``
   (every quantized matmul takes int8 inputs, AVX-512 VNNI kernels; the builder's CPU
   default gives onnxruntime's ``MatMulNBits`` int8 inputs as well: ``accuracy_level`` 4).

Both generate greedily from the same ``--prompt-tokens`` random prompts at each batch size:
prefill tokens/s (prompt tokens / the prompt's time) and decode tokens/s (the tokens after
the first / their time), medians of ``--repeats`` after a warm-up each; the repeats go round
robin (repeat r of every runtime before repeat r + 1 of any), so that this machine's drifts
reach every runtime alike. The bound of a batch-1
step: the bytes it reads (top-8 of 128 experts' packed bytes, every other weight but the
token embedding, the KV cache at the mean length: modec float32, onnxruntime-genai float32
too) over the copy bandwidth measured in the same run (`tools.bench_decode.copy_bandwidth`):
the median of one measurement after each round, as `tools.bench_decode` takes it (the one
before the runs is printed and kept beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: GPT-OSS with the paper MoE layer's shapes (tools/paper_checkpoint.PAPER_DECODER's MoE).
GPTOSS: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 768, "num_local_experts": 128,
    "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 64, "sliding_window": 128, "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}  # fmt: skip
VOCAB = 8192


def build_checkpoint(d: Path, layers: int, seed: int = 0) -> None:
    """``hf/``: the float32 GPT-OSS checkpoint of the module docstring."""
    import torch
    import transformers

    from tools.paper_checkpoint import train_tokenizer

    d.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(VOCAB, seed)
    tok.save_pretrained(d)  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, num_hidden_layers=layers, layer_types=kinds, pad_token_id=0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **GPTOSS,  # type: ignore[attr-defined]
    )  # fmt: skip
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.1 if "sinks" in name else 0.02)
    model.save_pretrained(d)


def mxfp4_copy(src: Path, d: Path, layers: int, seed: int = 0) -> None:
    """``hf-ort/``: ``src``'s files linked, random MXFP4 expert blocks in ``mxfp4.safetensors``
    (scales near 2^-8), and an index naming every tensor's file."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not (d / f.name).exists():
            (d / f.name).symlink_to(f.resolve())
    e, h, i = GPTOSS["num_local_experts"], GPTOSS["hidden_size"], GPTOSS["intermediate_size"]
    rng = np.random.default_rng(seed)
    blocks: dict[str, Any] = {}
    for layer in range(layers):
        p = f"model.layers.{layer}.mlp.experts"
        for proj, n, k in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            codes = rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8)
            blocks[f"{p}.{proj}_blocks"] = torch.from_numpy(codes)
            scales = rng.integers(118, 122, (e, n, k // 32), dtype=np.uint8)
            blocks[f"{p}.{proj}_scales"] = torch.from_numpy(scales)
    save_file(blocks, str(d / "mxfp4.safetensors"))
    with safe_open(str(src / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    weight_map = {n: "model.safetensors" for n in names} | {n: "mxfp4.safetensors" for n in blocks}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


class OrtGenaiDecoder:
    """An onnxruntime-genai model directory: greedy generation, timed per phase."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime_genai as og

        cfg_path = path / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=4))
        self.og = og
        self.model = og.Model(str(path))

    def __call__(
        self, feeds: dict[str, np.ndarray], n: int
    ) -> tuple[float, float, list[list[int]]]:
        og = self.og
        ids = feeds["input_ids"].astype(np.int32)
        b, t = ids.shape
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=t + n, do_sample=False, batch_size=b)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        tokens = [[int(x) for x in gen.get_sequence(r)[t:]] for r in range(b)]
        return t1 - t0, t2 - t1, tokens


def ort_step_bytes(path: Path, mean_len: float, layers: int) -> dict[str, float]:
    """What a batch-1 step of the onnxruntime-genai model reads: its initializers but the
    embedding, the expert ones (``moe.experts``) times top-k over experts, and its float32
    KV cache at ``mean_len``."""
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    dense = expert = 0.0
    for t in model.graph.initializer:
        n = float(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if "embed_tokens" in t.name:
            continue
        if ".moe.experts." in t.name:
            expert += n
        else:
            dense += n
    active = expert * GPTOSS["num_experts_per_tok"] / GPTOSS["num_local_experts"]
    kv = 2.0 * layers * GPTOSS["num_key_value_heads"] * GPTOSS["head_dim"] * mean_len * 4
    return {"dense": dense, "experts_active": active, "kv": kv, "total": dense + active + kv}


def build(work: Path, layers: int, act8: bool = False) -> dict[str, Path]:
    """Everything of the module docstring, reused when present."""
    import dataclasses

    from modec.driver import CompileOptions, compile_model
    from tools.bench_decode import random_calib

    hf, hf_ort, ort, out = (work / n for n in ("hf", "hf-ort", "ort-int4", "out"))
    if not (hf / "config.json").exists():
        build_checkpoint(hf, layers)
    if not (hf_ort / "mxfp4.safetensors").exists():
        mxfp4_copy(hf, hf_ort, layers)
    if not (ort / "genai_config.json").exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_ort),
               "-o", str(ort), "-p", "int4", "-e", "cpu",
               "-c", str(work / "ort-cache")]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if not (out / "manifest.json").exists():
        calib = random_calib(work / "calib.npz")
        o = CompileOptions(method="uniform", quantizer="rtn", budget=4.0, target="llvm",
                           cache_dir=str(work / "cache"))  # fmt: skip
        compile_model(hf, calib, out, dataclasses.replace(o, dense_bits=4), force=True)
    paths = {"hf": hf, "ort": ort, "out": out}
    if act8:
        out8 = work / "out-int8"
        if not (out8 / "manifest.json").exists():
            calib = random_calib(work / "calib.npz")
            o = CompileOptions(method="uniform", quantizer="rtn", budget=4.0, target="llvm",
                               cache_dir=str(work / "cache"), dense_bits=4, expert_act_bits=8,
                               dense_act_bits=8)  # fmt: skip
            compile_model(hf, calib, out8, o, force=True)
        paths["out_int8"] = out8
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default="/tmp/modec-bench-ortgenai")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--act8", action="store_true",
                    help="also modec with --expert-act-bits 8 --dense-act-bits 8")  # fmt: skip
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    from tools.bench_decode import (
        ModecDecoder,
        bandwidth_line,
        copy_bandwidth,
        paper_prompts,
        paper_step_bytes,
    )

    paths = build(Path(args.work), args.layers, args.act8)
    ours = [("modec (4-bit experts, --dense-bits 4)", "out")]
    if args.act8:
        ours.append(("modec (the same, int8 inputs)", "out_int8"))
    ort_name = "onnxruntime-genai int4 (QMoE, MatMulNBits)"
    runners: list[tuple[str, Any]] = [
        *((name, ModecDecoder(paths[key])) for name, key in ours),
        (ort_name, OrtGenaiDecoder(paths["ort"], args.threads)),
    ]
    before = copy_bandwidth(args.repeats, args.threads)
    rounds: list[float] = []  # the copy bandwidth after each round, beside the runtimes
    n = args.new_tokens
    rows: list[dict[str, Any]] = []
    for b in args.batches:
        feeds = paper_prompts(b, args.prompt_tokens)
        for _, fn in runners:
            fn(feeds, 4)  # warm-up
        timed: dict[str, list[Any]] = {name: [] for name, _ in runners}
        for _ in range(args.repeats):  # round robin
            for name, fn in runners:
                timed[name].append(fn(feeds, n))
            rounds.append(copy_bandwidth(3, args.threads))
        for name, _ in runners:
            pre = statistics.median(r[0] for r in timed[name])
            dec = statistics.median(r[1] for r in timed[name])
            rows.append({"runtime": name, "batch": b, "prefill_tok_s": b * args.prompt_tokens / pre,
                         "decode_tok_s": b * (n - 1) / dec})  # fmt: skip
    mean_len = args.prompt_tokens + n / 2
    share = GPTOSS["num_experts_per_tok"] / GPTOSS["num_local_experts"]
    need = {name: paper_step_bytes(paths[key], mean_len, share) for name, key in ours}
    need[ort_name] = ort_step_bytes(paths["ort"], mean_len, args.layers)
    bw = statistics.median(rounds)
    print(bandwidth_line(rounds, before))
    print("\n| runtime | batch | prefill tokens/s | decode tokens/s | MiB read per step | "
          "decode / its bound |\n|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        nb = need[r["runtime"]]["total"]
        share = f"{r['decode_tok_s'] * nb / bw:.1%}" if r["batch"] == 1 else ""
        print(f"| {r['runtime']} | {r['batch']} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {nb / 2**20:.1f} | {share} |")  # fmt: skip
    for b in args.batches:
        o = next(r for r in rows if r["runtime"] == ort_name and r["batch"] == b)
        for name, _ in ours:
            m = next(r for r in rows if r["runtime"] == name and r["batch"] == b)
            print(f"batch {b}: {name} / onnxruntime-genai int4: prefill "
                  f"{m['prefill_tok_s'] / o['prefill_tok_s']:.2f}x, decode "
                  f"{m['decode_tok_s'] / o['decode_tok_s']:.2f}x")  # fmt: skip
    if args.json:
        doc = {"bandwidth_bytes_s": bw, "bandwidth_rounds": rounds,
               "bandwidth_before_bytes_s": before, "step_bytes": need, "rows": rows,
               "args": vars(args)}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
