"""Defaults that several passes, the CLI and the Python API share: declared once, here.

Each is the setting of the method as modec implements it (MODE, arXiv 2606.17118: W3A16,
candidate widths 2–4, top 20% key vision tokens) unless it says otherwise.
"""

from __future__ import annotations

#: Quantization group along the input dimension (g128, the usual GPTQ setting).
GROUP_SIZE = 128
#: Candidate expert widths of the ILP ({2, 3, 4} bits).
BITS: tuple[int, ...] = (2, 3, 4)
#: Average expert width (W3A16).
BUDGET = 3.0
#: Share of each sample's vision tokens kept as key tokens (top 20%).
KEY_RATIO = 0.2
#: Calibration samples the KL sensitivities are averaged over (a modec choice: the probes
#: dominate compile time and 32 samples separate the widths on the bundled model).
SENSITIVITY_SAMPLES = 32
