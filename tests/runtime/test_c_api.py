"""The modec C API called directly from C (runtime/tests/c_api_test.c, compiled as C11).

The C program checks the status code and that modec_last_error() is one line naming the
problem; this file builds it, corrupts copies of the tiny artifact and runs it on each copy
with the status it must get. Every status code of runtime/include/modec/modec.h is produced:

  0 MODEC_OK                    test_c_api_on_a_valid_artifact (open, info, run, run again)
  1 MODEC_ERR_INVALID_ARGUMENT  test_c_api_on_a_valid_artifact (NULL dir / out / session /
                                info / inputs / outputs / n_outputs / input data / input shape,
                                unknown device, index out of range, output array too small),
                                test_c_api_without_an_artifact
  2 MODEC_ERR_IO                OPEN_CASES io_* (manifest, weights, model.so missing), missing dir
  3 MODEC_ERR_MANIFEST          OPEN_CASES manifest_* (JSON, schema, fields, dtype, dims, names,
                                a CUDA target without valid archs)
  4 MODEC_ERR_CHECKSUM          OPEN_CASES checksum_* (truncated weights, flipped bytes)
  5 MODEC_ERR_TARGET            OPEN_CASES target_* (device, machine), modec_open(dir, "cuda")
  6 MODEC_ERR_WEIGHTS           OPEN_CASES weights_* (safetensors malformed or not the
                                manifest's; checksums fixed up so only the weights check fails)
  7 MODEC_ERR_INPUT             test_c_api_on_a_valid_artifact (missing / unknown / duplicate /
                                NULL names, dtype, rank, empty dims, symbols that disagree),
                                test_c_api_static_dims (a static dim of another size)
  8 MODEC_ERR_RUNTIME           OPEN_CASES runtime_* (model.so not a library, no entry function),
                                RUN_CASES (TVM refuses the inputs the manifest allowed, outputs
                                that differ from the manifest)

Not produced from outside: MODEC_ERR_RUNTIME for "out of memory" (std::bad_alloc while
allocating tensors; a test would have to exhaust the process's memory) and for "internal
error" (a C++ exception other than modec's or TVM's: a runtime bug, none known); both go
through the same Guard as the codes above, whose one-line message is tested here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modec.artifact import LIBRARY, MANIFEST, WEIGHTS
from tools.cxx import build_c_api_test

pytestmark = pytest.mark.cxx
ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "runtime-test"


@pytest.fixture(scope="session")
def c_api_test(tiny_artifact: Path) -> Path:
    try:
        exe = build_c_api_test(BUILD, tiny_artifact)
    except subprocess.CalledProcessError as e:  # show the compiler's message, not just the rc
        pytest.fail(f"runtime build failed:\n{e.stdout}\n{e.stderr}")
    if exe is None:
        pytest.skip("cmake, g++ or a C compiler not installed")
    return exe


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def _passed(res: subprocess.CompletedProcess[str]) -> int:
    """The count of the final `N passed, 0 failed` line; fails on anything else."""
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)  # > 0: no signal
    last = res.stdout.splitlines()[-1]
    n, rest = last.split(" passed, ")
    assert rest == "0 failed", last
    assert "FAIL" not in res.stdout
    return int(n)


# ---- corruptions ---------------------------------------------------------------------------


def _manifest(d: Path, fn: Callable[[dict[str, Any]], object]) -> None:
    m = json.loads((d / MANIFEST).read_text())
    fn(m)
    (d / MANIFEST).write_text(json.dumps(m))


def _rehash(d: Path, name: str) -> None:
    """Make the manifest agree with the file again, so the check after the checksum runs."""
    data = (d / name).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    _manifest(d, lambda m: m["files"][name].update(sha256=sha, bytes=len(data)))


def _replace(d: Path, name: str, data: bytes) -> None:
    (d / name).write_bytes(data)
    _rehash(d, name)


def _flip(p: Path, offset: int) -> None:
    data = bytearray(p.read_bytes())
    data[offset] ^= 0xFF
    p.write_bytes(bytes(data))


def _safetensors(d: Path, fn: Callable[[dict[str, Any]], object]) -> None:
    """Edit the safetensors header (same data), rewrite the file, fix the manifest's hash."""
    raw = (d / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    fn(header)
    text = json.dumps(header).encode()
    _replace(d, WEIGHTS, struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _param(m: dict[str, Any], **change: object) -> None:
    m["params"][0].update(change)


#: A CUDA artifact's target (the CPU artifact's own machine stays).
CUDA_TARGET = {"kind": "cuda", "device": "cuda", "arch": "sm_90", "archs": ["sm_90"]}

# case -> (corruption, status modec_open must return, text its message must hold)
OPEN_CASES: dict[str, tuple[Callable[[Path], object], str, str]] = {
    # 2: a listed file is missing
    "io_manifest": (lambda d: (d / MANIFEST).unlink(), "IO", "manifest.json cannot be opened"),
    "io_weights": (lambda d: (d / WEIGHTS).unlink(), "IO", "weights.safetensors cannot be opened"),
    "io_library": (lambda d: (d / LIBRARY).unlink(), "IO", "model.so cannot be opened"),
    # 3: manifest.json
    "manifest_json": (lambda d: (d / MANIFEST).write_text('{"schema": "modec.art'), "MANIFEST",
                      "is not valid JSON"),
    "manifest_not_object": (lambda d: (d / MANIFEST).write_text("[]"), "MANIFEST", "schema is not"),
    "manifest_schema": (lambda d: _manifest(d, lambda m: m.update(schema="modec.artifact/2")),
                        "MANIFEST", "schema is not 'modec.artifact/1'"),
    "manifest_field_missing": (lambda d: _manifest(d, lambda m: m.pop("inputs")), "MANIFEST",
                               "missing field 'inputs'"),
    "manifest_field_type": (
        lambda d: _manifest(d, lambda m: m["files"][WEIGHTS].update(bytes="many")), "MANIFEST",
        "malformed field (expected an integer)"),
    "manifest_dtype": (lambda d: _manifest(d, lambda m: m["inputs"][0].update(dtype="complex64")),
                       "MANIFEST", "unsupported dtype complex64"),
    "manifest_negative_dim": (lambda d: _manifest(d, lambda m: _param(m, shape=[-96, 64])),
                              "MANIFEST", "negative dim"),
    "manifest_symbolic_param": (lambda d: _manifest(d, lambda m: _param(m, shape=["V", 64])),
                                "MANIFEST", "param 'tok_emb' has a symbolic dim"),
    "manifest_no_library": (lambda d: _manifest(d, lambda m: m["files"].pop(LIBRARY)), "MANIFEST",
                            "lists no model.so"),
    "manifest_cuda_no_archs": (
        lambda d: _manifest(d, lambda m: m["target"].update(device="cuda", kind="cuda")),
        "MANIFEST", "the CUDA target has no 'archs': the artifact predates compiled CUDA kernels; "
                    "rebuild it with `modec compile ... --target cuda`"),
    "manifest_cuda_archs": (
        lambda d: _manifest(d, lambda m: m["target"].update(CUDA_TARGET, archs=["sm_90", "90"])),
        "MANIFEST", "target.archs is malformed"),
    "manifest_file_name": (
        lambda d: _manifest(d, lambda m: m["files"].update({"../x": m["files"][LIBRARY]})),
        "MANIFEST", "'../x' is not a plain file name"),
    # 4: size or SHA-256
    "checksum_truncated": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-100]),
                           "CHECKSUM", "truncated or modified"),
    "checksum_weights": (lambda d: _flip(d / WEIGHTS, -5), "CHECKSUM",
                         "weights.safetensors SHA-256"),
    "checksum_library": (lambda d: _flip(d / LIBRARY, 5000), "CHECKSUM", "model.so SHA-256"),
    # 5: target
    "target_device": (lambda d: _manifest(d, lambda m: m["target"].update(CUDA_TARGET)),
                      "TARGET", "built for device 'cuda'"),
    "target_machine": (lambda d: _manifest(d, lambda m: m["target"].update(machine="aarch64")),
                       "TARGET", "architecture 'aarch64'"),
    "target_no_machine": (lambda d: _manifest(d, lambda m: m["target"].pop("machine")), "TARGET",
                          "architecture '?'"),
    # 6: weights.safetensors (the checksums agree: the manifest was fixed up)
    "weights_too_short": (lambda d: _replace(d, WEIGHTS, b"\x01\x00"), "WEIGHTS", "too short"),
    "weights_header_length": (
        lambda d: _replace(d, WEIGHTS, struct.pack("<Q", 1 << 40) + b"{}"), "WEIGHTS",
        "header length out of range"),
    "weights_header_json": (lambda d: _replace(d, WEIGHTS, struct.pack("<Q", 3) + b"{x}"),
                            "WEIGHTS", "header is not valid JSON"),
    "weights_header_not_object": (lambda d: _replace(d, WEIGHTS, struct.pack("<Q", 2) + b"[]"),
                                  "WEIGHTS", "malformed header"),
    "weights_tensor_missing": (lambda d: _safetensors(d, lambda h: h.pop("tok_emb")), "WEIGHTS",
                               "has no tensor 'tok_emb'"),
    "weights_not_the_manifests": (lambda d: _manifest(d, lambda m: _param(m, name="other")),
                                  "WEIGHTS", "has no tensor 'other'"),
    "weights_shape": (lambda d: _manifest(d, lambda m: _param(m, shape=[64, 96])), "WEIGHTS",
                      "'tok_emb' dtype/shape differ"),
    "weights_dtype": (lambda d: _manifest(d, lambda m: _param(m, dtype="float64")), "WEIGHTS",
                      "'tok_emb' dtype/shape differ"),
    "weights_offsets": (
        lambda d: _safetensors(d, lambda h: h["tok_emb"].update(data_offsets=[0, 1 << 30])),
        "WEIGHTS", "data_offsets of 'tok_emb' out of range"),
    "weights_offsets_arity": (
        lambda d: _safetensors(d, lambda h: h["tok_emb"].update(data_offsets=[0])), "WEIGHTS",
        "bad data_offsets for 'tok_emb'"),
    # 8: TVM cannot load what passed every check
    "runtime_not_a_library": (lambda d: _replace(d, LIBRARY, b"\x7fELF" + b"\0" * 60), "RUNTIME",
                              "TVM cannot load model.so"),
    "runtime_no_entry": (lambda d: _manifest(d, lambda m: m.update(entry="nope")), "RUNTIME",
                         "the VM has no function 'nope'"),
}  # fmt: skip

