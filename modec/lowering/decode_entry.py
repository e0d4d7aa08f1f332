"""The ``decode`` entry of a model with a KV cache: ``main`` without the inputs only a prompt
uses (the image), for the generation steps (docs/generation.md).

A vision-language model merges the image into the token embeddings with one select:
``where(input_ids == <image>, image features, token embeddings)``. A decode step feeds
generated tokens, none of them ``<image>``, so the select always takes the token
embeddings, and the vision tower's work is thrown away. `add_decode_entry` makes that
explicit: it copies ``main`` as ``decode``, replaces each such select by its token branch,
drops what no longer reaches an output (the vision tower) and the prompt-only inputs
(``pixel_values``...). ``decode`` takes the same params as ``main``, after its own inputs.

A select qualifies when its condition depends on the token inputs and not on the prompt-
only inputs, and exactly one branch depends on the prompt-only inputs. When the prompt-only
inputs are still read after the rewrite (a model that merges its image differently), no
``decode`` entry is made and generation calls ``main`` at every step with the prompt's
inputs again: correct, and slower by the vision tower per step (the reason is logged and
recorded in the manifest).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax import expr_functor

from modec import kv_cache
from modec.artifact import TensorSpec
from modec.lowering.onnx_import import DenseModule

if TYPE_CHECKING:
    from modec.lowering.kv_in_place import InPlace

logger = logging.getLogger(__name__)

#: Inputs every step of generation feeds (besides the cache): the rest are prompt-only.
STEP_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
DECODE = "decode"


@dataclass(frozen=True)
class DecodeEntry:
    """What `add_decode_entry` made: the entry's inputs, or why there is none."""

    inputs: list[TensorSpec]
    prompt_only: list[str]
    reason: str = ""

    @property
    def made(self) -> bool:
        return not self.reason


def _inputs_of(expr: Any, deps: Mapping[Any, frozenset[str]]) -> frozenset[str]:
    """The inputs (by name) an expression depends on, through the vars it reads."""
    out: frozenset[str] = frozenset()
    for v in relax.analysis.free_vars(expr):
        out |= deps.get(v, frozenset())
    return out


def _deps(func: relax.Function, names: Mapping[Any, str]) -> dict[Any, frozenset[str]]:
    """For every var bound in ``func``: the inputs (by name) its value depends on."""
    deps: dict[Any, frozenset[str]] = {v: frozenset([n]) for v, n in names.items()}
    for block in func.body.blocks:
        for b in block.bindings:
            deps[b.var] = _inputs_of(b.value, deps)
    return deps


@expr_functor.mutator
class _TakeBranch(relax.PyExprMutator):
    """Replaces the given ``where`` calls by one of their branches."""

    def __init__(self, mod: tvm.IRModule, picks: Mapping[Any, int]) -> None:
        super().__init__(mod)
        self.picks = picks

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        arg = self.picks.get(call)
        if arg is None:
            return super().visit_call_(call)
        branch = self.visit_expr(call.args[arg])
        out = call.ty
        if isinstance(out, relax.TensorType) and out.shape is not None:
            bty = branch.ty if hasattr(branch, "ty") else None
            same = (
                isinstance(bty, relax.TensorType)
                and bty.shape is not None
                and tvm_ffi.structural_equal(bty.shape, out.shape)
            )
            if not same:
                return relax.op.broadcast_to(branch, out.shape)
        return branch


def _selects(func: relax.Function, deps: Mapping[Any, frozenset[str]],
             tokens: frozenset[str], prompt: frozenset[str]) -> dict[Any, int]:  # fmt: skip
    """The image-merge selects of ``func``: call -> index of the branch to keep."""
    picks: dict[Any, int] = {}
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
                continue
            if call.op.name != "relax.where":
                continue
            cond, x, y = (_inputs_of(a, deps) for a in call.args)
            if not (cond & tokens) or cond & prompt:
                continue
            if (x & prompt) and not (y & prompt):
                picks[call] = 2
            elif (y & prompt) and not (x & prompt):
                picks[call] = 1
    return picks


