"""The C++ runtime: build with CMake, run examples/modec_run, refuse broken artifacts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import modec.runtime as rt
import numpy as np
import pytest

from modec.artifact import MANIFEST, WEIGHTS
from modec.lowering.tiny_model import TinyConfig, tiny_inputs
from tools.cxx import build_modec_run

pytestmark = pytest.mark.cxx
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def modec_run() -> Path:
    app = build_modec_run(ROOT / "build" / "runtime-test")
    if app is None:
        pytest.skip("cmake or g++ not installed")
    return app


def _inputs(tmp: Path, batch: int, seq: int) -> tuple[dict[str, np.ndarray], list[str]]:
    inp = tiny_inputs(TinyConfig(), batch, seq)
    args = []
    for k, v in inp.items():
        np.save(tmp / f"{k}.npy", v)
        args.append(f"{k}={tmp / (k + '.npy')}")
    return inp, args


def test_example_matches_python_runtime(
    modec_run: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    inp, args = _inputs(tmp_path, 3, 13)
    res = subprocess.run(
        [str(modec_run), str(tiny_artifact), *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ref = rt.load(tiny_artifact).run(inp)["logits"]
    out = np.load(tmp_path / "logits.npy")
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    tops = [int(line.split(": ")[1]) for line in res.stdout.splitlines() if "top answer" in line]
    assert tops == ref[:, -1].argmax(-1).tolist()


def test_example_runs_a_compiled_moe_model(modec_run: Path, tiny_vlm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`modec compile` output (packed uint32 expert codes, the router's top-k contrib kernel)
    runs in the C++ app exactly as in the Python runtime; the output directory is created."""
    from modec import data
    from modec.driver import CompileOptions, compile_model

    out = tmp_path / "artifact"
    compile_model(tiny_vlm["model"], tiny_vlm["calib"], out,
                  CompileOptions(sensitivity_samples=8, target="llvm"))  # fmt: skip
    ds = data.load(tiny_vlm["eval"])
    _, feeds = next(ds.subset(np.arange(5)).batches(5))
    args = []
    for k, v in feeds.items():
        np.save(tmp_path / f"{k}.npy", v)
        args.append(f"{k}={tmp_path / (k + '.npy')}")
    res = subprocess.run(
        [str(modec_run), str(out), *args, "--out", str(tmp_path / "new" / "dir")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ref = rt.load(out).run(feeds)
    (name,) = ref
    np.testing.assert_array_equal(np.load(tmp_path / "new" / "dir" / f"{name}.npy"), ref[name])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:50])


