"""find-attention: Before / Expected graphs of canonical MoE nodes and the attention feeding
them. The pass only annotates, so Expected is Before plus ``modec.attention.*`` metadata on
each MoE node it finds attention for.

Tested through `modec.moe.attention.find_attention` (the pass class is a thin wrapper).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from modec.moe.attention import find_attention
from tests.graph_compare import assert_graph_equal
from tests.moe.onnx_text import E, H, I, canonical_model, moe_attrs


def _moe(i: int, hidden: str) -> str:
    """Canonical MoE node ``i`` reading ``hidden`` (ungated: find-attention reads no weight)."""
    return (
        f'ai.modec.MoE <{moe_attrs(gated=0)}> ({hidden}, "modec.moe{i}.router_weight", "", "", '
        f'"modec.moe{i}.up", "modec.moe{i}.down")'
    )


def _attention(i: int, x: str, out: str) -> str:
    """Self-attention of block ``i`` with explicit probabilities ``probs{i}``, and residual."""
    return f"""
        q{i} = MatMul({x}, wq{i})
        k{i} = MatMul({x}, wk{i})
        v{i} = MatMul({x}, wv{i})
        kt{i} = Transpose <perm = [0, 2, 1]> (k{i})
        scores{i} = MatMul(q{i}, kt{i})
        probs{i} = Softmax <axis = -1> (scores{i})
        ctx{i} = MatMul(probs{i}, v{i})
        {out} = Add({x}, ctx{i})"""


def _weights(blocks: int, moe_nodes: int, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    w = {f"{p}{i}": rand(H, H) for i in range(blocks) for p in ("wq", "wk", "wv")}
    w |= {n: rand(H, H) for n in extra}
    for i in range(moe_nodes):
        w |= {f"modec.moe{i}.router_weight": rand(E, H), f"modec.moe{i}.up": rand(E, I, H)}
        w[f"modec.moe{i}.down"] = rand(E, H, I)
    return w


def _layer(i: int, **attention: str) -> dict[str, str]:
    meta = {"modec.moe.form": "stacked_gather", "modec.moe.layer": str(i)}
    return meta | {f"modec.attention.{k}": v for k, v in attention.items()}


def _pair(text: str, weights: dict[str, np.ndarray], before: list[dict[str, str]],
          expected: list[dict[str, str]], opsets: dict[str, int] | None = None,
          ) -> tuple[ir.Model, ir.Model]:  # fmt: skip
    return (
        canonical_model(text, weights, layers=before, opsets=opsets),
        canonical_model(text, weights, layers=expected, opsets=opsets),
    )


def test_probabilities_of_the_block_and_not_a_look_alike_softmax() -> None:
    # ``gate`` is a Softmax nearer the MoE node, but its MatMul's right operand is a constant:
    # not attention probabilities.
    text = f"""
    block (float[B, S, 8] x) => (float[B, S, 8] out) {{
        {_attention(0, "x", "h")}
        gate = Softmax <axis = -1> (h)
        mixed = MatMul(gate, wmix)
        h2 = Add(h, mixed)
        moe = {_moe(0, "h2")}
        out = Add(h2, moe)
    }}"""
    before, expected = _pair(
        text, _weights(1, 1, ("wmix",)), [_layer(0)], [_layer(0, kind="probs", probs="probs0")]
    )
    (tap,) = find_attention(before)
    assert_graph_equal(before, expected)
    assert tap is not None and tap.kind == "probs"
    assert tap.node.op_type == "Softmax" and tap.probs is tap.node.outputs[0]
    assert tap.probs.name == "probs0"


@pytest.mark.parametrize(
    ("op", "opsets"),
    [("Attention", {"": 23}), ("com.microsoft.MultiHeadAttention", {"": 18, "com.microsoft": 1})],
)
def test_fused_attention_gives_q_and_k(op: str, opsets: dict[str, int]) -> None:
    text = f"""
    fused (float[B, S, 8] x) => (float[B, S, 8] out) {{
        q0 = MatMul(x, wq0)
        k0 = MatMul(x, wk0)
        v0 = MatMul(x, wv0)
        ctx = {op}(q0, k0, v0)
        h = Add(x, ctx)
        moe = {_moe(0, "h")}
        out = Add(h, moe)
    }}"""
    before, expected = _pair(
        text, _weights(1, 1), [_layer(0)], [_layer(0, kind="qk", q="q0", k="k0")],
        opsets | {"ai.modec": 1},
    )  # fmt: skip
    (tap,) = find_attention(before)
    assert_graph_equal(before, expected)
    assert tap is not None and (tap.kind, tap.q, tap.probs) == ("qk", tap.node.inputs[0], None)


def test_each_block_gets_its_own_attention() -> None:
    # probs0 is upstream of the second MoE node too (the residual stream); the latest wins.
    text = f"""
    two_blocks (float[B, S, 8] x) => (float[B, S, 8] out) {{
        {_attention(0, "x", "h0")}
        moe0 = {_moe(0, "h0")}
        r0 = Add(h0, moe0)
        {_attention(1, "r0", "h1")}
        moe1 = {_moe(1, "h1")}
        out = Add(h1, moe1)
    }}"""
    before, expected = _pair(
        text, _weights(2, 2), [_layer(0), _layer(1)],
        [_layer(0, kind="probs", probs="probs0"), _layer(1, kind="probs", probs="probs1")],
    )  # fmt: skip
    taps = find_attention(before)
    assert_graph_equal(before, expected)
    assert [t.probs.name for t in taps if t is not None and t.probs is not None] == [
        "probs0",
        "probs1",
    ]


def test_the_walk_stops_at_the_previous_moe_node() -> None:
    # moe1 reads moe0's output alone: the attention behind moe0 is not moe1's.
    text = f"""
    stacked_moe (float[B, S, 8] x) => (float[B, S, 8] out) {{
        {_attention(0, "x", "h")}
        moe0 = {_moe(0, "h")}
        moe1 = {_moe(1, "moe0")}
        out = Add(h, moe1)
    }}"""
    before, expected = _pair(
        text, _weights(1, 2), [_layer(0), _layer(1)],
        [_layer(0, kind="probs", probs="probs0"), _layer(1)],
    )  # fmt: skip
    taps = find_attention(before)
    assert_graph_equal(before, expected)
    assert taps[0] is not None and taps[1] is None
