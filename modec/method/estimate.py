"""The O(L) sensitivity estimator (``--sensitivity fisher``): δ_M(e, b) ≈ ½ Δᵀ G_l Δ.

The exact probes (`modec.method.probes`) re-run layers l+1..L for every (expert, width,
modality, batch) variant of layer l: O(V·L²) layer-runs for V variants per layer. This module
replaces the re-runs by a second-order expansion of the same KL around the fp32 model:

    KL(p ‖ q) ≈ ½ dzᵀ F dz,  F = diag(p) − p pᵀ = Σ_i p_i (e_i − p)(e_i − p)ᵀ,

with dz the change of the logits at a KL position. To first order dz = J_l Δ, where Δ is the
change of MoE layer l's output (only the tokens of modality M routed to expert e move, by
their combine weight times the quantized-minus-fp32 expert output) and J_l the Jacobian of
the logits with respect to that output. So δ ≈ ½ Σ_i (g_iᵀ Δ)² with the output gradients
g_i = J_lᵀ √p_i (e_i − p): one vector-Jacobian product per direction i, and **one backward
pass from the logits gives g_i at every layer at once** — the O(L) of the method.

Directions (`fisher_directions`): per KL position the ``FISHER_TOKENS`` − 1 most probable
tokens, each with c_i = √p_i (e_i − p), and the rest of the vocabulary as one bucket. Σ c cᵀ
is then exactly the Fisher matrix of the distribution coarse-grained to {kept tokens, rest},
so the estimate is the second-order KL of that distribution: a lower bound of the full
one, tight when the prediction is peaked (an answer position of a trained model). Where a
sample has several KL positions (``positions=text``) their directions share a backward pass
with independent ±1 signs drawn from the run's seed (the cross terms vanish in expectation).
The positions of different samples never mix: g_iᵀΔ is summed over each sample's tokens.

How it runs (layer-streamed):

1. One fp32 forward pass, stage by stage over all batches (onnxruntime and the reference
   MoE, as the executor runs them; the batches are the exact probes' batches), that keeps
   each step's inputs from MoE layer 0 on in a `modec.streaming.SpillStore` (RAM up to
   ``max_memory``, memory-mapped files past it) and gives the reference log-probabilities.
2. One backward pass, step by step in reverse: each dense stage is re-run in torch from its
   stored inputs (`_TorchStage`, an interpreter of the stage's ONNX nodes) and each MoE layer
   as `_moe_torch` (top-k choices fixed at the fp32 ones, combine weights differentiable);
   their vector-Jacobian products carry the cotangents of the directions back. At MoE layer
   l the cotangent of its output is g; there, for every expert e and width b, Δ is computed
   on the expert's own tokens only and the sums g_iᵀΔ are taken per sample and modality.
   One step's weights, stored inputs and torch graph are in use at a time; the cotangents
   held are the directions × the values live at that step.

Cost, in runs of one layer over the subset: 1 forward (the reference) + per layer one
torch re-run and n_dir · n_batches vector-Jacobian products (n_dir = FISHER_TOKENS, each about
a forward), plus the E·|bits| quantized experts on their own tokens (|bits| times the
layer's expert work, as the exact probes also pay) — O(L). The exact probes cost
Σ_l V_l · (L − l) tail layer-runs, V_l ≈ 2·E·|bits|·n_batches variants — O(V·L²).

What it leaves out: the KL beyond second order (2-bit experts are not a small
perturbation), routing changes in later layers (top-k choices are held fixed) and the
Fisher mass beyond the coarse-graining. tools/bench_estimator.py measures the result
against the exact δ (docs/sensitivity_estimator.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from modec.data import Dataset
from modec.errors import BadInputError
from modec.facts import Sensitivity
from modec.method.probes import expert_count, probe_batches, release_step

log = logging.getLogger(__name__)

__all__ = [
    "FISHER_TOKENS",
    "UnsupportedOpError",
    "choose_mode",
    "estimate_sensitivity",
    "expert_params",
    "fisher_directions",
]

#: Fisher directions per KL position: the 3 most probable tokens and the rest of the
#: vocabulary as one bucket (a modec choice, measured on the bundled model: 4 give the same
#: δ ranking as 8 with ~0.9× the sum, at half the backward passes; docs/sensitivity_estimator.md).
FISHER_TOKENS = 4


class UnsupportedOpError(BadInputError):
    """The model has an op that the estimator cannot differentiate (use the exact probes)."""


def expert_params(model: ir.Model) -> int:
    """Routed expert weights of the canonical model, from the shapes (no weight is read)."""
    from modec.moe.canonical import is_moe_node
    from modec.moe.reference import INPUT_NAMES

    total = 0
    for node in model.graph:
        if not is_moe_node(node):
            continue
        for name, v in zip(INPUT_NAMES, node.inputs, strict=False):
            if name in ("gate", "up", "down") and v is not None and v.shape is not None:
                total += math.prod(int(d) for d in v.shape.numpy())
    return total


def choose_mode(model: ir.Model, option: str) -> str:
    """``exact`` or ``fisher`` for the ``sensitivity`` option (``auto``: by model size)."""
    from modec.defaults import FISHER_MIN_EXPERT_PARAMS

    if option != "auto":
        return option
    return "fisher" if expert_params(model) >= FISHER_MIN_EXPERT_PARAMS else "exact"


def unsupported_ops(ex: Any) -> list[str]:
    """Ops of the stages after the first MoE layer that `_TorchStage` has no rule for."""
    s0 = ex.moe_stage[0] if ex.moe_stage else 0
    found = {
        f"{n.domain or 'ai.onnx'}::{n.op_type}"
        for st in ex.stages[s0 + 1 :]
        if st.build is not None
        for n in st.build[0]
        if n.domain not in ("", "ai.onnx") or _OPS.get(n.op_type) is None
    }
    return sorted(found)


def fisher_directions(logp: np.ndarray, tokens: int) -> np.ndarray:
    """A factor of the Fisher matrix of the softmax at each position, coarse-grained.

    The ``tokens − 1`` most probable tokens i keep their own direction
    ``c_i = √p_i (e_i − p)``; the rest of the vocabulary R is one bucket with
    ``c_R = √p_R (u_R − p)``, ``u_R = Σ_{i∈R} (p_i / p_R) e_i``. Σ c cᵀ is then exactly the
    Fisher matrix of the distribution over {kept tokens, R} (in the logits' coordinates), so
    ½ Σ (cᵀ dz)² is the second-order KL of that coarse-grained distribution: a lower bound of
    the full one (data processing), equal to it when R holds no mass.

    Args:
        logp: reference log-probabilities ``[N, V]`` (one row per KL position).
        tokens: directions per row (at least 1; at most V are used).

    Returns:
        ``[n, N, V]`` float32, ``n = min(tokens, V)``.
    """
    p = np.exp(np.asarray(logp, dtype=np.float64))
    n_pos, vocab = p.shape
    n = max(1, min(tokens, vocab))
    order = np.argsort(-p, axis=-1, kind="stable")
    rows = np.arange(n_pos)
    out = np.empty((n, n_pos, vocab), dtype=np.float64)
    for i in range(n - 1 if n < vocab else n):
        pi = p[rows, order[:, i]]
        out[i] = -p * np.sqrt(pi)[:, None]
        out[i, rows, order[:, i]] += np.sqrt(pi)
    if n < vocab:  # the rest of the vocabulary as one bucket
        rest = np.ones_like(p, dtype=bool)
        rest[rows[:, None], order[:, : n - 1]] = False
        p_rest = np.where(rest, p, 0.0).sum(-1)
        u = np.where(rest, p, 0.0) / np.maximum(p_rest, 1e-300)[:, None]
        out[n - 1] = np.sqrt(p_rest)[:, None] * (u - p)
    return out.astype(np.float32)


def estimate_sensitivity(
    model: ir.Model,
    subset: Dataset,
    s: Any,
    seed: int = 0,
    tick: Callable[[], None] = lambda: None,
) -> tuple[Sensitivity, list[dict[str, Any]], float]:
    """δ_text and δ_vision of every expert at every width, by the Fisher estimate.

    Args:
        model: the canonical model.
        subset: the sensitivity subset (as the exact probes take it).
        s: the `modec.method.probes.ProbeSettings` (``workers`` is not used: one process).
        seed: signs of the directions when a sample has several KL positions.
        tick: called after every expert of every layer.

    Returns:
        As `modec.method.probes.measure_sensitivity`: the sensitivities, per layer
        ``{"seconds", "runs", "chunks"}`` (``runs`` counts backward passes through the
        layer), and the seconds of the fp32 reference run.
    """
    import torch

    from modec.executor import Executor
    from modec.streaming import SpillStore

    ex = Executor(model, intra_op_threads=s.threads)
    n_layers = len(ex.moe)
    n_exp = expert_count(ex)
    missing = unsupported_ops(ex)
    if missing:
        raise UnsupportedOpError(
            f"--sensitivity fisher cannot differentiate {', '.join(missing)} (after the first "
            "MoE layer); use --sensitivity exact for this model"
        )
    batches = probe_batches(subset, s)
    delta = np.zeros((2, n_layers, n_exp, len(s.bits)))
    used = np.zeros((2, n_layers, n_exp), dtype=bool)
    seconds = [0.0] * n_layers
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, s.threads))
    try:
        with SpillStore(s.max_memory) as store:
            t0 = time.perf_counter()
            steps = [
                ("dense", st) for st in range(ex.moe_stage[0] + 1)
                if ex.stages[st].build is not None
            ] + ex.steps_from(0)  # fmt: skip
            first = steps.index(("moe", 0))
            grad_names = _forward(ex, steps, first, batches, store)
            ref_seconds = time.perf_counter() - t0
            cots, n_pos = _seeds(ex, batches, store, len(steps), seed)
            # backward passes through each layer: one per direction and batch
            n_backward = sum(next(iter(c.values())).shape[0] for c in cots)
            for i in range(len(steps) - 1, first - 1, -1):
                t_step = time.perf_counter()
                kind, idx = steps[i]
                if kind == "moe":
                    _moe_backward(
                        ex, idx, i, batches, store, cots, s, delta, used, grad_names, tick
                    )
                else:
                    _dense_backward(ex, idx, i, store, cots, grad_names)
                seconds[idx if kind == "moe" else _layer_of(ex, idx)] += (
                    time.perf_counter() - t_step
                )
                release_step(ex, steps[i])
    finally:
        torch.set_num_threads(old_threads)
    delta /= max(n_pos, 1)
    layers = [{"seconds": seconds[li], "runs": n_backward, "chunks": 1} for li in range(n_layers)]
    for li in range(n_layers):
        log.info("measure-sensitivity (fisher): layer %d: %.2f s", li, seconds[li])
    sens = Sensitivity(
        bits=tuple(s.bits), delta_text=delta[0], delta_vision=delta[1],
        samples=len(subset), unused_text=~used[0], unused_vision=~used[1],
    )  # fmt: skip
    return sens, layers, ref_seconds


def _layer_of(ex: Any, stage: int) -> int:
    """The MoE layer whose output a dense stage reads first (its cost is booked there)."""
    before = [li for li, st in enumerate(ex.moe_stage) if st < stage]
    return before[-1] if before else 0


def _step_io(ex: Any, step: tuple[str, int]) -> tuple[list[str], list[str]]:
    kind, i = step
    if kind == "dense":
        return list(ex.stages[i].inputs), list(ex.stages[i].outputs)
    node = ex.moe[i]
    return [node.inputs[0].name], [node.outputs[0].name]


def _forward(
    ex: Any, steps: list[tuple[str, int]], first: int, batches: list[Any], store: Any
) -> set[str]:
    """The fp32 run of every batch, stage-major (each stage's session and each layer's
    weights are needed once); from step ``first`` (MoE layer 0) on, every step's inputs are
    kept under ``(batch, step, name)`` and the logits under ``(batch, "logits")``.

    Returns the names that depend on some MoE output (only their cotangents are carried
    back)."""
    envs: list[dict[str, np.ndarray]] = [
        {k: np.asarray(v) for k, v in b.feeds.items()} for b in batches
    ]
    output = ex.output_names[0]
    grad_names: set[str] = set()
    last_use: dict[str, int] = {}
    for i, step in enumerate(steps):
        for n in _step_io(ex, step)[0]:
            last_use[n] = i
    for i, step in enumerate(steps):
        ins, outs = _step_io(ex, step)
        if step[0] == "moe" or any(n in grad_names for n in ins):
            grad_names.update(outs)
        for b, env in enumerate(envs):
            if i >= first:
                for n in ins:
                    store.put((b, i, n), np.asarray(env[n]))
            ex.apply_step(step, env)
            for n in [n for n in env if last_use.get(n, -1) <= i and n != output]:
                del env[n]
        release_step(ex, step)
    for b, (env, batch) in enumerate(zip(envs, batches, strict=True)):
        logits = env[output]
        if logits.shape[:2] != batch.modality.shape:
            raise BadInputError(
                f"output {output!r} has shape {list(logits.shape)}; measure-sensitivity "
                f"needs logits [B, T, V] with B, T = {list(batch.modality.shape)}"
            )
        store.put((b, "logits"), np.asarray(logits))
    return grad_names


def _seeds(
    ex: Any, batches: list[Any], store: Any, n_steps: int, seed: int
) -> tuple[list[dict[str, np.ndarray]], int]:
    """Per batch, the cotangent of the logits ``[n, B, T, V]`` for each Fisher direction."""
    from modec.method.sensitivity import log_softmax

    rng = np.random.default_rng(seed)
    output = ex.output_names[0]
    cots: list[dict[str, np.ndarray]] = []
    n_pos = 0
    for b, batch in enumerate(batches):
        logits = store.get((b, "logits"))
        pos = batch.positions
        n_pos += int(pos.sum())
        dirs = fisher_directions(log_softmax(logits[pos]), FISHER_TOKENS)
        if (pos.sum(axis=1) > 1).any():  # several KL positions per sample: random signs
            dirs = (
                dirs
                * rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=dirs.shape[:2])[
                    ..., None
                ]
            )
        seed_arr = np.zeros((dirs.shape[0], *logits.shape), dtype=np.float32)
        seed_arr[:, pos] = dirs
        cots.append({output: seed_arr})
        store.drop((b, "logits"))
    return cots, n_pos


def _dense_backward(
    ex: Any, stage: int, i: int, store: Any, cots: list[dict[str, np.ndarray]],
    grad_names: set[str],
) -> None:  # fmt: skip
    """Carry every batch's cotangents back through dense stage ``stage`` (step ``i``)."""
    st = ex.stages[stage]
    if not any(o in c for c in cots for o in st.outputs):
        return
    fn = _TorchStage(ex, stage)
    for b, cot in enumerate(cots):
        outs = {o: cot.pop(o) for o in st.outputs if o in cot}
        if not outs:
            continue
        inputs = {n: ex.stage_feed(np.asarray(store.get((b, i, n)))) for n in st.inputs}
        wanted = [n for n in st.inputs if n in grad_names and inputs[n].dtype.kind == "f"]
        grads = _vjp(lambda t: fn(t), inputs, outs, wanted)
        for n, g in grads.items():
            cot[n] = cot[n] + g if n in cot else g


def _vjp(
    fn: Callable[[dict[str, Any]], dict[str, Any]], inputs: Mapping[str, np.ndarray],
    cot: Mapping[str, np.ndarray], wanted: list[str],
) -> dict[str, np.ndarray]:  # fmt: skip
    """Vector-Jacobian products of ``fn`` for each of the cotangents' leading directions."""
    import torch

    if not wanted:
        return {}
    tin = {n: torch.from_numpy(np.array(v)) for n, v in inputs.items()}
    for n in wanted:
        tin[n].requires_grad_(True)
    with torch.enable_grad():
        outs = fn(tin)
        names = [n for n in cot if outs[n].requires_grad]
        n_dir = next(iter(cot.values())).shape[0]
        res = {n: np.zeros((n_dir, *inputs[n].shape), dtype=np.float32) for n in wanted}
        if not names:
            return res
        for k in range(n_dir):
            grads = torch.autograd.grad(
                [outs[n] for n in names], [tin[n] for n in wanted],
                grad_outputs=[torch.from_numpy(np.ascontiguousarray(cot[n][k])) for n in names],
                retain_graph=k + 1 < n_dir, allow_unused=True,
            )  # fmt: skip
            for n, g in zip(wanted, grads, strict=True):
                if g is not None:
                    res[n][k] = g.numpy()
    return res


def _moe_backward(
    ex: Any, layer: int, i: int, batches: list[Any], store: Any,
    cots: list[dict[str, np.ndarray]], s: Any, delta: np.ndarray, used: np.ndarray,
    grad_names: set[str], tick: Callable[[], None],
) -> None:  # fmt: skip
    """At MoE layer ``layer``: the cotangent of the layer's input from that of its output,
    then the estimate of every (expert, width, modality) from the output's cotangent g.

    g of every batch (``FISHER_TOKENS`` times the layer's activations) goes to the spill
    store; the experts are the outer loop, so each is quantized once per width.
    """
    from modec.data import TEXT, VISION
    from modec.moe.reference import Replacement, expert_mlp, replacement_params, route
    from modec.numerics.quant import quantize_rtn
    from modec.numerics.schemes import QuantScheme

    p = ex.params[layer]
    node = ex.moe[layer]
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    routes = []
    for bi, cot in enumerate(cots):
        hidden = np.asarray(store.get((bi, i, x_name)))
        x = hidden.reshape(-1, hidden.shape[-1]).astype(np.float32)
        r = route(p, x)
        routes.append(r)
        g = cot.pop(y_name, None)
        if g is None:
            continue
        store.put((bi, "g"), g.reshape(g.shape[0], -1, g.shape[-1]))
        if x_name in grad_names:

            def layer_fn(t: dict[str, Any], experts: np.ndarray = r.experts) -> dict[str, Any]:
                return {y_name: _moe_torch(p, t[x_name], experts)}

            grads = _vjp(layer_fn, {x_name: hidden}, {y_name: g}, [x_name])
            for n, gr in grads.items():
                cot[n] = cot[n] + gr if n in cot else gr
        del g
    for e in range(p.num_experts):
        weights = [
            {
                proj: quantize_rtn(w[e], QuantScheme(b, s.group_size)).dequantize()
                for proj in ("gate", "up", "down")
                if (w := getattr(p, proj)) is not None
            }
            for b in s.bits
        ]
        for bi, r in enumerate(routes):
            mod = batches[bi].modality.ravel()
            n_samples, t_len = batches[bi].modality.shape
            tok, slot = np.nonzero(r.experts == e)
            for mi, m in enumerate((TEXT, VISION)):
                used[mi, layer, e] |= bool((mod[tok] == m).any())
            if tok.size == 0 or (bi, "g") not in store:
                continue
            hidden = np.asarray(store.get((bi, i, x_name)))
            rows = hidden.reshape(-1, hidden.shape[-1]).astype(np.float32)[tok]
            base = expert_mlp(p, e, rows)
            wts = r.weights[tok, slot][:, None]
            gt = np.asarray(store.get((bi, "g")))[:, tok].astype(np.float64)
            sample = tok // t_len
            for j, w in enumerate(weights):
                rep = Replacement(e, np.ones(1, dtype=bool), **w)
                d = (expert_mlp(p, 0, rows, replacement_params(p, rep)) - base) * wts
                proj = np.einsum("knh,nh->kn", gt, d.astype(np.float64))
                for mi, m in enumerate((TEXT, VISION)):
                    sel = mod[tok] == m
                    if not sel.any():
                        continue
                    per = np.stack(
                        [np.bincount(sample[sel], proj[k, sel], n_samples)
                         for k in range(proj.shape[0])]
                    )  # fmt: skip
                    delta[mi, layer, e, j] += 0.5 * float((per * per).sum())
        tick()
    for bi in range(len(cots)):
        store.drop((bi, "g"))


def _moe_torch(p: Any, hidden: Any, experts: np.ndarray) -> Any:
    """The canonical MoE (`modec.moe.reference.moe_forward`) in torch, with the top-k choice
    fixed to ``experts`` (the fp32 routing) and the combine weights differentiable."""
    import torch

    t = torch.from_numpy
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1]).float()
    logits = x @ t(p.router_weight).T
    if p.router_bias is not None:
        logits = logits + t(p.router_bias)
    idx = t(experts)
    if p.scoring == "sigmoid":
        w = torch.gather(torch.sigmoid(logits), 1, idx)
        if p.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    elif p.softmax_after_topk:
        w = torch.softmax(torch.gather(logits, 1, idx), -1)
    else:
        w = torch.gather(torch.softmax(logits, -1), 1, idx)
        if p.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
    w = w * float(p.routed_scaling_factor)
    out = torch.zeros_like(x)
    for e in np.unique(experts):
        tok_np, slot_np = np.nonzero(experts == e)
        tok, slot = t(tok_np), t(slot_np)
        y = _expert_torch(p, int(e), x[tok])
        out = out.index_add(0, tok, y * w[tok, slot][:, None])
    if p.shared_up is not None and p.shared_down is not None:
        u = x @ t(p.shared_up).T
        g = x @ t(p.shared_gate).T if p.shared_gate is not None else None
        sh = _act_torch(p.shared_activation, g, u, p.alpha, p.limit) @ t(p.shared_down).T
        if p.shared_expert_gate is not None:
            sh = sh * torch.sigmoid(x @ t(p.shared_expert_gate).T)
        out = out + sh
    return out.reshape(shape)


