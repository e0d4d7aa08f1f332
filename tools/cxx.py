"""Build the C++ runtime, its example app and its C API test (`runtime/`) with CMake, for tests
and benchmarks."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_runtime(build: Path, test_artifact: Path | None = None) -> bool:
    """Configure and build every target of `runtime/` into ``build`` (libmodec_runtime,
    modec_run and, with a C compiler, c_api_test); False without cmake / g++ on PATH.
    ``test_artifact`` becomes MODEC_TEST_ARTIFACT, the artifact `ctest` runs c_api_test on
    (when None, the value cached by an earlier configure stays).
    A failing build raises `subprocess.CalledProcessError` (its stderr holds the compiler's)."""
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        return False
    # Processes that share ``build`` (the test files of a parallel pytest run) take turns:
    # two CMake configures or builds in one directory corrupt each other's files.
    build.mkdir(parents=True, exist_ok=True)
    with open(build.parent / f".{build.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _configure_and_build(build, test_artifact)
    return True


def _configure_and_build(build: Path, test_artifact: Path | None) -> None:
    cfg = ["cmake", "-S", str(ROOT / "runtime"), "-B", str(build),
           "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}"]  # fmt: skip
    if test_artifact is not None:
        cfg.append(f"-DMODEC_TEST_ARTIFACT={test_artifact}")
    subprocess.run(cfg, check=True, capture_output=True, text=True)
    subprocess.run(
        ["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, text=True
    )


def build_modec_run(build: Path) -> Path | None:
    """Configure and build `runtime/` into ``build``; the `modec_run` app, or None without
    cmake / g++ on PATH. A failing build raises `subprocess.CalledProcessError`."""
    return build / "modec_run" if build_runtime(build) else None


def build_c_api_test(build: Path, test_artifact: Path | None = None) -> Path | None:
    """Build `runtime/` into ``build``; the `c_api_test` program (tests/c_api_test.c, compiled
    as C), or None without cmake / g++ / a C compiler."""
    if not build_runtime(build, test_artifact):
        return None
    exe = build / "c_api_test"
    return exe if exe.exists() else None
