"""The installed C/C++ package: `cmake --install` of runtime/ and find_package(modec).

One build of runtime/ into a temporary directory, installed into a temporary prefix; the
tests check the layout, the ELF dynamic sections (SONAME, $ORIGIN-only RUNPATHs), the CMake
package files (relative paths, version compatibility, an incomplete prefix refused), then
build runtime/examples/consumer against the prefix and run it on the tiny artifact, also
after the prefix was moved elsewhere (relocatable, no Python or site-packages needed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import modec.runtime as rt
import numpy as np
import pytest

from modec.artifact import MANIFEST
from modec.lowering.tiny_model import TinyConfig, tiny_inputs
from tools.cxx import build_runtime

pytestmark = [pytest.mark.cxx, pytest.mark.slow]  # a fresh build of runtime/: ~30 s
ROOT = Path(__file__).resolve().parents[2]
CONSUMER = ROOT / "runtime" / "examples" / "consumer"
VERSION = "0.1.0"  # project(... VERSION) in runtime/CMakeLists.txt
SONAME = "libmodec_runtime.so.0.1"  # before 1.0 the SONAME carries MAJOR.MINOR
TVM_LIBS = ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_ffi.so")


def _run(cmd: list[str | Path], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run without LD_LIBRARY_PATH / PYTHONPATH, so that only RUNPATHs can find libraries."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PYTHONPATH")}
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _ok(cmd: list[str | Path], cwd: Path | None = None) -> str:
    res = _run(cmd, cwd)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        pytest.skip("cmake or g++ not installed")
    tiny_artifact: Path = request.getfixturevalue("tiny_artifact")  # ctest runs the consumer on it
    out = tmp_path_factory.mktemp("pkg") / "build"
    try:
        assert build_runtime(out, tiny_artifact)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"runtime build failed:\n{e.stdout}\n{e.stderr}")
    return out


@pytest.fixture(scope="module")
def prefix(build: Path) -> Path:
    dst = build.parent / "prefix"
    _ok(["cmake", "--install", build, "--prefix", dst])
    return dst


def _libdir(prefix: Path) -> Path:
    """The GNUInstallDirs libdir (lib, lib64 or lib/<multiarch>) holding libmodec_runtime."""
    (real,) = prefix.glob(f"lib*/**/libmodec_runtime.so.{VERSION}")
    return real.parent


def _dynamic(path: Path) -> dict[str, list[str]]:
    """The ELF dynamic section: {"NEEDED": [...], "SONAME": [...], "RUNPATH": [...], ...}."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"\((\w+)\)\s+[^\[]*\[(.*)\]", _ok(["readelf", "-d", path])):
        out.setdefault(m.group(1), []).append(m.group(2))
    return out


def _runpath(path: Path) -> list[str]:
    d = _dynamic(path)
    entries = d.get("RUNPATH", []) + d.get("RPATH", [])
    return [e for entry in entries for e in entry.split(":")]


def test_install_layout(prefix: Path) -> None:
    assert (prefix / "include" / "modec" / "modec.h").is_file()
    assert (prefix / "include" / "modec" / "modec.hpp").is_file()
    lib = _libdir(prefix)
    real = lib / f"libmodec_runtime.so.{VERSION}"
    assert real.is_file() and not real.is_symlink()
    assert (lib / SONAME).is_symlink() and (lib / SONAME).resolve() == real.resolve()
    dev = lib / "libmodec_runtime.so"
    assert dev.is_symlink() and dev.resolve() == real.resolve()
    cmake_dir = lib / "cmake" / "modec"
    for name in ("modecConfig.cmake", "modecConfigVersion.cmake", "modecTargets.cmake"):
        assert (cmake_dir / name).is_file(), name
    assert (prefix / "bin" / "modec_run").is_file()
    for name in TVM_LIBS:  # the TVM runtime travels with the prefix, in a private directory
        assert (lib / "modec" / name).is_file(), name
    docs = {p.relative_to(prefix).as_posix() for p in prefix.glob("share/doc/*/third_party/**/*")}
    for dist, name in (
        ("apache-tvm", "LICENSE"),
        ("apache-tvm", "NOTICE"),
        ("apache-tvm-ffi", "LICENSE"),
        ("apache-tvm-ffi", "NOTICE"),
    ):
        assert any(f"/third_party/{dist}/" in p and p.endswith("/" + name) for p in docs), (
            dist,
            name,
            sorted(docs),
        )


def test_elf_soname_and_relative_runpaths(build: Path, prefix: Path) -> None:
    lib = _libdir(prefix)
    dyn = _dynamic(lib / f"libmodec_runtime.so.{VERSION}")
    assert dyn["SONAME"] == [SONAME]
    assert set(TVM_LIBS) <= set(dyn["NEEDED"])
    # Every search path is $ORIGIN-relative: no build directory, site-packages or prefix path.
    import tvm
    import tvm_ffi

    machine = [
        str(build),
        str(prefix),
        os.path.dirname(tvm.__file__),
        os.path.dirname(tvm_ffi.__file__),
        sys.prefix,
    ]
    for binary in (lib / f"libmodec_runtime.so.{VERSION}", prefix / "bin" / "modec_run"):
        paths = _runpath(binary)
        assert paths, f"{binary} has no RUNPATH"
        assert all(p.startswith("$ORIGIN") for p in paths), (binary, paths)
        text = _ok(["readelf", "-d", binary])
        assert not [m for m in machine if m in text], (binary, text)
    assert _dynamic(prefix / "bin" / "modec_run")["NEEDED"][0] == SONAME
    # The package files locate everything relative to themselves.
    for f in (lib / "cmake" / "modec").glob("*.cmake"):
        text = f.read_text()
        assert not [m for m in machine if m in text], f


def test_config_version_compatibility(prefix: Path, tmp_path: Path) -> None:
    """Before 1.0 a minor release may break the ABI: only 0.1.x satisfies a 0.1 request."""
    proj = tmp_path / "versions"
    proj.mkdir()
    (proj / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(v NONE)\n"
        'foreach(req IN ITEMS 0.2 1.0 0.0 0.1.1 "0.1.0 EXACT" 0.1)\n'
        '  separate_arguments(args UNIX_COMMAND "${req}")\n'
        "  unset(modec_DIR CACHE)\n"
        "  find_package(modec ${args} QUIET)\n"
        '  message(STATUS "find modec ${req}: ${modec_FOUND}")\n'
        "endforeach()\n"
        "get_target_property(deps modec::modec IMPORTED_LINK_DEPENDENT_LIBRARIES)\n"
        'message(STATUS "link-dependent: ${deps}")\n'
    )
    out = _ok(["cmake", "-S", proj, "-B", tmp_path / "b", f"-DCMAKE_PREFIX_PATH={prefix}"])
    found = dict(re.findall(r"find modec (.+): (\w*)", out))
    assert found == {
        "0.2": "0",
        "1.0": "0",
        "0.0": "0",
        "0.1.1": "0",
        "0.1.0 EXACT": "1",
        "0.1": "1",
    }
    # find_package twice: the TVM libraries are listed once each.
    assert "link-dependent: modec::tvm_ffi;modec::tvm_runtime;modec::tvm_runtime_extra\n" in out


def test_config_refuses_an_incomplete_prefix(prefix: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(prefix, broken, symlinks=True)
    (_libdir(broken) / "modec" / "libtvm_runtime_extra.so").unlink()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(p NONE)\nfind_package(modec REQUIRED)\n"
    )
    res = _run(
        ["cmake", "-S", tmp_path / "p", "-B", tmp_path / "b", f"-DCMAKE_PREFIX_PATH={broken}"]
    )
    assert res.returncode != 0
    msg = " ".join((res.stdout + res.stderr).split())  # CMake wraps its messages
    assert "/modec/libtvm_runtime_extra.so is missing (an incomplete install?)" in msg, msg


def _ones_reference(artifact: Path) -> dict[str, np.ndarray]:
    """What modec_consumer computes: every input filled with ones, symbolic dims = 1."""
    man = json.loads((artifact / MANIFEST).read_text())
    feeds = {
        t["name"]: np.ones([d if isinstance(d, int) else 1 for d in t["shape"]], t["dtype"])
        for t in man["inputs"]
    }
    return rt.load(artifact).run(feeds)


def _build_consumer(prefix: Path, build: Path) -> Path:
    _ok(
        [
            "cmake",
            "-S",
            CONSUMER,
            "-B",
            build,
            f"-DCMAKE_PREFIX_PATH={prefix}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON",
        ]
    )
    _ok(["cmake", "--build", build, "-j2"])
    cache = (build / "CMakeCache.txt").read_text()
    (modec_dir,) = re.findall(r"^modec_DIR:PATH=(.*)$", cache, re.M)
    assert Path(modec_dir).resolve().is_relative_to(prefix.resolve()), modec_dir
    return build / "modec_consumer"


def _check_consumer(app: Path, prefix: Path, artifact: Path) -> None:
    # The loader resolves libmodec_runtime and the TVM runtime inside the prefix.
    ldd = _ok(["ldd", app])
    for name in (SONAME, *TVM_LIBS):
        (line,) = [ln for ln in ldd.splitlines() if ln.strip().startswith(name + " ")]
        loaded = Path(line.split("=>")[1].split("(")[0].strip())
        assert loaded.resolve().is_relative_to(prefix.resolve()), line
    out = _ok([app, artifact]).splitlines()
    man = json.loads((artifact / MANIFEST).read_text())
    dims = [
        ",".join("-1" if isinstance(d, str) else str(d) for d in t["shape"]) for t in man["inputs"]
    ]
    want = [
        f"input {t['name']} {t['dtype']} [{d}]" for t, d in zip(man["inputs"], dims, strict=True)
    ]
    assert [ln for ln in out if ln.startswith("input ")] == want
    ref = _ones_reference(artifact)
    results = [ln.split() for ln in out if ln.startswith("result ")]
    assert [r[1] for r in results] == list(ref)
    for r in results:
        arr = ref[r[1]]
        assert r[3] == "[" + ",".join(str(d) for d in arr.shape) + "]"
        if arr.dtype == np.float32:
            assert r[4] == "sum"
            np.testing.assert_allclose(float(r[5]), arr.astype(np.float64).sum(), rtol=1e-5)


def _check_modec_run(prefix: Path, artifact: Path, tmp: Path) -> None:
    """The installed app runs from the prefix and matches the Python runtime."""
    inp = tiny_inputs(TinyConfig(), 2, 7)
    args = []
    for k, v in inp.items():
        np.save(tmp / f"{k}.npy", v)
        args.append(f"{k}={tmp / (k + '.npy')}")
    _ok([prefix / "bin" / "modec_run", artifact, *args, "--out", tmp / "out"])
    np.testing.assert_allclose(
        np.load(tmp / "out" / "logits.npy"),
        rt.load(artifact).run(inp)["logits"],
        rtol=1e-6,
        atol=1e-6,
    )


def test_consumer_builds_against_the_prefix_and_runs_after_a_move(
    prefix: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    app = _build_consumer(prefix, tmp_path / "consumer")
    _check_consumer(app, prefix, tiny_artifact)
    _check_modec_run(prefix, tiny_artifact, tmp_path)

    moved = tmp_path / "elsewhere" / "opt-modec"
    moved.parent.mkdir()
    shutil.move(prefix, moved)
    try:
        assert not prefix.exists()
        app2 = _build_consumer(moved, tmp_path / "consumer-moved")
        _check_consumer(app2, moved, tiny_artifact)
        (tmp_path / "moved-run").mkdir()
        _check_modec_run(moved, tiny_artifact, tmp_path / "moved-run")
    finally:
        shutil.move(moved, prefix)


def test_ctest_installs_and_builds_the_consumer(build: Path) -> None:
    """`ctest` covers the package too: install into the build tree, consumer built and run."""
    res = _run(["ctest", "-V", "-R", "^package_"], cwd=build)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "package_install" in res.stdout and "package_consumer" in res.stdout
    assert "100% tests passed, 0 tests failed out of 2" in res.stdout
    assert re.search(r"^\d+: result logits float32 \[1,1,\d+\] sum ", res.stdout, re.M), res.stdout
