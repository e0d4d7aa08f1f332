"""The Python runtime's default thread count: physical cores, unless the user chose."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from modec.runtime._tvm import default_threads, physical_cores


def _sysfs(root: Path, cores: dict[int, tuple[str, str]]) -> Path:
    for cpu, (package, core) in cores.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_cores_not_hardware_threads(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    # Every allowed CPU its own core, then all of them SMT siblings of one core.
    own = _sysfs(tmp_path / "own", {c: ("0", str(c)) for c in cpus})
    assert physical_cores(own) == len(cpus)
    smt = _sysfs(tmp_path / "smt", {c: ("0", "0") for c in cpus})
    assert physical_cores(smt) == 1
    assert physical_cores(tmp_path / "missing") is None


@pytest.mark.parametrize("user", ["TVM_NUM_THREADS", "OMP_NUM_THREADS", None])
def test_default_threads_keeps_the_users_choice(
    user: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if user is not None:
        monkeypatch.setenv(user, "3")
    default_threads()
    if user is None:
        assert os.environ["TVM_NUM_THREADS"] == str(physical_cores())
    else:
        assert os.environ[user] == "3"
        assert user == "TVM_NUM_THREADS" or "TVM_NUM_THREADS" not in os.environ
