"""The joint check of an allocation (``--joint select``): the additive objective's blind spot.

MODE's ILP prices an allocation as Σ_e cost(e, b_e): each expert's δ is measured with that
expert alone quantized. Many experts quantized together can hurt more than the sum says —
docs/results_digits.md finding 5: at 2.0 bits over {1, 2, 3, 4} the ILP trades experts down to
1 bit to buy 3- and 4-bit ones and loses to uniform 2-bit. The check measures what the
ILP cannot see, and uses it to choose among allocations the ILP itself proposes:

1. Candidates: the ILP solved over every contiguous range of the candidate widths
   (``{1,2,3,4}``, ``{1,2,3}``, ``{2,3,4}``, ``{1,2}``, ``{2,3}`` …) for which the budget is
   feasible, with the method's own costs. The full range is MODE's allocation; narrower
   ranges force milder allocations (a range holding only the budget width, or with the
   budget as its lowest width under ``sense=eq``, is uniform). Identical allocations are
   measured once.
2. Joint KL of each candidate: the model runs on the calibration set with **every**
   expert quantized at its candidate width on every token, and the KL(p_fp32 ‖
   p_candidate) of the next-token distribution is read at every text position
   (``joint_positions=text``; ``answer``: δ's positions only) and summed per sample. The
   experts are quantized as the deployed model's will be: GPTQ (each (expert, width) some
   candidate uses, once), or RTN under ``--quantizer rtn``. GPTQ is cross-fitted: the
   calibration samples go in two folds and each fold is judged with experts GPTQ'd on the
   other fold's Hessians, so no sample is judged by a fit to its own activations
   (`cross_fitted_kl`). Each choice replaced one that misjudged digits-vlm's allocations
   (docs/joint.md): the whole calibration set, not δ's 32-sample subset (whose 4
   text-only samples missed the text damage that made MODE's 2.0-bit allocation lose to
   uniform); GPTQ, not RTN, because it is what is deployed and it repairs 2-bit experts
   much more than 1-bit ones; cross-fitted, because in-sample GPTQ rated MODE's 2.0-bit
   allocation closer to fp32 than uniform while on new samples it is 6–10× farther;
   every text position, because the 128 answer positions of a calibration set missed
   damage to a text question that the evaluation set shows (at 3.0 bits over {2, 3, 4}
   the answers kept MODE's allocation on two of three seeds, which loses 0.6 points to
   uniform; every text position chose uniform).
3. The default is the narrowest range's allocation — uniform when the budget is one of
   the widths, else the mix of the two widths around it. A wider range's allocation (MODE's
   is the widest) replaces it only when it is significantly closer to fp32: the 95%
   paired bootstrap interval over calibration samples of its joint KL minus the default's
   lies below zero; of those, the lowest joint KL wins. The burden of proof is on spreading
   the widths, because spread is what the additive objective misjudges, and a plain
   "lowest mean KL" within each other's noise picked allocations the evaluation set
   ranks below uniform (docs/joint.md). The mean is over every KL position
   (``weighting=positions``), or with the multimodal and the text-only samples half each
   (``balanced``: a mostly multimodal calibration set otherwise drowns the text-only
   samples' damage; `sample_weights`).

Cost: one model run over the calibration set per distinct candidate (layer-streamed: one
candidate's copy of one MoE layer is held at a time), against δ's probes, which re-run the
model L·E·|bits|·2 times; plus, with GPTQ, two Hessian runs over half the set each and, per
fold, GPTQ of each (expert, width) the candidates use: at most 2·|bits| times
quantize-experts' GPTQ.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from modec.data import VISION, Dataset

log = logging.getLogger(__name__)

#: How step 3 weighs the calibration samples (`sample_weights`).
Weighting = Literal["positions", "balanced"]
#: Which allocation stands in step 3 unless another is significantly closer (`choose`).
Rule = Literal["select", "guard"]
#: The width of an expert a joint run leaves in fp32 (`joint_kl`'s candidates).
FP32 = 0

__all__ = [
    "JointKL",
    "JointQuantizer",
    "calibrate_costs",
    "choose",
    "cross_fitted_kl",
    "folds",
    "guard_default",
    "joint_kl",
    "sample_weights",
    "select_range",
    "width_ranges",
]


def width_ranges(bits: Sequence[int]) -> list[tuple[int, ...]]:
    """Every contiguous range of the sorted widths, the full range first, then by lowest
    width and length: ``(1,2,3,4), (1,), (1,2), (1,2,3), (2,), (2,3), …``."""
    b = sorted(int(x) for x in bits)
    full = tuple(b)
    out = [full]
    for i in range(len(b)):
        for j in range(i + 1, len(b) + 1):
            r = tuple(b[i:j])
            if r != full:
                out.append(r)
    return out


@dataclass(frozen=True)
class JointKL:
    """Mean KL to fp32 of each candidate, over all KL positions and per kind of sample."""

    overall: np.ndarray  # [C]
    multimodal: np.ndarray  # [C]; NaN when the subset has no multimodal sample
    text_only: np.ndarray  # [C]; NaN when the subset has no text-only sample
    positions: int
    seconds: float
    #: [C, S] summed KL of each sample's positions, and [S] how many it has (the samples in
    #: the order of the probe batches): overall = sample_kl.sum(1) / sample_positions.sum().
    sample_kl: np.ndarray | None = None
    sample_positions: np.ndarray | None = None
    #: KL positions of the multimodal and of the text-only samples.
    kind_positions: tuple[int, int] = (0, 0)
    #: [S] whether each sample (as ``sample_kl``'s columns) is multimodal.
    sample_multimodal: np.ndarray | None = None


@dataclass(frozen=True)
class JointQuantizer:
    """How the joint runs quantize the experts: as the deployed model is (``gptq``, with
    Hessians from ``calib`` as quantize-experts computes them) or ``rtn`` (as δ's probes)."""

    method: Literal["gptq", "rtn"] = "gptq"
    calib: Dataset | None = None
    #: calibration batch size of the Hessian run (quantize-experts', for identical sums).
    batch_size: int = 16
    settings: Any = None  # `modec.method.quantize.GPTQSettings`; None: its defaults
    engine: Any = None  # runs GPTQ's experts (`modec.distributed`); None: in process


def _rtn_layers(ex: Any, candidates: Sequence[Sequence[Sequence[int]]], group_size: int
                ) -> Iterator[tuple[int, Callable[[int], Any]]]:  # fmt: skip
    """Per MoE layer in execution order, ``build(c)``: the layer with candidate c's widths,
    RTN-quantized."""
    from modec.numerics.quant import quantize_rtn
    from modec.numerics.schemes import QuantScheme

    for li in range(len(ex.moe)):
        p = ex.params[li]

        def build(c: int, p: Any = p, li: int = li) -> Any:
            w = np.asarray(candidates[c][li])
            kw = {}
            for proj in ("gate", "up", "down"):
                stack = getattr(p, proj)
                if stack is None:
                    continue
                out = np.empty(stack.shape, np.float32)
                for b in sorted(set(w.tolist())):
                    idx = np.flatnonzero(w == b)
                    if b == FP32:
                        out[idx] = stack[idx]
                        continue
                    scheme = QuantScheme(int(b), group_size)
                    out[idx] = quantize_rtn(stack[idx], scheme).dequantize()
                kw[proj] = out
            return replace(p, **kw)

        yield li, build


def _gptq_layers(
    model: ir.Model, candidates: Sequence[Sequence[Sequence[int]]], group_size: int,
    q: JointQuantizer, threads: int, max_memory: int,
) -> Iterator[tuple[int, Callable[[int], Any]]]:  # fmt: skip
    """As `_rtn_layers`, GPTQ'd: each layer's Hessians stream from the calibration set
    (`modec.method.hessians.layer_hessians`, as quantize-experts runs it) and every (expert,
    width) some candidate uses is quantized once; a layer's codes are dropped before the
    next layer's Hessians are built."""
    from modec.method.hessians import layer_hessians
    from modec.method.quantize import GPTQSettings, quantize_projection

    assert q.calib is not None, "GPTQ needs the calibration set"
    settings = q.settings or GPTQSettings()
    for li, hs, p in layer_hessians(model, q.calib, batch_size=q.batch_size, threads=threads,
                                    max_memory=max_memory):  # fmt: skip
        widths = np.asarray([cand[li] for cand in candidates])  # [C, E]
        codes: dict[tuple[str, int, int], Any] = {}
        for proj in ("gate", "up", "down"):
            stack = getattr(p, proj)
            if stack is None:
                continue
            h = hs.h_act if proj == "down" else hs.h_in
            for b in sorted(set(widths.ravel().tolist()) - {FP32}):
                idx = np.flatnonzero((widths == b).any(axis=0))
                res = quantize_projection(
                    stack[idx], (int(b),) * idx.size, group_size, method="gptq",
                    hessians=h[idx], tokens=hs.tokens[idx], settings=settings,
                    label=f"joint check layer {li} {proj}", engine=q.engine,
                )  # fmt: skip
                for k, e in enumerate(idx.tolist()):
                    codes[(proj, e, int(b))] = res.codes[k]
        del hs

        def build(c: int, p: Any = p, li: int = li, codes: Any = codes) -> Any:
            kw = {}
            for proj in ("gate", "up", "down"):
                stack = getattr(p, proj)
                if stack is not None:
                    kw[proj] = np.stack([stack[e] if b == FP32 else
                                         codes[(proj, e, int(b))].dequantize()
                                         for e, b in enumerate(candidates[c][li])])  # fmt: skip
            return replace(p, **kw)

        yield li, build
        del p, codes, build


def joint_kl(
    model: ir.Model,
    subset: Dataset,
    settings: Any,
    candidates: Sequence[Sequence[Sequence[int]]],
    quantizer: JointQuantizer | None = None,
) -> JointKL:
    """Joint KL of each candidate allocation ``[C][layer][expert]`` on ``subset``.

    Args:
        settings: a `modec.method.probes.ProbeSettings` (group size, KL positions, batch
            size, threads, memory bound), as for δ.
        quantizer: how the experts are quantized (default: RTN, as δ's probes).

    The fp32 reference comes from the same layer-streamed run as δ's
    (`modec.method.probes.reference_run`); every candidate then starts from the layer-0
    state and goes through each later step together, so each dense stage's session and
    each MoE layer's weights are read once, and one candidate's copy of one layer is
    held at a time.
    """
    from modec.executor import Executor
    from modec.method.probes import live_after, reference_run, release_step
    from modec.method.sensitivity import kl_divergence

    q = quantizer or JointQuantizer("rtn")
    t0 = time.perf_counter()
    ex = Executor(model, intra_op_threads=settings.threads)
    n_layers = len(ex.moe)
    for c, cand in enumerate(candidates):
        if len(cand) != n_layers or any(len(w) != ex.params[li].num_experts
                                        for li, w in enumerate(cand)):  # fmt: skip
            raise ValueError(f"candidate {c} does not give one width per expert of each layer")
    batches, caches, _, ref = reference_run(ex, subset, settings)
    output = ex.output_names[0]
    steps = ex.steps_from(0)
    keep = live_after(ex, steps, output)
    envs = [[dict(cache.values) for cache in caches] for _ in candidates]

    def advance(i: int, build: Callable[[int], Any] | None) -> None:
        for c in range(len(candidates)):
            params = None if build is None else build(c)
            for env in envs[c]:
                ex.apply_step(steps[i], env, params=params)
                if i < len(steps) - 1:
                    for name in [n for n in env if n not in keep[i]]:
                        del env[name]
            del params  # one candidate's copy of one layer at a time
        release_step(ex, steps[i])

    layers = (
        _gptq_layers(model, candidates, settings.group_size, q, settings.threads,
                     settings.max_memory)
        if q.method == "gptq"
        else _rtn_layers(ex, candidates, settings.group_size)
    )  # fmt: skip
    i = 0
    for li, build in layers:
        while steps[i][0] == "dense":
            advance(i, None)
            i += 1
        assert steps[i] == ("moe", li), (steps[i], li)
        advance(i, build)
        i += 1
    for j in range(i, len(steps)):
        advance(j, None)
    multimodal = [bool((b.modality == VISION).any()) for b in batches]
    sums = np.zeros((len(candidates), 2))
    counts = np.zeros(2)
    sample_kl: list[np.ndarray] = []  # per batch [C, B]
    sample_pos: list[np.ndarray] = []
    sample_mm: list[np.ndarray] = []
    for bi, batch in enumerate(batches):
        split = 0 if multimodal[bi] else 1
        counts[split] += int(batch.positions.sum())
        rows = np.nonzero(batch.positions)[0]  # the sample of each KL position (row order)
        n_rows = batch.positions.shape[0]
        sample_pos.append(np.bincount(rows, minlength=n_rows))
        sample_mm.append(np.full(n_rows, multimodal[bi]))
        per = np.zeros((len(candidates), n_rows))
        for c in range(len(candidates)):
            at = envs[c][bi][output][batch.positions]
            kl = kl_divergence(ref[bi], at)
            sums[c, split] += float(kl.sum())
            per[c] = np.bincount(rows, weights=kl, minlength=n_rows)
        sample_kl.append(per)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_kind = sums / counts
    overall = sums.sum(axis=1) / max(counts.sum(), 1)
    return JointKL(overall, per_kind[:, 0], per_kind[:, 1], int(counts.sum()),
                   time.perf_counter() - t0, np.concatenate(sample_kl, axis=1),
                   np.concatenate(sample_pos), (int(counts[0]), int(counts[1])),
                   np.concatenate(sample_mm))  # fmt: skip


def folds(calib: Dataset, index: np.ndarray, k: int = 2) -> list[np.ndarray]:
    """``index`` (calibration samples) in ``k`` folds: within each kind of sample
    (multimodal, text-only) in index order, sample j goes to fold j mod k."""
    index = np.asarray(index, np.int64)
    kind = calib.multimodal[index]
    fold = np.empty(index.size, np.int64)
    for flag in (True, False):
        at = np.flatnonzero(kind == flag)
        fold[at] = np.arange(at.size) % k
    return [index[fold == f] for f in range(k)]


def cross_fitted_kl(
    model: ir.Model,
    subset: Dataset | np.ndarray,
    settings: Any,
    candidates: Sequence[Sequence[Sequence[int]]],
    quantizer: JointQuantizer | None = None,
) -> JointKL:
    """`joint_kl` where no sample is judged by experts GPTQ'd on its own activations.

    ``subset`` is the calibration set (``quantizer.calib``) or indices into it. With GPTQ
    those samples go in two folds (`folds`), and each fold's KL is measured with the
    experts GPTQ'd on the Hessians of every other calibration sample. GPTQ fits each expert
    to its calibration activations, so judging an allocation on the samples it was fitted
    to can favour allocations that lean on that fit: on digits-vlm, seed 0's in-sample
    figures rank MODE's 2.0-bit allocation closer to fp32 than uniform, the cross-fitted
    ones and the evaluation set the other way (docs/joint.md). With RTN nothing is fitted
    and this is `joint_kl` on the samples. The result's samples are fold 0's then fold
    1's, each in its batch order; ``seconds`` sums both runs.
    """
    q = quantizer or JointQuantizer("rtn")
    if q.method != "gptq":
        ds = subset if isinstance(subset, Dataset) else _need_calib(q).subset(subset)
        return joint_kl(model, ds, settings, candidates, q)
    calib = _need_calib(q)
    index = np.arange(len(calib)) if isinstance(subset, Dataset) else np.asarray(subset)
    if isinstance(subset, Dataset) and len(subset) != len(calib):
        raise ValueError("cross-fitting a part of the calibration set needs its indices")
    parts = [f for f in folds(calib, index) if f.size]
    if len(parts) < 2:
        from modec.errors import BadInputError

        raise BadInputError(
            f"the joint check needs at least 2 calibration samples, got {index.size}; "
            "calibrate with more samples or run without --joint"
        )
    runs = []
    for f in parts:
        rest = np.setdiff1d(np.arange(len(calib)), f)
        runs.append(joint_kl(model, calib.subset(f), settings, candidates,
                             replace(q, calib=calib.subset(rest))))  # fmt: skip
    return _concat(runs)


def _need_calib(q: JointQuantizer) -> Dataset:
    if q.calib is None:
        raise ValueError("the joint check's quantizer has no calibration set")
    return q.calib


def _concat(runs: Sequence[JointKL]) -> JointKL:
    """One `JointKL` over the samples of runs on disjoint samples (position-weighted means)."""
    kls = np.concatenate([_req(r.sample_kl) for r in runs], axis=1)
    pos = np.concatenate([_req(r.sample_positions) for r in runs])
    counts = np.asarray([r.kind_positions for r in runs], np.float64)  # [R, 2]
    kinds = []
    for k, means in enumerate(([r.multimodal for r in runs], [r.text_only for r in runs])):
        n = counts[:, k]
        sums = sum((np.nan_to_num(m) * c for m, c in zip(means, n, strict=True)),
                   np.zeros(kls.shape[0]))  # fmt: skip
        kinds.append(sums / n.sum() if n.sum() else np.full(kls.shape[0], np.nan))
    overall = kls.sum(axis=1) / max(float(pos.sum()), 1.0)
    mm = np.concatenate([_req(r.sample_multimodal) for r in runs])
    return JointKL(overall, kinds[0], kinds[1], int(pos.sum()), sum(r.seconds for r in runs),
                   kls, pos, (int(counts[:, 0].sum()), int(counts[:, 1].sum())), mm)  # fmt: skip


def _req(x: np.ndarray | None) -> np.ndarray:
    assert x is not None, "joint_kl always fills the per-sample KL"
    return x


def choose(
    model: ir.Model,
    subset: Dataset | np.ndarray,
    settings: Any,
    solve: Any,
    bits: Sequence[int],
    quantizer: JointQuantizer | None = None,
    weighting: Weighting = "positions",
    rule: Rule = "select",
) -> tuple[Any, dict[str, Any]]:
    """Solve over every feasible width range, measure each distinct allocation's joint KL,
    keep the narrowest range's allocation unless another is significantly closer to fp32
    (steps 1–3 of the module docstring).

    Args:
        subset: the samples judged, as for `cross_fitted_kl`: the calibration set, or
            indices into it (``quantizer.calib``).
        solve: ``allowed widths → AllocationResult`` (`modec.method.allocate.solve_allocation`
            with the run's costs); an infeasible range raises `InfeasibleBudgetError`.
        bits: the candidate widths of the run.
        quantizer: how the joint runs quantize the experts (default RTN; the pass gives
            the run's quantizer: GPTQ unless ``--quantizer rtn``).
        weighting: how the calibration samples weigh in step 3 (`sample_weights`).
        rule: which allocation stands unless another is significantly closer to fp32:
            ``select`` the narrowest range's; ``guard`` uniform's where the budget is one
            of the widths, else the full range's (MODE's own).

    Returns:
        The chosen `AllocationResult` and the report's ``joint`` entry: every range with its
        widths histogram, additive objective, joint KL (overall, multimodal and text-only
        samples) and its difference to the narrowest range's with a 95% paired bootstrap
        interval over calibration samples; which one is the default and which was chosen;
        the samples, positions and seconds.
    """
    from modec.errors import InfeasibleBudgetError

    tried: list[tuple[tuple[int, ...], Any]] = []
    skipped: list[list[int]] = []
    for allowed in width_ranges(bits):
        try:
            tried.append((allowed, solve(allowed)))
        except InfeasibleBudgetError:
            skipped.append(list(allowed))
    distinct: dict[tuple[tuple[int, ...], ...], int] = {}
    for _, res in tried:
        distinct.setdefault(res.allocation.widths, len(distinct))
    measured = cross_fitted_kl(model, subset, settings, [list(map(list, w)) for w in distinct],
                               quantizer)  # fmt: skip
    assert measured.sample_kl is not None and measured.sample_positions is not None
    of = [distinct[res.allocation.widths] for _, res in tried]
    weights = sample_weights(measured.sample_positions, measured.sample_multimodal, weighting)
    default, best, intervals = select_range(
        [r for r, _ in tried], measured.sample_kl[of], measured.sample_positions, weights,
        default=guard_default(tried) if rule == "guard" else None,
    )  # fmt: skip
    rows = []
    for (allowed, res), c, iv in zip(tried, of, intervals, strict=True):
        rows.append({
            "widths": list(allowed),
            "histogram": {str(k): v for k, v in res.allocation.histogram().items()},
            "objective": res.allocation.objective,
            "kl": float(measured.overall[c]),
            "kl_multimodal": _num(measured.multimodal[c]),
            "kl_text_only": _num(measured.text_only[c]),
            "kl_vs_default": [iv.estimate, iv.low, iv.high],
            "better": bool(iv.high < 0),
            "same_as": next(i for i, (_, r) in enumerate(tried)
                            if distinct[r.allocation.widths] == c),
        })  # fmt: skip
    log.info(
        "allocate-bits: joint check of %d allocation(s) over %d range(s): widths %s chosen "
        "(joint KL %.4g; the default range %s: %.4g; the full range: %.4g)", len(distinct),
        len(tried), rows[best]["widths"], rows[best]["kl"], rows[default]["widths"],
        rows[default]["kl"], rows[0]["kl"],
    )  # fmt: skip
    entry = {
        "candidates": rows, "default": default, "chosen": best, "infeasible": skipped,
        "quantizer": (quantizer or JointQuantizer("rtn")).method, "weighting": weighting,
        "rule": rule,
        "positions": measured.positions, "samples": len(subset),
        "seconds": measured.seconds,
    }  # fmt: skip
    return tried[best][1], entry


def calibrate_costs(
    model: ir.Model,
    sens: Any,
    subset: np.ndarray,
    settings: Any,
    quantizer: JointQuantizer | None = None,
    layers_per_run: int = 4,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per MoE layer l and width b, how far the additive objective's δ is from the damage
    of quantizing the whole layer as deployed (``--calibrate-costs``).

    The ILP adds δ(e, b) over a layer's experts, each measured with that expert alone
    RTN-quantized. Two things separate that sum from what the deployed model does: the
    experts are quantized together, and GPTQ repairs some widths much more than others (on
    facts-vlm a layer's joint GPTQ KL is a fraction of its δ sum at 2 and 3 bits and about
    all of it at 1 bit; docs/joint.md, "Calibrated costs"). So for every (l, b) the model
    runs on δ's own samples with every expert of layer l at width b (quantized by
    ``quantizer``: GPTQ cross-fitted as in `cross_fitted_kl`, or RTN) and the other layers
    in fp32, and the KL to fp32 is read where δ was read; ``scale[l, b]`` = that KL /
    Σ_e (δ_text(e, b) + δ_vision(e, b)), or 1 where the sum is 0. allocate-bits
    multiplies every cost of layer l at width b by it and solves again
    (`modec.method.allocate.solve_allocation`'s ``scale``), so the widths of a layer are
    priced by their joint, deployed damage while the experts keep the order the method
    gives them within a width.

    Args:
        sens: the `modec.facts.Sensitivity` (δ, its positions).
        subset: δ's samples, indices into ``quantizer.calib`` (GPTQ) or the calibration set.
        settings: a `modec.method.probes.ProbeSettings` (positions are taken from ``sens``).
        layers_per_run: layers whose L·|bits| candidates share one joint run (each holds
            one copy of the subset's activations per candidate).

    Cost: L·|bits| model runs over δ's samples (δ's exact probes: L·E·|bits|·2 of them), in
    ⌈L / layers_per_run⌉ joint runs, each with its own fp32 reference and, with GPTQ, two
    Hessian runs over the rest of the calibration set; over all runs, GPTQ of every expert
    at every width once per fold (2·|bits| times quantize-experts' GPTQ, as the joint check).
    """
    bits = tuple(int(b) for b in sens.bits)
    n_layers, n_experts = sens.delta_text.shape[:2]
    additive = (sens.delta_text + sens.delta_vision).sum(axis=1)  # [L, B]
    joint = np.zeros_like(additive)
    st = replace(settings, positions=sens.positions)
    seconds = 0.0
    for lo in range(0, n_layers, max(1, layers_per_run)):
        group = range(lo, min(n_layers, lo + max(1, layers_per_run)))
        cands = [[[b if li == layer else FP32] * n_experts for li in range(n_layers)]
                 for layer in group for b in bits]  # fmt: skip
        run = cross_fitted_kl(model, subset, st, cands, quantizer)
        joint[list(group)] = run.overall.reshape(len(group), len(bits))
        seconds += run.seconds
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(additive > 0, joint / np.where(additive > 0, additive, 1.0), 1.0)
    medians = np.round(np.median(scale, axis=0), 3).tolist()
    log.info("allocate-bits: costs calibrated by the joint KL of each layer at each width "
             "(%d runs, %.1f s): scale per width, median over layers %s", joint.size, seconds,
             dict(zip(bits, medians, strict=True)))  # fmt: skip
    entry = {
        "bits": list(bits), "positions": sens.positions, "samples": len(subset),
        "quantizer": (quantizer or JointQuantizer("rtn")).method,
        "additive": additive.tolist(), "joint": joint.tolist(), "scale": scale.tolist(),
        "seconds": seconds,
    }  # fmt: skip
    return scale, entry


def sample_weights(positions: np.ndarray, multimodal: np.ndarray | None,
                   weighting: Weighting = "positions") -> np.ndarray:  # fmt: skip
    """Each calibration sample's weight in the check's mean KL (step 3).

    ``positions``: its KL positions, so the mean is over positions, and the kind of sample
    with more positions (multimodal, in a mostly multimodal calibration set) dominates it.
    ``balanced``: the multimodal and the text-only samples weigh half each (within a kind,
    still by positions), as MODE's ½ f_text + ½ f_vision weighs the modalities; a set with
    one kind only is weighted by positions.
    """
    w = np.asarray(positions, np.float64).copy()
    if weighting == "positions" or multimodal is None:
        return w
    if weighting != "balanced":
        raise ValueError(f"unknown weighting {weighting!r}")
    kind = np.asarray(multimodal, bool)
    for flag in (True, False):
        total = w[kind == flag].sum()
        if total > 0:
            w[kind == flag] /= total
    return w


def guard_default(tried: Sequence[tuple[tuple[int, ...], Any]]) -> int:
    """``guard``'s standing allocation among ``(range, AllocationResult)`` in `width_ranges`
    order: uniform (a one-width range whose allocation averages the budget, i.e. the budget
    is that width) where there is one, else the full range (index 0: MODE's allocation)."""
    for i, (allowed, res) in enumerate(tried):
        if len(allowed) == 1 and abs(res.allocation.average - res.allocation.budget) < 1e-9:
            return i
    return 0


def select_range(
    ranges: Sequence[tuple[int, ...]], sample_kl: np.ndarray, positions: np.ndarray,
    weights: np.ndarray | None = None, default: int | None = None,
) -> tuple[int, int, list[Any]]:  # fmt: skip
    """Step 3: the default range, the chosen one, and each range's KL difference to the
    default (`modec.stats.Interval`).

    Args:
        ranges: the feasible width ranges, in `width_ranges` order.
        sample_kl: ``[R, S]`` summed joint KL of each calibration sample under each range's
            allocation.
        positions: ``[S]`` KL positions of each sample.
        weights: ``[S]`` each sample's weight (`sample_weights`); default its positions.
        default: the index of the range that stands unless another is significantly closer
            (`guard_default`); None: the narrowest range.

    The default is the narrowest range (fewest widths, then the lowest widths); a range is
    better when the 95% paired bootstrap interval of its weighted mean per-position KL minus
    the default's lies below zero; the chosen range is the better one with the lowest
    weighted mean (the earlier on a tie), or the default. Weighted by positions, the mean is
    the mean over every KL position.
    """
    from modec import stats

    pos = np.asarray(positions, np.float64)
    weight = pos if weights is None else np.asarray(weights, np.float64)
    per_sample = np.asarray(sample_kl, np.float64) / np.maximum(pos, 1.0)
    if default is None:
        default = min(range(len(ranges)), key=lambda i: (len(ranges[i]), tuple(ranges[i])))
    intervals = [stats.paired_bootstrap_difference(p, per_sample[default], weight)
                 for p in per_sample]  # fmt: skip
    mean = (per_sample * weight).sum(axis=1) / max(weight.sum(), 1e-300)
    better = [i for i, iv in enumerate(intervals) if iv.high < 0]
    best = min(better, key=lambda i: (mean[i], i)) if better else default
    return default, best, intervals


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
