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

The passes' fanned-out tasks run on the engine ``compile_model`` opens (`modec.distributed`):
in this process, or on Ray for ``--workers N`` / ``--ray-address``; the files written are the
same bytes either way (the report records the engine and each pass's per-worker times).
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
from modec.distributed import Engine, EngineSpec, SerialEngine, open_engine
from modec.errors import BadInputError, ModelError
from modec.facts import BitAllocation, Calibration, Facts, QuantizedDense, QuantizedExperts
from modec.hf import onnx_model
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
from modec.prompting import copy_prompt_files
from modec.streaming import default_max_memory

log = logging.getLogger(__name__)

__all__ = [
    "CompileOptions",
    "CompileResult",
    "check_budget",
    "compile_model",
    "default_cache_dir",
    "load_inputs",
]


#: Above this many bytes of initializers a written model keeps them in external data
#: (protobuf cannot hold a message past 2 GiB).
INLINE_LIMIT = 2**30


def save_model(model: ir.Model, path: Path) -> None:
    """Write ``model`` to ``path``: inline when small and self-contained, else its
    initializers in ``NAME.data`` beside it, written one tensor at a time (lazily computed
    ones are materialized one by one)."""
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value]
    total = sum(t.nbytes for t in tensors)
    # A tensor still in the input model's external data would be written as a reference
    # relative to the output directory, where that file is not: copy it into ours.
    if total <= INLINE_LIMIT and not any(isinstance(t, ir.ExternalTensor) for t in tensors):
        ir.save(model, str(path))
    else:
        ir.save(model, str(path), external_data=f"{path.name}.data")


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

    if o.dense_act_bits and not o.dense_bits:
        from modec.errors import UsageError

        raise UsageError(
            f"--dense-act-bits {o.dense_act_bits} rounds the inputs of the quantized dense "
            "matmuls; add --dense-bits B (e.g. 4), or drop it"
        )

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
        from modec.errors import ModecError, UsageError
        from modec.kernels.grouped_moe_a8 import check_target as check_int8

        for flag, bits in (("--expert-act-bits", o.expert_act_bits),
                           ("--dense-act-bits", o.dense_act_bits)):  # fmt: skip
            if bits:
                try:
                    check_int8(o.target, f"{flag} {bits}")
                except ModecError as exc:
                    raise UsageError(str(exc)) from exc
    return experts


def check_budget(experts: list[int], o: CompileOptions) -> None:
    """Widths, group size and budget are usable for layers of ``experts`` experts."""
    from modec.numerics import ilp
    from modec.numerics.schemes import QuantScheme

    for b in o.bits:
        QuantScheme(b, o.group_size)  # validates widths and group size
    if o.method == "uniform":
        if float(o.budget) != int(o.budget) or int(o.budget) not in o.bits:
            raise BadInputError(
                f"--method uniform needs an integer --budget among --bits {list(o.bits)}; "
                f"got {o.budget}"
            )
        return
    if o.budget_bytes > 0:
        return
    if o.scope == "global":
        ilp.check_budget(sum(experts), o.bits, o.budget, o.sense)
    else:
        for i, n in enumerate(experts):
            try:
                ilp.check_budget(n, o.bits, o.budget, o.sense)
            except Exception as exc:
                raise type(exc)(f"layer {i}: {exc}") from exc


#: Ops whose constant inputs are weights: an ±inf there is always an error.
_WEIGHT_OPS: dict[str, tuple[int, ...] | None] = {
    "MatMul": None,
    "Gemm": None,
    "Gather": (0,),
    "GatherElements": (0,),
}
#: Ops whose constant inputs may be mask fills (``masked_fill(-inf)``, an additive mask).
_FILL_OPS: dict[str, tuple[int, ...] | None] = {"Where": (1, 2), "Add": None}
#: Ops that only move or reshape a value: a fill stays a fill through them.
_PASS_THROUGH = {"Cast", "CastLike", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Identity",
                 "Slice", "Transpose", "Tile", "Concat"}  # fmt: skip


