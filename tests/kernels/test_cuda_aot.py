"""Ahead-of-time CUDA (`modec.kernels.cuda_aot`): archs, the packed-imports rewrite, fatbins.

Everything here runs without a GPU; nvcc-dependent tests skip without nvcc.
"""

from __future__ import annotations

import struct

import pytest

from modec.cuda_arch import arch_runs_on, parse_arch
from modec.errors import BadInputError, ModecError, UsageError

tvm = pytest.importorskip("tvm")

from modec.kernels.cuda import nvcc_available  # noqa: E402
from modec.kernels.cuda_aot import (  # noqa: E402
    compile_fatbin,
    compile_packed_imports,
    fatbin_entries,
    target_archs,
)
from modec.kernels.target import check_target, resolve_target  # noqa: E402

needs_nvcc = pytest.mark.skipif(not nvcc_available(), reason="nvcc not installed")


@pytest.mark.parametrize(
    ("arch", "device", "runs"),
    [
        ("sm_90", "sm_90", True),
        ("sm_80", "sm_86", True),  # same major, newer minor
        ("sm_86", "sm_80", False),
        ("sm_80", "sm_90", False),  # SASS does not cross majors
        ("sm_90a", "sm_90", True),
        ("sm_90a", "sm_91", False),  # arch-specific: that architecture only
        ("sm_100", "sm_103", True),
    ],
)
def test_arch_compatibility(arch: str, device: str, runs: bool) -> None:
    assert arch_runs_on(arch, device) is runs


def test_arch_names() -> None:
    assert parse_arch("sm_90a") == (9, 0, True) and parse_arch("sm_120") == (12, 0, False)
    for bad in ("sm90", "90", "sm_9x", "compute_90"):
        with pytest.raises(BadInputError, match="sm_XY"):
            parse_arch(bad)


def test_target_archs() -> None:
    assert target_archs("cuda") == ["sm_90"]
    assert target_archs({"kind": "cuda", "arch": "sm_80"}) == ["sm_80"]
    assert target_archs('{"kind": "cuda", "arch": ["sm_90", "sm_80", "sm_90"]}') == [
        "sm_80",
        "sm_90",
    ]
    # TVM generates for the lowest; the artifact carries SASS for all.
    tgt = resolve_target('{"kind": "cuda", "arch": ["sm_90", "sm_86"]}')
    assert str(tgt.attrs["arch"]) == "sm_86"
    with pytest.raises(BadInputError, match="list"):
        target_archs({"kind": "cuda", "arch": []})


@needs_nvcc
def test_check_target_refuses_archs_early() -> None:
    check_target('{"kind": "cuda", "arch": ["sm_80", "sm_90", "sm_90a"]}')
    with pytest.raises(UsageError, match="cannot build sm_35"):
        check_target('{"kind": "cuda", "arch": ["sm_35", "sm_90"]}')
    with pytest.raises(UsageError, match="sm_XY"):
        check_target('{"kind": "cuda", "arch": "ampere"}')


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _s(b: bytes) -> bytes:
    return _u64(len(b)) + b


def _blob(records: list[tuple[bytes, bytes | None]]) -> bytes:
    """A packed-imports blob: a chain of modules (each imports the next)."""
    n = len(records)
    indptr = [0, *range(1, n), n - 1]
    body = _u64(len(indptr)) + b"".join(_u64(i) for i in indptr)
    body += _u64(n - 1) + b"".join(_u64(i) for i in range(1, n))
    for kind, payload in records:
        body += _s(kind) + (b"" if payload is None else _s(payload))
    return _u64(len(body)) + body


def test_packed_imports_rewrite() -> None:
    """The CUDA record's source becomes the compiled code, tagged fatbin; the function table
    and every other record stay as they were."""
    src = b'extern "C" __global__ void k() {}'
    fmap = _u64(1) + _s(b"k") + b"\x07opaque-table"
    vm = b"vm-bytes"
    blob = _blob(
        [(b"relax.VMExecutable", vm), (b"_lib", None), (b"cuda", _s(b"cuda") + fmap + _s(src))]
    )
    out, n = compile_packed_imports(blob, [src], lambda s: b"SASS:" + s.encode())
    assert n == 1
    want = _blob([
        (b"relax.VMExecutable", vm),
        (b"_lib", None),
        (b"cuda", _s(b"fatbin") + fmap + _s(b"SASS:" + src)),
    ])  # fmt: skip
    assert out == want
    # A record whose code is none of the generated sources is not guessed at.
    with pytest.raises(ModecError, match="none of the generated sources"):
        compile_packed_imports(blob, [b"other"], lambda s: b"")
    with pytest.raises(ModecError, match="says"):
        compile_packed_imports(blob[:-1], [src], lambda s: b"")


@needs_nvcc
def test_fatbin_holds_sass_per_arch_and_no_ptx() -> None:
    src = 'extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n'
    fatbin = compile_fatbin(src, ["sm_80", "sm_90"])
    assert fatbin_entries(fatbin) == [("sass", "sm_80"), ("sass", "sm_90")]
    assert compile_fatbin(src, ["sm_80", "sm_90"]) == fatbin  # deterministic
    with pytest.raises(ModecError, match="not a fatbin"):
        fatbin_entries(b"\0" * 64)
