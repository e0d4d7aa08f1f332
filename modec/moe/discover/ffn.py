"""One expert's FFN, whatever the form: which projection is gate, up and down, the activation,
and how gate and up share a fused weight; then the stacking into `ExpertWeights`.

1. Two input projections: the one whose own path (not shared with the other) holds the
   activation is the gate (``separate`` layout).
2. One input projection split in two (Split, SplitToSequence + SequenceAt, or two Slices): a
   fused gate_up, ``concatenated`` (halves) or ``interleaved`` (every other row, GPT-OSS).
3. One input projection not split: an ungated expert (``none`` layout).
4. The activation is gelu (Erf / Gelu / Tanh), gpt_oss (Clip or Min with Sigmoid: clamped
   SwiGLU, alpha from the Mul before the Sigmoid) or silu (Sigmoid / Swish).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modec.errors import ModelError
from modec.moe import lazy
from modec.moe._graph import (
    SHAPE_OPS,
    const_array,
    direct_users,
    fine_forward,
    fine_forward_from,
    scalar,
)
from modec.moe.discover.common import Proj
from modec.moe.discover.region import Activation, ExpertWeights, GateLayout
from modec.moe.lazy import LazyArray

RowSel = Callable[[int], np.ndarray]


def through(v: ir.Value, ops: frozenset[str] = SHAPE_OPS) -> list[ir.Node]:
    """Direct users of ``v``, looking through shape ops (and `If`s made of them)."""
    res: dict[ir.Node, None] = {}
    for u in direct_users(v):
        if u.op_type in ops and u.inputs[0] is v:
            res.update(dict.fromkeys(through(u.outputs[0], ops)))
        else:
            res[u] = None
    return list(res)


def _first_half(n: int) -> np.ndarray:
    return np.arange(n)[: n // 2]


def _second_half(n: int) -> np.ndarray:
    return np.arange(n)[n // 2 :]


def _every_other(start: int) -> RowSel:
    def sel(n: int) -> np.ndarray:
        return np.arange(n)[start::2]

    return sel


def _parts(proj_out: ir.Value) -> list[tuple[ir.Value, RowSel]] | None:
    """Split of a gate_up output into two halves: each with a row selector, else None."""
    users = through(proj_out)
    splits = [u for u in users if u.op_type == "Split" and len(u.outputs) == 2]
    if splits:
        s = splits[0]
        return [(s.outputs[0], _first_half), (s.outputs[1], _second_half)]
    # torch.chunk(2) without the exporter's optimizer: SplitToSequence + SequenceAt(0 / 1).
    seqs = [u for u in users if u.op_type == "SplitToSequence"]
    if len(seqs) == 1:
        ats = [a for a in direct_users(seqs[0].outputs[0]) if a.op_type == "SequenceAt"]
        pos = [scalar(a.inputs[1]) for a in ats]
        if len(ats) == 2 and sorted(p for p in pos if p is not None) == [0.0, 1.0]:
            return [(a.outputs[0], _first_half if p == 0 else _second_half)
                    for a, p in zip(ats, pos, strict=True)]  # fmt: skip
    slices = [u for u in users if u.op_type == "Slice"]
    if len(slices) != 2:
        return None
    res: list[tuple[ir.Value, RowSel]] = []
    for s in slices:
        start = const_array(s.inputs[1])
        steps = const_array(s.inputs[4]) if len(s.inputs) > 4 else None
        st = int(steps.reshape(-1)[0]) if steps is not None else 1
        s0 = int(start.reshape(-1)[0]) if start is not None else None
        if st == 2 and s0 is not None:
            res.append((s.outputs[0], _every_other(s0)))
        elif st == 1:
            # TorchScript computes the chunk bounds from shapes: the half starting at 0 is first.
            res.append((s.outputs[0], _first_half if s0 == 0 else _second_half))
        else:
            return None
    return res


def _act_info(
    start: list[ir.Value], others: list[ir.Value], allowed: set[ir.Node]
) -> tuple[Activation, float, float] | None:
    """Activation of the path from ``start`` that ``others`` do not share (rule 4)."""
    mine = fine_forward_from(start, allowed)
    theirs = fine_forward_from(others, allowed) if others else set()
    own = mine - theirs
    ops = {n.op_type for n in own}
    if ops & {"Erf", "Gelu", "Tanh"}:
        return "gelu", 0.0, 0.0
    clips = [n for n in own if n.op_type in ("Clip", "Min")]
    if clips and "Sigmoid" in ops:
        limit = 0.0
        c = clips[0]
        if c.op_type == "Clip" and len(c.inputs) > 2:
            limit = scalar(c.inputs[2]) or 0.0
        elif c.op_type == "Min":
            limit = next((s for s in (scalar(v) for v in c.inputs) if s is not None), 0.0)
        alpha = 1.0
        for n in own:
            if n.op_type == "Sigmoid":
                p = n.inputs[0].producer() if n.inputs[0] is not None else None
                if p is not None and p.op_type == "Mul":
                    alpha = next((s for s in (scalar(v) for v in p.inputs) if s is not None), 1.0)
        return "gpt_oss", float(alpha), float(limit)
    if ops & {"Sigmoid", "Swish"}:
        return "silu", 0.0, 0.0
    return None


@dataclass
class FFN:
    """One expert (or the stacked experts) read from the graph, before stacking."""

    gate: Proj | None
    up: Proj
    down: Proj
    layout: GateLayout
    gate_rows: RowSel | None
    up_rows: RowSel | None
    activation: Activation
    alpha: float
    limit: float


def firsts_and_downs(projs: list[Proj], allowed: set[ir.Node]) -> tuple[list[Proj], list[Proj]]:
    """Split one expert's projections into input projections and those fed by another."""
    proj_nodes = {p.node for p in projs}
    later = {d for p in projs for d in (fine_forward([p.node], allowed) & proj_nodes)}
    firsts = [p for p in projs if p.node not in later]
    downs = [p for p in projs if p.node in later]
    return firsts, downs


