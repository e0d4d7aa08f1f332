"""lower-tvm on a tiny digits-vlm: compiled artifact vs the simulated-quantization model.

The simulated model is the canonical graph whose expert initializers hold the dequantized
RTN weights (`modec.method.quantize.quantize_model_rtn`), run by `modec.executor.Executor`
(dense parts in onnxruntime, MoE in the numpy reference). The artifact
(`modec.lowering.lower.lower_model`) runs the same experts from packed codes in the grouped
kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

from modec import data
from modec.errors import ModelError, UsageError
from modec.facts import QuantizedExperts
from modec.method.quantize import quantize_model_rtn
from modec.moe.canonical import canonicalize_moe, is_moe_node

WIDTHS = ((2, 3, 4, 4), (3, 3, 2, 4))
GROUP = 32
PIPELINE = {"text": "find-moe,canonicalize-moe,lower-tvm", "lower-tvm": "lower-tvm"}


def _simulated(
    model_path: Path, widths: tuple[tuple[int, ...], ...]
) -> tuple[ir.Model, QuantizedExperts]:
    """Canonicalize, RTN-quantize the experts at ``widths``, write back the dequantized ones."""
    model = ir.load(str(model_path))
    canonicalize_moe(model)
    return model, quantize_model_rtn(model, widths, GROUP)


@pytest.fixture(scope="module")
def lowered(tiny_vlm: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from modec.lowering.build import BUILD_STEPS
    from modec.lowering.lower import lower_model

    model, q = _simulated(tiny_vlm["model"], WIDTHS)
    out = tmp_path_factory.mktemp("moe_artifact") / "out"
    steps: list[str] = []
    before = ir.to_proto(model).SerializeToString()
    result = lower_model(model, q, out, "llvm", pipeline=PIPELINE, step=steps.append)
    assert steps == list(BUILD_STEPS)
    assert ir.to_proto(model).SerializeToString() == before, "lower_model changed the model"
    return model, q, out, result


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_artifact_matches_simulated_model(lowered: Any, tiny_vlm: dict[str, Path]) -> None:
    import modec.runtime

    from modec.executor import Executor

    model, _, out, _ = lowered
    sess = modec.runtime.load(out)
    ex = Executor(model)
    ds = data.load(tiny_vlm["eval"])
    multimodal = ds.multimodal
    text_only = np.flatnonzero(~multimodal)
    vision = np.flatnonzero(multimodal)
    assert len(text_only) and len(vision)
    checked = 0
    # Batch sizes 1, 3 and 7; text-only batches are trimmed to their own (shorter) length.
    for name, idx, bs in (("text", text_only, 3), ("vision", vision, 7), ("mixed", None, 1)):
        sub = ds.subset(idx if idx is not None else np.arange(4))
        for _, feeds in sub.batches(bs):
            got = sess.run(feeds)["logits"]
            want = ex.run(feeds).outputs["logits"]
            assert got.shape == want.shape
            assert _rel(got, want) < 1e-4, f"{name} batch {feeds['input_ids'].shape}"
            checked += 1
    assert checked >= 4
    lengths = {f["input_ids"].shape[1] for _, f in ds.subset(text_only).batches(3)}
    lengths |= {f["input_ids"].shape[1] for _, f in ds.subset(vision).batches(7)}
    assert len(lengths) >= 2, "expected batches of different sequence lengths"


def test_quantization_is_visible(lowered: Any, tiny_vlm: dict[str, Path]) -> None:
    """The artifact follows the quantized experts, not the fp32 ones (the test can fail)."""
    import modec.runtime

    from modec.executor import Executor

    _, _, out, _ = lowered
    fp32 = ir.load(str(tiny_vlm["model"]))
    canonicalize_moe(fp32)
    feeds = next(iter(data.load(tiny_vlm["eval"]).batches(4)))[1]
    got = modec.runtime.load(out).run(feeds)["logits"]
    full = Executor(fp32).run(feeds).outputs["logits"]
    assert _rel(got, full) > 1e-3


def test_one_kernel_per_width_and_projection(tiny_vlm: dict[str, Path]) -> None:
    import tvm
    from tvm import relax

    from modec.lowering.dense import import_onnx
    from modec.lowering.moe import MoELowering, plan_layers

    widths = ((2, 3, 4, 4), (4, 4, 4, 4))
    model, q = _simulated(tiny_vlm["model"], widths)
    low = MoELowering(plan_layers(model, q))
    dm = low.add_params(import_onnx(ir.to_proto(model), {"MoE": low.convert}))
    calls: list[str] = []

    def visit(e: Any) -> None:
        if (
            isinstance(e, relax.Call)
            and isinstance(e.op, tvm.ir.Op)
            and e.op.name in ("relax.call_tir", "relax.call_tir_inplace")
        ):
            calls.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(dm.mod["main"].body, visit)
    grouped = [c for c in calls if c.startswith("modec_moe_w")]
    # Layer 0: widths {2, 3, 4} x (gate, up, down) = 9; layer 1: one width x 3 = 3.
    assert len(grouped) == 12
    assert sum(c.startswith("modec_moe_sort") for c in calls) == 2
    assert [len(k) for k in low.kernels] == [9, 3]
    assert {(p, b) for p, b, _ in low.kernels[0]} == {
        (p, b) for p in ("gate", "up", "down") for b in (2, 3, 4)
    }
    # Packed experts are parameters with deterministic names; dequantized experts are gone.
    assert "moe0.gate.w3.codes" in dm.params and dm.params["moe0.gate.w3.codes"].dtype == np.uint32
    assert "moe1.down.w4.scale" in dm.params and "moe1.down.w2.scale" not in dm.params
    expert_inits = {v.name for n in model.graph if is_moe_node(n) for v in n.inputs[3:6] if v}
    assert len(expert_inits) == 6 and not expert_inits & set(dm.params)


@pytest.fixture(scope="module")
def cuda_source(tiny_vlm: dict[str, Path]) -> tuple[str, Any]:
    """The CUDA C source TVM generates for the tiny model's MoE lowering, and its target."""
    from modec.kernels.target import CUDA_SM90, resolve_target
    from modec.lowering.dense import compile_module, lower_dense
    from modec.lowering.moe import MoELowering, plan_layers

    model, q = _simulated(tiny_vlm["model"], WIDTHS)
    tgt = resolve_target(CUDA_SM90)
    low = MoELowering(plan_layers(model, q), tgt)
    dm = lower_dense(ir.to_proto(model), tgt, [low.add_params], {"MoE": low.convert})
    return compile_module(dm, tgt).mod.imports[0].imports[0].inspect_source(), tgt


