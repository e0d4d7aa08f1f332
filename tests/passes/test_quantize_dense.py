"""quantize-dense (``--dense-bits``): which weights, their simulated values, their lowering."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modec.errors import BadInputError
from modec.facts import QuantizedDense


def _pixel_only(model: Any) -> set[Any]:
    """Nodes that depend on the pixels and not on the token ids (the vision tower)."""
    from modec.method.dense import _text_nodes

    text = _text_nodes(model)
    pixels = [v for v in model.graph.inputs if v.name == "pixel_values"]
    seen: set[Any] = set()
    stack = [u for v in pixels for u, _ in v.uses()]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(u for o in n.outputs for u, _ in o.uses())
    return seen - text


def test_selects_the_text_decoders_matmul_weights(analysed: Callable[..., Any]) -> None:
    """Attention projections and the head, never the vision tower, the embedding table or
    the router; each weight's simulated value is its codes dequantized, float32."""
    from modec.method.dense import dense_weights

    model, _ = analysed("")
    found = dense_weights(model)
    vision = _pixel_only(model)
    names = {dw.value.name for dw in found}
    assert len(found) == 2 * 4 + 1  # q, k, v, o per layer and the head
    for dw in found:
        assert all(m.op_type == "MatMul" and m not in vision for m in dw.matmuls)
    # The vision tower has matmul weights of its own: none is selected.
    vision_weights = {
        n.inputs[1].producer().inputs[0].name if n.inputs[1].producer() is not None
        else n.inputs[1].name
        for n in vision if n.op_type == "MatMul" and n.inputs[1] is not None
    }  # fmt: skip
    assert vision_weights and not vision_weights & names
    embedding = [n.inputs[0].name for n in model.graph if n.op_type == "Gather"]
    assert not set(embedding) & names

    model, ctx = analysed("quantize-dense{width=4}")
    dense = ctx.facts.get(QuantizedDense)
    assert list(dense.weights) == [dw.value.name for dw in found]
    for name, qw in dense.weights.items():
        v = model.graph.initializers[name]
        w = np.asarray(v.const_value.numpy())
        want = qw.dequantize()
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w if dense.transposed[name] else w.T, want)


def test_width_is_checked() -> None:
    from modec.passes.quantize_dense import QuantizeDensePass

    with pytest.raises(BadInputError, match="--dense-bits 5"):
        QuantizeDensePass(width=5)


@pytest.fixture(scope="module")
def compiled(tiny_vlm: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modec.driver import CompileOptions, compile_model

    o = CompileOptions(method="uniform", quantizer="rtn", budget=3.0, dense_bits=4,
                       target="llvm", cache_dir=None)  # fmt: skip
    out = tmp_path_factory.mktemp("dense") / "out"
    compile_model(tiny_vlm["model"], tiny_vlm["calib"], out, o)
    return out


def test_compiled_equals_simulated(compiled: Path, tiny_vlm: dict[str, Path]) -> None:
    """The dequant-matmul kernels compute what the simulated graph (dequantized weights)
    computes; the float weights are not shipped, their packed codes are."""
    import json

    from modec import data
    from modec.runners import CompiledRunner, SimulatedRunner

    manifest = json.loads((compiled / "manifest.json").read_text())
    section = manifest["sections"]["dense"]
    assert section["bits"] == 4 and len(section["weights"]) == 9
    params = {p["name"] for p in manifest["params"]}
    for name in section["weights"]:
        assert {f"dense.{name}.codes", f"dense.{name}.scale", f"dense.{name}.zero"} <= params
        assert name not in params
    ds = data.load(tiny_vlm["eval"])
    compiled_run, sim = CompiledRunner(compiled), SimulatedRunner(compiled)
    for _, feeds in ds.batches(16):
        a, b = compiled_run(feeds), sim(feeds)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
        break
    sizes = json.loads((compiled / "report.json").read_text())["summary"]["sizes"]
    assert 0 < sizes["dense_quantized"] < sizes["dense_fp32"] / 6
