"""Every corruption of a real artifact is one clear line, never a crash, in both runtimes.

Python: `modec.runtime.load` (then `Session.run`) raises `ModelError` (`BadInputError` for
inputs the manifest no longer names). C++: `examples/modec_run` exits with the documented
`modec_status` code and one line `modec_run: MODEC_ERR_...: message` on stderr; a signal
(a crash) is a negative return code and fails.

What test_c_api.py / test_python_runtime.py / test_cxx_runtime.py already check one status at
a time is not repeated here; this file sweeps: each file truncated at several points (with the
manifest left as it was, and with the manifest updated to agree so the deeper checks run),
bytes flipped across the manifest, the safetensors header and the data (both runtimes must
then agree on accept / refuse), schema versions, each missing file, unknown dtypes, param
shapes that differ or overflow, a manifest that no longer describes model.so (Python), and
an artifact replaced on disk and loaded again in the same process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import modec.runtime as rt
import numpy as np
import pytest

from modec.artifact import LIBRARY, MANIFEST, WEIGHTS
from modec.errors import BadInputError, ModelError
from modec.lowering.tiny_model import TinyConfig, tiny_inputs
from tools.cxx import build_modec_run

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "runtime-test"
CXX = pytest.param("cxx", marks=pytest.mark.cxx)
RUNTIMES = ["python", CXX]
STATUS = {1: "INVALID_ARGUMENT", 2: "IO", 3: "MANIFEST", 4: "CHECKSUM", 5: "TARGET",
          6: "WEIGHTS", 7: "INPUT", 8: "RUNTIME"}  # fmt: skip


@pytest.fixture(scope="session")
def modec_run() -> Path:
    try:
        app = build_modec_run(BUILD)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"runtime build failed:\n{e.stdout}\n{e.stderr}")
    if app is None:
        pytest.skip("cmake or g++ not installed")
    return app


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], list[str]]:
    """Valid inputs (B=1, T=4) as arrays and as modec_run's NAME=FILE.npy arguments."""
    d = tmp_path_factory.mktemp("inputs")
    inp = tiny_inputs(TinyConfig(), 1, 4)
    args = []
    for k, v in inp.items():
        np.save(d / f"{k}.npy", v)
        args.append(f"{k}={d / (k + '.npy')}")
    return inp, args


# ---- the two runtimes, one outcome each ----------------------------------------------------


def _python(d: Path, inp: dict[str, np.ndarray]) -> tuple[str, str]:
    """("ok", "") or ("refused", the one-line message); anything else propagates (a bug)."""
    try:
        rt.load(d).run(inp)
    except ModelError as e:  # BadInputError's subclass: the artifact
        return "refused", str(e)
    except BadInputError as e:  # the inputs: the manifest names others now
        return "refused", str(e)
    return "ok", ""


def _cxx(app: Path, d: Path, args: list[str], out: Path) -> tuple[int, str]:
    """modec_run's exit code and stderr; fails on a signal or on a message that is not one
    `modec_run: MODEC_ERR_...` line."""
    res = subprocess.run([str(app), str(d), *args, "--out", str(out)], capture_output=True,
                         text=True, errors="replace", timeout=120)  # fmt: skip
    assert res.returncode >= 0, f"modec_run killed by signal {-res.returncode}: {res.stderr}"
    if res.returncode == 0:
        assert res.stderr == "", res.stderr
        return 0, ""
    assert res.returncode in STATUS, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"modec_run: MODEC_ERR_{STATUS[res.returncode]}: "), lines[0]
    return res.returncode, lines[0]


def _outcome(runtime: str, request: pytest.FixtureRequest, d: Path, tmp: Path) -> tuple[Any, str]:
    inp, args = request.getfixturevalue("inputs")
    if runtime == "python":
        status, msg = _python(d, inp)
        assert "\n" not in msg
        return status, msg
    return _cxx(request.getfixturevalue("modec_run"), d, args, tmp)


