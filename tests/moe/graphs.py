"""Small hand-written MoE graphs in ONNX text, for the Before/Expected graph tests.

Each builder writes one MoE layer the way an exporter does (the forms of
`tests.fixtures.models`, shrunk to H = 8, E = 4, I = 6, top-2 and written out by hand), so a
test can state the Expected graph next to it (with `tests.moe.onnx_text`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from tests.moe.onnx_text import E, H, I, K, onnx_model


@dataclass
class Before:
    """A Before graph and what its MoE layer is, stated by hand.

    Attributes:
        model: the graph.
        canonical: the layer's weights as the canonical MoE node holds them, by input name
            (`modec.moe.reference.INPUT_NAMES`): ``nn.Linear`` convention, gate_up split.
        feeds: an input to run the graph on.
        moe_io: the names of the layer's hidden input and output values.
    """

    model: ir.Model
    canonical: dict[str, np.ndarray]
    feeds: dict[str, np.ndarray]
    moe_io: tuple[str, str] = ("x", "out")


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _x(rng: np.random.Generator, name: str = "x") -> dict[str, np.ndarray]:
    return {name: rng.normal(size=(2, 5, H)).astype(np.float32)}


# Shape constants of the routers and of `stacked_experts`.
_SHAPES = {
    "flat": _i64(-1, H), "k": _i64(K), "last": _i64(-1), "one": _i64(1),
    "rep": _i64(1, K, 1), "minus1": _i64(-1), "tkh": _i64(-1, K, H), "col": _i64(-1, 1),
}  # fmt: skip


def _shapes(*names: str) -> dict[str, np.ndarray]:
    return {n: _SHAPES[n] for n in names}


def _stacked_shapes(nd: bool = True) -> dict[str, np.ndarray]:
    return _shapes("flat", "k", "last", "one", "rep", "minus1", "tkh", *(["col"] if nd else []))


def stacked_experts(x: str, idx: str, weights: str, out: str, nd: bool = True) -> str:
    """transformers' batched_mm experts over tokens ``x [T, H]``: every (token, slot) pair
    gathers its expert's stacked ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` (``GatherND``
    as dynamo writes it, or ``Gather`` axis 0), SiLU-gated, weighted, summed over slots."""
    gather, index_shape = ("GatherND", "col") if nd else ("Gather", "minus1")
    return f"""
    x3 = Unsqueeze({x}, one)
    x_rep3 = Expand(x3, rep)
    x_rep = Reshape(x_rep3, flat)
    idx = Reshape({idx}, {index_shape})
    gu_w = {gather}(gate_up, idx)
    x_c = Unsqueeze(x_rep, last)
    gu_c = MatMul(gu_w, x_c)
    gu = Squeeze(gu_c, last)
    g, u = Split <axis = 1, num_outputs = 2> (gu)
    g_sig = Sigmoid(g)
    g_act = Mul(g, g_sig)
    h = Mul(g_act, u)
    d_w = {gather}(down, idx)
    h_c = Unsqueeze(h, last)
    y_c = MatMul(d_w, h_c)
    y = Squeeze(y_c, last)
    w_flat = Reshape({weights}, minus1)
    w_c = Unsqueeze(w_flat, last)
    yw = Mul(y, w_c)
    yw3 = Reshape(yw, tkh)
    {out} = ReduceSum <keepdims = 0> (yw3, one)
"""


def _stacked_weights(rng: np.random.Generator, e: int = E) -> dict[str, np.ndarray]:
    return {"gate_up": _rand(rng, e, 2 * I, H), "down": _rand(rng, e, H, I)}


def _stacked_canonical(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # transformers' gate_up_proj holds the gate rows first; W_sel @ x: already [E, N, K].
    return {"gate": w["gate_up"][:, :I], "up": w["gate_up"][:, I:], "down": w["down"]}


SOFTMAX_ROUTER = """
    xf = Reshape(x, flat)
    logits = Gemm <transB = 1> (xf, router)
    probs = Softmax <axis = -1> (logits)
    top_w, top_i = TopK <axis = -1> (probs, k)
    top_sum = ReduceSum <keepdims = 1> (top_w, last)
    weights = Div(top_w, top_sum)
