"""Content-addressed cache of analysis results (routing statistics, sensitivities).

An entry is one ``.npz`` file ``{kind}-{key[:32]}.npz`` in the cache directory, where ``key``
is the SHA-256 of the cache version, the entry kind, the model (graph and weights as
serialized protobuf), the data (every input array and the modality mask) and the options that
change the result. The full key is stored inside the entry and checked on load, so a prefix
collision or a stale format is a miss, never a wrong hit. Entries are written to a temporary
file and renamed, so an interrupted compile leaves either a whole entry or none; the next
compile with the same inputs resumes from the entries that were finished.
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
from modec.interrupt import checkpoint

log = logging.getLogger(__name__)

#: Bumped whenever what an entry holds, or how it is computed, changes.
CACHE_VERSION = "modec.cache/3"

__all__ = ["CACHE_VERSION", "Lookup", "content_key", "entry_path", "load", "memoize", "store"]


def content_key(kind: str, model: ir.Model, data: Dataset, options: dict[str, Any]) -> str:
    """SHA-256 (hex) of what an analysis result depends on."""
    h = hashlib.sha256(f"{CACHE_VERSION}:{kind}".encode())
    h.update(ir.to_proto(model).SerializeToString(deterministic=True))
    for name in sorted(data.inputs):
        arr = np.ascontiguousarray(data.inputs[name])
        h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
        h.update(arr.tobytes())
    h.update(np.ascontiguousarray(data.modality).tobytes())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


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
