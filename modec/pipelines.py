"""The named pipelines: MODE, its baselines and its ablations, as lists of pass objects.

Every method is the same pipeline in four phases; only allocate-bits' importance signal
differs (and measure-sensitivity runs only for the signals that use δ). Each step of the
method is one pass class here, one hop from its code:

====  =====================  ==========================================================
step  pass                   paper
====  =====================  ==========================================================
 -    `FindMoEPass`          find the MoE layers (router → experts → combine)
 -    `CanonicalizeMoEPass`  one ``ai.modec::MoE`` node per layer
 -    `FindAttentionPass`    where each layer's attention can be read
 1    `CollectRoutingPass`   §3.1: routing per expert, text and vision counted apart
 2    `SelectKeyVisionPass`  §3.1: the top 20% vision tokens by text→vision attention
 3    `MeasureSensitivityPass`  §3.2: δ_text(e, b), δ_vision(e, b) by KL
 4    `AllocateBitsPass`     the ILP, Σ (f_text·δ_text + f_key·δ_vision)·x[e, b]
 5    `QuantizeExpertsPass`  GPTQ at each expert's width
 6    `LowerTVMPass`         mixed-precision expert kernels and the artifact
====  =====================  ==========================================================

`CompileOptions` holds what a user sets; its defaults come from `modec.defaults`, declared
once, and the CLI, the Python API, the sweep and the report read them from here. The
``--pipeline`` text (`modec.pipeline_text`) parses into the same pass objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modec.defaults import (
    BITS,
    BUDGET,
    GROUP_SIZE,
    KEY_RATIO,
    SENSITIVITY,
    SENSITIVITY_SAMPLES,
)
from modec.numerics.importance import METHODS, NEEDS_SENSITIVITY
from modec.passes.allocate_bits import AllocateBitsPass
from modec.passes.canonicalize_moe import CanonicalizeMoEPass
from modec.passes.collect_routing import CollectRoutingPass
from modec.passes.find_attention import FindAttentionPass
from modec.passes.find_moe import FindMoEPass
from modec.passes.lower_tvm import LowerTVMPass
from modec.passes.measure_sensitivity import MeasureSensitivityPass
from modec.passes.quantize_dense import QuantizeDensePass
from modec.passes.quantize_experts import QuantizeExpertsPass
from modec.passes.select_key_vision import SelectKeyVisionPass
from modec.pipeline import REGISTRY, Pass, Pipeline

__all__ = [
    "PIPELINES",
    "CompileOptions",
    "analysis_passes",
    "decision_passes",
    "parse_pipeline",
    "standard_pipeline",
]


@dataclass(frozen=True)
class CompileOptions:
    """What ``modec compile`` takes besides the model and data (see the README)."""

    budget: float = BUDGET
    bits: tuple[int, ...] = BITS
    group_size: int = GROUP_SIZE
    method: str = "mode"
    scope: Literal["layer", "global"] = "layer"
    sense: Literal["eq", "le"] = "eq"
    budget_bytes: int = 0
    #: allocate-bits' joint check: ``select`` keeps the narrowest width range's allocation
    #: unless a wider range's is significantly closer to fp32 when every expert is quantized
    #: (`modec.method.joint`); ``guard``: the same check standing on uniform where the
    #: budget is a width, else on MODE's allocation; ``off``: the paper's allocation.
    joint: Literal["off", "select", "guard"] = "off"
    #: how the joint check weighs calibration samples: by KL positions, or the multimodal
    #: and the text-only samples half each (``balanced``).
    joint_weighting: Literal["positions", "balanced"] = "positions"
    #: allocate-bits scales each layer's δ-based costs per width by the joint KL of the
    #: whole layer quantized as deployed over the sum of its δ (``--calibrate-costs``;
    #: `modec.method.joint.calibrate_costs`).
    calibrate_costs: bool = False
    key_ratio: float = KEY_RATIO
    sensitivity_samples: int = SENSITIVITY_SAMPLES
    #: how δ is measured: exact probes, the O(L) Fisher estimate, or auto (by model size).
    sensitivity: Literal["auto", "exact", "fisher"] = SENSITIVITY
    quantizer: Literal["gptq", "rtn"] = "gptq"
    #: width of the text decoder's dense matmul weights (quantize-dense), 0: left as stored
    dense_bits: int = 0
    #: 8: the routed experts take int8 activations per group (``--expert-act-bits``;
    #: `modec.numerics.activations`), 0: float32.
    expert_act_bits: int = 0
    #: 8: the quantized dense matmuls take int8 activations per group (``--dense-act-bits``;
    #: needs ``dense_bits``), 0: float32.
    dense_act_bits: int = 0
    #: TVM target of the compiled artifact ("llvm", "cuda"), or "none" for no lowering.
    target: str = "llvm"
    seed: int = 0
    threads: int = 2
    cache_dir: str | None = None
    #: activation bytes the layer-streamed passes keep in RAM (0: half the machine's RAM).
    max_memory: int = 0


#: Every named pipeline: what its allocation optimises (``--method``).
PIPELINES: dict[str, str] = {
    "mode": "MODE: f_text·δ_text + f_key-vision·δ_vision (arXiv 2606.17118)",
    "uniform": "every expert at the budget width (no ILP)",
    "mc-moe": "MC-MoE: f_global · w̄^1.5 · output error",
    "veq-me": "VEQ: (γ·N_text + β·N_vision) · output error",
    "mode-no-key": "ablation: every vision token counted, no key-token filter",
    "mode-no-sens": "ablation: (f_text + f_key) · output error, no KL sensitivity",
    "mode-sens-only": "ablation: δ_text + δ_vision, no frequency weighting",
    "mode-redundant": "ablation: the non-key vision tokens counted instead of the key ones",
}
assert set(PIPELINES) == set(METHODS), "every importance method has a named pipeline"


def analysis_passes(o: CompileOptions, sensitivity: bool = True) -> list[Pass]:
    """Phases 1–2: the structure of the model, then MODE's statistics (steps 1–3)."""
    passes: list[Pass] = [
        FindMoEPass(),
        CanonicalizeMoEPass(),
        FindAttentionPass(),
        CollectRoutingPass(),
        SelectKeyVisionPass(key_ratio=o.key_ratio),
    ]
    if sensitivity:
        passes.append(
            MeasureSensitivityPass(
                bits=tuple(o.bits),
                group_size=o.group_size,
                samples=o.sensitivity_samples,
                sensitivity=o.sensitivity,
            )
        )
    return passes


