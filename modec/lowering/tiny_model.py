"""A tiny dense decoder written out in ONNX nodes, for lowering tests and benchmarks.

The graph is built with `onnx.helper` (no torch): token + position embedding, `layers`
pre-norm transformer blocks with the attention written out (Q/K/V projections, head
reshapes, QKᵀ, scale, padding mask, Softmax, PV, output projection) and a SiLU MLP, a final
LayerNorm and an LM head. Batch `B` and sequence `T` are symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny decoder."""

    vocab: int = 96
    dim: int = 64
    heads: int = 4
    ffn: int = 256
    layers: int = 2
    max_len: int = 64
    seed: int = 0


def build_tiny_decoder(cfg: TinyConfig = TinyConfig()) -> onnx.ModelProto:
    """Build the tiny decoder.

    Args:
        cfg: sizes and the weight seed.

    Returns:
        A checked opset-17 model with inputs ``input_ids`` int64 [B, T] and
        ``attention_mask`` int64 [B, T] and output ``logits`` float32 [B, T, vocab].
    """
    rng = np.random.default_rng(cfg.seed)
    d, h = cfg.dim, cfg.heads
    hd = d // h
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(name: str, *shape: int, scale: float | None = None) -> str:
        s = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        return init(name, (rng.standard_normal(shape) * s).astype(np.float32))

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=f"{out}_{op}", **attrs))
        return out

    init("c_i1", np.array([1], dtype=np.int64))
    init("c_i0", np.array([0], dtype=np.int64))
    init("c_one", np.array(1.0, dtype=np.float32))
    init("c_neg", np.array(-1e9, dtype=np.float32))
    init("c_scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))
    init("c_heads", np.array([0, 0, h, hd], dtype=np.int64))
    init("c_merge", np.array([0, 0, d], dtype=np.int64))

    emb = weight("tok_emb", cfg.vocab, d, scale=0.5)
    pos = weight("pos_emb", cfg.max_len, d, scale=0.1)
    x = node("Gather", [emb, "input_ids"], "tok")
    node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    node("Slice", [pos, "c_i0", "seq_len", "c_i0"], "pos_t")
    x = node("Add", [x, "pos_t"], "x0")
    node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    node("Sub", ["c_one", "mask_f"], "mask_inv")
    node("Mul", ["mask_inv", "c_neg"], "mask_add2")
    node("Unsqueeze", ["mask_add2", "c_i1"], "mask_add3")
    mask = node("Unsqueeze", ["mask_add3", "c_i1"], "mask_add")  # [B, 1, 1, T]

    for li in range(cfg.layers):
        p = f"l{li}_"
        ones = np.ones(d, dtype=np.float32)
        zeros = np.zeros(d, dtype=np.float32)
        g1, b1 = init(p + "ln1_g", ones), init(p + "ln1_b", zeros)
        ln = node("LayerNormalization", [x, g1, b1], p + "ln1", axis=-1, epsilon=1e-5)
        proj = {}
        for nm in ("q", "k", "v"):
            w = weight(p + f"w{nm}", d, d)
            b = weight(p + f"b{nm}", d, scale=0.02)
            mm = node("MatMul", [ln, w], p + f"{nm}_mm")
            ad = node("Add", [mm, b], p + f"{nm}_lin")
            proj[nm] = node("Reshape", [ad, "c_heads"], p + f"{nm}_heads")
        q = node("Transpose", [proj["q"]], p + "q_t", perm=[0, 2, 1, 3])
        kt = node("Transpose", [proj["k"]], p + "k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [proj["v"]], p + "v_t", perm=[0, 2, 1, 3])
        s = node("MatMul", [q, kt], p + "scores")
        s = node("Mul", [s, "c_scale"], p + "scores_scaled")
        s = node("Add", [s, mask], p + "scores_masked")
        pr = node("Softmax", [s], p + "probs", axis=-1)
        o = node("MatMul", [pr, v], p + "attn")
        o = node("Transpose", [o], p + "attn_t", perm=[0, 2, 1, 3])
        o = node("Reshape", [o, "c_merge"], p + "attn_m")
        o = node("MatMul", [o, weight(p + "wo", d, d)], p + "o_mm")
        o = node("Add", [o, weight(p + "bo", d, scale=0.02)], p + "o_lin")
        x = node("Add", [x, o], p + "res1")
        g2, b2 = init(p + "ln2_g", ones.copy()), init(p + "ln2_b", zeros.copy())
        ln = node("LayerNormalization", [x, g2, b2], p + "ln2", axis=-1, epsilon=1e-5)
        u = node("MatMul", [ln, weight(p + "w1", d, cfg.ffn)], p + "up_mm")
        u = node("Add", [u, weight(p + "b1", cfg.ffn, scale=0.02)], p + "up")
        sg = node("Sigmoid", [u], p + "sig")
        u = node("Mul", [u, sg], p + "silu")
        dn = node("MatMul", [u, weight(p + "w2", cfg.ffn, d)], p + "down_mm")
        dn = node("Add", [dn, weight(p + "b2", d, scale=0.02)], p + "down")
        x = node("Add", [x, dn], p + "res2")

    gf = init("lnf_g", np.ones(d, dtype=np.float32))
    bf = init("lnf_b", np.zeros(d, dtype=np.float32))
    x = node("LayerNormalization", [x, gf, bf], "lnf", axis=-1, epsilon=1e-5)
    node("MatMul", [x, weight("lm_head", d, cfg.vocab)], "logits")

    graph = helper.make_graph(
        nodes,
        "tiny_decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", cfg.vocab])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_inputs(cfg: TinyConfig, batch: int, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Random token ids and a padding mask (the last row is left-padded by two tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if seq > 2:
        mask[-1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}
