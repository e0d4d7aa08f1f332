"""The accuracy table of MODE against the baselines on a bundled example.

    python -m tools.mode_table [--example digits-vlm|facts-vlm] [--models A.onnx,B.onnx]
        [--out docs/results_digits.md] [--seeds 0,1,2] [--budgets 3.0,2.5,2.25]

For each model (``--models``: exports of the example trained from different seeds; default
the example's ``model.onnx``) and each calibration seed it builds a calibration set (128
samples from the calibration digit pool, mixed like real calibration data), runs the
analysis passes once (routing statistics and sensitivities), then allocates and quantizes
with every method at every budget (same ILP, same GPTQ, only the importance signal
changes) and evaluates the simulated-quantization model on the example's ``eval.npz``:
accuracy, and the KL to that model's fp32 output per answer token. Writes the table (mean ±
std over models × seeds, and MODE against the best baseline at each budget with a paired
bootstrap interval) to ``--out``, the raw rows to ``<out>.json`` and a plot of accuracy
against budget (MODE and the baselines) to ``<out stem>_budget.png``.

``--store DIR`` keeps every evaluated row (its accuracies, KL and per-sample correctness)
under a key of the model's and the evaluation set's SHA-256, the example, calibration seed,
method, budget, widths and threads; a later run with the same store evaluates only the rows
it lacks and runs a seed's analysis only when one of its rows is missing. Runs compose: add
a training seed (``--models A,B``) or the ablations later, and the table and its paired
intervals cover all of them. The key does not cover modec's code: start a new store after
changing the passes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modec import data, stats
from modec.artifact import sha256_file
from modec.evaluate import EvalResult, answer_kl, evaluate
from modec.frontend import OrtRunner
from modec.method.joint import Weighting
from modec.pipelines import PIPELINES, CompileOptions
from modec.sweep import analyze, evaluate_model, quantize
from tools.digits_vlm import build_data, scenes

#: ``<method>+joint``: the method with allocate-bits' joint check (``--joint select``);
#: ``+joint-balanced``: with ``--joint-weighting balanced``; ``+joint-guard``: ``--joint
#: guard``; ``+cal``: allocate-bits' calibrated costs (``--calibrate-costs``), no check;
#: ``+cal-guard``: both. Each: (joint, joint_weighting, calibrate_costs).
JOINT: dict[str, tuple[Literal["off", "select", "guard"], Weighting, bool]] = {
    "joint": ("select", "positions", False),
    "joint-balanced": ("select", "balanced", False),
    "joint-guard": ("guard", "positions", False),
    "cal": ("off", "positions", True),
    "cal-guard": ("guard", "positions", True),
}
METHODS = ["mode", "uniform", "mc-moe", "veq-me", "mode-no-key", "mode-no-sens",
           "mode-sens-only", "mode-redundant", "mode+joint", "mode+joint-balanced",
           "mode+joint-guard", "mode+cal", "mode+cal-guard"]  # fmt: skip
#: The methods MODE is compared against (the ablations are MODE's own variants).
BASELINES = ("uniform", "mc-moe", "veq-me")
SPLITS = ("overall", "multimodal", "text_only")


def calibration_set(path: Path, seed: int) -> Path:
    pools = scenes.digit_pools(seed=0)
    samples = scenes.make_split(pools["calib"], build_data.CALIB_COUNTS, seed=1000 + seed)
    build_data.write_split(path, samples)
    return path


def calibration_builder(example: str) -> Callable[[Path, int], Path]:
    """The function that writes a fresh calibration set of ``example`` for a seed."""
    if example == "facts-vlm":
        from tools.facts_vlm.build import calibration_set as facts_calibration

        return facts_calibration
    return calibration_set


#: Per-sample correctness of every evaluated row: (model, seed, method, budget) -> bool [S].
Correct = dict[tuple[int, int, str, float], np.ndarray]


class RowStore:
    """Evaluated rows on disk (``--store``), one ``.npz`` per row: the row without its model
    index (``row``, JSON) and the per-sample correctness (``correct``). ``None`` directory:
    nothing is kept."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: dict[str, Any]) -> Path:
        assert self.root is not None
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.root / f"{name}.npz"

    def get(self, key: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray] | None:
        if self.root is None or not (path := self._path(key)).exists():
            return None
        with np.load(path) as z:
            return json.loads(str(z["row"])), z["correct"].astype(bool)

    def put(self, key: dict[str, Any], row: dict[str, Any], correct: np.ndarray) -> None:
        if self.root is None:
            return
        path = self._path(key)
        tmp = path.with_suffix(".tmp.npz")
        kept = {k: v for k, v in row.items() if k != "model"}
        np.savez(tmp, row=np.array(json.dumps(kept, sort_keys=True)), correct=correct)
        tmp.replace(path)  # a killed run leaves no half-written row


