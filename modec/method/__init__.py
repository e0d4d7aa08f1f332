"""MODE analyses (arXiv 2606.17118): routing statistics and per-modality expert sensitivities.

Pure numeric code over numpy arrays; the passes in ``passes/collect_routing.py`` and
``passes/measure_sensitivity.py`` drive it with the executor.
"""

from __future__ import annotations
