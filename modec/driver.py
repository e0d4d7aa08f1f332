"""The compile driver: frontend → MODE pipeline → output directory.

``compile_model`` runs the named pipeline on a model and a calibration set and writes, into
a fresh temporary directory that is renamed over ``out`` only when everything succeeded:

- ``model.sim.onnx``: the canonical graph with dequantized expert weights (the
  simulated-quantization model, run by modec's executor);
- ``experts.safetensors``: every expert's codes, fp16 scales and uint8 zeros
  (``l{layer}.{proj}.e{expert}.{codes|scale|zero}``), unpacked;
- ``allocation.json``: the width of every expert (deterministic: no timings);
- ``report.json``: the pipeline text, options, per-pass timings and every pass's section;
- ``report.html``: the same report as a self-contained page with plots (docs/report.md).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modec import data as data_mod
from modec.errors import BadInputError, ModelError
from modec.interrupt import checkpoint
from modec.pipeline import (
    REPORT_SCHEMA,
    PassContext,
    Pipeline,
    ProgressBar,
    build_report,
    write_json,
)
from modec.report_html import write_report_html

log = logging.getLogger(__name__)

SIM_MODEL = "model.sim.onnx"
EXPERTS_FILE = "experts.safetensors"
ALLOCATION_FILE = "allocation.json"
REPORT_FILE = "report.json"
#: Files that mark a directory as modec output (safe to overwrite).
MARKERS = (REPORT_FILE, "manifest.json")


@dataclass(frozen=True)
class CompileOptions:
    """What ``modec compile`` takes besides the model and data."""

    budget: float = 3.0
    bits: tuple[int, ...] = (2, 3, 4)
    group_size: int = 128
    method: str = "mode"
    scope: str = "layer"
    sense: str = "eq"
    budget_bytes: int = 0
    key_ratio: float = 0.2
    sensitivity_samples: int = 32
    quantizer: str = "gptq"
    #: TVM target of the compiled artifact ("llvm", "cuda"), or "none" for no lowering.
    target: str = "llvm"
    seed: int = 0
    threads: int = 2
    cache_dir: str | None = None


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/modec`` (or ``~/.cache/modec``): analysis results by content hash."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "modec")


def analysis_text(o: CompileOptions, sensitivity: bool = True) -> str:
    """The analysis half of the MODE pipeline (structure, statistics, sensitivities)."""
    bits = ":".join(str(b) for b in o.bits)
    passes = [
        "find-moe",
        "canonicalize-moe",
        "find-attention",
        f"collect-routing{{key_ratio={o.key_ratio}}}",
    ]
    if sensitivity:
        passes.append(
            f"measure-sensitivity{{bits={bits},group_size={o.group_size},"
            f"samples={o.sensitivity_samples}}}"
        )
    return ",".join(passes)


def allocation_text(o: CompileOptions) -> str:
    """The decision half: allocate-bits and quantize-experts."""
    bits = ":".join(str(b) for b in o.bits)
    return (
        f"allocate-bits{{budget={o.budget},bits={bits},method={o.method},scope={o.scope},"
        f"sense={o.sense},budget_bytes={o.budget_bytes},group_size={o.group_size}}},"
        f"quantize-experts{{group_size={o.group_size},method={o.quantizer}}}"
    )


def pipeline_text(o: CompileOptions) -> str:
    """The default MODE pipeline for these options, as pipeline text."""
    from modec.numerics.importance import NEEDS_SENSITIVITY

    text = f"{analysis_text(o, o.method in NEEDS_SENSITIVITY)},{allocation_text(o)}"
    if o.target != "none":
        text += f",lower-tvm{{target={o.target}}}"
    return text


def build_pipeline(text: str) -> Pipeline:
    import modec.passes  # noqa: F401  (registers every pass)

    # Parse then print: the report records the normalised text (defaults dropped).
    return Pipeline.parse(text, name="mode")


@dataclass
class CompileResult:
    out: Path
    report: dict[str, Any]
    allocation: Any
    model: ir.Model = field(repr=False)


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
        from modec.passes.lower_tvm import check_target

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
        ilp.check_budget(sum(experts), o.bits, o.budget, o.sense)  # type: ignore[arg-type]
    else:
        for i, n in enumerate(experts):
            try:
                ilp.check_budget(n, o.bits, o.budget, o.sense)  # type: ignore[arg-type]
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


def prepare_out(out: Path, force: bool) -> None:
    """Refuse to overwrite a directory that is not modec output (unless ``force``)."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out}: exists and is not a directory; choose another -o")
    foreign = out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in MARKERS)
    if foreign and not force:
        raise BadInputError(
            f"{out}: exists and is not a previous modec output; choose another -o or pass "
            "--force to replace it"
        )


