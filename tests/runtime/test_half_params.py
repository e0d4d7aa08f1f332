"""MoE models stored in fp16 and bf16, lowered for the CPU: the artifact keeps their dense
weights as stored, both runtimes load them, and the outputs are the float32 simulated model's.

The models are `tools.scale_model`'s (tiny sizes): attention, embeddings, vision part and LM
head stored in ``--dtype`` in external data, read through ``Cast`` to float32; two MoE
layers. Their experts are RTN-quantized (`modec.method.quantize.quantize_model_rtn`, which
writes the dequantized experts back: the simulated model) and lowered by
`modec.lowering.lower.lower_model`. While it runs, every read of an external weight is
recorded, to check that no dense weight is read before the artifact's weights are written.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

import modec.artifact
from modec import data
from modec.lowering.lower import WEIGHT_MIN_BYTES
from tools import scale_model as sm
from tools.cxx import build_modec_run

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(
    layers=2, hidden=64, experts=8, intermediate=32, top_k=2, vocab=64, vision_dim=32,
    image_size=64,
)  # fmt: skip
#: max |compiled − simulated| / max |simulated|. Measured 3.7e-7 (fp16) and 5.1e-7 (bf16):
#: float32 arithmetic in another order; 1e-5 leaves a 20x margin.
REL_BOUND = 1e-5


class Lowered:
    """One lowered model: the simulated model, its artifact, what was read and when."""

    def __init__(self, dtype: str, root: Path) -> None:
        self.dtype = dtype
        self.root = root
        self.model: ir.Model
        self.art = root / "art"
        #: (tensor name, phase) of every read of an external tensor during lower_model
        self.reads: list[tuple[str, str]] = []


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def lowered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Lowered:
    from modec.frontend import load_onnx
    from modec.lowering.lower import lower_model
    from modec.method.quantize import quantize_model_rtn
    from modec.moe.canonical import canonicalize_moe

    res = Lowered(request.param, tmp_path_factory.mktemp(f"half-{request.param}"))
    sm.build(res.root, sm.ScaleConfig(**TINY, dtype=request.param), 4)  # type: ignore[arg-type]
    res.model = model = load_onnx(res.root / sm.MODEL_FILE)
    canonicalize_moe(model)
    q = quantize_model_rtn(model, ((2, 3) * 4, (3, 4) * 4), 32)
    phase = ["lower"]
    save_weights = modec.artifact.save_weights

    def saving(*args: Any, **kwargs: Any) -> None:
        phase[0] = "write"
        save_weights(*args, **kwargs)
        phase[0] = "after"

    def recorder(method: Any) -> Any:
        def read(self: ir.ExternalTensor, *args: Any, **kwargs: Any) -> Any:
            res.reads.append((str(self.name), phase[0]))
            return method(self, *args, **kwargs)

        return read

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modec.artifact, "save_weights", saving)
        for name in ("numpy", "tobytes"):
            mp.setattr(ir.ExternalTensor, name, recorder(getattr(ir.ExternalTensor, name)))
        lower_model(model, q, res.art, "llvm", pipeline={})
    return res


def _dense_weights(model: ir.Model) -> dict[str, ir.ExternalTensor]:
    """The source's dense weights the artifact keeps: external, >= WEIGHT_MIN_BYTES, not
    MoE node inputs (the router and experts are the MoE lowering's)."""
    moe_inputs = {v.name for n in model.graph if n.domain == "ai.modec" for v in n.inputs if v}
    out = {}
    for name, v in model.graph.initializers.items():
        t = v.const_value
        external = isinstance(t, ir.ExternalTensor) and name not in moe_inputs
        if external and t.nbytes >= WEIGHT_MIN_BYTES:
            out[name] = t
    return out


def _safetensors(path: Path) -> tuple[int, dict[str, Any]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def test_dense_weights_are_stored_as_in_the_source(lowered: Lowered) -> None:
    """Each dense weight is a param of the stored dtype holding the source's bytes; smaller
    float initializers are float32 (`lowering_proto`'s size rule)."""
    manifest = json.loads((lowered.art / "manifest.json").read_text())
    dtypes = {p["name"]: p["dtype"] for p in manifest["params"]}
    weights = _dense_weights(lowered.model)
    # embeddings, positions, vision patch embedding and projector, q/k/v/o x 2, LM head
    assert len(weights) == 14
    base, header = _safetensors(lowered.art / "weights.safetensors")
    raw = (lowered.art / "weights.safetensors").read_bytes()
    for name, t in weights.items():
        assert dtypes[name] == lowered.dtype, name
        begin, end = header[name]["data_offsets"]
        assert raw[base + begin : base + end] == t.tobytes(), name
    small = [n for n, v in lowered.model.graph.initializers.items()
             if n in dtypes and n not in weights and not n.startswith("moe")]  # fmt: skip
    assert small and all(dtypes[n] == "float32" for n in small)


def test_no_dense_weight_is_read_before_the_weights_are_written(lowered: Lowered) -> None:
    """Lowering declares the dense weights; each is read once, by the weights writer."""
    weights = set(_dense_weights(lowered.model))
    reads = [(n, p) for n, p in lowered.reads if n in weights]
    assert not [n for n, p in reads if p != "write"], "read before (or after) writing"
    assert sorted(n for n, _ in reads) == sorted(weights)


def test_python_runtime_matches_the_float32_simulated_model(lowered: Lowered) -> None:
    import modec.runtime

    from modec.executor import Executor

    sess = modec.runtime.load(lowered.art)
    assert sess.copied_params == 0  # bf16 params too are views of the mapped file
    ex = Executor(lowered.model)
    for _, feeds in data.load(lowered.root / sm.CALIB_FILE).batches(3):
        got = sess.run(feeds)["logits"]
        want = ex.run(feeds).outputs["logits"]
        assert got.shape == want.shape
        assert float(np.abs(got - want).max() / np.abs(want).max()) < REL_BOUND


@pytest.mark.cxx
def test_cxx_runtime_runs_the_half_params(lowered: Lowered, tmp_path: Path) -> None:
    import modec.runtime

    app = build_modec_run(ROOT / "build" / "runtime-test")
    if app is None:
        pytest.skip("cmake or g++ not installed")
    _, feeds = next(data.load(lowered.root / sm.CALIB_FILE).batches(2))
    args = []
    for k, v in feeds.items():
        np.save(tmp_path / f"{k}.npy", v)
        args.append(f"{k}={tmp_path / (k + '.npy')}")
    res = subprocess.run(
        [str(app), str(lowered.art), *args, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    want = modec.runtime.load(lowered.art).run(feeds)["logits"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "logits.npy"), want)