def _expert_torch(p: Any, e: int, x: Any) -> Any:
    import torch

    t = torch.from_numpy
    u = x @ t(p.up[e]).T
    if p.up_bias is not None:
        u = u + t(p.up_bias[e])
    g = None
    if p.gate is not None:
        g = x @ t(p.gate[e]).T
        if p.gate_bias is not None:
            g = g + t(p.gate_bias[e])
    y = _act_torch(p.activation, g, u, p.alpha, p.limit) @ t(p.down[e]).T
    if p.down_bias is not None:
        y = y + t(p.down_bias[e])
    return y


def _act_torch(kind: str, g: Any, u: Any, alpha: float, limit: float) -> Any:
    import torch

    if kind == "gpt_oss":
        g = torch.clamp(g, max=limit)
        u = torch.clamp(u, -limit, limit)
        return (u + 1.0) * (g * torch.sigmoid(g * alpha))
    x = u if g is None else g
    if kind == "silu":
        a = x * torch.sigmoid(x)
    elif kind == "gelu":
        a = 0.5 * x * (1.0 + torch.erf(x / np.sqrt(2.0)))
    else:
        raise BadInputError(f"--sensitivity fisher: unknown MoE activation {kind!r}")
    return a if g is None else a * u


# ---------------------------------------------------------------------- ONNX in torch


