"""The package layout: passes/ and runtime/python/ install as modec.passes / modec.runtime from
a wheel, every package directory is shipped, and imports go one way (import-linter)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_dirs() -> set[str]:
    """Every directory with an __init__.py, as the package name it installs as."""
    mapping = {"modec": ROOT / "modec", **{k: ROOT / v for k, v in
               CONFIG["tool"]["setuptools"]["package-dir"].items()}}  # fmt: skip
    found = set()
    for name, base in mapping.items():
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_directory_is_shipped():
    assert set(CONFIG["tool"]["setuptools"]["packages"]) == _package_dirs()


def test_no_symlinks_into_the_package():
    assert not [p for p in (ROOT / "modec").rglob("*") if p.is_symlink()]


def test_every_module_has_a_layer():
    """The layers contract names every top-level module of modec (a new one must be placed)."""
    contract = CONFIG["tool"]["importlinter"]["contracts"][0]
    named = {m.strip() for layer in contract["layers"] for m in layer.replace(":", "|").split("|")}
    modules = {f"modec.{p.stem}" for p in (ROOT / "modec").glob("*.py") if p.stem != "__init__"}
    modules |= {f"modec.{p.parent.name}" for p in (ROOT / "modec").glob("*/__init__.py")}
    modules |= {"modec.passes", "modec.runtime"}
    assert modules == named, (modules - named, named - modules)


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """modec built as a wheel and installed into a folder of its own (as pip does for users)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (whl,) = (tmp / "dist").glob("modec-*.whl")
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(whl)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return site


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site)}


def test_wheel_installs_passes_and_runtime_inside_the_package(wheel_site, tmp_path):
    code = (
        "import modec.passes, modec.runtime, modec.pipelines, sys;"
        "print(modec.passes.__file__); print(modec.runtime.__file__);"
        "from modec.pipeline import REGISTRY; print(len(REGISTRY))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(wheel_site),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    passes, runtime, n = r.stdout.split()
    assert Path(passes) == wheel_site / "modec" / "passes" / "__init__.py"
    assert Path(runtime) == wheel_site / "modec" / "runtime" / "__init__.py"
    # One registered pass per pass module of passes/ (not the package's private helpers).
    assert int(n) == len([p for p in (ROOT / "passes").glob("*.py") if not p.name.startswith("_")])


def test_imports_go_one_way(wheel_site, tmp_path):
    """import-linter's contracts (pyproject.toml) hold on the installed package."""
    # import-linter's console script, run by this interpreter (no PATH lookup).
    cli = "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"
    r = subprocess.run([sys.executable, "-c", cli, str(ROOT / "pyproject.toml")], cwd=tmp_path,
                       env=_env(wheel_site), capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:]
    assert "0 broken" in r.stdout
