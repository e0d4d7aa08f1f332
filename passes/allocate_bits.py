"""allocate-bits: one width per expert from an integer linear program (python-mip).

Reads: ``moe.canonical``, ``routing.stats``, and ``sensitivity`` for the methods that use
KL sensitivities. Writes: ``allocation`` (``ctx.artifacts["allocation"]``: `BitAllocation`).
Modifies: nothing.

Rules:
1. The cost of expert e at width b comes from the importance signal of ``method``
   (`modec.numerics.importance`): MODE's Σ_M f_M(e)·δ_M(e,b) by default.
2. ``scope=layer`` (the paper) solves one ILP per layer with Σ_e b_e = ⌊n·budget⌋
   (``sense=eq``) or ≤ (``sense=le``); ``scope=global`` solves one ILP over all experts.
3. ``budget_bytes`` > 0 replaces the average-bit budget by a byte budget over all experts
   that counts codes, scales and zero points.
4. ``method=uniform`` solves nothing: every expert gets the budget width, which must then be
   an integer among ``bits``.
5. Deterministic: one solver thread and a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from modec.errors import BadInputError
from modec.numerics.importance import METHODS, NEEDS_SENSITIVITY, LayerSignals, layer_cost
from modec.pipeline import Pass, PassContext, PassResult, register


@dataclass(frozen=True)
class BitAllocation:
    """The chosen width of every expert, and how it was chosen."""

    method: str
    bits: tuple[int, ...]
    budget: float
    widths: tuple[tuple[int, ...], ...]  # [layer][expert]
    objective: float
    status: str
    solve_seconds: float
    rounded: bool

    def histogram(self) -> dict[int, int]:
        flat = [w for layer in self.widths for w in layer]
        return {b: flat.count(b) for b in sorted(set(flat))}

    @property
    def average(self) -> float:
        flat = [w for layer in self.widths for w in layer]
        return float(np.mean(flat))


def layer_signals(stats: Any, sens: Any, layer: int, err: np.ndarray) -> LayerSignals:
    """Collect one layer's signals from the routing statistics and sensitivities."""
    f64 = np.float64
    return LayerSignals(
        f_text=np.asarray(stats.f_text[layer], f64),
        f_key=np.asarray(stats.f_vision[layer], f64),
        f_vision=np.asarray(stats.f_vision_all[layer], f64),
        f_redundant=np.asarray(stats.f_redundant[layer], f64),
        f_global=np.asarray(stats.f_global[layer], f64),
        n_text=np.asarray(stats.count_text[layer], f64),
        n_vision=np.asarray(stats.count_vision[layer], f64),
        mean_weight=np.asarray(stats.mean_weight[layer], f64),
        err=err,
        delta_text=None if sens is None else np.asarray(sens.delta_text[layer], f64),
        delta_vision=None if sens is None else np.asarray(sens.delta_vision[layer], f64),
    )


def expert_errors(
    model: ir.Model, stats: Any, bits: tuple[int, ...], group_size: int
) -> list[np.ndarray]:
    """Per layer, each expert's RTN output error at each width [E, J] (gate + up + down)."""
    from modec.moe.canonical import is_moe_node
    from modec.moe.reference import MoEParams
    from modec.numerics.importance import output_error

    out = []
    nodes = [n for n in model.graph if is_moe_node(n)]
    for layer, node in enumerate(nodes):
        p = MoEParams.from_node(node)
        e_count = p.num_experts
        err = np.zeros((e_count, len(bits)))
        for e in range(e_count):
            n_tok = int(stats.tokens[layer][e])
            h_in = stats.hessian_in[layer][e]
            h_act = stats.hessian_act[layer][e]
            for w, h in ((p.gate, h_in), (p.up, h_in), (p.down, h_act)):
                if w is not None:
                    err[e] += output_error(w[e], h, n_tok, bits, group_size)
        out.append(err)
    return out


