"""Target resolution for the kernels.

`"llvm"` means this host: it becomes `{"kind": "llvm", "mcpu": <host cpu>}` so LLVM emits the
host's vector ISA (AVX-512 here). TVM 0.27 rejects `"llvm -mcpu=..."` strings; pass dicts.
CUDA targets are dicts such as `{"kind": "cuda", "arch": "sm_90"}`; ``arch`` may be a list
(`{"kind": "cuda", "arch": ["sm_80", "sm_90"]}`): TVM generates code for the lowest and the
artifact carries SASS for each (`modec.kernels.cuda_aot`).
"""

from __future__ import annotations

import json
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
    if isinstance(target, str) and target.lstrip().startswith("{"):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"bad kernel target {target!r}: not JSON ({exc})") from exc
    if isinstance(target, dict) and target.get("kind") == "cuda" and "arch" in target:
        from modec.kernels.cuda_aot import target_archs

        target = {**target, "arch": target_archs(target)[0]}
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
    if kind == "cuda":
        from modec.kernels.cuda_aot import nvcc_gpu_codes, target_archs

        try:
            archs = target_archs(target)
            known = nvcc_gpu_codes()
        except ModecError as exc:
            raise UsageError(f"--target {target}: {exc}") from exc
        missing = [a for a in archs if a.removesuffix("a") not in known]
        if missing:
            raise UsageError(
                f"--target {target}: this nvcc cannot build {', '.join(missing)} (it builds "
                f"{', '.join(sorted(known, key=lambda a: (len(a), a)))}); pick archs from that list"
            )
