"""allocate-bits: one width per expert from an integer linear program (MODE step 4).

Reads: `CanonicalMoE`, `RoutingStats`, `KeyVision`, and `Sensitivity` for the methods that use
KL sensitivities. Writes: `BitAllocation`. Modifies: nothing. The costs and the solve live
in `modec.method.allocate`; the importance signals in `modec.numerics.importance`; the ILP in
`modec.numerics.ilp`.

Rules:
1. The cost of expert e at width b comes from the importance signal of ``method``: MODE's
   f_text(e)·δ_text(e,b) + f_key(e)·δ_vision(e,b) by default.
2. ``scope=layer`` (the paper) solves one ILP per layer with Σ_e b_e = ⌊n·budget⌋
   (``sense=eq``) or ≤ (``sense=le``); ``scope=global`` solves one ILP over all experts.
3. ``budget_bytes`` > 0 replaces the average-bit budget by a byte budget over all experts
   that counts codes, scales and zero points.
4. ``method=uniform`` solves nothing: every expert gets the budget width, which must then be
   an integer among ``bits``.
5. Deterministic: one solver thread and a fixed seed.
6. With ``scope=layer`` the per-layer solves are tasks of the run's engine (``ctx.engine``:
   in process, or Ray with ``modec compile --workers N``); rule 5 makes the widths the same
   wherever they run.
7. ``joint=select`` (``modec compile --joint select``) checks what the additive objective
   cannot see: the ILP is solved over every contiguous range of ``bits`` for which the
   budget is feasible, each distinct allocation runs on the calibration set (all of it, or
   ``joint_samples`` samples chosen as measure-sensitivity chooses its subset) with every
   expert quantized at its width by ``quantizer`` (GPTQ, as quantize-experts will, each
   half of the samples judged with the other half's Hessians; or RTN), and the KL to fp32
   is read at ``joint_positions`` (every text position by default; ``answer``: δ's). The
   narrowest range's allocation (uniform when the budget is a width) is kept unless
   another is significantly closer to fp32 (95% paired bootstrap over calibration
   samples); then the closest of those (`modec.method.joint`). ``joint=guard`` (``--joint
   guard``) measures the same candidates, but what stands unless another is significantly
   closer is uniform where the budget is one of the widths, else the full range's
   allocation (the paper's): the check then leaves MODE's allocation alone without
   evidence. ``joint_weighting=balanced`` weighs the multimodal and the text-only samples
   half each in that comparison (default: every KL position alike).
   ``off`` (the default) keeps the full range's allocation: the paper's.
8. ``calibrate_costs`` (``modec compile --calibrate-costs``; methods that read δ) runs, for
   every MoE layer l and width b, δ's samples with every expert of layer l quantized at b as
   quantize-experts will (``quantizer``: GPTQ cross-fitted, or RTN) and the other layers in
   fp32, reads the KL to fp32 where δ was read, and multiplies every cost of layer l at
   width b by that KL over Σ_e δ(e, b) before the ILP (and before rule 7's candidates):
   the widths are priced by their joint, deployed damage, the experts keep the method's
   order within a width (`modec.method.joint.calibrate_costs`). The report's
   ``calibrated`` entry lists both sums and the scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import onnx_ir as ir

from modec.defaults import BITS, BUDGET, GROUP_SIZE
from modec.errors import BadInputError
from modec.facts import (
    BitAllocation,
    Calibration,
    CanonicalMoE,
    KeyVision,
    RoutingStats,
    Sensitivity,
)
from modec.numerics.importance import METHODS, NEEDS_OUTPUT_ERROR, NEEDS_SENSITIVITY
from modec.pipeline import Pass, PassContext, PassResult, register


@register
@dataclass
class AllocateBitsPass(Pass):
    """Choose every expert's width; see the module docstring."""

    name = "allocate-bits"
    writes = (BitAllocation,)
    budget: float = BUDGET
    bits: tuple[int, ...] = BITS
    method: str = "mode"
    scope: Literal["layer", "global"] = "layer"
    sense: Literal["eq", "le"] = "eq"
    budget_bytes: int = 0
    group_size: int = GROUP_SIZE
    #: calibration batch size of the Hessian run (collect-routing's, for identical sums).
    batch_size: int = 16
    #: rule 7: ``off``, ``select`` or ``guard``.
    joint: Literal["off", "select", "guard"] = "off"
    #: rule 7: calibration samples of the joint runs (0: all of them), where the KL is read
    #: (``answer``: δ's positions; ``text``: every text position), and the quantizer of the
    #: joint runs (quantize-experts' method: what is deployed).
    joint_samples: int = 0
    joint_positions: Literal["answer", "text"] = "text"
    #: rule 7: how the calibration samples weigh in the joint KL (`modec.method.joint`).
    joint_weighting: Literal["positions", "balanced"] = "positions"
    #: rule 8: scale each layer's costs per width by its joint, deployed KL over Σ δ.
    calibrate_costs: bool = False
    quantizer: Literal["gptq", "rtn"] = "gptq"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadInputError(f"unknown --method {self.method!r}; choose from {list(METHODS)}")
        if self.joint not in ("off", "select", "guard"):
            raise BadInputError(f"--joint must be off, select or guard; got {self.joint!r}")
        if self.joint_samples < 0 or self.joint_samples == 1:
            raise BadInputError(
                f"joint_samples must be 0 (every calibration sample) or at least 2 (the check "
                f"judges two halves of them); got {self.joint_samples}"
            )
        if self.joint_positions not in ("answer", "text"):
            raise BadInputError(
                f"joint_positions must be answer or text; got {self.joint_positions!r}"
            )
        if self.joint_weighting not in ("positions", "balanced"):
            raise BadInputError(
                f"joint_weighting must be positions or balanced; got {self.joint_weighting!r}"
            )
        if self.quantizer not in ("gptq", "rtn"):
            raise BadInputError(f"quantizer must be gptq or rtn; got {self.quantizer!r}")
        if self.calibrate_costs and self.method != "uniform" \
                and self.method not in NEEDS_SENSITIVITY:  # fmt: skip
            raise BadInputError(
                f"--calibrate-costs scales the δ-based costs, and method {self.method!r} has "
                f"none; use it with {', '.join(sorted(NEEDS_SENSITIVITY))}, or drop it"
            )

    @property
    def _joint(self) -> bool:
        return self.joint != "off" and self.method != "uniform"

    @property
    def _calibrate(self) -> bool:
        return self.calibrate_costs and self.method != "uniform"

    @property
    def reads(self) -> tuple[type, ...]:  # type: ignore[override]
        if self.method == "uniform":  # no costs: only the expert counts
            return (CanonicalMoE, RoutingStats)
        base: tuple[type, ...] = (CanonicalMoE, RoutingStats, KeyVision)
        if self.method in NEEDS_OUTPUT_ERROR or self._joint or self._calibrate:
            base = (*base, Calibration)  # Hessians, or the joint runs
        return (*base, Sensitivity) if self.method in NEEDS_SENSITIVITY else base

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.method.allocate import (
            AllocationProblem,
            AllocationResult,
            layer_errors,
            layer_shapes,
            solve_allocation,
            uniform_allocation,
        )

        stats = ctx.facts.get(RoutingStats)
        sens = ctx.facts.find(Sensitivity) if self.method in NEEDS_SENSITIVITY else None
        if sens is not None and tuple(sens.bits) != tuple(self.bits):
            raise BadInputError(
                f"sensitivities were measured for widths {list(sens.bits)} but --bits is "
                f"{list(self.bits)}; measure them for the same widths"
            )
        problem = AllocationProblem(
            method=self.method, budget=self.budget, bits=tuple(self.bits),
            group_size=self.group_size, scope=self.scope, sense=self.sense,
            budget_bytes=self.budget_bytes, seed=ctx.options.seed,
        )  # fmt: skip
        section = ctx.section()
        if self.method == "uniform":
            if float(self.budget) != int(self.budget) or int(self.budget) not in self.bits:
                raise BadInputError(
                    f"--method uniform needs an integer --budget among --bits {list(self.bits)}; "
                    f"got {self.budget}"
                )
            alloc = uniform_allocation([len(f) for f in stats.f_text], problem)
        else:
            errs = None
            if self.method in NEEDS_OUTPUT_ERROR:
                from modec.method.hessians import layer_hessians

                o = ctx.options
                ds = ctx.facts.get(Calibration).data
                errs = []
                for _, hs, p in layer_hessians(
                    model, ds, batch_size=self.batch_size, threads=o.threads,
                    max_memory=o.max_memory, spill_dir=o.spill_dir,
                ):  # fmt: skip
                    errs.append(layer_errors(p, hs, problem.bits, problem.group_size))
                    del hs, p  # before the next layer's Hessians are built
            shapes, key = layer_shapes(model), ctx.facts.get(KeyVision)
            scale = None
            if self._calibrate:
                assert sens is not None
                scale, section["calibrated"] = self._calibrate_costs(model, ctx, sens)

            def solve(allowed: tuple[int, ...] | None = None) -> AllocationResult:
                return solve_allocation(shapes, stats, key, sens, problem, errs, ctx.engine,
                                        allowed, scale)  # fmt: skip

            if self._joint:
                res, section["joint"] = self._joint_select(model, ctx, solve)
            else:
                res = solve()
            alloc = res.allocation
            if res.veq_gamma is not None:
                section["veq_gamma"] = res.veq_gamma
            section["costs"] = [c.tolist() for c in res.costs]
            section["layers"] = res.solves
            if alloc.rounded:
                section["note"] = (
                    "n·budget was not an integer in some layer; the bit target was rounded down"
                )
        ctx.facts.put(alloc)
        section.update(
            method=alloc.method,
            budget=alloc.budget,
            bits=list(alloc.bits),
            widths=[list(w) for w in alloc.widths],
            average_bits=alloc.average,
            histogram={str(k): v for k, v in alloc.histogram().items()},
            objective=alloc.objective,
        )
        ctx.stat("average_bits", alloc.average)
        ctx.stat("solve_seconds", alloc.solve_seconds)
        return PassResult(model, modified=False)

    def _joint_runs(self, ctx: PassContext, positions: Literal["answer", "text"]
                    ) -> tuple[Any, Any, Any]:  # fmt: skip
        """What rules 7 and 8 run the model with: the calibration set, the probe settings
        (KL read at ``positions``) and the quantizer quantize-experts will use."""
        from modec.method.joint import JointQuantizer
        from modec.method.probes import ProbeSettings

        calib = ctx.facts.get(Calibration).data
        o = ctx.options
        settings = ProbeSettings(
            bits=tuple(self.bits), group_size=self.group_size, positions=positions,
            batch_size=32, threads=o.threads, max_memory=o.max_memory,
        )  # fmt: skip
        quantizer = JointQuantizer(self.quantizer, calib, self.batch_size, engine=ctx.engine)
        return calib, settings, quantizer

    def _calibrate_costs(self, model: ir.Model, ctx: PassContext, sens: Sensitivity
                         ) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        """Rule 8: the per-(layer, width) scale of the costs, on δ's samples."""
        import numpy as np

        from modec.method.joint import calibrate_costs

        if sens.subset is None:
            raise ValueError("calibrate_costs needs the samples δ was measured on "
                             "(Sensitivity.subset, set by measure-sensitivity)")  # fmt: skip
        _, settings, quantizer = self._joint_runs(ctx, sens.positions)
        scale, entry = calibrate_costs(model, sens, np.asarray(sens.subset, np.int64),
                                       settings, quantizer)  # fmt: skip
        ctx.stat("calibrate_seconds", entry["seconds"])
        return scale, entry

    def _joint_select(self, model: ir.Model, ctx: PassContext, solve: Any) -> tuple[Any, Any]:
        """Rule 7: the standing allocation (the narrowest range's; under ``guard`` uniform or
        the full range's) unless another is significantly closer."""
        from modec.method.joint import Rule, choose
        from modec.method.sensitivity import choose_subset

        calib, settings, quantizer = self._joint_runs(ctx, self.joint_positions)
        judged: Any = calib
        if self.joint_samples and self.joint_samples < len(calib):
            judged = choose_subset(calib.multimodal, self.joint_samples, ctx.options.seed)
        rule: Rule = "guard" if self.joint == "guard" else "select"
        res, entry = choose(model, judged, settings, solve, self.bits, quantizer,
                            self.joint_weighting, rule)  # fmt: skip
        ctx.stat("joint_seconds", entry["seconds"])
        return res, entry
