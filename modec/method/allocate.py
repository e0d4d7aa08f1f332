"""Step 4 of MODE: one width per expert from an integer linear program (arXiv 2606.17118).

Per layer (the paper) or over all layers: minimise Σ_e Σ_b cost[e, b]·x[e, b] with one width
per expert and the average width equal to the budget. ``cost`` is the importance signal of
the method (`modec.numerics.importance.layer_cost`): MODE's f_text·δ_text + f_key·δ_vision
by default. The solver is `modec.numerics.ilp` (python-mip, one thread, fixed seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from modec.distributed import Engine, SerialEngine
from modec.facts import BitAllocation, KeyVision, RoutingStats, Sensitivity
from modec.numerics.importance import LayerSignals, layer_cost, output_error, veq_gamma


def layer_signals(
    stats: RoutingStats, key: KeyVision, sens: Sensitivity | None, layer: int, err: np.ndarray
) -> LayerSignals:
    """One layer's signals: frequencies per modality (key vision from select-key-vision), δ."""
    f64 = np.float64
    return LayerSignals(
        f_text=np.asarray(stats.f_text[layer], f64),
        f_key=np.asarray(key.f_key[layer], f64),
        f_vision=np.asarray(stats.f_vision[layer], f64),
        f_redundant=np.asarray(key.f_redundant[layer], f64),
        f_global=np.asarray(stats.f_global[layer], f64),
        n_text=np.asarray(stats.count_text[layer], f64),
        n_vision=np.asarray(stats.count_vision[layer], f64),
        mean_weight=np.asarray(stats.mean_weight[layer], f64),
        err=err,
        delta_text=None if sens is None else np.asarray(sens.delta_text[layer], f64),
        delta_vision=None if sens is None else np.asarray(sens.delta_vision[layer], f64),
    )


@dataclass(frozen=True)
class LayerShape:
    """What the ILP needs of a layer's experts without reading them: count and [N, K]s."""

    num_experts: int
    projections: tuple[tuple[int, int], ...]


def layer_shapes(model: ir.Model) -> list[LayerShape]:
    """`LayerShape` of every canonical MoE node, in execution order (from value shapes)."""
    from modec.method.quantize import expert_weights
    from modec.moe.canonical import is_moe_node

    out = []
    for n in model.graph:
        if not is_moe_node(n):
            continue
        projs = []
        for proj in ("gate", "up", "down"):
            v = expert_weights(n).get(proj)
            if v is not None and v.const_value is not None:
                _, rows, cols = v.const_value.shape.numpy()
                projs.append((int(rows), int(cols)))
        out.append(LayerShape(int(n.attributes["num_experts"].value), tuple(projs)))
    return out


def layer_errors(p: Any, hs: Any, bits: tuple[int, ...], group_size: int) -> np.ndarray:
    """One layer's RTN output error of each expert at each width ``[E, J]`` (gate + up +
    down), from its `MoEParams` and `modec.method.quantize.LayerHessians`."""
    err = np.zeros((p.num_experts, len(bits)))
    for e in range(p.num_experts):
        n_tok = int(hs.tokens[e])
        for w, h in ((p.gate, hs.h_in), (p.up, hs.h_in), (p.down, hs.h_act)):
            if w is not None:
                err[e] += output_error(w[e], h[e], n_tok, bits, group_size)
    return err


@dataclass(frozen=True)
class AllocationProblem:
    """What allocate-bits solves (its options)."""

    method: str
    budget: float
    bits: tuple[int, ...]
    group_size: int
    scope: Literal["layer", "global"] = "layer"
    sense: Literal["eq", "le"] = "eq"
    budget_bytes: int = 0
    seed: int = 0


@dataclass(frozen=True)
class AllocationResult:
    """The allocation and what the report shows of how it was found."""

    allocation: BitAllocation
    costs: list[np.ndarray]
    solves: list[dict[str, Any]]
    veq_gamma: float | None


def uniform_allocation(experts: list[int], pr: AllocationProblem) -> BitAllocation:
    """Every expert at the budget width (``method=uniform``: no ILP)."""
    widths = tuple(tuple([int(pr.budget)] * n) for n in experts)
    return BitAllocation(
        "uniform", pr.bits, pr.budget, pr.group_size, widths, 0.0, "not solved", 0.0, False
    )


