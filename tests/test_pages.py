"""Mapped arrays leave the resident set once read (`modec.pages`), issue #15.

Residency is read per mapping from ``/proc/self/smaps`` (Linux): the ``Rss`` of the one
mapping that holds the array, so other allocations of the process do not blur it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from modec.method.quantize import dequantized_tensor, spill_codes
from modec.numerics.quant import QuantizedWeight, quantize_rtn
from modec.numerics.schemes import QuantScheme
from modec.pages import mapping_of, release

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux only)"
)

SCHEME = QuantScheme(4, 128)


def resident_bytes(arr: np.ndarray) -> int:
    """The resident bytes of the mapping ``arr`` lives in (its ``Rss`` in smaps)."""
    mm = mapping_of(arr)
    assert mm is not None, "not a mapped array"
    start = int(np.frombuffer(mm, np.uint8).ctypes.data)
    found = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= start < hi
        elif found and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("mapping not in smaps")


def _codes(experts: int = 8, n: int = 256, k: int = 1024) -> list[QuantizedWeight]:
    rng = np.random.default_rng(0)
    return [
        quantize_rtn(rng.standard_normal((n, k)).astype(np.float32), SCHEME) for _ in range(experts)
    ]


def test_release_drops_pages_and_keeps_values(tmp_path: Path) -> None:
    codes = spill_codes(_codes(), str(tmp_path))
    q = codes[1].q
    assert resident_bytes(q) == 0  # written through the file, not through the map
    before = [qw.q.copy() for qw in codes]
    assert resident_bytes(q) >= 8 * q.nbytes
    assert release(*(qw.q for qw in codes)) == 8
    assert resident_bytes(q) == 0
    for qw, b in zip(codes, before, strict=True):
        np.testing.assert_array_equal(qw.q, b)  # read back from the file


def test_release_ignores_arrays_in_ram_and_writable_maps(tmp_path: Path) -> None:
    assert release(np.zeros(1024, np.uint8)) == 0
    path = tmp_path / "w.npy"
    np.save(path, np.arange(4096, dtype=np.int32))
    writable = np.load(path, mmap_mode="r+")
    writable[0] = 7
    assert release(writable) == 0
    assert writable[0] == 7


def test_dequantized_write_back_releases_codes(tmp_path: Path) -> None:
    codes = spill_codes(_codes(), str(tmp_path))
    deq = dequantized_tensor(codes, "w").numpy()
    assert resident_bytes(codes[0].q) == 0
    np.testing.assert_array_equal(deq[2], codes[2].dequantize())


def test_packing_releases_codes(tmp_path: Path) -> None:
    from modec.lowering.moe_plan import PackedStack
    from modec.numerics.packing import pack

    codes = spill_codes(_codes(), str(tmp_path))
    packed = PackedStack.of(codes, SCHEME).codes.numpy()
    assert resident_bytes(codes[0].q) == 0
    want = pack(
        np.stack([c.q for c in codes]), np.stack([c.scale for c in codes]),
        np.stack([c.zero for c in codes]), SCHEME,
    )  # fmt: skip
    np.testing.assert_array_equal(packed, want.codes)


def test_safetensors_writer_releases_mapped_sources(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from modec.safetensors_io import TensorEntry, write_safetensors

    codes = spill_codes(_codes(), str(tmp_path))
    entries = [TensorEntry.of(f"e{e}", qw.q) for e, qw in enumerate(codes)]
    write_safetensors(tmp_path / "x.safetensors", entries)
    assert resident_bytes(codes[0].q) == 0
    back = load_file(str(tmp_path / "x.safetensors"))
    for e, qw in enumerate(codes):
        np.testing.assert_array_equal(back[f"e{e}"], qw.q)
