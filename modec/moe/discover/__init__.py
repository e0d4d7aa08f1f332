"""find-moe: locate every Mixture-of-Experts layer of an ONNX graph by its structure.

Reads the graph only; never relies on value or node names (the dynamo optimizer renames
initializers), only on dataflow and constants. Each module holds one matcher and states its
rules:

- `router`: the router TopK, its scoring chain and the routing spec (softmax / sigmoid,
  group-limited, correction bias, softmax after top-k, renormalization, scaling);
- `find`: the driver: hidden input, combine output, the region and its checks;
- `stacked`: stacked gather experts (transformers' ``batched_mm``);
- `per_expert`: experts written one by one, with `dispatch` (dispatch and ``If`` per expert)
  and `dense` (dense sparse-gate: gate column or einsum stack) telling which expert is which;
- `ffn`: gate / up / down, the gate-up layout and the activation of one expert;
- `shared`: the shared expert;
- `region`: the dataclasses find-moe returns; `common`: projections.
"""

from __future__ import annotations

from modec.moe.discover.find import find_moe
from modec.moe.discover.region import (
    Activation,
    ExpertForm,
    ExpertWeights,
    FindMoEOptions,
    GateLayout,
    MoERegion,
    RouterSpec,
    Scoring,
    SharedExpert,
)

__all__ = [
    "Activation",
    "ExpertForm",
    "ExpertWeights",
    "FindMoEOptions",
    "GateLayout",
    "MoERegion",
    "RouterSpec",
    "Scoring",
    "SharedExpert",
    "find_moe",
]
