"""How far apart MODE's frequency signals are, and whether their allocations differ.

    python -m tools.signal_overlap [--example facts-vlm] [--model M.onnx] [--seed 0]
                                   [--budgets 2.25,2.5,3.0] [--bits 2,3,4] [--threads 1]

MODE weighs δ_vision with the frequency over key vision tokens (f_key); its ablations use
every vision token (mode-no-key: f_vision) or the non-key ones (mode-redundant:
f_redundant). Runs the analysis passes as `tools.mode_table` does for one calibration seed,
then prints per layer the Pearson correlation of the three frequency vectors, their L1
distances, and the size of the text and vision terms of MODE's cost (Σ f_text·δ_text and
Σ f·δ_vision summed over experts and widths); then, at each budget, the ILP's widths under
the three signals and how many experts differ between them. No GPTQ, no evaluation: the
allocations only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from modec.passes.allocate_bits import AllocateBitsPass

from modec.facts import BitAllocation, KeyVision, RoutingStats, Sensitivity
from modec.pipeline import Pipeline
from modec.pipelines import CompileOptions
from modec.sweep import analyze
from tools.mode_table import calibration_builder

SIGNALS = ("mode", "mode-no-key", "mode-redundant")


def overlap(an: Any, budgets: list[float], bits: tuple[int, ...]) -> dict[str, Any]:
    """Per-layer frequency overlap and per-budget allocation differences of an analysis."""
    rs = an.ctx.facts.get(RoutingStats)
    kv = an.ctx.facts.get(KeyVision)
    sens = an.ctx.facts.get(Sensitivity)
    layers = []
    for li in range(len(rs.f_text)):
        fv, fk, fr = rs.f_vision[li], kv.f_key[li], kv.f_redundant[li]
        dv = sens.delta_vision[li]

        def corr(a: np.ndarray, b: np.ndarray) -> float | None:
            return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None

        layers.append({
            "layer": li,
            "corr_all_redundant": corr(fv, fr), "corr_all_key": corr(fv, fk),
            "corr_key_redundant": corr(fk, fr),
            "l1_all_redundant": float(np.abs(fv - fr).sum()),
            "l1_key_redundant": float(np.abs(fk - fr).sum()),
            "text_term": float((rs.f_text[li][:, None] * sens.delta_text[li]).sum()),
            "vision_term_key": float((fk[:, None] * dv).sum()),
            "vision_term_all": float((fv[:, None] * dv).sum()),
        })  # fmt: skip
    allocs: dict[str, Any] = {}
    for budget in budgets:
        widths = {}
        for method in SIGNALS:
            ctx = an.ctx.fork()
            step = AllocateBitsPass(budget=budget, bits=bits, method=method)
            Pipeline([step], name=method).run(an.model, ctx)
            widths[method] = np.asarray(ctx.facts.get(BitAllocation).widths)
        allocs[f"{budget:g}"] = {
            "widths": {m: w.tolist() for m, w in widths.items()},
            "differ": {f"{a} vs {b}": int((widths[a] != widths[b]).sum())
                       for i, a in enumerate(SIGNALS) for b in SIGNALS[i + 1:]},
        }  # fmt: skip
    return {"layers": layers, "budgets": allocs}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", choices=["digits-vlm", "facts-vlm"], default="facts-vlm")
    ap.add_argument("--model", help="default: examples/EXAMPLE/model.onnx")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (as tools.mode_table)")
    ap.add_argument("--budgets", default="2.25,2.5,3.0")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures (and widths) here")
    args = ap.parse_args()
    model = args.model or str(Path("examples") / args.example / "model.onnx")
    bits = tuple(int(b) for b in args.bits.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration_builder(args.example)(Path(tmp) / "calib.npz", args.seed)
        opts = CompileOptions(seed=args.seed, bits=bits, threads=args.threads)
        an = analyze(model, str(calib), opts)
    res = overlap(an, budgets, bits)
    print(f"{model}, calibration seed {args.seed}")
    print("layer  corr(all,red)  corr(all,key)  corr(key,red)  L1(all,red)  L1(key,red)"
          "  text term  vision term (key / all)")  # fmt: skip
    for r in res["layers"]:
        print(
            f"{r['layer']:>5}  {_fmt(r['corr_all_redundant']):>13}  "
            f"{_fmt(r['corr_all_key']):>13}  {_fmt(r['corr_key_redundant']):>13}  "
            f"{r['l1_all_redundant']:>11.3f}  {r['l1_key_redundant']:>11.3f}  "
            f"{r['text_term']:>9.2e}  {r['vision_term_key']:.2e} / {r['vision_term_all']:.2e}"
        )
    for budget, a in res["budgets"].items():
        diffs = ", ".join(f"{k}: {v}" for k, v in a["differ"].items())
        n = sum(len(layer) for layer in a["widths"]["mode"])
        print(f"budget {budget}: experts with another width (of {n}) — {diffs}")
    if args.json:
        args.json.write_text(json.dumps({"model": model, "seed": args.seed, **res}, indent=1))


if __name__ == "__main__":
    main()
