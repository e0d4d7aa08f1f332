"""Build the C++ runtime and its example app (`runtime/`) with CMake, for tests and benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_modec_run(build: Path) -> Path | None:
    """Configure and build `runtime/` into ``build``; the `modec_run` app, or None without
    cmake / g++ on PATH. A failing build raises `subprocess.CalledProcessError`."""
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        return None
    cfg = ["cmake", "-S", str(ROOT / "runtime"), "-B", str(build),
           "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}"]  # fmt: skip
    subprocess.run(cfg, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return build / "modec_run"
