"""Content-addressed cache of analysis results (routing statistics, sensitivities).

An entry is one ``.npz`` file ``{kind}-{key[:32]}.npz`` in the cache directory, where ``key``
is the SHA-256 of the cache version, the entry kind, the model (`hash_model`: the graph
without its weights, then every weight's bytes streamed a chunk at a time), the data (every
input array and the modality mask) and the options that change the result. The full key is
stored inside the entry and checked on load, so a prefix collision or a stale format is a
miss, never a wrong hit. Entries are written to a temporary file and renamed, so an
interrupted compile leaves either a whole entry or none; the next compile with the same
inputs resumes from the entries that were finished.

An entry is one pass's result. A pass whose result takes hours (the exact sensitivity probes
of a large model) also stores its finished pieces as it goes (`Parts`, one file per layer,
``{kind}-{key[:32]}.{part}.npz`` under the same key): a compile that was stopped (Ctrl-C, a
lost Ray cluster, a killed machine) resumes from its last finished piece. The pieces are
removed once the whole entry is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modec.data import Dataset
from modec.frontend import tensor_bytes
from modec.interrupt import checkpoint

log = logging.getLogger(__name__)

#: Bumped whenever what an entry holds, or how it is computed, changes.
CACHE_VERSION = "modec.cache/3"

#: A tensor whose ``meta`` holds this key (a str) is hashed by that digest instead of its
#: bytes: a lazily computed tensor (an expert stack built from external weights) can name its
#: content without being computed. The digest must change whenever the content can.
CONTENT_DIGEST = "modec.content_digest"

__all__ = [
    "CACHE_VERSION",
    "CONTENT_DIGEST",
    "Lookup",
    "Parts",
    "content_key",
    "entry_path",
    "hash_model",
    "load",
    "memoize",
    "memoize_parts",
    "store",
]


def content_key(kind: str, model: ir.Model, data: Dataset, options: dict[str, Any]) -> str:
    """SHA-256 (hex) of what an analysis result depends on."""
    h = hashlib.sha256(f"{CACHE_VERSION}:{kind}".encode())
    hash_model(h, model)
    for name in sorted(data.inputs):
        arr = np.ascontiguousarray(data.inputs[name])
        h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
        h.update(arr.tobytes())
    h.update(np.ascontiguousarray(data.modality).tobytes())
    if data.answer is not None and data.answer.ndim == 2:
        # Multi-token answers: the sensitivities are read at their positions (the key of a
        # set of one-token answers is unchanged).
        from modec.data import answer_lengths

        h.update(b"answer_lengths:" + answer_lengths(data.answer).tobytes())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


def hash_model(h: Any, model: ir.Model) -> None:
    """Feed ``model`` into the hash ``h`` (``hashlib``) without holding its weights.

    First the model as a proto in which every numeric initializer is a placeholder (its name, type
    and shape, no data and no file reference), then, initializer by initializer (graph
    order, subgraphs after their graph), its name, type, shape and bytes as ONNX stores them,
    read by `modec.frontend.tensor_bytes`: a weight in external data is read from its file a
    chunk at a time (never mapped), an in-memory one through a view of its array. The key
    therefore depends on the content only: the same model gives the same key whether its
    weights are inside the ``.onnx`` or in external data, and whatever the data files are
    called. Tensors in node attributes (``Constant``) are serialized with the graph; one in
    external data is streamed after it too.
    """
    graphs = _graphs(model)
    inits = [
        (v, v.const_value)
        for g in graphs
        for v in g.initializers.values()
        if v.const_value is not None and v.const_value.dtype != ir.DataType.STRING
    ]  # string tensors (no weights) stay in the structure
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for v, t in inits:
            v.const_value = ir.ExternalTensor(
                "", 0, t.nbytes, t.dtype, shape=ir.Shape(t.shape.numpy()), name=v.name or ""
            )
            swapped.append((v, t))
        h.update(ir.to_proto(model).SerializeToString(deterministic=True))
    finally:
        for v, t in swapped:
            v.const_value = t
    for v, t in inits:
        _hash_tensor(h, v.name or "", t)
    for g in graphs:
        for node in g:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    tensors = [attr.value]
                elif attr.type == ir.AttributeType.TENSORS:
                    tensors = list(attr.value)
                else:
                    continue
                for t in tensors:
                    if isinstance(t, ir.ExternalTensor):
                        _hash_tensor(h, f"{node.name}.{attr.name}", t)


def _graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph, every function's graph and every subgraph, in a fixed order."""
    out: list[ir.Graph] = []

    def visit(graph: ir.Graph) -> None:
        out.append(graph)
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    visit(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value:
                        visit(g)

    visit(model.graph)
    for f in model.functions.values():
        visit(f.graph)
    return out


def _hash_tensor(h: Any, name: str, t: ir.TensorProtocol) -> None:
    h.update(f"{name}:{t.dtype.name}:{list(t.shape.numpy())}:{t.nbytes}".encode())
    digest = getattr(t, "meta", {}).get(CONTENT_DIGEST)
    if isinstance(digest, str):
        h.update(f"digest:{digest}".encode())
        return
    for chunk in tensor_bytes(t):
        h.update(chunk)


def entry_path(cache_dir: str | os.PathLike[str], kind: str, key: str) -> Path:
    return Path(cache_dir) / f"{kind}-{key[:32]}.npz"


def load(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of the entry at ``path`` if it exists, is readable and holds ``key``."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError) as exc:
        log.warning("cache: unreadable entry %s (%s); recomputing", path, exc)
        return None
    if str(arrays.pop("__key__", "")) != key:
        log.warning("cache: entry %s belongs to other inputs; recomputing", path)
        return None
    log.info("cache: hit %s", path)
    return arrays


def store(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write one entry atomically (temporary file in the same directory, then rename).

    A cache that cannot be written (read-only or full disk) only costs a recomputation next
    time, so the failure is logged and the compile goes on.
    """
    checkpoint()  # results of a step that was interrupted are not committed
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {"__key__": np.array(key), **arrays}
        np.savez(tmp, **payload)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cache: could not write %s (%s); results are not cached", path, exc)
        return
    log.info("cache: stored %s", path)


@dataclass(frozen=True)
class Lookup:
    """Where an analysis result is cached and whether it was found there."""

    hit: bool
    key: str | None = None
    path: Path | None = None


def memoize(
    cache_dir: str | None,
    kind: str,
    model: ir.Model,
    data: Dataset,
    options: dict[str, Any],
    compute: Callable[[], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], Lookup]:
    """The arrays of an analysis result: loaded from the cache, or computed and stored.

    The one cache path of the analysis passes: the entry is keyed by `content_key` over
    ``kind``, the model, the data and ``options``; without ``cache_dir`` nothing is read or
    written.
    """
    if not cache_dir:
        return compute(), Lookup(hit=False)
    key = content_key(kind, model, data, options)
    path = entry_path(cache_dir, kind, key)
    arrays = load(path, key)
    if arrays is not None:
        return arrays, Lookup(True, key, path)
    arrays = compute()
    store(path, key, arrays)
    return arrays, Lookup(False, key, path)


class Parts:
    """The finished pieces of one entry being computed (e.g. one layer's δ each).

    A piece is an entry file of its own, ``{kind}-{key[:32]}.{name}.npz``, holding the full
    key and the piece's name, written atomically as `store` writes; `get` returns it only
    when both match. Without a cache directory nothing is read or written.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None, kind: str, key: str) -> None:
        self._dir = None if cache_dir is None else Path(cache_dir)
        self._kind = kind
        self._key = key

    def _path(self, name: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{self._kind}-{self._key[:32]}.{name}.npz"

    def _full_key(self, name: str) -> str:
        return f"{self._key}:{name}"

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays of piece ``name`` if a previous run finished it."""
        if self._dir is None:
            return None
        return load(self._path(name), self._full_key(name))

    def put(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Store piece ``name`` (a failure to write is logged; only a resume is lost)."""
        if self._dir is None:
            return
        store(self._path(name), self._full_key(name), arrays)

    def clear(self) -> None:
        """Remove every piece of this entry (the whole entry is stored)."""
        if self._dir is None:
            return
        for path in self._dir.glob(f"{self._kind}-{self._key[:32]}.*.npz"):
            path.unlink(missing_ok=True)


def memoize_parts(
    cache_dir: str | None,
    kind: str,
    model: ir.Model,
    data: Dataset,
    options: dict[str, Any],
    compute: Callable[[Parts], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], Lookup]:
    """`memoize` for a result computed in pieces: ``compute`` gets the entry's `Parts`,
    reads the pieces a stopped run finished and stores each piece it finishes; once the
    whole entry is stored the pieces are removed."""
    if not cache_dir:
        return compute(Parts(None, kind, "")), Lookup(hit=False)
    key = content_key(kind, model, data, options)
    path = entry_path(cache_dir, kind, key)
    arrays = load(path, key)
    if arrays is not None:
        return arrays, Lookup(True, key, path)
    parts = Parts(cache_dir, kind, key)
    arrays = compute(parts)
    store(path, key, arrays)
    if path.exists():
        parts.clear()
    return arrays, Lookup(False, key, path)
