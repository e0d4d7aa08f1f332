"""Int8 activations of the expert matmuls (``--expert-act-bits 8``): the numpy reference.

Each row of an expert's input is cut into groups of ``group_size`` along K (the weights'
quantization groups) and quantized symmetrically per group: ``d = max|x| / 127`` and
``q = rint(x / d)`` (round half to even), ``q = 0`` where a group is all zeros. K is padded
with zeros to whole groups. The kernels (`modec.kernels.grouped_moe_a8`) multiply the integer
codes of weights and activations exactly and scale each group's sum by ``scale · d``; the
simulated model (`modec.moe.reference`) multiplies the dequantized weights by ``q · d``.
"""

from __future__ import annotations

import numpy as np

#: The only activation width the kernels take: int8 (VNNI's unsigned x signed byte products).
ACT_BITS = (8,)
#: Largest code magnitude of a symmetric int8 group.
QMAX = 127


def quantize_rows(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize rows ``x [n, K]`` per group of K.

    Returns:
        ``q`` int8 [n, K_pad], ``d`` float32 [n, G] (the step of each group) and ``s`` float32
        [n, G] (the sum of each group's codes), K_pad = G · group_size.
    """
    x = np.asarray(x, dtype=np.float32)
    n, k = x.shape
    groups = -(-k // group_size)
    pad = np.zeros((n, groups * group_size), np.float32)
    pad[:, :k] = x
    xg = pad.reshape(n, groups, group_size)
    d = (np.abs(xg).max(axis=-1) / np.float32(QMAX)).astype(np.float32)
    safe = np.where(d > 0, d, np.float32(1))[..., None]
    q = np.where(d[..., None] > 0, np.rint(xg / safe), np.float32(0))
    q = np.clip(q, -QMAX, QMAX).astype(np.int8)
    s = q.astype(np.int32).sum(axis=-1).astype(np.float32)
    return q.reshape(n, groups * group_size), d, s


def fake_quantize(x: np.ndarray, group_size: int) -> np.ndarray:
    """``x [..., K]`` with every row replaced by its int8 approximation ``q · d`` (float32)."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    q, d, _ = quantize_rows(rows, group_size)
    groups = d.shape[1]
    deq = q.reshape(-1, groups, group_size).astype(np.float32) * d[..., None]
    return np.asarray(deq.reshape(rows.shape[0], -1)[:, :k].reshape(x.shape), dtype=np.float32)
