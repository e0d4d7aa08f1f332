"""Memory-mapped arrays whose pages a reader hands back once it is done with them.

A compile keeps what it cannot hold in RAM in memory-mapped files: the quantized codes of
every layer (`modec.method.quantize.spill_codes`), the weights of a model with external
data. A page of such a map, once read, stays in the process's resident set until the map
is dropped, and the maps live until the artifact is written: reading every layer's codes
once (to write ``experts.safetensors``, to pack them for the kernels) would leave all of
them resident, and the peak RSS of a compile would grow with the number of layers
(0.57 GiB per Qwen3-VL-30B-A3B layer, measured in docs/scale.md).

`release` drops the pages behind arrays from the resident set with
``madvise(MADV_DONTNEED)``. A reader releases each array once read, and all of them again
when it is done: a read faults in the whole page-cache folio around it (up to a few MiB with
large folios), so reading one array can map pages of a neighbour released before. The
maps are read-only and backed by files, so nothing is lost: the next read of an array
faults its pages back in from the file (or the page cache).
"""

from __future__ import annotations

import mmap

import numpy as np

__all__ = ["mapping_of", "release"]


def mapping_of(arr: np.ndarray) -> mmap.mmap | None:
    """The `mmap.mmap` that ``arr``'s memory belongs to, or None (an array in RAM)."""
    base: object = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, mmap.mmap) else None


def release(*arrays: np.ndarray) -> int:
    """Drop the pages holding each of ``arrays`` from the resident set where it is a
    read-only view of a file map; return how many were. Pages partly shared with
    neighbouring data are dropped too: a later read of those just faults them back in."""
    return sum(_release(a) for a in arrays)


def _release(arr: np.ndarray) -> bool:
    mm = mapping_of(arr)
    if mm is None or arr.size == 0 or arr.flags.writeable or not hasattr(mmap, "MADV_DONTNEED"):
        # A writable map may hold changes not yet written back to its file (MAP_PRIVATE
        # copy-on-write pages would be lost): only read-only maps are released.
        return False
    start = int(np.frombuffer(mm, np.uint8).ctypes.data)
    lo, hi = np.lib.array_utils.byte_bounds(arr)
    page = mmap.PAGESIZE
    first = (int(lo) - start) // page * page
    last = min(len(mm), -(-(int(hi) - start) // page) * page)
    if last > first:
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True
