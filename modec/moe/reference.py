"""Numpy float32 reference of the canonical ``ai.modec::MoE`` node (spec in docs/ir.md).

Serves calibration (routing records, expert inputs), simulated quantization (one expert's
weights replaced for chosen tokens only) and the oracle for the TVM kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from modec.errors import ModelError
from modec.numerics.activations import fake_quantize

#: Input slots of the canonical node, in order.
INPUT_NAMES = (
    "hidden", "router_weight", "router_bias", "gate", "up", "down", "gate_bias", "up_bias",
    "down_bias", "correction_bias", "shared_gate", "shared_up", "shared_down",
    "shared_expert_gate",
)  # fmt: skip

_erf = np.vectorize(math.erf, otypes=[np.float64])


@dataclass(frozen=True, eq=False)
class MoEParams:
    """Attributes and weights of one canonical MoE node."""

    num_experts: int
    top_k: int
    router_weight: np.ndarray
    up: np.ndarray
    down: np.ndarray
    scoring: str = "softmax"
    norm_topk_prob: bool = False
    softmax_after_topk: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    activation: str = "silu"
    alpha: float = 0.0
    limit: float = 0.0
    shared_activation: str = "silu"
    #: 8: the routed experts' inputs are int8 per group of ``act_group_size`` along K
    #: (``--expert-act-bits 8``, `modec.numerics.activations`); 0: float32.
    act_bits: int = 0
    act_group_size: int = 0
    router_bias: np.ndarray | None = None
    gate: np.ndarray | None = None
    gate_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None
    correction_bias: np.ndarray | None = None
    shared_gate: np.ndarray | None = None
    shared_up: np.ndarray | None = None
    shared_down: np.ndarray | None = None
    shared_expert_gate: np.ndarray | None = None

    @classmethod
    def from_node(cls, node: ir.Node, *, experts: bool = True) -> MoEParams:
        """Read the weights (constant inputs) and attributes of a canonical MoE node.

        With ``experts=False`` the routed experts' stacks (gate, up, down) are not read: they
        become read-only zero-strided arrays of their shape (for callers that need the shapes
        and the router, such as the lowering, which reads the packed codes instead).
        """
        if node.domain != "ai.modec" or node.op_type != "MoE":
            raise ModelError(
                f"node {node.name!r} is {node.domain}::{node.op_type}, not ai.modec::MoE"
            )
        arrays: dict[str, np.ndarray | None] = {}
        for name, v in zip(INPUT_NAMES, node.inputs, strict=False):
            if name == "hidden":
                continue
            t = None if v is None else ir.convenience.get_const_tensor(v)
            if v is not None and t is None:
                raise ModelError(f"MoE node {node.name!r}: input {name} is not a constant")
            if t is not None and not experts and name in ("gate", "up", "down"):
                arrays[name] = np.broadcast_to(np.float32(0), tuple(t.shape.numpy()))
                continue
            arrays[name] = None if t is None else np.asarray(t.numpy(), dtype=np.float32)
        a = {k: v.value for k, v in node.attributes.items()}
        return cls(
            num_experts=int(a["num_experts"]), top_k=int(a["top_k"]),
            scoring=str(a.get("scoring", "softmax")),
            norm_topk_prob=bool(a.get("norm_topk_prob", 0)),
            softmax_after_topk=bool(a.get("softmax_after_topk", 0)),
            n_group=int(a.get("n_group", 1)), topk_group=int(a.get("topk_group", 1)),
            routed_scaling_factor=float(a.get("routed_scaling_factor", 1.0)),
            activation=str(a.get("activation", "silu")), alpha=float(a.get("alpha", 0.0)),
            limit=float(a.get("limit", 0.0)),
            shared_activation=str(a.get("shared_activation", "silu")),
            act_bits=int(a.get("act_bits", 0)), act_group_size=int(a.get("act_group_size", 0)),
            **arrays,  # type: ignore[arg-type]
        )  # fmt: skip

    def with_expert(
        self, expert: int, gate: np.ndarray | None = None, up: np.ndarray | None = None,
        down: np.ndarray | None = None,
    ) -> MoEParams:  # fmt: skip
        """A copy whose expert ``expert`` uses the given projections (others unchanged)."""
        kw = dict(self.__dict__)
        for name, w in (("gate", gate), ("up", up), ("down", down)):
            if w is None:
                continue
            stacked = kw[name]
            if stacked is None:
                raise ModelError(f"MoE has no {name} projection to replace")
            stacked = stacked.copy()
            stacked[expert] = w
            kw[name] = stacked
        return MoEParams(**kw)


@dataclass(frozen=True, eq=False)
class Routing:
    """Per-token routing of one MoE layer over flattened tokens ``T``.

    Attributes:
        scores: router scores ``[T, E]`` (softmax or sigmoid probabilities; for
            ``softmax_after_topk`` the softmax over all E logits, for reporting).
        experts: chosen experts ``[T, k]`` (int64).
        weights: their combine weights ``[T, k]``.
    """

    scores: np.ndarray
    experts: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True, eq=False)
class Replacement:
    """Replacement weights for ONE expert applied only to a chosen set of tokens.

    Attributes:
        expert: the expert index.
        token_mask: boolean ``[T]`` over flattened tokens; True rows use the replacement.
        gate / up / down: the replacement projections (None keeps the original).
    """

    expert: int
    token_mask: np.ndarray
    gate: np.ndarray | None = None
    up: np.ndarray | None = None
    down: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class MoEResult:
    """Output of `moe_forward` and what its hooks recorded."""

    output: np.ndarray
    routing: Routing
    expert_inputs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    ez = np.exp(z)
    return np.asarray(ez / ez.sum(axis=-1, keepdims=True))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray((1.0 / (1.0 + np.exp(-x))).astype(np.float32))


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # Stable descending sort: ties go to the lower index, as onnxruntime's TopK does.
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx


def route(p: MoEParams, x: np.ndarray) -> Routing:
    """Router scores, chosen experts and combine weights for tokens ``x [T, H]``."""
    logits = x @ p.router_weight.T
    if p.router_bias is not None:
        logits = logits + p.router_bias
    logits = logits.astype(np.float32)
    if p.scoring == "sigmoid":
        scores = _sigmoid(logits)
        choice = scores + p.correction_bias if p.correction_bias is not None else scores
        if p.n_group > 1:
            t, e = choice.shape
            grouped = choice.reshape(t, p.n_group, e // p.n_group)
            # DeepSeek-V3: a group's score is the sum of its top-2 expert scores.
            group_scores = _topk(grouped, min(2, e // p.n_group))[0].sum(-1)
            keep = _topk(group_scores, p.topk_group)[1]
            mask = np.zeros((t, p.n_group), dtype=bool)
            np.put_along_axis(mask, keep, True, axis=-1)
            choice = np.where(np.repeat(mask, e // p.n_group, axis=-1), choice, -np.inf)
        _, experts = _topk(choice, p.top_k)
        weights = np.take_along_axis(scores, experts, axis=-1)
        if p.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    elif p.softmax_after_topk:
        scores = _softmax(logits)
        top, experts = _topk(logits, p.top_k)
        weights = _softmax(top)
    else:
        scores = _softmax(logits)
        weights, experts = _topk(scores, p.top_k)
        if p.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
    weights = (weights * np.float32(p.routed_scaling_factor)).astype(np.float32)
    return Routing(scores.astype(np.float32), experts.astype(np.int64), weights)


def _act(kind: str, g: np.ndarray | None, u: np.ndarray, alpha: float, limit: float) -> np.ndarray:
    if kind == "gpt_oss":
        assert g is not None
        g = np.minimum(g, np.float32(limit))
        u = np.clip(u, -limit, limit)
        return np.asarray(((u + 1.0) * (g * _sigmoid(g * np.float32(alpha)))).astype(np.float32))
    x = u if g is None else g
    if kind == "silu":
        a = x * _sigmoid(x)
    elif kind == "gelu":
        a = (0.5 * x * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0)))).astype(np.float32)
    else:
        raise ModelError(f"unknown MoE activation {kind!r}")
    return np.asarray(a if g is None else a * u)


def expert_input(p: MoEParams, x: np.ndarray) -> np.ndarray:
    """Rows entering an expert matmul: as they are, or their int8 approximation where the
    layer's experts take int8 activations (``p.act_bits``)."""
    return fake_quantize(x, p.act_group_size) if p.act_bits else x


