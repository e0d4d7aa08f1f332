"""The ``moe-layers`` section: the MoE layers find-moe found (``table-moe-layers``)."""

from __future__ import annotations

from typing import Any

from modec.report.data import Report, section
from modec.report.html import esc, ncell, not_run, short, table


def _proj_order(d: dict[str, Any]) -> list[str]:
    """gate, up, down first, then any other key sorted (stable across JSON round trips)."""
    fixed = [k for k in ("gate", "up", "down") if k in d]
    return fixed + sorted(k for k in d if k not in fixed)


def render(report: Report) -> str:
    sec = section(report, "find-moe")
    out = ["<h2>MoE layers</h2>"]
    if not sec or not isinstance(sec.get("layers"), list):
        return out[0] + not_run("find-moe", "MoE layer list")
    att = (section(report, "find-attention") or {}).get("layers")
    rows = []
    for i, r in enumerate(sec["layers"]):
        tap = att[i] if isinstance(att, list) and i < len(att) else "not run"
        weights = r.get("weights") or {}
        router = r.get("router") or {}
        shared = r.get("shared_expert")
        rows.append(
            [
                ncell(r.get("index")),
                f"<code>{esc(r.get('name', ''))}</code>",
                ncell(r.get("num_experts")),
                ncell(r.get("top_k")),
                esc(router.get("scoring", "?")),
                esc(r.get("form", "?")),
                esc(r.get("activation", "?")),
                esc(", ".join(f"{k} {weights[k]}" for k in _proj_order(weights))),
                ncell(r.get("expert_parameters")),
                esc("none" if shared is None else short(shared, 60)),
                esc(tap.get("kind", "?") if isinstance(tap, dict) else tap or "none found"),
            ]
        )
    out.append(
        table(
            [
                "layer",
                "name",
                "experts",
                "top-k",
                "scoring",
                "form",
                "activation",
                "weights [E, N, K]",
                "expert parameters",
                "shared expert",
                "attention (find-attention)",
            ],
            rows,
            id="table-moe-layers",
        )
    )
    return "".join(out)