def add_decode_entry(dm: DenseModule) -> tuple[DenseModule, DecodeEntry | None]:
    """``dm`` with a ``decode`` function beside ``main`` for a model with a KV cache and
    prompt-only inputs; the entry made (or why not); None for a model without a cache or
    without prompt-only inputs (``main`` serves every step)."""
    sig = kv_cache.find(dm.inputs, dm.outputs)
    if sig is None:
        return dm, None
    step = {s.name for s in dm.inputs if s.name in STEP_INPUTS or kv_cache.is_past(s.name)}
    prompt = frozenset(s.name for s in dm.inputs if s.name not in step)
    if not prompt:
        return dm, None
    main = dm.mod["main"]
    n_in = int(main.attrs["num_input"])
    names = {p: s.name for p, s in zip(main.params[:n_in], dm.inputs, strict=True)}
    deps = _deps(main, names)
    tokens = frozenset(n for n in ("input_ids", "inputs_embeds") if n in step)
    picks = _selects(main, deps, tokens, prompt)
    kept = [s for s in dm.inputs if s.name not in prompt]
    if not picks:
        return dm, _none(kept, prompt, "no select of the image into the token embeddings found")
    mutator = _TakeBranch(dm.mod, picks)
    body = mutator.visit_expr(main.body)
    candidate = relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs)
    mod = dm.mod
    mod[DECODE] = candidate
    mod = relax.transform.DeadCodeElimination(["main", DECODE])(mod)
    decode = mod[DECODE]
    used = {v for v in relax.analysis.free_vars(decode.body)}
    still = sorted(names[p] for p in main.params[:n_in] if names[p] in prompt and p in used)
    if still:
        return dm, _none(kept, prompt, f"the decode graph still reads {still}")
    params = [p for p in decode.params if names.get(p) not in prompt]
    attrs = dict(decode.attrs)
    attrs["num_input"] = len(kept)
    attrs["global_symbol"] = DECODE
    func = relax.Function(params, decode.body, decode.ret_ty, decode.is_pure)
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    # Its own parameter and symbolic vars: a var is defined in one function only.
    mod[DECODE] = relax.utils.copy_with_new_vars(func)
    logger.info("decode entry: %d select(s) take the token branch; %s dropped",
                len(picks), sorted(prompt))  # fmt: skip
    return replace(dm, mod=mod), DecodeEntry(kept, sorted(prompt))


def generation_section(
    dm: DenseModule, entry: DecodeEntry | None, in_place: InPlace | None = None
) -> dict[str, Any] | None:
    """The manifest's ``generation`` section of a model with a KV cache (docs/generation.md),
    None for a model without one. ``in_place``: what `modec.lowering.kv_in_place` made of the
    decode entry (None: not tried, as for CUDA)."""
    sig = kv_cache.find(dm.inputs, dm.outputs)
    if sig is None:
        return None
    names = {s.name for s in dm.inputs}
    tokens = next((n for n in ("input_ids", "inputs_embeds") if n in names), None)
    decode: dict[str, Any]
    if in_place is not None and in_place.made:
        decode = {"entry": DECODE, "inputs": [s.to_json() for s in in_place.inputs]}
    elif entry is not None and entry.made:
        decode = {"entry": DECODE, "inputs": [s.to_json() for s in entry.inputs]}
    else:
        decode = {"entry": "main", "inputs": [s.to_json() for s in dm.inputs]}
    if decode["entry"] == "main" or (entry is not None and not entry.made):
        # main at every step, or a decode entry that runs the vision tower at every step
        decode["reason"] = entry.reason if entry is not None else "no prompt-only inputs"
    decode["cache_in_place"] = in_place is not None and in_place.made
    if in_place is not None and not in_place.made:
        decode["cache_in_place_reason"] = in_place.reason
    cache = [
        {"layer": e.layer, "kind": e.kind, "past": e.past, "present": e.present,
         "dtype": e.dtype, "heads": e.heads, "head_dim": e.head_dim}
        for e in sig.entries
    ]  # fmt: skip
    return {
        "cache": cache,
        "past_dim": sig.past_dim,
        "tokens": tokens,
        "attention_mask": "attention_mask" if "attention_mask" in names else None,
        "position_ids": "position_ids" if "position_ids" in names else None,
        "logits": dm.outputs[0].name,
        "prompt_only": [] if entry is None else list(entry.prompt_only),
        "decode": decode,
    }


def _none(kept: Sequence[TensorSpec], prompt: frozenset[str], reason: str) -> DecodeEntry:
    logger.warning(
        "no decode entry (%s): generation runs the prompt-only inputs %s at every step",
        reason, sorted(prompt),
    )  # fmt: skip
    return DecodeEntry(list(kept), sorted(prompt), reason)
