"""Per-expert bit allocation as an integer linear program (MODE), solved with python-mip/CBC.

MODE chooses one code width b for every expert e of a layer by minimising the summed
importance-weighted sensitivity

    min  Σ_e Σ_j cost[e, j] · x[e, j]
    s.t. Σ_j x[e, j] = 1                          (one width per expert)
         Σ_e Σ_j bits[j] · x[e, j] = ⌊n · k⌋      (the layer's bit budget, k = average bits)
         x[e, j] ∈ {0, 1}

where cost[e, j] = Σ_M f_M(e) · δ_M(e, bits[j]) is already combined by the caller (see
`modec.numerics.importance.layer_cost`). The budget row is an equality in the MODE paper;
this module also offers `sense="le"`, a global variant with one budget over all experts of
all layers, and a budget in bytes (codes + scales + zeros) with a `≤` row.

The budget arithmetic lives in `modec.numerics.budget`: every infeasible budget is rejected
there, before the solver runs, with an `InfeasibleBudgetError` whose one-line message names
the feasible range and the fix. `check_budget` and `expert_nbytes` are re-exported here.

Determinism: CBC runs single-threaded with a fixed seed, and interchangeable experts get
their widths in a canonical order (see `SolverOptions`). This is the only module
that imports python-mip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import mip
import numpy as np
import numpy.typing as npt

from modec.errors import BadInputError, InfeasibleBudgetError, ModecError
from modec.numerics.allocation import Allocation, Status
from modec.numerics.budget import (
    DEFAULT_BITS,
    Sense,
    check_average_budget,
    check_bits_feasible,
    check_budget,
    check_byte_budget,
    check_costs,
    check_widths,
    expert_nbytes,
    floor_target,
)

__all__ = [
    "Allocation",
    "IlpSolverError",
    "SolverOptions",
    "allocate_bits",
    "allocate_bits_global",
    "allocate_bits_per_layer",
    "allocate_bytes",
    "allocate_layer",
    "check_budget",
    "expert_nbytes",
]

logger = logging.getLogger(__name__)

# Objective scale handed to CBC, see `_solve`.
_OBJ_SCALE = 1e6


class IlpSolverError(ModecError):
    """CBC returned no usable solution for a budget that the pre-check found feasible.

    Defined here rather than in `modec.errors` (owned elsewhere). A time-out without an
    incumbent is the realistic cause; the message says to raise the time limit.
    """


@dataclass(frozen=True)
class SolverOptions:
    """Knobs of the CBC solve. The defaults give exact, reproducible allocations.

    Attributes:
        seed: CBC random seed, fixed for reproducibility.
        threads: CBC threads; 1 keeps the search order deterministic.
        max_seconds: wall-clock limit per solve. If it is hit with an incumbent, the result
            has `status="feasible"` and a non-zero `gap`.
        max_mip_gap: relative optimality gap at which CBC stops. 0 means prove optimality;
            a paper-scale layer (128 experts x 3 widths) solves in ~10 ms anyway.
        cuts: CBC cut generation (-1 automatic, 0 off, 1-3 more aggressive). Off by
            default: one budget row over one-of-J choices has an LP relaxation with at most
            two fractional variables, so branching alone closes it, ~30% faster than with
            cuts on the benchmark in docs/performance_ilp.md.
        preprocess: CBC preprocessing (-1 automatic, 0 off, 1 on); off for the same reason.

    Ties: experts with identical cost (and byte) rows are interchangeable, so after the
    solve their widths are sorted, larger widths to lower expert indices. This makes the
    allocation independent of the order in which CBC happens to visit such experts (e.g.
    experts that were never routed, whose costs are all 0). A perturbation of the costs
    ("epsilon on the width index") was tried and rejected: in our trials perturbations
    small enough not to change the optimum fell below CBC's tolerances and had no effect.
    """

    seed: int = 0
    threads: int = 1
    max_seconds: float = 60.0
    max_mip_gap: float = 0.0
    cuts: int = 0
    preprocess: int = 0


# --------------------------------------------------------------------------------------
# The solve
# --------------------------------------------------------------------------------------


def _solve(
    cost: npt.NDArray[np.float64],
    weight: npt.NDArray[np.int64],
    target: int,
    sense: Sense,
    options: SolverOptions,
) -> tuple[npt.NDArray[np.int64], Status, float, float]:
    """Solve min Σ cost·x s.t. one choice per row, Σ weight·x (= or ≤) target.

    Returns the chosen column per row, the status, CBC's gap and the elapsed seconds.
    """
    t0 = time.perf_counter()
    n, J = cost.shape
    # CBC prunes with absolute tolerances (measured: it returned "optimal" allocations up to
    # 8e-5 worse than an exact DP when max |cost| was 1, and KL sensitivities can be ~1e-6),
    # so the objective is rescaled to max |cost| = 1e6 before it reaches CBC; at that scale
    # its answers matched the exact DP on every layer we tried.
    obj = cost * (_OBJ_SCALE / (float(np.abs(cost).max()) or 1.0))

    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = options.threads
    m.seed = options.seed
    m.max_mip_gap = options.max_mip_gap
    m.max_mip_gap_abs = 0.0 if options.max_mip_gap == 0 else m.max_mip_gap_abs
    m.cuts = options.cuts
    m.preprocess = options.preprocess
    # Objective coefficients go in with the variables and rows are built as LinExpr from
    # lists: ~3x faster than xsum over products at 128 x 3 variables per layer.
    x = [m.add_var(var_type=mip.BINARY, obj=c) for c in obj.ravel().tolist()]
    ones = [1.0] * J
    for e in range(n):
        m += mip.LinExpr(variables=x[e * J : (e + 1) * J], coeffs=ones) == 1
    budget_row = mip.LinExpr(variables=x, coeffs=[float(w) for w in weight.ravel().tolist()])
    if sense == "eq":
        m += budget_row == target
    else:
        m += budget_row <= target
    status = m.optimize(max_seconds=options.max_seconds)
    elapsed = time.perf_counter() - t0

    if status == mip.OptimizationStatus.OPTIMAL:
        st: Status = "optimal"
    elif status == mip.OptimizationStatus.FEASIBLE:
        st = "feasible"
        logger.warning(
            "bit-allocation ILP stopped at the time limit (%.1f s) with gap %.3g; the "
            "allocation is feasible but may not be optimal: raise max_seconds",
            options.max_seconds,
            m.gap,
        )
    elif status == mip.OptimizationStatus.INFEASIBLE:
        # The pre-check is exact, so this is a bug, not a user error.
        raise IlpSolverError(
            f"CBC reports the budget row ({sense} {target}) infeasible although the pre-check "
            "passed; please report this with the cost matrix"
        )
    else:
        raise IlpSolverError(
            f"CBC found no allocation within {options.max_seconds} s (status {status.name}); "
            "raise max_seconds or use the per-layer variant"
        )
    sol = np.array([v.x for v in x], dtype=np.float64).reshape(n, J)
    choice = sol.argmax(axis=1).astype(np.int64)
    if not np.allclose(sol.sum(axis=1), 1.0, atol=1e-6) or not np.allclose(
        sol[np.arange(n), choice], 1.0, atol=1e-6
    ):
        raise IlpSolverError("CBC returned a fractional assignment; please report this")
    used = int(weight[np.arange(n), choice].sum())
    if used > target or (sense == "eq" and used != target):
        raise IlpSolverError(
            f"CBC returned an allocation using {used} for a budget row {sense} {target}; "
            "please report this with the cost matrix"
        )
    gap = 0.0 if st == "optimal" else float(m.gap)
    return _canonical_ties(choice, cost, weight), st, gap, elapsed


def _canonical_ties(
    choice: npt.NDArray[np.int64], cost: npt.NDArray[np.float64], weight: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Sort the choices within each group of identical (cost, weight) rows.

    Permuting choices among identical rows changes neither the objective nor the budget
    row, so this keeps optimality and feasibility. Within a group the heavier choice
    (more bits or bytes) goes to the lower row index.
    """
    rows = np.concatenate([cost, weight.astype(np.float64)], axis=1)
    _, group = np.unique(rows, axis=0, return_inverse=True)
    group = group.reshape(-1)
    out = choice.copy()
    for g in np.unique(group[np.bincount(group)[group] > 1]):
        idx = np.flatnonzero(group == g)  # ascending expert index
        w = weight[idx, choice[idx]]
        order = np.argsort(-w, kind="stable")
        out[idx] = choice[idx][order]
    return out