def check_weights_finite(model: ir.Model) -> None:
    """NaN anywhere, or ±inf in a weight, makes every statistic meaningless: refuse early.

    Every floating-point initializer and ``Constant`` node (subgraphs too; fp32, fp16, bf16,
    fp64, fp8, complex) is checked:

    - NaN anywhere is an error;
    - ±inf is an error in a weight: any tensor used as a ``MatMul``/``Gemm`` operand or a
      ``Gather`` table, and any other tensor of more than one element;
    - ±inf is accepted in a scalar (size-1) constant not used as a weight, and in a mask
      fill of any size: a constant that only feeds ``Where`` (as a value) or ``Add``,
      possibly through reshapes and casts. The dynamo exporter writes causal masks that way,
      and DeepSeek's ``masked_fill(-inf)``.

    Tensors are read a chunk at a time (`modec.frontend.tensor_chunks`): a weight in external
    data is read from its file in `~modec.frontend.CHUNK_BYTES` pieces without being mapped,
    so the memory this takes is one chunk whatever the model's size.

    The error names the tensor, what it is used as and how many values are bad.
    """
    for graph in _graphs(model.graph):
        for name, v in graph.initializers.items():
            if v.const_value is not None:
                _check_finite("initializer", name, v, v.const_value)
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                const = _constant_tensor(node)
                if const is not None:
                    _check_finite("Constant", node.name or node.outputs[0].name or "?",
                                  node.outputs[0], const)  # fmt: skip


def _graphs(graph: ir.Graph) -> list[ir.Graph]:
    """``graph`` and every subgraph (``If``/``Loop``/``Scan`` bodies), depth first."""
    out = [graph]
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                out += _graphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    out += _graphs(g)
    return out


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | np.ndarray | None:
    for key in ("value", "value_float", "value_floats"):
        attr = node.attributes.get(key)
        if attr is None:
            continue
        if key == "value":
            tensor: ir.TensorProtocol = attr.value
            return tensor
        return np.asarray(attr.value, dtype=np.float32)
    return None


#: Element types that can hold NaN/±inf (sub-byte floats such as float4 cannot).
_COMPLEX = frozenset({ir.DataType.COMPLEX64, ir.DataType.COMPLEX128})


def _nonfinite(tensor: ir.TensorProtocol | np.ndarray) -> tuple[int, int, int, list[int]]:
    """(NaN count, ±inf count, size, shape) of a floating-point tensor, read chunk-wise;
    (0, 0, …) for a type that cannot hold either."""
    from modec.frontend import tensor_chunks

    if isinstance(tensor, np.ndarray):
        if tensor.dtype.kind not in "fc":
            return 0, 0, int(tensor.size), list(tensor.shape)
        chunks: Iterable[np.ndarray] = [tensor.reshape(-1)]
        size, shape = int(tensor.size), list(tensor.shape)
    else:
        dt = tensor.dtype
        size, shape = int(tensor.size), [int(d) for d in tensor.shape.numpy()]
        if not ((dt.is_floating_point() and dt.bitwidth >= 8) or dt in _COMPLEX):
            return 0, 0, size, shape
        chunks = tensor_chunks(tensor)
    nan = inf = 0
    for chunk in chunks:
        nan += int(np.count_nonzero(np.isnan(chunk)))
        inf += int(np.count_nonzero(np.isinf(chunk)))
    return nan, inf, size, shape


def _check_finite(
    kind: str, name: str, value: ir.Value, tensor: ir.TensorProtocol | np.ndarray
) -> None:
    nan, inf, size, shape = _nonfinite(tensor)
    if nan:
        raise ModelError(
            f"{kind} {name!r} holds {nan} NaN value(s); NaN/Inf in a tensor makes every "
            "statistic meaningless: fix or re-export the model"
        )
    if not inf:
        return
    weight = _weight_use(value)
    if weight is None and (size == 1 or _only_fills(value)):
        return  # a -inf mask fill or scalar: what exporters write for masks
    what = weight or f"a {shape} tensor, not a scalar or mask fill"
    raise ModelError(
        f"{kind} {name!r} ({what}) holds {inf} ±inf value(s); NaN/Inf in a weight makes "
        "every statistic meaningless: fix or re-export the model"
    )


