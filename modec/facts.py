"""The typed facts that passes exchange: one frozen dataclass per fact, one store per run.

Every pass declares the fact *types* it reads and writes (``Pass.reads`` / ``Pass.writes``);
the runner checks before the first pass that each read is written earlier (or given by the
caller) and, after each pass, that the pass wrote exactly what it declared. A pass reads a
fact with ``ctx.facts.get(RoutingStats)`` and gets a ``RoutingStats`` back, typed.

The facts, in pipeline order (docs/architecture.md has the contract table):

=====================  ====================  ===============================================
fact                   written by            what it holds
=====================  ====================  ===============================================
`Calibration`          the driver            the calibration `Dataset`
`MoELayers`            find-moe              every MoE region found in the graph
`CanonicalMoE`         canonicalize-moe      the names of the ``ai.modec::MoE`` nodes
`AttentionTaps`        find-attention        where each layer's attention can be read
`RoutingStats`         collect-routing       routing counts per modality, Hessians, the
                                             routing and score of every vision token
`KeyVision`            select-key-vision     the key vision tokens and their frequencies
`Sensitivity`          measure-sensitivity   δ_text(e, b), δ_vision(e, b)
`BitAllocation`        allocate-bits         the width of every expert
`QuantizedExperts`     quantize-experts      the codes of every expert projection
`QuantizedDense`       quantize-dense        the codes of the text decoder's dense weights
                                             (optional: ``--dense-bits``)
`Artifact`             lower-tvm             the compiled artifact's manifest
=====================  ====================  ===============================================

This module is the bottom of the contract layer: it imports numpy and the data/numerics
types only (IR node types appear in annotations alone), so every layer above can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from modec.data import Dataset
from modec.errors import BadInputError, InternalError
from modec.numerics.quant import QuantizedWeight

if TYPE_CHECKING:
    from modec.artifact import Manifest
    from modec.moe.attention import AttentionTap
    from modec.moe.discover import MoERegion

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
BoolA = npt.NDArray[np.bool_]

#: The projections of an expert, in the order the canonical MoE node stores them.
PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True, eq=False)
class Calibration:
    """The calibration set the analysis passes run (given by the driver)."""

    data: Dataset


@dataclass(frozen=True, eq=False)
class MoELayers:
    """Every MoE layer found in the graph, in graph order (find-moe)."""

    regions: tuple[MoERegion, ...]


@dataclass(frozen=True)
class CanonicalMoE:
    """The canonical ``ai.modec::MoE`` nodes by name, in execution order (canonicalize-moe)."""

    nodes: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class AttentionTaps:
    """Per canonical MoE node, where its block's attention can be read, or None (find-attention)."""

    taps: tuple[AttentionTap | None, ...]


@dataclass(frozen=True, eq=False)
class VisionRouting:
    """The routing and key score of every vision token of one layer over the calibration set.

    Tokens are in calibration order (samples in the order collect-routing ran them, tokens
    left to right), so the tokens of one sample are contiguous.

    Attributes:
        experts: ``[Nv, k]`` the experts each vision token was routed to.
        sample: ``[Nv]`` int64, the sample the token belongs to.
        score: ``[Nv]`` float64, the key score (MODE §3.1: the attention the sample's
            question pays the token, mean over heads and question tokens; or the
            hidden-state fallback score, see ``RoutingStats.score_source``).
    """

    experts: I64
    sample: I64
    score: F64


