"""Lower canonical ``ai.modec::MoE`` nodes to Relax with mixed-precision grouped kernels.

One `MoELowering` serves one model, from the per-layer plans of
`modec.lowering.moe_plan.plan_layers` (experts grouped by width, packed weights declared
lazily: packed by the artifact writer, one tensor at a time): its
`convert` method is the ``op_converters["MoE"]`` of `modec.lowering.onnx_import.import_onnx`,
its `add_params` method the `RelaxHook` that turns the packed weights into parameters of
``main``. Per MoE layer, over ``T`` flattened tokens (symbolic) and ``k`` experts per token,
the converter emits, in order:

1. Router (fp32, never quantized): ``logits = x · W_rᵀ (+ b_r)`` as a ``relax.matmul``
   (scheduled later by `schedule_dense_ops`), then the scores and the top-k choice exactly
   as `modec.moe.reference.route`: softmax + top-k (+ renormalisation), softmax over the
   top-k logits, or sigmoid (+ correction bias for the choice, group-limited routing,
   renormalisation); times ``routed_scaling_factor``.
2. Bookkeeping: one small TIR PrimFunc (`modec.lowering.moe_sort`) does a stable counting
   sort of the ``T·k`` (token, slot) pairs by expert *rank*, where experts are ranked by
   width group first (ascending bits) and by index inside a group. It returns, for every
   sorted row, its token (``tok``) and expert (``eid``); for every pair its sorted row
   (``inv``); and the row offsets of every expert in rank order (``offsets [E + 1]``). A
   width group's ``indptr`` is the slice of ``offsets`` over its experts: absolute rows, so
   every group kernel reads and writes one shared sorted buffer.
3. ``xs = take(x, tok)`` gathers the rows ``[T·k, H]``.
4. Per projection (gate, up, down) and per width group, one grouped kernel
   (`modec.kernels.grouped_moe`): the first group's call allocates the output ``[T·k, N]``
   (``call_tir``), the other groups write their own row ranges into it
   (``call_tir_inplace``). The ranges of all groups cover all ``T·k`` rows, so a layer with
   widths {2, 3, 4} launches 3 x 3 = 9 kernels regardless of E.
5. Activation (``silu``, ``gelu`` or ``gpt_oss``, optionally gated) and per-expert biases
   (``take(bias, eid)``) as element-wise Relax ops between the kernels.
6. Combine without a scatter: ``take(y, inv)`` puts every pair back in (token, slot) order,
   ``[T, k, H] · weights[T, k, 1]`` summed over ``k``; deterministic (no atomics).
7. Shared expert in fp32 (``relax.matmul`` with transposed weights, optional sigmoid gate).

Parameters the converter creates are named ``moe{layer}.{what}``: the packed experts
``moe{l}.{proj}.w{bits}.codes|scale|zero`` and the fp32 router / bias / shared-expert
weights (transposed to ``[K, N]`` so the dense scheduler takes them as projections).
The node's own initializers (the dequantized experts among them) become unused and
`add_params` drops them from ``main``: they never reach ``weights.safetensors``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from modec.errors import InternalError, ModelError
from modec.kernels import grouped_moe, grouped_moe_a8
from modec.kernels.target import TargetLike, is_cuda, resolve_target
from modec.lowering.dense import DenseModule
from modec.lowering.moe_plan import LayerPlan, PackedStack, moe_section, plan_layers
from modec.lowering.moe_sort import sort_primfunc
from modec.moe.lazy import LazyArray
from modec.moe.reference import MoEParams

# plan_layers and moe_section are re-exported: callers build the plans and the manifest
# section from here, next to the lowering that consumes them.
__all__ = ["MoELowering", "moe_section", "plan_layers"]

logger = logging.getLogger(__name__)


@dataclass
class MoELowering:
    """Lowers the MoE nodes of one canonical model; see the module docstring.

    Use ``op_converters={"MoE": lowering.convert}`` and ``hooks=[lowering.add_params]``
    with `modec.lowering.dense.lower_dense` / `modec.lowering.build.build_artifact`.

    Attributes:
        plans: one `LayerPlan` per MoE node, in graph order.
        target: the compile target ("llvm", or CUDA: fp16 grouped kernels, one-thread sort).
        new_params: parameters created by the converter, name -> (Relax var, array).
        kernels: per layer, the grouped-kernel launches as (projection, bits, E_w).
        omitted_weights: expert stacks left out of the imported graph (counted as dropped).
    """

    plans: list[LayerPlan]
    target: TargetLike = "llvm"
    omitted_weights: int = 0
    new_params: dict[str, tuple[relax.Var, np.ndarray | LazyArray]] = field(default_factory=dict)
    kernels: list[list[tuple[str, int, int]]] = field(default_factory=list)
    _funcs: dict[tuple[Any, ...], relax.GlobalVar] = field(default_factory=dict)
    _next: int = 0

    @functools.cached_property
    def _target(self) -> tvm.target.Target:
        return resolve_target(self.target)

    @functools.cached_property
    def _gpu(self) -> bool:
        return is_cuda(self._target)

    # ------------------------------------------------------------------ parameters

    def new_param(self, name: str, array: np.ndarray | LazyArray) -> relax.Var:
        if name in self.new_params:
            raise InternalError(f"lower-tvm: parameter {name} created twice")
        # Packed experts stay lazy: the artifact writer packs them one tensor at a time.
        arr = array if isinstance(array, LazyArray) else np.ascontiguousarray(array)
        var = relax.Var(name, relax.TensorType([int(d) for d in arr.shape], str(arr.dtype)))
        self.new_params[name] = (var, arr)
        return var

    def add_params(self, dm: DenseModule) -> DenseModule:
        """RelaxHook: add the converter's parameters to ``main``, drop unused weights.

        The new parameters follow the imported weights that are still used, in creation
        order; `DenseModule.params` is rebuilt in the same order.
        """
        main = dm.mod["main"]
        n_in = int(main.attrs["num_input"])
        used = {v.name for v in relax.analysis.free_vars(main.body)}
        kept = [p for p in main.params[n_in:] if p.name in used]
        # The expert stacks never reach the importer (`lowering_proto`): dropped as well.
        dropped = len(main.params) - n_in - len(kept) + self.omitted_weights
        added = [v for v, _ in self.new_params.values()]
        missing = [v.name for v in added if v.name not in used]
        if missing:
            raise InternalError(f"lower-tvm: created parameters never used: {missing[:4]}")
        params = {p.name: dm.params[p.name] for p in kept}
        for name, (_, arr) in self.new_params.items():
            if name in params:
                raise ModelError(
                    f"lower-tvm: parameter name {name} clashes with a model initializer; "
                    "rename the initializer"
                )
            params[name] = arr
        func = relax.Function(
            list(main.params[:n_in]) + kept + added, main.body, main.ret_ty, main.is_pure,
            main.attrs,
        )  # fmt: skip
        mod = dm.mod
        mod[mod.get_global_var("main")] = func
        stats = {
            **dm.stats,
            "moe_layers": len(self.plans),
            "moe_kernels": sum(len(k) for k in self.kernels),
            "weights_dropped": dropped,
        }
        logger.info(
            "lower-tvm: %d MoE layers, %d grouped kernel launches, %d dense weights dropped",
            len(self.plans), stats["moe_kernels"], dropped,
        )  # fmt: skip
        return replace(dm, mod=mod, params=params, stats=stats)

    # ------------------------------------------------------------------ kernels

    def _func(self, bb: relax.BlockBuilder, key: tuple[Any, ...], make: Any, name: str) -> Any:
        if key not in self._funcs:
            func = make().with_attr("global_symbol", name).with_attr("op_pattern", 8)
            if self._gpu:  # already bound to threads: dlight's default schedules skip it
                func = func.with_attr("tirx.is_scheduled", True)
            self._funcs[key] = bb.add_func(func, name)
        return self._funcs[key]

    def _grouped(self, bb: relax.BlockBuilder, pw: PackedStack, e_w: int) -> Any:
        s = pw.scheme
        key = ("grouped", s.bits, s.group_size, pw.n, pw.k, e_w)
        name = f"modec_moe_{s.name}_n{pw.n}_k{pw.k}_e{e_w}"

        def make() -> tirx.PrimFunc:
            return grouped_moe.primfunc(s, pw.n, pw.k, e_w, self._target, "int64")["main"]

        return self._func(bb, key, make, name)

    def _grouped_a8(self, bb: relax.BlockBuilder, pw: PackedStack, e_w: int) -> Any:
        s = pw.scheme
        key = ("grouped_a8", s.bits, s.group_size, pw.n, pw.k, e_w)
        name = f"modec_moe_a8_{s.name}_n{pw.n}_k{pw.k}_e{e_w}"

        def make() -> tirx.PrimFunc:
            return grouped_moe_a8.primfunc(s, pw.n, pw.k, e_w, self._target)["main"]

        return self._func(bb, key, make, name)

    # ------------------------------------------------------------------ converter

    def convert(self, bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any]) -> Any:
        """op_converters["MoE"]: the Relax expression of the next MoE node (graph order)."""
        if self._next >= len(self.plans):
            raise InternalError(
                f"lower-tvm: MoE node number {self._next + 1} has no plan "
                f"({len(self.plans)} planned); the imported graph differs from the planned one"
            )
        plan = self.plans[self._next]
        self._next += 1
        p = plan.params
        if int(attrs.get("num_experts", p.num_experts)) != p.num_experts:
            raise InternalError(f"lower-tvm: MoE node {plan.node_name}: attributes do not match")
        x = inputs[0]
        shape = list(x.ty.shape.values)
        hidden = int(p.router_weight.shape[1])
        if len(shape) < 1 or not isinstance(shape[-1], tirx.IntImm) or int(shape[-1]) != hidden:
            raise ModelError(
                f"MoE node {plan.node_name}: hidden input has shape {shape}, the router "
                f"expects last dim {hidden}"
            )
        tokens: Any = tirx.IntImm("int64", 1)
        for d in shape[:-1]:
            tokens = tokens * d
        tokens = tvm.sym.Analyzer().simplify(tokens)
        x2 = bb.emit(relax.op.reshape(x, [tokens, hidden]))
        if x2.ty.dtype != "float32":
            x2 = bb.emit(relax.op.astype(x2, "float32"))
        weights, experts = self._route(bb, plan, x2)
        out = self._experts(bb, plan, x2, tokens, weights, experts)
        shared = self._shared(bb, plan, x2)
        if shared is not None:
            out = bb.emit(relax.op.add(out, shared))
        return relax.op.reshape(out, shape)

    def _route(self, bb: relax.BlockBuilder, plan: LayerPlan, x2: Any) -> tuple[Any, Any]:
        p, pre, k = plan.params, f"moe{plan.layer}", plan.params.top_k
        wr = self.new_param(f"{pre}.router.weight_t", p.router_weight.T.astype(np.float32))
        logits = bb.emit(relax.op.matmul(x2, wr))
        if p.router_bias is not None:
            logits = bb.emit(
                relax.op.add(logits, self.new_param(f"{pre}.router.bias", p.router_bias))
            )

        def topk(v: Any, kk: int) -> tuple[Any, Any]:
            both = bb.emit(relax.op.topk(v, kk, axis=-1, ret_type="both", dtype="int64"))
            return bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))

        if p.scoring == "sigmoid":
            scores = bb.emit(relax.op.sigmoid(logits))
            choice = scores
            if p.correction_bias is not None:
                cb = self.new_param(f"{pre}.router.correction_bias", p.correction_bias)
                choice = bb.emit(relax.op.add(scores, cb))
            if p.n_group > 1:
                choice = self._group_limit(bb, p, choice)
            _, experts = topk(choice, k)
            weights = bb.emit(relax.op.gather_elements(scores, experts, axis=1))
            if p.norm_topk_prob:
                den = bb.emit(relax.op.sum(weights, axis=[-1], keepdims=True))
                den = bb.emit(relax.op.add(den, relax.const(1e-20, "float32")))
                weights = bb.emit(relax.op.divide(weights, den))
        elif p.softmax_after_topk:
            top, experts = topk(logits, k)
            weights = bb.emit(relax.op.nn.softmax(top, axis=-1))
        elif p.scoring == "softmax":
            scores = bb.emit(relax.op.nn.softmax(logits, axis=-1))
            weights, experts = topk(scores, k)
            if p.norm_topk_prob:
                den = bb.emit(relax.op.sum(weights, axis=[-1], keepdims=True))
                weights = bb.emit(relax.op.divide(weights, den))
        else:
            raise ModelError(f"MoE node {plan.node_name}: unknown scoring {p.scoring!r}")
        if p.routed_scaling_factor != 1.0:
            factor = relax.const(np.float32(p.routed_scaling_factor), "float32")
            weights = bb.emit(relax.op.multiply(weights, factor))
        return weights, experts

    @staticmethod
    def _group_limit(bb: relax.BlockBuilder, p: MoEParams, choice: Any) -> Any:
        # DeepSeek-V3 group-limited routing (docs/ir.md): group score = sum of its top-2
        # choice scores; keep the topk_group best groups, mask the others to -inf. The kept
        # groups are those scoring >= the topk_group-th best score (equal on exact ties only).
        e, g = p.num_experts, p.n_group
        t = choice.ty.shape.values[0]
        grouped = bb.emit(relax.op.reshape(choice, [t, g, e // g]))
        top2 = bb.emit(
            relax.op.topk(grouped, min(2, e // g), axis=-1, ret_type="values", dtype="int64")
        )
        gscore = bb.emit(relax.op.sum(top2, axis=[-1]))
        kth = bb.emit(relax.op.topk(gscore, p.topk_group, axis=-1, ret_type="values"))
        thresh = bb.emit(
            relax.op.strided_slice(kth, axes=[1], begin=[p.topk_group - 1], end=[p.topk_group])
        )
        keep = bb.emit(relax.op.greater_equal(gscore, thresh))  # [T, G]
        keep = bb.emit(relax.op.repeat(keep, e // g, axis=1))  # [T, E]
        ninf = relax.const(np.float32(-np.inf), "float32")
        return bb.emit(relax.op.where(keep, choice, ninf))

    def _experts(
        self, bb: relax.BlockBuilder, plan: LayerPlan, x2: Any, tokens: Any, weights: Any,
        experts: Any,
    ) -> Any:  # fmt: skip
        p, pre, k = plan.params, f"moe{plan.layer}", plan.params.top_k
        e_count = p.num_experts
        hidden = int(p.router_weight.shape[1])
        rows = tvm.sym.Analyzer().simplify(tokens * k)
        sort = self._func(
            bb,
            ("sort", e_count, k),
            lambda: sort_primfunc(e_count, k, gpu=self._gpu),
            f"modec_moe_sort_e{e_count}_k{k}",
        )
        idx = relax.TensorType([rows], "int64")
        res = bb.emit(
            relax.call_tir(
                sort,
                [experts, relax.const(plan.rank, "int64")],
                [idx, idx, idx, relax.TensorType([e_count + 1], "int64")],
            )
        )
        tok, eid, inv, offsets = (bb.emit(relax.TupleGetItem(res, i)) for i in range(4))
        xs = bb.emit(relax.op.take(x2, tok, axis=0, mode="clip"))
        indptr = [
            bb.emit(
                relax.op.strided_slice(
                    offsets, axes=[0], begin=[g.start], end=[g.start + len(g.experts) + 1]
                )
            )
            for g in plan.groups
        ]
        launches: list[tuple[str, int, int]] = []

        # The CUDA kernels take and return fp16 (fp32 accumulation); the CPU kernels fp32,
        # or int8 per group (`grouped_moe_a8`) where the node says so.
        act = "float16" if self._gpu else "float32"
        int8 = bool(p.act_bits)
        quantized: dict[int, list[Any]] = {}  # id of an expert input -> its XQ, D, XS

        def project(proj: str, inp: Any, n: int) -> Any:
            y: Any = None
            out_ty = relax.TensorType([rows, n], act)
            if act != "float32":
                inp = bb.emit(relax.op.astype(inp, act))
            for g, ip in zip(plan.groups, indptr, strict=True):
                pw = g.packed[proj]
                base = f"{pre}.{proj}.w{g.bits}"
                weights_ = [
                    ip, self.new_param(f"{base}.codes", pw.codes),
                    self.new_param(f"{base}.scale", pw.scale),
                    self.new_param(f"{base}.zero", pw.zero),
                ]  # fmt: skip
                if int8:
                    gs = pw.scheme.group_size
                    if gs != p.act_group_size:
                        raise ModelError(
                            f"MoE layer {plan.layer}: act_group_size={p.act_group_size} but its "
                            f"experts are packed in groups of {gs}; quantize-experts sets both"
                        )
                    if id(inp) not in quantized:  # up and gate share their input
                        quantized[id(inp)] = int8_rows(bb, inp, rows, pw.k, gs)
                    args = [*quantized[id(inp)], *weights_]
                    gv = self._grouped_a8(bb, pw, len(g.experts))
                else:
                    args = [inp, *weights_]
                    gv = self._grouped(bb, pw, len(g.experts))
                if y is None:
                    y = bb.emit(relax.call_tir(gv, args, out_ty))
                else:
                    y = bb.emit(relax.call_tir_inplace(gv, [*args, y], len(args), out_ty))
                launches.append((proj, g.bits, len(g.experts)))
            if act != "float32":
                y = bb.emit(relax.op.astype(y, "float32"))
            bias = {"gate": p.gate_bias, "up": p.up_bias, "down": p.down_bias}[proj]
            if bias is not None:
                b = self.new_param(f"{pre}.{proj}.bias", bias)
                y = bb.emit(relax.op.add(y, relax.op.take(b, eid, axis=0, mode="clip")))
            return y

        inter = int(p.up.shape[1])
        u = project("up", xs, inter)
        g = project("gate", xs, inter) if p.gate is not None else None
        a = _activation(bb, p.activation, g, u, p.alpha, p.limit)
        y = project("down", a, hidden)
        self.kernels.append(launches)
        back = bb.emit(relax.op.take(y, inv, axis=0, mode="clip"))
        back = bb.emit(relax.op.reshape(back, [tokens, k, hidden]))
        w3 = bb.emit(relax.op.reshape(weights, [tokens, k, 1]))
        return bb.emit(relax.op.sum(relax.op.multiply(back, w3), axis=[1]))

    def _shared(self, bb: relax.BlockBuilder, plan: LayerPlan, x2: Any) -> Any:
        p, pre = plan.params, f"moe{plan.layer}"
        if p.shared_up is None or p.shared_down is None:
            return None

        def linear(name: str, w: np.ndarray) -> Any:
            return bb.emit(relax.op.matmul(x2, self.new_param(f"{pre}.shared.{name}_t", w.T)))

        u = linear("up", p.shared_up)
        g = linear("gate", p.shared_gate) if p.shared_gate is not None else None
        a = _activation(bb, p.shared_activation, g, u, p.alpha, p.limit)
        s = bb.emit(relax.op.matmul(a, self.new_param(f"{pre}.shared.down_t", p.shared_down.T)))
        if p.shared_expert_gate is not None:
            gate = linear("expert_gate", p.shared_expert_gate)
            s = bb.emit(relax.op.multiply(s, relax.op.sigmoid(gate)))
        return s


def int8_rows(bb: relax.BlockBuilder, x: Any, rows: Any, k: int, gs: int) -> list[Any]:
    """(XQ, D, XS) of ``x [rows, k]``: int8 per group of ``gs``
    (`modec.kernels.grouped_moe_a8.quant_primfunc`), for the expert inputs and the dense
    matmuls' (`modec.lowering.dense_quant`) alike: one kernel per (k, gs) in the module, as
    the block builder returns the GlobalVar of a structurally equal function."""
    name = f"modec_a8_quant_k{k}_g{gs}"
    func = grouped_moe_a8.quant_primfunc(k, gs)
    func = func.with_attr("global_symbol", name).with_attr("op_pattern", 8)
    groups = -(-k // gs)
    res = bb.emit(
        relax.call_tir(
            bb.add_func(func, name), [x],
            [relax.TensorType([rows, groups * gs], "int8"),
             relax.TensorType([rows, groups], "float32"),
             relax.TensorType([rows, groups], "float32")],
        )
    )  # fmt: skip
    return [bb.emit(relax.TupleGetItem(res, i)) for i in range(3)]


def _activation(
    bb: relax.BlockBuilder, kind: str, g: Any, u: Any, alpha: float, limit: float
) -> Any:
    """``act(g) · u`` (gated) or ``act(u)``, as `modec.moe.reference._act`."""
    if kind == "gpt_oss":
        if g is None:
            raise ModelError("MoE activation gpt_oss needs a gate projection")
        lim = relax.const(np.float32(limit), "float32")
        g = bb.emit(relax.op.minimum(g, lim))
        u = bb.emit(relax.op.clip(u, -float(limit), float(limit)))
        sg = relax.op.sigmoid(relax.op.multiply(g, relax.const(np.float32(alpha), "float32")))
        one = relax.const(np.float32(1.0), "float32")
        return bb.emit(relax.op.multiply(relax.op.add(u, one), relax.op.multiply(g, sg)))
    x = u if g is None else g
    if kind == "silu":
        a = relax.op.nn.silu(x)
    elif kind == "gelu":
        a = relax.op.nn.gelu(x)
    else:
        raise ModelError(f"unknown MoE activation {kind!r}; modec lowers silu, gelu, gpt_oss")
    return bb.emit(a if g is None else relax.op.multiply(a, u))