"""


def stacked_softmax(seed: int = 0) -> Before:
    """Mixtral: softmax router (``Gemm``, ``W [E, H]``), top-2 renormalized, stacked experts."""
    rng = np.random.default_rng(seed)
    w = {"router": _rand(rng, E, H), **_stacked_weights(rng)}
    text = f"""
    stacked (float[B, S, 8] x) => (float[B, S, 8] out) {{
        {SOFTMAX_ROUTER}
        {stacked_experts("xf", "top_i", "weights", "comb")}
        xshape = Shape(x)
        out = Reshape(comb, xshape)
    }}"""
    canonical = {"router_weight": w["router"], **_stacked_canonical(w)}
    return Before(onnx_model(text, {**w, **_stacked_shapes()}), canonical, _x(rng))


def grouped_sigmoid(seed: int = 0) -> Before:
    """DeepSeek-V3: sigmoid scores plus a correction bias pick 2 of 4 groups of 2 experts (a
    group scores the sum of its top-2), then the top-2 experts of those; the weights are the
    uncorrected scores, renormalized and scaled by 2.5. 8 stacked experts."""
    rng = np.random.default_rng(seed)
    e, groups = 8, 4
    w = {
        "router": _rand(rng, e, H),
        # positive, so that the masked-out experts (set to 0) never win (as in DeepSeek-V3)
        "correction": rng.uniform(0.0, 0.1, e).astype(np.float32),
        **_stacked_weights(rng, e),
    }
    text = f"""
    grouped (float[B, S, 8] x) => (float[B, S, 8] out) {{
        xf = Reshape(x, flat)
        logits = Gemm <transB = 1> (xf, router)
        scores = Sigmoid(logits)
        choice = Add(scores, correction)
        by_group = Reshape(choice, group_shape)
        in_top, in_idx = TopK <axis = -1> (by_group, k)
        group_scores = ReduceSum <keepdims = 0> (in_top, last)
        g_top, g_idx = TopK <axis = -1, sorted = 0> (group_scores, k)
        gs_shape = Shape(group_scores)
        g_zero = ConstantOfShape(gs_shape)
        gi_shape = Shape(g_idx)
        g_one = ConstantOfShape <value = float[1] {{1.0}}> (gi_shape)
        g_mask = ScatterElements <axis = 1> (g_zero, g_idx, g_one)
        m3 = Unsqueeze(g_mask, last)
        m3e = Expand(m3, group_expand)
        m_flat = Reshape(m3e, flat_e)
        m_bool = Cast <to = 9> (m_flat)
        dropped = Not(m_bool)
        masked = Where(dropped, zero_f, choice)
        top_v, top_i = TopK <axis = -1, sorted = 0> (masked, k)
        top_w = GatherElements <axis = 1> (scores, top_i)
        top_sum = ReduceSum <keepdims = 1> (top_w, last)
        denom = Add(top_sum, eps)
        normed = Div(top_w, denom)
        weights = Mul(normed, scale)
        {stacked_experts("xf", "top_i", "weights", "comb")}
        xshape = Shape(x)
        out = Reshape(comb, xshape)
    }}"""
    consts = {
        **w, **_stacked_shapes(), "group_shape": _i64(-1, groups, e // groups),
        "group_expand": _i64(1, groups, e // groups), "flat_e": _i64(-1, e),
        "zero_f": np.array(0.0, np.float32), "eps": np.array(1e-20, np.float32),
        "scale": np.array(2.5, np.float32),
    }  # fmt: skip
    canonical = {
        "router_weight": w["router"], "correction_bias": w["correction"], **_stacked_canonical(w)
    }  # fmt: skip
    return Before(onnx_model(text, consts), canonical, _x(rng))


def shared_expert(seed: int = 0) -> Before:
    """Qwen2-MoE: softmax router (``MatMul``, ``W [H, E]``) without renormalization,
    ``Gather``-stacked experts, plus a SiLU shared expert (intermediate 10) whose output is
    multiplied by ``sigmoid(x · gate)`` and added to the routed output."""
    rng = np.random.default_rng(seed)
    w = {
        "router": _rand(rng, H, E), **_stacked_weights(rng),
        "s_gate": _rand(rng, H, 10), "s_up": _rand(rng, H, 10), "s_down": _rand(rng, 10, H),
        "s_expert_gate": _rand(rng, H, 1),
    }  # fmt: skip
    text = f"""
    shared (float[B, S, 8] x) => (float[B, S, 8] out) {{
        xf = Reshape(x, flat)
        logits = MatMul(xf, router)
        probs = Softmax <axis = -1> (logits)
        top_w, top_i = TopK <axis = -1> (probs, k)
        {stacked_experts("xf", "top_i", "top_w", "routed", nd=False)}
        sg = MatMul(xf, s_gate)
        su = MatMul(xf, s_up)
        sg_sig = Sigmoid(sg)
        sg_act = Mul(sg, sg_sig)
        sh = Mul(sg_act, su)
        sy = MatMul(sh, s_down)
        gate_logit = MatMul(xf, s_expert_gate)
        gate = Sigmoid(gate_logit)
        shared = Mul(gate, sy)
        total = Add(routed, shared)
        xshape = Shape(x)
        out = Reshape(total, xshape)
    }}"""
    canonical = {
        "router_weight": w["router"].T, **_stacked_canonical(w), "shared_gate": w["s_gate"].T,
        "shared_up": w["s_up"].T, "shared_down": w["s_down"].T,
        "shared_expert_gate": w["s_expert_gate"].T,
    }  # fmt: skip
    return Before(onnx_model(text, {**w, **_stacked_shapes(nd=False)}), canonical, _x(rng))


_W1_W3_W2 = (("gate", "w1"), ("up", "w3"), ("down", "w2"))


def dispatch(seed: int = 0, experts: int = E) -> Before:
    """Mixtral-v1 dispatch (``index_add``): per expert ``Equal(top_i, e) → NonZero → Gather``
    of its tokens, a SiLU MLP of separate ``w1, w3 [H, I]`` and ``w2 [I, H]``, the routing
    weight by ``GatherND``, accumulated by ``ScatterND(add)``. ``experts < E`` leaves the
    last ones out (an export that baked in the experts its sample input hit)."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    lines = []
    for e in range(experts):
        w |= {f"w1_{e}": _rand(rng, H, I), f"w3_{e}": _rand(rng, H, I)}
        w[f"w2_{e}"] = _rand(rng, I, H)
        lines.append(f"""
        hit{e} = Equal(top_i, e{e})
        nz{e} = NonZero(hit{e})
        pos{e} = Transpose <perm = [1, 0]> (nz{e})
        tok{e} = Gather <axis = 1> (pos{e}, zero)
        rows{e} = Gather <axis = 0> (xf, tok{e})
        g{e} = MatMul(rows{e}, w1_{e})
        g_sig{e} = Sigmoid(g{e})
        g_act{e} = Mul(g{e}, g_sig{e})
        u{e} = MatMul(rows{e}, w3_{e})
        h{e} = Mul(g_act{e}, u{e})
        y{e} = MatMul(h{e}, w2_{e})
        w_sel{e} = GatherND(weights, pos{e})
        w_c{e} = Unsqueeze(w_sel{e}, last)
        yw{e} = Mul(y{e}, w_c{e})
        at{e} = Unsqueeze(tok{e}, last)
        acc{e + 1} = ScatterND <reduction = "add"> (acc{e}, at{e}, yw{e})""")
    w["router"] = _rand(rng, E, H)
    text = f"""
    dispatch (float[B, S, 8] x) => (float[B, S, 8] out) {{
        {SOFTMAX_ROUTER}
        xf_shape = Shape(xf)
        acc0 = ConstantOfShape(xf_shape)
        {"".join(lines)}
        xshape = Shape(x)
        out = Reshape(acc{experts}, xshape)
    }}"""
    scalars = {"zero": 0, **{f"e{e}": e for e in range(experts)}}
    consts = {**w, **_shapes("flat", "k", "last")}
    consts |= {n: np.array(v, np.int64) for n, v in scalars.items()}
    canonical = {
        "router_weight": w["router"],
        **{p: np.stack([w[f"{n}_{e}"].T for e in range(experts)]) for p, n in _W1_W3_W2},
    }
    return Before(onnx_model(text, consts), canonical, _x(rng))