# case -> (corruption, status modec_run on valid inputs must return, text of its message).
# The manifest describes a model other than model.so: the runtime's checks pass, TVM or the
# output check refuses.
RUN_CASES: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "runtime_input_dtype": (lambda d: _manifest(d, lambda m: m["inputs"][0].update(dtype="int32")),
                            "RUNTIME", "model run failed"),
    "runtime_input_rank": (lambda d: _manifest(d, lambda m: m["inputs"][0].update(shape=["B"])),
                           "RUNTIME", "model run failed"),
    "runtime_output_count": (
        lambda d: _manifest(d, lambda m: m["outputs"].append(dict(m["outputs"][0], name="x"))),
        "RUNTIME", "the model returned 1 outputs, the manifest lists 2"),
    "runtime_output_dtype": (
        lambda d: _manifest(d, lambda m: m["outputs"][0].update(dtype="float16")), "RUNTIME",
        "output 'logits' is float32 [2, 2, 96], the manifest says float16 [B, T, 96]"),
    "runtime_output_dim": (
        lambda d: _manifest(d, lambda m: m["outputs"][0].update(shape=["B", "T", 95])), "RUNTIME",
        "the manifest says float32 [B, T, 95]"),
}  # fmt: skip


# ---- tests ---------------------------------------------------------------------------------


