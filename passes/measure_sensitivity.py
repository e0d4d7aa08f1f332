"""measure-sensitivity: δ_text(e, b) and δ_vision(e, b) of every expert (MODE §3.2).

Reads: ``moe.canonical``, ``calib.data``. Writes: ``sensitivity``
(``ctx.artifacts["sensitivity"]``: `modec.mode.sensitivity.Sensitivity`). Modifies: nothing.

Rules:
1. Subset: ``samples`` calibration samples after a deterministic shuffle with
   ``ctx.options["seed"]`` (default 0), text-only samples in proportion
   (`modec.mode.sensitivity.choose_subset`); multimodal and text-only samples run in
   separate batches of at most ``batch_size`` so text-only ones are not padded.
2. δ_M(e, b) = mean KL(p_fp32 ‖ p_quant) of the next-token distribution, where only expert e
   of layer l is RTN-quantized to b bits at ``group_size`` (gate, up and down; the quantizer
   of `modec.numerics.quant`) and the quantized weights serve only the tokens of modality M
   (the executor's token-masked replacement). KL is read at each sample's answer position
   (the last one) or, with ``positions=text``, at every text position, and averaged over
   all of the subset's positions, so text and vision δ share one scale.
3. Shared work: per batch, one fp32 run per layer gives the reference log-probabilities and
   the cached inputs of layer l; each measurement re-runs only layers l..L from that cache.
   A batch in which no token of modality M reaches expert e is not re-run: its output is
   unchanged and contributes KL 0.
4. An expert that no token of modality M reaches in the whole subset gets δ_M = 0 (its
   quantized weights are never used for M); it is listed in the report as unused.
5. Cache: with ``ctx.options["cache_dir"]`` set, results are stored under a content hash of
   the model (graph and weights), the subset's data and the options that change δ; a re-run
   (another budget, another allocation method) loads them (`modec.cache`). Hit or miss is
   reported.
6. ``workers`` > 1 spreads (layer, expert) jobs over processes (spawn); every worker builds
   its own executor from the same model bytes and gets the same caches and references, so
   the result equals ``workers=1`` exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from modec.errors import BadInputError
from modec.pipeline import Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)

_MODALITIES = ("text", "vision")


@dataclass(frozen=True, eq=False)
class _Batch:
    """One batch of the subset: its inputs, trimmed modality and KL positions."""

    feeds: dict[str, np.ndarray]
    modality: np.ndarray
    positions: np.ndarray


@dataclass(eq=False)
class _Plan:
    """Everything a measurement needs; picklable, sent once to every worker.

    Attributes:
        model_bytes: the canonical model, serialized (workers build their own executor).
        output: the logits output name.
        bits / group_size: the widths measured and the RTN group size.
        batches: the subset's batches.
        caches: ``[batch][layer]`` executor caches of the fp32 run.
        routed: ``[batch][layer]`` chosen experts ``[T, k]`` of the fp32 run.
        ref_logp: ``[batch]`` reference log-probabilities ``[N, V]`` at the KL positions.
        threads: onnxruntime intra-op threads per executor.
    """

    model_bytes: bytes
    output: str
    bits: tuple[int, ...]
    group_size: int
    batches: list[_Batch]
    caches: list[list[Any]]
    routed: list[list[np.ndarray]]
    ref_logp: list[np.ndarray]
    threads: int = 1
    executor: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["executor"] = None  # onnxruntime sessions do not pickle; workers rebuild it
        return state


_WORKER_PLAN: _Plan | None = None


def _init_worker(plan: _Plan) -> None:
    """Process-pool initializer: keep the plan and build this worker's executor."""
    global _WORKER_PLAN
    from modec.executor import Executor

    model = ir.serde.deserialize_model(_proto_from_bytes(plan.model_bytes))
    plan.executor = Executor(model, intra_op_threads=plan.threads)
    _WORKER_PLAN = plan


def _proto_from_bytes(data: bytes) -> Any:
    import onnx

    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return proto


def _worker_job(layer: int, expert: int) -> dict[str, Any]:
    assert _WORKER_PLAN is not None, "worker not initialised"
    return _measure_expert(_WORKER_PLAN, layer, expert)