# ---- corruptions ---------------------------------------------------------------------------


def _edit(d: Path, fn: Callable[[dict[str, Any]], object]) -> None:
    m = json.loads((d / MANIFEST).read_text())
    fn(m)
    (d / MANIFEST).write_text(json.dumps(m))


def _rehash(d: Path, name: str) -> None:
    """The manifest agrees with the file again, so the checks after the checksum run."""
    data = (d / name).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    _edit(d, lambda m: m["files"][name].update(sha256=sha, bytes=len(data)))


def _header(d: Path) -> tuple[int, dict[str, Any], bytes]:
    raw = (d / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _edit_header(d: Path, fn: Callable[[dict[str, Any]], object]) -> None:
    _, header, data = _header(d)
    fn(header)
    text = json.dumps(header).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data)
    _rehash(d, WEIGHTS)


def _header_text(d: Path, fn: Callable[[bytes], bytes]) -> None:
    """Edit the header's JSON text (the length prefix follows, the manifest's hash too)."""
    n, _, data = _header(d)
    text = fn((d / WEIGHTS).read_bytes()[8 : 8 + n])
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data)
    _rehash(d, WEIGHTS)


def _truncate(d: Path, name: str, at: int, rehash: bool) -> None:
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: at if at >= 0 else len(data) + at])
    if rehash:
        _rehash(d, name)


def _flip(d: Path, name: str, at: int, mask: int = 0xFF) -> None:
    data = bytearray((d / name).read_bytes())
    data[at] ^= mask
    (d / name).write_bytes(bytes(data))


def _replace_dir(d: Path, name: str) -> None:
    (d / name).unlink()
    (d / name).mkdir()


def _param(i: int, **change: object) -> Callable[[dict[str, Any]], object]:
    return lambda m: m["params"][i].update(change)


def _reshape_consistently(d: Path) -> None:
    """tok_emb [96, 64] -> [64, 96] in the manifest and the header (same bytes): every loader
    check passes, model.so's own kernel refuses the tensor when it runs."""
    _edit_header(d, lambda h: h["tok_emb"].update(shape=[64, 96]))
    _edit(d, _param(0, shape=[64, 96]))


BIG = [2147483648, 2147483648]  # 2^62 elements: 2^64 float32 bytes, 0 in 64-bit arithmetic


def _overflow(d: Path) -> None:
    _edit_header(d, lambda h: h["tok_emb"].update(shape=BIG, data_offsets=[0, 0]))
    _edit(d, _param(0, shape=BIG))


def _truncating(name: str, at: int, rehash: bool) -> Callable[[Path], None]:
    return lambda d: _truncate(d, name, at, rehash)


def _editing(**top: object) -> Callable[[Path], None]:
    return lambda d: _edit(d, lambda m: m.update(top))


def _dir_for(name: str) -> Callable[[Path], None]:
    return lambda d: _replace_dir(d, name)


def _listing(name: str) -> Callable[[Path], None]:
    return lambda d: _edit(d, lambda m: m["files"].update({name: m["files"][LIBRARY]}))


