"""The MODE method (arXiv 2606.17118), one module per step, as pure functions over arrays.

1. `routing`: routing counted per expert separately for text and vision tokens.
2. `key_vision`: the key vision tokens (top 20% by the attention the question pays them).
3. `probes` and `sensitivity`: δ_M(e, b), the KL of quantizing one expert for one modality.
4. `allocate`: the ILP costs and solve (the importance signals are `modec.numerics.importance`).
5. `quantize`: GPTQ of every expert at its width.

The passes in ``passes/`` are the plumbing that feeds these functions from the IR and the
calibration run (docs/architecture.md).
"""

from __future__ import annotations