@register
@dataclass
class AllocateBitsPass(Pass):
    """Choose every expert's width; see the module docstring."""

    name = "allocate-bits"
    writes = ("allocation",)
    budget: float = 3.0
    bits: tuple[int, ...] = (2, 3, 4)
    method: str = "mode"
    scope: Literal["layer", "global"] = "layer"
    sense: Literal["eq", "le"] = "eq"
    budget_bytes: int = 0
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadInputError(f"unknown --method {self.method!r}; choose from {list(METHODS)}")

    @property
    def reads(self) -> tuple[str, ...]:  # type: ignore[override]
        base = ("moe.canonical", "routing.stats")
        return (*base, "sensitivity") if self.method in NEEDS_SENSITIVITY else base

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.numerics import ilp

        stats = ctx.artifacts["routing.stats"]
        sens = ctx.artifacts.get("sensitivity")
        if sens is not None and tuple(sens.bits) != tuple(self.bits):
            raise BadInputError(
                f"sensitivities were measured for widths {list(sens.bits)} but --bits is "
                f"{list(self.bits)}; measure them for the same widths"
            )
        n_layers = len(stats.f_text)
        experts = [len(f) for f in stats.f_text]
        section = ctx.section()
        if self.method == "uniform":
            if float(self.budget) != int(self.budget) or int(self.budget) not in self.bits:
                raise BadInputError(
                    f"--method uniform needs an integer --budget among --bits {list(self.bits)}; "
                    f"got {self.budget}"
                )
            widths = tuple(tuple([int(self.budget)] * n) for n in experts)
            alloc = BitAllocation(
                "uniform", self.bits, self.budget, widths, 0.0, "not solved", 0.0, False
            )
        else:
            errs = expert_errors(model, stats, self.bits, self.group_size)
            signals = [layer_signals(stats, sens, i, errs[i]) for i in range(n_layers)]
            gamma = 1.0
            if self.method == "veq-me":
                from modec.numerics.importance import veq_gamma

                gamma = veq_gamma(signals)
                section["veq_gamma"] = gamma
            costs = [layer_cost(self.method, s, gamma) for s in signals]
            section["costs"] = [c.tolist() for c in costs]
            opts = ilp.SolverOptions(seed=int(ctx.options.get("seed", 0)))
            if self.budget_bytes > 0:
                nbytes = [
                    np.stack([ilp.expert_nbytes(_shapes(model, i), self.bits, self.group_size)
                              for _ in range(experts[i])])
                    for i in range(n_layers)
                ]  # fmt: skip
                sols = [
                    ilp.allocate_bytes(costs, self.bits, nbytes, self.budget_bytes, options=opts)
                ]
            elif self.scope == "global":
                sols = [
                    ilp.allocate_bits_global(
                        costs, self.bits, self.budget, sense=self.sense, options=opts
                    )
                ]
            else:
                sols = list(
                    ilp.allocate_bits_per_layer(
                        costs, self.bits, self.budget, sense=self.sense, options=opts
                    )
                )
            widths = tuple(tuple(int(w) for w in layer) for s in sols for layer in s.per_layer())
            alloc = BitAllocation(
                method=self.method,
                bits=self.bits,
                budget=self.budget,
                widths=widths,
                objective=float(sum(s.objective for s in sols)),
                status=",".join(sorted({str(s.status) for s in sols})),
                solve_seconds=float(sum(s.solve_time_s for s in sols)),
                rounded=any(s.rounded for s in sols),
            )
            section["layers"] = [
                {
                    "status": str(s.status),
                    "objective": s.objective,
                    "gap": s.gap,
                    "solve_seconds": s.solve_time_s,
                    "rounded": s.rounded,
                    "target": s.target,
                }
                for s in sols
            ]
            if alloc.rounded:
                section["note"] = (
                    "n·budget was not an integer in some layer; the bit target was rounded down"
                )
        ctx.artifacts["allocation"] = alloc
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


def _shapes(model: ir.Model, layer: int) -> list[tuple[int, int]]:
    """[N, K] of each projection of one expert of MoE layer ``layer``."""
    from modec.moe.canonical import is_moe_node
    from modec.moe.reference import MoEParams

    node = [n for n in model.graph if is_moe_node(n)][layer]
    p = MoEParams.from_node(node)
    return [tuple(w.shape[1:]) for w in (p.gate, p.up, p.down) if w is not None]
