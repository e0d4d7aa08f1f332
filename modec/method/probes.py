"""Step 3 of MODE: per-modality sensitivity probes δ_M(e, b) (arXiv 2606.17118, §3.2).

δ_M(e, b) = mean KL(p_fp32 ‖ p_quant) of the next-token distribution, where only expert e of
layer l is RTN-quantized to b bits (gate, up and down) and the quantized weights serve only
the tokens of modality M (the executor's token-masked replacement). KL is read at the
positions `modec.method.sensitivity.kl_positions` chooses and averaged over all of the
subset's positions, so text and vision δ share one scale.

Shared work: per batch, one fp32 run per layer gives the reference log-probabilities and the
cached inputs of layer l; each probe re-runs only layers l..L from that cache. A batch in which
no token of modality M reaches expert e is not re-run: its output is unchanged (KL 0). With
``workers`` > 1 the (layer, expert) probes spread over spawned processes that each build their
own executor from the same model bytes, so the result equals ``workers=1`` exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from modec.data import Dataset
from modec.errors import BadInputError
from modec.facts import Sensitivity

log = logging.getLogger(__name__)


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
    from modec.method.sensitivity import kl_divergence
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


@dataclass(frozen=True)
class ProbeSettings:
    """What the probes measure and how they run (the measure-sensitivity pass's options)."""

    bits: tuple[int, ...]
    group_size: int
    positions: Literal["answer", "text"]
    batch_size: int
    workers: int
    threads: int


def measure_sensitivity(
    model: ir.Model,
    subset: Dataset,
    s: ProbeSettings,
    tick: Callable[[], None] = lambda: None,
) -> tuple[Sensitivity, list[dict[str, Any]], float]:
    """δ_text and δ_vision of every expert at every width of ``s.bits`` on ``subset``.

    Returns:
        The sensitivities, per layer ``{"seconds", "runs"}`` of the probes, and the seconds
        the fp32 reference runs took. ``tick`` is called after every (layer, expert) probe.
    """
    from modec.executor import Executor

    ex = Executor(model, intra_op_threads=1 if s.workers > 1 else s.threads)
    n_layers = len(ex.moe)
    experts = {p.num_experts for p in ex.params}
    if len(experts) != 1:
        raise BadInputError(
            f"measure-sensitivity stores δ as [L, E, B] and needs one expert count for "
            f"every MoE layer; this model has {sorted(experts)}"
        )
    n_exp = experts.pop()
    t0 = time.perf_counter()
    plan = _plan(model, ex, subset, s)
    ref_seconds = time.perf_counter() - t0
    jobs = [(layer, e) for layer in range(n_layers) for e in range(n_exp)]
    results: list[dict[str, Any]] = []
    if s.workers == 1:
        plan.executor = ex
        for layer, e in jobs:
            results.append(_measure_expert(plan, layer, e))
            tick()
    else:
        results = _parallel(plan, jobs, s.workers, tick)
    delta = np.zeros((2, n_layers, n_exp, len(s.bits)))
    used = np.zeros((2, n_layers, n_exp), dtype=bool)
    layers = [{"seconds": 0.0, "runs": 0} for _ in range(n_layers)]
    for r in results:
        delta[:, r["layer"], r["expert"]] = r["delta"]
        used[:, r["layer"], r["expert"]] = r["used"]
        layers[r["layer"]]["seconds"] += r["seconds"]
        layers[r["layer"]]["runs"] += r["runs"]
    for i, entry in enumerate(layers):
        log.info("measure-sensitivity: layer %d: %d re-runs in %.2f s", i, entry["runs"],
                 entry["seconds"])  # fmt: skip
    sens = Sensitivity(
        bits=tuple(s.bits), delta_text=delta[0], delta_vision=delta[1],
        samples=len(subset), unused_text=~used[0], unused_vision=~used[1],
    )  # fmt: skip
    return sens, layers, ref_seconds


def _plan(model: ir.Model, ex: Any, subset: Dataset, s: ProbeSettings) -> _Plan:
    """Batches, fp32 references and per-layer caches (computed once, shared by all probes)."""
    from modec.method.sensitivity import kl_positions, log_softmax

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
        for bidx, feeds in part.batches(s.batch_size):
            mod = part.trimmed_modality(bidx)
            pos = kl_positions(mod, s.positions)
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
        bits=tuple(s.bits), group_size=s.group_size, batches=batches, caches=caches,
        routed=routed, ref_logp=ref, threads=1,
    )  # fmt: skip


def _parallel(
    plan: _Plan, jobs: list[tuple[int, int]], workers: int, tick: Callable[[], None]
) -> list[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent already holds onnxruntime thread pools, which a forked
    # child would inherit in an undefined state.
    ctx = mp.get_context("spawn")
    out: list[dict[str, Any]] = []
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(plan,)
    ) as pool:
        futures = [pool.submit(_worker_job, layer, e) for layer, e in jobs]
        for fut in as_completed(futures):
            out.append(fut.result())
            tick()
    return out