def _needs_nvcc() -> None:
    from modec.kernels.cuda import nvcc_available

    if not nvcc_available():
        pytest.skip("nvcc not installed (a CUDA build compiles its kernels with it)")


def test_cuda_build(tiny_vlm: dict[str, Path], tmp_path: Path, cuda_source: Any) -> None:
    """A MoE model builds for CUDA: artifact written, every kernel in the CUDA source.

    Running it needs a GPU (none here).
    """
    import json

    from modec.kernels.cuda_aot import fatbin_entries, library_fatbins
    from modec.lowering.lower import lower_model

    _needs_nvcc()
    model, q = _simulated(tiny_vlm["model"], WIDTHS)
    out = tmp_path / "cuda"
    lower_model(model, q, out, "cuda", pipeline={})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["device"] == "cuda" and manifest["target"]["arch"] == "sm_90"
    assert manifest["target"]["archs"] == ["sm_90"]
    # The kernels are compiled into model.so (SASS only, no PTX to JIT), not kept as source.
    library = (out / "model.so").read_bytes()
    assert b"__global__" not in library
    (fatbin,) = library_fatbins(library)
    assert fatbin_entries(fatbin) == [("sass", "sm_90")]
    assert {p["name"] for p in manifest["params"]} >= {"moe0.gate.w2.codes", "moe1.up.w4.zero"}
    src, _ = cuda_source
    # Sort kernels for both layers (4 experts, top-2) and the grouped kernels of every width.
    assert "modec_moe_sort_e4_k2_kernel" in src
    for bits in (2, 3, 4):
        assert f"modec_moe_w{bits}g{GROUP}_" in src


def test_cuda_build_for_several_archs(tiny_vlm: dict[str, Path], tmp_path: Path) -> None:
    """A JSON target with an arch list: SASS for each, the same bytes on a second build."""
    import json

    from modec.kernels.cuda_aot import fatbin_entries, library_fatbins
    from modec.lowering.lower import lower_model

    _needs_nvcc()
    model, q = _simulated(tiny_vlm["model"], WIDTHS)
    target = '{"kind": "cuda", "arch": ["sm_90", "sm_80"]}'
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        lower_model(model, q, out, target, pipeline={})
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "sm_80" and manifest["target"]["archs"] == [
        "sm_80",
        "sm_90",
    ]
    library = (outs[0] / "model.so").read_bytes()
    (fatbin,) = library_fatbins(library)
    assert fatbin_entries(fatbin) == [("sass", "sm_80"), ("sass", "sm_90")]
    assert library == (outs[1] / "model.so").read_bytes()