def solve_allocation(
    shapes: list[LayerShape],
    stats: RoutingStats,
    key: KeyVision,
    sens: Sensitivity | None,
    pr: AllocationProblem,
    errs: list[np.ndarray] | None = None,
    engine: Engine | None = None,
    allowed: tuple[int, ...] | None = None,
    scale: np.ndarray | None = None,
) -> AllocationResult:
    """Costs per layer from the method's importance signal, then the ILP.

    ``errs`` (`layer_errors` of every layer) is needed by the methods that price an
    expert's own output error (`modec.numerics.importance.NEEDS_OUTPUT_ERROR`). The
    per-layer solves (``scope=layer``) are tasks of ``engine`` (default: in this process),
    one per layer, gathered in layer order: one solver thread and a fixed seed each, so the
    widths do not depend on the engine. ``allowed`` (a subset of ``pr.bits``) restricts the
    widths the ILP may choose (the joint check's candidates, `modec.method.joint`); the
    costs stay those of every width of ``pr.bits``. ``scale`` (``[L, len(pr.bits)]``)
    multiplies every cost of layer l at width b by ``scale[l, b]``: the calibrated costs of
    `modec.method.joint.calibrate_costs`.
    """
    from modec.numerics import ilp
    from modec.numerics.importance import NEEDS_OUTPUT_ERROR

    if errs is None:
        if pr.method in NEEDS_OUTPUT_ERROR:
            raise ValueError(f"method {pr.method!r} needs the experts' output errors")
        errs = [np.zeros((s.num_experts, len(pr.bits))) for s in shapes]
    signals = [layer_signals(stats, key, sens, i, errs[i]) for i in range(len(shapes))]
    gamma = veq_gamma(signals) if pr.method == "veq-me" else None
    costs = [layer_cost(pr.method, s, 1.0 if gamma is None else gamma) for s in signals]
    if scale is not None:
        if np.shape(scale) != (len(shapes), len(pr.bits)):
            raise ValueError(f"cost scale of shape {np.shape(scale)}, want "
                             f"{(len(shapes), len(pr.bits))}")  # fmt: skip
        costs = [c * np.asarray(scale[i])[None, :] for i, c in enumerate(costs)]
    bits = pr.bits if allowed is None else tuple(allowed)
    if not set(bits) <= set(pr.bits):
        raise ValueError(f"allowed widths {list(bits)} are not among {list(pr.bits)}")
    cols = [pr.bits.index(b) for b in bits]
    use = [c[:, cols] for c in costs]
    opts = ilp.SolverOptions(seed=pr.seed)
    if pr.budget_bytes > 0:
        nbytes = [
            np.stack(
                [ilp.expert_nbytes(list(s.projections), bits, pr.group_size)
                 for _ in range(s.num_experts)]
            )
            for s in shapes
        ]  # fmt: skip
        sols = [ilp.allocate_bytes(use, bits, nbytes, pr.budget_bytes, options=opts)]
    elif pr.scope == "global":
        sols = [ilp.allocate_bits_global(use, bits, pr.budget, sense=pr.sense, options=opts)]
    else:  # one task per layer, in layer order: the same widths on every engine
        sols = (engine or SerialEngine()).map(
            _solve_layer, list(enumerate(use)), bits, pr.budget, pr.sense, opts,
            label="ILP per layer",
        )  # fmt: skip
    widths = tuple(tuple(int(w) for w in layer) for s in sols for layer in s.per_layer())
    alloc = BitAllocation(
        method=pr.method,
        bits=pr.bits,
        budget=pr.budget,
        group_size=pr.group_size,
        widths=widths,
        objective=float(sum(s.objective for s in sols)),
        status=",".join(sorted({str(s.status) for s in sols})),
        solve_seconds=float(sum(s.solve_time_s for s in sols)),
        rounded=any(s.rounded for s in sols),
    )
    solves = [
        {"status": str(s.status), "objective": s.objective, "gap": s.gap,
         "solve_seconds": s.solve_time_s, "rounded": s.rounded, "target": s.target}
        for s in sols
    ]  # fmt: skip
    return AllocationResult(alloc, costs, solves, gamma)


def _solve_layer(
    item: tuple[int, np.ndarray], bits: tuple[int, ...], budget: float,
    sense: Literal["eq", "le"], options: Any,
) -> Any:  # fmt: skip
    """One layer's ILP (an engine task): `ilp.allocate_layer`."""
    from modec.numerics import ilp

    i, cost = item
    return ilp.allocate_layer(i, cost, bits, budget, sense=sense, options=options)