def expert_activation(
    p: MoEParams, e: int, x: np.ndarray, weights: MoEParams | None = None
) -> np.ndarray:
    """The input of expert ``e``'s down projection, ``act(x·gateᵀ)·(x·upᵀ)``, rows ``[n, I]``
    (``x`` as the kernels take it: int8 per group where ``p.act_bits``)."""
    w = weights or p
    x = expert_input(p, x)
    u = x @ w.up[e].T
    if w.up_bias is not None:
        u = u + w.up_bias[e]
    g = None
    if w.gate is not None:
        g = x @ w.gate[e].T
        if w.gate_bias is not None:
            g = g + w.gate_bias[e]
    return _act(p.activation, g, u, p.alpha, p.limit)


def expert_mlp(p: MoEParams, e: int, x: np.ndarray, weights: MoEParams | None = None) -> np.ndarray:
    """Expert ``e`` applied to rows ``x [n, H]`` (weights from ``weights`` if given)."""
    w = weights or p
    y = expert_input(p, expert_activation(p, e, x, weights)) @ w.down[e].T
    if w.down_bias is not None:
        y = y + w.down_bias[e]
    return np.asarray(y.astype(np.float32))


def replacement_params(p: MoEParams, rep: Replacement) -> MoEParams:
    """A one-expert `MoEParams` (index 0) holding expert ``rep.expert`` with the replacement
    projections: no copy of the layer's stacked weights (`with_expert` copies them)."""
    e = rep.expert

    def pick(name: str, w: np.ndarray | None) -> np.ndarray | None:
        stacked = getattr(p, name)
        if w is not None:
            if stacked is None:
                raise ModelError(f"MoE has no {name} projection to replace")
            return np.asarray(w)[None]
        return None if stacked is None else stacked[e : e + 1]

    up, down = pick("up", rep.up), pick("down", rep.down)
    assert up is not None and down is not None
    return MoEParams(
        num_experts=1, top_k=1, router_weight=p.router_weight[e : e + 1], up=up, down=down,
        gate=pick("gate", rep.gate),
        gate_bias=None if p.gate_bias is None else p.gate_bias[e : e + 1],
        up_bias=None if p.up_bias is None else p.up_bias[e : e + 1],
        down_bias=None if p.down_bias is None else p.down_bias[e : e + 1],
    )  # fmt: skip


