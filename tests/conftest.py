

# ==== modec.moe fixtures (owner: graph-analysis core) ===================================
# Exported MoE test models, built on first use and cached for the session.
import pathlib as _moe_pathlib

import pytest as _moe_pytest


@_moe_pytest.fixture(scope="session")
def moe_model(tmp_path_factory: _moe_pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``moe_model(name, exporter) -> Path`` of a tiny exported MoE fixture (see tests/fixtures)."""
    from tests.fixtures.models import build_and_export

    root: _moe_pathlib.Path = tmp_path_factory.mktemp("moe_models")

    def get(name: str, exporter: str) -> _moe_pathlib.Path:
        return build_and_export(name, exporter, root)

    return get


# ==== end modec.moe fixtures =============================================================
