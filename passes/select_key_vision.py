"""select-key-vision: each layer's key vision tokens and the frequencies over them (MODE §3.1).

Reads: `RoutingStats` (the routing and key score of every vision token). Writes: `KeyVision`.
Modifies: nothing. The numerics live in `modec.method.key_vision.select_key_vision`.

Rules:
1. Per layer and sample, the top ``key_ratio`` of the sample's vision tokens (⌈ratio·n⌉, at
   least 1) by score are key tokens; ties go to the earlier token. The score is the
   attention the question pays the token (collect-routing rule 3) or its fallback.
2. ``count_key[e]`` / ``count_redundant[e]``: selections of expert e by key / non-key vision
   tokens; ``f_key`` / ``f_redundant`` normalise them within the layer. MODE weights
   δ_vision with ``f_key``.
3. Coverage: experts that received fewer than ``min_tokens`` key tokens are listed per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from modec.passes._report import coverage, rows

from modec.defaults import KEY_RATIO
from modec.errors import BadInputError
from modec.facts import KeyVision, RoutingStats
from modec.pipeline import Pass, PassContext, PassResult, register


@register
@dataclass
class SelectKeyVisionPass(Pass):
    """Choose the key vision tokens and count their routing; see the module docstring."""

    name = "select-key-vision"
    reads = (RoutingStats,)
    writes = (KeyVision,)
    key_ratio: float = KEY_RATIO
    min_tokens: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.key_ratio <= 1.0:
            raise BadInputError(f"key_ratio must be in (0, 1]; got {self.key_ratio}")
        if self.min_tokens < 0:
            raise BadInputError(f"min_tokens must be >= 0; got {self.min_tokens}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec.method.key_vision import select_key_vision
        from modec.method.routing import normalise

        stats = ctx.facts.get(RoutingStats)
        picks = [
            select_key_vision(v, len(c), self.key_ratio)
            for v, c in zip(stats.vision, stats.count_all, strict=True)
        ]
        kv = KeyVision(
            key_ratio=self.key_ratio,
            key=tuple(p.key for p in picks),
            count_key=tuple(p.count_key for p in picks),
            count_redundant=tuple(p.count_redundant for p in picks),
            f_key=tuple(normalise(p.count_key) for p in picks),
            f_redundant=tuple(normalise(p.count_redundant) for p in picks),
        )
        ctx.facts.put(kv)
        starved = coverage(kv.count_key, self.min_tokens)
        n_key = sum(int(k.sum()) for k in kv.key)
        ctx.stat("key_tokens", n_key)
        ctx.stat("starved", sum(len(s) for s in starved))
        ctx.section().update(
            key_ratio=self.key_ratio,
            key_tokens=[int(k.sum()) for k in kv.key],
            vision_tokens=[int(k.size) for k in kv.key],
            count_key=rows(kv.count_key, True),
            count_redundant=rows(kv.count_redundant, True),
            f_key=rows(kv.f_key),
            f_redundant=rows(kv.f_redundant),
            key_source=list(stats.score_source),
            coverage={"min_tokens": self.min_tokens, "starved": sum(len(s) for s in starved),
                      "layers": [{"key_vision": s} for s in starved]},
        )  # fmt: skip
        return PassResult(model, modified=False)