def moe_forward(
    p: MoEParams, hidden: np.ndarray, *, replacement: Replacement | None = None,
    collect_inputs: bool = False,
) -> MoEResult:  # fmt: skip
    """Run the canonical MoE on ``hidden [..., H]``.

    Args:
        p: the node's parameters.
        hidden: input activations.
        replacement: one expert's replacement weights, applied only to the masked tokens.
        collect_inputs: record, per expert, the token indices and rows it received.

    Returns:
        The output (same shape as ``hidden``), the routing and the expert inputs.
    """
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1]).astype(np.float32)
    r = route(p, x)
    out = np.zeros_like(x)
    inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    alt = None
    if replacement is not None:
        if replacement.token_mask.shape != (x.shape[0],):
            raise ModelError(
                f"replacement token mask has shape {replacement.token_mask.shape}, "
                f"expected ({x.shape[0]},) (one flag per flattened token)"
            )
        alt = replacement_params(p, replacement)
    for e in range(p.num_experts):
        tok, slot = np.nonzero(r.experts == e)
        if tok.size == 0:
            continue
        rows = x[tok]
        if collect_inputs:
            inputs[e] = (tok, rows)
        y = expert_mlp(p, e, rows)
        if alt is not None and replacement is not None and e == replacement.expert:
            m = replacement.token_mask[tok]
            if m.any():
                y[m] = expert_mlp(p, 0, rows[m], alt)
        np.add.at(out, tok, y * r.weights[tok, slot][:, None])
    if p.shared_up is not None and p.shared_down is not None:
        u = x @ p.shared_up.T
        g = x @ p.shared_gate.T if p.shared_gate is not None else None
        s = _act(p.shared_activation, g, u, p.alpha, p.limit) @ p.shared_down.T
        if p.shared_expert_gate is not None:
            s = s * _sigmoid(x @ p.shared_expert_gate.T)
        out = out + s
    return MoEResult(out.reshape(shape).astype(np.float32), r, inputs)