# case -> (corruption, C++ exit code, text of the C++ message, text of the Python message)
CASES: dict[str, tuple[Callable[[Path], object], int, str, str]] = {
    # each file truncated, the manifest unchanged: the size check
    **{f"truncate_{n}_at_{at}": (_truncating(n, at, False), 4,
                                 "(truncated or modified)", "(truncated or modified)")
       for n in (LIBRARY, WEIGHTS) for at in (0, 1, 8, 4096, -1)},
    **{f"truncate_manifest_at_{at}": (_truncating(MANIFEST, at, False), 3,
                                      "is not valid JSON", "is not valid JSON")
       for at in (0, 1, 100, 1000, -3)},
    # ... and with the manifest updated to agree: the weights check, the ELF check / dlopen
    "truncate_weights_rehashed_at_0": (lambda d: _truncate(d, WEIGHTS, 0, True), 6,
                                       "too short for a safetensors file", "too short"),
    "truncate_weights_rehashed_at_5": (lambda d: _truncate(d, WEIGHTS, 5, True), 6,
                                       "too short for a safetensors file", "too short"),
    **{f"truncate_weights_rehashed_at_{at}": (_truncating(WEIGHTS, at, True), 6,
                                              "header length out of range",
                                              "header length out of range")
       for at in (8, 100)},
    **{f"truncate_weights_rehashed_at_{at}": (_truncating(WEIGHTS, at, True), 6,
                                              "out of range", "weights.safetensors")
       for at in (4096, -1)},
    **{f"truncate_library_rehashed_at_{at}": (_truncating(LIBRARY, at, True), 8,
                                              "TVM cannot load model.so", "model.so")
       for at in (0, 16, 64, 4096, 100000, -1)},
    # schema versions
    **{f"schema_{i}": (_editing(schema=v), 3,
                       "schema is not 'modec.artifact/1'", "schema")
       for i, v in enumerate(["modec.artifact/2", "modec.artifact/0", "modec.artifact/1 ",
                              "MODEC.ARTIFACT/1", "modec.artifact/10", 1, None, ["x"]])},
    "schema_missing": (lambda d: _edit(d, lambda m: m.pop("schema")), 3, "schema is not", "schema"),
    # each file missing, or a directory in its place
    "missing_manifest": (lambda d: (d / MANIFEST).unlink(), 2, "manifest.json cannot be opened",
                         "manifest.json not found"),
    "missing_weights": (lambda d: (d / WEIGHTS).unlink(), 2, "weights.safetensors cannot be opened",
                        "weights.safetensors is missing"),
    "missing_library": (lambda d: (d / LIBRARY).unlink(), 2, "model.so cannot be opened",
                        "model.so is missing"),
    "missing_directory": (lambda d: shutil.rmtree(d), 2, "cannot be opened", "does not exist"),
    **{f"directory_{n}": (_dir_for(n), 2, f"{n} is not a regular file",
                          f"{n} is not a regular file") for n in (MANIFEST, WEIGHTS, LIBRARY)},
    # unknown dtypes (test_c_api covers an input's)
    "dtype_output": (lambda d: _edit(d, lambda m: m["outputs"][0].update(dtype="float8")), 3,
                     "output 'logits': unsupported dtype float8", "unsupported dtype"),
    "dtype_param": (lambda d: _edit(d, _param(0, dtype="complex64")), 3,
                    "param 'tok_emb': unsupported dtype complex64", "unsupported dtype"),
    "dtype_param_last": (lambda d: _edit(d, lambda m: m["params"][-1].update(dtype="int4")), 3,
                         "unsupported dtype int4", "unsupported dtype"),
    "dtype_header": (lambda d: _edit_header(d, lambda h: h["tok_emb"].update(dtype="Q4")), 6,
                     "'tok_emb' dtype/shape differ", "weights.safetensors"),
    "dtype_header_other_known": (lambda d: _edit_header(d, lambda h: h["tok_emb"].update(
                                 dtype="I32")), 6, "'tok_emb' dtype/shape differ", "int32"),
    # param shapes that differ from the file's, or overflow
    "shape_header_transposed": (lambda d: _edit_header(d, lambda h: h["tok_emb"].update(
                                shape=[64, 96])), 6, "'tok_emb' dtype/shape differ", "[64, 96]"),
    "shape_header_rank": (lambda d: _edit_header(d, lambda h: h["tok_emb"].update(
                          shape=[96 * 64])), 6, "'tok_emb' dtype/shape differ", "[6144]"),
    "shape_manifest_rank": (lambda d: _edit(d, _param(0, shape=[96, 64, 1])), 6,
                            "'tok_emb' dtype/shape differ", "the manifest says float32[96, 64, 1]"),
    "shape_overflow": (_overflow, 6, "'tok_emb' shape is too large", "weights.safetensors"),
    "shape_float_dim": (lambda d: _edit(d, _param(0, shape=[96.0, 64])), 3,
                        "malformed field (expected an integer)", "malformed field"),
    "shape_huge_dim": (lambda d: _edit(d, _param(0, shape=[2**70, 64])), 3,
                       "malformed field (expected an integer)", "malformed field"),
    "shape_negative_output": (lambda d: _edit(d, lambda m: m["outputs"][0].update(
                              shape=["B", "T", -96])), 3, "negative dim", "negative dim"),
    # manifest and header agree with each other, not with model.so: its kernel refuses at run
    "params_not_the_models": (_reshape_consistently, 8, "model run failed", "failed to run"),
    # JSON that Python's json module would take and the C++ reader would not (or read otherwise)
    "json_duplicate_schema": (lambda d: (d / MANIFEST).write_text(
        (d / MANIFEST).read_text().replace('"schema": "modec.artifact/1"',
                                           '"schema": "modec.artifact/1", "schema": "x"')),
        3, "duplicate key", "duplicate key"),
    "json_nan_bytes": (lambda d: (d / MANIFEST).write_text(
        (d / MANIFEST).read_text().replace('"bytes": ', '"bytes": NaN, "x": ', 1)),
        3, "is not valid JSON", "is not valid JSON"),
    "json_too_deep": (lambda d: _edit(d, lambda m: m.update(sections={"a": json.loads(
        "[" * 70 + "]" * 70)})), 3, "nesting too deep", "nesting too deep"),
    "json_invalid_utf8": (lambda d: (d / MANIFEST).write_bytes((d / MANIFEST).read_bytes().replace(
        b'"main"', b'"m\xffin"')), 3, "invalid UTF-8", "decode"),
    "header_duplicate_tensor": (lambda d: _header_text(d, lambda t: t.replace(
        b'{"', b'{"tok_emb":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"', 1)), 6,
        "header is not valid JSON (invalid JSON at byte", "duplicate key"),
    # file names in the manifest
    **{f"file_name_{i}": (_listing(n), 3, "is not a plain file name", "is not a plain file name")
       for i, n in enumerate(["a\0b", "", "a\nb", ".hidden", "../model.so", "a\\b"])},
}  # fmt: skip


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_is_refused(
    request: pytest.FixtureRequest, artifact_copy: Path, tmp_path: Path, case: str, runtime: str
) -> None:
    corrupt, code, cxx_text, py_text = CASES[case]
    corrupt(artifact_copy)
    status, msg = _outcome(runtime, request, artifact_copy, tmp_path)
    if runtime == "python":
        assert status == "refused", case
        assert py_text in msg, msg
    else:
        assert (status, cxx_text in msg) == (code, True), msg


