"""measure-sensitivity: δ_text(e, b) and δ_vision(e, b) of every expert (MODE §3.2).

Reads: `CanonicalMoE`, `Calibration`. Writes: `Sensitivity`. Modifies: nothing. The probes
live in `modec.method.probes`, the KL arithmetic in `modec.method.sensitivity`.

Rules:
1. Subset: ``samples`` calibration samples after a deterministic shuffle with the run's
   ``seed``, text-only samples in proportion (`modec.method.sensitivity.choose_subset`);
   multimodal and text-only samples run in separate batches of at most ``batch_size``.
2. δ_M(e, b) = mean KL(p_fp32 ‖ p_quant) of the next-token distribution, where only expert e
   of layer l is RTN-quantized to b bits at ``group_size`` and the quantized weights serve
   only the tokens of modality M. KL is read at each sample's answer position (the last
   one; the last n where the set has n-token answers, docs/data-format.md) or, with
   ``positions=text``, at every text position.
3. An expert that no token of modality M reaches in the whole subset gets δ_M = 0 (its
   quantized weights are never used for M); it is listed in the report as unused.
4. Cache: with a cache directory, results are stored under a content hash of the model, the
   subset's data and the options that change δ, ``--threads`` included
   (`modec.cache.memoize_parts`); the exact probes also store each finished layer, so a
   stopped compile resumes at the first layer it had not finished (the report marks the
   layers taken from the cache as ``resumed``).
5. The chunks of each layer's experts are tasks of the run's engine (``ctx.engine``: in
   process, or Ray with ``modec compile --workers N`` / ``--ray-address``), each with
   ``--threads`` threads; the result is the same bytes on every engine. The report lists
   the engine's parallelism (``workers``).
6. Layer-streamed (`modec.method.probes`): one layer's fp32 state is held at a time, and a
   layer's probe variants go through each later stage together, in chunks sized to
   ``--max-memory``. The probes stay exact, so their cost grows as O(L²) layer-runs.
7. ``sensitivity``: ``exact`` (rules 2–6), ``fisher`` (δ ≈ ½ Δᵀ G Δ from one backward pass
   per Fisher direction, O(L): `modec.method.estimate`), or ``auto``: ``fisher`` for models
   of at least `modec.defaults.FISHER_MIN_EXPERT_PARAMS` expert weights, else ``exact``;
   when ``auto`` chose ``fisher`` and the model has an op the estimator cannot
   differentiate, the pass logs it, measures exactly and reports the fallback. The mode
   used is reported and, unless exact, part of the cache key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from modec.defaults import BITS, GROUP_SIZE, SENSITIVITY, SENSITIVITY_SAMPLES
from modec.errors import BadInputError
from modec.facts import Calibration, CanonicalMoE, Sensitivity
from modec.pipeline import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


@register
@dataclass
class MeasureSensitivityPass(Pass):
    """Measure per-modality KL sensitivity of every expert; see the module docstring."""

    name = "measure-sensitivity"
    reads = (CanonicalMoE, Calibration)
    writes = (Sensitivity,)
    removed_options: ClassVar[dict[str, str]] = {
        "workers": "give `modec compile --workers N` (or --ray-address): the probes run as "
        "tasks of the run's engine (docs/distributed.md)"
    }
    bits: tuple[int, ...] = BITS
    group_size: int = GROUP_SIZE
    samples: int = SENSITIVITY_SAMPLES
    positions: Literal["answer", "text"] = "answer"
    batch_size: int = 32
    sensitivity: Literal["auto", "exact", "fisher"] = SENSITIVITY

    def __post_init__(self) -> None:
        from modec.numerics.schemes import QuantScheme

        if not self.bits:
            raise BadInputError("measure-sensitivity needs at least one width in bits")
        for b in self.bits:
            QuantScheme(b, self.group_size)  # validates widths and group size
        if self.samples < 1 or self.batch_size < 1:
            raise BadInputError(
                f"samples and batch_size must be at least 1; got {self.samples}, {self.batch_size}"
            )
        if self.positions not in ("answer", "text"):
            raise BadInputError(f"positions must be answer or text; got {self.positions!r}")
        if self.sensitivity not in ("auto", "exact", "fisher"):
            raise BadInputError(
                f"sensitivity must be auto, exact or fisher; got {self.sensitivity!r}"
            )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec import cache
        from modec.method.estimate import FISHER_TOKENS, choose_mode, estimate_sensitivity
        from modec.method.probes import ProbeSettings, measure_sensitivity
        from modec.method.sensitivity import choose_subset

        t_start = time.perf_counter()
        ds = ctx.facts.get(Calibration).data
        seed = ctx.options.seed
        idx = choose_subset(ds.multimodal, self.samples, seed)
        subset = ds.subset(idx)
        settings = ProbeSettings(
            bits=tuple(self.bits), group_size=self.group_size, positions=self.positions,
            batch_size=self.batch_size, workers=ctx.engine.parallelism,
            threads=ctx.options.threads,
            max_memory=ctx.options.max_memory,
        )  # fmt: skip
        opts = {
            "bits": list(self.bits), "group_size": self.group_size, "samples": self.samples,
            "positions": self.positions, "seed": seed, "batch_size": self.batch_size,
            # numpy's BLAS rounds differently with other thread counts (modec.distributed)
            "threads": ctx.options.threads,
        }  # fmt: skip
        mode = choose_mode(model, self.sensitivity)
        if mode == "fisher":  # exact keeps the keys it always had
            opts.update(sensitivity=mode, fisher_tokens=FISHER_TOKENS)
        per_layer: list[dict[str, Any]] = []
        fallback: list[str] = []

        def compute(parts: cache.Parts) -> dict[str, np.ndarray]:
            from modec.moe.canonical import is_moe_node

            nonlocal per_layer
            jobs = sum(
                int(n.attributes["num_experts"].value) for n in model.graph if is_moe_node(n)
            )
            with ctx.bar(jobs, "sensitivity") as bar:
                if mode == "fisher":
                    sens, per_layer, ref_seconds = estimate_sensitivity(
                        model, subset, settings, seed, lambda: bar.update(1)
                    )
                else:
                    sens, per_layer, ref_seconds = measure_sensitivity(
                        model, subset, settings, lambda: bar.update(1), ctx.engine, parts
                    )
            ctx.stat("reference_seconds", ref_seconds)
            return sens.to_arrays()

        from modec.method.estimate import UnsupportedOpError

        try:
            arrays, lookup = cache.memoize_parts(
                ctx.options.cache_dir, "sensitivity", model, subset, opts, compute
            )
        except UnsupportedOpError as exc:
            if self.sensitivity != "auto":
                raise
            log.warning("measure-sensitivity: %s; measuring δ exactly instead", exc)
            fallback.append(str(exc))
            mode = "exact"
            for key in ("sensitivity", "fisher_tokens"):
                opts.pop(key, None)
            arrays, lookup = cache.memoize_parts(
                ctx.options.cache_dir, "sensitivity", model, subset, opts, compute
            )
        sens = replace(Sensitivity.from_arrays(arrays), positions=self.positions,
                       subset=tuple(int(i) for i in idx))  # fmt: skip
        n_mm = int(subset.multimodal.sum())
        unused = {
            m: [[int(l_), int(e)] for l_, e in zip(*np.nonzero(u), strict=True)]
            for m, u in (("text", sens.unused_text), ("vision", sens.unused_vision))
        }
        if unused["text"] or unused["vision"]:
            log.info(
                "measure-sensitivity: %d expert(s) never see text and %d never see vision in "
                "the subset; their δ for that modality is 0", len(unused["text"]),
                len(unused["vision"]),
            )  # fmt: skip
        ctx.facts.put(sens)
        ctx.stat("samples", sens.samples)
        ctx.stat("cache_hit", lookup.hit)
        ctx.stat("runs", sum(r["runs"] for r in per_layer))
        ctx.stat("resumed_layers", sum(bool(r.get("resumed")) for r in per_layer))
        ctx.stat("sensitivity", mode)
        ctx.section().update(sensitivity=mode, sensitivity_option=self.sensitivity)
        if self.sensitivity == "auto":
            from modec.defaults import FISHER_MIN_EXPERT_PARAMS
            from modec.method.estimate import expert_params

            ctx.section().update(
                expert_params=expert_params(model),
                fisher_min_expert_params=FISHER_MIN_EXPERT_PARAMS,
            )
        if fallback:
            ctx.section().update(sensitivity_fallback=fallback[0])
        ctx.section().update(
            bits=list(sens.bits), group_size=self.group_size, samples=sens.samples,
            positions=self.positions, workers=ctx.engine.parallelism,
            subset={"multimodal": n_mm, "text_only": len(idx) - n_mm, "seed": seed},
            delta_text=sens.delta_text.tolist(), delta_vision=sens.delta_vision.tolist(),
            unused=unused, cache_hit=lookup.hit, cache_key=lookup.key,
            cache_path=str(lookup.path) if lookup.path is not None else None,
            seconds=time.perf_counter() - t_start, layers=per_layer,
        )  # fmt: skip
        return PassResult(model, modified=False)
