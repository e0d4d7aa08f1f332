"""Per-expert bit allocation as an integer linear program (MODE), solved with python-mip/CBC.

MODE chooses one code width b for every expert e of a layer by minimising the summed
importance-weighted sensitivity

    min  Σ_e Σ_j cost[e, j] · x[e, j]
    s.t. Σ_j x[e, j] = 1                          (one width per expert)
         Σ_e Σ_j bits[j] · x[e, j] = ⌊n · k⌋      (the layer's bit budget, k = average bits)
         x[e, j] ∈ {0, 1}

where cost[e, j] = Σ_M f_M(e) · δ_M(e, bits[j]) is already combined by the caller (see
`combine_importance`). The budget row is an equality in the MODE paper; this module also
offers `sense="le"`, a global variant with one budget over all experts of all layers, and a
budget in bytes (codes + scales + zeros) with a `≤` row.

Every infeasible budget is rejected before the solver runs with an `InfeasibleBudgetError`
whose one-line message names the feasible range and the fix.

Determinism: CBC runs single-threaded with a fixed seed, and interchangeable experts get
their widths in a canonical order (see `SolverOptions`). This is the only module
that imports python-mip.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import mip
import numpy as np
import numpy.typing as npt

from modec.errors import BadInputError, InfeasibleBudgetError, ModecError
from modec.numerics.schemes import QuantScheme

__all__ = [
    "ALLOWED_BITS",
    "DEFAULT_BITS",
    "Allocation",
    "IlpSolverError",
    "Sense",
    "SolverOptions",
    "allocate_bits",
    "allocate_bits_global",
    "allocate_bits_per_layer",
    "allocate_bytes",
    "combine_importance",
    "expert_nbytes",
    "reachable_totals",
]

logger = logging.getLogger(__name__)

#: Candidate widths a user may ask for. 2/3/4 are MODE's default candidates; 1 and 8 are
#: allowed too. 5-7 pack (see `schemes.SUPPORTED_BITS`) but have no scheduled kernel, so
#: allocating them would produce an artifact we cannot run.
ALLOWED_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
DEFAULT_BITS: tuple[int, ...] = (2, 3, 4)

Sense = Literal["eq", "le"]
Status = Literal["optimal", "feasible"]

# n·k within this distance of an integer counts as that integer (2.3 · 10 = 22.999999999999996
# must give 23, not 22).
_INT_TOL = 1e-9
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


@dataclass(frozen=True)
class Allocation:
    """The result of one solve.

    Attributes:
        widths: chosen width per expert, flattened over `layer_sizes` (layer 0's experts
            first). Use `per_layer()` to split it.
        layer_sizes: experts per layer; one entry for a per-layer solve.
        status: "optimal", or "feasible" when the time limit stopped CBC with an incumbent.
        objective: Σ_e cost[e, width(e)] with the costs as given (not CBC's rescaled ones).
        gap: CBC's relative gap between incumbent and bound (0 when proven optimal).
        solve_time_s: wall time of model build plus solve; excluded from equality.
        total_bits: Σ_e width(e).
        total_bytes: Σ_e bytes[e, width(e)] for a byte budget, else None.
        budget_unit: "bits" (average-bit budget) or "bytes".
        sense: "eq" or "le", the relation of the budget row.
        target: right-hand side of the budget row (⌊n·k⌋ bits, or bytes).
        rounded: True when n·k was not an integer and the target is its floor.
    """

    widths: tuple[int, ...]
    layer_sizes: tuple[int, ...]
    status: Status
    objective: float
    gap: float
    solve_time_s: float = field(compare=False)
    total_bits: int
    total_bytes: int | None
    budget_unit: Literal["bits", "bytes"]
    sense: Sense
    target: int
    rounded: bool

    def per_layer(self) -> tuple[tuple[int, ...], ...]:
        """Split `widths` into one tuple per layer."""
        out: list[tuple[int, ...]] = []
        start = 0
        for size in self.layer_sizes:
            out.append(self.widths[start : start + size])
            start += size
        return tuple(out)

    @property
    def average_bits(self) -> float:
        """Mean width over all experts."""
        return self.total_bits / len(self.widths)


# --------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------


def combine_importance(
    freq: Mapping[str, npt.ArrayLike], delta: Mapping[str, npt.ArrayLike]
) -> npt.NDArray[np.float64]:
    """Combine per-modality routing frequency and sensitivity into the ILP cost (MODE).

    cost[e, j] = Σ_M f_M(e) · δ_M(e, bits[j]).

    Args:
        freq: modality name → routing frequency per expert, shape [n].
        delta: modality name → sensitivity per expert and candidate width, shape [n, J].

    Returns:
        The cost matrix [n, J] in float64.

    Raises:
        BadInputError: when the modalities or shapes do not match.
    """
    if set(freq) != set(delta) or not freq:
        raise BadInputError(
            f"frequency modalities {sorted(freq)} and sensitivity modalities {sorted(delta)} "
            "must be the same non-empty set"
        )
    total: npt.NDArray[np.float64] | None = None
    for m in sorted(freq):
        f = np.asarray(freq[m], dtype=np.float64)
        d = np.asarray(delta[m], dtype=np.float64)
        if f.ndim != 1 or d.ndim != 2 or d.shape[0] != f.shape[0]:
            raise BadInputError(
                f"modality {m!r}: frequency must be [n] and sensitivity [n, J]; got "
                f"{f.shape} and {d.shape}"
            )
        term = f[:, None] * d
        if total is not None and total.shape != term.shape:
            raise BadInputError(
                f"modality {m!r}: sensitivity shape {d.shape} differs from the other "
                f"modalities' {total.shape}"
            )
        total = term if total is None else total + term
    assert total is not None
    return total


def expert_nbytes(
    shapes: Sequence[tuple[int, int]], bits: Sequence[int], group_size: int = 128
) -> npt.NDArray[np.int64]:
    """Bytes of one expert at each candidate width: codes + scales + zeros of its projections.

    Args:
        shapes: the [N, K] shape of each projection of the expert (e.g. gate_up, down).
        bits: candidate widths.
        group_size: quantization group size along K.

    Returns:
        int64 array [J] with the expert's storage at each width (`QuantScheme.nbytes`).
    """
    out = np.zeros(len(bits), dtype=np.int64)
    for j, b in enumerate(bits):
        s = QuantScheme(int(b), group_size)
        out[j] = sum(sum(s.nbytes(n, k).values()) for n, k in shapes)
    return out


def _check_bits(bits: Sequence[int]) -> npt.NDArray[np.int64]:
    arr = np.asarray(list(bits))
    if arr.ndim != 1 or arr.size == 0:
        raise BadInputError(f"--bits must be a non-empty list of widths from {list(ALLOWED_BITS)}")
    bad = [b for b in arr.tolist() if b not in ALLOWED_BITS]
    if bad:
        raise BadInputError(
            f"unknown candidate width(s) {bad} in --bits; allowed widths are {list(ALLOWED_BITS)}"
        )
    if len(set(arr.tolist())) != arr.size:
        raise BadInputError(f"--bits {arr.tolist()} lists a width twice; give each once")
    return arr.astype(np.int64)


def _check_costs(
    costs: npt.ArrayLike | Sequence[npt.ArrayLike], n_widths: int, what: str = "cost"
) -> tuple[npt.NDArray[np.float64], tuple[int, ...]]:
    """Stack one [n, J] matrix or a sequence of them into [Σn, J]; return it and the sizes."""
    if isinstance(costs, np.ndarray):
        mats = [costs] if costs.ndim == 2 else list(costs)
    else:
        mats = [np.asarray(c) for c in costs]  # type: ignore[union-attr]
    if not mats:
        raise BadInputError(f"{what}: no layers given")
    out = []
    for i, m in enumerate(mats):
        a = np.asarray(m, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != n_widths or a.shape[0] == 0:
            raise BadInputError(
                f"{what} of layer {i} must have shape [experts, {n_widths}] (one column per "
                f"candidate width); got {a.shape}"
            )
        if not np.all(np.isfinite(a)):
            raise BadInputError(f"{what} of layer {i} contains NaN or inf")
        out.append(a)
    return np.concatenate(out, axis=0), tuple(a.shape[0] for a in out)


def _check_average_budget(budget: float) -> float:
    k = float(budget)
    if not math.isfinite(k) or k <= 0:
        raise BadInputError(f"--budget must be a positive number of average bits; got {budget}")
    return k


def _floor_target(n: int, k: float) -> tuple[int, bool]:
    """⌊n·k⌋ with a tolerance for float error, and whether it rounded (MODE: floor)."""
    nk = n * k
    nearest = round(nk)
    if abs(nk - nearest) <= _INT_TOL * max(1.0, abs(nk)):
        return int(nearest), False
    return math.floor(nk), True


def reachable_totals(n: int, bits: Sequence[int]) -> int:
    """Bitset of the totals reachable as a sum of exactly `n` widths from `bits`.

    Bit t of the returned int is set iff t = Σ_e b_e for some choice b_e ∈ bits.
    """
    offs = sorted({int(b) - min(bits) for b in bits})
    reach = 1
    for _ in range(n):
        nxt = 0
        for o in offs:
            nxt |= reach << o
        reach = nxt
    return reach << (n * min(bits))


def _budget_arg(total: int, n: int) -> str:
    """The smallest printed average k with ⌊n·k⌋ = total."""
    digits = max(1, len(str(n)))
    k = math.ceil(total / n * 10**digits) / 10**digits
    return f"{k:.{digits}f}".rstrip("0").rstrip(".")


def _check_bits_feasible(
    k: float, n: int, bits: npt.NDArray[np.int64], sense: Sense, target: int
) -> None:
    """Raise InfeasibleBudgetError (before solving) if no allocation meets the budget."""
    lo, hi = int(bits.min()), int(bits.max())
    rng = f"[{float(lo)}, {float(hi)}]"
    if target < n * lo:
        below = [b for b in ALLOWED_BITS if b < lo and b not in bits and b <= k]
        add = f" or add {below[-1]} to --bits" if below else ""
        raise InfeasibleBudgetError(
            f"budget {k:g} bits is below the smallest candidate width {lo} "
            f"(⌊{n}·{k:g}⌋ = {target} < {n}·{lo}); raise --budget to within {rng}{add}"
        )
    if sense == "le":
        return
    if target > n * hi:
        above = [b for b in ALLOWED_BITS if b > hi and b not in bits and b >= k]
        add = f", or add {above[0]} to --bits" if above else ""
        raise InfeasibleBudgetError(
            f"budget {k:g} bits is above the largest candidate width {hi}; lower --budget to "
            f"within {rng}, use --sense le{add}"
        )
    reach = reachable_totals(n, bits.tolist())
    if (reach >> target) & 1:
        return
    below_t = (reach & ((1 << target) - 1)).bit_length() - 1
    above_mask = reach >> (target + 1)
    above_t = target + 1 + ((above_mask & -above_mask).bit_length() - 1) if above_mask else -1
    options = [_budget_arg(t, n) for t in (below_t, above_t) if t >= 0]
    fixes = [b for b in ALLOWED_BITS if b not in bits]
    fix_bits = [b for b in fixes if (reachable_totals(n, [*bits.tolist(), b]) >> target) & 1]
    add = f", or add {fix_bits[0]} to --bits" if fix_bits else ""
    raise InfeasibleBudgetError(
        f"budget {k:g} bits gives a target of {target} bits over {n} experts, which no "
        f"combination of widths {sorted(bits.tolist())} sums to exactly; set --budget to "
        f"{' or '.join(options)}, use --sense le{add}"
    )


def check_budget(n: int, bits: Sequence[int], budget: float, sense: Sense = "eq") -> None:
    """Raise the same errors as the solvers would, without costs: for a pre-flight check.

    The driver calls this before calibration so that an infeasible ``--budget`` fails in
    milliseconds instead of after minutes of statistics.
    """
    b = _check_bits(bits)
    k = _check_average_budget(budget)
    target, _ = _floor_target(n, k)
    _check_bits_feasible(k, n, b, sense, target)


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


def _make_allocation(
    choice: npt.NDArray[np.int64],
    cost: npt.NDArray[np.float64],
    bits: npt.NDArray[np.int64],
    sizes: tuple[int, ...],
    st: Status,
    gap: float,
    elapsed: float,
    *,
    unit: Literal["bits", "bytes"],
    sense: Sense,
    target: int,
    rounded: bool,
    nbytes: npt.NDArray[np.int64] | None = None,
) -> Allocation:
    rows = np.arange(len(choice))
    widths = bits[choice]
    return Allocation(
        widths=tuple(int(w) for w in widths),
        layer_sizes=sizes,
        status=st,
        objective=float(cost[rows, choice].sum()),
        gap=gap,
        solve_time_s=elapsed,
        total_bits=int(widths.sum()),
        total_bytes=None if nbytes is None else int(nbytes[rows, choice].sum()),
        budget_unit=unit,
        sense=sense,
        target=target,
        rounded=rounded,
    )


def _allocate_average(
    costs: npt.ArrayLike | Sequence[npt.ArrayLike],
    bits: Sequence[int],
    budget: float,
    sense: Sense,
    options: SolverOptions,
) -> Allocation:
    if sense not in ("eq", "le"):
        raise BadInputError(f"--sense must be 'eq' or 'le'; got {sense!r}")
    b = _check_bits(bits)
    cost, sizes = _check_costs(costs, b.size)
    k = _check_average_budget(budget)
    n = cost.shape[0]
    target, rounded = _floor_target(n, k)
    _check_bits_feasible(k, n, b, sense, target)
    if rounded:
        logger.info(
            "budget %g bits x %d experts = %g; target rounded down to %d", k, n, n * k, target
        )
    weight = np.broadcast_to(b, cost.shape).astype(np.int64)
    choice, st, gap, elapsed = _solve(cost, weight, target, sense, options)
    return _make_allocation(
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
        bits: candidate widths (default 2, 3, 4; each from `ALLOWED_BITS`).
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
    out = []
    for i, c in enumerate(costs):
        try:
            out.append(allocate_bits(c, bits, budget, sense=sense, options=options))
        except InfeasibleBudgetError as exc:
            raise InfeasibleBudgetError(f"layer {i}: {exc}") from exc
    return tuple(out)


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
    b = _check_bits(bits)
    cost, sizes = _check_costs(costs, b.size)
    if isinstance(expert_bytes, np.ndarray) and expert_bytes.ndim == 1:
        nbytes = np.broadcast_to(expert_bytes, cost.shape)
    elif not isinstance(expert_bytes, np.ndarray) and all(
        np.ndim(v) == 0
        for v in expert_bytes  # type: ignore[union-attr]
    ):
        nbytes = np.broadcast_to(np.asarray(expert_bytes), cost.shape)
    else:
        nbytes, bsizes = _check_costs(expert_bytes, b.size, what="expert_bytes")
        if bsizes != sizes:
            raise BadInputError(
                f"expert_bytes has experts per layer {bsizes} but costs has {sizes}"
            )
    if np.any(nbytes < 0) or not np.all(nbytes == np.round(nbytes)):
        raise BadInputError("expert_bytes must be non-negative whole numbers of bytes")
    nb = np.asarray(nbytes, dtype=np.int64)
    budget = float(budget_bytes)
    if not math.isfinite(budget) or budget < 0:
        raise BadInputError(f"--budget-bytes must be a non-negative number; got {budget_bytes}")
    target = math.floor(budget)
    lo, hi = int(nb.min(axis=1).sum()), int(nb.max(axis=1).sum())
    if target < lo:
        smaller = [w for w in ALLOWED_BITS if w < int(b.min()) and w not in b]
        add = f" or add {smaller[-1]} to --bits" if smaller else ""
        raise InfeasibleBudgetError(
            f"budget {target} bytes is below the smallest possible size {lo} bytes (every "
            f"expert at its smallest width); raise --budget-bytes to within [{lo}, {hi}]{add}"
        )
    choice, st, gap, elapsed = _solve(cost, nb, target, "le", options or SolverOptions())
    return _make_allocation(
        choice, cost, b, sizes, st, gap, elapsed,
        unit="bytes", sense="le", target=target, rounded=target != budget, nbytes=nb,
    )  # fmt: skip
