"""End to end: a compiled modec artifact vs onnxruntime on the fp32 ONNX, same inputs.

    python -m tools.bench_e2e [--model examples/digits-vlm/model.onnx] [--artifact out/]
                              [--widths 2:3:4] [--group-size 128] [--runs 10]

Without --artifact, the experts are RTN-quantized at widths cycling through --widths (expert
e of every layer gets widths[e % len]) and the artifact is built with
`modec.lowering.lower.lower_model` (the body of the lower-tvm pass) into a temporary
directory. Without --model (or when the file does not exist) a random-weight digits-vlm of
the bundled shape (4 layers x 16 experts, H = I = 128) is exported first. Inputs are
digits-vlm sample batches (multimodal). Reports medians of --runs timed calls after 2 warm-up
calls: batch-1 latency and batch-16 throughput.
onnxruntime runs with --threads intra-op threads, the TVM VM with its default pool.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from modec.method.quantize import quantize_model_rtn
from modec.moe.canonical import canonicalize_moe, is_moe_node


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` in milliseconds after 2 warm-up calls."""
    for _ in range(2):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def random_model(path: Path) -> Path:
    """Export a random-weight digits-vlm of the bundled shape to ``path``."""
    import torch

    from tools.digits_vlm.export import export
    from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig

    torch.manual_seed(0)
    export(DigitsVLM(DigitsVLMConfig()).eval(), path, form="stacked", exporter="dynamo")
    return path


def build_rtn_artifact(model_path: Path, out: Path, widths: list[int], group_size: int) -> Path:
    """RTN-quantize every expert (widths cycling per expert), lower it into ``out``."""
    from modec.lowering.lower import lower_model

    model = ir.load(str(model_path))
    canonicalize_moe(model)
    per_layer = tuple(
        tuple(widths[e % len(widths)] for e in range(int(n.attributes["num_experts"].value)))
        for n in model.graph
        if is_moe_node(n)
    )
    # The artifact ships the codes only, so the fp weights need not be replaced.
    quantized = quantize_model_rtn(model, per_layer, group_size, write_back=False)
    # The pipeline section the lower-tvm pass records with its default options.
    lower_model(model, quantized, out, "llvm", pipeline={"lower-tvm": "lower-tvm"})
    return out


def main() -> None:
    """Run the benchmark and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="examples/digits-vlm/model.onnx")
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--widths", default="2:3:4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1:16")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import modec.runtime

    from tools.digits_vlm.export import sample_batch

    model_path = Path(args.model)
    out = Path(args.artifact) if args.artifact else None
    if not model_path.exists() or out is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_e2e-"))
        print(f"work directory {tmp}")
    if not model_path.exists():
        print(f"{model_path} not found: exporting a random-weight digits-vlm of the same shape")
        model_path = random_model(tmp / "model.onnx")
    if out is None:
        widths = [int(w) for w in args.widths.split(":")]
        t = time.perf_counter()
        out = build_rtn_artifact(model_path, tmp / "artifact", widths, args.group_size)
        print(f"built artifact (RTN widths {widths}) in {time.perf_counter() - t:.1f} s")
    sess = modec.runtime.load(out)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    ort_sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])

    rows = []
    for b in (int(x) for x in args.batches.split(":")):
        feeds = sample_batch(b, seed=7)
        seq = feeds["input_ids"].shape[1]
        got = sess.run(feeds)["logits"]
        ref = ort_sess.run(["logits"], feeds)[0]
        agree = float((got[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).mean())
        t_modec = median_ms(lambda f=feeds: sess.run(f), args.runs)  # type: ignore[misc]
        t_ort = median_ms(lambda f=feeds: ort_sess.run(["logits"], f), args.runs)  # type: ignore[misc]
        rows.append((b, seq, t_ort, t_modec, agree))
    print()
    print("| batch | seq | onnxruntime fp32 (ms) | modec (ms) | speed-up | modec samples/s |"
          " answer agreement |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b, seq, t_ort, t_modec, agree in rows:
        print(
            f"| {b} | {seq} | {t_ort:.2f} | {t_modec:.2f} | {t_ort / t_modec:.2f}x | "
            f"{b / t_modec * 1e3:.0f} | {agree:.2f} |"
        )


if __name__ == "__main__":
    main()