def commit_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory over ``out`` (old content removed only after)."""
    checkpoint()  # the last moment a Ctrl-C (even one swallowed earlier) leaves OUT as it was
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


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
        facts={"calib.data"},
        artifacts={"calib.data": calib},
        options={**asdict(o), "model": str(model_path), "calib": str(calib_path)},
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
) -> CompileResult:
    """Run the MODE pipeline and write the output directory (see the module docstring)."""
    o = options or CompileOptions()
    out_dir = Path(out)
    prepare_out(out_dir, force)
    model, ctx = load_inputs(model_path, calib_path, o, progress)
    pipe = build_pipeline(pipeline or pipeline_text(o))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written into a fresh temporary directory beside OUT (lower-tvm writes
    # the artifact there too) and renamed over OUT only when all of it succeeded.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    ctx.options["artifact_dir"] = str(tmp)
    ctx.options["pipeline"] = pipe.text()
    try:
        model, records = pipe.run(model, ctx)
        alloc = ctx.artifacts.get("allocation")
        ctx.options.pop("artifact_dir")  # a temporary path: keep it out of the report
        report = build_report(pipe, records, ctx)
        write_json(tmp / REPORT_FILE, report)
        write_report_html(tmp)
        if alloc is not None:
            write_json(
                tmp / ALLOCATION_FILE,
                {
                    "method": alloc.method,
                    "budget": alloc.budget,
                    "bits": list(alloc.bits),
                    "group_size": o.group_size,
                    "widths": [list(w) for w in alloc.widths],
                    "pipeline": pipe.text(),
                },
            )
        if "quantized" in ctx.artifacts:
            _write_experts(tmp / EXPERTS_FILE, ctx.artifacts["quantized"])
            ir.save(model, str(tmp / SIM_MODEL))
        commit_dir(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise BadInputError(
                f"{out_dir}: no space left on the device while writing the output (nothing was "
                "changed there); free some space or choose another -o"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompileResult(out_dir, report, alloc, model)


def _write_experts(path: Path, q: Any) -> None:
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


def is_modec_output(path: Path) -> bool:
    """A directory written by `compile_model`."""
    rep = path / REPORT_FILE
    if not rep.exists():
        return False
    try:
        return bool(json.loads(rep.read_text()).get("schema") == REPORT_SCHEMA)
    except (OSError, json.JSONDecodeError):
        return False


class SimulatedRunner:
    """Runs a simulated-quantization (or any canonical) model with modec's executor."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 2) -> None:
        from modec.executor import Executor
        from modec.frontend import input_specs, load_onnx_proto

        p = Path(path)
        if p.is_dir():
            p = p / SIM_MODEL
        if not p.exists():
            raise BadInputError(f"{path}: no {SIM_MODEL}; compile the model first")
        proto = load_onnx_proto(p)
        self.inputs = input_specs(proto)
        self.executor = Executor(ir.serde.deserialize_model(proto), intra_op_threads=threads)
        self.output = self.executor.output_names[0]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.executor.run(feeds).outputs[self.output]


