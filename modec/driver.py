"""The compile driver: frontend → a named pipeline → the output directory, as one transaction.

``compile_model`` loads and checks the model and calibration set (cheap checks first), runs
the pipeline (`modec.pipelines`) with the output's staging directory as the artifact
directory, computes the summary (and, with an evaluation set, the fp32 and quantized
accuracy), builds the report in memory and writes, into the staging directory:

- ``model.sim.onnx``: the canonical graph with dequantized expert weights (the
  simulated-quantization model, run by modec's executor);
- ``experts.safetensors``: every expert's codes, fp16 scales and uint8 zeros
  (``l{layer}.{proj}.e{expert}.{codes|scale|zero}``), unpacked;
- ``allocation.json``: the width of every expert (deterministic: no timings);
- ``report.json`` and ``report.html`` (rendered once, from the same dict);
- the artifact (``model.so``, ``weights.safetensors``, ``manifest.json``) from lower-tvm.

Then `modec.output.commit` makes it ``OUT`` in one step; nothing touches ``OUT`` after.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modec import data as data_mod
from modec.errors import ModelError
from modec.facts import BitAllocation, Calibration, Facts, QuantizedExperts
from modec.instruments import DumpIR, Instrument, ProgressBar
from modec.output import (
    ALLOCATION_FILE,
    EXPERTS_FILE,
    REPORT_FILE,
    SIM_MODEL,
    prepare_out,
    transaction,
)
from modec.pipeline import PassContext, Pipeline, RunOptions, build_report, json_text
from modec.pipelines import CompileOptions, parse_pipeline, standard_pipeline

log = logging.getLogger(__name__)

__all__ = [
    "CompileOptions",
    "CompileResult",
    "check_budget",
    "compile_model",
    "default_cache_dir",
    "load_inputs",
]


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/modec`` (or ``~/.cache/modec``): analysis results by content hash."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "modec")


@dataclass
class CompileResult:
    """What a compile wrote and decided."""

    out: Path
    report: dict[str, Any]
    allocation: BitAllocation | None
    model: ir.Model = field(repr=False)

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self.report.get("summary") or {})


def preflight(model: ir.Model, o: CompileOptions) -> list[int]:
    """Cheap checks before the expensive passes: experts per layer, budget feasibility."""
    from modec.moe.discover import find_moe

    regions = find_moe(model)
    if not regions:
        raise ModelError(
            "no MoE layer found (no TopK router fed by a constant [E, H] matmul); modec "
            "quantizes Mixture-of-Experts models only"
        )
    experts = [r.num_experts for r in regions]
    check_budget(experts, o)
    if o.target != "none":
        from modec.kernels.target import check_target

        check_target(o.target)
    return experts


def check_budget(experts: list[int], o: CompileOptions) -> None:
    """Widths, group size and budget are usable for layers of ``experts`` experts."""
    from modec.numerics import ilp
    from modec.numerics.schemes import QuantScheme

    for b in o.bits:
        QuantScheme(b, o.group_size)  # validates widths and group size
    if o.method == "uniform" or o.budget_bytes > 0:
        return
    if o.scope == "global":
        ilp.check_budget(sum(experts), o.bits, o.budget, o.sense)
    else:
        for i, n in enumerate(experts):
            try:
                ilp.check_budget(n, o.bits, o.budget, o.sense)
            except Exception as exc:
                raise type(exc)(f"layer {i}: {exc}") from exc


def check_weights_finite(model: ir.Model) -> None:
    """NaN/Inf in an initializer makes every statistic meaningless: refuse early."""
    for name, v in model.graph.initializers.items():
        if v.const_value is None:
            continue
        arr = v.const_value.numpy()
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ModelError(
                f"initializer {name!r} holds {bad} NaN/Inf value(s); fix or re-export the model"
            )


def load_inputs(
    model_path: str | os.PathLike[str],
    calib_path: str | os.PathLike[str],
    o: CompileOptions,
    progress: Callable[[int, str], ProgressBar] | None = None,
) -> tuple[ir.Model, PassContext]:
    """Load and check the model and calibration data; the context the passes start from.

    The cheap checks run first (weights finite, MoE layers present, budget feasible) so that
    bad input fails in milliseconds, before any calibration work.
    """
    from modec.frontend import input_specs, load_onnx_proto

    proto = load_onnx_proto(model_path)
    model = ir.serde.deserialize_model(proto)
    check_weights_finite(model)
    preflight(model, o)
    calib = data_mod.load(calib_path)
    data_mod.check_against(calib, input_specs(proto))
    ctx = PassContext(
        facts=Facts(Calibration(calib)),
        options=RunOptions(seed=o.seed, threads=o.threads, cache_dir=o.cache_dir),
        progress=progress,
    )
    return model, ctx


def compile_model(
    model_path: str | os.PathLike[str],
    calib_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: CompileOptions | None = None,
    *,
    pipeline: str | None = None,
    force: bool = False,
    progress: Callable[[int, str], ProgressBar] | None = None,
    eval_path: str | os.PathLike[str] | None = None,
    dump_ir_after: Iterable[str] | None = None,
    dump_ir_dir: str | os.PathLike[str] | None = None,
    instruments: Iterable[Instrument] = (),
) -> CompileResult:
    """Run the pipeline and write the output directory (see the module docstring).

    Args:
        pipeline: pipeline text replacing the named pipeline of ``options.method``.
        eval_path: an evaluation set: the report then holds fp32 and quantized accuracy.
        dump_ir_after: pass names (or ``all``) after which the graph is written as ONNX to
            ``dump_ir_dir`` (default ``OUT.ir``, beside the output, not inside it).
    """
    o = options or CompileOptions()
    out_dir = Path(out)
    prepare_out(out_dir, force)
    model, ctx = load_inputs(model_path, calib_path, o, progress)
    pipe = parse_pipeline(pipeline) if pipeline else standard_pipeline(o)
    ctx.instruments.extend(instruments)
    if dump_ir_after:
        where = Path(dump_ir_dir) if dump_ir_dir else out_dir.with_name(f"{out_dir.name}.ir")
        ctx.instruments.append(DumpIR(where, after=dump_ir_after))
    with transaction(out_dir) as tmp:
        ctx.options = replace(ctx.options, artifact_dir=str(tmp), pipeline=pipe.text())
        model, records = pipe.run(model, ctx)
        alloc = ctx.facts.find(BitAllocation)
        quantized = ctx.facts.find(QuantizedExperts)
        report_options = {**asdict(o), "model": str(model_path), "calib": str(calib_path),
                          "pipeline": pipe.text()}  # fmt: skip
        report = build_report(pipe, records, ctx, report_options)
        if quantized is not None:
            _write_experts(tmp / EXPERTS_FILE, quantized)
            ir.save(model, str(tmp / SIM_MODEL))
        if alloc is not None:
            from modec.summary import summarize

            report["summary"] = summarize(
                str(out_dir), model, alloc, records, str(out_dir / REPORT_FILE)
            )
            (tmp / ALLOCATION_FILE).write_text(json_text(_allocation_doc(alloc, pipe)))
            if eval_path is not None and quantized is not None:
                report["summary"]["accuracy"] = _accuracy(model_path, tmp, eval_path, o.threads)
        _write_report(tmp, report)
    return CompileResult(out_dir, report, alloc, model)


def _allocation_doc(alloc: BitAllocation, pipe: Pipeline) -> dict[str, Any]:
    return {
        "method": alloc.method,
        "budget": alloc.budget,
        "bits": list(alloc.bits),
        "group_size": alloc.group_size,
        "widths": [list(w) for w in alloc.widths],
        "pipeline": pipe.text(),
    }


def _accuracy(
    model_path: str | os.PathLike[str], staged: Path, eval_path: str | os.PathLike[str],
    threads: int,
) -> dict[str, Any]:  # fmt: skip
    """fp32 (onnxruntime) and simulated-quantization accuracy on an evaluation set."""
    from modec.evaluate import evaluate
    from modec.frontend import OrtRunner
    from modec.runners import SimulatedRunner

    ds = data_mod.load(eval_path)
    base = evaluate(OrtRunner(model_path, threads=threads), ds)
    quant = evaluate(SimulatedRunner(staged, threads=threads), ds)
    return {"fp32": base.to_json(), "quantized": quant.to_json()}


def _write_report(directory: Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.html``, the page rendered once from the dict in memory."""
    from modec.report import write_report_html

    text = json_text(report)
    (directory / REPORT_FILE).write_text(text)
    # The page is drawn from exactly what report.json holds (lists, plain numbers).
    write_report_html(directory, json.loads(text))


def _write_experts(path: Path, q: QuantizedExperts) -> None:
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for layer, projs in enumerate(q.layers):
        for proj, experts in projs.items():
            for e, qw in enumerate(experts):
                key = f"l{layer}.{proj}.e{e}"
                tensors[f"{key}.codes"] = np.ascontiguousarray(qw.q)
                tensors[f"{key}.scale"] = np.ascontiguousarray(qw.scale)
                tensors[f"{key}.zero"] = np.ascontiguousarray(qw.zero)
    # One metadata key: safetensors writes the metadata map in hash order, which varies
    # between processes, so two keys would make the file bytes differ run to run.
    meta = {
        "modec": json.dumps(
            {"group_size": q.group_size, "widths": [list(w) for w in q.widths]}, sort_keys=True
        )
    }
    save_file(tensors, str(path), metadata=meta)
