"""Compile an ONNX model into a modec artifact directory (dense lowering + `modec.artifact`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import tvm

from modec.artifact import Manifest, host_machine, write_artifact
from modec.kernels.cuda_aot import export_cuda_library, target_archs
from modec.kernels.target import TargetLike, is_cuda, resolve_target
from modec.lowering.dense import (
    DenseModule,
    OpConverter,
    RelaxHook,
    compile_module,
    lower_dense,
)
from modec.moe.lazy import LazyArray

logger = logging.getLogger(__name__)


def target_record(target: TargetLike) -> dict[str, Any]:
    """The manifest's ``target`` object for a target (kind, device, machine, options)."""
    tgt = resolve_target(target)
    rec: dict[str, Any] = {"kind": str(tgt.kind.name), "machine": host_machine()}
    if is_cuda(tgt):
        rec["device"] = "cuda"
        rec["arch"] = str(tgt.attrs.get("arch", ""))
        rec["archs"] = target_archs(target)
    else:
        rec["device"] = "cpu"
        rec["mcpu"] = str(tgt.attrs.get("mcpu", ""))
    return rec


def write_dense_artifact(
    dm: DenseModule,
    executable: Any,
    out_dir: str | os.PathLike[str],
    target: TargetLike = "llvm",
    sections: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Manifest:
    """Write a compiled `DenseModule` as an artifact.

    The ``lowering`` section records the lowering counters; callers add their own sections
    (``moe``, ``pipeline``...). Values must be JSON-serializable and free of timings.
    """
    secs: dict[str, Any] = {"lowering": {"stats": dict(sorted(dm.stats.items()))}}
    secs.update(sections or {})
    # Link without debug sections: TVMScript kernels carry the source line of their Python
    # definition, so the DWARF line table (and with it the whole file) would change whenever
    # the lowering code moves, though the machine code does not.
    options = ["-Wl,--strip-debug"]

    def write_library(path: Path) -> None:
        if is_cuda(resolve_target(target)):
            export_cuda_library(executable, str(path), target_archs(target), options)
        else:
            executable.export_library(str(path), options=options)

    return write_artifact(
        out_dir,
        write_library=write_library,
        params=dm.params,
        inputs=dm.inputs,
        outputs=dm.outputs,
        target=target_record(target),
        tvm_version=str(tvm.__version__),
        sections=secs,
        force=force,
    )


def build_artifact(
    model: onnx.ModelProto | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    target: TargetLike = "llvm",
    hooks: Sequence[RelaxHook] = (),
    op_converters: Mapping[str, OpConverter] | None = None,
    sections: Mapping[str, Any] | None = None,
    force: bool = False,
    step: Callable[[str], None] | None = None,
    *,
    weights: Mapping[str, LazyArray] | None = None,
    upcast: bool = False,
) -> Manifest:
    """Lower, compile and write an ONNX model as an artifact directory.

    Args:
        model: ONNX model or path.
        out_dir: artifact directory (written atomically).
        target: "llvm" for this CPU, or a CUDA target: the kernels are compiled into a
            fatbin for its archs (`modec.kernels.cuda_aot`).
        hooks: Relax hooks (see `modec.lowering.dense.lower_dense`).
        op_converters: converters for custom ONNX ops.
        sections: extra free-form manifest sections.
        force: replace a non-artifact directory.
        step: called after each of the BUILD_STEPS phases with its name (progress bars).
        weights: weight values handed to the importer unread, read when the weights file is
            written (see `modec.lowering.onnx_import.import_onnx`).
        upcast: 16-bit weights of a float32 graph are cast where read (see `import_onnx`).

    Returns:
        The written manifest.
    """
    done = step or (lambda _name: None)
    dm = lower_dense(model, target, hooks, op_converters, weights=weights, upcast=upcast)
    done("lower")
    ex = compile_module(dm, target)
    done("compile")
    manifest = write_dense_artifact(dm, ex, Path(out_dir), target, sections, force)
    done("write")
    return manifest


#: The phases `build_artifact` reports through ``step``.
BUILD_STEPS = ("lower", "compile", "write")