def test_manifest_sections(lowered: Any) -> None:
    import json

    _, _, out, result = lowered
    man = json.loads((out / "manifest.json").read_text())
    moe = man["sections"]["moe"]
    assert moe["layout"] == "n16k32" and moe["group_size"] == GROUP
    assert [layer["widths"] for layer in moe["layers"]] == [list(w) for w in WIDTHS]
    g = moe["layers"][0]["groups"][0]
    assert g["bits"] == 2 and g["experts"] == [0]
    # H = I = 32, one 2-bit expert: N_pad/16 * K_pad/32 * bits * 64 bytes of codes.
    assert g["bytes"]["gate"] == {"codes": 2 * 1 * 2 * 64, "scales": 2 * 1 * 16 * 2,
                                  "zeros": 2 * 1 * 16}  # fmt: skip
    assert man["sections"]["pipeline"] == PIPELINE
    # 2 layers x 3 projections: layer 0 has widths {2, 3, 4}, layer 1 {2, 3, 4} too.
    assert (result.moe_layers, result.moe_kernel_launches) == (2, 18)
    assert result.params == len(man["params"]) == len(result.manifest.params)
    packed = sum(
        b for layer in moe["layers"] for g in layer["groups"]
        for sizes in g["bytes"].values() for b in sizes.values()
    )  # fmt: skip
    assert result.packed_expert_bytes == packed > 0
    names = [p["name"] for p in man["params"]]
    assert "moe0.up.w2.codes" in names and "moe0.router.weight_t" in names