def dense(seed: int = 0) -> Before:
    """Dense sparse-gate (``dense_add``): the top-2 weights scattered into gates ``[T, E]``;
    every expert (fused ``gate_up [H, 2I]`` cut by two ``Slice``s, ``down [I, H]``) runs on
    every token and is multiplied by its gate column (``Slice``). Router: ``MatMul`` then
    ``Add`` of a bias."""
    rng = np.random.default_rng(seed)
    w = {"router": _rand(rng, H, E), "router_b": _rand(rng, E)}
    lines = []
    for e in range(E):
        w |= {f"w_gu{e}": _rand(rng, H, 2 * I), f"w_d{e}": _rand(rng, I, H)}
        lines.append(f"""
        gu{e} = MatMul(xf, w_gu{e})
        g{e} = Slice(gu{e}, s0, s_half, last)
        u{e} = Slice(gu{e}, s_half, s_end, last)
        g_sig{e} = Sigmoid(g{e})
        g_act{e} = Mul(g{e}, g_sig{e})
        h{e} = Mul(g_act{e}, u{e})
        y{e} = MatMul(h{e}, w_d{e})
        col{e} = Slice(gates, s{e}, s{e + 1}, one)
        c{e} = Mul(col{e}, y{e})
        acc{e + 1} = Add(acc{e}, c{e})""")
    text = f"""
    dense (float[B, S, 8] x) => (float[B, S, 8] out) {{
        xf = Reshape(x, flat)
        logits0 = MatMul(xf, router)
        logits = Add(logits0, router_b)
        probs = Softmax <axis = -1> (logits)
        top_w, top_i = TopK <axis = -1> (probs, k)
        top_sum = ReduceSum <keepdims = 1> (top_w, last)
        weights = Div(top_w, top_sum)
        probs_shape = Shape(probs)
        gates0 = ConstantOfShape(probs_shape)
        gates = ScatterElements <axis = 1> (gates0, top_i, weights)
        xf_shape = Shape(xf)
        acc0 = ConstantOfShape(xf_shape)
        {"".join(lines)}
        xshape = Shape(x)
        out = Reshape(acc{E}, xshape)
    }}"""
    consts = {
        **w, **_shapes("flat", "k", "last", "one"), "s_half": _i64(I), "s_end": _i64(2 * I),
        **{f"s{e}": _i64(e) for e in range(E + 1)},
    }  # fmt: skip
    canonical = {
        "router_weight": w["router"].T, "router_bias": w["router_b"],
        "gate": np.stack([w[f"w_gu{e}"][:, :I].T for e in range(E)]),
        "up": np.stack([w[f"w_gu{e}"][:, I:].T for e in range(E)]),
        "down": np.stack([w[f"w_d{e}"].T for e in range(E)]),
    }  # fmt: skip
    return Before(onnx_model(text, consts), canonical, _x(rng))


