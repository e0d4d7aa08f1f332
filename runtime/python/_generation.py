"""Generation for `modec.runtime.Session`: the manifest's ``generation`` section, the token
picker and the prefill/decode loop, as docs/generation.md specifies them (the C runtime
implements the same, token for token)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modec import kv_cache
from modec.artifact import Manifest, TensorSpec
from modec.errors import BadInputError, ModelError
from modec.kv_cache import CacheEntry

if TYPE_CHECKING:
    from modec.runtime import Session

#: ``callback(step, tokens, finished)``: each row's token and done flag; a true return stops
#: (as the C API's non-zero and the C++ wrapper's true).
Callback = Callable[[int, np.ndarray, np.ndarray], "bool | None"]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class GenerationSpec:
    """The manifest's ``sections.generation`` (docs/generation.md)."""

    cache: tuple[CacheEntry, ...]
    tokens: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    prompt_only: tuple[str, ...]
    decode_entry: str
    decode_inputs: list[TensorSpec]
    #: the decode entry writes the step into buffers [batch, heads, capacity, head dim] and
    #: takes the positions they hold, [P], after its inputs (docs/generation.md)
    cache_in_place: bool = False


def read_section(manifest: Manifest, path: Path) -> GenerationSpec | None:
    """The generation section of a manifest, None if it has none.

    Raises:
        ModelError: a malformed section (names the field).
    """
    sec = manifest.sections.get("generation")
    if sec is None:
        return None
    where = f"{path / 'manifest.json'}: sections.generation"
    try:
        cache = tuple(
            CacheEntry(
                int(c["layer"]),
                str(c["kind"]),
                str(c["past"]),
                str(c["present"]),
                str(c["dtype"]),
                int(c["heads"]),
                int(c["head_dim"]),
            )
            for c in sec["cache"]
        )
        decode = sec["decode"]
        if not isinstance(decode, dict):
            raise TypeError(f"decode is {type(decode).__name__}, not an object")
        in_place = decode.get("cache_in_place", False)
        if not isinstance(in_place, bool):
            raise TypeError(f"decode.cache_in_place is {in_place!r}, not a boolean")
        spec = GenerationSpec(
            cache=cache,
            tokens=str(sec["tokens"]),
            attention_mask=None if sec["attention_mask"] is None else str(sec["attention_mask"]),
            position_ids=None if sec["position_ids"] is None else str(sec["position_ids"]),
            logits=str(sec["logits"]),
            prompt_only=tuple(str(n) for n in sec["prompt_only"]),
            decode_entry=str(decode["entry"]),
            decode_inputs=[TensorSpec.from_json(t) for t in decode["inputs"]],
            cache_in_place=in_place,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where} is malformed ({exc!r}); rebuild the artifact") from exc
    inputs = {s.name for s in manifest.inputs}
    outputs = {s.name for s in manifest.outputs}
    named = [spec.tokens, *(c.past for c in cache), *spec.prompt_only]
    named += [n for n in (spec.attention_mask, spec.position_ids) if n is not None]
    unknown = [n for n in named if n not in inputs]
    unknown += [n for n in (spec.logits, *(c.present for c in cache)) if n not in outputs]
    if unknown or not cache:
        raise ModelError(f"{where} names {unknown or 'no cache'}, not the model's; rebuild it")
    return spec


