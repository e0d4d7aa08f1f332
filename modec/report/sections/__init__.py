"""The sections of ``report.html``, in page order.

Each section is one module with a ``render(report) -> str | None`` function: the section's
HTML (starting with its ``<h2>``), or ``None`` to leave the section off the page. A section
whose pass did not run renders a "not run" note rather than ``None``. Adding a section is
one module and one line in :data:`SECTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from modec.report.data import Report
from modec.report.sections import (
    accuracy,
    allocation,
    key_vision,
    moe_layers,
    overview,
    passes,
    quantization,
    routing,
    sensitivity,
    sizes,
)


class Section(NamedTuple):
    """One section of the page."""

    id: str  # the ``<section id>`` and the navigation anchor
    title: str  # the navigation link's text
    pass_name: str | None  # the pass whose record it shows (None: the report as a whole)
    render: Callable[[Report], str | None]


SECTIONS: tuple[Section, ...] = (
    Section("overview", "Pipeline", None, overview.render),
    Section("passes", "Passes", None, passes.render),
    Section("moe-layers", "MoE layers", "find-moe", moe_layers.render),
    Section("routing", "Routing", "collect-routing", routing.render),
    Section("key-vision", "Key vision", "select-key-vision", key_vision.render),
    Section("sensitivity", "Sensitivity", "measure-sensitivity", sensitivity.render),
    Section("allocation", "Allocation", "allocate-bits", allocation.render),
    Section("sizes", "Size", None, sizes.render),
    Section("quantization", "GPTQ", "quantize-experts", quantization.render),
    Section("accuracy", "Accuracy", None, accuracy.render),
)

__all__ = ["SECTIONS", "Section"]
