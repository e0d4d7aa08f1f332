"""The bit-allocation budget: candidate widths, targets, byte sizes and feasibility checks.

Pure arithmetic over the inputs of the MODE ILP (`modec.numerics.ilp`), with no solver:

- an average-bit budget k over n experts becomes the target ⌊n·k⌋ bits of the budget row
  (MODE floors n·k; `floor_target` records whether it had to);
- a byte budget counts codes, scales and zeros of every projection (`expert_nbytes`);
- every infeasible budget is rejected with an `InfeasibleBudgetError` whose one-line
  message names the feasible range and the fix, before any solver runs. The driver calls
  `check_budget` before calibration so that a bad ``--budget`` fails in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from modec.errors import BadInputError, InfeasibleBudgetError
from modec.numerics.schemes import QuantScheme

__all__ = [
    "ALLOWED_BITS",
    "DEFAULT_BITS",
    "Sense",
    "check_average_budget",
    "check_bits_feasible",
    "check_budget",
    "check_byte_budget",
    "check_costs",
    "check_widths",
    "expert_nbytes",
    "floor_target",
    "reachable_totals",
]

#: Candidate widths a user may ask for. 2/3/4 are MODE's default candidates; 1 and 8 are
#: allowed too. 5-7 pack (see `schemes.SUPPORTED_BITS`) but have no scheduled kernel, so
#: allocating them would produce an artifact we cannot run.
ALLOWED_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
DEFAULT_BITS: tuple[int, ...] = (2, 3, 4)

#: The relation of the budget row: "eq" (the MODE paper) or "le".
Sense = Literal["eq", "le"]

# n·k within this distance of an integer counts as that integer (2.3 · 10 = 22.999999999999996
# must give 23, not 22).
_INT_TOL = 1e-9


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


def check_widths(bits: Sequence[int]) -> npt.NDArray[np.int64]:
    """The candidate widths as an int64 array.

    Raises:
        BadInputError: empty, unknown (not in `ALLOWED_BITS`) or repeated widths.
    """
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


def check_costs(
    costs: npt.ArrayLike | Sequence[npt.ArrayLike], n_widths: int, what: str = "cost"
) -> tuple[npt.NDArray[np.float64], tuple[int, ...]]:
    """Stack one [n, J] matrix or a sequence of them (one per layer) into [Σn, J].

    Returns:
        The stacked float64 matrix and the number of rows of each layer.

    Raises:
        BadInputError: no layers, a layer of the wrong shape, or NaN / inf entries.
    """
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


def check_average_budget(budget: float) -> float:
    """The average-bit budget k as a float; it must be positive and finite."""
    k = float(budget)
    if not math.isfinite(k) or k <= 0:
        raise BadInputError(f"--budget must be a positive number of average bits; got {budget}")
    return k


def floor_target(n: int, k: float) -> tuple[int, bool]:
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


def check_bits_feasible(
    k: float, n: int, bits: npt.NDArray[np.int64], sense: Sense, target: int
) -> None:
    """Raise InfeasibleBudgetError if no allocation of `bits` to `n` experts meets `target`.

    Exact: with ``sense="eq"`` the target must be a reachable sum of n widths
    (`reachable_totals`); the message then offers the nearest feasible ``--budget`` values.
    """
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
    b = check_widths(bits)
    k = check_average_budget(budget)
    target, _ = floor_target(n, k)
    check_bits_feasible(k, n, b, sense, target)


def check_byte_budget(
    expert_bytes: npt.ArrayLike | Sequence[npt.ArrayLike],
    bits: npt.NDArray[np.int64],
    sizes: tuple[int, ...],
    budget_bytes: int,
) -> tuple[npt.NDArray[np.int64], int]:
    """Validate the byte sizes and budget of a byte-budget allocation.

    Args:
        expert_bytes: storage of each expert at each width: [n, J], [J] (the same for all
            experts), or a sequence of [n_l, J] matrices, one per layer.
        bits: the checked candidate widths (`check_widths`).
        sizes: experts per layer of the cost matrices.
        budget_bytes: the byte budget.

    Returns:
        The bytes as an int64 matrix [Σn, J] and the integer target ⌊budget_bytes⌋.

    Raises:
        BadInputError: shapes that do not match the costs, or negative / fractional bytes.
        InfeasibleBudgetError: even the smallest width for every expert exceeds the budget.
    """
    shape = (sum(sizes), bits.size)
    if isinstance(expert_bytes, np.ndarray) and expert_bytes.ndim == 1:
        nbytes = np.broadcast_to(expert_bytes, shape)
    elif not isinstance(expert_bytes, np.ndarray) and all(
        np.ndim(v) == 0
        for v in expert_bytes  # type: ignore[union-attr]
    ):
        nbytes = np.broadcast_to(np.asarray(expert_bytes), shape)
    else:
        nbytes, bsizes = check_costs(expert_bytes, bits.size, what="expert_bytes")
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
        smaller = [w for w in ALLOWED_BITS if w < int(bits.min()) and w not in bits]
        add = f" or add {smaller[-1]} to --bits" if smaller else ""
        raise InfeasibleBudgetError(
            f"budget {target} bytes is below the smallest possible size {lo} bytes (every "
            f"expert at its smallest width); raise --budget-bytes to within [{lo}, {hi}]{add}"
        )
    return nb, target
