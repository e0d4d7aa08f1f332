"""How the joint check (``--joint select``) should measure: the evidence behind its defaults.

    python -m tools.joint_study [--budget 2.0] [--bits 1,2,3,4] [--seed 0]
                                [--out docs/joint_study.json]

On digits-vlm at ``--budget`` over ``--bits`` (docs/results_digits.md finding 5: MODE's allocation
loses to uniform 2-bit), the joint KL of MODE's allocation and of uniform is measured every
way the check could measure it — experts quantized by RTN (as δ's probes) or GPTQ (as
deployed), KL read at the answer positions (as δ) or at every text position — on the
calibration set the Hessians come from (in-sample, and cross-fitted as the check does it:
`modec.method.joint.cross_fitted_kl`), on a fresh calibration set of another seed and on
512 evaluation samples; each row says which allocation the lower mean picks and which the
check's significance rule (`select_range`, uniform the default) picks; then both
allocations are GPTQ'd and evaluated on the whole evaluation set (the truth the check
should predict). Prints a Markdown table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from modec import data
from modec.evaluate import answer_kl, evaluate
from modec.facts import Calibration
from modec.frontend import OrtRunner
from modec.method.joint import JointQuantizer, cross_fitted_kl, joint_kl, select_range
from modec.method.probes import ProbeSettings
from modec.method.sensitivity import choose_subset
from modec.pipelines import CompileOptions
from modec.sweep import analyze, evaluate_model, quantize
from tools.mode_table import calibration_set

MODEL = "examples/digits-vlm/model.onnx"
EVAL = "examples/digits-vlm/eval.npz"


def study(budget: float, bits: tuple[int, ...], seed: int, threads: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibration_set(Path(tmp) / "calib.npz", seed)
        other = data.load(calibration_set(Path(tmp) / "other.npz", seed + 1))
        an = analyze(MODEL, str(calib), CompileOptions(seed=seed, bits=bits, threads=threads))
    own = an.ctx.facts.get(Calibration).data
    ev = data.load(EVAL)
    sample = ev.subset(choose_subset(ev.multimodal, 512, 0))
    sets = {
        f"calibration (seed {seed}, the Hessians')": own,
        f"calibration (seed {seed + 1})": other,
        "evaluation (512 samples)": sample,
    }
    mode = quantize(an, "mode", budget)
    uniform_width = int(budget)
    cands = [[list(w) for w in mode.allocation.widths],
             [[uniform_width] * len(w) for w in mode.allocation.widths]]  # fmt: skip
    ranges = [tuple(bits), (uniform_width,)]  # MODE's range and uniform's, as the check sees them
    rows = []
    for quantizer in ("rtn", "gptq"):
        q = JointQuantizer(quantizer, own if quantizer == "gptq" else None)
        for positions in ("answer", "text"):
            s = ProbeSettings(bits=bits, group_size=an.options.group_size, positions=positions,
                              batch_size=32, threads=threads)  # fmt: skip
            runs = {name: joint_kl(an.model, ds, s, cands, q) for name, ds in sets.items()}
            if quantizer == "gptq":  # what the check does: no sample judged by its own fit
                runs[f"calibration (seed {seed}, cross-fitted)"] = cross_fitted_kl(
                    an.model, own, s, cands, q)  # fmt: skip
            for name, r in runs.items():
                assert r.sample_kl is not None and r.sample_positions is not None
                _, pick, (diff, _) = select_range(ranges, r.sample_kl, r.sample_positions)
                rows.append({"quantizer": quantizer, "positions": positions, "set": name,
                             "kl_mode": float(r.overall[0]), "kl_uniform": float(r.overall[1]),
                             "positions_read": r.positions,
                             "mode_minus_uniform": [diff.estimate, diff.low, diff.high],
                             "rule_picks": "mode" if pick == 0 else "uniform"})  # fmt: skip
                print(rows[-1], flush=True)
    fp32 = evaluate(OrtRunner(MODEL, threads), ev, keep_logprobs=True)
    truth = {}
    for name, sim in (("mode", mode), ("uniform", quantize(an, "uniform", float(uniform_width)))):
        res = evaluate_model(sim.model, ev, threads, keep_logprobs=True)
        truth[name] = {"accuracy": res.overall.accuracy,
                       "answer_kl": float(answer_kl(fp32, res).mean())}  # fmt: skip
    return {"budget": budget, "bits": list(bits), "seed": seed, "rows": rows, "truth": truth,
            "histogram_mode": {str(k): v for k, v in mode.allocation.histogram().items()},
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def markdown(doc: dict[str, Any]) -> str:
    t = doc["truth"]
    better = "uniform" if t["uniform"]["accuracy"] >= t["mode"]["accuracy"] else "mode"
    lines = [
        f"Budget {doc['budget']:g} over {{{', '.join(map(str, doc['bits']))}}}, calibration "
        f"seed {doc['seed']}. MODE's allocation: {doc['histogram_mode']}. On the whole "
        f"evaluation set (GPTQ, as deployed) MODE gets {100 * t['mode']['accuracy']:.2f}% "
        f"(answer KL {t['mode']['answer_kl']:.2e}) and uniform "
        f"{100 * t['uniform']['accuracy']:.2f}% ({t['uniform']['answer_kl']:.2e}): the check "
        f"should pick **{better}**.",
        "",
        "| quantizer | KL read at | measured on | positions | joint KL, MODE | joint KL, uniform "
        "| MODE − uniform [95% CI] | lower mean picks | the check's rule picks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def mark(pick: str) -> str:
        return f"**{pick}**" if pick == better else f"{pick} (wrong)"

    for r in doc["rows"]:
        est, lo, hi = r["mode_minus_uniform"]
        lines.append(
            f"| {r['quantizer']} | {r['positions']} | {r['set']} | {r['positions_read']} | "
            f"{r['kl_mode']:.4f} | {r['kl_uniform']:.4f} | {est:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
            f"{mark('mode' if r['kl_mode'] < r['kl_uniform'] else 'uniform')} | "
            f"{mark(r['rule_picks'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--bits", default="1,2,3,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/joint_study.json"))
    args = ap.parse_args()
    bits = tuple(int(b) for b in args.bits.split(","))
    if float(args.budget) != int(args.budget) or int(args.budget) not in bits:
        ap.error("--budget must be one of --bits (the study compares MODE with uniform)")
    doc = study(args.budget, bits, args.seed, args.threads)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))


if __name__ == "__main__":
    main()