def decision_passes(o: CompileOptions) -> list[Pass]:
    """Phase 3: the bit allocation and the quantization (steps 4–5)."""
    passes: list[Pass] = [
        AllocateBitsPass(
            budget=o.budget,
            bits=tuple(o.bits),
            method=o.method,
            scope=o.scope,
            sense=o.sense,
            budget_bytes=o.budget_bytes,
            group_size=o.group_size,
            joint=o.joint,
            joint_weighting=o.joint_weighting,
            calibrate_costs=o.calibrate_costs,
            quantizer=o.quantizer,
        ),
        QuantizeExpertsPass(
            group_size=o.group_size, method=o.quantizer, act_bits=o.expert_act_bits
        ),
    ]
    if o.dense_bits:
        passes.append(
            QuantizeDensePass(
                width=o.dense_bits, group_size=o.group_size, act_bits=o.dense_act_bits
            )
        )
    return passes


def standard_pipeline(o: CompileOptions) -> Pipeline:
    """The pipeline named ``o.method`` for these options (phase 4: lowering, unless ``none``)."""
    if o.method not in PIPELINES:
        from modec.errors import BadInputError

        raise BadInputError(f"unknown --method {o.method!r}; choose from {list(PIPELINES)}")
    passes = analysis_passes(o, o.method in NEEDS_SENSITIVITY) + decision_passes(o)
    if o.target != "none":
        passes.append(LowerTVMPass(target=o.target, quantized_dense=bool(o.dense_bits)))
    return Pipeline(passes, name=o.method)


def parse_pipeline(text: str) -> Pipeline:
    """A ``--pipeline`` text as pass objects (every pass of `modec.passes` is registered)."""
    return Pipeline.parse(text, name="custom")


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass, by name (for ``modec passes``)."""
    import modec.passes  # noqa: F401  (registers any pass not imported above)

    return dict(sorted(REGISTRY.items()))
