"""The C++ runtime's CUDA path (docs/runtime_cuda.md), on a machine with or without a GPU.

Without a GPU: the path compiles (it is part of every build of runtime/), the architecture
rule and the manifest's CUDA target pass their unit test (runtime/tests/artifact_check_test.cc),
and every refusal is one line with its status: a CPU artifact on device cuda, a CUDA target
without `archs`, a CUDA artifact where the NVIDIA driver is missing (the real one on this
machine) or finds no GPU (a stand-in libcuda.so.1 whose every call says "no device"). A CUDA
artifact here is the tiny CPU artifact with its manifest's target rewritten: every check before
the GPU's passes, and none reads model.so before the GPU is found.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from modec.artifact import MANIFEST
from tools.cxx import build_runtime

pytestmark = pytest.mark.cxx
ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "runtime-test"  # the build of test_cxx_runtime.py and test_c_api.py
CUDA_TARGET = {
    "kind": "cuda",
    "device": "cuda",
    "machine": platform.machine(),
    "arch": "sm_90",
    "archs": ["sm_90"],
}


@pytest.fixture(scope="module")
def build() -> Path:
    try:
        if not build_runtime(BUILD):
            pytest.skip("cmake or g++ not installed")
    except subprocess.CalledProcessError as e:  # show the compiler's message, not just the rc
        pytest.fail(f"runtime build failed:\n{e.stdout}\n{e.stderr}")
    return BUILD


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _target(artifact: Path, target: dict[str, object]) -> None:
    m = json.loads((artifact / MANIFEST).read_text())
    m["target"] = target
    (artifact / MANIFEST).write_text(json.dumps(m))


def _modec_run(
    build: Path, artifact: Path, tmp: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    ids = np.ones((1, 4), np.int64)
    np.save(tmp / "ids.npy", ids)
    np.save(tmp / "mask.npy", np.ones_like(ids))
    feeds = [f"input_ids={tmp / 'ids.npy'}", f"attention_mask={tmp / 'mask.npy'}"]
    cmd = [str(build / "modec_run"), str(artifact), *args, *feeds, "--out", str(tmp)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _refused(res: subprocess.CompletedProcess[str], status: str, *parts: str) -> str:
    """The one stderr line of a refusal with `status` (its exit code: > 0, not a signal)."""
    codes = {"MODEC_ERR_MANIFEST": 3, "MODEC_ERR_TARGET": 5}
    assert res.returncode == codes[status], (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"modec_run: {status}: "), res.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert res.stdout == ""
    return lines[0]


def test_arch_rule_and_cuda_target_unit_test(build: Path) -> None:
    """runtime/tests/artifact_check_test.cc: CudaArchRuns, IsCudaArch, CudaArchOf, the
    refusal's text and ParseManifest on CUDA targets (no GPU needed)."""
    res = subprocess.run([str(build / "artifact_check_test")], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "FAIL" not in out
    n, rest = out.splitlines()[-1].split(" passed, ")
    assert rest == "0 failed" and int(n) >= 60
    for line in (
        "ok   CudaArchRuns(sm_80, sm_86) is true",
        "ok   CudaArchRuns(sm_86, sm_80) is false",
        "ok   CudaArchRuns(sm_90, sm_100) is false",
        "ok   CudaArchRuns(sm_90a, sm_90) is true",
        "ok   CudaArchRuns(sm_100a, sm_103) is false",
        "ok   CudaArchOf('10.0') is 'sm_100'",
        "ok   refusal: artifact built for CUDA archs sm_90, sm_100; this GPU (NVIDIA RTX A6000) is "
        'sm_86: rebuild with --target \'{"kind": "cuda", "arch": "sm_86"}\'',
        "ok   CUDA target without archs: MODEC_ERR_MANIFEST",
    ):
        assert line in out, line


def test_example_usage_names_the_device_option(build: Path, tiny_artifact: Path) -> None:
    res = subprocess.run([str(build / "modec_run"), str(tiny_artifact), "--device", "tpu"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 64
    assert res.stderr.startswith("usage: modec_run ARTIFACT_DIR [--device cpu|cuda] ")


def test_cpu_artifact_on_cuda_is_refused(build: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    """Refused from the manifest, before the CUDA runtime is looked for (no driver needed)."""
    res = _modec_run(build, tiny_artifact, tmp_path, "--device", "cuda")
    _refused(res, "MODEC_ERR_TARGET",
             "artifact built for device 'cpu', this session runs on 'cuda'")  # fmt: skip
    assert not (tmp_path / "logits.npy").exists()


def test_cpu_device_is_the_default(build: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    res = _modec_run(build, tiny_artifact, tmp_path, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    default = np.load(tmp_path / "logits.npy")
    res = _modec_run(build, tiny_artifact, tmp_path)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), default)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    ("archs", "message"),
    [
        (None, "the CUDA target has no 'archs': the artifact predates compiled CUDA kernels; "
               "rebuild it with `modec compile ... --target cuda`"),
        ([], "target.archs is malformed"),
        (["sm_90", "compute_90"], "target.archs is malformed"),
        ("sm_90", "target.archs is malformed"),
    ],
)  # fmt: skip
def test_cuda_target_without_valid_archs_is_a_manifest_error(
    build: Path, artifact_copy: Path, tmp_path: Path, device: str, archs: object, message: str
) -> None:
    target = dict(CUDA_TARGET)
    if archs is None:
        del target["archs"]
    else:
        target["archs"] = archs
    _target(artifact_copy, target)
    res = _modec_run(build, artifact_copy, tmp_path, "--device", device)
    _refused(res, "MODEC_ERR_MANIFEST", f"{artifact_copy / MANIFEST}: {message}", "--target cuda")


def test_cuda_artifact_on_cpu_is_refused(build: Path, artifact_copy: Path, tmp_path: Path) -> None:
    _target(artifact_copy, CUDA_TARGET)
    res = _modec_run(build, artifact_copy, tmp_path)
    _refused(
        res, "MODEC_ERR_TARGET", "artifact built for device 'cuda', this session runs on 'cpu'"
    )


def test_cuda_artifact_without_a_driver(build: Path, artifact_copy: Path, tmp_path: Path) -> None:
    """No libcuda.so.1: libtvm_runtime_cuda.so cannot be loaded; one line naming it, the
    loader's reason and the fix, not a crash."""
    if _has_driver():
        pytest.skip("the NVIDIA driver (libcuda.so.1) is installed here")
    _target(artifact_copy, CUDA_TARGET)
    res = _modec_run(build, artifact_copy, tmp_path, "--device", "cuda")
    line = _refused(res, "MODEC_ERR_TARGET", "cannot load TVM's CUDA runtime ",
                    "libtvm_runtime_cuda.so (libcuda.so.1: cannot open shared object file",
                    "needs the NVIDIA driver (libcuda.so.1)", "LD_LIBRARY_PATH")  # fmt: skip
    # Found beside the libtvm_runtime.so the build links (the wheel's lib/), not by name.
    import tvm

    assert str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so") in line


STUB_DRIVER = """
/* A libcuda.so.1 without a GPU: every driver entry point reports CUDA_ERROR_NO_DEVICE. */
#define STUB(name) int name(void) { return 100; }
STUB(cuInit) STUB(cuDriverGetVersion) STUB(cuDeviceGetCount) STUB(cuGetProcAddress)
STUB(cuGetProcAddress_v2) STUB(cuGetExportTable) STUB(cuDeviceGetName) STUB(cuFuncSetAttribute)
STUB(cuGetErrorName) STUB(cuGetErrorString) STUB(cuLaunchKernelEx) STUB(cuModuleGetFunction)
STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled)
"""


def test_cuda_artifact_without_a_gpu(build: Path, artifact_copy: Path, tmp_path: Path) -> None:
    """A driver that finds no GPU (a stand-in libcuda.so.1 ahead on LD_LIBRARY_PATH): the CUDA
    runtime loads, device 0 does not exist; one line saying so and what to check."""
    if _has_driver():
        pytest.skip("a real NVIDIA driver is installed: the stand-in would not be the one loaded")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in libcuda.so.1")
    (tmp_path / "stub.c").write_text(STUB_DRIVER)
    lib = tmp_path / "driver" / "libcuda.so.1"
    lib.parent.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib),
                    str(tmp_path / "stub.c")], check=True, capture_output=True)  # fmt: skip
    _target(artifact_copy, CUDA_TARGET)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(lib.parent), env.get("LD_LIBRARY_PATH")])
    )
    res = _modec_run(build, artifact_copy, tmp_path, "--device", "cuda", env=env)
    _refused(res, "MODEC_ERR_TARGET", "no CUDA GPU: the CUDA runtime finds no device 0",
             "check nvidia-smi")  # fmt: skip
