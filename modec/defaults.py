"""Defaults that several passes, the CLI and the Python API share: declared once, here.

Each is the setting of the method as modec implements it (MODE, arXiv 2606.17118: W3A16,
candidate widths 2–4, top 20% key vision tokens) unless it says otherwise.
"""

from __future__ import annotations

from typing import Literal

#: Quantization group along the input dimension (g128, the usual GPTQ setting).
GROUP_SIZE = 128
#: Candidate expert widths of the ILP ({2, 3, 4} bits).
BITS: tuple[int, ...] = (2, 3, 4)
#: Widths ``--dense-bits`` takes (those the dequant-matmul kernels have).
DENSE_BITS = (2, 3, 4, 8)
#: Average expert width (W3A16).
BUDGET = 3.0
#: Share of each sample's vision tokens kept as key tokens (top 20%).
KEY_RATIO = 0.2
#: Calibration samples the KL sensitivities are averaged over (a modec choice: the probes
#: dominate compile time and 32 samples separate the widths on the bundled model).
SENSITIVITY_SAMPLES = 32
#: How δ is measured: ``exact`` re-runs the model behind every probe (MODE §3.2, O(L²) in
#: layers); ``fisher`` is the O(L) second-order estimate of `modec.method.estimate`; ``auto``
#: (the default) takes ``fisher`` for models of at least ``FISHER_MIN_EXPERT_PARAMS`` expert
#: weights and ``exact`` below, and ``exact`` wherever the estimate lacks a rule for an op.
#: The estimate met issue #19's targets on facts-vlm over three calibration subsets (median
#: Spearman ρ 0.976-0.984, allocations within 0.14 points of exact at 2.5 and 3.0 bits,
#: 23-26x cheaper probes; docs/sensitivity_estimator.md).
SENSITIVITY: Literal["auto", "exact", "fisher"] = "auto"
#: Expert weights from which ``auto`` estimates δ (1e9: a paper-width model from two layers
#: on, where the exact probes first re-run a tail; never the bundled 3.1M-weight example).
FISHER_MIN_EXPERT_PARAMS = 10**9
