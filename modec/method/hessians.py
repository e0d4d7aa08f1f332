"""Expert-input Hessians, one MoE layer at a time (GPTQ's H, the output-error signals' H).

For expert e of a layer, over the calibration tokens routed to it (padding never counts):

- H_in = Σ x xᵀ, x the layer's input (the input of gate and up), ``[E, H, H]`` float64;
- H_act = Σ a aᵀ, a = act(x·gateᵀ)·(x·upᵀ) with the fp32 weights (the input of down),
  ``[E, I, I]`` float64.

A layer's Hessians are ``E·(H² + I²)·8`` bytes — 4.9 GB for one Qwen3-VL-30B-A3B layer — so
they are never held for more than one layer: `layer_hessians` streams the calibration set
through the model (`modec.streaming`) and yields each layer's Hessians when its last batch
has passed; the consumer (GPTQ, the output-error signal) uses them before the next layer is
computed. The inputs are those of the full-precision model, batched and ordered as
collect-routing batches them (length-sorted, ``batch_size`` samples), so the sums are
bit-identical to accumulating them during collect-routing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from modec.data import PAD, Dataset
from modec.method.quantize import LayerHessians
from modec.streaming import SpillStore, stream

__all__ = ["calibration_batches", "layer_hessians"]


def calibration_batches(
    ds: Dataset, batch_size: int
) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """The calibration set as collect-routing runs it: length-sorted batches of
    ``batch_size`` samples (left padding trimmed per batch) and each batch's modality."""
    lengths = (ds.modality != 0).sum(1)
    order = np.argsort(lengths, kind="stable")
    sub = ds.subset(order)
    feeds: list[dict[str, np.ndarray]] = []
    mods: list[np.ndarray] = []
    for idx, f in sub.batches(batch_size):
        feeds.append(f)
        mods.append(sub.trimmed_modality(idx))
    return feeds, mods


def layer_hessians(
    model: ir.Model,
    ds: Dataset,
    *,
    batch_size: int,
    threads: int,
    max_memory: int,
    spill_dir: str | None = None,
    tick: Callable[[], None] = lambda: None,
) -> Iterator[tuple[int, LayerHessians, Any]]:
    """Yield ``(layer, its Hessians, its MoEParams)`` for every MoE layer in execution order.

    The consumer may rewrite layer ``l``'s expert weights as soon as ``l`` is yielded (later
    layers' inputs were computed from the weights the layer had when it ran), and must drop
    its references to what was yielded before asking for the next layer (``del``): else
    two layers' Hessians are alive at once.
    """
    from modec.executor import Executor
    from modec.moe.reference import expert_activation

    ex = Executor(model, intra_op_threads=threads)
    feeds, mods = calibration_batches(ds, batch_size)
    h_in: np.ndarray | None = None
    h_act: np.ndarray | None = None
    tokens: np.ndarray | None = None
    with SpillStore(max_memory, spill_dir) as store:
        for ev in stream(ex, feeds, store, tick=tick):
            p = ex.params[ev.layer]
            if h_in is None or h_act is None or tokens is None:
                k_in, k_act = p.up.shape[2], p.down.shape[2]
                h_in = np.zeros((p.num_experts, k_in, k_in))
                h_act = np.zeros((p.num_experts, k_act, k_act))
                tokens = np.zeros(p.num_experts, np.int64)
            mod = mods[ev.batch].ravel()
            x = np.asarray(ev.hidden, dtype=np.float32).reshape(mod.size, -1)
            valid = mod != PAD
            for e in range(p.num_experts):
                tok = np.flatnonzero(valid & (ev.routing.experts == e).any(axis=1))
                if tok.size == 0:
                    continue
                rows = x[tok]
                r64 = rows.astype(np.float64)
                h_in[e] += r64.T @ r64
                a = expert_activation(p, e, rows).astype(np.float64)
                h_act[e] += a.T @ a
                tokens[e] += tok.size
            if ev.last:
                yield ev.layer, LayerHessians(h_in, h_act, tokens), p
                # Drop this layer's references before the next one's are built: two layers'
                # Hessians and weights must never be alive together.
                h_in = h_act = tokens = None
                del p