def test_experts_packed_only_when_written(
    tiny_vlm: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packed experts are lazy: nothing is packed while the graph is lowered and
    compiled; the writer packs each (layer, width group, projection) once, expert by expert,
    and the packed bytes equal `pack` of the stacked codes."""
    from safetensors.numpy import load_file

    from modec.lowering import moe_plan
    from modec.lowering.lower import lower_model
    from modec.numerics.packing import pack
    from modec.numerics.schemes import QuantScheme

    calls: list[tuple[int, ...]] = []
    real = moe_plan.pack_codes
    monkeypatch.setattr(
        moe_plan, "pack_codes", lambda q, scheme: calls.append(q.shape) or real(q, scheme)
    )
    model, q = _simulated(tiny_vlm["model"], WIDTHS)
    at_step: dict[str, int] = {}
    lower_model(model, q, tmp_path / "out", "llvm", pipeline={},
                step=lambda name: at_step.setdefault(name, len(calls)))  # fmt: skip
    assert at_step["lower"] == at_step["compile"] == 0
    # 2 layers x 4 experts x 3 projections, each expert's [N, K] codes packed once.
    assert len(calls) == 24 and all(len(s) == 2 for s in calls)
    weights = load_file(str(tmp_path / "out" / "weights.safetensors"))
    layer0 = q.layers[0]["down"]
    want = pack(
        np.stack([layer0[e].q for e in (2, 3)]), np.stack([layer0[e].scale for e in (2, 3)]),
        np.stack([layer0[e].zero for e in (2, 3)]), QuantScheme(4, GROUP),
    )  # fmt: skip
    for part in ("codes", "scale", "zero"):
        np.testing.assert_array_equal(weights[f"moe0.down.w4.{part}"], getattr(want, part))


@pytest.mark.parametrize("target", ["vulkan", "no-such-target"])
def test_unsupported_target_is_usage_error(
    tiny_vlm: dict[str, Path], tmp_path: Path, target: str
) -> None:
    from modec.lowering.lower import lower_model

    model, q = _simulated(tiny_vlm["model"], WIDTHS)
    with pytest.raises(UsageError, match=f"--target {target}"):
        lower_model(model, q, tmp_path / "out", target, pipeline={})
    assert not (tmp_path / "out").exists()


def test_quantized_layers_must_match(tiny_vlm: dict[str, Path]) -> None:
    from modec.lowering.moe import plan_layers

    model, q = _simulated(tiny_vlm["model"], WIDTHS)
    short = QuantizedExperts(GROUP, WIDTHS[:1], q.layers[:1])
    with pytest.raises(ModelError, match="2 MoE layers"):
        plan_layers(model, short)


def _one_node_model(arrays: dict[str, np.ndarray | None], attrs: dict[str, Any]) -> ir.Model:
    """A graph with one canonical MoE node: hidden [b, s, H] -> MoE -> out."""
    from modec.moe.reference import INPUT_NAMES

    h = int(arrays["router_weight"].shape[1])  # type: ignore[union-attr]
    x = ir.Value(
        name="hidden", shape=ir.Shape(["b", "s", h]), type=ir.TensorType(ir.DataType.FLOAT)
    )
    inputs: list[ir.Value | None] = [x]
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18, "ai.modec": 1}, name="g")
    for name in INPUT_NAMES[1:]:
        arr = arrays.get(name)
        if arr is None:
            inputs.append(None)
            continue
        v = ir.Value(
            name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.tensor(np.ascontiguousarray(arr, dtype=np.float32), name=name),
        )  # fmt: skip
        graph.register_initializer(v)
        inputs.append(v)
    while inputs[-1] is None:
        inputs.pop()
    node = ir.Node(
        "ai.modec", "MoE", inputs, name="moe0",
        attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
    )  # fmt: skip
    node.outputs[0].name = "out"
    node.outputs[0].shape = ir.Shape(["b", "s", h])
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    return ir.Model(graph, ir_version=9)


_VARIANTS = {
    "softmax_topk_plain": dict(scoring="softmax", norm_topk_prob=0, activation="gelu"),
    "softmax_after_topk_gpt_oss": dict(
        scoring="softmax", softmax_after_topk=1, activation="gpt_oss", alpha=1.702, limit=7.0
    ),
    "sigmoid_grouped_scaled_shared": dict(
        scoring="sigmoid",
        norm_topk_prob=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        activation="silu",
    ),
}


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_routing_variants_match_reference(variant: str, tmp_path: Path) -> None:
    import modec.runtime

    from modec.lowering.lower import lower_model
    from modec.moe.reference import MoEParams, moe_forward

    rng = np.random.default_rng(0)
    e, h, i, k = 8, 32, 64, 2
    widths = ((2, 3, 4, 4, 3, 2, 4, 3),)
    a = _VARIANTS[variant]
    arrays: dict[str, np.ndarray | None] = {
        "router_weight": rng.normal(size=(e, h)).astype(np.float32),
        "gate": rng.normal(size=(e, i, h)).astype(np.float32) * 0.2,
        "up": rng.normal(size=(e, i, h)).astype(np.float32) * 0.2,
        "down": rng.normal(size=(e, h, i)).astype(np.float32) * 0.2,
    }
    if variant != "softmax_topk_plain":
        arrays["router_bias"] = rng.normal(size=(e,)).astype(np.float32) * 0.1
        arrays["gate_bias"] = rng.normal(size=(e, i)).astype(np.float32) * 0.1
        arrays["up_bias"] = rng.normal(size=(e, i)).astype(np.float32) * 0.1
        arrays["down_bias"] = rng.normal(size=(e, h)).astype(np.float32) * 0.1
    if a["scoring"] == "sigmoid":
        arrays["correction_bias"] = rng.normal(size=(e,)).astype(np.float32) * 0.5
        arrays["shared_gate"] = rng.normal(size=(16, h)).astype(np.float32) * 0.2
        arrays["shared_up"] = rng.normal(size=(16, h)).astype(np.float32) * 0.2
        arrays["shared_down"] = rng.normal(size=(h, 16)).astype(np.float32) * 0.2
        arrays["shared_expert_gate"] = rng.normal(size=(1, h)).astype(np.float32)
    attrs: dict[str, Any] = {"num_experts": e, "top_k": k, "gated": 1}
    attrs["has_shared"] = int(arrays.get("shared_up") is not None)
    attrs["shared_gated"] = attrs["has_shared"]
    attrs.update(a)
    model = _one_node_model(arrays, attrs)
    # The reference runs the dequantized experts that quantize_model_rtn writes back.
    q = quantize_model_rtn(model, widths, GROUP)
    out = tmp_path / "out"
    lower_model(model, q, out, "llvm", pipeline={})
    sess = modec.runtime.load(out)
    p = MoEParams.from_node(next(n for n in model.graph if is_moe_node(n)))
    for b, s in ((1, 1), (2, 5), (3, 17)):
        x = rng.normal(size=(b, s, h)).astype(np.float32)
        got = sess.run({"hidden": x})["out"]
        want = moe_forward(p, x).output
        assert _rel(got, want) < 1e-4, (variant, b, s)
