"""Compiled artifact vs simulated-quantization model on an eval set (issue target: ≤ 1e-4).

    python -m tools.check_compiled out/digits-vlm --data examples/digits-vlm/eval.npz

Runs every batch through both the TVM artifact (``modec.runtime``) and modec's executor on
``model.sim.onnx`` (the same quantized weights), and prints the largest relative difference of
the logits at real (non-padding) positions (max |a - b| / max |b| per batch) and both
accuracies. Padding positions attend to nothing; their values are implementation-defined.
"""

from __future__ import annotations

import argparse

import numpy as np

from modec import data
from modec.driver import CompiledRunner, SimulatedRunner
from modec.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--data", default="examples/digits-vlm/eval.npz")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    ds = data.load(args.data)
    compiled, sim = CompiledRunner(args.out), SimulatedRunner(args.out)
    worst = worst_pad = 0.0
    for idx, feeds in ds.batches(args.batch_size):
        a, b = compiled(feeds), sim(feeds)
        real = ds.trimmed_modality(idx) != data.PAD  # padding positions carry no meaning
        scale = np.abs(b[real]).max()
        worst = max(worst, float(np.abs(a[real] - b[real]).max() / scale))
        if (~real).any():
            worst_pad = max(worst_pad, float(np.abs(a[~real] - b[~real]).max() / scale))
    acc_c = evaluate(compiled, ds, args.batch_size)
    acc_s = evaluate(sim, ds, args.batch_size)
    print(
        f"samples {len(ds)}; max relative logit difference {worst:.2e} over real tokens "
        f"({worst_pad:.2e} at left-padding positions, which are masked out)"
    )
    for name in ("overall", "multimodal", "text_only"):
        c, s = getattr(acc_c, name).accuracy, getattr(acc_s, name).accuracy
        print(f"{name:>10}: compiled {100 * c:.2f}%  simulated {100 * s:.2f}%  "
              f"difference {100 * (c - s):+.2f} points")  # fmt: skip


if __name__ == "__main__":
    main()
