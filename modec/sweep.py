"""Analyse once, allocate many times: the engine behind ``modec sweep`` and the results table.

`analyze` runs the analysis half of the MODE pipeline (find-moe … measure-sensitivity) once
and keeps its context; `quantize` then runs allocate-bits + quantize-experts for one method
and budget on a fresh copy of the canonical model, so a sweep over budgets and methods pays
for calibration and sensitivity only once.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import onnx_ir as ir

from modec import data as data_mod
from modec.driver import check_budget, load_inputs
from modec.facts import BitAllocation
from modec.instruments import ProgressBar
from modec.pipeline import PassContext, PassRecord, Pipeline
from modec.pipelines import CompileOptions, analysis_passes, decision_passes

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    """The canonical model and the analysis results shared by every allocation."""

    model: ir.Model
    ctx: PassContext
    records: list[PassRecord]
    options: CompileOptions


def analyze(
    model_path: str | os.PathLike[str],
    calib_path: str | os.PathLike[str],
    options: CompileOptions,
    progress: Callable[[int, str], ProgressBar] | None = None,
    sensitivity: bool = True,
) -> Analysis:
    """Run the analysis phases (find-moe … measure-sensitivity) once; without
    ``sensitivity`` the probes are skipped (enough for the methods that do not read them:
    uniform, mc-moe, veq-me, mode-no-sens)."""
    model, ctx = load_inputs(model_path, calib_path, options, progress)
    passes = analysis_passes(options, sensitivity)
    model, records = Pipeline(passes, name="analysis").run(model, ctx)
    return Analysis(model, ctx, records, options)


@dataclass
class Quantized:
    """One allocation: the simulated-quantization model and the widths it used."""

    model: ir.Model
    allocation: BitAllocation


def quantize(
    an: Analysis, method: str, budget: float, quantizer: Literal["gptq", "rtn"] = "gptq",
    joint: Literal["off", "select", "guard"] | None = None,
    joint_weighting: Literal["positions", "balanced"] | None = None,
    calibrate_costs: bool | None = None,
) -> Quantized:  # fmt: skip
    """allocate-bits + quantize-experts for one method and budget, on a copy of the model
    (``joint``, ``joint_weighting``: allocate-bits' joint check; ``calibrate_costs``: its
    calibrated costs; default: the analysis options')."""
    from modec.moe.canonical import is_moe_node

    o = replace(an.options, method=method, budget=budget, quantizer=quantizer,
                joint=an.options.joint if joint is None else joint,
                joint_weighting=joint_weighting or an.options.joint_weighting,
                calibrate_costs=(an.options.calibrate_costs if calibrate_costs is None
                                 else calibrate_costs))  # fmt: skip
    experts = [int(n.attributes["num_experts"].value) for n in an.model.graph if is_moe_node(n)]
    check_budget(experts, o)
    ctx = an.ctx.fork()
    model = ir.serde.deserialize_model(ir.serde.serialize_model(an.model))
    model, _ = Pipeline(decision_passes(o), name=method).run(model, ctx)
    return Quantized(model, ctx.facts.get(BitAllocation))


def quantize_widths(an: Analysis, widths: list[list[int]], label: str = "fixed") -> Quantized:
    """quantize-experts (GPTQ) at the given widths ``[layer][expert]``, no ILP, on a copy of
    the model: for studies that choose the widths themselves (tools/pilot_study.py)."""
    from modec.passes.quantize_experts import QuantizeExpertsPass

    o = an.options
    flat = [w for layer in widths for w in layer]
    alloc = BitAllocation(label, tuple(sorted(set(flat))), float(sum(flat) / len(flat)),
                          o.group_size, tuple(tuple(int(w) for w in layer) for layer in widths),
                          0.0, "fixed", 0.0, False)  # fmt: skip
    ctx = an.ctx.fork()
    ctx.facts.put(alloc)
    model = ir.serde.deserialize_model(ir.serde.serialize_model(an.model))
    passes = [QuantizeExpertsPass(group_size=o.group_size, method="gptq")]
    model, _ = Pipeline(passes, name=label).run(model, ctx)
    return Quantized(model, alloc)


def evaluate_model(model: ir.Model, ds: data_mod.Dataset, threads: int = 2,
                   keep_logprobs: bool = False) -> Any:  # fmt: skip
    """Accuracy of a canonical (simulated-quantization) model with the executor."""
    from modec.evaluate import evaluate
    from modec.executor import Executor

    ex = Executor(copy.copy(model), intra_op_threads=threads)
    out = ex.output_names[0]
    return evaluate(lambda feeds: ex.run(feeds).outputs[out], ds, keep_logprobs=keep_logprobs)


def parse_budgets(text: str) -> list[float]:
    """``2.0:4.0:0.25`` (start:stop:step, inclusive) or ``2.5,3.0``."""
    from modec.errors import UsageError

    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError("need start <= stop and step > 0")
            n = round((stop - start) / step) + 1
            return [round(start + i * step, 6) for i in range(n)]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise UsageError(
            f"--budgets {text!r}: expected start:stop:step (e.g. 2.0:4.0:0.25) or a comma list "
            f"({exc})"
        ) from exc


def sweep(
    model_path: str,
    calib_path: str,
    budgets: list[float],
    options: CompileOptions,
    eval_path: str | None = None,
    progress: Callable[[int, str], ProgressBar] | None = None,
) -> list[dict[str, Any]]:
    """One analysis, then allocation + simulated evaluation per budget."""
    from modec.summary import size_summary

    an = analyze(model_path, calib_path, options, progress)
    ds = data_mod.load(eval_path) if eval_path else None
    rows: list[dict[str, Any]] = []
    for budget in budgets:
        q = quantize(an, options.method, budget, options.quantizer)
        model, alloc = q.model, q.allocation
        sizes = size_summary(model, alloc.widths, options.group_size)
        row: dict[str, Any] = {
            "budget": budget,
            "average_bits": alloc.average,
            "histogram": {str(k): v for k, v in alloc.histogram().items()},
            "experts_bytes": sizes["experts_quantized"],
            "model_bytes": sizes["model_quantized"],
            "model_fp32_bytes": sizes["model_fp32"],
        }
        if ds is not None:
            res = evaluate_model(model, ds, options.threads)
            row.update(
                overall=res.overall.accuracy,
                multimodal=res.multimodal.accuracy,
                text_only=res.text_only.accuracy,
            )
        rows.append(row)
        log.info("sweep: budget %.3f done", budget)
    return rows


def write_sweep(out: str | os.PathLike[str], rows: list[dict[str, Any]], title: str) -> list[str]:
    """Write ``sweep.json``, ``sweep.md`` and (with accuracies) ``sweep.png``."""
    import json
    from pathlib import Path

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    has_acc = bool(rows) and "overall" in rows[0]
    head = "| budget | avg bits | model MiB |" + (
        " overall | multimodal | text-only |" if has_acc else ""
    )
    cols = 6 if has_acc else 3
    lines = [f"# {title}", "", head, "|" + "---|" * cols]
    for r in rows:
        cells = [
            f"{r['budget']:.2f}",
            f"{r['average_bits']:.3f}",
            f"{r['model_bytes'] / 2**20:.2f}",
        ]
        if has_acc:
            cells += [f"{100 * r[k]:.2f}%" for k in ("overall", "multimodal", "text_only")]
        lines.append("| " + " | ".join(cells) + " |")
    (d / "sweep.md").write_text("\n".join(lines) + "\n")
    written = ["sweep.json", "sweep.md"]
    if has_acc:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        x = [r["average_bits"] for r in rows]
        for key in ("overall", "multimodal", "text_only"):
            ax[0].plot(x, [100 * r[key] for r in rows], marker="o", label=key)
            ax[1].plot([r["model_bytes"] / 2**20 for r in rows], [100 * r[key] for r in rows],
                       marker="o", label=key)  # fmt: skip
        ax[0].set_xlabel("average expert bits")
        ax[1].set_xlabel("model size (MiB)")
        for a in ax:
            a.set_ylabel("accuracy (%)")
            a.grid(alpha=0.3)
            a.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(d / "sweep.png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append("sweep.png")
    return written
