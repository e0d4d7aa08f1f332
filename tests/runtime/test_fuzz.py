"""The libFuzzer targets of runtime/fuzz/ (built and run by tools/fuzz_loader.py): they build
from the TVM-free loader sources, the regression seeds of runtime/fuzz/corpus/ replay without a
finding, each target fuzzes ~20 s from the tiny artifact's seeds without one, and a finding
(a crash) does fail the run. Skipped where clang++ cannot link -fsanitize=fuzzer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tools.fuzz_loader import (
    FLAGS,
    TARGETS,
    build_targets,
    find_clang,
    has_libfuzzer,
    make_seed_corpus,
    regression_seeds,
    replay,
    run_target,
)

pytestmark = pytest.mark.slow
SECONDS = 20


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """(work directory, target name -> executable)."""
    clang = find_clang()
    if clang is None:
        pytest.skip("clang++ not installed (apt-get install clang)")
    work = tmp_path_factory.mktemp("fuzz")
    if not has_libfuzzer(clang, work / "probe"):
        pytest.skip(f"{clang} cannot link -fsanitize=fuzzer (libclang-rt-dev missing)")
    try:
        return work, build_targets(work, clang)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"fuzz target build failed:\n{e.stderr}")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_regression_seeds_replay(fuzz: tuple[Path, dict[str, Path]], name: str) -> None:
    seeds = regression_seeds(name)
    assert len(seeds) >= 3, f"runtime/fuzz/corpus/{name}/ holds {len(seeds)} seeds"
    res = replay(name, fuzz[1][name], seeds)
    assert res.ok, res.report
    assert res.execs == len(seeds)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_runs_clean(
    fuzz: tuple[Path, dict[str, Path]], tiny_artifact: Path, name: str
) -> None:
    work, exes = fuzz
    seeds = work / "seeds"
    if not seeds.exists():
        make_seed_corpus(tiny_artifact, seeds)
    res = run_target(name, exes[name], work / "corpus" / name, [seeds / name],
                     work / "crashes", SECONDS)  # fmt: skip
    assert res.ok, f"{res.findings}\n{res.report}"
    assert res.execs > 1000 and res.coverage > 50, res


def test_a_finding_fails(tmp_path: Path) -> None:
    """The harness reports a crash: a target that aborts on inputs starting with "MODEC" (the
    seed holds "MODE"; libFuzzer needs a few mutations) and on a replayed "MODEC" input."""
    clang = find_clang()
    if clang is None or not has_libfuzzer(clang, tmp_path / "probe"):
        pytest.skip("clang++ with libFuzzer not installed")
    src = tmp_path / "boom.cc"
    src.write_text(
        "#include <cstdint>\n#include <cstddef>\n#include <cstdlib>\n#include <cstring>\n"
        'extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {\n'
        '  if (n >= 5 && std::memcmp(d, "MODEC", 5) == 0) std::abort();\n  return 0;\n}\n'
    )
    exe = tmp_path / "boom"
    subprocess.run([clang, *FLAGS, str(src), "-o", str(exe)], check=True, capture_output=True)
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "near").write_bytes(b"MODE")
    res = run_target("json", exe, tmp_path / "corpus", [tmp_path / "seeds"], tmp_path / "crashes",
                     60)  # fmt: skip
    assert not res.ok and res.findings, res
    assert Path(res.findings[0]).read_bytes().startswith(b"MODEC")
    assert "deadly signal" in res.report
    bad = tmp_path / "bad"
    bad.write_bytes(b"MODEC!")
    again = replay("json", exe, [tmp_path / "seeds" / "near", bad])
    assert not again.ok and again.returncode != 0