def size_summary(model: ir.Model, widths: Any, group_size: int) -> dict[str, int]:
    """Bytes of the expert weights (fp32, fp16, quantized: codes + scales + zeros) and the rest."""
    from modec.moe.canonical import is_moe_node
    from modec.moe.reference import MoEParams
    from modec.numerics.schemes import QuantScheme

    expert_params = codes = scales = zeros = 0
    expert_names: set[str] = set()
    for layer, node in enumerate(n for n in model.graph if is_moe_node(n)):
        p = MoEParams.from_node(node)
        for idx, w in ((3, p.gate), (4, p.up), (5, p.down)):
            if w is None:
                continue
            v = node.inputs[idx]
            if v is not None and v.name:
                expert_names.add(v.name)
            expert_params += int(w.size)
            for e in range(w.shape[0]):
                b = QuantScheme(int(widths[layer][e]), group_size).nbytes(w.shape[1], w.shape[2])
                codes, scales, zeros = codes + b["codes"], scales + b["scales"], zeros + b["zeros"]
    other = sum(
        int(v.const_value.nbytes)
        for name, v in model.graph.initializers.items()
        if v.const_value is not None and name not in expert_names
    )
    return {
        "expert_params": expert_params,
        "experts_fp32": 4 * expert_params,
        "experts_fp16": 2 * expert_params,
        "experts_codes": codes,
        "experts_scales": scales,
        "experts_zeros": zeros,
        "experts_quantized": codes + scales + zeros,
        "other_fp32": other,
        "model_fp32": 4 * expert_params + other,
        "model_quantized": codes + scales + zeros + other,
    }


def summarize(res: CompileResult) -> dict[str, Any]:
    """The end-of-compile summary (also stored in the report)."""
    alloc = res.allocation
    sizes = size_summary(res.model, alloc.widths, int(res.report["options"]["group_size"]))
    summary = {
        "out": str(res.out),
        "method": alloc.method,
        "budget": alloc.budget,
        "average_bits": alloc.average,
        "histogram": {str(k): v for k, v in alloc.histogram().items()},
        "sizes": sizes,
        "seconds": {r["name"]: round(r["seconds"], 2) for r in res.report["passes"]},
        "report": str(res.out / REPORT_FILE),
    }
    report = json.loads((res.out / REPORT_FILE).read_text())
    report["summary"] = summary
    write_json(res.out / REPORT_FILE, report)
    write_report_html(res.out)  # report.html shows the summary too
    return summary


def record_accuracy(out: Path, accuracy: dict[str, Any]) -> None:
    """Add measured accuracies to an output's report."""
    report = json.loads((out / REPORT_FILE).read_text())
    report.setdefault("summary", {})["accuracy"] = accuracy
    write_json(out / REPORT_FILE, report)
    write_report_html(out)


def format_summary(s: dict[str, Any]) -> str:
    """One screen for the terminal."""
    mib = 2**20
    z = s["sizes"]
    hist = "  ".join(f"{b}-bit: {n}" for b, n in s["histogram"].items())
    lines = [
        f"modec compile: {s['method']} at {s['budget']} bits (average {s['average_bits']:.3f})",
        f"  widths        {hist}",
        f"  experts       {z['experts_fp32'] / mib:.2f} MiB fp32 -> "
        f"{z['experts_quantized'] / mib:.2f} MiB (codes {z['experts_codes'] / mib:.2f}, "
        f"scales {z['experts_scales'] / mib:.2f}, zeros {z['experts_zeros'] / mib:.2f})",
        f"  model         {z['model_fp32'] / mib:.2f} MiB fp32 -> "
        f"{z['model_quantized'] / mib:.2f} MiB ({z['model_fp32'] / z['model_quantized']:.1f}x)",
        "  time          " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items()),
    ]
    acc = s.get("accuracy")
    if acc:
        for split in ("overall", "multimodal", "text_only"):
            a, b = acc["fp32"][split]["accuracy"], acc["quantized"][split]["accuracy"]
            lines.append(f"  {split:<13} fp32 {100 * a:6.2f}%  quantized {100 * b:6.2f}%")
    lines.append(f"  report        {s['report']}")
    return "\n".join(lines)


class CompiledRunner:
    """Runs a compiled artifact (``manifest.json`` + library) with `modec.runtime`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from modec import runtime

        self.session = runtime.load(path)
        self.inputs = list(self.session.inputs)
        self.output = self.session.outputs[0].name

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(feeds)[self.output]