# ---- byte flips: both runtimes survive them and agree on accept / refuse -------------------

N_FLIPS = 24


def _spread(i: int, n: int, lo: int, hi: int) -> int:
    """The i-th of n offsets spread over [lo, hi)."""
    return lo + (hi - lo - 1) * i // (n - 1)


def _both(request: pytest.FixtureRequest, d: Path, tmp: Path) -> tuple[str, int]:
    py, _ = _outcome("python", request, d, tmp)
    code, _ = _outcome("cxx", request, d, tmp)
    return py, code


@pytest.mark.cxx
@pytest.mark.parametrize("mask", [0x01, 0x80])
@pytest.mark.parametrize("i", range(N_FLIPS))
def test_manifest_byte_flip(
    request: pytest.FixtureRequest, artifact_copy: Path, tmp_path: Path, i: int, mask: int
) -> None:
    """A flipped bit anywhere in manifest.json: each runtime accepts or refuses cleanly, and
    they agree (0x80 makes invalid UTF-8: both refuse)."""
    at = _spread(i, N_FLIPS, 0, (artifact_copy / MANIFEST).stat().st_size)
    _flip(artifact_copy, MANIFEST, at, mask)
    py, code = _both(request, artifact_copy, tmp_path)
    assert (py == "ok") == (code == 0), (at, py, code)
    if mask == 0x80:
        assert code == 3, at


