"""`modec eval OUT --data DATA --kl-to MODEL.onnx`: next-token KL(p_model ‖ p_out) and top-1
agreement per modality, against the original model in onnxruntime, with no labels."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from modec import data
from modec.evaluate import kl_divergence


def modec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modec.cli", *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def compiled(tiny_vlm, tmp_path_factory):  # type: ignore[no-untyped-def]
    from modec.driver import CompileOptions, compile_model

    # The random tiny model's next-token distributions are nearly flat (top-1 ~5% of 58
    # tokens, top-2 gap ~0.1 logit), so top-1 flips easily: at 3 bits agreement is ~77%
    # (KL 3.6e-3), with every expert at 4 bits ~95% (KL 3.4e-4).
    out = tmp_path_factory.mktemp("kl") / "out"
    opts = CompileOptions(sensitivity_samples=8, budget=4.0, target="none", cache_dir=None)
    compile_model(tiny_vlm["model"], tiny_vlm["calib"], out, opts)
    return out


def test_compiled_against_the_original(tiny_vlm, compiled):
    r = modec("eval", str(compiled), "--data", str(tiny_vlm["eval"]), "--kl-to",
              str(tiny_vlm["model"]), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "simulated" and doc["reference_backend"] == "onnxruntime"
    kl = doc["kl"]
    ds = data.load(tiny_vlm["eval"])
    assert kl["samples"] == len(ds) == 36
    assert kl["all"]["positions"] == int((ds.modality != data.PAD).sum())
    assert kl["vision"]["positions"] == int((ds.modality == data.VISION).sum()) > 0
    assert kl["text"]["positions"] + kl["vision"]["positions"] == kl["all"]["positions"]
    assert kl["answer"]["positions"] == len(ds)  # one-token answers: the last position
    for split in ("all", "text", "vision"):
        assert 0 < kl[split]["mean_kl"] < 5e-3, kl  # 4-bit experts: small but not zero
        assert kl[split]["top1_agreement"] > 0.9, kl
    # The text table says the same.
    r = modec("eval", str(compiled), "--data", str(tiny_vlm["eval"]), "--kl-to",
              str(tiny_vlm["model"]))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "KL(reference ‖ model)" in r.stdout
    # The data set has answers: their positions (the last of each sample) are a split too.
    assert [ln.split()[0] for ln in r.stdout.splitlines()[2:]] == ["all", "text", "vision",
                                                                   "answer"]  # fmt: skip


def test_against_itself_is_zero(tiny_vlm):
    r = modec("eval", str(tiny_vlm["model"]), "--data", str(tiny_vlm["calib"]), "--kl-to",
              str(tiny_vlm["model"]), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    kl = json.loads(r.stdout)["kl"]
    for split in ("all", "text", "vision"):
        assert kl[split]["mean_kl"] == 0.0 and kl[split]["top1_agreement"] == 1.0


def test_kl_weights_every_non_pad_position_once():
    """Hand-made logits: the mean is over positions (not samples), padding excluded."""
    ds = data.Dataset(
        path="mem", inputs={"input_ids": np.zeros((2, 3), dtype=np.int64)},
        modality=np.array([[0, 1, 2], [1, 2, 2]], dtype=np.int8),
    )  # fmt: skip
    ref = np.zeros((2, 3, 2))
    out = np.zeros((2, 3, 2))
    out[1, 2] = [0.0, np.log(3.0)]  # one vision position: p=(1/2,1/2), q=(1/4,3/4)
    res = kl_divergence(lambda f: ref[:, -f["input_ids"].shape[1] :],
                        lambda f: out[:, -f["input_ids"].shape[1] :], ds)  # fmt: skip
    one = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert res.splits["all"].positions == 5 and res.splits["vision"].positions == 3
    assert res.splits["all"].mean_kl == pytest.approx(one / 5)
    assert res.splits["vision"].mean_kl == pytest.approx(one / 3)
    assert res.splits["text"].mean_kl == 0.0
    # Ties break to the first index in both: the changed position now disagrees.
    assert res.splits["vision"].top1_agreement == pytest.approx(2 / 3)


def test_kl_to_something_that_is_not_a_model(tiny_vlm, capsys):
    from modec.cli import main

    code = main(["eval", str(tiny_vlm["model"]), "--data", str(tiny_vlm["eval"]), "--kl-to",
                 str(tiny_vlm["calib"])])  # fmt: skip
    assert code == 3
    assert "not a readable ONNX model" in capsys.readouterr().err