def _uses(value: ir.Value, seen: set[int] | None = None) -> list[tuple[ir.Node, int]]:
    """The (node, input index) uses of ``value``, looking through `_PASS_THROUGH` ops."""
    seen = set() if seen is None else seen
    out: list[tuple[ir.Node, int]] = []
    for node, idx in value.uses():
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in _PASS_THROUGH and node.outputs:
            out += _uses(node.outputs[0], seen)
        else:
            out.append((node, idx))
    return out


def _weight_use(value: ir.Value) -> str | None:
    for node, idx in _uses(value):
        if node.op_type not in _WEIGHT_OPS:
            continue
        inputs = _WEIGHT_OPS[node.op_type]
        if inputs is None or idx in inputs:
            return f"a {node.op_type} weight of node {node.name!r}"
    return None


def _only_fills(value: ir.Value) -> bool:
    uses = _uses(value)
    for node, idx in uses:
        if node.op_type not in _FILL_OPS:
            return False
        inputs = _FILL_OPS[node.op_type]
        if inputs is not None and idx not in inputs:
            return False
    return bool(uses)


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
    from modec.frontend import input_specs, load_onnx

    model = load_onnx(model_path)  # weights in external data stay on disk
    check_weights_finite(model)
    preflight(model, o)
    calib = data_mod.load(calib_path)
    calib = data_mod.with_model_inputs(calib, input_specs(model))
    ctx = PassContext(
        facts=Facts(Calibration(calib)),
        options=RunOptions(
            seed=o.seed,
            threads=o.threads,
            cache_dir=o.cache_dir,
            max_memory=o.max_memory or default_max_memory(),
        ),
        progress=progress,
        engine=SerialEngine(o.threads),  # its tasks with --threads threads, as on Ray
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
    notify: Callable[[str], None] | None = None,
    engine: EngineSpec | Engine | None = None,
) -> CompileResult:
    """Run the pipeline and write the output directory (see the module docstring).

    Args:
        model_path: an ``.onnx`` file or a local Hugging Face model directory (`modec.hf`).
        notify: told when a Hugging Face directory is being exported to ONNX.
        pipeline: pipeline text replacing the named pipeline of ``options.method``.
        eval_path: an evaluation set: the report then holds fp32 and quantized accuracy.
        dump_ir_after: pass names (or ``all``) after which the graph is written as ONNX to
            ``dump_ir_dir`` (default ``OUT.ir``, beside the output, not inside it).
        engine: where the fanned-out analysis and GPTQ tasks run (`modec.distributed`):
            an `EngineSpec` (``--workers N``: a local Ray runtime started and shut down
            here; ``--ray-address``: an existing cluster), an engine the caller opened and
            closes, or None: in this process. The output is the same bytes on every engine.
    """
    o = options or CompileOptions()
    out_dir = Path(out)
    prepare_out(out_dir, force)
    # A Hugging Face directory is exported to ONNX first (cached under the cache directory,
    # or a temporary directory with --no-cache); the report keeps the path as given.
    with onnx_model(model_path, o.cache_dir, notify) as onnx_path:
        return _compile(
            onnx_path, str(model_path), calib_path, out_dir, o, pipeline, progress, eval_path,
            dump_ir_after, dump_ir_dir, instruments, engine,
        )  # fmt: skip


def _compile(
    onnx_path: str, model_name: str, calib_path: str | os.PathLike[str], out_dir: Path,
    o: CompileOptions, pipeline: str | None,
    progress: Callable[[int, str], ProgressBar] | None,
    eval_path: str | os.PathLike[str] | None, dump_ir_after: Iterable[str] | None,
    dump_ir_dir: str | os.PathLike[str] | None, instruments: Iterable[Instrument],
    engine: EngineSpec | Engine | None,
) -> CompileResult:  # fmt: skip
    model, ctx = load_inputs(onnx_path, calib_path, o, progress)
    pipe = parse_pipeline(pipeline) if pipeline else standard_pipeline(o)
    pipe.validate(ctx.facts.kinds())
    if isinstance(engine, Engine):  # the caller's: it closes it
        return _run(model, ctx, pipe, model_name, onnx_path, calib_path, out_dir, o,
                    eval_path, dump_ir_after, dump_ir_dir, instruments, engine)  # fmt: skip
    # The engine starts after the cheap checks (inputs, pipeline), and its local runtime
    # (if any) is shut down however the compile ends.
    with open_engine(engine, ctx.options.threads, ctx.options.spill_dir) as opened:
        return _run(model, ctx, pipe, model_name, onnx_path, calib_path, out_dir, o,
                    eval_path, dump_ir_after, dump_ir_dir, instruments, opened)  # fmt: skip