def run(models: list[str], eval_path: str, seeds: list[int], budgets: list[float],
        curve: list[float], methods: list[str], bits: tuple[int, ...] = (2, 3, 4),
        example: str = "digits-vlm", threads: int = 2, store: Path | None = None,
        ) -> tuple[list[dict[str, Any]], Correct]:  # fmt: skip
    ds = data.load(eval_path)
    rows: list[dict[str, Any]] = []
    correct: Correct = {}
    build_calib = calibration_builder(example)
    kept = RowStore(store)
    eval_sha = sha256_file(eval_path) if store is not None else ""
    wanted = sorted(
        (m, b)
        for m, b in {(m, b) for m in methods for b in budgets} | {("mode", b) for b in curve}
        if m != "uniform" or float(b) == int(b)
    )
    for mi, model in enumerate(models):
        model_sha = sha256_file(model) if store is not None else ""
        fp32_key = {"model": model_sha, "eval": eval_sha, "threads": threads}

        def reference(model: str = model) -> EvalResult:
            return evaluate(OrtRunner(model, threads), ds, keep_logprobs=True)

        fp32 = None  # evaluated when a row needs its log-probabilities or it is not kept
        if (got := kept.get(fp32_key)) is None:
            fp32 = reference()
            assert fp32.correct is not None
            got = ({"method": "fp32", "budget": 32.0, "seed": -1, "kl": 0.0,
                    **{k: getattr(fp32, k).accuracy for k in SPLITS}}, fp32.correct)  # fmt: skip
            kept.put(fp32_key, *got)
        rows.append({**got[0], "model": mi})
        correct[(mi, -1, "fp32", 32.0)] = got[1]
        with tempfile.TemporaryDirectory() as tmp:
            for seed in seeds:
                keys = {(m, b): {"model": model_sha, "eval": eval_sha, "example": example,
                                 "seed": seed, "method": m, "budget": float(b),
                                 "bits": list(bits), "threads": threads}
                        for m, b in wanted}  # fmt: skip
                done = {mb: got for mb, k in keys.items() if (got := kept.get(k)) is not None}
                missing = [mb for mb in wanted if mb not in done]
                print(f"model {mi} seed {seed}: {len(done)} rows kept, {len(missing)} to "
                      "evaluate", flush=True)  # fmt: skip
                if missing and fp32 is None:
                    fp32 = reference()
                if missing:
                    calib = build_calib(Path(tmp) / f"calib{seed}.npz", seed)
                    t0 = time.perf_counter()
                    an = analyze(model, str(calib),
                                 CompileOptions(seed=seed, bits=bits, threads=threads))  # fmt: skip
                    print(f"model {mi} seed {seed}: analysis {time.perf_counter() - t0:.1f} s",
                          flush=True)  # fmt: skip
                for method, budget in missing:
                    t0 = time.perf_counter()
                    base, _, extra = method.partition("+")
                    joint, weighting, cal = JOINT[extra] if extra else ("off", "positions", False)
                    sim = quantize(an, base, budget, joint=joint, joint_weighting=weighting,
                                   calibrate_costs=cal)  # fmt: skip
                    res = evaluate_model(sim.model, ds, threads, keep_logprobs=True)
                    assert res.correct is not None and fp32 is not None
                    kl = float(answer_kl(fp32, res).mean())
                    row = {"method": method, "budget": budget, "seed": seed, "kl": kl,
                           "average_bits": sim.allocation.average,
                           **{k: getattr(res, k).accuracy for k in SPLITS}}  # fmt: skip
                    done[(method, budget)] = (row, res.correct)
                    kept.put(keys[(method, budget)], row, res.correct)
                    took = time.perf_counter() - t0
                    print(f"  {method:>15} @ {budget:.2f}: overall {100 * row['overall']:.2f}% "
                          f"KL {kl:.2e} ({took:.1f} s)", flush=True)  # fmt: skip
                for method, budget in wanted:  # one order, stored or evaluated
                    row, hits = done[(method, budget)]
                    rows.append({**row, "model": mi})
                    correct[(mi, seed, method, float(budget))] = hits
    return rows, correct


