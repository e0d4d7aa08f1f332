"""The bundled digits-vlm (trained weights) exported with a KV cache and compiled, once per
session: the model generation is tested on (Python and C++ runtimes, the simulated model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("tvm")

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "digits-vlm"


@pytest.fixture(scope="session")
def cached_vlm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``onnx``: the cached export; ``out``: its compile (MODE's uniform 3-bit GPTQ pipeline
    would take minutes: RTN at 4 bits, the same lowering); ``calib``, ``eval``: the bundled
    data sets."""
    from modec.driver import CompileOptions, compile_model
    from tools.digits_vlm.export import export_cached, trained_from_onnx

    root = tmp_path_factory.mktemp("cached_vlm")
    model = trained_from_onnx(BUNDLED / "model.onnx")
    export_cached(model, root / "model_kv.onnx")
    for name in ("tokenizer.json", "processor.json"):  # copied into the output by compile
        shutil.copyfile(BUNDLED / name, root / name)
    o = CompileOptions(method="uniform", quantizer="rtn", budget=4.0, target="llvm",
                       cache_dir=None)  # fmt: skip
    compile_model(root / "model_kv.onnx", BUNDLED / "calib.npz", root / "out", o)
    return {"onnx": root / "model_kv.onnx", "out": root / "out",
            "calib": BUNDLED / "calib.npz", "eval": BUNDLED / "eval.npz"}  # fmt: skip
