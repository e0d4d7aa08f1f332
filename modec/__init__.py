"""modec: modality-aware mixed-precision compiler for MoE vision-language models.

`import modec` stays light: torch, TVM and python-mip are imported only by the modules that
need them (calibration, lowering, allocation).
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