class _TorchStage:
    """One dense stage of the executor as a torch function (for its vector-Jacobian product).

    Interprets the stage's ONNX nodes with torch ops, in graph order; 16-bit floats compute
    in float32 as the executor runs them (`modec.executor.upcast_float16`). An op without a
    rule here is an error that names it and says to use ``--sensitivity exact``.
    """

    def __init__(self, ex: Any, stage: int) -> None:
        import torch

        st = ex.stages[stage]
        assert st.build is not None
        self.nodes, init_names = st.build
        self.outputs = list(st.outputs)
        self.stage = stage
        self.inits: dict[str, Any] = {}
        for name in init_names:
            tensor = ex._init_values[name].const_value
            arr = np.asarray(tensor.numpy())
            if arr.dtype.name in ("float16", "bfloat16"):
                arr = arr.astype(np.float32)
            self.inits[name] = torch.from_numpy(np.array(arr))

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        import onnx

        env: dict[str, Any] = dict(self.inits)
        env.update(inputs)
        for node in self.nodes:
            rule = _OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                raise UnsupportedOpError(
                    f"--sensitivity fisher: op {node.domain or 'ai.onnx'}::{node.op_type} "
                    f"(node {node.name!r}, stage {self.stage}) has no gradient rule; use "
                    "--sensitivity exact for this model"
                )
            args = [env[n] if n else None for n in node.input]
            attrs = {a.name: _attr(onnx.helper.get_attribute_value(a)) for a in node.attribute}
            out = rule(args, attrs)
            outs = out if isinstance(out, tuple) else (out,)
            for name, val in zip(node.output, outs, strict=False):
                if name:
                    env[name] = val
        return {n: env[n] for n in self.outputs}


