"""modec.runtime: load / run the artifact, and refuse every kind of broken artifact."""

from __future__ import annotations

import json
from pathlib import Path

import modec.runtime as rt
import numpy as np
import onnxruntime as ort
import pytest

from modec.artifact import LIBRARY, MANIFEST, SCHEMA, WEIGHTS, read_manifest, write_artifact
from modec.errors import BadInputError, ModelError
from modec.lowering.tiny_model import TinyConfig, build_tiny_decoder, tiny_inputs

CFG = TinyConfig()


def test_run_matches_onnxruntime(tiny_artifact: Path) -> None:
    sess = rt.load(tiny_artifact)
    ref_sess = ort.InferenceSession(build_tiny_decoder(CFG).SerializeToString())
    for batch, seq in [(2, 7), (1, 40)]:
        inp = tiny_inputs(CFG, batch, seq)
        out = sess.run(inp)
        ref = ref_sess.run(None, inp)[0]
        assert list(out) == ["logits"]
        np.testing.assert_allclose(out["logits"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_runtime_does_not_load_the_tvm_compiler(tiny_artifact: Path) -> None:
    """A fresh process loads and runs the artifact with libtvm_runtime only, no `import tvm`."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, modec.runtime as rt\n"
        "from modec.lowering.tiny_model import TinyConfig, tiny_inputs\n"
        "out = rt.load(sys.argv[1]).run(tiny_inputs(TinyConfig(), 1, 5))\n"
        "assert np.isfinite(out['logits']).all()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('tvm' in sys.modules, 'libtvm_compiler' in maps, 'libtvm_runtime.so' in maps)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tiny_artifact)], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "True"]


def test_manifest_contents(tiny_artifact: Path) -> None:
    m = read_manifest(tiny_artifact)
    assert [s.name for s in m.inputs] == ["input_ids", "attention_mask"]
    assert m.outputs[0].shape == ("B", "T", CFG.vocab)
    assert m.params[0].name == "tok_emb" and m.params[0].shape == (CFG.vocab, CFG.dim)
    assert m.target["kind"] == "llvm" and m.target["device"] == "cpu"
    assert set(m.files) == {LIBRARY, WEIGHTS}
    assert m.sections["lowering"]["stats"]["matmul_batched"] == 4
    text = (tiny_artifact / MANIFEST).read_text()
    assert json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n" == text


def test_rebuild_is_deterministic(tiny_artifact: Path, tmp_path: Path) -> None:
    """Library, weights and manifest are byte-identical (docs/artifact.md, Determinism)."""
    from modec.lowering.build import build_artifact

    again = tmp_path / "again"
    build_artifact(build_tiny_decoder(CFG), again)
    for name in (WEIGHTS, LIBRARY, MANIFEST):
        assert (again / name).read_bytes() == (tiny_artifact / name).read_bytes(), name


def _edit_manifest(path: Path, fn: object) -> None:
    obj = json.loads((path / MANIFEST).read_text())
    fn(obj)  # type: ignore[operator]
    (path / MANIFEST).write_text(json.dumps(obj))


def _flip_byte(p: Path, offset: int) -> None:
    data = bytearray(p.read_bytes())
    data[offset] ^= 0xFF
    p.write_bytes(bytes(data))


CORRUPTIONS = {
    "manifest_not_json": (
        lambda p: (p / MANIFEST).write_text('{"schema": "modec.art'),
        "not valid JSON",
    ),
    "manifest_missing": (lambda p: (p / MANIFEST).unlink(), "not found"),
    "schema_version": (
        lambda p: _edit_manifest(p, lambda m: m.update(schema="modec.artifact/99")),
        "schema",
    ),
    "field_missing": (lambda p: _edit_manifest(p, lambda m: m.pop("params")), "malformed field"),
    "weights_missing": (lambda p: (p / WEIGHTS).unlink(), "missing"),
    "weights_truncated": (
        lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:-100]),
        "truncated",
    ),
    "weights_checksum": (lambda p: _flip_byte(p / WEIGHTS, -5), "SHA-256"),
    "library_checksum": (lambda p: _flip_byte(p / LIBRARY, 5000), "SHA-256"),
    "other_device": (
        lambda p: _edit_manifest(
            p, lambda m: m["target"].update(kind="cuda", device="cuda", archs=["sm_90"])
        ),
        "built for target 'cuda'",
    ),
    "cuda_without_archs": (
        lambda p: _edit_manifest(p, lambda m: m["target"].update(kind="cuda", device="cuda")),
        "target.archs is missing",
    ),
    "cuda_bad_archs": (
        lambda p: _edit_manifest(
            p, lambda m: m["target"].update(kind="cuda", device="cuda", archs=["90"])
        ),
        "target.archs is missing or malformed",
    ),
    "other_machine": (
        lambda p: _edit_manifest(p, lambda m: m["target"].update(machine="aarch64")),
        "architecture 'aarch64'",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_artifact_is_refused(artifact_copy: Path, case: str) -> None:
    corrupt, message = CORRUPTIONS[case]
    corrupt(artifact_copy)
    with pytest.raises(ModelError, match=message) as info:
        rt.load(artifact_copy)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("attention_mask"), "missing"),
        (lambda d: d.update(extra=np.zeros(1)), "unknown"),
        (lambda d: d.update(input_ids=d["input_ids"].astype(np.int32)), "dtype int32"),
        (lambda d: d.update(input_ids=d["input_ids"][0]), "rank 1"),
        (lambda d: d.update(attention_mask=d["attention_mask"][:, :3]), "another input"),
    ],
)
def test_bad_inputs_are_refused(tiny_artifact: Path, change: object, message: str) -> None:
    sess = rt.load(tiny_artifact)
    inp = tiny_inputs(CFG, 2, 5)
    change(inp)  # type: ignore[operator]
    with pytest.raises(BadInputError, match=message):
        sess.run(inp)


def _lib(p: Path) -> None:
    p.write_bytes(b"lib")


def _write(out: Path, force: bool = False) -> None:
    write_artifact(
        out,
        write_library=_lib,
        params={"w": np.ones(3, np.float32)},
        inputs=[],
        outputs=[],
        target={"kind": "llvm", "device": "cpu"},
        tvm_version="x",
        force=force,
    )


def test_write_refuses_foreign_directory_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="force"):
        _write(out)
    assert (out / "precious.txt").exists()
    _write(out, force=True)
    assert not (out / "precious.txt").exists()
    assert json.loads((out / MANIFEST).read_text())["schema"] == SCHEMA
    _write(out)  # an existing artifact is replaced without force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_lazy_params_are_written_one_at_a_time(tmp_path: Path) -> None:
    """`write_artifact` takes lazy weights: the manifest is declared from their shape and
    dtype, each value is produced once, when the writer reaches it, and the file holds it."""
    from safetensors.numpy import load_file

    from modec.moe import lazy

    made: list[str] = []

    def make(name: str, arr: np.ndarray) -> lazy.LazyArray:
        return lazy.computed(arr.shape, arr.dtype, lambda: made.append(name) or arr)

    a, b = np.arange(12, dtype=np.uint32).reshape(3, 4), np.full(5, 0.5, np.float16)
    write_artifact(
        tmp_path / "out", write_library=_lib, params={"a": make("a", a), "b": make("b", b)},
        inputs=[], outputs=[], target={"kind": "llvm", "device": "cpu"}, tvm_version="x",
    )  # fmt: skip
    assert sorted(made) == ["a", "b"]
    man = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [(p["name"], p["dtype"], p["shape"]) for p in man["params"]] == [
        ("a", "uint32", [3, 4]), ("b", "float16", [5])
    ]  # fmt: skip
    got = load_file(str(tmp_path / "out" / "weights.safetensors"))
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


def _has_cuda_driver() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_has_cuda_driver(), reason="this machine has the NVIDIA driver")
def test_cuda_artifact_without_driver_is_refused(artifact_copy: Path) -> None:
    """No NVIDIA driver: one line naming the CUDA runtime library, not a crash or an import
    of the TVM compiler."""
    _edit_manifest(
        artifact_copy,
        lambda m: m["target"].update(kind="cuda", device="cuda", arch="sm_90", archs=["sm_90"]),
    )
    with pytest.raises(ModelError, match=r"libtvm_runtime_cuda\.so.*NVIDIA driver") as info:
        rt.load(artifact_copy, "cuda")
    assert "\n" not in str(info.value)


def test_cuda_arch_mismatch_is_refused() -> None:
    from types import SimpleNamespace

    from modec.runtime import _check_cuda_arch

    manifest = SimpleNamespace(target={"archs": ["sm_80", "sm_90"]})
    _check_cuda_arch(manifest, "sm_86", "NVIDIA A10")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"archs sm_80, sm_90; this GPU \(NVIDIA X\) is sm_100"):
        _check_cuda_arch(manifest, "sm_100", "NVIDIA X")  # type: ignore[arg-type]


def test_runtime_library_path_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MODEC_TVM_LIBRARY_PATH names where libtvm_runtime*.so are (a runtime-only install)."""
    from modec.runtime import _tvm

    monkeypatch.setenv(_tvm.LIBRARY_PATH_ENV, str(tmp_path))
    assert _tvm._library_dir() == tmp_path
    monkeypatch.delenv(_tvm.LIBRARY_PATH_ENV)
    assert (_tvm._library_dir() / "libtvm_runtime.so").exists()


def test_cuda_artifact_for_another_host_is_refused(artifact_copy: Path) -> None:
    """model.so of a CUDA artifact holds host code: another host architecture is refused
    before any CUDA library is loaded (as the C++ runtime does)."""
    _edit_manifest(
        artifact_copy,
        lambda m: m["target"].update(
            kind="cuda", device="cuda", archs=["sm_90"], machine="aarch64"
        ),
    )
    with pytest.raises(ModelError, match="architecture 'aarch64'"):
        rt.load(artifact_copy, "cuda")


@pytest.mark.parametrize(
    "a",
    [
        np.array([[True, False, True]]),
        np.zeros((2, 0, 3), np.float32),
        np.arange(6, dtype=np.int32).reshape(2, 3),
        np.float16([1.5, -2.0]),
        np.arange(10.0)[::2],  # not contiguous
        np.arange(12, dtype=np.int64).reshape(3, 4)[:, :3],
    ],
)
def test_runtime_tensor_round_trip(a: np.ndarray) -> None:
    """`Runtime.tensor` copies any array (the CPU path writes through a DLPack view of the
    new tensor) and `Runtime.numpy` reads it back."""
    from modec.runtime import _tvm

    r = _tvm.Runtime("cpu")
    t = r.tensor(a)
    assert str(t.dtype) == str(a.dtype) and tuple(t.shape) == a.shape
    np.testing.assert_array_equal(r.numpy(t), a)


def test_last_position_is_a_read_only_view() -> None:
    from modec.runtime import _tvm

    r = _tvm.Runtime("cpu")
    logits = r.tensor(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    last = r.last_position(logits)
    np.testing.assert_array_equal(last, [[8, 9, 10, 11], [20, 21, 22, 23]])
    assert not last.flags.writeable
    del logits  # the view holds the tensor
    np.testing.assert_array_equal(last[1], [20, 21, 22, 23])
