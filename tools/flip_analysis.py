"""Which eval answers a quantized model changes, grouped by distinct question.

    python -m tools.flip_analysis [--method mode] [--budget 3.0] [--seed 0] [--bits 2,3,4]
                                  [--quantizer gptq|rtn]

Quantizes the bundled example as `tools.mode_table` does for one calibration seed (same
calibration set, same analysis, same ILP and GPTQ), evaluates it on the eval set, and lists
every sample whose prediction differs from fp32, grouped by identical inputs: the family, how
many eval samples repeat that input, the fp32 answer margin (top-1 minus top-2 logit) and
whether fp32 and the quantized model were right. The text-only families draw from a small
question space, so one distinct question can stand for a dozen eval samples.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from modec import data
from modec.executor import Executor
from modec.frontend import OrtRunner
from modec.pipelines import CompileOptions
from modec.sweep import analyze, quantize
from tools.mode_table import calibration_set


def answers(run: object, ds: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Predicted answer and top-1 minus top-2 logit margin per sample (file order)."""
    pred = np.zeros(len(ds), np.int64)
    margin = np.zeros(len(ds))
    for idx, feeds in ds.batches(64):
        last = np.asarray(run(feeds))[:, -1, :]  # type: ignore[operator]
        srt = np.sort(last, axis=1)
        pred[idx] = last.argmax(1)
        margin[idx] = srt[:, -1] - srt[:, -2]
    return pred, margin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="examples/digits-vlm/model.onnx")
    ap.add_argument("--eval", default="examples/digits-vlm/eval.npz")
    ap.add_argument("--method", default="mode")
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--quantizer", choices=("gptq", "rtn"), default="gptq")
    args = ap.parse_args()
    ds = data.load(args.eval)
    assert ds.answer is not None
    bits = tuple(int(b) for b in args.bits.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration_set(Path(tmp) / "calib.npz", args.seed)
        an = analyze(args.model, str(calib), CompileOptions(seed=args.seed, bits=bits))
    sim = quantize(an, args.method, args.budget, args.quantizer)
    ex = Executor(sim.model)
    fp_pred, fp_margin = answers(OrtRunner(args.model), ds)
    q_pred, _ = answers(lambda f: ex.run(f).outputs[ex.output_names[0]], ds)
    flipped = np.flatnonzero(fp_pred != q_pred)
    # Identical inputs: every model input of the sample, byte for byte.
    sample_key = [b"".join(ds.inputs[k][i].tobytes() for k in sorted(ds.inputs))
                  for i in range(len(ds))]  # fmt: skip
    keys: dict[bytes, list[int]] = {}
    for i, key in enumerate(sample_key):
        keys.setdefault(key, []).append(i)
    print(f"{args.method} @ {args.budget} bits ({args.quantizer}), calibration seed {args.seed}: "
          f"{len(flipped)} of {len(ds)} eval answers differ from fp32")  # fmt: skip
    seen: set[bytes] = set()
    for i in flipped.tolist():
        key = sample_key[i]
        if key in seen:
            continue
        seen.add(key)
        group = keys[key]
        kind = "multimodal" if ds.multimodal[i] else "text-only"
        family = ds.families[int(ds.family[i])] if ds.family is not None else "?"
        fp_ok = "right" if fp_pred[i] == ds.answer[i] else "wrong"
        q_ok = "right" if q_pred[i] == ds.answer[i] else "wrong"
        print(f"  {family:>10} ({kind}): {len(group)} identical eval samples, fp32 margin "
              f"{fp_margin[i]:.2f}, fp32 {fp_ok}, quantized {q_ok}")  # fmt: skip


if __name__ == "__main__":
    main()