def _allocate_average(
    costs: npt.ArrayLike | Sequence[npt.ArrayLike],
    bits: Sequence[int],
    budget: float,
    sense: Sense,
    options: SolverOptions,
) -> Allocation:
    if sense not in ("eq", "le"):
        raise BadInputError(f"--sense must be 'eq' or 'le'; got {sense!r}")
    b = check_widths(bits)
    cost, sizes = check_costs(costs, b.size)
    k = check_average_budget(budget)
    n = cost.shape[0]
    target, rounded = floor_target(n, k)
    check_bits_feasible(k, n, b, sense, target)
    if rounded:
        logger.info(
            "budget %g bits x %d experts = %g; target rounded down to %d", k, n, n * k, target
        )
    weight = np.broadcast_to(b, cost.shape).astype(np.int64)
    choice, st, gap, elapsed = _solve(cost, weight, target, sense, options)
    return Allocation.from_choice(
        choice, cost, b, sizes, st, gap, elapsed,
        unit="bits", sense=sense, target=target, rounded=rounded,
    )  # fmt: skip


def allocate_bits(
    cost: npt.ArrayLike,
    bits: Sequence[int] = DEFAULT_BITS,
    budget: float = 3.0,
    *,
    sense: Sense = "eq",
    options: SolverOptions | None = None,
) -> Allocation:
    """Allocate one width per expert of ONE layer under an average-bit budget (MODE).

    Args:
        cost: importance matrix [n, J]; cost[e, j] is the loss of expert e at bits[j].
        bits: candidate widths (default 2, 3, 4; each from `budget.ALLOWED_BITS`).
        budget: average bits per expert k; the budget row is Σ b·x = ⌊n·k⌋ (`sense="eq"`,
            the paper) or ≤ (`sense="le"`).
        sense: "eq" or "le".
        options: solver options; defaults are exact and deterministic.

    Returns:
        The Allocation; `rounded` records whether n·k had to be floored.

    Raises:
        BadInputError: unknown widths, malformed costs or budget.
        InfeasibleBudgetError: no allocation meets the budget (checked before solving).
        IlpSolverError: CBC found no solution within the time limit.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise BadInputError(f"cost must be a 2-D [experts, widths] matrix; got shape {c.shape}")
    return _allocate_average([c], bits, budget, sense, options or SolverOptions())


def allocate_bits_per_layer(
    costs: Sequence[npt.ArrayLike],
    bits: Sequence[int] = DEFAULT_BITS,
    budget: float = 3.0,
    *,
    sense: Sense = "eq",
    options: SolverOptions | None = None,
) -> tuple[Allocation, ...]:
    """Run `allocate_bits` on every layer with the same average budget (the MODE setting).

    Args:
        costs: one importance matrix [n_l, J] per layer.
        bits: candidate widths.
        budget: average bits per expert, applied to each layer separately.
        sense: "eq" or "le".
        options: solver options.

    Returns:
        One Allocation per layer.

    Raises:
        InfeasibleBudgetError: for the first layer whose budget is infeasible; the message
            is prefixed with the layer index.
    """
    return tuple(
        allocate_layer(i, c, bits, budget, sense=sense, options=options)
        for i, c in enumerate(costs)
    )


def allocate_layer(
    index: int,
    cost: npt.ArrayLike,
    bits: Sequence[int] = DEFAULT_BITS,
    budget: float = 3.0,
    *,
    sense: Sense = "eq",
    options: SolverOptions | None = None,
) -> Allocation:
    """`allocate_bits` for layer ``index`` of `allocate_bits_per_layer` (alone: one task of a
    distributed compile); an infeasible budget's message is prefixed with the layer."""
    try:
        return allocate_bits(cost, bits, budget, sense=sense, options=options)
    except InfeasibleBudgetError as exc:
        raise InfeasibleBudgetError(f"layer {index}: {exc}") from exc