def _attr(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _ints(x: Any) -> list[int]:
    return [int(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]


def _dtype(to: int) -> Any:
    import torch
    from onnx import TensorProto as T

    table: dict[int, Any] = {
        T.FLOAT: torch.float32, T.DOUBLE: torch.float64, T.FLOAT16: torch.float32,
        T.BFLOAT16: torch.float32, T.INT64: torch.int64, T.INT32: torch.int32,
        T.INT8: torch.int8, T.UINT8: torch.uint8, T.BOOL: torch.bool, T.INT16: torch.int16,
    }  # fmt: skip
    if to not in table:
        raise BadInputError(f"--sensitivity fisher: Cast to ONNX type {to} is not supported")
    return table[to]


def _const(attrs: dict[str, Any]) -> Any:
    import onnx
    import torch

    if "value" in attrs:
        arr = onnx.numpy_helper.to_array(attrs["value"])
        if arr.dtype.name in ("float16", "bfloat16"):
            arr = arr.astype(np.float32)
        return torch.from_numpy(np.array(arr))
    for key, dt in (("value_float", torch.float32), ("value_floats", torch.float32),
                    ("value_int", torch.int64), ("value_ints", torch.int64)):  # fmt: skip
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dt)
    raise BadInputError(f"--sensitivity fisher: Constant with attributes {sorted(attrs)}")


def _axes(args: list[Any], attrs: dict[str, Any], pos: int = 1) -> list[int] | None:
    if len(args) > pos and args[pos] is not None:
        return _ints(args[pos])
    return list(attrs["axes"]) if "axes" in attrs else None


def _reduce(fn_name: str) -> Callable[[list[Any], dict[str, Any]], Any]:
    def rule(args: list[Any], attrs: dict[str, Any]) -> Any:
        x = args[0]
        axes = _axes(args, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        if fn_name == "max":
            out = x
            for a in sorted((a % x.dim() for a in axes), reverse=True):
                out = out.amax(dim=a, keepdim=keep)
            return out
        return getattr(x, fn_name)(dim=axes, keepdim=keep)

    return rule


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[[list[Any], dict[str, Any]], Any]:
    return lambda a, _: fn(a[0], a[1])


def _unary(fn: Callable[[Any], Any]) -> Callable[[list[Any], dict[str, Any]], Any]:
    return lambda a, _: fn(a[0])


def _div(a: Any, b: Any) -> Any:
    import torch

    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _reshape(args: list[Any], attrs: dict[str, Any]) -> Any:
    x, shape = args[0], _ints(args[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _unsqueeze(args: list[Any], attrs: dict[str, Any]) -> Any:
    x = args[0]
    axes = _axes(args, attrs) or []
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(args: list[Any], attrs: dict[str, Any]) -> Any:
    x = args[0]
    axes = _axes(args, attrs)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _slice(args: list[Any], attrs: dict[str, Any]) -> Any:
    x = args[0]
    starts, ends = _ints(args[1]), _ints(args[2])
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        if sp <= 0:
            raise BadInputError("--sensitivity fisher: Slice with a step <= 0 is not supported")
        dim = x.shape[ax]
        st = max(0, min(dim, st + dim if st < 0 else st))
        en = max(0, min(dim, en + dim if en < 0 else en))
        index[ax % x.dim()] = slice(st, en, sp)
    return x[tuple(index)]


def _gather(args: list[Any], attrs: dict[str, Any]) -> Any:
    x, idx = args[0], args[1].long()
    axis = int(attrs.get("axis", 0)) % x.dim()
    idx = idx % x.shape[axis]
    flat = x.index_select(axis, idx.reshape(-1))
    return flat.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _gather_elements(args: list[Any], attrs: dict[str, Any]) -> Any:
    import torch

    x, idx = args[0], args[1].long()
    axis = int(attrs.get("axis", 0)) % x.dim()
    return torch.gather(x, axis, idx % x.shape[axis])


def _shape(args: list[Any], attrs: dict[str, Any]) -> Any:
    import torch

    dims = list(args[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _expand(args: list[Any], attrs: dict[str, Any]) -> Any:

    shape = np.broadcast_shapes(tuple(args[0].shape), tuple(_ints(args[1])))
    return args[0].expand(shape)


def _concat(args: list[Any], attrs: dict[str, Any]) -> Any:
    import torch

    return torch.cat([a for a in args if a is not None], dim=int(attrs["axis"]))


def _split(args: list[Any], attrs: dict[str, Any]) -> Any:
    import torch

    x, axis = args[0], int(attrs.get("axis", 0))
    if len(args) > 1 and args[1] is not None:
        sizes = _ints(args[1])
    elif "split" in attrs:
        sizes = list(attrs["split"])
    else:
        n = int(attrs["num_outputs"])
        size = -(-x.shape[axis] // n)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
    return tuple(torch.split(x, sizes, dim=axis))


def _gemm(args: list[Any], attrs: dict[str, Any]) -> Any:
    a, b = args[0], args[1]
    if attrs.get("transA", 0):
        a = a.T
    if attrs.get("transB", 0):
        b = b.T
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        y = y + float(attrs.get("beta", 1.0)) * args[2]
    return y


def _clip(args: list[Any], attrs: dict[str, Any]) -> Any:
    import torch

    x = args[0]
    lo = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
    hi = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def _layer_norm(args: list[Any], attrs: dict[str, Any]) -> Any:
    import torch

    x = args[0]
    axis = int(attrs.get("axis", -1)) % x.dim()
    dims = list(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(var + float(attrs.get("epsilon", 1e-5)))
    y = (x - mean) * inv * args[1]
    if len(args) > 2 and args[2] is not None:
        y = y + args[2]
    return y, mean, inv


def _softmax(log: bool) -> Callable[[list[Any], dict[str, Any]], Any]:
    import torch

    def rule(args: list[Any], attrs: dict[str, Any]) -> Any:
        axis = int(attrs.get("axis", -1))
        fn = torch.log_softmax if log else torch.softmax
        return fn(args[0], dim=axis)

    return rule


def _trilu(args: list[Any], attrs: dict[str, Any]) -> Any:
    import torch

    k = int(args[1]) if len(args) > 1 and args[1] is not None else 0
    return torch.triu(args[0], k) if attrs.get("upper", 1) else torch.tril(args[0], k)


def _cumsum(args: list[Any], attrs: dict[str, Any]) -> Any:
    import torch

    x, axis = args[0], int(args[1])
    if attrs.get("reverse", 0):
        x = torch.flip(x, [axis])
    y = torch.cumsum(x, dim=axis)
    if attrs.get("exclusive", 0):
        y = y - x
    return torch.flip(y, [axis]) if attrs.get("reverse", 0) else y


def _variadic(fn: Callable[[Any, Any], Any]) -> Callable[[list[Any], dict[str, Any]], Any]:
    def rule(args: list[Any], _: dict[str, Any]) -> Any:
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out

    return rule


def _build_ops() -> dict[str, Callable[[list[Any], dict[str, Any]], Any]]:
    import torch

    def cof(args: list[Any], attrs: dict[str, Any]) -> Any:
        v = _const({"value": attrs["value"]}) if "value" in attrs else torch.zeros(1)
        return v.reshape(()).expand(_ints(args[0])).clone()

    return {
        "Identity": _unary(lambda x: x),
        "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
        "Div": _binary(_div), "Pow": _binary(torch.pow),
        "MatMul": _binary(torch.matmul), "Gemm": _gemm,
        "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
        "Neg": _unary(torch.neg), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
        "Abs": _unary(torch.abs), "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid),
        "Erf": _unary(torch.erf), "Relu": _unary(torch.relu), "Sin": _unary(torch.sin),
        "Cos": _unary(torch.cos), "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
        "Not": _unary(torch.logical_not),
        "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
        "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
        "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
        "Xor": _binary(torch.logical_xor),
        "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
        "Sum": _variadic(torch.add),
        "Where": lambda a, _: torch.where(a[0], a[1], a[2]),
        "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"),
        "ReduceMax": _reduce("max"),
        "Softmax": _softmax(False), "LogSoftmax": _softmax(True),
        "Transpose": lambda a, at: a[0].permute(
            list(at["perm"]) if "perm" in at else list(range(a[0].dim()))[::-1]
        ),
        "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
        "Flatten": lambda a, at: a[0].reshape(
            int(np.prod(a[0].shape[: at.get("axis", 1)])), -1
        ),
        "Concat": _concat, "Slice": _slice, "Split": _split,
        "Gather": _gather, "GatherElements": _gather_elements,
        "Shape": _shape, "Size": lambda a, _: torch.tensor(a[0].numel(), dtype=torch.int64),
        "Cast": lambda a, at: a[0].to(_dtype(int(at["to"]))),
        "CastLike": lambda a, _: a[0].to(a[1].dtype),
        "Constant": lambda _, at: _const(at), "ConstantOfShape": cof,
        "Expand": _expand, "Clip": _clip, "LayerNormalization": _layer_norm,
        "Range": lambda a, _: torch.arange(a[0].item(), a[1].item(), a[2].item(),
                                           dtype=a[0].dtype),
        "Trilu": _trilu, "CumSum": _cumsum,
        "Einsum": lambda a, at: torch.einsum(at["equation"], *a),
        "Gelu": lambda a, at: torch.nn.functional.gelu(a[0], approximate=at.get("approximate",
                                                                                 "none")),
    }  # fmt: skip


class _LazyOps(dict[str, Callable[[list[Any], dict[str, Any]], Any]]):
    """The op table, built on first use (keeps torch out of ``import modec``)."""

    def get(self, key: str, default: Any = None) -> Any:
        if not self:
            self.update(_build_ops())
        return super().get(key, default)


_OPS = _LazyOps()
