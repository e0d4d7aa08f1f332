"""Layer-streamed execution: a whole calibration set through the model one stage at a time.

The executor (`modec.executor`) runs one batch through every layer. A pass that needs a
statistic of every layer over the whole calibration set can instead run **stage-major**
(llm-compressor's "sequential" pipeline): every batch through dense stage 0, then every batch
through MoE layer 0, then stage 1, and so on. Only the values crossing the current stage
boundary are held — for a decoder, the residual stream and a few masks per batch — in a
`SpillStore` that keeps them in RAM up to a byte budget and past it in memory-mapped ``.npy``
files. One MoE layer's weights are read at a time and released after its last batch, and
each stage's onnxruntime session is built when it is reached and dropped after, so peak
memory does not grow with the number of layers.

Every batch sees exactly the computation of `Executor.run` (same sessions, same reference
MoE), so the per-batch values are bit-identical; only the order in which batches and layers
are visited changes, and a consumer that accumulates per layer over batches in batch order
(`modec.method.routing`, `modec.method.hessians`) sums in the same order as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modec.errors import BadInputError

log = logging.getLogger(__name__)

__all__ = ["LayerEvent", "SpillStore", "default_max_memory", "parse_memory", "stream"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}  # fmt: skip


def parse_memory(text: str) -> int:
    """``16GiB``, ``512MB``, ``2g`` or a byte count → bytes (a `BadInputError` otherwise)."""
    t = text.strip().lower().replace(" ", "")
    i = len(t)
    while i and not (t[i - 1].isdigit() or t[i - 1] == "."):
        i -= 1
    num, unit = t[:i], t[i:]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise BadInputError(
            f"--max-memory {text!r}: expected a positive size such as 16GiB, 512MiB or 8GB"
        )
    return int(value * _UNITS[unit])


def default_max_memory() -> int:
    """Half of the machine's physical memory (the activations' share of a compile's RAM)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return int(pages * size) // 2
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB total
        return 8 * 2**30


class SpillStore:
    """Arrays by key, in RAM up to ``budget`` bytes and past it in ``.npy`` files (mmap).

    Args:
        budget: bytes kept in RAM; 0 spills everything.
        directory: where the spill directory is created (default: the system temp dir).
    """

    def __init__(self, budget: int, directory: str | os.PathLike[str] | None = None) -> None:
        self.budget = budget
        self._parent = None if directory is None else os.fspath(directory)
        self._dir: str | None = None
        self._ram: dict[Hashable, np.ndarray] = {}
        self._disk: dict[Hashable, str] = {}
        self._n = 0
        self.resident = 0
        #: bytes written to disk so far (a statistic: spilled values are never rewritten).
        self.spilled = 0
        self.peak_resident = 0

    def put(self, key: Hashable, value: np.ndarray) -> None:
        """Store ``value`` under ``key`` (replacing what was there)."""
        self.drop(key)
        arr = np.ascontiguousarray(value)
        if self.resident + arr.nbytes <= self.budget:
            self._ram[key] = arr
            self.resident += arr.nbytes
            self.peak_resident = max(self.peak_resident, self.resident)
            return
        if self._dir is None:
            if self._parent is not None:
                os.makedirs(self._parent, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="modec-spill-", dir=self._parent)
            log.info("activations past %d bytes spill to %s", self.budget, self._dir)
        path = os.path.join(self._dir, f"{self._n}.npy")
        self._n += 1
        np.save(path, arr, allow_pickle=False)
        self._disk[key] = path
        self.spilled += arr.nbytes

    def get(self, key: Hashable) -> np.ndarray:
        """The array under ``key`` (a read-only memory map when it was spilled)."""
        if key in self._ram:
            return self._ram[key]
        path = self._disk.get(key)
        if path is None:
            raise KeyError(key)
        arr: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
        return arr

    def names(self, batch: int) -> list[str]:
        """The names held for ``batch`` (keys ``(batch, name)``), in insertion order."""
        keys = list(self._ram) + list(self._disk)
        return [k[1] for k in keys if isinstance(k, tuple) and len(k) == 2 and k[0] == batch]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._ram or key in self._disk

    def drop(self, key: Hashable) -> None:
        """Forget ``key`` (its file is deleted)."""
        arr = self._ram.pop(key, None)
        if arr is not None:
            self.resident -= arr.nbytes
        path = self._disk.pop(key, None)
        if path is not None:
            os.unlink(path)

    def close(self) -> None:
        """Forget everything and delete the spill directory."""
        self._ram.clear()
        self._disk.clear()
        self.resident = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, eq=False)
