"""Target resolution for the kernels.

`"llvm"` means this host: it becomes `{"kind": "llvm", "mcpu": <host cpu>}` so LLVM emits the
host's vector ISA (AVX-512 here). TVM 0.27 rejects `"llvm -mcpu=..."` strings; pass dicts.
CUDA targets are dicts such as `{"kind": "cuda", "arch": "sm_90"}`.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import tvm

from modec.errors import BadInputError

TargetLike: TypeAlias = str | dict[str, Any] | tvm.target.Target

#: The CUDA target the project generates for (H100).
CUDA_SM90: dict[str, Any] = {"kind": "cuda", "arch": "sm_90"}


def resolve_target(target: TargetLike) -> tvm.target.Target:
    """A `tvm.target.Target` for "llvm", "cuda", a dict or a Target."""
    if isinstance(target, tvm.target.Target):
        return target
    if target == "llvm":
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    if target == "cuda":
        return tvm.target.Target(CUDA_SM90)
    try:
        return tvm.target.Target(target)
    except Exception as exc:  # TVM raises its own error types; name the fix instead
        raise BadInputError(
            f"bad kernel target {target!r} ({exc}); use 'llvm', 'cuda' or a dict such as "
            f"{CUDA_SM90}"
        ) from exc


def is_cuda(target: tvm.target.Target) -> bool:
    """Whether the target is a CUDA GPU."""
    return str(target.kind.name) == "cuda"


def check_target(target: str) -> None:
    """Refuse a target modec cannot build for, before any expensive work.

    modec builds for ``llvm`` (this CPU; the default) and ``cuda`` (sm_90 unless a dict
    target says otherwise). Anything else would fail inside TVM after calibration and
    quantization, so it is a usage error here.
    """
    from modec.errors import ModecError, UsageError

    try:
        kind = str(resolve_target(target).kind.name)
    except ModecError as exc:
        raise UsageError(f"--target {target}: {exc}") from exc
    if kind not in ("llvm", "cuda"):
        raise UsageError(
            f"--target {target}: modec builds for 'llvm' (this CPU) or 'cuda', not {kind!r}"
        )