@dataclass(frozen=True)
class Settings:
    """How tokens are picked (docs/generation.md, "Picking a token")."""

    max_new_tokens: int = 32
    stop: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise BadInputError(f"max_new_tokens is {self.max_new_tokens}; need >= 0")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise BadInputError(f"temperature is {self.temperature}; need a finite value >= 0")
        if self.top_k < 0:
            raise BadInputError(f"top_k is {self.top_k}; need >= 0 (0: no limit)")
        if not 0 < self.top_p <= 1:
            raise BadInputError(f"top_p is {self.top_p}; need 0 < top_p <= 1")
        if not 0 <= self.seed <= _MASK64:
            raise BadInputError(f"seed {self.seed} is not an unsigned 64-bit integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class SplitMix64:
    """The generator docs/generation.md specifies (so that both runtimes draw alike)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        """A float64 in [0, 1) from the top 53 bits."""
        return (self.next_u64() >> 11) * 2.0**-53


def pick(logits: np.ndarray, settings: Settings, rng: SplitMix64) -> int:
    """One token from one row of float32 logits ``[V]``."""
    if settings.greedy:
        return int(np.argmax(logits))  # the first (lowest id) of equal maxima
    z = logits.astype(np.float64) / settings.temperature
    order = np.lexsort((np.arange(z.size), -z))  # z descending, then id ascending
    if settings.top_k:
        order = order[: settings.top_k]
    p = np.exp(z[order] - z[order[0]])
    cum = np.cumsum(p)
    if settings.top_p < 1:
        keep = int(np.searchsorted(cum, settings.top_p * cum[-1], side="left")) + 1
        order, cum = order[: min(keep, order.size)], cum[: min(keep, order.size)]
    target = rng.uniform() * cum[-1]
    idx = int(np.searchsorted(cum, target, side="right"))
    return int(order[min(idx, order.size - 1)])


@dataclass
class Generation:
    """What `Session.generate` returns.

    Attributes:
        tokens: each row's generated tokens (a stop token kept as its last).
        prefill_seconds: the prompt's forward pass.
        decode_seconds: the decode steps, token picking included.
        steps: decode steps run.
    """

    tokens: list[list[int]] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens the decode steps produced per second, all rows together."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


def generate(
    session: Session, inputs: Mapping[str, np.ndarray], settings: Settings,
    callback: Callback | None = None,
) -> Generation:  # fmt: skip
    """The loop of docs/generation.md on a loaded artifact."""
    from modec.runtime import Held

    spec = session.generation
    if spec is None:
        raise ModelError(
            f"{session.path}: the artifact has no KV cache; export the model with "
            "past_key_values inputs and present outputs (docs/generation.md) to generate"
        )
    settings.check()
    given = dict(inputs)
    cached = [c.past for c in spec.cache if c.past in given]
    if cached:
        raise BadInputError(f"inputs {cached} are the KV cache; pass the prompt only")
    if spec.tokens not in given:
        raise BadInputError(f"the prompt needs {spec.tokens!r}")
    ids = np.asarray(given[spec.tokens])
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise BadInputError(f"{spec.tokens!r} has shape {list(ids.shape)}; need [batch >= 1, "
                            "tokens >= 1]")  # fmt: skip
    batch = int(ids.shape[0])
    dtypes = {s.name: s.dtype for s in session.inputs}
    given.update(kv_cache.empty_inputs(spec.cache, batch))
    mask = None
    if spec.attention_mask is not None:
        if spec.attention_mask not in given:
            raise BadInputError(f"the prompt needs {spec.attention_mask!r}")
        mask = np.asarray(given[spec.attention_mask])
        if mask.shape != ids.shape:
            raise BadInputError(
                f"{spec.attention_mask!r} has shape {list(mask.shape)}; the prompt's "
                f"{spec.tokens!r} {list(ids.shape)} (no cache yet: the same length)"
            )
    if spec.position_ids is not None and spec.position_ids not in given and mask is not None:
        given[spec.position_ids] = _positions(mask, ids.shape[1]).astype(dtypes[spec.position_ids])
    out = Generation(tokens=[[] for _ in range(batch)])
    t0 = time.perf_counter()
    results = session._invoke("main", given)
    out.prefill_seconds = time.perf_counter() - t0
    if settings.max_new_tokens == 0:
        return out
    names = [s.name for s in session.outputs]
    by_name = dict(zip(names, results, strict=True))
    rng = SplitMix64(settings.seed)
    stop = set(settings.stop)
    finished = np.zeros(batch, dtype=bool)
    last = np.zeros(batch, dtype=np.int64)
    decode_inputs = {s.name for s in spec.decode_inputs}
    filled = int(ids.shape[1])  # positions in the cache
    if spec.cache_in_place and settings.max_new_tokens > 1:
        # Room for every decode step (one per token but the last), allocated once: the
        # prefill's concatenated cache is copied into buffers the steps write in place.
        room = filled + settings.max_new_tokens - 1
        for c in spec.cache:
            by_name[c.present] = session._rt.grown(by_name[c.present], room, filled)
    t1 = time.perf_counter()
    step = 0
    # The first decode step goes through every input and output check. The later ones call
    # the same function with the same argument list, in which only the new token, the mask,
    # the positions, the cache tensors and the past length change: all made here, of the
    # kinds and shapes the first step checked (docs/performance.md: 1.06x a step alone).
    at = {s.name: i for i, s in enumerate(session._entries[spec.decode_entry][1])}
    call: tuple[Any, list[Any]] | None = None
    if mask is not None:
        # The mask of every step is a prefix of one buffer of ones (each step appends a 1),
        # and each row's position is its count of ones so far less one (`_positions`).
        grown = np.ones((batch, filled + settings.max_new_tokens), mask.dtype)
        grown[:, :filled] = mask
        count = mask.astype(np.int64).sum(axis=1)
    while True:
        logits = session._rt.last_position(by_name[spec.logits])
        top = logits.argmax(axis=-1)  # the first maximum; the first NaN where a row has one
        for b in range(batch):
            if finished[b]:
                continue
            if math.isnan(logits[b, top[b]]):
                raise ModelError(f"{session.path}: the model returned NaN logits; no token can "
                                 "be picked")  # fmt: skip
            tok = int(top[b]) if settings.greedy else pick(logits[b], settings, rng)
            out.tokens[b].append(tok)
            last[b] = tok
            finished[b] = tok in stop or len(out.tokens[b]) >= settings.max_new_tokens
        halt = callback(step, last.copy(), finished.copy()) if callback is not None else None
        step += 1
        if finished.all() or halt:
            break
        feeds: dict[str, Any] = {spec.tokens: last.reshape(batch, 1).astype(ids.dtype)}
        if mask is not None and spec.attention_mask is not None:
            feeds[spec.attention_mask] = grown[:, : filled + 1]
            count += 1
            if spec.position_ids is not None:
                pos = np.maximum(count - 1, 0).reshape(batch, 1)
                feeds[spec.position_ids] = pos.astype(dtypes[spec.position_ids])
        length = filled if spec.cache_in_place else None
        if call is None:
            for c in spec.cache:
                feeds[c.past] = Held(by_name[c.present])
            for name in decode_inputs - set(feeds):
                feeds[name] = given[name]  # the prompt-only inputs, when decode is main
            call = session._arguments(spec.decode_entry, feeds, past_length=length)
            results = session._checked_outputs(session._call(*call))
        else:
            func, args = call
            for name, a in feeds.items():
                args[at[name]] = session._rt.tensor(a)
            for c in spec.cache:
                args[at[c.past]] = by_name[c.present]
            if length is not None:
                args[-1] = session._rt.shape([length])
            results = session._call(func, args)
        by_name = dict(zip(names, results, strict=True))
        filled += 1
        out.steps += 1
    out.decode_seconds = time.perf_counter() - t1
    return out


def _positions(mask: np.ndarray, last: int) -> np.ndarray:
    """``cumsum(mask) - 1`` of the last ``last`` columns, clamped at 0."""
    pos = np.cumsum(mask.astype(np.int64), axis=1) - 1
    return np.maximum(pos[:, pos.shape[1] - last :], 0)


__all__: Sequence[str] = ["Generation", "GenerationSpec", "Settings", "SplitMix64", "pick"]
