"""`tests.graph_compare.assert_graph_equal` tells graphs apart by structure, not by names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tests.graph_compare import assert_graph_equal
from tests.moe.onnx_text import onnx_model

BASE = """
    g (float[2, 3] x, float[2, 3] y) => (float[2, 3] out) {
        d = Sub(x, y)
        s = Softmax <axis = -1> (d)
        out = Mul(s, w)
    }"""
W = np.arange(6, dtype=np.float32).reshape(2, 3)


def _model(text: str = BASE, w: np.ndarray = W) -> ir.Model:
    return onnx_model(text, {"w": w})


def test_names_of_nodes_and_intermediate_values_do_not_count() -> None:
    renamed = BASE.replace("d = Sub(x, y)", "diff = Sub(x, y)").replace("(d)", "(diff)")
    assert_graph_equal(_model(renamed), _model())


@pytest.mark.parametrize(
    ("old", "new", "shows"),
    [
        ("Sub(x, y)", "Sub(y, x)", "Sub(y, x)"),  # wiring
        ("axis = -1", "axis = 0", ".axis = 0"),  # attribute
        ("Mul(s, w)", "Add(s, w)", "Add(%1, @w)"),  # op type
        ("=> (float[2, 3] out)", "=> (float[2, 4] out)", "output out: FLOAT[2,4]"),  # type
    ],
)
def test_structural_differences_fail_with_a_diff(old: str, new: str, shows: str) -> None:
    with pytest.raises(AssertionError, match="graphs differ") as err:
        assert_graph_equal(_model(BASE.replace(old, new)), _model())
    assert any(line.startswith("+") and shows in line for line in str(err.value).splitlines())


def test_initializer_values_names_and_metadata_count() -> None:
    with pytest.raises(AssertionError, match="initializer 'w'"):
        assert_graph_equal(_model(w=W + 1), _model())
    other = onnx_model(BASE.replace("Mul(s, w)", "Mul(s, v)"), {"v": W})
    with pytest.raises(AssertionError, match="@v"):
        assert_graph_equal(other, _model())
    tagged = _model()
    tagged.graph.initializers["w"].metadata_props["modec.quantize"] = "never"
    with pytest.raises(AssertionError, match=r"meta modec\.quantize"):
        assert_graph_equal(tagged, _model())
    assert_graph_equal(tagged, _model(), metadata=False)


def test_a_node_used_before_it_is_produced_never_equals_a_sorted_graph() -> None:
    unsorted = _model()
    nodes = list(unsorted.graph)
    unsorted.graph.remove(nodes[0])
    unsorted.graph.append(nodes[0])
    with pytest.raises(AssertionError, match=r"\?d"):
        assert_graph_equal(unsorted, _model())
