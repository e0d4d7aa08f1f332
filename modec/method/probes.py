"""Step 3 of MODE: per-modality sensitivity probes δ_M(e, b) (arXiv 2606.17118, §3.2).

δ_M(e, b) = mean KL(p_fp32 ‖ p_quant) of the next-token distribution, where only expert e of
layer l is RTN-quantized to b bits (gate, up and down) and the quantized weights serve only
the tokens of modality M. KL is read at the positions `modec.method.sensitivity.kl_positions`
chooses and averaged over all of the subset's positions, so text and vision δ share one scale.

The probes are exact (each variant re-runs layers l..L) and layer-streamed:

- one fp32 run per batch gives the reference log-probabilities, the routing of every layer
  and the inputs of layer 0; the reference inputs of layer l+1 come from those of layer l by
  running one more layer, so only one layer's reference state is held;
- for layer l, every probe variant (expert e, width b, modality M) of every batch that sends
  a token of M to e (a batch that sends none is not re-run: KL 0) starts from a copy of
  that state, and all variants go through each later stage together — each later stage's
  session and each later layer's weights are needed once per chunk of variants, not once
  per variant. Chunks hold whole experts and are sized to ``max_memory``.

At layer l itself a variant changes only the tokens of M routed to e, so its output is the
fp32 output plus, on those tokens, the combine weight times (quantized − fp32) expert output:
one expert on a few tokens instead of the whole layer (equal to re-running the layer up to
float rounding, ~1e-7 relative). From layer l+1 on every token may change (attention mixes
them), so the later layers re-run in full: the probe stays exact, layer l's variants cost
L − l layer-runs, and a model's probes O(L²) (`modec.method.estimate` is the O(L)
estimate).

The chunks of a layer are independent tasks of the run's engine (`modec.distributed`): in
process one after the other, or as Ray tasks (``modec compile --workers N`` /
``--ray-address``), where the model travels once as a `~modec.portable.PortableModel` (its
weights stay in their files) and the layer's reference state once per layer (`Engine.share`);
each worker builds one executor per model. Every expert's δ comes from its own variants only,
and the chunks come back in order, so the result is the same bytes however the work is split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from modec.cache import Parts
from modec.data import Dataset
from modec.distributed import Engine, SerialEngine, Shared
from modec.errors import BadInputError
from modec.facts import Sensitivity
from modec.portable import PortableModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class _Batch:
    """One batch of the subset: its inputs, trimmed modality and KL positions."""

    feeds: dict[str, np.ndarray]
    modality: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class ProbeSettings:
    """What the probes measure and how they run (the measure-sensitivity pass's options).

    ``max_memory`` bounds the probe variants' activations held at once (chunking);
    ``workers`` is how many chunks can run at once (the engine's parallelism: above 1, a
    layer's experts are dealt to that many chunks, `_chunks`); ``threads`` the onnxruntime
    threads of an in-process run.
    """

    bits: tuple[int, ...]
    group_size: int
    positions: Literal["answer", "text"]
    batch_size: int
    workers: int = 1
    threads: int = 2
    max_memory: int = 2**32


@dataclass(eq=False)
class _Layer:
    """What the variants of one layer need (picklable: shared once per layer with the workers).

    Attributes:
        layer: the MoE layer probed.
        caches: per batch, the fp32 inputs of layer ``layer`` onwards (`LayerCache`).
        routed: per batch, the layer's chosen experts ``[T, k]`` in the fp32 run.
        modality / positions: per batch, trimmed modality and KL positions.
        ref_logp: per batch, reference log-probabilities at the KL positions.
        output: the logits output name.
        bits / group_size: the widths measured and the RTN group size.
    """

    layer: int
    caches: list[Any]
    routed: list[np.ndarray]
    modality: list[np.ndarray]
    positions: list[np.ndarray]
    ref_logp: list[np.ndarray]
    output: str
    bits: tuple[int, ...]
    group_size: int


def _probe_chunk(ex: Any, job: _Layer, experts: list[int], release: bool) -> dict[str, Any]:
    """δ_text and δ_vision of ``experts`` of ``job.layer`` at every width: ``[n, 2, B]``.

    Every (expert, width, modality, batch) variant starts from a copy of the batch's layer
    cache; the variants go through each step of `Executor.steps_from` together.
    """
    from modec.data import TEXT, VISION
    from modec.method.sensitivity import kl_divergence
    from modec.moe.reference import Replacement, moe_forward
    from modec.numerics.quant import quantize_rtn
    from modec.numerics.schemes import QuantScheme

    t0 = time.perf_counter()
    layer = job.layer
    p = ex.params[layer]
    variants: list[tuple[int, int, int, int, Replacement]] = []  # (expert, j, mi, batch, rep)
    used = np.zeros((len(experts), 2), dtype=bool)
    for xi, e in enumerate(experts):
        hits = [
            [(mod.ravel() == m) & (r == e).any(axis=1) for mod, r in zip(job.modality, job.routed,
                                                                       strict=True)]
            for m in (TEXT, VISION)
        ]  # fmt: skip
        used[xi] = [any(h.any() for h in hm) for hm in hits]
        for j, b in enumerate(job.bits):
            scheme = QuantScheme(b, job.group_size)
            weights = {
                proj: quantize_rtn(w[e], scheme).dequantize()
                for proj in ("gate", "up", "down")
                if (w := getattr(p, proj)) is not None
            }
            for mi in range(2):
                for bi, hit in enumerate(hits[mi]):
                    if hit.any():  # else expert e never sees modality M here: KL 0
                        variants.append((e, j, mi, bi, Replacement(e, hit, **weights)))
    envs = [dict(job.caches[v[3]].values) for v in variants]
    steps = ex.steps_from(layer)
    assert steps[0] == ("moe", layer)
    node = ex.moe[layer]
    hidden_name, out_name = node.inputs[0].name, node.outputs[0].name
    ref = {}  # per batch: the layer's fp32 output and routing
    for bi in sorted({v[3] for v in variants}):
        x = np.asarray(job.caches[bi].values[hidden_name])
        r = moe_forward(p, x)
        ref[bi] = (x.reshape(-1, x.shape[-1]).astype(np.float32), r.output, r.routing)
    for v, env in zip(variants, envs, strict=True):
        x, out, routing = ref[v[3]]
        env[out_name] = _replaced_output(p, x, out, routing, v[4])
    n_pos = sum(int(pos.sum()) for pos in job.positions)
    totals = np.zeros((len(experts), 2, len(job.bits)))
    index = {e: xi for xi, e in enumerate(experts)}
    keep = live_after(ex, steps, job.output)

    def read_kl(vi: int) -> None:  # the logits: read the KL now, hold no variant's logits
        e, j, mi, bi = variants[vi][:4]
        at = envs[vi][job.output][job.positions[bi]]
        totals[index[e], mi, j] += float(kl_divergence(job.ref_logp[bi], at).sum())
        envs[vi] = {}

    if len(steps) == 1:  # the layer's output is the model's
        for vi in range(len(variants)):
            read_kl(vi)
    for i, step in enumerate(steps[1:], start=1):
        for vi, env in enumerate(envs):
            ex.apply_step(step, env)
            if i == len(steps) - 1:
                read_kl(vi)
            else:
                for name in [n for n in env if n not in keep[i]]:
                    del env[name]
        if release:
            release_step(ex, step)
    if release:
        release_step(ex, steps[0])
    return {
        "layer": layer, "experts": experts, "delta": totals / max(n_pos, 1), "used": used,
        "runs": len(variants), "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def _replaced_output(p: Any, x: np.ndarray, out: np.ndarray, routing: Any, rep: Any) -> np.ndarray:
    """The layer's output with expert ``rep.expert`` replaced on ``rep.token_mask``, from the
    fp32 output: only the masked tokens routed to the expert change, by their combine weight
    times (replaced − original) expert output. Equals re-running the layer up to float
    rounding (~1e-7 relative), at the cost of one expert on a few tokens instead of the layer.
    """
    from modec.moe.reference import expert_mlp, replacement_params

    tok, slot = np.nonzero(routing.experts == rep.expert)
    keep = rep.token_mask[tok]
    tok, slot = tok[keep], slot[keep]
    if tok.size == 0:
        return out
    rows = x[tok]
    delta = expert_mlp(p, 0, rows, replacement_params(p, rep)) - expert_mlp(p, rep.expert, rows)
    flat = out.reshape(-1, out.shape[-1]).copy()
    np.add.at(flat, tok, delta * routing.weights[tok, slot][:, None])
    return flat.reshape(out.shape)


def live_after(ex: Any, steps: list[tuple[str, int]], output: str) -> list[set[str]]:
    """Per step, the values a later step (or the KL) still reads: a variant holds only
    those, not every intermediate of the layers it went through."""
    reads: list[set[str]] = []
    for kind, i in steps:
        if kind == "dense":
            reads.append(set(ex.stages[i].inputs))
        else:
            reads.append({ex.moe[i].inputs[0].name})
    live: list[set[str]] = [set() for _ in steps]
    acc = {output}
    for i in range(len(steps) - 1, -1, -1):
        live[i] = set(acc)
        acc |= reads[i]
    return live


def release_step(ex: Any, step: tuple[str, int]) -> None:
    """Free what the executor built for one step (a dense stage's session, a MoE layer's
    parameters)."""
    kind, i = step
    if kind == "dense":
        ex.release_stage(i)
    else:
        ex.params.release(i)


def measure_sensitivity(
    model: ir.Model,
    subset: Dataset,
    s: ProbeSettings,
    tick: Callable[[], None] = lambda: None,
    engine: Engine | None = None,
    parts: Parts | None = None,
) -> tuple[Sensitivity, list[dict[str, Any]], float]:
    """δ_text and δ_vision of every expert at every width of ``s.bits`` on ``subset``.

    Args:
        engine: runs the chunks of each layer (`modec.distributed`; default: in process).
            Results are gathered in chunk order and each expert's δ depends on that expert's
            variants only, so they do not depend on the engine or the chunking.
        parts: finished layers of an interrupted run (`modec.cache.Parts`): a layer found
            there is not probed again; every probed layer is stored there as it finishes.

    Returns:
        The sensitivities, per layer ``{"seconds", "runs", "chunks", "resumed"}`` of the
        probes, and the seconds the fp32 reference runs took. ``tick`` is called after
        every expert.
    """
    from modec.executor import Executor

    engine = engine or SerialEngine()
    ex = Executor(model, intra_op_threads=s.threads)
    n_layers = len(ex.moe)
    n_exp = expert_count(ex)
    t0 = time.perf_counter()
    batches, caches, routed, ref = reference_run(ex, subset, s)
    ref_seconds = time.perf_counter() - t0
    delta = np.zeros((2, n_layers, n_exp, len(s.bits)))
    used = np.zeros((2, n_layers, n_exp), dtype=bool)
    layers: list[dict[str, Any]] = []
    # The chunks run with the engine's threads (`modec.distributed`), their onnxruntime
    # sessions too: in process this executor (or one of their own, when the engine's threads
    # are not the run's), elsewhere one per worker from the model's portable form, sent once.
    threads = engine.threads or s.threads
    target: Shared[Any]
    if engine.in_process:
        task_ex = ex if threads == s.threads else Executor(model, intra_op_threads=threads)
        target = engine.share(task_ex)
    else:
        target = engine.share(PortableModel.of(model))
    for layer in range(n_layers):
        found = parts.get(f"layer{layer}") if parts is not None else None
        if found is not None:
            delta[:, layer], used[:, layer] = found["delta"], found["used"]
            entry = {"seconds": float(found["seconds"]), "runs": int(found["runs"]),
                     "chunks": int(found["chunks"]), "resumed": True}  # fmt: skip
            for _ in range(n_exp):
                tick()
        else:
            job = _Layer(
                layer, list(caches), [r[layer] for r in routed],
                [b.modality for b in batches], [b.positions for b in batches], ref,
                ex.output_names[0], tuple(s.bits), s.group_size,
            )  # fmt: skip
            chunks = _chunks(job, n_exp, s)

            def done(i: int, chunks: list[list[int]] = chunks) -> None:
                for _ in chunks[i]:
                    tick()

            results = engine.map(
                _probe_task, chunks, target, engine.share(job), threads,
                label=f"probes layer {layer}", done=done,
            )  # fmt: skip
            entry = {"seconds": 0.0, "runs": 0, "chunks": len(chunks), "resumed": False}
            for r in results:
                for xi, e in enumerate(r["experts"]):
                    delta[:, layer, e] = r["delta"][xi]
                    used[:, layer, e] = r["used"][xi]
                entry["seconds"] += r["seconds"]
                entry["runs"] += r["runs"]
            if parts is not None:
                parts.put(f"layer{layer}", {
                    "delta": delta[:, layer], "used": used[:, layer],
                    "seconds": np.asarray(entry["seconds"], np.float64),
                    "runs": np.asarray(entry["runs"], np.int64),
                    "chunks": np.asarray(entry["chunks"], np.int64),
                })  # fmt: skip
        layers.append(entry)
        log.info(
            "measure-sensitivity: layer %d: %d re-runs in %d chunk(s), %.2f s%s", layer,
            entry["runs"], entry["chunks"], entry["seconds"],
            " (from the cache)" if entry["resumed"] else "",
        )  # fmt: skip
        if layer + 1 < n_layers:
            caches = _advance(ex, caches, layer)
    sens = Sensitivity(
        bits=tuple(s.bits), delta_text=delta[0], delta_vision=delta[1],
        samples=len(subset), unused_text=~used[0], unused_vision=~used[1],
    )  # fmt: skip
    return sens, layers, ref_seconds


def _advance(ex: Any, caches: list[Any], layer: int) -> list[Any]:
    """The fp32 caches of layer ``layer + 1`` from those of ``layer`` (stage-major)."""
    envs = [dict(c.values) for c in caches]
    for step in ex.steps_from(layer):
        if step == ("moe", layer + 1):
            break
        for env in envs:
            ex.apply_step(step, env)
        release_step(ex, step)
    return [ex.cache_at(layer + 1, env) for env in envs]


def reference_run(
    ex: Any, subset: Dataset, s: ProbeSettings
) -> tuple[list[_Batch], list[Any], list[list[np.ndarray]], list[np.ndarray]]:
    """Batches, layer-0 caches, every layer's routing and the reference log-probabilities
    (one layer-streamed fp32 run of the subset)."""
    from modec.method.sensitivity import log_softmax
    from modec.streaming import SpillStore, stream

    output = ex.output_names[0]
    batches = probe_batches(subset, s)
    n_layers = len(ex.moe)
    caches: list[Any] = [None] * len(batches)
    routed: list[list[np.ndarray]] = [[] for _ in batches]
    ref: list[np.ndarray] = []
    with SpillStore(s.max_memory) as store:
        for ev in stream(ex, [b.feeds for b in batches], store):
            routed[ev.batch].append(ev.routing.experts)
            if ev.layer == 0:
                env = {name: store.get((ev.batch, name)) for name in store.names(ev.batch)}
                caches[ev.batch] = ex.cache_at(0, env)
        for bi, batch in enumerate(batches):
            logits = store.get((bi, output))
            if logits.shape[:2] != batch.modality.shape:
                raise BadInputError(
                    f"output {output!r} has shape {list(logits.shape)}; measure-"
                    f"sensitivity needs logits [B, T, V] with B, T = {list(batch.modality.shape)}"
                )
            ref.append(log_softmax(logits[batch.positions]))
    assert all(len(r) == n_layers for r in routed)
    return batches, caches, routed, ref


#: The fixed work of one expert in a chunk per width (its RTN weights), in variants of
#: average length: ~0.06 s a width against ~0.56 s a variant at full width (2,048 x 768, the
#: L = 2 scale model of docs/distributed.md).
EXPERT_WORK = 0.1


def expert_work(job: _Layer, n_exp: int) -> np.ndarray:
    """An estimate of each expert's probe work, in tokens: those of the variants it makes
    (one per width, modality and batch that sends it a token of that modality; a variant
    re-runs the later layers on its batch), plus `EXPERT_WORK` average variants per width."""
    from modec.data import TEXT, VISION

    work = np.zeros(n_exp)
    for mod, r in zip(job.modality, job.routed, strict=True):
        for m in (TEXT, VISION):
            work[np.unique(r[mod.ravel() == m])] += mod.size
    average = float(np.mean([m.size for m in job.modality])) if job.modality else 0.0
    return len(job.bits) * (work + EXPERT_WORK * average)


def _chunks(job: _Layer, n_exp: int, s: ProbeSettings) -> list[list[int]]:
    """Whole experts per chunk, as many as ``s.max_memory`` holds of variant states (an
    estimate: each variant holds one batch's cache) when ``s.workers`` chunks are held at
    once (a local runtime's workers share this machine's memory).

    In process the chunks are consecutive experts. With ``s.workers`` > 1 there are as few
    chunks as the memory allows, a multiple of ``s.workers`` (one per worker when it holds a
    worker's share), and the experts are dealt to them by `expert_work`, largest first, each
    to the chunk with the least work so far: the workers finish a layer together, and each
    builds the later layers' stages once per chunk (docs/distributed.md)."""
    per_batch = [sum(np.asarray(v).nbytes for v in c.values.values()) for c in job.caches]
    per_expert = 2 * len(job.bits) * sum(per_batch)  # every variant of every batch, at most
    fit = max(1, int(s.max_memory // max(per_expert * max(s.workers, 1), 1)))
    if s.workers <= 1:
        return [list(range(i, min(i + fit, n_exp))) for i in range(0, n_exp, fit)]
    count = min(n_exp, s.workers * -(-n_exp // (s.workers * fit)))
    room = -(-n_exp // count)
    work = expert_work(job, n_exp)
    chunks: list[list[int]] = [[] for _ in range(count)]
    load = [0.0] * count
    for e in sorted(range(n_exp), key=lambda e: (-work[e], e)):
        c = min((c for c in range(count) if len(chunks[c]) < room), key=lambda c: (load[c], c))
        chunks[c].append(e)
        load[c] += float(work[e])
    return sorted((sorted(c) for c in chunks if c), key=lambda c: c[0])


#: A worker process's executor for the model it was last sent (`PortableModel.token`).
_EXECUTORS: dict[str, Any] = {}


def _probe_task(experts: list[int], target: Any, job: _Layer, threads: int) -> dict[str, Any]:
    """One chunk of one layer's probes, in process or as a Ray task (`Engine.map`).

    ``target`` is an executor with ``threads`` onnxruntime threads (in process) or the
    model's `PortableModel`: a worker builds one such executor per model and keeps it for
    the next chunks. The stages each chunk builds are released after it, as in process.
    """
    from modec.executor import Executor

    if isinstance(target, PortableModel):
        ex = _EXECUTORS.get(target.token)
        if ex is None:
            _EXECUTORS.clear()  # one model per worker: a previous run's is dropped
            ex = _EXECUTORS[target.token] = Executor(target.load(), intra_op_threads=threads)
    else:
        ex = target
    return _probe_chunk(ex, job, experts, release=True)


def expert_count(ex: Any) -> int:
    """The one expert count of every MoE layer the executor runs (δ is stored [L, E, B]).

    Raises:
        BadInputError: layers with different expert counts.
    """
    experts = {int(n.attributes["num_experts"].value) for n in ex.moe}
    if len(experts) != 1:
        raise BadInputError(
            f"measure-sensitivity stores δ as [L, E, B] and needs one expert count for "
            f"every MoE layer; this model has {sorted(experts)}"
        )
    return experts.pop()


def probe_batches(subset: Dataset, s: Any) -> list[_Batch]:
    """The subset's probe batches: multimodal and text-only samples apart (left padding is
    trimmed per batch, so text-only batches run at their own, short, length), each with its
    modality mask and KL positions."""
    from modec.data import answer_lengths
    from modec.method.sensitivity import kl_positions

    batches: list[_Batch] = []
    mm = subset.multimodal
    for group in (np.flatnonzero(mm), np.flatnonzero(~mm)):
        if group.size == 0:
            continue
        part = subset.subset(group)
        lengths = None if part.answer is None else answer_lengths(part.answer)
        for bidx, feeds in part.batches(s.batch_size):
            mod = part.trimmed_modality(bidx)
            n = None if lengths is None else lengths[bidx]
            batches.append(_Batch(feeds, mod, kl_positions(mod, s.positions, n)))
    return batches
