"""Run a model for evaluation: an ONNX file (onnxruntime), a simulated output, an artifact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from modec import kv_cache
from modec.errors import BadInputError, ModelError
from modec.output import SIM_MODEL


class SimulatedRunner:
    """Runs a simulated-quantization (or any canonical) model with modec's executor."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 2) -> None:
        from modec.executor import Executor
        from modec.frontend import input_specs, load_onnx

        p = Path(path)
        if p.is_dir():
            p = p / SIM_MODEL
        if not p.exists():
            raise BadInputError(f"{path}: no {SIM_MODEL}; compile the model first")
        model = load_onnx(p)  # a large model's external data stays memory-mapped
        self.inputs = input_specs(model)
        self.cache = kv_cache.find(self.inputs)
        self.executor = Executor(model, intra_op_threads=threads)
        self.output = self.executor.output_names[0]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.executor.run(kv_cache.with_cache(feeds, self.cache)).outputs[self.output]


class CompiledRunner:
    """Runs a compiled artifact (``manifest.json`` + library) with `modec.runtime`."""

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu") -> None:
        import modec.runtime

        self.session = modec.runtime.load(path, device)
        self.inputs = list(self.session.inputs)
        self.cache = kv_cache.find(self.inputs)
        self.output = self.session.outputs[0].name

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = kv_cache.with_cache(feeds, self.cache)
        return np.asarray(self.session.run(feeds)[self.output])


def runner_for(path: str, threads: int) -> tuple[str, Any]:
    """How to run ``path``: a compiled/simulated output directory or an ONNX file."""
    from modec.frontend import OrtRunner

    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").exists():
            return "compiled", CompiledRunner(p)
        if (p / SIM_MODEL).exists():
            return "simulated", SimulatedRunner(p, threads)
        raise ModelError(f"{path}: a directory without {SIM_MODEL}; pass a modec output or .onnx")
    runner = OrtRunner(path, threads=threads)
    if any(n.domain == "ai.modec" for n in runner.proto.graph.node):
        return "simulated", SimulatedRunner(p, threads)
    return "onnxruntime", runner
