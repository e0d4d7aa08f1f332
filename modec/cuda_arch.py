"""CUDA architecture names and which GPUs run code built for them (no TVM import: the
runtime uses this to refuse an artifact whose SASS the GPU cannot run)."""

from __future__ import annotations

import re

from modec.errors import BadInputError

#: An architecture name: SASS for one compute capability ("sm_90"; "sm_90a" = arch-specific).
ARCH = re.compile(r"^sm_(\d+)(a?)$")


def parse_arch(arch: str) -> tuple[int, int, bool]:
    """(major, minor, arch-specific) of "sm_XY" / "sm_XYa".

    Raises:
        BadInputError: not of that form.
    """
    m = ARCH.match(arch)
    if m is None:
        raise BadInputError(f"CUDA arch {arch!r} is not of the form sm_XY (e.g. sm_90)")
    num = int(m.group(1))
    return num // 10, num % 10, bool(m.group(2))


def arch_runs_on(arch: str, device: str) -> bool:
    """Whether SASS built for ``arch`` runs on a GPU of architecture ``device``.

    SASS of sm_XY runs on sm_XZ with Z >= Y (same major); arch-specific code (sm_90a) only on
    that exact architecture. The C++ runtime applies the same rule (runtime/src).
    """
    a, d = parse_arch(arch), parse_arch(device)
    if a[2]:
        return a[:2] == d[:2]
    return a[0] == d[0] and d[1] >= a[1]
