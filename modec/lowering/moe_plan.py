"""Plan the mixed-precision lowering of every MoE layer and its manifest section.

`plan_layers` groups each canonical ``ai.modec::MoE`` layer's experts by width (ascending
bits, experts in index order inside a group) and declares each group's stacked packed weight
per projection (`PackedStack`, layout ``n16k32``, `modec.numerics.packing`). The packed
arrays are lazy (`modec.moe.lazy.computed`): they are packed from the quantized codes when
the artifact writer reaches them, one tensor at a time, so the lowering never holds every
layer's packed experts (0.23 GB per paper-sized layer at 3 bits). The rank of
an expert is its position in that (width group, index) order; the routing sort of
`modec.lowering.moe_sort` orders the routed rows by it, so that every width group reads one
contiguous row range. `moe_section` writes the plan into the manifest's ``moe`` section.

No TVM here: `modec.lowering.moe` turns the plans into Relax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from modec.errors import ModelError
from modec.facts import QuantizedExperts
from modec.moe import lazy
from modec.moe.canonical import is_moe_node
from modec.moe.reference import MoEParams
from modec.numerics.packing import (
    LAYOUT,
    check_codes,
    codes_shape,
    pack_codes,
    pack_scales,
    pack_zeros,
    params_shape,
)
from modec.numerics.quant import QuantizedWeight
from modec.numerics.schemes import QuantScheme
from modec.pages import release

__all__ = ["LayerPlan", "PackedStack", "WidthGroup", "moe_section", "plan_layers"]


@dataclass(frozen=True, eq=False)
class PackedStack:
    """The packed weights of one width group and projection, computed when read.

    The arrays are those `modec.numerics.packing.pack` returns for the group's stacked
    codes (``[E_w, N, K]``), but lazy: each read packs them from the quantized experts,
    one expert at a time into the result.

    Attributes:
        codes: uint32 ``[E_w, N_pad/16, K_pad/32, bits, 16]``.
        scale: float16 ``[E_w, N_pad/16, groups, 16]``.
        zero: uint8 ``[E_w, N_pad/16, groups, 16]``.
        scheme: the group's scheme (bits, group size).
        n: logical output rows N.
        k: logical reduction length K.
    """

    codes: lazy.LazyArray
    scale: lazy.LazyArray
    zero: lazy.LazyArray
    scheme: QuantScheme
    n: int
    k: int

    @classmethod
    def of(cls, experts: Sequence[QuantizedWeight], scheme: QuantScheme) -> PackedStack:
        """The lazy packed stack of ``experts`` (codes of one shape, all at ``scheme``)."""
        n, k = (int(d) for d in experts[0].q.shape)

        def codes(qw: QuantizedWeight) -> np.ndarray:
            # The writer writes the codes before the scales and zeros (wider dtype first):
            # one range check per expert, before any of its packed bytes.
            check_codes(qw.q, qw.scale, qw.zero, scheme)
            packed = pack_codes(qw.q, scheme)
            release(qw.q)  # mapped codes (`spill_codes`): their pages leave the resident set
            return packed

        return cls(
            _stacked(experts, codes_shape(n, k, scheme), np.uint32, codes),
            _stacked(experts, params_shape(n, k, scheme), np.float16,
                     lambda qw: pack_scales(qw.scale)),
            _stacked(experts, params_shape(n, k, scheme), np.uint8,
                     lambda qw: pack_zeros(qw.zero)),
            scheme, n, k,
        )  # fmt: skip


def _stacked(
    experts: Sequence[QuantizedWeight], shape: tuple[int, ...], dtype: type,
    pack_one: Callable[[QuantizedWeight], np.ndarray],
) -> lazy.LazyArray:  # fmt: skip
    """``np.stack([pack_one(qw) for qw in experts])``, computed when read, one expert at a
    time into the result (packing a whole stack at once takes 8 bytes per weight)."""

    def value() -> np.ndarray:
        out: np.ndarray = np.empty((len(experts), *shape), dtype)
        for i, qw in enumerate(experts):
            out[i] = pack_one(qw)
        release(*(qw.q for qw in experts))  # see `modec.pages`: pages a read mapped again
        return out

    return lazy.computed((len(experts), *shape), dtype, value)


@dataclass(frozen=True, eq=False)
class WidthGroup:
    """The experts of one MoE layer that share a width.

    Attributes:
        bits: the width.
        experts: expert indices, ascending.
        start: rank of the first expert (index into the layer's ``offsets``).
        packed: per projection, the experts' stacked packed weight ``[E_w, N, K]`` (lazy).
    """

    bits: int
    experts: tuple[int, ...]
    start: int
    packed: dict[str, PackedStack]


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """Everything the converter needs for one MoE layer."""

    layer: int
    node_name: str
    params: MoEParams
    group_size: int
    widths: tuple[int, ...]
    groups: tuple[WidthGroup, ...]

    @property
    def rank(self) -> np.ndarray:
        """``rank[e]``: position of expert e in (width group, index) order."""
        r = np.empty(self.params.num_experts, dtype=np.int64)
        for g in self.groups:
            for i, e in enumerate(g.experts):
                r[e] = g.start + i
        return r


def plan_layers(model: ir.Model, quantized: QuantizedExperts) -> list[LayerPlan]:
    """Group every MoE layer's experts by width and declare their packed weights.

    Only shapes and widths are checked here; the codes are read (and their range checked)
    when the packed arrays are, at write time.

    Args:
        model: the canonical model (MoE nodes in graph order are layers 0..L-1).
        quantized: the experts' codes (``group_size``, ``widths[l][e]``,
            ``layers[l][proj][e]``).

    Raises:
        ModelError: the quantized experts do not match the model's MoE layers.
    """
    nodes = [n for n in model.graph if is_moe_node(n)]
    if len(nodes) != len(quantized.layers) or len(nodes) != len(quantized.widths):
        raise ModelError(
            f"lower-tvm: the model has {len(nodes)} MoE layers but the quantized experts cover "
            f"{len(quantized.layers)}; run quantize-experts on this model"
        )
    plans = []
    for layer, node in enumerate(nodes):
        p = MoEParams.from_node(node, experts=False)  # the kernels read the packed codes
        widths = tuple(int(w) for w in quantized.widths[layer])
        if len(widths) != p.num_experts:
            raise ModelError(
                f"lower-tvm: MoE layer {layer} ({node.name}) has {p.num_experts} experts but "
                f"{len(widths)} widths; re-run allocate-bits"
            )
        projs = {"gate": p.gate, "up": p.up, "down": p.down}
        groups: list[WidthGroup] = []
        start = 0
        for bits in sorted(set(widths)):
            experts = tuple(e for e, w in enumerate(widths) if w == bits)
            packed: dict[str, PackedStack] = {}
            for proj, dense in projs.items():
                if dense is None:
                    continue
                qws = quantized.layers[layer].get(proj)
                if qws is None:
                    raise ModelError(
                        f"lower-tvm: MoE layer {layer} ({node.name}) has a {proj} projection "
                        "but no quantized codes for it; run quantize-experts"
                    )
                for e in experts:
                    if qws[e].scheme.bits != bits or qws[e].q.shape != dense.shape[1:]:
                        raise ModelError(
                            f"lower-tvm: layer {layer} expert {e} {proj}: codes are "
                            f"{qws[e].scheme.name} {list(qws[e].q.shape)}, expected w{bits} "
                            f"{list(dense.shape[1:])}"
                        )
                scheme = QuantScheme(bits, int(quantized.group_size))
                packed[proj] = PackedStack.of([qws[e] for e in experts], scheme)
            groups.append(WidthGroup(bits, experts, start, packed))
            start += len(experts)
        plans.append(
            LayerPlan(
                layer,
                node.name or f"moe{layer}",
                p,
                int(quantized.group_size),
                widths,
                tuple(groups),
            )
        )
    return plans


def moe_section(plans: Sequence[LayerPlan]) -> dict[str, Any]:
    """The manifest's ``moe`` section: per layer the widths and the packed byte sizes."""
    layers = []
    for plan in plans:
        groups = []
        for g in plan.groups:
            sizes = {
                proj: {
                    "codes": int(pw.codes.nbytes),
                    "scales": int(pw.scale.nbytes),
                    "zeros": int(pw.zero.nbytes),
                }
                for proj, pw in sorted(g.packed.items())
            }
            groups.append({"bits": g.bits, "experts": list(g.experts), "bytes": sizes})
        layers.append(
            {
                "layer": plan.layer,
                "node": plan.node_name,
                "num_experts": plan.params.num_experts,
                "top_k": plan.params.top_k,
                "widths": list(plan.widths),
                "groups": groups,
                "kernels": sum(len(g.packed) for g in plan.groups),
            }
        )
    group_size = plans[0].group_size if plans else None
    return {"layout": LAYOUT, "group_size": group_size, "layers": layers}
