"""The KV-cache signature of a decoder graph: which inputs are the cache, which outputs the
updated cache (docs/generation.md).

A model exported for generation takes, besides its usual inputs, the keys and values of
the P positions already processed, one pair per attention layer, and returns them for all
P + T positions. modec reads the names Hugging Face's exporters and onnxruntime-genai use:

- inputs ``past_key_values.{i}.key`` / ``past_key_values.{i}.value``, shape
  ``[batch, kv heads, P, head dim]``, P a symbolic dim shared by all of them;
- outputs ``present.{i}.key`` / ``present.{i}.value``, shape ``[batch, kv heads, P + T,
  head dim]``;
- ``attention_mask`` covers all P + T positions.

P may be 0: with empty caches the graph is the plain forward pass over the prompt. That is
how the analysis passes run such a model (`empty_inputs`), and how a prompt is prefilled.

Pure functions over (name, dtype, shape) records: `modec.data.InputSpec`,
`modec.artifact.TensorSpec` or anything with those three attributes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modec.errors import ModelError

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
PRESENT = "present.{layer}.{kind}"


class _Spec(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | str | None]: ...


@dataclass(frozen=True)
class CacheEntry:
    """One cached tensor: the input it is read from and the output it comes back as."""

    layer: int
    kind: str  # "key" or "value"
    past: str
    present: str
    dtype: str
    heads: int
    head_dim: int


@dataclass(frozen=True)
class CacheSignature:
    """The cache of a model, in layer order (key before value)."""

    entries: tuple[CacheEntry, ...]
    past_dim: str  # the symbol of P in the past inputs

    @property
    def past_names(self) -> frozenset[str]:
        return frozenset(e.past for e in self.entries)

    @property
    def present_names(self) -> frozenset[str]:
        return frozenset(e.present for e in self.entries)


def is_past(name: str) -> bool:
    """Whether an input name is a cache input (``past_key_values.{i}.key|value``)."""
    return PAST.fullmatch(name) is not None


def analysis_outputs(inputs: Sequence[str], outputs: Sequence[str]) -> list[str]:
    """The outputs the analysis passes read: all but the updated cache (``present.*``) of a
    model with cache inputs. Nothing reads that cache at P = 0, and keeping it would hold
    every layer's keys and values of every calibration batch."""
    if not any(is_past(n) for n in inputs):
        return list(outputs)
    present = re.compile(PRESENT.format(layer=r"\d+", kind="(key|value)").replace(".", r"\."))
    return [n for n in outputs if present.fullmatch(n) is None]


def find(inputs: Sequence[_Spec], outputs: Sequence[_Spec] | None = None) -> CacheSignature | None:
    """The cache signature of a model with these inputs (and outputs), or None if it has no
    cache inputs.

    Raises:
        ModelError: cache inputs that do not follow the convention (rank, a static or
            unshared P, a key without its value, a missing ``present`` output).
    """
    found: list[CacheEntry] = []
    past_dims: set[str] = set()
    by_name = {s.name: s for s in outputs or ()}
    for spec in inputs:
        m = PAST.fullmatch(spec.name)
        if m is None:
            continue
        shape = list(spec.shape)
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise ModelError(
                f"cache input {spec.name!r} has shape {shape}; modec reads caches of shape "
                "[batch, kv heads, past length, head dim] with static heads and head dim"
            )
        if not isinstance(shape[2], str):
            raise ModelError(
                f"cache input {spec.name!r} has a static past length ({shape[2]}); export it "
                "with a dynamic past-sequence axis"
            )
        past_dims.add(shape[2])
        layer, kind = int(m.group(1)), m.group(2)
        present = PRESENT.format(layer=layer, kind=kind)
        if outputs is not None and present not in by_name:
            raise ModelError(
                f"cache input {spec.name!r} has no output {present!r}; a model with a KV cache "
                "returns the updated cache as present.{i}.key / present.{i}.value"
            )
        found.append(CacheEntry(layer, kind, spec.name, present, spec.dtype, shape[1], shape[3]))
    if not found:
        return None
    if len(past_dims) != 1:
        raise ModelError(
            f"cache inputs use several past-length dims {sorted(past_dims)}; they must share one"
        )
    found.sort(key=lambda e: (e.layer, e.kind != "key"))
    keys = {(e.layer, e.kind) for e in found}
    for layer, kind in keys:
        other = "value" if kind == "key" else "key"
        if (layer, other) not in keys:
            raise ModelError(
                f"cache input past_key_values.{layer}.{kind} has no past_key_values.{layer}.{other}"
            )
    return CacheSignature(tuple(found), past_dims.pop())


def empty_inputs(
    signature: CacheSignature | Sequence[CacheEntry], batch: int
) -> dict[str, np.ndarray]:
    """Zero-length caches (P = 0) for a batch of ``batch`` prompts."""
    entries = signature.entries if isinstance(signature, CacheSignature) else signature
    return {
        e.past: np.zeros((batch, e.heads, 0, e.head_dim), dtype=_numpy_dtype(e.dtype))
        for e in entries
    }


def with_cache(
    feeds: dict[str, np.ndarray], signature: CacheSignature | None
) -> dict[str, np.ndarray]:
    """``feeds`` with an empty cache added when it has none (a prompt, P = 0)."""
    if signature is None or signature.past_names <= set(feeds):
        return feeds
    batch = next(int(np.shape(v)[0]) for k, v in feeds.items() if not is_past(k))
    return {**empty_inputs(signature, batch), **feeds}


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        bf16: np.dtype = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(name)
