"""collect-routing: routing per expert, counted separately for text and vision (MODE §3.1).

Reads: `CanonicalMoE`, `AttentionTaps`, `Calibration`. Writes: `RoutingStats`. Modifies:
nothing. The numerics live in `modec.method.routing` (counts) and
`modec.method.key_vision` (the key scores of vision tokens).

Rules:
1. The calibration set runs through the executor in batches of ``batch_size`` samples,
   sorted by length so that text-only samples are not padded to image length. Padding
   tokens never count. The run is layer-streamed (`modec.streaming`): every batch through
   one stage before the next, activations held within ``--max-memory`` and spilled past it.
2. Per layer and expert: selections by all / text / vision tokens, the mean combine weight,
   frequencies normalised within the layer. (The expert-input Hessians that GPTQ and the
   output-error signals need are accumulated by the passes that use them, one layer at a
   time: `modec.method.hessians`.)
3. The same run scores every vision token for step 2 of MODE (select-key-vision chooses
   from the scores): the attention that the text after the image pays it, mean over those
   queries and heads, read from the layer's attention through the executor
   (`modec.method.key_vision.key_scores`).
4. Fallback: where the attention cannot be read (no tap, a fused attention op that keeps its
   probabilities inside, an unexpected shape) or a sample has no text after its image, the
   score is the hidden-state similarity (`modec.method.key_vision.hidden_key_scores`).
   Every fallback is logged and listed in the report.
5. Cache: with a cache directory, the result (and its fallbacks) is stored under a content
   hash of the model, the calibration data and ``batch_size`` (`modec.cache.memoize`).
6. Coverage: experts that received fewer than ``min_tokens`` text or vision tokens are listed
   per layer in the report; their statistics for that modality are unreliable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from modec.passes._report import coverage, rows

from modec.errors import BadInputError
from modec.facts import AttentionTaps, Calibration, CanonicalMoE, RoutingStats
from modec.pipeline import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


def _input_name(node: ir.Node) -> str:
    """The name of a canonical MoE node's hidden-state input (tapped by the executor)."""
    value = node.inputs[0]
    if value is None or not value.name:
        raise BadInputError(
            f"MoE node {node.name!r} has no named hidden-state input; run canonicalize-moe "
            "before collect-routing"
        )
    return value.name