def _run(
    model: ir.Model, ctx: PassContext, pipe: Pipeline, model_name: str, onnx_path: str,
    calib_path: str | os.PathLike[str], out_dir: Path, o: CompileOptions,
    eval_path: str | os.PathLike[str] | None,
    dump_ir_after: Iterable[str] | None, dump_ir_dir: str | os.PathLike[str] | None,
    instruments: Iterable[Instrument], engine: Engine,
) -> CompileResult:  # fmt: skip
    ctx.engine = engine
    ctx.instruments.extend(instruments)
    if dump_ir_after:
        where = Path(dump_ir_dir) if dump_ir_dir else out_dir.with_name(f"{out_dir.name}.ir")
        ctx.instruments.append(DumpIR(where, after=dump_ir_after))
    with transaction(out_dir) as tmp:
        ctx.options = replace(ctx.options, artifact_dir=str(tmp), pipeline=pipe.text())
        model, records = pipe.run(model, ctx)
        alloc = ctx.facts.find(BitAllocation)
        quantized = ctx.facts.find(QuantizedExperts)
        report_options = {**asdict(o), "model": model_name, "calib": str(calib_path),
                          "pipeline": pipe.text()}  # fmt: skip
        report = build_report(pipe, records, ctx, report_options,
                              {"engine": engine.describe()})  # fmt: skip
        if quantized is not None:
            _write_experts(tmp / EXPERTS_FILE, quantized)
            save_model(model, tmp / SIM_MODEL)
        if alloc is not None:
            from modec.summary import summarize

            report["summary"] = summarize(
                str(out_dir), model, alloc, records, str(out_dir / REPORT_FILE),
                ctx.facts.find(QuantizedDense),
            )  # fmt: skip
            (tmp / ALLOCATION_FILE).write_text(json_text(_allocation_doc(alloc, pipe)))
            if eval_path is not None and quantized is not None:
                report["summary"]["accuracy"] = _accuracy(onnx_path, tmp, eval_path, o.threads)
        _write_report(tmp, report)
        _prompt_files(model_name, tmp)
    return CompileResult(out_dir, report, alloc, model)


def _prompt_files(model_name: str, out: Path) -> None:
    """tokenizer.json and processor.json beside the artifact, for ``modec run``: copied
    from beside the model, or for a LLaVA-style Hugging Face directory without a
    processor.json, described from its processor."""
    copied = copy_prompt_files(model_name, out)
    d = Path(model_name)
    if "processor.json" in copied or not d.is_dir():
        return
    from modec import hf

    if not hf.is_vlm(hf.read_config(d)):
        return
    from modec.hf_wrappers import processor_description

    desc = processor_description(d)
    if desc is not None:
        (out / "processor.json").write_text(json_text(desc))


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
    from modec.safetensors_io import TensorEntry, write_safetensors

    entries: list[TensorEntry] = []
    for layer, projs in enumerate(q.layers):
        for proj, experts in projs.items():
            for e, qw in enumerate(experts):
                key = f"l{layer}.{proj}.e{e}"
                entries.append(TensorEntry.of(f"{key}.codes", qw.q))
                entries.append(TensorEntry.of(f"{key}.scale", qw.scale))
                entries.append(TensorEntry.of(f"{key}.zero", qw.zero))
    # One metadata key: safetensors writes the metadata map in hash order, which varies
    # between processes, so two keys would make the file bytes differ run to run.
    meta = {
        "modec": json.dumps(
            {"group_size": q.group_size, "widths": [list(w) for w in q.widths]}, sort_keys=True
        )
    }
    write_safetensors(path, entries, metadata=meta)