@pytest.mark.cxx
@pytest.mark.parametrize("i", range(N_FLIPS))
def test_safetensors_header_byte_flip(
    request: pytest.FixtureRequest, artifact_copy: Path, tmp_path: Path, i: int
) -> None:
    """A flipped byte in the safetensors length prefix or header, the manifest's checksum
    updated: both refuse (code 6), or both accept (a flip that leaves the tensors the same)."""
    n, _, _ = _header(artifact_copy)
    at = _spread(i, N_FLIPS, 0, 8 + n)
    _flip(artifact_copy, WEIGHTS, at, 0x01 if at >= 8 else 0xFF)
    _rehash(artifact_copy, WEIGHTS)
    py, code = _both(request, artifact_copy, tmp_path)
    assert (py == "ok") == (code == 0), (at, py, code)
    assert code in (0, 6), (at, code)


@pytest.mark.cxx
@pytest.mark.parametrize("i", range(4))
def test_data_byte_flip(
    request: pytest.FixtureRequest,
    artifact_copy: Path,
    tiny_artifact: Path,
    tmp_path: Path,
    i: int,
) -> None:
    """Flipped weight bytes: refused by the checksum; with the checksum updated the artifact is
    valid again (other numbers), both runtimes load it and compute the same outputs."""
    n, _, data = _header(artifact_copy)
    at = 8 + n + _spread(i, 4, 0, len(data))
    _flip(artifact_copy, WEIGHTS, at)
    assert _both(request, artifact_copy, tmp_path) == ("refused", 4)
    _rehash(artifact_copy, WEIGHTS)
    inp, args = request.getfixturevalue("inputs")
    out = rt.load(artifact_copy).run(inp)["logits"]
    assert _cxx(request.getfixturevalue("modec_run"), artifact_copy, args, tmp_path)[0] == 0
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), out, rtol=1e-6, atol=1e-6)


def _variant(src: Path, dst: Path, files: dict[str, bytes | bytearray]) -> Path:
    """``dst``: ``src`` with ``files`` replaced; the other files are hard links (not copies)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name in files:
            (dst / p.name).write_bytes(files[p.name])
        else:
            os.link(p, dst / p.name)
    return dst


def _sweep(
    request: pytest.FixtureRequest,
    src: Path,
    tmp: Path,
    variants: Iterator[tuple[str, dict[str, bytes | bytearray]]],
) -> dict[str, int]:
    """Run both runtimes on every variant (made one at a time); fail listing each disagreement
    (a crash fails in `_cxx`). Returns how many variants got each C++ status."""
    codes: dict[str, int] = {}
    wrong = []
    for k, (what, files) in enumerate(variants):
        d = _variant(src, tmp / f"v{k}", files)
        py, code = _both(request, d, tmp)
        codes[STATUS.get(code, "OK")] = codes.get(STATUS.get(code, "OK"), 0) + 1
        if (py == "ok") != (code == 0):
            wrong.append(f"{what}: python {py}, C++ {code}")
        shutil.rmtree(d)
    assert not wrong, "\n".join(wrong)
    return codes


def _manifest_flips(text: bytes) -> Iterator[tuple[str, dict[str, bytes | bytearray]]]:
    for at in range(0, len(text), 7):
        for mask in (0x01, 0x80):
            data = bytearray(text)
            data[at] ^= mask
            yield f"byte {at} ^ {mask:#x} ({text[max(0, at - 12) : at + 4]!r})", {MANIFEST: data}


@pytest.mark.slow
@pytest.mark.cxx
def test_manifest_flip_sweep(
    request: pytest.FixtureRequest, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Every 7th byte of manifest.json flipped by 0x01 and by 0x80 (~1400 variants)."""
    text = (tiny_artifact / MANIFEST).read_bytes()
    codes = _sweep(request, tiny_artifact, tmp_path, _manifest_flips(text))
    assert codes["MANIFEST"] > sum(codes.values()) // 2 and codes.get("OK", 0) > 10, codes


