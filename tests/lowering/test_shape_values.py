"""Shape computations of exported graphs: evaluated at import, symbolic in batch and seq.

One small graph holds the patterns the transformers exports use (TorchScript's
``ConstantOfShape → Mul(-1) → Equal → Where → Expand`` guard, a 0-d ``ConstantOfShape``,
dynamo's ``Max → Shape → Expand``, a ``Range`` to a computed length) plus the other ops that
take a computed shape (``ConstantOfShape``, ``Reshape`` with ``0``/``-1``, ``Slice`` to a
computed end, ``Tile``);
the compiled module must match onnxruntime at shapes the graph never saw, and every
imported tensor's shape must be written in the graph's own dimensions.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from modec.lowering.dense import compile_module, import_onnx  # noqa: E402
from modec.lowering.shape_eval import ShapeEvaluator  # noqa: E402
from modec.lowering.shape_values import ShapeValue  # noqa: E402


def _i64(name: str, *values: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _shape_graph() -> onnx.ModelProto:
    n = helper.make_node
    true = helper.make_tensor("t", TensorProto.BOOL, [1], [True])
    one = helper.make_tensor("o", TensorProto.INT64, [1], [1])
    two = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    nodes = [
        n("Shape", ["x"], ["shp"]),
        n("Gather", ["shp", "i0"], ["b"], axis=0),
        n("Gather", ["shp", "i1"], ["s"], axis=0),
        n("Unsqueeze", ["b", "ax0"], ["b1"]),
        n("Unsqueeze", ["s", "ax0"], ["s1"]),
        n("Concat", ["b1", "s1"], ["bs"], axis=0),
        # TorchScript's guard: where(shape == -1, 1, shape)
        n("Shape", ["bs"], ["bs_len"]),
        n("ConstantOfShape", ["bs_len"], ["ones"], value=one),
        n("Mul", ["ones", "minus1"], ["neg"]),
        n("Equal", ["bs", "neg"], ["eq"]),
        n("Where", ["eq", "ones", "bs"], ["target"]),
        # positions 0..s-1 as float, expanded to [b, s]
        n("Range", ["zero0", "s", "step"], ["pos"]),
        n("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        n("Expand", ["posf", "target"], ["pos_bs"]),
        # a 0-d ConstantOfShape (the causal mask's True)
        n("ConstantOfShape", ["empty"], ["yes"], value=true),
        n("Greater", ["x", "zerof"], ["pos_x"]),
        n("And", ["pos_x", "yes"], ["mask"]),
        n("Where", ["mask", "x", "pos_bs"], ["y00"]),
        n("ConstantOfShape", ["bs"], ["twos"], value=two),
        n("Mul", ["y00", "twos"], ["y0"]),
        # dynamo's broadcast: Max of two index tensors, Shape, Expand
        n("Unsqueeze", ["pos", "ax1"], ["col"]),
        n("Unsqueeze", ["pos", "ax0"], ["row"]),
        n("Max", ["col", "row"], ["mx"]),
        n("Shape", ["mx"], ["mx_shape"]),
        n("Expand", ["col", "mx_shape"], ["cols"]),
        n("Cast", ["cols"], ["colsf"], to=TensorProto.FLOAT),
        n("ReduceSum", ["colsf", "ax1"], ["colsum"], keepdims=0),  # [s]: s * i
        n("Add", ["y0", "colsum"], ["y1"]),
        # Reshape to [b, -1] and back with 0 copying the batch dim; a computed Slice end
        n("Concat", ["b1", "minus1"], ["flat_shape"], axis=0),
        n("Reshape", ["y1", "flat_shape"], ["flat"]),
        n("Concat", ["zero", "s1"], ["back_shape"], axis=0),
        n("Reshape", ["flat", "back_shape"], ["y2"]),
        n("Sub", ["s1", "one1"], ["end"]),
        n("Slice", ["y2", "zero", "end", "ax1"], ["head"]),
        n("Concat", ["head", "head"], ["y3"], axis=1),  # [b, 2s - 2]
        # Tile by a computed repeat: [b, 2s - 2] -> [b, (2s - 2) * b]
        n("Concat", ["one1", "b1"], ["reps"], axis=0),
        n("Tile", ["y3", "reps"], ["y"]),
    ]
    scalars = {"i0": 0, "i1": 1, "zero0": 0, "step": 1}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in scalars.items()]
    inits += [
        _i64("ax0", 0),
        _i64("ax1", 1),
        _i64("minus1", -1),
        _i64("one1", 1),
        _i64("zero", 0),
        numpy_helper.from_array(np.zeros(0, np.int64), "empty"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zerof"),
    ]
    graph = helper.make_graph(
        nodes,
        "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "cols"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def shape_graph() -> onnx.ModelProto:
    return _shape_graph()


def test_import_keeps_shapes_in_graph_dims(shape_graph: onnx.ModelProto) -> None:
    dm = import_onnx(shape_graph)
    main = dm.mod["main"]
    batch, seq = main.params[0].ty.shape.values
    rows, cols = main.ret_ty.shape.values
    # no dimension invented by the frontend (range_len_*, x_*, tile_dim_*)
    assert rows.same_as(batch)
    assert tvm.sym.Analyzer().can_prove_equal(cols, (seq * 2 - 2) * batch)


@pytest.mark.parametrize(("batch", "seq"), [(1, 3), (3, 7)])
def test_shape_graph_matches_onnxruntime(
    shape_graph: onnx.ModelProto, batch: int, seq: int
) -> None:
    dm = import_onnx(shape_graph)
    vm = relax.VirtualMachine(compile_module(dm), tvm.cpu())
    x = np.random.default_rng(seq).standard_normal((batch, seq)).astype(np.float32)
    (want,) = ort.InferenceSession(shape_graph.SerializeToString()).run(None, {"x": x})
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert got.shape == want.shape == (batch, (2 * seq - 2) * batch)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _static(v: ShapeValue | None) -> list[int]:
    assert v is not None
    st = v.static()
    assert st is not None
    return [int(x) for x in st.reshape(-1)]


def test_evaluator_semantics() -> None:
    """Truncating Div, Mod by fmod, narrowing Cast, and the -1 guard folded by bounds."""
    ev = ShapeEvaluator()
    s = tirx.Var("seq", "int64")
    x = relax.Var("x", relax.TensorType([s, 4], "float32"))
    shape = ev.evaluate("Shape", [x], {})
    assert shape is not None and shape.static() is None  # [seq, 4]
    minus = ev.from_numpy(np.array([-1, -1], np.int64))
    assert _static(ev.evaluate("Equal", [shape, minus], {})) == [0, 0]
    a = ev.from_numpy(np.array([-7, 7], np.int64))
    b = ev.from_numpy(np.array([2, -2], np.int64))
    assert _static(ev.evaluate("Div", [a, b], {})) == [-3, -3]
    assert _static(ev.evaluate("Mod", [a, b], {})) == [1, -1]
    assert _static(ev.evaluate("Mod", [a, b], {"fmod": 1})) == [-1, 1]
    big = ev.from_numpy(np.array([300], np.int64))
    assert _static(ev.evaluate("Cast", [big], {"to": TensorProto.INT8})) == [44]
    # a data tensor operand is not a shape computation
    assert ev.evaluate("Add", [x, shape], {}) is None
