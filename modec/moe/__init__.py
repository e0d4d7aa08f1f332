"""Graph analysis of MoE layers: find-moe, canonicalize-moe, find-attention, the reference."""

from __future__ import annotations