def vlm(seed: int = 0) -> Before:
    """A vision tower (Conv → Transpose → Relu → ReduceMean) added to the text tokens, a sort
    of the image features (``TopK largest=0``: not a router), the `stacked_softmax` MoE on
    the sum, a residual ``Add`` and a head. ``one`` is read inside and outside the MoE."""
    rng = np.random.default_rng(seed)
    w = {
        "conv_w": _rand(rng, H, 3, 1), "router": _rand(rng, E, H), **_stacked_weights(rng),
        "head": _rand(rng, H, H),
    }  # fmt: skip
    text = f"""
    vlm (float[B, S, 8] tokens, float[B, 3, 5] pixels) => (float[B, S, 8] head_out,
                                                          int64[B, 1, 8] order) {{
        feat = Conv <kernel_shape = [1]> (pixels, conv_w)
        feat_t = Transpose <perm = [0, 2, 1]> (feat)
        feat_r = Relu(feat_t)
        vis = ReduceMean <keepdims = 1> (feat_r, one)
        x = Add(tokens, vis)
        sorted_v, order = TopK <axis = -1, largest = 0> (vis, eight)
        {SOFTMAX_ROUTER}
        {stacked_experts("xf", "top_i", "weights", "comb")}
        xshape = Shape(x)
        moe = Reshape(comb, xshape)
        res = Add(x, moe)
        head_out = MatMul(res, head)
    }}"""
    consts = {**w, **_stacked_shapes(), "eight": _i64(8)}
    feeds = {**_x(rng, "tokens"), "pixels": rng.normal(size=(2, 3, 5)).astype(np.float32)}
    canonical = {"router_weight": w["router"], **_stacked_canonical(w)}
    return Before(onnx_model(text, consts), canonical, feeds, moe_io=("x", "moe"))