def test_c_api_on_a_valid_artifact(c_api_test: Path, tiny_artifact: Path) -> None:
    res = _run(c_api_test, str(tiny_artifact))
    assert _passed(res) >= 60
    out = res.stdout
    for line in (  # one check of each kind ran (and passed: _passed found no FAIL)
        "ok   modec_run(valid inputs)\n",
        "ok   modec_run(output array too small): MODEC_ERR_INVALID_ARGUMENT",
        "ok   modec_run(input shape NULL): MODEC_ERR_INVALID_ARGUMENT",
        'ok   modec_open(device "cuda"): MODEC_ERR_TARGET',
        "ok   modec_run(unknown input name): MODEC_ERR_INPUT: unknown input 'no_such_input'",
        "ok   modec_run(rank + 1): MODEC_ERR_INPUT: input 'input_ids' has rank 3, expected 2",
        "ok   modec_run(wrong dtype): MODEC_ERR_INPUT",
        "ok   modec_run(shared symbolic dim differs): MODEC_ERR_INPUT",
        "ok   modec_last_error() is per thread",
        "ok   modec_open(missing dir with a line break in its name): MODEC_ERR_IO",
        "ok   same outputs after the errors",
    ):
        assert line in out, line


def test_c_api_without_an_artifact(c_api_test: Path) -> None:
    res = _run(c_api_test, "--no-artifact")
    assert _passed(res) >= 15
    assert "ok   modec_open(NULL dir): MODEC_ERR_INVALID_ARGUMENT" in res.stdout