class LayerEvent:
    """One batch through one MoE layer, as `stream` yields it.

    Attributes:
        layer: the MoE layer (execution order).
        batch: the batch index.
        hidden: the layer's input ``[..., H]``.
        routing: its routing over the flattened tokens.
        last: this is the layer's last batch (its statistics are complete after it).
        value: reads a value of this batch by name (the layer's taps, graph inputs).
    """

    layer: int
    batch: int
    hidden: np.ndarray
    routing: Any
    last: bool
    value: Callable[[str], np.ndarray]


def _last_uses(ex: Any, taps: Mapping[int, Sequence[str]]) -> dict[str, int]:
    """The last stage that reads each value crossing stages (graph outputs: never freed)."""
    n_stages = len(ex.stages)
    last: dict[str, int] = {}

    def use(name: str, s: int) -> None:
        last[name] = max(last.get(name, -1), s)

    for s, st in enumerate(ex.stages):
        for n in st.inputs:
            use(n, s)
    for li, node in enumerate(ex.moe):
        use(node.inputs[0].name, ex.moe_stage[li])
        for n in taps.get(li, ()):
            use(n, ex.moe_stage[li])
    for n in ex.output_names:
        use(n, n_stages)
    return last


def stream(
    ex: Any,
    batches: Sequence[Mapping[str, np.ndarray]],
    store: SpillStore,
    *,
    taps: Mapping[int, Sequence[str]] | None = None,
    release: bool = True,
    tick: Callable[[], None] = lambda: None,
) -> Iterator[LayerEvent]:
    """Run ``batches`` through the executor ``ex`` stage-major, yielding each (layer, batch).

    Args:
        ex: a `modec.executor.Executor` (built with the ``taps`` it should return).
        batches: the graph inputs of each batch.
        store: holds the values crossing stages (and, at the end, the graph outputs:
            ``store.get((batch, name))``).
        taps: per layer, the values its consumer reads through `LayerEvent.value` (kept until
            that layer has run).
        release: drop each stage's session and each layer's weights after use.
        tick: called after each stage and each layer.
    """
    from modec.moe.reference import moe_forward

    taps = taps or {}
    known = set(ex.taps)
    for names in taps.values():
        missing = set(names) - known - {v.name for v in ex.graph.inputs}
        if missing:
            raise BadInputError(f"stream: values {sorted(missing)} are not executor taps")
    last = _last_uses(ex, taps)
    nb = len(batches)
    for b, feeds in enumerate(batches):
        for k, v in feeds.items():
            store.put((b, k), np.asarray(v))
    by_stage: dict[int, list[int]] = {}
    for li, s in enumerate(ex.moe_stage):
        by_stage.setdefault(s, []).append(li)
    for s, st in enumerate(ex.stages):
        if st.build is not None:
            session = ex.stage_session(s)
            for b in range(nb):
                feeds = {n: ex.stage_feed(store.get((b, n))) for n in st.inputs}
                outs = session.run(st.outputs, feeds)
                for n, o in zip(st.outputs, outs, strict=True):
                    store.put((b, n), o)
            if release:
                ex.release_stage(s)
            tick()
        for li in by_stage.get(s, []):
            node = ex.moe[li]
            p = ex.params[li]
            for b in range(nb):
                hidden = np.asarray(store.get((b, node.inputs[0].name)))
                r = moe_forward(p, hidden)
                store.put((b, node.outputs[0].name), r.output)

                def value(name: str, b: int = b) -> np.ndarray:
                    return store.get((b, name))

                yield LayerEvent(li, b, hidden, r.routing, b == nb - 1, value)
            if release:
                ex.params.release(li)
            # Drop this layer's weights now: kept until the next assignment, they would be
            # alive together with the next layer's (two layers' fp32 experts at once).
            del p
            tick()
        done = [n for n, stage in last.items() if stage == s]
        done += [n for n in st.outputs if n not in last]  # read by no one (untapped taps)
        for name in done:
            for b in range(nb):
                store.drop((b, name))
