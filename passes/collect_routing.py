"""collect-routing: per layer × expert routing statistics and GPTQ Hessians (MODE §3.1).

Reads: ``moe.canonical``, ``moe.attention`` (one `AttentionTap` or None per MoE node),
``calib.data`` (a `modec.data.Dataset`). Writes: ``routing.stats``
(``ctx.artifacts["routing.stats"]``: `modec.mode.stats.RoutingStats`). Modifies: nothing.

Rules:
1. The calibration set runs through the executor in batches of ``batch_size`` samples,
   sorted by length so that text-only samples are not padded to image length. Padding
   tokens never count.
2. Per layer and expert: selections over all / text / vision / key-vision / redundant
   vision tokens, the mean combine weight, frequencies normalised within the layer, and
   H_in = Σ x xᵀ (input of gate/up), H_act = Σ a aᵀ (input of down, fp32 weights) over the
   tokens routed to the expert.
3. Key vision tokens (MODE §3.1): per layer and sample, the top ``key_ratio`` of the sample's
   vision tokens (at least 1) by the attention that the text tokens after the image pay
   them, averaged over those queries and over heads; the attention of the layer's block is
   tapped through the executor.
4. Fallback: where the attention cannot be read (no tap, a fused attention op that keeps
   its probabilities inside, an unexpected shape) or a sample has no text after its image,
   the score is the cosine similarity of each vision token's MoE input to the mean MoE input
   of the question tokens (`modec.mode.stats.hidden_key_scores`). Every fallback is logged
   and listed in the report.
5. Cache: with ``ctx.options["cache_dir"]`` set, the statistics (and the fallbacks that
   chose key tokens) are stored under a content hash of the model, the calibration data and
   ``key_ratio`` / ``batch_size`` (`modec.cache`); a re-run with the same inputs loads them.
6. Coverage: experts that received fewer than ``min_tokens`` tokens of a modality are listed
   per layer in the report; their statistics for that modality are unreliable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from modec.errors import BadInputError
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
    """Count routing per modality and accumulate expert-input Hessians; see the module doc."""

    name = "collect-routing"
    reads = ("moe.canonical", "moe.attention", "calib.data")
    writes = ("routing.stats",)
    key_ratio: float = 0.2
    min_tokens: int = 16
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.key_ratio <= 1.0:
            raise BadInputError(f"key_ratio must be in (0, 1]; got {self.key_ratio}")
        if self.batch_size < 1:
            raise BadInputError(f"batch_size must be at least 1; got {self.batch_size}")
        if self.min_tokens < 0:
            raise BadInputError(f"min_tokens must be >= 0; got {self.min_tokens}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec import cache
        from modec.data import Dataset
        from modec.mode.stats import RoutingStats

        ds: Dataset = ctx.artifacts["calib.data"]
        cache_dir = ctx.options.get("cache_dir")
        path = None
        key = ""
        if cache_dir:
            opts = {"key_ratio": self.key_ratio, "batch_size": self.batch_size}
            key = cache.content_key("routing", model, ds, opts)
            path = cache.entry_path(cache_dir, "routing", key)
            arrays = cache.load(path, key)
            if arrays is not None:
                meta = json.loads(str(arrays.pop("__meta__")))
                stats = RoutingStats.from_arrays(arrays)
                ctx.artifacts["routing.stats"] = stats
                self._report(ctx, stats, meta["reasons"], meta["no_query"], hit=True)
                return PassResult(model, modified=False)
        stats, reasons, no_query = self._collect(model, ctx, ds)
        if path is not None:
            meta = json.dumps({"reasons": reasons, "no_query": no_query})
            cache.store(path, key, {**stats.to_arrays(), "__meta__": np.array(meta)})
        ctx.artifacts["routing.stats"] = stats
        self._report(ctx, stats, reasons, no_query, hit=False)
        return PassResult(model, modified=False)

    def _collect(
        self, model: ir.Model, ctx: PassContext, ds: Any
    ) -> tuple[Any, list[str | None], list[int]]:
        """Run the calibration set; the statistics, per-layer fallback reasons and counts."""
        from modec.executor import Executor
        from modec.mode.stats import (
            RoutingAccumulator,
            attention_key_scores,
            hidden_key_scores,
            select_key_tokens,
        )
        from modec.moe.canonical import is_moe_node

        nodes = [n for n in model.graph if is_moe_node(n)]
        taps: list[Any] = list(ctx.artifacts.get("moe.attention") or [])
        if len(taps) != len(nodes):
            raise BadInputError(
                f"moe.attention lists {len(taps)} layers but the model has {len(nodes)} MoE "
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
        hidden_names = [_input_name(n) for n in nodes]
        tap_names = [n for n in probs_names if n] + hidden_names
        ex = Executor(
            model, taps=list(dict.fromkeys(tap_names)),
            intra_op_threads=int(ctx.options.get("threads", 2)),
        )  # fmt: skip
        acc = RoutingAccumulator(ex.params, self.key_ratio)
        # Sort by length: left padding is trimmed per batch, so short (text-only) samples run
        # at their own length instead of the image length.
        lengths = (ds.modality != 0).sum(1)
        order = np.argsort(lengths, kind="stable")
        sub = ds.subset(order)
        no_query = [0] * len(ex.moe)
        n_batches = -(-len(ds) // self.batch_size)
        with ctx.bar(n_batches, "collect routing") as bar:
            for idx, feeds in sub.batches(self.batch_size):
                mod = sub.trimmed_modality(idx)
                res = ex.run(feeds, record_routing=True)
                acc.samples += len(idx)
                for layer in range(len(ex.moe)):
                    hidden = res.taps[hidden_names[layer]].reshape(*mod.shape, -1)
                    scores = None
                    name = probs_names[layer]
                    if name is not None:
                        probs = res.taps[name]
                        if (
                            probs.ndim == 4
                            and probs.shape[0] == mod.shape[0]
                            and probs.shape[2:] == (mod.shape[1],) * 2
                        ):
                            scores = attention_key_scores(probs, mod)
                            acc.note_key_source(layer, "attention")
                        elif reasons[layer] is None:
                            reasons[layer] = (
                                f"attention value {name!r} has shape {list(probs.shape)}, not "
                                f"[B, heads, T, T] = [{mod.shape[0]}, h, {mod.shape[1]}, "
                                f"{mod.shape[1]}]"
                            )
                            log.warning("collect-routing: layer %d: %s", layer, reasons[layer])
                    has_vision = (mod == 2).any(1)
                    if scores is None:
                        scores = hidden_key_scores(hidden, mod)
                        if has_vision.any():
                            acc.note_key_source(layer, "hidden")
                    else:
                        # A sample whose image ends the sequence has no question to read.
                        missing = has_vision & np.isnan(np.where(mod == 2, scores, 0.0)).any(1)
                        if missing.any():
                            fb = hidden_key_scores(hidden, mod)
                            scores = np.where(missing[:, None], fb, scores)
                            no_query[layer] += int(missing.sum())
                            acc.note_key_source(layer, "hidden")
                    key = select_key_tokens(scores, mod, self.key_ratio)
                    acc.add(layer, res.routing[layer], hidden.reshape(mod.size, -1), mod, key)
                bar.update(1)
        return acc.finish(), reasons, no_query

    def _report(
        self, ctx: PassContext, stats: Any, reasons: list[str | None], no_query: list[int],
        hit: bool,
    ) -> None:  # fmt: skip
        fallbacks: list[dict[str, Any]] = []
        for layer, (reason, n) in enumerate(zip(reasons, no_query, strict=True)):
            rule = "cosine similarity of vision MoE inputs to the mean question MoE input"
            if reason:
                fallbacks.append({"layer": layer, "reason": reason, "rule": rule})
            elif n:
                fallbacks.append(
                    {"layer": layer, "samples": n, "rule": rule,
                     "reason": f"{n} sample(s) have no text after their image"}
                )  # fmt: skip
        coverage_layers = []
        for layer in range(stats.num_layers):
            entry = {}
            for key, counts in (
                ("text", stats.count_text[layer]),
                ("vision", stats.count_vision[layer]),
                ("key_vision", stats.count_key[layer]),
            ):
                entry[key] = [int(e) for e in np.flatnonzero(counts < self.min_tokens)]
            coverage_layers.append(entry)
        starved = sum(len(v) for entry in coverage_layers for v in entry.values())
        ctx.stat("layers", stats.num_layers)
        ctx.stat("samples", stats.samples)
        ctx.stat("tokens", int(stats.count_all[0].sum()) if stats.num_layers else 0)
        ctx.stat("attention_fallbacks", len(fallbacks))
        ctx.stat("starved", starved)
        ctx.stat("cache_hit", hit)

        def rows(values: tuple[Any, ...], as_int: bool = False) -> list[list[Any]]:
            return [[int(v) if as_int else float(v) for v in layer] for layer in values]

        ctx.section().update(
            key_ratio=self.key_ratio,
            samples=stats.samples,
            count_all=rows(stats.count_all, True),
            count_text=rows(stats.count_text, True),
            count_vision=rows(stats.count_vision, True),
            count_key=rows(stats.count_key, True),
            count_redundant=rows(stats.count_redundant, True),
            mean_weight=rows(stats.mean_weight),
            f_text=rows(stats.f_text),
            f_vision=rows(stats.f_vision),
            f_vision_all=rows(stats.f_vision_all),
            f_redundant=rows(stats.f_redundant),
            f_global=rows(stats.f_global),
            key_source=list(stats.key_source),
            coverage={"min_tokens": self.min_tokens, "starved": starved,
                      "layers": coverage_layers},
            attention_fallbacks=fallbacks,
            cache_hit=hit,
        )  # fmt: skip
