"""The result of a bit allocation: one width per expert and how it meets the budget.

Pure data, shared by every allocator of `modec.numerics.ilp` (average-bit and byte budgets,
per layer or global); no solver import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from modec.numerics.budget import Sense

__all__ = ["Allocation", "Status"]

#: "optimal" (proven), or "feasible" when the time limit stopped the solver with an incumbent.
Status = Literal["optimal", "feasible"]


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

    @classmethod
    def from_choice(
        cls,
        choice: npt.NDArray[np.int64],
        cost: npt.NDArray[np.float64],
        bits: npt.NDArray[np.int64],
        sizes: tuple[int, ...],
        status: Status,
        gap: float,
        elapsed: float,
        *,
        unit: Literal["bits", "bytes"],
        sense: Sense,
        target: int,
        rounded: bool,
        nbytes: npt.NDArray[np.int64] | None = None,
    ) -> Allocation:
        """The allocation of the chosen column ``choice[e]`` of every expert (row) e.

        Args:
            choice: index into ``bits`` per expert, [Σn].
            cost: the cost matrix as given by the caller, [Σn, J].
            bits: the candidate widths, [J].
            sizes: experts per layer.
            status: the solver's status.
            gap: the solver's relative gap.
            elapsed: seconds of model build plus solve.
            unit: "bits" or "bytes", the unit of the budget row.
            sense: the relation of the budget row.
            target: the right-hand side of the budget row.
            rounded: whether the target was floored.
            nbytes: bytes per expert and width [Σn, J] for a byte budget.
        """
        rows = np.arange(len(choice))
        widths = bits[choice]
        return cls(
            widths=tuple(int(w) for w in widths),
            layer_sizes=sizes,
            status=status,
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
