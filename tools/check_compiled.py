"""Compiled artifact vs simulated-quantization model on an eval set (issue target: ≤ 1e-4).

    python -m tools.check_compiled out/digits-vlm --data examples/digits-vlm/eval.npz

Runs every batch through both the TVM artifact (``modec.runtime``) and modec's executor on
``model.sim.onnx`` (the same quantized weights), and prints the largest relative difference of
the logits at real (non-padding) positions (max |a - b| / max |b| per batch) and both
accuracies. Padding positions attend to nothing; their values are implementation-defined.

Routing near-ties: where a token's k-th and (k+1)-th router scores are closer than float
rounding can be trusted (``--tie`` absolute, default 1e-5), TVM and numpy may pick different
experts for it, and through attention that changes the whole sample. The check records every
sample's smallest top-k margin (over its tokens and layers, from the executor) and reports
the difference separately for samples with and without such a near-tie.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from modec import data
from modec.evaluate import evaluate
from modec.runners import CompiledRunner, SimulatedRunner


def topk_margin(routing: dict[int, Any], shape: tuple[int, ...]) -> np.ndarray:
    """Per token ``[B, T]``: the smallest gap between the k-th and (k+1)-th router score."""
    out = np.full(int(np.prod(shape)), np.inf)
    for r in routing.values():
        k = r.experts.shape[1]
        if r.scores.shape[1] <= k:
            continue
        srt = -np.sort(-r.scores, axis=1)
        out = np.minimum(out, srt[:, k - 1] - srt[:, k])
    return out.reshape(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--data", default="examples/digits-vlm/eval.npz")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tie", type=float, default=1e-5, help="router near-tie margin")
    args = ap.parse_args()
    ds = data.load(args.data)
    compiled, sim = CompiledRunner(args.out), SimulatedRunner(args.out)
    worst = worst_pad = worst_clean = worst_tied = 0.0
    tied_samples = 0
    for idx, feeds in ds.batches(args.batch_size):
        a = compiled(feeds)
        res = sim.executor.run(feeds, record_routing=True)
        b = res.outputs[sim.output]
        mod = ds.trimmed_modality(idx)
        real = mod != data.PAD  # padding positions carry no meaning
        scale = np.abs(b[real]).max()
        worst = max(worst, float(np.abs(a[real] - b[real]).max() / scale))
        if (~real).any():
            worst_pad = max(worst_pad, float(np.abs(a[~real] - b[~real]).max() / scale))
        margin = topk_margin(res.routing, mod.shape)
        margin = np.where(real, margin, np.inf).min(axis=1)  # per sample
        for s in range(len(idx)):
            diff = float(np.abs(a[s][real[s]] - b[s][real[s]]).max() / scale)
            if margin[s] < args.tie:
                tied_samples += 1
                worst_tied = max(worst_tied, diff)
            else:
                worst_clean = max(worst_clean, diff)
    acc_c = evaluate(compiled, ds, args.batch_size)
    acc_s = evaluate(sim, ds, args.batch_size)
    print(
        f"samples {len(ds)}; max relative logit difference {worst:.2e} over real tokens "
        f"({worst_pad:.2e} at left-padding positions, which are masked out)"
    )
    print(
        f"samples without a router near-tie (top-k margin >= {args.tie:g}): "
        f"{len(ds) - tied_samples}, max relative difference {worst_clean:.2e}; with one: "
        f"{tied_samples}, max {worst_tied:.2e}"
    )
    for name in ("overall", "multimodal", "text_only"):
        c, s = getattr(acc_c, name).accuracy, getattr(acc_s, name).accuracy
        print(f"{name:>10}: compiled {100 * c:.2f}%  simulated {100 * s:.2f}%  "
              f"difference {100 * (c - s):+.2f} points")  # fmt: skip


if __name__ == "__main__":
    main()
