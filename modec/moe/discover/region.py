"""What find-moe reports: the MoE region, its router and its experts (frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from modec.moe.lazy import LazyArray

ExpertForm = Literal["stacked_gather", "dispatch", "dense_add", "dense_einsum", "if_per_expert"]
GateLayout = Literal["separate", "concatenated", "interleaved", "none"]
Activation = Literal["silu", "gelu", "gpt_oss"]
Scoring = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class FindMoEOptions:
    """Options of find-moe.

    Attributes:
        min_experts: routers over fewer experts than this are ignored.
    """

    min_experts: int = 2


@dataclass(frozen=True, eq=False)
class RouterSpec:
    """How a MoE layer picks experts and weights them.

    Attributes:
        weight: router weight ``[E, H]`` (``logits = x · weightᵀ + bias``).
        bias: router bias ``[E]`` or None.
        correction_bias: score correction added before top-k only (DeepSeek-V3) or None.
        scoring: softmax or sigmoid over the E logits.
        norm_topk_prob: the k chosen weights are divided by their sum.
        softmax_after_topk: softmax over the top-k logits (GPT-OSS) instead of over all E.
        n_group: expert groups for group-limited routing (1 = none).
        topk_group: groups kept per token.
        routed_scaling_factor: multiplies the final routing weights.
        initializers: names of the graph constants that hold the router parameters.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    correction_bias: np.ndarray | None
    scoring: Scoring
    norm_topk_prob: bool
    softmax_after_topk: bool
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    initializers: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """Stacked expert weights in ``nn.Linear`` convention ``W[N, K]`` (y = x·Wᵀ).

    The projections are float32 `LazyArray`s: find-moe reads their shapes only; their values
    are computed from the model's initializers when read (``numpy()``, ``expert(e)``, or
    ``np.asarray``). The biases are read (``[E, N]``: small).

    Attributes:
        gate: ``[E, I, H]`` or None when not gated.
        up: ``[E, I, H]``.
        down: ``[E, H, I]``.
        gate_bias / up_bias / down_bias: ``[E, I]`` / ``[E, I]`` / ``[E, H]`` or None.
        activation: silu, gelu (erf) or gpt_oss (clamped SwiGLU with alpha and limit).
        alpha / limit: GPT-OSS activation constants (0 otherwise).
    """

    gate: LazyArray | None
    up: LazyArray
    down: LazyArray
    gate_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None
    activation: Activation = "silu"
    alpha: float = 0.0
    limit: float = 0.0

    @property
    def gated(self) -> bool:
        """True for GLU experts (act(gate) · up)."""
        return self.gate is not None


@dataclass(frozen=True, eq=False)
class SharedExpert:
    """An always-on expert added to the routed output (Qwen2-MoE, DeepSeek-V3).

    Attributes:
        weights: its projections with a leading expert axis of 1.
        expert_gate: ``[1, H]`` weight of a sigmoid gate on its output, or None (read).
    """

    weights: ExpertWeights
    expert_gate: np.ndarray | None


@dataclass(frozen=True, eq=False)
class MoERegion:
    """One MoE layer found in the graph.

    Attributes:
        index: position among the MoE layers, in graph order.
        name: the module path when the exporter recorded one, else ``moe.<index>``.
        nodes: the top-level nodes of the region, in graph order.
        hidden: the value the layer reads, ``[..., H]``.
        output: the value the layer produces, same shape as ``hidden``.
        num_experts / top_k: E and k.
        router: routing specification and weights.
        form: how the experts are written in the graph.
        gate_layout: how gate and up projections are stored.
        experts: the stacked expert weights.
        shared: the shared expert, if any.
        topk_node: the router's TopK node.
    """

    index: int
    name: str
    nodes: tuple[ir.Node, ...]
    hidden: ir.Value
    output: ir.Value
    num_experts: int
    top_k: int
    router: RouterSpec
    form: ExpertForm
    gate_layout: GateLayout
    experts: ExpertWeights
    shared: SharedExpert | None
    topk_node: ir.Node
    notes: tuple[str, ...] = field(default_factory=tuple)