def test_c_api_static_dims(c_api_test: Path, artifact_copy: Path) -> None:
    """With static dims in the manifest (both inputs (B, 2)), any other size is refused."""

    def static(m: dict[str, Any]) -> None:
        for spec in m["inputs"]:
            spec["shape"] = ["B", 2]

    _manifest(artifact_copy, static)
    res = _run(c_api_test, str(artifact_copy))
    _passed(res)
    assert (
        "ok   modec_run(static dim differs): MODEC_ERR_INPUT: input 'input_ids' dim 1 is 3, "
        "expected 2" in res.stdout
    )


@pytest.mark.parametrize("case", sorted(OPEN_CASES))
def test_c_api_refuses_a_broken_artifact(c_api_test: Path, artifact_copy: Path, case: str) -> None:
    corrupt, status, text = OPEN_CASES[case]
    corrupt(artifact_copy)
    res = _run(c_api_test, str(artifact_copy), "--open", status, text)
    _passed(res)
    assert f": MODEC_ERR_{status}: " in res.stdout


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_c_api_run_refuses_a_model_unlike_its_manifest(
    c_api_test: Path, artifact_copy: Path, case: str
) -> None:
    corrupt, status, text = RUN_CASES[case]
    corrupt(artifact_copy)
    res = _run(c_api_test, str(artifact_copy), "--run", status, text)
    _passed(res)


def test_c_api_test_fails_on_a_wrong_expectation(c_api_test: Path, tiny_artifact: Path) -> None:
    """The C program itself reports a mismatch: exit 1, a FAIL line, `0 passed, ... failed`."""
    res = _run(c_api_test, str(tiny_artifact), "--open", "CHECKSUM")
    assert res.returncode == 1
    assert (
        "FAIL modec_open(artifact): returned MODEC_OK (0), expected MODEC_ERR_CHECKSUM"
        in res.stdout
    )
    assert res.stdout.splitlines()[-1].endswith(" passed, 2 failed")
    bad = tiny_artifact.parent / "not-there"
    res = _run(c_api_test, str(bad), "--open", "IO", "some other text")
    assert res.returncode == 1 and 'does not say "some other text"' in res.stdout
    assert _run(c_api_test).returncode == 2  # usage
    assert _run(c_api_test, str(tiny_artifact), "--open", "NO_SUCH_STATUS").returncode == 2


def test_ctest_runs_the_c_api_test(c_api_test: Path) -> None:
    """The CMake test (add_test) passes: the configure step pointed it at the tiny artifact."""
    if shutil.which("ctest") is None:
        pytest.skip("ctest not installed")
    res = subprocess.run(["ctest", "--output-on-failure"], cwd=BUILD, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "c_api" in res.stdout and "100% tests passed" in res.stdout