def _paired(rows: list[dict[str, Any]], correct: Correct, b: float, a: str, c: str
            ) -> dict[str, Any] | None:  # fmt: skip
    """``a`` − ``c`` at budget ``b`` in points: a paired bootstrap interval over evaluation
    samples (each sample's difference averaged over the models × seeds both have first),
    and the difference per model × seed; None when either has no row there."""
    reps = sorted({(r["model"], r["seed"]) for r in rows if r["method"] == a and r["budget"] == b}
                  & {(r["model"], r["seed"]) for r in rows
                     if r["method"] == c and r["budget"] == b})  # fmt: skip
    if not reps:
        return None
    x = np.mean([correct[(mi, s, a, float(b))] for mi, s in reps], axis=0)
    y = np.mean([correct[(mi, s, c, float(b))] for mi, s in reps], axis=0)
    iv = stats.paired_bootstrap_difference(x, y)
    each = [100 * float(correct[(mi, s, a, float(b))].mean() - correct[(mi, s, c, float(b))].mean())
            for mi, s in reps]  # fmt: skip
    return {"budget": b, "difference_pp": 100 * iv.estimate,
            "ci95_pp": [100 * iv.low, 100 * iv.high],
            "replicates": [f"model {mi} seed {s}" for mi, s in reps],
            "per_replicate_pp": each, "ahead_in": sum(d > 0 for d in each)}  # fmt: skip


def against_best_baseline(rows: list[dict[str, Any]], correct: Correct, budgets: list[float]
                          ) -> list[dict[str, Any]]:  # fmt: skip
    """Per budget: the baseline with the best mean overall accuracy, and MODE − it in points
    with a paired bootstrap interval over evaluation samples (each sample's difference is
    averaged over the models × seeds first; the spread over those is the table's std)."""
    out = []
    for b in budgets:
        means = {m: np.mean([r["overall"] for r in rows if r["method"] == m and r["budget"] == b])
                 for m in BASELINES
                 if any(r["method"] == m and r["budget"] == b for r in rows)}  # fmt: skip
        if not means:
            continue
        best = max(means, key=lambda m: means[m])
        got = _paired(rows, correct, b, "mode", best)
        if got is not None:
            out.append({"budget": b, "best_baseline": best, **got})
    return out


