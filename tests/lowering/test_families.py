"""Real MoE families end to end: ONNX export → modec compile → the artifact runs.

Every tiny transformers family of `tests.fixtures.models` (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3, GPT-OSS) with both exporters compiles with ``--target llvm`` through the
Python API (mc-moe: no sensitivity probes), and the compiled artifact matches the
simulated-quantization model within 1e-4 relative on two input shapes other than the export
sample ([2, 6]), one of them left-padded. What makes the dense parts import is the shape
evaluation of `modec.lowering.shape_eval` (see `modec.lowering.onnx_import`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from modec import data
from modec.data import TEXT
from modec.driver import compile_model
from modec.pipelines import CompileOptions
from modec.runners import CompiledRunner, SimulatedRunner
from tests.fixtures.models import HF_MODELS, VOCAB

EXPORTERS = ("torchscript", "dynamo")
#: (batch, seq, left padding of the first row): the export sample is batch 2, seq 6.
SHAPES = ((1, 5, 0), (3, 11, 3))


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight text-only samples of eight tokens."""
    path = tmp_path_factory.mktemp("families") / "calib.npz"
    ids = np.random.default_rng(0).integers(0, VOCAB, (8, 8)).astype(np.int64)
    modality = np.full(ids.shape, TEXT, np.int8)
    data.save(path, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, modality=modality)
    return path


def _feeds(batch: int, seq: int, pad: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", HF_MODELS)
def test_family_compiles_and_matches_simulated(
    moe_model: Callable[[str, str], Path],
    calib: Path,
    tmp_path: Path,
    family: str,
    exporter: str,
) -> None:
    onnx_path = moe_model(family, exporter)
    out = tmp_path / "out"
    options = CompileOptions(target="llvm", sensitivity_samples=4, method="mc-moe")
    compile_model(onnx_path, calib, out, options)
    compiled, simulated = CompiledRunner(out), SimulatedRunner(out)
    for i, (batch, seq, pad) in enumerate(SHAPES):
        feeds = _feeds(batch, seq, pad, seed=i)
        want = simulated(feeds)
        got = compiled(feeds)
        assert got.shape == want.shape == (batch, seq, VOCAB)
        assert np.isfinite(want).all()
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err < 1e-4, f"{family}/{exporter} at [{batch}, {seq}]: relative error {err:.2e}"
