"""Shared helpers for the report.html tests: an HTML checker and synthetic reports.

``synthetic_report`` builds a report in the layout collect-routing wrote before the
select-key-vision pass existed (key-vision statistics inside collect-routing);
``split_layout`` turns it into the current layout (docs/report.md), moving the same numbers
to ``sections["select-key-vision"]``, so the two can be compared.
"""

from __future__ import annotations

import copy
import random
import re
from html.parser import HTMLParser
from typing import Any

# HTML elements that have no end tag.
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}  # fmt: skip


class _Checker(HTMLParser):
    """Collects ids, external references and tag-balance errors of one document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def _attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for k, v in attrs:
            if k == "id" and v is not None:
                self.ids.append(v)
            if k in ("src", "href", "xlink:href", "action", "data") and v is not None:
                self.refs.append(v)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()


def check_html(doc: str) -> _Checker:
    """Parse ``doc`` and assert it is balanced, self-contained and has unique ids."""
    assert doc.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(doc)
    c.close()
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed: {c.stack}"
    external = [r for r in c.refs if not r.startswith("#")]
    assert not external, external
    assert not re.search(r"url\(\s*['\"]?https?:", doc), "CSS must not load anything"
    assert "script" not in c.tags
    dupes = {i for i in c.ids if c.ids.count(i) > 1}
    assert not dupes, dupes
    return c


def figure_html(doc: str, fig_id: str) -> str:
    """The HTML of the figure ``fig_id`` in ``doc``, up to its ``</figure>``."""
    fig = doc[doc.index(f'id="{fig_id}"') :]
    return fig[: fig.index("</figure>")]


# --------------------------------------------------------------------------- a report


def _norm(v: list[float]) -> list[float]:
    s = sum(v)
    return [x / s for x in v]


def synthetic_report(layers: int = 2, experts: int = 6, seed: int = 0) -> dict[str, Any]:
    """A report shaped like the passes wrote it before select-key-vision (docs/report.md)."""
    rng = random.Random(seed)
    bits = [2, 3, 4]

    def vec() -> list[float]:
        return _norm([rng.random() + 0.01 for _ in range(experts)])

    def counts(hi: int) -> list[list[int]]:
        return [[rng.randint(0, hi) for _ in range(experts)] for _ in range(layers)]

    widths = [[rng.choice(bits) for _ in range(experts)] for _ in range(layers)]
    flat = [w for row in widths for w in row]
    hist = {str(b): flat.count(b) for b in sorted(set(flat))}

    def proj(layer: int, e: int) -> dict[str, Any]:
        if (layer, e) == (layers - 1, 1):  # one starved expert fell back to RTN
            return {"method": "rtn", "reason": "3 tokens < min_tokens 32", "loss": None,
                    "output_mse": 1e-2}  # fmt: skip
        return {"method": "gptq", "reason": None, "loss": rng.random(), "output_mse": 1e-4}

    names = ["find-moe", "canonicalize-moe", "find-attention", "collect-routing",
             "measure-sensitivity", "allocate-bits", "quantize-experts"]  # fmt: skip
    return {
        "schema": "modec.report/1",
        "pipeline": "find-moe,canonicalize-moe,find-attention,collect-routing{key_ratio=0.2},"
        "measure-sensitivity{bits=2:3:4,group_size=128,samples=8},allocate-bits{budget=3.0},"
        "quantize-experts",
        "pipeline_name": "mode",
        "options": {"budget": 3.0, "bits": bits, "group_size": 128, "budget_bytes": 0,
                    "model": "/data/model.onnx", "calib": "/data/calib.npz", "seed": 0},
        "passes": [
            {"name": n, "text": n, "seconds": 0.1 * (i + 1), "modified": n in
             ("canonicalize-moe", "quantize-experts"), "stats": {"layers": layers}}
            for i, n in enumerate(names)
        ],
        "sections": {
            "find-moe": {"layers": [
                {"index": i, "name": f"/layers.{i}/moe", "num_experts": experts, "top_k": 2,
                 "router": {"scoring": "softmax", "norm_topk_prob": True}, "form":
                 "stacked_gather", "gate_layout": "separate", "activation": "silu",
                 "weights": {"gate": [experts, 32, 32], "up": [experts, 32, 32],
                             "down": [experts, 32, 32]},
                 "expert_parameters": experts * 3 * 32 * 32, "shared_expert": None, "nodes": 29}
                for i in range(layers)
            ]},
            "canonicalize-moe": {"nodes": [f"moe_{i}" for i in range(layers)]},
            "find-attention": {"layers": [
                {"kind": "probs", "node": f"/layers.{i}/attn/Softmax", "value": f"probs_{i}",
                 "q": None, "k": None} for i in range(layers)
            ]},
            "collect-routing": {  # as passes/collect_routing.py wrote it
                "key_ratio": 0.2, "samples": 27,
                "count_all": counts(200), "count_text": counts(80), "count_vision": counts(120),
                "count_key": counts(30), "count_redundant": counts(90),
                "mean_weight": [vec() for _ in range(layers)],
                "f_text": [vec() for _ in range(layers)],
                "f_vision": [vec() for _ in range(layers)],
                "f_vision_all": [vec() for _ in range(layers)],
                "f_redundant": [vec() for _ in range(layers)],
                "f_global": [vec() for _ in range(layers)],
                "key_source": ["attention"] * (layers - 1) + ["attention+hidden"],
                "coverage": {"min_tokens": 16, "starved": layers + 1, "layers": [
                    {"text": [], "vision": [1] if i == layers - 1 else [], "key_vision": [1]}
                    for i in range(layers)]},
                "attention_fallbacks": [
                    {"layer": layers - 1, "samples": 2, "rule": "cosine similarity of vision MoE "
                     "inputs to the mean question MoE input",
                     "reason": "2 sample(s) have no text after their image"}],
            },
            "measure-sensitivity": {  # as passes/measure_sensitivity.py writes it
                "bits": bits, "group_size": 128, "samples": 8, "positions": "answer",
                "workers": 1, "subset": {"multimodal": 5, "text_only": 3, "seed": 0},
                "unused": {"text": [], "vision": [[0, experts - 1]]},
                "cache_hit": False, "cache_key": None, "cache_path": None, "seconds": 1.5,
                "layers": [{"seconds": 0.5, "runs": 3 * experts} for _ in range(layers)],
                "delta_text": [[[rng.random() * 10.0**-j for j in range(3)]
                                for _ in range(experts)] for _ in range(layers)],
                "delta_vision": [[[rng.random() * 10.0**-j for j in range(3)]
                                  for _ in range(experts)] for _ in range(layers)],
            },
            "allocate-bits": {
                "method": "mode", "budget": 3.0, "bits": bits, "widths": widths,
                "costs": [[[rng.random() for _ in bits] for _ in range(experts)]
                          for _ in range(layers)],
                "average_bits": sum(flat) / len(flat), "histogram": hist, "objective": 0.5,
                "layers": [{"status": "OPTIMAL", "objective": 0.25, "gap": 0.0,
                            "solve_seconds": 0.01, "rounded": False, "target": 3 * experts}
                           for _ in range(layers)],
            },
            "quantize-experts": {
                "method": "gptq", "group_size": 128, "fallbacks": 1,
                "layers": [[{"expert": e, "bits": widths[i][e], "tokens": 40,
                             **{p: proj(i, e) for p in ("gate", "up", "down")}}
                            for e in range(experts)] for i in range(layers)],
            },
        },
        "summary": {
            "out": "/data/out", "method": "mode", "budget": 3.0,
            "average_bits": sum(flat) / len(flat), "histogram": hist,
            "sizes": {"expert_params": 36864, "experts_fp32": 147456, "experts_fp16": 73728,
                      "experts_codes": 13824, "experts_scales": 1152, "experts_zeros": 576,
                      "experts_quantized": 15552, "other_fp32": 40000, "model_fp32": 187456,
                      "model_quantized": 55552},
            "seconds": {n: 0.1 for n in names},
            "report": "/data/out/report.json",
            "accuracy": {
                "fp32": _acc(36, 30, {"cell": (4, 3), "sum": (4, 4)}),
                "quantized": _acc(36, 27, {"cell": (4, 2), "sum": (4, 4)}),
            },
        },
    }  # fmt: skip


def split_layout(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` in the current layout: key-vision statistics in ``select-key-vision``.

    collect-routing keeps its counts and frequencies, but ``f_vision`` becomes the
    all-vision frequency; ``count_key``, ``count_redundant``, ``f_redundant``,
    ``key_ratio``, ``key_source`` and the key-vision frequency (as ``f_key``) move to the
    new section, and so do the key-vision coverage entries.
    """
    report = copy.deepcopy(report)
    report["schema"] = "modec.report/2"
    sections = report["sections"]
    old = sections["collect-routing"]
    cov = old["coverage"]
    key_layers = [{"key_vision": entry.pop("key_vision")} for entry in cov["layers"]]
    key_starved = sum(len(entry["key_vision"]) for entry in key_layers)
    cov["starved"] -= key_starved
    vision_tokens = [50 * (i + 1) for i in range(len(key_layers))]
    key = {
        "key_ratio": old.pop("key_ratio"),
        "vision_tokens": vision_tokens,
        "key_tokens": [round(0.2 * n) for n in vision_tokens],
        "count_key": old.pop("count_key"),
        "count_redundant": old.pop("count_redundant"),
        "f_key": old.pop("f_vision"),
        "f_redundant": old.pop("f_redundant"),
        "key_source": old.pop("key_source"),
        "coverage": {"min_tokens": cov["min_tokens"], "starved": key_starved,
                     "layers": key_layers},
    }  # fmt: skip
    old["f_vision"] = old.pop("f_vision_all")
    old["score_source"] = list(key["key_source"])
    # select-key-vision runs right after collect-routing, in sections and in passes.
    sections_order = list(sections.items())
    at = [name for name, _ in sections_order].index("collect-routing") + 1
    sections_order.insert(at, ("select-key-vision", key))
    report["sections"] = dict(sections_order)
    at = [p["name"] for p in report["passes"]].index("collect-routing") + 1
    report["passes"].insert(at, {"name": "select-key-vision", "text": "select-key-vision",
                                 "seconds": 0.05, "modified": False, "stats": {}})  # fmt: skip
    report["pipeline"] = report["pipeline"].replace(
        "collect-routing{key_ratio=0.2}", "collect-routing,select-key-vision{key_ratio=0.2}"
    )
    return report


def _acc(n: int, correct: int, families: dict[str, tuple[int, int]]) -> dict[str, Any]:
    def s(n: int, c: int) -> dict[str, Any]:
        return {"n": n, "correct": c, "accuracy": c / n}

    fams = {k: s(*v) for k, v in families.items()}
    return {"samples": n, "overall": s(n, correct), "multimodal": s(20, correct - 14),
            "text_only": s(16, 14), "families": fams}  # fmt: skip


def plot_ids(layers: int) -> list[str]:
    per_layer = [f"plot-{kind}-layer-{i}" for kind in ("frequencies", "sensitivity")
                 for i in range(layers)]  # fmt: skip
    return ["plot-pass-times", "plot-widths", "plot-budget", "plot-sizes", "plot-gptq-loss",
            "plot-accuracy", *per_layer]  # fmt: skip
