"""Helpers the passes share to write their report sections (plain JSON values)."""

from __future__ import annotations

from typing import Any

import numpy as np


def coverage(counts: tuple[np.ndarray, ...], min_tokens: int) -> list[list[int]]:
    """Per layer, the experts that received fewer than ``min_tokens`` tokens."""
    return [[int(e) for e in np.flatnonzero(c < min_tokens)] for c in counts]


def rows(values: tuple[np.ndarray, ...], as_int: bool = False) -> list[list[Any]]:
    """Per-layer arrays as JSON lists."""
    return [[int(v) if as_int else float(v) for v in layer] for layer in values]
