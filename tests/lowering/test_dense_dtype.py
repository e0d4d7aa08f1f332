"""Dense weights kept in their stored dtype (issue #15): declared to the importer, not read.

- The scheduled projection kernel takes a float16 / bfloat16 weight as it is (numpy
  reference, odd shapes).
- A graph stored in fp16 / bf16 lowered as `modec.lowering.lower.lower_model` lowers it
  (`lowering_proto` + ``import_onnx(weights=..., upcast=True)``): its weights stay 16-bit
  parameters, every projection reads them as stored (no float32 copy left in the module),
  an embedding ``Gather`` casts only its rows, and the result equals onnxruntime on the
  float32 model (`modec.executor.upcast_float16`).
- An fp32 model's artifact is byte for byte the one of the import that reads every weight.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from modec.executor import upcast_float16  # noqa: E402
from modec.kernels.target import resolve_target  # noqa: E402
from modec.lowering.dense import compile_module, lower_dense  # noqa: E402
from modec.lowering.lower import WEIGHT_MIN_BYTES, lowering_proto  # noqa: E402
from modec.lowering.matmul_kernels import matmul_primfunc  # noqa: E402
from modec.moe.lazy import LazyArray  # noqa: E402

NP = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
ONNX = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("m", "n", "k", "shape"),
    [
        (None, 40, 33, (7, 33, 40)),  # symbolic M with a tail row, N and K not tile multiples
        (None, 64, 64, (1, 64, 64)),  # one row
        (5, 96, 16, (5, 16, 96)),  # all static
    ],
)
def test_matmul_kernel_reads_a_16_bit_weight(
    dtype: str, m: int | None, n: int, k: int, shape: tuple[int, int, int]
) -> None:
    rng = np.random.default_rng(0)
    func = matmul_primfunc(False, m, n, k, b_dtype=dtype).with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("llvm"))
    mm, kk, nn = shape
    a = rng.standard_normal((mm, kk), dtype=np.float32)
    w = rng.standard_normal((kk, nn), dtype=np.float32).astype(NP[dtype])
    ref = a @ w.astype(np.float32)
    y = tvm.runtime.tensor(np.full(ref.shape, np.nan, dtype=np.float32))
    ex(tvm.runtime.tensor(a), tvm.runtime.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


V, H, F = 64, 32, 64  # vocab, hidden, inner: every weight matrix is >= WEIGHT_MIN_BYTES in 16 bits


def _half_model(dtype: str) -> onnx.ModelProto:
    """``ids -> Gather(emb) -> MatMul(w1) + b1 -> Relu -> MatMul(Transpose(w2t))``, every
    initializer and value in ``dtype`` (as an fp16/bf16 export computes)."""
    rng = np.random.default_rng(1)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        arr = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(NP[dtype])
        return helper.make_tensor(name, ONNX[dtype], shape, arr.view(np.uint16).tobytes(), raw=True)

    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="act"),
        helper.make_node("Transpose", ["w2t"], ["w2"], name="w2_t", perm=[1, 0]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "half",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("y", ONNX[dtype], ["B", "T", H])],
        [init("emb", (V, H)), init("w1", (H, F)), init("b1", (F,)), init("w2t", (H, F))],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_graph_keeps_its_weights_and_computes_in_float32(dtype: str) -> None:
    proto16 = _half_model(dtype)
    model = ir.serde.deserialize_model(proto16)
    proto, weights = lowering_proto(model)
    assert sorted(weights) == ["emb", "w1", "w2t"]  # b1: 128 bytes, read and made float32
    assert all(isinstance(w, LazyArray) for w in weights.values())
    dm = lower_dense(proto, "llvm", weights=weights, upcast=True)

    # w2t is read transposed only: stored transposed (`fold_weight_transposes`), still lazy.
    assert {n: str(v.dtype) for n, v in dm.params.items()} == {
        "emb": dtype, "w1": dtype, "b1": "float32", "w2t.T": dtype
    }  # fmt: skip
    assert all(dm.params[n] is weights[n] for n in ("emb", "w1"))  # handed over unread
    assert isinstance(dm.params["w2t.T"], LazyArray)
    np.testing.assert_array_equal(np.asarray(dm.params["w2t.T"]), np.asarray(weights["w2t"]).T)
    # Both projections read the 16-bit weight itself (w2 stored transposed) ...
    assert dm.stats["matmul_dense"] == dm.stats["matmul_stored_weight"] == 2
    # ... and no float32 copy of a whole weight is left: the one cast of a weight parameter
    # would be a per-call copy. The embedding is gathered in 16 bits and its rows cast.
    main = dm.mod["main"]
    weight_vars = set(main.params[1:])
    casts: list[Any] = []

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.astype":
            casts.append(e.args[0])

    relax.analysis.post_order_visit(main.body, visit)
    assert not [c for c in casts if c in weight_vars]
    assert [str(c.ty.dtype) for c in casts] == [dtype]  # the gathered rows

    vm = relax.VirtualMachine(compile_module(dm), tvm.cpu())
    ids = np.random.default_rng(2).integers(0, V, (3, 5), dtype=np.int64)
    params = [tvm.runtime.tensor(np.asarray(p)) for p in dm.params.values()]
    got = vm["main"](tvm.runtime.tensor(ids), *params).numpy()
    ref32 = onnx.ModelProto()
    ref32.CopyFrom(proto16)
    upcast_float16(ref32)
    want = ort.InferenceSession(ref32.SerializeToString()).run(None, {"ids": ids})[0]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_weights_below_the_bound_are_read() -> None:
    """The size rule `lowering_proto` documents: only weights of >= WEIGHT_MIN_BYTES are
    declared; a smaller one is in the proto with its data, float32."""
    model = ir.serde.deserialize_model(_half_model("float16"))
    proto, weights = lowering_proto(model)
    inits = {t.name: t for t in proto.graph.initializer}
    for name in ("emb", "w1", "w2t"):
        assert name in weights and weights[name].nbytes >= WEIGHT_MIN_BYTES
        assert inits[name].data_type == TensorProto.FLOAT16
        assert inits[name].data_location == TensorProto.EXTERNAL  # a reference, no data
    b1 = numpy_helper.to_array(inits["b1"])
    assert b1.dtype == np.float32 and b1.nbytes < WEIGHT_MIN_BYTES


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fp32_artifact_is_the_one_of_the_reading_import(
    tiny_vlm: dict[str, Path], tmp_path: Path
) -> None:
    """Declared fp32 weights give the same ``model.so``, ``weights.safetensors`` and
    manifest, byte for byte, as the import that reads every initializer into the proto
    (the lowering before issue #15)."""
    from modec.lowering.build import write_dense_artifact
    from modec.lowering.lower import lower_model
    from modec.lowering.moe import MoELowering, moe_section, plan_layers
    from modec.method.quantize import quantize_model_rtn
    from modec.moe.canonical import canonicalize_moe

    model = ir.load(str(tiny_vlm["model"]))
    canonicalize_moe(model)
    q = quantize_model_rtn(model, ((2, 3, 4, 4), (3, 3, 2, 4)), 32)
    lower_model(model, q, tmp_path / "declared", "llvm", pipeline={})

    proto, weights = lowering_proto(model)
    assert weights, "the fixture has weights of >= WEIGHT_MIN_BYTES"
    read = [
        numpy_helper.from_array(np.asarray(weights[t.name]), t.name) if t.name in weights else t
        for t in proto.graph.initializer
    ]
    read_names = {t.name for t in read}
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(read)
    low = MoELowering(plan_layers(model, q))
    low.omitted_weights = 6  # the expert stacks, as lower_model counts them
    dm = lower_dense(proto, "llvm", [low.add_params], {"MoE": low.convert})
    # The imported weights were read (the MoE lowering's packed experts may be lazy).
    assert not [n for n in read_names if isinstance(dm.params.get(n), LazyArray)]

    sections = {"moe": moe_section(low.plans), "pipeline": {}}
    write_dense_artifact(dm, compile_module(dm), tmp_path / "read", "llvm", sections)
    for name in ("model.so", "weights.safetensors", "manifest.json"):
        assert _sha(tmp_path / "declared" / name) == _sha(tmp_path / "read" / name), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cast_then_transposed_weight_is_stored_transposed(dtype: str) -> None:
    """The Hugging Face export's form of a 16-bit linear weight: ``Cast(w, float32)``, then
    ``Transpose``, then ``MatMul`` (docs/hf_export.md). The weight is stored transposed in
    its own dtype (``w.T``), the projection reads it as stored, and neither the cast nor the
    transpose of a whole weight runs per call."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((F, H), dtype=np.float32) / 8).astype(NP[dtype])
    nodes = [
        helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w32"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "cast_t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", F])],
        [helper.make_tensor("w", ONNX[dtype], (F, H), w.view(np.uint16).tobytes(), raw=True)],
    )  # fmt: skip
    proto16 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto, weights = lowering_proto(ir.serde.deserialize_model(proto16))
    dm = lower_dense(proto, "llvm", weights=weights, upcast=True)
    assert {n: str(v.dtype) for n, v in dm.params.items()} == {"w.T": dtype}
    np.testing.assert_array_equal(np.asarray(dm.params["w.T"]), w.T)
    assert dm.stats["matmul_stored_weight"] == 1 and dm.stats["weights_transposed"] == 1
    script = dm.mod["main"].script()
    assert "permute_dims" not in script and "astype" not in script
    vm = relax.VirtualMachine(compile_module(dm), tvm.cpu())
    x = rng.standard_normal((3, H), dtype=np.float32)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.asarray(dm.params["w.T"])))
    np.testing.assert_allclose(got.numpy(), x @ w.astype(np.float32).T, rtol=1e-5, atol=1e-5)
