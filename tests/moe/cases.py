"""The fixture × exporter cases the MoE tests run, with what find-moe must report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    exporter: str
    form: str
    layout: str
    scoring: str = "softmax"
    activation: str = "silu"
    norm: bool = True
    softmax_after_topk: bool = False
    n_group: int = 1
    scale: float = 1.0
    shared: bool = False
    shared_gated: bool = False
    router_bias: bool = False
    correction_bias: bool = False
    expert_bias: bool = False

    @property
    def id(self) -> str:
        return f"{self.name}-{self.exporter}"


_DS = dict(scoring="sigmoid", n_group=4, scale=2.5, shared=True, correction_bias=True)
_GO = dict(
    activation="gpt_oss", norm=False, softmax_after_topk=True, router_bias=True, expert_bias=True
)
CASES = [
    Case("mixtral", "dynamo", "stacked_gather", "concatenated"),
    Case("mixtral", "torchscript", "stacked_gather", "concatenated"),
    Case(
        "qwen2moe",
        "dynamo",
        "stacked_gather",
        "concatenated",
        norm=False,
        shared=True,
        shared_gated=True,
    ),
    Case(
        "qwen2moe",
        "torchscript",
        "stacked_gather",
        "concatenated",
        norm=False,
        shared=True,
        shared_gated=True,
    ),
    Case("qwen3moe", "torchscript", "stacked_gather", "concatenated"),
    Case("olmoe", "torchscript", "stacked_gather", "concatenated", norm=False),
    Case("deepseek", "dynamo", "stacked_gather", "concatenated", **_DS),  # type: ignore[arg-type]
    Case("deepseek", "torchscript", "stacked_gather", "concatenated", **_DS),  # type: ignore[arg-type]
    Case("gptoss", "dynamo", "stacked_gather", "interleaved", **_GO),  # type: ignore[arg-type]
    Case("gptoss", "torchscript", "stacked_gather", "interleaved", **_GO),  # type: ignore[arg-type]
    Case("dispatch", "dynamo", "dispatch", "separate"),
    Case("dispatch", "torchscript", "dispatch", "separate"),
    Case("dispatch_scatter", "torchscript", "dispatch", "separate", norm=False),
    Case("dense_add", "torchscript", "dense_add", "concatenated", router_bias=True),
    Case(
        "dense_einsum", "torchscript", "dense_einsum", "none", activation="gelu", router_bias=True
    ),
    Case("cond", "dynamo", "if_per_expert", "separate"),
]
