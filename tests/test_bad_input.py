"""Bad input to `modec compile`: one line naming the problem and the fix, the documented exit
code, and nothing half-written in OUT."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from modec import data
from modec.driver import CompileOptions, compile_model
from modec.errors import BadInputError, DataError, ModelError


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modec.cli", *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_nan_weights(tiny_vlm, tmp_path):
    m = onnx.load(str(tiny_vlm["model"]))
    for init in m.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 3:
            arr = onnx.numpy_helper.to_array(init).copy()
            arr.flat[0] = np.nan
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
            break
    bad = tmp_path / "nan.onnx"
    onnx.save(m, str(bad))
    r = _run("compile", str(bad), "--calib", str(tiny_vlm["calib"]), "-o", str(tmp_path / "o"))
    assert r.returncode == 3
    assert "NaN/Inf" in r.stderr and "re-export" in r.stderr
    assert not (tmp_path / "o").exists()


def test_calibration_shape_and_dtype_mismatch(tiny_vlm, tmp_path):
    ds = data.load(tiny_vlm["calib"])
    inputs = dict(ds.inputs)
    inputs["input_ids"] = inputs["input_ids"].astype(np.int32)
    path = tmp_path / "calib_int32.npz"
    data.save(path, inputs, modality=ds.modality)
    r = _run("compile", str(tiny_vlm["model"]), "--calib", str(path), "-o", str(tmp_path / "o"))
    assert r.returncode == 3 and "dtype int32; the model expects int64" in r.stderr
    inputs = dict(ds.inputs)
    inputs["pixel_values"] = inputs["pixel_values"][:, :, :32, :32]
    path = tmp_path / "calib_small.npz"
    data.save(path, inputs, modality=ds.modality)
    r = _run("compile", str(tiny_vlm["model"]), "--calib", str(path), "-o", str(tmp_path / "o"))
    assert r.returncode == 3 and "the model expects" in r.stderr
    assert not (tmp_path / "o").exists()


def test_empty_calibration_set(tiny_vlm, tmp_path):
    ds = data.load(tiny_vlm["calib"]).subset(slice(0, 0))
    path = tmp_path / "empty.npz"
    data.save(path, ds.inputs, modality=ds.modality)
    with pytest.raises(DataError, match="the dataset is empty"):
        compile_model(tiny_vlm["model"], path, tmp_path / "o", CompileOptions(target="none"))
    r = _run("compile", str(tiny_vlm["model"]), "--calib", str(path), "-o", str(tmp_path / "o"))
    assert r.returncode == 3 and "the dataset is empty" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_truncated_model(tiny_vlm, tmp_path):
    blob = tiny_vlm["model"].read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(blob[: len(blob) // 2])
    r = _run("compile", str(cut), "--calib", str(tiny_vlm["calib"]), "-o", str(tmp_path / "o"))
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("modec: error")]
    assert r.returncode == 3 and len(errors) == 1 and "cut.onnx" in errors[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_experts_without_calibration_tokens_fall_back_to_rtn(tiny_vlm, tmp_path):
    """Two calibration samples leave every expert under GPTQ's token minimum: not an error."""
    ds = data.load(tiny_vlm["calib"])
    two = ds.subset(np.flatnonzero(~ds.multimodal)[:2])
    path = tmp_path / "two.npz"
    data.save(path, two.inputs, modality=two.modality)
    out = tmp_path / "o"
    r = _run("-q", "compile", str(tiny_vlm["model"]), "--calib", str(path), "--target", "none",
             "--no-cache", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    sections = {p["name"]: p for p in report["passes"]}
    quant = report["sections"]["quantize-experts"]
    assert sections["quantize-experts"]["stats"]["rtn_fallbacks"] == 8  # 2 layers x 4 experts
    reasons = [row["down"]["reason"] for layer in quant["layers"] for row in layer]
    assert all(reason and "token" in reason for reason in reasons), reasons
    coverage = report["sections"]["collect-routing"]["coverage"]
    assert coverage["starved"] > 0


def test_no_modality_and_no_image_token(tiny_vlm, tmp_path):
    ds = data.load(tiny_vlm["calib"])
    path = tmp_path / "nomod.npz"
    data.save(path, ds.inputs, modality=None)
    r = _run("compile", str(tiny_vlm["model"]), "--calib", str(path), "-o", str(tmp_path / "o"))
    assert r.returncode == 3 and "no 'image_token_id'" in r.stderr


def test_unhandled_moe_form_names_layer_and_fix(moe_model, tiny_vlm, tmp_path):
    model = moe_model("mixtral_eager", "torchscript")
    with pytest.raises(ModelError, match="batched_mm"):
        compile_model(model, tiny_vlm["calib"], tmp_path / "o", CompileOptions(target="none"))
    assert not (tmp_path / "o").exists()


def test_disk_full_leaves_nothing(tiny_vlm, tmp_path, monkeypatch):
    import modec.driver as drv

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(drv, "_write_experts", full)
    out = tmp_path / "o"
    opts = CompileOptions(target="none", sensitivity_samples=4, method="uniform")
    with pytest.raises(BadInputError, match="no space left on the device"):
        compile_model(tiny_vlm["model"], tiny_vlm["calib"], out, opts)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "the temporary directory is removed"
