"""Step 5 of MODE: quantize every routed expert at its allocated width (GPTQ, RTN fallback).

Pure numerics over the stacked expert weights of one MoE layer; the quantize-experts pass
feeds it each canonical MoE node, and `quantize_model_rtn` is the one RTN path that tools and
tests use to build quantized experts without calibration.

Rules (GPTQ, Frantar et al. 2022, per expert):
1. gate and up use H_in = Σ x xᵀ of the tokens routed to the expert; down uses
   H_act = Σ a aᵀ of the activations a = act(x·gateᵀ)·(x·upᵀ).
2. Group-wise asymmetric at ``group_size``; dampening ``percdamp``, block size ``blocksize``.
3. An expert with fewer than ``min_tokens`` routed tokens, or whose Hessian cannot be
   factorised, falls back to round-to-nearest with the reason recorded; ``method=rtn``
   quantizes every expert with RTN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx_ir as ir

from modec.distributed import Engine, SerialEngine
from modec.facts import PROJECTIONS, QuantizedExperts
from modec.numerics.gptq import gptq_quantize
from modec.numerics.quant import QuantizedWeight, quantize_rtn
from modec.numerics.schemes import QuantScheme
from modec.pages import release

F32 = npt.NDArray[np.float32]

#: Input index of each projection's stacked weight on a canonical MoE node (docs/ir.md).
INPUT_INDEX = {"gate": 3, "up": 4, "down": 5}


@dataclass(frozen=True)
class GPTQSettings:
    """How GPTQ runs (defaults of the quantize-experts pass)."""

    min_tokens: int = 32
    percdamp: float = 0.01
    blocksize: int = 128


@dataclass(frozen=True, eq=False)
class LayerHessians:
    """One layer's GPTQ inputs: ``[E, H, H]`` / ``[E, I, I]`` Hessians and ``[E]`` token counts."""

    h_in: npt.NDArray[np.float64]
    h_act: npt.NDArray[np.float64]
    tokens: npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class QuantizedProjection:
    """One projection of one layer: codes per expert, the dequantized stack, per-expert notes."""

    codes: list[QuantizedWeight]
    dequantized: F32
    entries: list[dict[str, object]]


def quantize_projection(
    stacked: npt.ArrayLike,
    widths: tuple[int, ...],
    group_size: int,
    *,
    method: Literal["gptq", "rtn"],
    hessians: npt.NDArray[np.float64] | None = None,
    tokens: npt.NDArray[np.int64] | None = None,
    settings: GPTQSettings = GPTQSettings(),
    label: str = "",
    tick: Callable[[], None] = lambda: None,
    engine: Engine | None = None,
) -> QuantizedProjection:
    """Quantize every expert of one stacked projection ``[E, N, K]`` at its width.

    Args:
        stacked: the fp weights of one projection of every expert.
        widths: the width of each expert.
        group_size: the quantization group along K.
        method: ``gptq`` (needs ``hessians`` and ``tokens``) or ``rtn``.
        hessians: ``[E, K, K]`` Σ x xᵀ of each expert's input.
        tokens: ``[E]`` tokens each expert received.
        settings: GPTQ's knobs.
        label: names the projection in fallback messages (``layer 3 ... up``).
        tick: called after each expert (progress).
        engine: runs GPTQ's experts as its tasks (`modec.distributed`; one task per expert,
            its weight and Hessian sent with it, the results gathered in expert order);
            None: one after the other in this process. Each expert is `_quantize_expert`
            either way, so the codes are the same bytes. RTN always runs here (it is
            cheaper than sending the weights).
    """
    w = np.asarray(stacked, dtype=np.float32)
    if method == "gptq" and (hessians is None or tokens is None):
        raise ValueError("GPTQ needs the experts' Hessians and token counts")
    items = [
        (e, int(width), w[e], None if hessians is None else hessians[e],
         None if tokens is None else int(tokens[e]))
        for e, width in enumerate(widths)
    ]  # fmt: skip
    run = engine if engine is not None and method == "gptq" else SerialEngine()
    results = run.map(
        _quantize_expert, items, group_size, method, settings, label,
        label=f"GPTQ {label}".strip(), done=lambda i: tick(),
    )  # fmt: skip
    deq = np.empty_like(w)
    codes: list[QuantizedWeight] = []
    entries: list[dict[str, object]] = []
    for e, (qw, entry) in enumerate(results):
        deq[e] = qw.dequantize()  # what GPTQ and RTN return as ŵ, bit for bit
        codes.append(qw)
        entries.append(entry)
    return QuantizedProjection(codes, deq, entries)