def allocate_bits_global(
    costs: Sequence[npt.ArrayLike],
    bits: Sequence[int] = DEFAULT_BITS,
    budget: float = 3.0,
    *,
    sense: Sense = "eq",
    options: SolverOptions | None = None,
) -> Allocation:
    """Allocate widths for all experts of all layers under ONE average-bit budget.

    Unlike the per-layer MODE setting, a layer whose experts matter less may give bits to
    another layer. The budget row is Σ_all b·x (= or ≤) ⌊N·k⌋ with N the total expert count.

    Args:
        costs: one importance matrix [n_l, J] per layer (layers may differ in n_l). The
            costs of different layers must be on a common scale (e.g. end-to-end KL).
        bits: candidate widths.
        budget: average bits per expert over the whole model.
        sense: "eq" or "le".
        options: solver options.

    Returns:
        One Allocation whose `layer_sizes` splits it per layer (`per_layer()`).
    """
    return _allocate_average(list(costs), bits, budget, sense, options or SolverOptions())


def allocate_bytes(
    costs: npt.ArrayLike | Sequence[npt.ArrayLike],
    bits: Sequence[int],
    expert_bytes: npt.ArrayLike | Sequence[npt.ArrayLike],
    budget_bytes: int,
    *,
    options: SolverOptions | None = None,
) -> Allocation:
    """Allocate widths under a budget in BYTES that counts codes, scales and zeros.

    The budget row is Σ_e Σ_j bytes[e, j] · x[e, j] ≤ budget_bytes. Pass one layer's
    [n, J] matrices for a per-layer budget or lists of them (one per layer) for a global one.

    Args:
        costs: importance matrix [n, J], or a sequence of them (one per layer).
        bits: candidate widths (columns of costs).
        expert_bytes: storage of each expert at each width, [n, J] or [J] (same for all
            experts), or a sequence matching `costs`; see `expert_nbytes`.
        budget_bytes: the byte budget.
        options: solver options.

    Returns:
        The Allocation with `budget_unit="bytes"`, `sense="le"` and `total_bytes` set.

    Raises:
        InfeasibleBudgetError: when even the smallest width for every expert exceeds the
            budget (checked before solving).
    """
    b = check_widths(bits)
    cost, sizes = check_costs(costs, b.size)
    nb, target = check_byte_budget(expert_bytes, b, sizes, budget_bytes)
    choice, st, gap, elapsed = _solve(cost, nb, target, "le", options or SolverOptions())
    return Allocation.from_choice(
        choice, cost, b, sizes, st, gap, elapsed,
        unit="bytes", sense="le", target=target, rounded=target != float(budget_bytes), nbytes=nb,
    )  # fmt: skip