def against_mode(rows: list[dict[str, Any]], correct: Correct, budgets: list[float],
                 methods: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """Per budget and per MODE variant (ablations, ``+joint`` …) with rows: it − MODE in
    points, as `against_best_baseline` measures it."""
    out = []
    for b in budgets:
        for m in methods:
            if m in ("mode", "fp32") or m in BASELINES:
                continue
            got = _paired(rows, correct, b, m, "mode")
            if got is not None:
                out.append({"method": m, **got})
    return out


def table(rows: list[dict[str, Any]], budgets: list[float], methods: list[str]) -> str:
    fps = [r for r in rows if r["method"] == "fp32"]
    fp = {k: float(np.mean([r[k] for r in fps])) for k in SPLITS}
    with_kl = all("kl" in r for r in rows)
    kl_head = " KL to fp32 (×1e-3) |" if with_kl else ""
    head = "| method | budget | overall | multimodal | text-only | rel. to fp32 (overall) |"
    lines = [head + kl_head,
             "|---|---|---|---|---|---|" + ("---|" if with_kl else ""),
             f"| fp32 | 32 | {100 * fp['overall']:.2f} | {100 * fp['multimodal']:.2f} | "
             f"{100 * fp['text_only']:.2f} | — |" + (" 0 |" if with_kl else "")]  # fmt: skip
    for b in budgets:
        for m in methods:
            sel = [r for r in rows if r["method"] == m and r["budget"] == b]
            if not sel:
                continue
            cells = []
            for k in SPLITS:
                v = np.array([100 * r[k] for r in sel])
                cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
            rel = 100 * (np.mean([r["overall"] for r in sel]) - fp["overall"]) / fp["overall"]
            kl = ""
            if with_kl:
                kls = np.array([1e3 * r["kl"] for r in sel])
                kl = f" {kls.mean():.2f} ± {kls.std():.2f} |"
            lines.append(f"| {m} | {b:g} | {' | '.join(cells)} | {rel:+.2f}% |{kl}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    fp = np.mean([r["overall"] for r in rows if r["method"] == "fp32"])
    ax.axhline(100 * fp, color="k", ls="--", label="fp32")
    for m in sorted({r["method"] for r in rows} - {"fp32"}):
        budgets = sorted({r["budget"] for r in rows if r["method"] == m})
        if len(budgets) < 3:
            continue
        means = [np.mean([100 * r["overall"] for r in rows
                          if r["method"] == m and r["budget"] == b]) for b in budgets]  # fmt: skip
        ax.plot(budgets, means, marker="o", label=m)
    ax.set_xlabel("average expert bits (budget)")
    ax.set_ylabel("overall accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_keeping_findings(path: Path, body: str) -> None:
    """Write a generated page; the hand-written analysis under ``## Findings`` of the page
    already there survives the re-run."""
    marker = "\n## Findings"
    if path.exists() and marker in (old := path.read_text()):
        body += marker + old.split(marker, 1)[1]
    path.write_text(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--example", default="digits-vlm", choices=["digits-vlm", "facts-vlm"])
    ap.add_argument("--models", default="",
                    help="comma-separated ONNX exports of the example (e.g. trained from "
                    "different seeds); default: examples/EXAMPLE/model.onnx")  # fmt: skip
    ap.add_argument("--eval", default="", help="default: examples/EXAMPLE/eval.npz")
    ap.add_argument("--out", type=Path,
                    help="default: docs/results_digits.md or docs/results_facts.md")  # fmt: skip
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="3.0,2.5,2.25")
    ap.add_argument("--curve", default="2.0,2.5,3.0,3.5,4.0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default="2,3,4", help="candidate widths")
    ap.add_argument("--threads", type=int, default=2,
                    help="onnxruntime threads (part of the sensitivity cache key)")  # fmt: skip
    ap.add_argument("--store", type=Path, default=None,
                    help="directory keeping every evaluated row: a later run with the same "
                    "store evaluates only the rows it lacks")  # fmt: skip
    args = ap.parse_args()
    root = Path("examples") / args.example
    if args.out is None:
        args.out = Path("docs") / f"results_{args.example.split('-')[0]}.md"
    models = args.models.split(",") if args.models else [str(root / "model.onnx")]
    eval_path = args.eval or str(root / "eval.npz")
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    curve = [float(b) for b in args.curve.split(",") if b]
    methods = args.methods.split(",")
    for m in methods:
        base, _, extra = m.partition("+")
        if base not in PIPELINES or (extra and extra not in JOINT):
            ap.error(f"--methods: unknown {m!r}; give methods of {list(PIPELINES)}, "
                     f"optionally with +{' or +'.join(JOINT)}")  # fmt: skip
    t0 = time.perf_counter()
    bits = tuple(int(b) for b in args.bits.split(","))
    rows, correct = run(models, eval_path, seeds, budgets, curve, methods, bits, args.example,
                        args.threads, args.store)  # fmt: skip
    versus = against_best_baseline(rows, correct, budgets)
    variants = against_mode(rows, correct, budgets, methods)
    doc = {"rows": rows, "mode_vs_best_baseline": versus, "variants_vs_mode": variants}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    png = args.out.with_name(f"{args.out.stem}_budget.png")
    curves = [
        m
        for m in {r["method"] for r in rows}
        if len({r["budget"] for r in rows if r["method"] == m}) >= 3
    ]
    if curves:  # a curve needs at least three budgets
        plot(rows, png)
    image = f"![accuracy against budget]({png.name})\n" if curves else ""
    given = (("example", args.example), ("models", args.models), ("seeds", args.seeds),
             ("budgets", args.budgets), ("curve", args.curve), ("methods", args.methods),
             ("bits", args.bits), ("threads", args.threads), ("out", args.out),
             ("store", args.store or ""))  # fmt: skip
    cmd = "python -m tools.mode_table " + " ".join(
        f"--{k} {v if v != '' else repr(v)}"
        for k, v in given
        if (v or k not in ("models", "store")) and (k != "threads" or v != 2)
    )
    vs_lines = "\n".join(
        f"| {v['budget']:g} | {v['best_baseline']} | {v['difference_pp']:+.2f} "
        f"[{v['ci95_pp'][0]:+.2f}, {v['ci95_pp'][1]:+.2f}] | {v['ahead_in']} of "
        f"{len(v['per_replicate_pp'])} | {' / '.join(f'{d:+.2f}' for d in v['per_replicate_pp'])} |"
        for v in versus
    )
    vs_table = (
        "MODE against the best of {uniform, MC-MoE, VEQ-ME} at each budget (overall accuracy, "
        "points; 95% paired bootstrap over evaluation samples of the per-sample difference "
        "averaged over models × seeds; then the difference of the two accuracies per model × "
        "seed, models in the order of `--models`, seeds in the order of `--seeds`):\n\n"
        "| budget | best baseline | MODE − it, pp [95% CI] "
        "| MODE ahead in | per model × seed, pp |\n|---|---|---|---|---|\n" + vs_lines + "\n"
        if versus
        else ""
    )
    var_lines = "\n".join(
        f"| {v['budget']:g} | {v['method']} | {v['difference_pp']:+.2f} "
        f"[{v['ci95_pp'][0]:+.2f}, {v['ci95_pp'][1]:+.2f}] | {v['ahead_in']} of "
        f"{len(v['per_replicate_pp'])} | {' / '.join(f'{d:+.2f}' for d in v['per_replicate_pp'])} |"
        for v in variants
    )
    var_table = (
        "MODE's variants against MODE (the same measures):\n\n"
        "| budget | variant | it − MODE, pp [95% CI] | ahead of MODE in | per model × seed, pp |\n"
        "|---|---|---|---|---|\n" + var_lines + "\n"
        if variants
        else ""
    )
    stored_note = (" (rows the store already held were read, not evaluated again)"
                   if args.store else "")  # fmt: skip
    body = f"""# MODE on {args.example}: accuracy at equal size

Made by `{cmd}` in {time.perf_counter() - t0:.0f} s on 2 CPU cores{stored_note}. Mean ± std over
{len(models)} model(s) × calibration seeds {args.seeds} (each a fresh 128-sample calibration
set); accuracies in % on `{eval_path}`, simulated quantization (dequantized weights, modec's
executor); KL to the model's fp32 output per answer token. Candidate widths {args.bits};
group size 128; GPTQ for every method.

{table(rows, budgets, methods)}

{vs_table}
{var_table}
{image}"""
    write_keeping_findings(args.out, body)
    print(body)


if __name__ == "__main__":
    main()