def classify_ffn(firsts: list[Proj], down: Proj, allowed: set[ir.Node], name: str) -> FFN:
    """Work out gate / up / down and the activation of one expert (or stacked experts)."""
    if len(firsts) == 2:
        a, b = firsts
        ia = _act_info([a.out], [b.out], allowed)
        ib = _act_info([b.out], [a.out], allowed)
        act: tuple[Activation, float, float]
        if ia is not None and ib is None:
            g, u, act = a, b, ia
        elif ib is not None and ia is None:
            g, u, act = b, a, ib
        else:
            raise ModelError(f"find-moe: MoE layer {name}: cannot tell gate from up projection")
        return FFN(g, u, down, "separate", None, None, *act)
    if len(firsts) != 1:
        raise ModelError(
            f"find-moe: MoE layer {name}: an expert has {len(firsts)} input projections; "
            "modec handles gate+up (separate or fused) or a single up projection."
        )
    (p,) = firsts
    parts = _parts(p.out)
    if parts is None:
        only = _act_info([p.out], [], allowed)
        if only is None:
            raise ModelError(f"find-moe: MoE layer {name}: unsupported expert activation")
        return FFN(None, p, down, "none", None, None, *only)
    (va, ra), (vb, rb) = parts
    ia = _act_info([va], [vb], allowed)
    ib = _act_info([vb], [va], allowed)
    if ia is not None and (ib is None or ia[0] == "gpt_oss"):
        gate_rows, up_rows, act = ra, rb, ia
    elif ib is not None:
        gate_rows, up_rows, act = rb, ra, ib
    else:
        raise ModelError(f"find-moe: MoE layer {name}: cannot tell gate half from up half")
    n = p.weight.shape[-2]
    interleaved = not np.array_equal(np.sort(np.concatenate([ra(n)[:1], rb(n)[:1]])), [0, n // 2])
    layout: GateLayout = "interleaved" if interleaved else "concatenated"
    return FFN(p, p, down, layout, gate_rows, up_rows, *act)


def assemble(ffns: list[FFN]) -> ExpertWeights:
    """Stack per-expert (or already stacked) FFNs into ExpertWeights.

    The weights stay lazy (the stack, the gate/up row split and the float32 cast happen when
    they are read); the biases are read.
    """

    pre_stacked = len(ffns) == 1 and ffns[0].up.weight.ndim == 3

    def stack(arrs: list[LazyArray]) -> LazyArray:
        return arrs[0] if pre_stacked else lazy.stack(arrs)

    def stack_b(arrs: list[np.ndarray]) -> np.ndarray:
        return arrs[0] if pre_stacked else np.stack(arrs)

    def rows(w: LazyArray, sel: RowSel | None) -> LazyArray:
        return w if sel is None else w.take(sel(w.shape[-2]), axis=-2)

    def rows_b(b: np.ndarray, sel: RowSel | None) -> np.ndarray:
        return b if sel is None else np.take(b, sel(b.shape[-1]), axis=-1)

    f0 = ffns[0]
    gate: LazyArray | None = None
    gate_b = up_b = None
    if f0.layout in ("concatenated", "interleaved"):
        ws = stack([f.up.weight for f in ffns])
        gate = rows(ws, f0.gate_rows)
        up = rows(ws, f0.up_rows)
        if f0.up.bias is not None:
            bs = stack_b([f.up.bias for f in ffns if f.up.bias is not None])
            gate_b, up_b = rows_b(bs, f0.gate_rows), rows_b(bs, f0.up_rows)
    else:
        up = stack([f.up.weight for f in ffns])
        if f0.up.bias is not None:
            up_b = stack_b([f.up.bias for f in ffns if f.up.bias is not None])
        if f0.gate is not None:
            gate = stack([f.gate.weight for f in ffns if f.gate is not None])
            if f0.gate.bias is not None:
                gate_b = stack_b(
                    [f.gate.bias for f in ffns if f.gate is not None and f.gate.bias is not None]
                )
    down = stack([f.down.weight for f in ffns])
    down_b = None
    if f0.down.bias is not None:
        down_b = stack_b([f.down.bias for f in ffns if f.down.bias is not None])

    def f32(a: LazyArray) -> LazyArray:
        return a if a.dtype == np.float32 else a.astype(np.float32)

    def f32_b(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a, dtype=np.float32)

    return ExpertWeights(
        gate=None if gate is None else f32(gate), up=f32(up), down=f32(down),
        gate_bias=f32_b(gate_b), up_bias=f32_b(up_b), down_bias=f32_b(down_b),
        activation=f0.activation, alpha=f0.alpha, limit=f0.limit,
    )  # fmt: skip