def _edit(p: Path, **target: object) -> None:
    m = json.loads((p / MANIFEST).read_text())
    m["target"].update(target)
    (p / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("case", "corrupt", "code", "message"),
    [
        ("json", lambda p: (p / MANIFEST).write_text("{"), 3, "not valid JSON"),
        ("schema", lambda p: (p / MANIFEST).write_text('{"schema": "x/2"}'), 3, "schema"),
        ("missing", lambda p: (p / WEIGHTS).unlink(), 2, "cannot be opened"),
        ("truncated", lambda p: _truncate(p / WEIGHTS), 4, "truncated"),
        ("checksum", lambda p: _flip(p / WEIGHTS), 4, "SHA-256"),
        ("device", lambda p: _edit(p, device="cuda", kind="cuda", archs=["sm_90"]), 5,
         "device 'cuda'"),
        ("cuda_no_archs", lambda p: _edit(p, device="cuda", kind="cuda"), 3,
         "predates compiled CUDA kernels"),
        ("machine", lambda p: _edit(p, machine="aarch64"), 5, "aarch64"),
    ],
)  # fmt: skip
def test_corrupted_artifact_fails_cleanly(
    modec_run: Path,
    artifact_copy: Path,
    tmp_path: Path,
    case: str,
    corrupt: object,
    code: int,
    message: str,
) -> None:
    corrupt(artifact_copy)  # type: ignore[operator]
    _, args = _inputs(tmp_path, 1, 4)
    res = subprocess.run(
        [str(modec_run), str(artifact_copy), *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )  # fmt: skip
    assert res.returncode == code, (case, res.returncode, res.stderr)  # > 0: no signal
    assert message in res.stderr


def test_bad_input_fails_cleanly(modec_run: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "ids.npy", np.zeros((2, 3), np.int32))
    np.save(tmp_path / "mask.npy", np.ones((2, 3), np.int64))
    res = subprocess.run(
        [str(modec_run), str(tiny_artifact), f"input_ids={tmp_path / 'ids.npy'}",
         f"attention_mask={tmp_path / 'mask.npy'}", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 7 and "dtype" in res.stderr


# ---- modec_run's own errors: usage, .npy reader (exit 64), inputs the runtime refuses ------


def _app(app: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(app), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_example_usage_errors(modec_run: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    """Bad command lines: the usage line on stderr, exit 64 (examples/modec_run.cc)."""
    np.save(tmp_path / "a.npy", np.ones((1, 2), np.int64))
    for args in ([], [tiny_artifact, "input_ids"], [tiny_artifact, f"={tmp_path / 'a.npy'}"],
                 [tiny_artifact, f"input_ids={tmp_path / 'a.npy'}", "--out"]):  # fmt: skip
        res = _app(modec_run, *args)
        assert res.returncode == 64, (args, res.returncode, res.stderr)
        assert res.stderr.startswith("usage: modec_run ARTIFACT_DIR"), args
        assert len(res.stderr.splitlines()) == 1 and res.stdout == ""


def test_example_missing_artifact(modec_run: Path, tmp_path: Path) -> None:
    _, args = _inputs(tmp_path, 1, 4)
    res = _app(modec_run, tmp_path / "nope", *args, "--out", tmp_path)
    assert res.returncode == 2, res.stderr  # MODEC_ERR_IO
    assert res.stderr.splitlines() == [
        f"modec_run: MODEC_ERR_IO: {tmp_path / 'nope' / MANIFEST} cannot be opened (missing?); "
        "copy the whole artifact directory"
    ]


def _npy(replace: dict[str, str] | None = None) -> bytes:
    """A valid .npy (int64, shape (1, 4)), its header's text edited by ``replace``."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.ones((1, 4), np.int64))
    raw = buf.getvalue()
    for old, new in (replace or {}).items():
        assert old.encode() in raw, old
        raw = raw.replace(old.encode(), new.encode())
    return raw


def _saved(a: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=version)
    return buf.getvalue()


NPY_ERRORS: dict[str, tuple[bytes | None, str]] = {
    "missing_file": (None, "cannot open"),
    "empty_file": (b"", "not a .npy file"),
    "bad_magic": (b"\x93NUMPZ" + _npy()[6:], "not a .npy file"),
    "truncated_header": (_npy()[:40], "truncated header"),
    "truncated_prefix": (_npy()[:8], "truncated header"),
    "truncated_data": (_npy()[:-5], "data size does not match its shape (27 bytes of data, the "
                                    "shape needs 32; truncated?)"),
    "extra_data": (_npy() + b"\0" * 8, "data size does not match its shape"),
    "version": (_npy()[:6] + b"\x09" + _npy()[7:], "unsupported .npy format version 9"),
    "big_endian": (_saved(np.ones((1, 4), ">i8")), "unsupported dtype '>i8'"),
    "complex": (_saved(np.ones((1, 4), np.complex64)), "unsupported dtype '<c8'"),
    "object": (_npy(replace={"'<i8'": "'|O8'"}), "unsupported dtype '|O8'"),
    "fortran_order": (_saved(np.asfortranarray(np.ones((2, 4), np.int64))),
                      "Fortran order is not supported"),
    "no_descr": (_npy(replace={"'descr'": "'dtype'"}), "bad header (no 'descr' string)"),
    "no_fortran_order": (_npy(replace={"'fortran_order': False": "'fortran_order': 0    "}),
                         "bad header (no 'fortran_order' True/False)"),
    "no_shape": (_npy(replace={"'shape'": "'shapf'"}), "bad header (no 'shape' tuple)"),
    "shape_not_a_tuple": (_npy(replace={"(1, 4)": "[1, 4]"}), "bad header (no 'shape' tuple)"),
    "shape_not_numbers": (_npy(replace={"(1, 4)": "(a, 4)"}),
                          "bad header (shape entry 'a' is not a size)"),
    "shape_negative": (_npy(replace={"(1, 4)": "(-1, 4)"}),
                       "bad header (shape entry '-1' is not a size)"),
    "shape_too_long": (_npy(replace={"(1, 4), }": "(99999999999999999999, 4)}"}),
                       "shape entry '99999999999999999999' is not a size"),
    "shape_overflows": (_npy(replace={"(1, 4), ": "(100000000000000000, 100000000000000000)"}),
                        "the shape needs more bytes than the file has"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(NPY_ERRORS))
def test_example_refuses_a_bad_npy(
    modec_run: Path, tiny_artifact: Path, tmp_path: Path, case: str
) -> None:
    """One line `modec_run: PATH: what`, exit 64, before the artifact is even opened."""
    data, message = NPY_ERRORS[case]
    bad = tmp_path / "bad.npy"
    if data is not None:
        bad.write_bytes(data)
    np.save(tmp_path / "mask.npy", np.ones((1, 4), np.int64))
    mask = tmp_path / "mask.npy"
    res = _app(modec_run, tiny_artifact, f"input_ids={bad}", f"attention_mask={mask}",
               "--out", tmp_path)  # fmt: skip
    assert res.returncode == 64, (case, res.returncode, res.stderr)  # 134 was an abort
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"modec_run: {bad}: ") and message in res.stderr, res.stderr
    assert not (tmp_path / "logits.npy").exists()


def test_example_reads_npy_format_2(modec_run: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    inp, _ = _inputs(tmp_path, 2, 3)
    (tmp_path / "ids2.npy").write_bytes(_saved(inp["input_ids"], (2, 0)))
    res = _app(modec_run, tiny_artifact, f"input_ids={tmp_path / 'ids2.npy'}",
               f"attention_mask={tmp_path / 'attention_mask.npy'}", "--out", tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"),
                                  rt.load(tiny_artifact).run(inp)["logits"])  # fmt: skip


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown", "unknown input 'bogus'; the model's inputs are input_ids, attention_mask"),
        ("missing", "missing input 'attention_mask'; the model's inputs are input_ids, "
                    "attention_mask"),
        ("twice", "input 'input_ids' given twice"),
        ("rank", "input 'input_ids' has rank 3, expected 2"),
        ("rank_low", "input 'input_ids' has rank 1, expected 2"),
        ("dtype", "input 'input_ids' dtype differs: got int32, expected int64"),
        ("symbol", "input 'attention_mask' dim 1 (T) is 3 but another input has 4"),
        ("empty", "input 'input_ids' dim 0 is 0 (must be >= 1)"),
    ],
)  # fmt: skip
def test_example_refuses_bad_inputs(
    modec_run: Path, tiny_artifact: Path, tmp_path: Path, case: str, message: str
) -> None:
    """The runtime's MODEC_ERR_INPUT (exit 7), one line naming the input."""
    ids, mask = np.ones((1, 4), np.int64), np.ones((1, 4), np.int64)
    names = {"input_ids": ids, "attention_mask": mask}
    if case == "unknown":
        names["bogus"] = mask
    elif case == "missing":
        del names["attention_mask"]
    elif case == "rank":
        names["input_ids"] = ids[..., None]
    elif case == "rank_low":
        names["input_ids"] = ids[0]
    elif case == "dtype":
        names["input_ids"] = ids.astype(np.int32)
    elif case == "symbol":
        names["attention_mask"] = mask[:, :3]
    elif case == "empty":
        names["input_ids"] = ids[:0]
    args = []
    for k, v in names.items():
        np.save(tmp_path / f"{k}.npy", v)
        args.append(f"{k}={tmp_path / (k + '.npy')}")
    if case == "twice":
        args.append(args[0])
    res = _app(modec_run, tiny_artifact, *args, "--out", tmp_path)
    assert res.returncode == 7, (case, res.returncode, res.stderr)
    assert res.stderr.splitlines() == [f"modec_run: MODEC_ERR_INPUT: {message}"]
