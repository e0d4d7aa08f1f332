"""The C++ runtime: build with CMake, run examples/modec_run, refuse broken artifacts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import modec.runtime as rt
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


def _edit(p: Path, **target: str) -> None:
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
        ("device", lambda p: _edit(p, device="cuda", kind="cuda"), 5, "device 'cuda'"),
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
