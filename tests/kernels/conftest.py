"""Shared helpers for the kernel tests (TVM is imported only here and in the tests)."""

from __future__ import annotations

import numpy as np
import pytest

from modec.numerics.packing import PackedWeight, pack
from modec.numerics.schemes import QuantScheme

pytest.importorskip("tvm")


def random_packed(
    seed: int, scheme: QuantScheme, n: int, k: int, experts: int | None = None
) -> PackedWeight:
    """Random codes, zeros and fp16 scales of one weight or a stack, packed."""
    rng = np.random.default_rng(seed)
    lead = () if experts is None else (experts,)
    g = scheme.num_groups(k)
    q = rng.integers(0, scheme.qmax + 1, (*lead, n, k), dtype=np.uint8)
    s = (rng.random((*lead, n, g)) * 0.05 + 0.01).astype(np.float16)
    z = rng.integers(0, scheme.qmax + 1, (*lead, n, g), dtype=np.uint8)
    return pack(q, s, z, scheme)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """fp32 kernel vs float64 reference: relative 1e-5 of the output's scale."""
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want).max()) / scale
    assert err <= 1e-5, f"max error {err:.3g} of the output's scale"