@register
@dataclass
class CollectRoutingPass(Pass):
    """Count routing per modality and score vision tokens; see the module doc."""

    name = "collect-routing"
    reads = (CanonicalMoE, AttentionTaps, Calibration)
    writes = (RoutingStats,)
    min_tokens: int = 16
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadInputError(f"batch_size must be at least 1; got {self.batch_size}")
        if self.min_tokens < 0:
            raise BadInputError(f"min_tokens must be >= 0; got {self.min_tokens}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec import cache

        ds = ctx.facts.get(Calibration).data
        taps = ctx.facts.get(AttentionTaps).taps
        found: dict[str, Any] = {}

        def compute() -> dict[str, np.ndarray]:
            stats, reasons, no_query = self._collect(model, ctx, ds, taps)
            found.update(stats=stats)
            meta = json.dumps({"reasons": reasons, "no_query": no_query})
            return {**stats.to_arrays(), "__meta__": np.array(meta)}

        arrays, lookup = cache.memoize(
            ctx.options.cache_dir, "routing", model, ds, {"batch_size": self.batch_size}, compute
        )
        meta = json.loads(str(arrays["__meta__"]))
        stats = found.get("stats") or RoutingStats.from_arrays(arrays)
        ctx.facts.put(stats)
        self._report(ctx, stats, meta["reasons"], meta["no_query"], hit=lookup.hit)
        return PassResult(model, modified=False)

    def _collect(
        self, model: ir.Model, ctx: PassContext, ds: Any, taps: tuple[Any, ...]
    ) -> tuple[RoutingStats, list[str | None], list[int]]:
        """Run the calibration set; the statistics, per-layer fallback reasons and counts."""
        from modec.executor import Executor
        from modec.method.hessians import calibration_batches
        from modec.method.key_vision import key_scores
        from modec.method.routing import RoutingAccumulator
        from modec.moe.canonical import is_moe_node
        from modec.streaming import SpillStore, stream

        nodes = [n for n in model.graph if is_moe_node(n)]
        if len(taps) != len(nodes):
            raise BadInputError(
                f"AttentionTaps lists {len(taps)} layers but the model has {len(nodes)} MoE "
                "nodes; run find-attention on this model right before collect-routing"
            )
        probs_names: list[str | None] = []
        reasons: list[str | None] = []
        for layer, tap in enumerate(taps):
            if tap is None:
                probs_names.append(None)
                reasons.append("no attention found for this layer (find-attention)")
            elif tap.kind != "probs" or tap.probs is None or not tap.probs.name:
                probs_names.append(None)
                reasons.append(
                    f"attention is a fused {tap.node.op_type} op: its probabilities are not "
                    "materialised in the graph"
                )
            else:
                probs_names.append(tap.probs.name)
                reasons.append(None)
            if reasons[-1]:
                log.warning(
                    "collect-routing: layer %d: %s; key vision tokens come from the hidden-"
                    "state score instead", layer, reasons[-1],
                )  # fmt: skip
        for n in nodes:
            _input_name(n)
        ex = Executor(
            model, taps=list(dict.fromkeys(n for n in probs_names if n)),
            intra_op_threads=ctx.options.threads,
        )  # fmt: skip
        # Experts and top-k from the nodes' attributes: no expert weight is read here.
        acc = RoutingAccumulator(
            [(int(n.attributes["num_experts"].value), int(n.attributes["top_k"].value))
             for n in nodes]
        )  # fmt: skip
        no_query = [0] * len(ex.moe)
        feeds_list, mods = calibration_batches(ds, self.batch_size)
        samples: list[np.ndarray] = []
        first = 0
        for mod in mods:
            samples.append(np.broadcast_to((first + np.arange(len(mod)))[:, None], mod.shape))
            first += len(mod)
        acc.samples = first
        taps_by_layer = {li: [n] for li, n in enumerate(probs_names) if n}
        steps = len(ex.stages) + len(ex.moe)
        with (
            SpillStore(ctx.options.max_memory, ctx.options.spill_dir) as store,
            ctx.bar(steps, "collect routing") as bar,
        ):
            for ev in stream(ex, feeds_list, store, taps=taps_by_layer, tick=lambda: bar.update(1)):
                layer, mod = ev.layer, mods[ev.batch]
                hidden = ev.hidden.reshape(*mod.shape, -1)
                name = probs_names[layer]
                ks = key_scores(ev.value(name) if name else None, hidden, mod)
                if ks.reason and reasons[layer] is None:
                    reasons[layer] = ks.reason
                    log.warning("collect-routing: layer %d: %s", layer, ks.reason)
                no_query[layer] += ks.no_query
                acc.note_score_source(layer, ks.sources)
                acc.add(layer, ev.routing, mod, ks.scores, samples[ev.batch])
            ctx.stat("spilled_bytes", store.spilled)
        return acc.finish(), reasons, no_query

    def _report(
        self, ctx: PassContext, stats: RoutingStats, reasons: list[str | None],
        no_query: list[int], hit: bool,
    ) -> None:  # fmt: skip
        from modec.method.key_vision import HIDDEN_RULE

        fallbacks: list[dict[str, Any]] = []
        for layer, (reason, n) in enumerate(zip(reasons, no_query, strict=True)):
            if reason:
                fallbacks.append({"layer": layer, "reason": reason, "rule": HIDDEN_RULE})
            elif n:
                fallbacks.append(
                    {"layer": layer, "samples": n, "rule": HIDDEN_RULE,
                     "reason": f"{n} sample(s) have no text after their image"}
                )  # fmt: skip
        text = coverage(stats.count_text, self.min_tokens)
        vision = coverage(stats.count_vision, self.min_tokens)
        starved = sum(len(t) + len(v) for t, v in zip(text, vision, strict=True))
        ctx.stat("layers", stats.num_layers)
        ctx.stat("samples", stats.samples)
        ctx.stat("tokens", int(stats.count_all[0].sum()) if stats.num_layers else 0)
        ctx.stat("attention_fallbacks", len(fallbacks))
        ctx.stat("starved", starved)
        ctx.stat("cache_hit", hit)
        ctx.section().update(
            samples=stats.samples,
            count_all=rows(stats.count_all, True),
            count_text=rows(stats.count_text, True),
            count_vision=rows(stats.count_vision, True),
            mean_weight=rows(stats.mean_weight),
            f_text=rows(stats.f_text),
            f_vision=rows(stats.f_vision),
            f_global=rows(stats.f_global),
            score_source=list(stats.score_source),
            coverage={"min_tokens": self.min_tokens, "starved": starved,
                      "layers": [{"text": t, "vision": v} for t, v in zip(text, vision,
                                                                          strict=True)]},
            attention_fallbacks=fallbacks,
            cache_hit=hit,
        )  # fmt: skip