def _measure_expert(plan: _Plan, layer: int, expert: int) -> dict[str, Any]:
    """δ_text and δ_vision of one expert at every width: ``[2, B]`` plus usage and timing."""
    from modec.data import TEXT, VISION
    from modec.mode.sensitivity import kl_divergence
    from modec.moe.reference import Replacement
    from modec.numerics.quant import quantize_rtn
    from modec.numerics.schemes import QuantScheme

    t0 = time.perf_counter()
    ex = plan.executor
    p = ex.params[layer]
    n_pos = sum(int(b.positions.sum()) for b in plan.batches)
    hits = []
    for m in (TEXT, VISION):
        per_batch = []
        for bi, batch in enumerate(plan.batches):
            mask = batch.modality.ravel() == m
            per_batch.append(mask & (plan.routed[bi][layer] == expert).any(axis=1))
        hits.append(per_batch)
    delta = np.zeros((2, len(plan.bits)))
    runs = 0
    for j, b in enumerate(plan.bits):
        scheme = QuantScheme(b, plan.group_size)
        weights = {
            proj: quantize_rtn(w[expert], scheme).dequantize()
            for proj in ("gate", "up", "down")
            if (w := getattr(p, proj)) is not None
        }
        for mi in range(2):
            total = 0.0
            for bi, batch in enumerate(plan.batches):
                hit = hits[mi][bi]
                if not hit.any():
                    continue  # expert e never sees modality M here: output unchanged, KL 0
                rep = Replacement(expert, hit, **weights)
                res = ex.run_from(plan.caches[bi][layer], replace={layer: rep})
                logits = res.outputs[plan.output]
                at = logits[batch.positions]
                total += float(kl_divergence(plan.ref_logp[bi], at).sum())
                runs += 1
            delta[mi, j] = total / max(n_pos, 1)
    used = [any(h.any() for h in hits[mi]) for mi in range(2)]
    return {
        "layer": layer, "expert": expert, "delta": delta, "used": used, "runs": runs,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


@register
@dataclass
class MeasureSensitivityPass(Pass):
    """Measure per-modality KL sensitivity of every expert; see the module docstring."""

    name = "measure-sensitivity"
    reads = ("moe.canonical", "calib.data")
    writes = ("sensitivity",)
    bits: tuple[int, ...] = (2, 3, 4)
    group_size: int = 128
    samples: int = 32
    positions: Literal["answer", "text"] = "answer"
    workers: int = 1
    batch_size: int = 32

    def __post_init__(self) -> None:
        from modec.numerics.schemes import QuantScheme

        if not self.bits:
            raise BadInputError("measure-sensitivity needs at least one width in bits")
        for b in self.bits:
            QuantScheme(b, self.group_size)  # validates widths and group size
        if self.samples < 1 or self.workers < 1 or self.batch_size < 1:
            raise BadInputError(
                f"samples, workers and batch_size must be at least 1; got {self.samples}, "
                f"{self.workers}, {self.batch_size}"
            )
        if self.positions not in ("answer", "text"):
            raise BadInputError(f"positions must be answer or text; got {self.positions!r}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from modec import cache
        from modec.data import Dataset
        from modec.mode.sensitivity import Sensitivity, choose_subset

        t_start = time.perf_counter()
        ds: Dataset = ctx.artifacts["calib.data"]
        seed = int(ctx.options.get("seed", 0) or 0)
        idx = choose_subset(ds.multimodal, self.samples, seed)
        subset = ds.subset(idx)
        section = ctx.section()
        opts = {
            "bits": list(self.bits), "group_size": self.group_size, "samples": self.samples,
            "positions": self.positions, "seed": seed, "batch_size": self.batch_size,
        }  # fmt: skip
        cache_dir = ctx.options.get("cache_dir")
        path: Path | None = None
        key = ""
        sens = None
        if cache_dir:
            key = cache.content_key("sensitivity", model, subset, opts)
            path = cache.entry_path(cache_dir, "sensitivity", key)
            arrays = cache.load(path, key)
            sens = Sensitivity.from_arrays(arrays) if arrays is not None else None
        hit = sens is not None
        per_layer: list[dict[str, Any]] = []
        if sens is None:
            sens, per_layer = self._measure(model, ctx, subset, len(idx))
            if path is not None:
                cache.store(path, key, sens.to_arrays())
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
        seconds = time.perf_counter() - t_start
        ctx.artifacts["sensitivity"] = sens
        ctx.stat("samples", sens.samples)
        ctx.stat("cache_hit", hit)
        ctx.stat("runs", sum(r["runs"] for r in per_layer))
        section.update(
            bits=list(sens.bits), group_size=self.group_size, samples=sens.samples,
            positions=self.positions, workers=self.workers,
            subset={"multimodal": n_mm, "text_only": len(idx) - n_mm, "seed": seed},
            delta_text=sens.delta_text.tolist(), delta_vision=sens.delta_vision.tolist(),
            unused=unused, cache_hit=hit, cache_key=key or None,
            cache_path=str(path) if path is not None else None,
            seconds=seconds, layers=per_layer,
        )  # fmt: skip
        return PassResult(model, modified=False)

    def _measure(
        self, model: ir.Model, ctx: PassContext, subset: Any, n_samples: int
    ) -> tuple[Any, list[dict[str, Any]]]:
        from modec.executor import Executor
        from modec.mode.sensitivity import Sensitivity

        threads = int(ctx.options.get("threads", 2) or 2)
        ex = Executor(model, intra_op_threads=1 if self.workers > 1 else threads)
        n_layers = len(ex.moe)
        experts = {p.num_experts for p in ex.params}
        if len(experts) != 1:
            raise BadInputError(
                f"measure-sensitivity stores δ as [L, E, B] and needs one expert count for "
                f"every MoE layer; this model has {sorted(experts)}"
            )
        n_exp = experts.pop()
        t0 = time.perf_counter()
        plan = self._plan(model, ex, subset, threads)
        ref_seconds = time.perf_counter() - t0
        jobs = [(layer, e) for layer in range(n_layers) for e in range(n_exp)]
        results: list[dict[str, Any]] = []
        with ctx.bar(len(jobs), "sensitivity") as bar:
            if self.workers == 1:
                plan.executor = ex
                for layer, e in jobs:
                    results.append(_measure_expert(plan, layer, e))
                    bar.update(1)
            else:
                results = self._parallel(plan, jobs, bar)
        delta = np.zeros((2, n_layers, n_exp, len(self.bits)))
        used = np.zeros((2, n_layers, n_exp), dtype=bool)
        layers = [{"seconds": 0.0, "runs": 0} for _ in range(n_layers)]
        for r in results:
            delta[:, r["layer"], r["expert"]] = r["delta"]
            used[:, r["layer"], r["expert"]] = r["used"]
            layers[r["layer"]]["seconds"] += r["seconds"]
            layers[r["layer"]]["runs"] += r["runs"]
        for i, entry in enumerate(layers):
            log.info(
                "measure-sensitivity: layer %d: %d re-runs in %.2f s", i, entry["runs"],
                entry["seconds"],
            )  # fmt: skip
        ctx.stat("reference_seconds", ref_seconds)
        sens = Sensitivity(
            bits=tuple(self.bits), delta_text=delta[0], delta_vision=delta[1],
            samples=n_samples, unused_text=~used[0], unused_vision=~used[1],
        )  # fmt: skip
        return sens, layers

    def _plan(self, model: ir.Model, ex: Any, subset: Any, threads: int) -> _Plan:
        """Batches, fp32 references and per-layer caches (computed once, shared by all jobs)."""
        from modec.mode.sensitivity import kl_positions, log_softmax

        output = ex.output_names[0]
        batches: list[_Batch] = []
        caches: list[list[Any]] = []
        routed: list[list[np.ndarray]] = []
        ref: list[np.ndarray] = []
        mm = subset.multimodal
        # Multimodal and text-only samples in separate batches: left padding is trimmed per
        # batch, so text-only batches run at their own (short) length.
        for group in (np.flatnonzero(mm), np.flatnonzero(~mm)):
            if group.size == 0:
                continue
            part = subset.subset(group)
            for bidx, feeds in part.batches(self.batch_size):
                mod = part.trimmed_modality(bidx)
                pos = kl_positions(mod, self.positions)
                per_layer = []
                logits = None
                routing = None
                for layer in range(len(ex.moe)):
                    res = ex.run(feeds, record_routing=layer == 0, cache_layer=layer)
                    per_layer.append(res.cache)
                    if layer == 0:
                        logits, routing = res.outputs[output], res.routing
                assert logits is not None and routing is not None
                if logits.shape[:2] != mod.shape:
                    raise BadInputError(
                        f"output {output!r} has shape {list(logits.shape)}; measure-"
                        f"sensitivity needs logits [B, T, V] with B, T = {list(mod.shape)}"
                    )
                batches.append(_Batch(feeds, mod, pos))
                caches.append(per_layer)
                routed.append([routing[layer].experts for layer in range(len(ex.moe))])
                ref.append(log_softmax(logits[pos]))
        return _Plan(
            model_bytes=ir.to_proto(model).SerializeToString(), output=output,
            bits=tuple(self.bits), group_size=self.group_size, batches=batches, caches=caches,
            routed=routed, ref_logp=ref, threads=1,
        )  # fmt: skip

    def _parallel(self, plan: _Plan, jobs: list[tuple[int, int]], bar: Any) -> list[dict[str, Any]]:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent already holds onnxruntime thread pools, which a forked
        # child would inherit in an undefined state.
        ctx = mp.get_context("spawn")
        out: list[dict[str, Any]] = []
        with ProcessPoolExecutor(
            max_workers=self.workers, mp_context=ctx, initializer=_init_worker, initargs=(plan,)
        ) as pool:
            futures = [pool.submit(_worker_job, layer, e) for layer, e in jobs]
            for fut in as_completed(futures):
                out.append(fut.result())
                bar.update(1)
        return out