def _header_flips(
    raw: bytes, manifest: dict[str, Any]
) -> Iterator[tuple[str, dict[str, bytes | bytearray]]]:
    (n,) = struct.unpack("<Q", raw[:8])
    for at in range(0, 8 + n, 3):
        data = bytearray(raw)
        data[at] ^= 0x01 if at >= 8 else 0xFF
        sha = hashlib.sha256(data).hexdigest()
        manifest["files"][WEIGHTS] = {"sha256": sha, "bytes": len(data)}
        what = f"byte {at} ({raw[max(0, at - 12) : at + 4]!r})"
        yield what, {WEIGHTS: data, MANIFEST: json.dumps(manifest).encode()}


@pytest.mark.slow
@pytest.mark.cxx
def test_safetensors_header_flip_sweep(
    request: pytest.FixtureRequest, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Every 3rd byte of the safetensors length prefix and header flipped (0xFF in the prefix,
    0x01 in the JSON), the manifest's checksum updated (~550 variants)."""
    raw = (tiny_artifact / WEIGHTS).read_bytes()
    manifest = json.loads((tiny_artifact / MANIFEST).read_text())
    codes = _sweep(request, tiny_artifact, tmp_path, _header_flips(raw, manifest))
    assert set(codes) <= {"OK", "WEIGHTS"} and codes["WEIGHTS"] > sum(codes.values()) // 2, codes


# ---- a manifest that no longer describes model.so (C++: test_c_api.py RUN_CASES) -----------

RUN_CASES: dict[str, tuple[Callable[[dict[str, Any]], object], type, str]] = {
    "input_dtype": (lambda m: m["inputs"][0].update(dtype="int32"), ModelError, "failed to run"),
    "input_rank": (lambda m: m["inputs"][0].update(shape=["B"]), ModelError, "failed to run"),
    "output_dtype": (lambda m: m["outputs"][0].update(dtype="float16"), ModelError,
                     "output 'logits' is float32[1, 4, 96], the manifest says float16"),
    "output_dim": (lambda m: m["outputs"][0].update(shape=["B", "T", 95]), ModelError,
                   "the manifest says float32['B', 'T', 95]"),
    "output_count": (lambda m: m["outputs"].append(dict(m["outputs"][0], name="x")), ModelError,
                     "returned 1 outputs, the manifest lists 2"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_python_run_refuses_a_model_unlike_its_manifest(artifact_copy: Path, case: str) -> None:
    edit, error, text = RUN_CASES[case]
    _edit(artifact_copy, edit)
    sess = rt.load(artifact_copy)
    spec = sess.inputs[0]
    inp = tiny_inputs(TinyConfig(), 1, 4)
    inp[spec.name] = np.ones((1, 4)[: len(spec.shape)], spec.dtype)
    with pytest.raises(error) as info:
        sess.run(inp)
    assert type(info.value) is error and text in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


# ---- an artifact replaced on disk, loaded again by the same process ------------------------


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny decoder (vocabulary 50, not 96)."""
    from modec.lowering.build import build_artifact
    from modec.lowering.tiny_model import build_tiny_decoder

    out = tmp_path_factory.mktemp("other") / "tiny50"
    build_artifact(build_tiny_decoder(TinyConfig(vocab=50)), out)
    return out


def _swap(src: Path, dst: Path) -> None:
    """Replace ``dst`` by a copy of ``src`` the way `write_artifact` does (new files, renamed)."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.copytree(src, tmp)
    shutil.rmtree(dst)
    tmp.rename(dst)


def test_python_loads_the_replaced_library(
    tiny_artifact: Path, other_artifact: Path, tmp_path: Path
) -> None:
    """dlopen by path would hand back the model.so loaded before under the same path (the
    vocabulary-96 model, with the new vocabulary-50 weights: TVM refuses the shapes)."""
    path = tmp_path / "art"
    shutil.copytree(tiny_artifact, path)
    assert rt.load(path).run(tiny_inputs(TinyConfig(), 1, 4))["logits"].shape == (1, 4, 96)
    _swap(other_artifact, path)
    out = rt.load(path).run(tiny_inputs(TinyConfig(vocab=50), 1, 4))["logits"]
    assert out.shape == (1, 4, 50)
    ref = rt.load(other_artifact).run(tiny_inputs(TinyConfig(vocab=50), 1, 4))["logits"]
    np.testing.assert_array_equal(out, ref)


# The C API through ctypes (`tools.c_api`; run from the checkout's root), which loads
# libmodec_runtime.so with RTLD_LOCAL as plugin hosts do: run(DIR) opens DIR, runs it on ones
# (B=1, T=4), prints (status, message, output shape) and returns the open session.
CAPI = r"""
import ctypes, shutil, sys
from tools.c_api import Handle as P, Tensor as T, load
lib = load(sys.argv[1])
shape = (ctypes.c_int64 * 2)(1, 4)
ones = (ctypes.c_int64 * 4)(1, 1, 1, 1)
def run(path):
    s = P()
    st = lib.modec_open(path.encode(), b"cpu", ctypes.byref(s))
    assert st == 0, lib.modec_last_error()
    ins = (T * 2)(T(b"input_ids", 3, 2, shape, ctypes.addressof(ones)),
                  T(b"attention_mask", 3, 2, shape, ctypes.addressof(ones)))
    outs, n = (T * 4)(), ctypes.c_size_t(4)
    st = lib.modec_run(s, ins, 2, outs, ctypes.byref(n))
    print((st, lib.modec_last_error().decode(), outs[0].shape[:outs[0].ndim] if st == 0 else []))
    return s
"""

RELOAD = (
    CAPI
    + r"""
old = run(sys.argv[2])  # stays open, as in a server that swaps in a new version
tmp = sys.argv[2] + ".new"
shutil.copytree(sys.argv[3], tmp)
shutil.rmtree(sys.argv[2])
shutil.move(tmp, sys.argv[2])
lib.modec_close(run(sys.argv[2]))
lib.modec_close(old)
"""
)


@pytest.mark.cxx
def test_cxx_loads_the_replaced_library(
    modec_run: Path, tiny_artifact: Path, other_artifact: Path, tmp_path: Path
) -> None:
    """The same through the C API: modec_open, replace, modec_open again (the first session
    still open keeps its library loaded)."""
    path = tmp_path / "art"
    shutil.copytree(tiny_artifact, path)
    lib = modec_run.parent / "libmodec_runtime.so"
    res = subprocess.run([sys.executable, "-c", RELOAD, str(lib), str(path), str(other_artifact)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["(0, '', [1, 4, 96])", "(0, '', [1, 4, 50])"]


@pytest.mark.cxx
def test_cxx_kernel_error_in_a_host_that_loads_the_library_locally(
    modec_run: Path, artifact_copy: Path
) -> None:
    """An error raised inside model.so's kernels is MODEC_ERR_RUNTIME, not "symbol lookup
    error" ending the process, when libmodec_runtime.so is loaded RTLD_LOCAL (ctypes)."""
    _reshape_consistently(artifact_copy)
    lib = modec_run.parent / "libmodec_runtime.so"
    cmd = [sys.executable, "-c", CAPI + "run(sys.argv[2])", str(lib), str(artifact_copy)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("(8, 'model run failed: ValueError: Mismatched tok_emb"), out
