"""One tiny-decoder artifact per session, shared by the Python and C++ runtime tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("tvm")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modec.lowering.build import build_artifact
    from modec.lowering.tiny_model import TinyConfig, build_tiny_decoder

    out = tmp_path_factory.mktemp("artifact") / "tiny"
    build_artifact(build_tiny_decoder(TinyConfig()), out)
    return out


@pytest.fixture
def artifact_copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    """A private copy a test may corrupt."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_artifact, dst)
    return dst