@dataclass(frozen=True, eq=False)
class RoutingStats:
    """Per layer × expert routing over the calibration set, by modality (collect-routing).

    Every per-layer field is a tuple over MoE layers (execution order) of arrays over that
    layer's experts, so layers may differ in their expert count.

    Attributes:
        samples: calibration samples seen.
        count_all / count_text / count_vision: ``[E]`` int64 selections (a token routed to k
            experts counts once for each); all = text + vision.
        mean_weight: ``[E]`` mean combine weight of the tokens routed to the expert.
        f_text / f_vision / f_global: ``[E]`` float64 frequencies normalised within the layer
            over text tokens, *all* vision tokens, all tokens (MODE §3.1, Eq. 1).
        vision: per layer, the routing and key score of every vision token
            (select-key-vision chooses the key tokens from it).
        score_source: per layer, which score ranked its vision tokens: ``attention``,
            ``hidden`` (the fallback), ``attention+hidden`` or ``none`` (no vision token).
    """

    samples: int
    count_all: tuple[I64, ...]
    count_text: tuple[I64, ...]
    count_vision: tuple[I64, ...]
    mean_weight: tuple[F64, ...]
    f_text: tuple[F64, ...]
    f_vision: tuple[F64, ...]
    f_global: tuple[F64, ...]
    vision: tuple[VisionRouting, ...]
    score_source: tuple[str, ...]

    @property
    def tokens(self) -> tuple[I64, ...]:
        """Tokens each expert received (the ``n`` of its Hessians, `modec.method.hessians`)."""
        return self.count_all

    @property
    def num_layers(self) -> int:
        return len(self.count_all)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as named arrays, ``{field}.{layer}`` for per-layer ones (`modec.cache`)."""
        out: dict[str, np.ndarray] = {
            "samples": np.asarray(self.samples),
            "score_source": np.asarray(self.score_source, dtype=str),
        }
        for name in _ROUTING_PER_LAYER:
            for layer, arr in enumerate(getattr(self, name)):
                out[f"{name}.{layer}"] = arr
        for layer, v in enumerate(self.vision):
            for name in ("experts", "sample", "score"):
                out[f"vision_{name}.{layer}"] = getattr(v, name)
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> RoutingStats:
        sources = tuple(str(s) for s in a["score_source"])
        layers = range(len(sources))
        per = {name: tuple(a[f"{name}.{layer}"] for layer in layers) for name in _ROUTING_PER_LAYER}
        vision = tuple(
            VisionRouting(
                a[f"vision_experts.{layer}"],
                a[f"vision_sample.{layer}"],
                a[f"vision_score.{layer}"],
            )
            for layer in layers
        )
        return cls(samples=int(a["samples"]), vision=vision, score_source=sources, **per)


_ROUTING_PER_LAYER = (
    "count_all", "count_text", "count_vision", "mean_weight", "f_text", "f_vision", "f_global",
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class KeyVision:
    """The key vision tokens of every layer and the frequencies over them (select-key-vision).

    Attributes:
        key_ratio: share of each sample's vision tokens kept as key tokens (MODE: 0.2).
        key: per layer, ``[Nv]`` bool over `RoutingStats.vision` tokens: the token is key.
        count_key / count_redundant: per layer ``[E]`` int64 selections by key / non-key
            vision tokens (count_key + count_redundant = RoutingStats.count_vision).
        f_key / f_redundant: per layer ``[E]`` float64, normalised within the layer. MODE
            weights δ_vision with ``f_key`` (§3.1, "modality-aware frequency").
    """

    key_ratio: float
    key: tuple[BoolA, ...]
    count_key: tuple[I64, ...]
    count_redundant: tuple[I64, ...]
    f_key: tuple[F64, ...]
    f_redundant: tuple[F64, ...]


@dataclass(frozen=True, eq=False)
class Sensitivity:
    """KL sensitivities of every expert (measure-sensitivity; MODE §3.2).

    Attributes:
        bits: the widths measured, the last axis of the δ arrays.
        delta_text: ``[L, E, B]`` float64, δ_text(e, b) per MoE layer.
        delta_vision: ``[L, E, B]`` float64, δ_vision(e, b).
        samples: calibration samples the KL was averaged over.
        unused_text / unused_vision: ``[L, E]`` bool, the expert received no token of that
            modality in the subset; its δ for the modality is 0 by rule (the quantized
            weights are never used there), not measured.
        positions: where the KL was read (``answer`` or ``text``).
        subset: the calibration samples measured (indices into the calibration set), when
            the pass that measured them says so; ``None``: not recorded. These two are set
            by measure-sensitivity, not stored in the arrays (they are part of the cache key).
    """

    bits: tuple[int, ...]
    delta_text: F64
    delta_vision: F64
    samples: int
    unused_text: BoolA
    unused_vision: BoolA
    positions: Literal["answer", "text"] = "answer"
    subset: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        want = (*self.delta_text.shape[:2], len(self.bits))
        if self.delta_text.shape != want or self.delta_vision.shape != want:
            raise BadInputError(
                f"sensitivity arrays {self.delta_text.shape} / {self.delta_vision.shape} do not "
                f"match [L, E, {len(self.bits)}] for widths {list(self.bits)}"
            )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "bits": np.asarray(self.bits, dtype=np.int64),
            "delta_text": self.delta_text,
            "delta_vision": self.delta_vision,
            "samples": np.asarray(self.samples),
            "unused_text": self.unused_text,
            "unused_vision": self.unused_vision,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Sensitivity:
        return cls(
            bits=tuple(int(b) for b in a["bits"]),
            delta_text=np.asarray(a["delta_text"], np.float64),
            delta_vision=np.asarray(a["delta_vision"], np.float64),
            samples=int(a["samples"]),
            unused_text=np.asarray(a["unused_text"], bool),
            unused_vision=np.asarray(a["unused_vision"], bool),
        )


@dataclass(frozen=True)
class BitAllocation:
    """The chosen width of every expert, and how it was chosen (allocate-bits)."""

    method: str
    bits: tuple[int, ...]
    budget: float
    group_size: int
    widths: tuple[tuple[int, ...], ...]  # [layer][expert]
    objective: float
    status: str
    solve_seconds: float
    rounded: bool

    def histogram(self) -> dict[int, int]:
        flat = [w for layer in self.widths for w in layer]
        return {b: flat.count(b) for b in sorted(set(flat))}

    @property
    def average(self) -> float:
        flat = [w for layer in self.widths for w in layer]
        return float(np.mean(flat))


@dataclass(frozen=True, eq=False)
class QuantizedExperts:
    """Codes of every expert projection: ``layers[l][proj][e]`` (quantize-experts)."""

    group_size: int
    widths: tuple[tuple[int, ...], ...]
    layers: list[dict[str, list[QuantizedWeight]]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class QuantizedDense:
    """Codes of the dense weights quantize-dense quantized, by initializer name, in graph
    order. Each is the [N, K] weight a ``MatMul`` reads transposed (torch's ``Linear``
    layout); ``transposed[name]`` is False where the graph stores it as [K, N] already (the
    codes are then of its transpose)."""

    bits: int
    group_size: int
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    transposed: dict[str, bool] = field(default_factory=dict)
    #: 8: the matmuls' activations are rounded to int8 per group (``--dense-act-bits``),
    #: 0: float32.
    act_bits: int = 0
    #: With ``act_bits``: the rounded value a quantized MatMul reads -> the value rounded
    #: (`modec.method.dense.int8_rows`), and the names of the nodes that round it (the
    #: lowering replaces them by its own kernels).
    act_inputs: dict[str, str] = field(default_factory=dict)
    act_nodes: set[str] = field(default_factory=set)


@dataclass(frozen=True, eq=False)
class Artifact:
    """The compiled artifact written by lower-tvm."""

    manifest: Manifest


#: Every fact type, in pipeline order.
FACT_TYPES: tuple[type, ...] = (
    Calibration, MoELayers, CanonicalMoE, AttentionTaps, RoutingStats, KeyVision, Sensitivity,
    BitAllocation, QuantizedExperts, QuantizedDense, Artifact,
)  # fmt: skip

T = TypeVar("T")


class Facts:
    """The facts known so far in one run: at most one value per fact type.

    ``get(RoutingStats)`` returns a ``RoutingStats`` (typed). While a pass runs, the runner
    `restrict`s the store to what the pass declared: reading an undeclared fact is an error,
    and comparing `ids` before and after tells what the pass wrote.
    """

    def __init__(self, *values: object) -> None:
        self._values: dict[type, object] = {}
        self._readable: frozenset[type] | None = None
        self._reader = ""
        for v in values:
            self.put(v)

    @contextmanager
    def restrict(self, pass_name: str, reads: Iterable[type]) -> Iterator[None]:
        """Within the block, `get` and `find` serve only ``reads`` (the pass's declaration)."""
        self._readable, self._reader = frozenset(reads), pass_name
        try:
            yield
        finally:
            self._readable = None

    def _check_readable(self, kind: type) -> None:
        if self._readable is not None and kind not in self._readable:
            raise InternalError(
                f"pass {self._reader} reads {kind.__name__} without declaring it; add it to "
                "its `reads` so that Pipeline.validate can check it is written first"
            )

    def put(self, value: object) -> None:
        """Record ``value`` as the fact of its type (replacing an earlier one)."""
        kind = type(value)
        if kind not in FACT_TYPES:
            raise InternalError(
                f"{kind.__name__} is not a fact type; declare it in modec.facts.FACT_TYPES"
            )
        self._values[kind] = value

    def get(self, kind: type[T]) -> T:
        """The fact of type ``kind``; a pipeline that never wrote it is a programming error."""
        self._check_readable(kind)
        value = self._values.get(kind)
        if value is None:
            raise InternalError(
                f"no {kind.__name__} fact; the pass that reads it must declare it in `reads` so "
                "that Pipeline.validate names the pass that writes it"
            )
        assert isinstance(value, kind)
        return value

    def find(self, kind: type[T]) -> T | None:
        """The fact of type ``kind`` if known (for optional reads)."""
        self._check_readable(kind)
        value = self._values.get(kind)
        assert value is None or isinstance(value, kind)
        return value

    def kinds(self) -> frozenset[type]:
        return frozenset(self._values)

    def ids(self) -> dict[type, int]:
        """``id`` of every value: the runner tells "written" from "left alone" with it."""
        return {k: id(v) for k, v in self._values.items()}

    def copy(self) -> Facts:
        """A new store with the same (immutable) values."""
        return Facts(*self._values.values())