def _quantize_expert(
    item: tuple[int, int, F32, npt.NDArray[np.float64] | None, int | None],
    group_size: int,
    method: Literal["gptq", "rtn"],
    settings: GPTQSettings,
    label: str,
) -> tuple[QuantizedWeight, dict[str, object]]:
    """One expert of one projection (an engine task): its codes and report entry (the
    caller dequantizes the codes: a task sends back no fp32 copy of the weight). ``item`` is
    (expert, width, weight ``[N, K]``, Hessian ``[K, K]``, tokens).
    """
    e, width, w_e, h_e, n_tok = item
    scheme = QuantScheme(width, group_size)
    if method == "rtn":
        qw = quantize_rtn(w_e, scheme)
        return qw, {"method": "rtn", "reason": "method=rtn"}
    assert h_e is not None and n_tok is not None, "GPTQ needs Hessians"
    res = gptq_quantize(
        w_e, h_e, scheme, n_tokens=n_tok, min_tokens=settings.min_tokens,
        percdamp=settings.percdamp, blocksize=settings.blocksize,
        name=f"{label} expert {e}".strip(),
    )  # fmt: skip
    entry: dict[str, object] = {
        "method": res.method, "reason": res.fallback_reason, "loss": res.loss,
        "output_mse": res.output_mse,
    }  # fmt: skip
    return res.qweight, entry


def spill_codes(
    codes: list[QuantizedWeight], directory: str | None = None
) -> list[QuantizedWeight]:
    """The same codes with their uint8 arrays moved to a memory-mapped file (one per call).

    The file is unlinked as soon as it is mapped: the mapping keeps its pages (and the disk
    space) until the last view is dropped, and nothing is left behind however the process
    ends. The codes of every quantized layer are needed until the artifact is written; held
    in RAM they would grow with the number of layers (0.6 GB per Qwen3-VL-30B-A3B layer),
    mapped they are file pages the kernel can drop and read back, and each reader (the
    dequantized write-back, the packing for the kernels, the ``experts.safetensors`` writer)
    hands them back once read (`modec.pages.release`), so they do not stay resident.
    """
    import os
    import tempfile

    if not codes:
        return codes
    stacked = np.stack([c.q for c in codes])
    fd, path = tempfile.mkstemp(prefix="modec-codes-", suffix=".npy", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, stacked, allow_pickle=False)
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    finally:
        os.unlink(path)
    return [QuantizedWeight(mapped[e], c.scale, c.zero, c.scheme) for e, c in enumerate(codes)]


def dequantized_tensor(codes: list[QuantizedWeight], name: str | None) -> ir.LazyTensor:
    """The stacked ``[E, N, K]`` float32 dequantized weights of one projection, computed from
    ``codes`` each time they are read: the simulated-quantization graph holds one byte per
    weight (the codes), not four, and a reader materializes one projection at a time."""
    n, k = codes[0].q.shape

    def build() -> ir.TensorProtocol:
        out = np.empty((len(codes), n, k), dtype=np.float32)
        for e, qw in enumerate(codes):
            out[e] = qw.dequantize()
            release(qw.q)  # the mapped codes' pages: read once per build, not kept resident
        release(*(qw.q for qw in codes))
        return ir.tensor(out, name=name)

    return ir.LazyTensor(build, ir.DataType.FLOAT, ir.Shape([len(codes), n, k]), name=name)


def expert_weights(node: ir.Node) -> dict[str, ir.Value]:
    """The stacked weight value of each projection a canonical MoE node has."""
    out: dict[str, ir.Value] = {}
    for proj in PROJECTIONS:
        value = node.inputs[INPUT_INDEX[proj]]
        if value is not None and value.const_value is not None:
            out[proj] = value
    return out


def quantize_model_rtn(
    model: ir.Model,
    widths: tuple[tuple[int, ...], ...],
    group_size: int,
    *,
    write_back: bool = True,
) -> QuantizedExperts:
    """RTN-quantize every expert of every canonical MoE node of ``model`` at ``widths``.

    With ``write_back`` the dequantized weights replace the fp ones in the graph, which makes
    ``model`` the simulated-quantization model of the returned codes.
    """
    from modec.moe.canonical import is_moe_node

    nodes = [n for n in model.graph if is_moe_node(n)]
    if len(nodes) != len(widths):
        raise ValueError(f"widths cover {len(widths)} MoE layers; the model has {len(nodes)}")
    q = QuantizedExperts(group_size, widths)
    for layer, node in enumerate(nodes):
        per: dict[str, list[QuantizedWeight]] = {}
        for proj, value in expert_weights(node).items():
            assert value.const_value is not None
            res = quantize_projection(
                value.const_value.numpy(), widths[layer], group_size, method="rtn"
            )
            if write_back:
                value.const_value = ir.tensor(res.dequantized, name=value.name)
            per[proj] = res.codes
        q.layers.append(per)
    return q
