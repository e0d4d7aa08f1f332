"""`modec.driver.check_weights_finite`: NaN anywhere and ±inf in a weight are errors naming the
tensor; ±inf in a scalar or a mask fill (what exporters write for masks) is accepted."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from modec.driver import check_weights_finite
from modec.errors import ModelError

INF = np.float32(np.inf)


def _model(nodes, inits, inputs=("x",), outputs=("y",)) -> ir.Model:
    """A float graph from nodes and ``{name: array}`` initializers."""
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(a), k) for k, a in inits.items()],
    )  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(proto)


def _eye(value=None, at=(0, 0)):
    w = np.eye(4, dtype=np.float32)
    if value is not None:
        w[at] = value
    return w


def test_finite_weights_pass():
    check_weights_finite(_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": _eye()}))


@pytest.mark.parametrize("value", [np.nan, INF, -INF])
def test_matmul_weight_with_nan_or_inf_is_named(value):
    m = _model([helper.make_node("MatMul", ["x", "expert_w"], ["y"])], {"expert_w": _eye(value)})
    with pytest.raises(ModelError, match=r"initializer 'expert_w' .*re-export") as e:
        check_weights_finite(m)
    assert "NaN/Inf" in str(e.value)
    assert ("NaN" if np.isnan(value) else "±inf") in str(e.value)


def test_inf_in_a_gather_table_and_a_scalar_matmul_weight():
    table = np.zeros((10, 4), dtype=np.float32)
    table[3, 1] = -INF
    m = _model(
        [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
         helper.make_node("Gather", ["embed", "xi"], ["y"])],
        {"embed": table},
    )  # fmt: skip
    with pytest.raises(ModelError, match=r"'embed' \(a Gather weight"):
        check_weights_finite(m)
    # A size-1 tensor is still a weight when a MatMul multiplies by it.
    m = _model([helper.make_node("MatMul", ["x", "s"], ["y"])], {"s": np.full((4, 1), INF)[:1]})
    with pytest.raises(ModelError, match=r"'s' \(a MatMul weight"):
        check_weights_finite(m)


def test_inf_in_a_large_tensor_that_is_not_a_fill():
    bias = np.zeros(4, dtype=np.float32)
    bias[2] = INF
    m = _model([helper.make_node("Mul", ["x", "scale"], ["y"])], {"scale": bias})
    with pytest.raises(ModelError, match=r"'scale' \(a \[4\] tensor, not a scalar or mask fill\)"):
        check_weights_finite(m)


def test_nan_in_a_scalar_or_constant_node_is_still_an_error():
    m = _model([helper.make_node("Add", ["x", "eps"], ["y"])], {"eps": np.float32(np.nan)})
    with pytest.raises(ModelError, match="'eps' holds 1 NaN"):
        check_weights_finite(m)
    const = helper.make_node(
        "Constant", [], ["c"], name="bad_const",
        value=numpy_helper.from_array(np.full((2, 4), np.nan, dtype=np.float32)),
    )  # fmt: skip
    m = _model([const, helper.make_node("Add", ["x", "c"], ["y"])], {})
    with pytest.raises(ModelError, match="Constant 'bad_const' holds 8 NaN"):
        check_weights_finite(m)


def test_mask_fills_and_scalars_with_inf_are_accepted():
    # masked_fill(-inf): a scalar initializer as Where's value.
    where = [helper.make_node("Greater", ["x", "zero"], ["cond"]),
             helper.make_node("Where", ["cond", "x", "neg_inf"], ["y"])]  # fmt: skip
    check_weights_finite(_model(where, {"zero": np.float32(0), "neg_inf": -INF}))
    # An additive causal mask of -inf, reshaped before the Add, as a Constant node.
    mask = np.triu(np.full((4, 4), -INF, dtype=np.float32), k=1)
    nodes = [
        helper.make_node("Constant", [], ["mask"], value=numpy_helper.from_array(mask)),
        helper.make_node("Constant", [], ["shape"],
                         value=numpy_helper.from_array(np.array([1, 4, 4], dtype=np.int64))),
        helper.make_node("Reshape", ["mask", "shape"], ["mask3"]),
        helper.make_node("Add", ["x", "mask3"], ["y"]),
    ]  # fmt: skip
    check_weights_finite(_model(nodes, {}))
    # A scalar -inf used as a clip bound (not a weight, not a fill): size 1 is accepted.
    clip = [helper.make_node("Max", ["x", "lo"], ["y"])]
    check_weights_finite(_model(clip, {"lo": np.array([-INF], dtype=np.float32)}))


def test_inf_inside_an_if_branch_weight_is_found():
    w = _eye(INF)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "branch_w"], ["z"])], "then", [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "branch_w")],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z2"])], "else", [],
        [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)],
    )  # fmt: skip
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other),
    ]
    with pytest.raises(ModelError, match="'branch_w'"):
        check_weights_finite(_model(nodes, {"zero": np.float32(0)}))


def test_deepseek_dynamo_export_holds_an_inf_fill_and_passes(moe_model):
    """DeepSeek's masked_fill(-inf) exports as a scalar -inf feeding Where: accepted."""
    path = moe_model("deepseek", "dynamo")
    proto = onnx.load(str(path))
    model = ir.serde.deserialize_model(proto)
    fills = [
        name for name, v in model.graph.initializers.items()
        if v.const_value is not None and np.isinf(v.const_value.numpy()).any()
    ]  # fmt: skip
    assert fills, "the fixture no longer holds an inf constant; this test checks nothing"
    check_weights_finite(model)
    # The same inf in an expert weight is refused, naming the tensor.
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 3:
            arr = arr.copy()
            arr.flat[5] = -np.inf
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            name = init.name
            break
    with pytest.raises(ModelError, match=f"initializer '{name}' .*1 ±inf"):
        check_weights_finite(ir.serde.deserialize_model(proto))


@pytest.mark.parametrize(
    ("dtype", "onnx_type"),
    [("float16", TensorProto.FLOAT16), ("bfloat16", TensorProto.BFLOAT16)],
)
def test_half_precision_inline_weights_are_checked(dtype, onnx_type):
    """fp16 and bf16 initializers and Constants (numpy has no bf16: its arrays are ml_dtypes')."""
    w = _eye().astype(dtype)
    w[1, 2] = np.nan
    raw = helper.make_tensor("w16", onnx_type, w.shape, w.tobytes(), raw=True)
    g = helper.make_graph(
        [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [raw],
    )  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ModelError, match="initializer 'w16' holds 1 NaN"):
        check_weights_finite(ir.serde.deserialize_model(proto))
    w[1, 2] = -np.inf  # through the Cast into a MatMul: a weight
    proto.graph.initializer[0].raw_data = w.tobytes()
    with pytest.raises(ModelError, match=r"'w16' \(a MatMul weight of node '.*'\) holds 1 ±inf"):
        check_weights_finite(ir.serde.deserialize_model(proto))
    # The same tensor as a Constant node.
    del proto.graph.initializer[:]
    const = helper.make_node("Constant", [], ["w16"], name="c16", value=raw)
    proto.graph.node.insert(0, const)
    with pytest.raises(ModelError, match="Constant 'c16' holds 1 NaN"):
        check_weights_finite(ir.serde.deserialize_model(proto))
