"""The whole MODE pipeline on the tiny digits-vlm: outputs, report, determinism, methods."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from modec import data
from modec.driver import CompileOptions, compile_model
from modec.evaluate import evaluate
from modec.runners import SimulatedRunner

FAST = CompileOptions(sensitivity_samples=8, budget=3.0, target="none")


@pytest.fixture(scope="module")
def compiled(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "out"
    res = compile_model(tiny_vlm["model"], tiny_vlm["calib"], out, FAST)
    return res


def test_outputs_and_report(compiled):
    out = compiled.out
    files = {p.name for p in out.iterdir()}
    assert {"report.json", "allocation.json", "experts.safetensors", "model.sim.onnx"} <= files
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "modec.report/2"
    ran = [p["name"] for p in report["passes"]]
    assert ran == ["find-moe", "canonicalize-moe", "find-attention", "collect-routing",
                   "select-key-vision", "measure-sensitivity", "allocate-bits",
                   "quantize-experts"]  # fmt: skip
    assert report["pipeline"].split(",")[0] == "find-moe"
    assert all(p["seconds"] >= 0 for p in report["passes"])
    alloc = json.loads((out / "allocation.json").read_text())
    assert len(alloc["widths"]) == 2
    for layer in alloc["widths"]:
        assert len(layer) == 4 and sum(layer) == 3 * 4  # Σ b = n·k per layer (the paper)
        assert set(layer) <= {2, 3, 4}


def test_packed_codes_match_widths(compiled):
    alloc = json.loads((compiled.out / "allocation.json").read_text())
    tensors = load_file(str(compiled.out / "experts.safetensors"))
    for layer, widths in enumerate(alloc["widths"]):
        for e, b in enumerate(widths):
            codes = tensors[f"l{layer}.down.e{e}.codes"]
            assert codes.max() < 2**b
            assert tensors[f"l{layer}.down.e{e}.scale"].dtype == np.float16
    from safetensors import safe_open

    with safe_open(str(compiled.out / "experts.safetensors"), "np") as f:
        meta = json.loads(f.metadata()["modec"])
    assert meta == {"group_size": 128, "widths": alloc["widths"]}


def test_deterministic(tiny_vlm, tmp_path, compiled):
    again = compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / "again", FAST)
    assert (again.out / "allocation.json").read_bytes() == (
        compiled.out / "allocation.json"
    ).read_bytes()
    a = load_file(str(compiled.out / "experts.safetensors"))
    b = load_file(str(again.out / "experts.safetensors"))
    differ = {
        k: float(np.abs(a[k].astype(float) - b[k]).max())
        for k in a
        if not np.array_equal(a[k], b[k])
    }
    assert not differ, f"tensors differ between two compiles: {differ}"
    assert (again.out / "experts.safetensors").read_bytes() == (
        compiled.out / "experts.safetensors"
    ).read_bytes()


def test_simulated_model_runs_and_is_close_to_fp32(tiny_vlm, compiled):
    from modec.frontend import OrtRunner

    ds = data.load(tiny_vlm["eval"])
    sim = SimulatedRunner(compiled.out)
    ref = OrtRunner(tiny_vlm["model"])
    _, feeds = next(ds.batches(8))
    a, b = sim(feeds), ref(feeds)
    assert a.shape == b.shape
    assert not np.allclose(a, b)  # the experts really are quantized
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    res = evaluate(sim, ds)
    assert res.overall.n == len(ds)


@pytest.mark.parametrize("method", ["uniform", "mc-moe", "mode-no-sens"])
def test_other_methods(tiny_vlm, tmp_path, method):
    opts = CompileOptions(sensitivity_samples=8, budget=3.0, method=method, target="none")
    res = compile_model(tiny_vlm["model"], tiny_vlm["calib"], tmp_path / method, opts)
    widths = res.allocation.widths
    if method == "uniform":
        assert all(w == 3 for layer in widths for w in layer)
    assert all(sum(layer) == 12 for layer in widths)
    ran = [p["name"] for p in res.report["passes"]]
    assert "measure-sensitivity" not in ran  # these signals need no KL sensitivities


def test_cli_compile_then_eval_then_inspect(tiny_vlm, tmp_path):
    out = tmp_path / "cli"
    # -q after the subcommand, as a user types it.
    cmd = [sys.executable, "-m", "modec.cli", "compile", "-q", str(tiny_vlm["model"]),
           "--calib", str(tiny_vlm["calib"]), "--budget", "2.5", "--sensitivity-samples", "8",
           "-o", str(out), "--eval", str(tiny_vlm["eval"]),
           "--cache-dir", str(tmp_path / "cache"),
           "--dump-ir-after", "quantize-experts"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # -q: no progress bars, no warnings
    assert "widths" in r.stdout and "quantized" in r.stdout and "report" in r.stdout
    # The summary and the accuracy are in the report and on the page, written once.
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["accuracy"]["quantized"]["overall"]["accuracy"] >= 0.0
    assert "plot-accuracy" in (out / "report.html").read_text()
    # Every file of the output is 0644 (less the umask), the directory 0755.
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    # --dump-ir-after writes the graph beside the output, never inside it.
    dumped = sorted(p.name for p in (tmp_path / "cli.ir").iterdir())
    assert dumped == ["08-quantize-experts.onnx"]
    r = subprocess.run([sys.executable, "-m", "modec.cli", "eval", str(out), "--data",
                        str(tiny_vlm["eval"]), "--json"], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    compiled = json.loads(r.stdout)
    assert compiled["backend"] == "compiled"  # OUT holds the TVM artifact (manifest.json)
    # The compiled kernels reproduce the simulated-quantization model's accuracy.
    sim = evaluate(SimulatedRunner(out), data.load(tiny_vlm["eval"]))
    assert abs(compiled["overall"]["accuracy"] - sim.overall.accuracy) <= 0.002
    manifest = json.loads((out / "manifest.json").read_text())
    widths = json.loads((out / "allocation.json").read_text())["widths"]
    assert [layer["widths"] for layer in manifest["sections"]["moe"]["layers"]] == widths
    r = subprocess.run([sys.executable, "-m", "modec.cli", "inspect", str(out)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and "layer 0" in r.stdout
    # A second compile into the same (modec) directory replaces it and reuses the cached
    # sensitivities.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    for name in ("collect-routing", "measure-sensitivity"):
        entry = next(p for p in report["passes"] if p["name"] == name)
        assert entry["stats"]["cache_hit"] is True, name


def test_interrupted_compile_resumes_from_the_finished_passes(tiny_vlm, tmp_path):
    """Ctrl-C during measure-sensitivity: OUT untouched; the rerun reuses collect-routing."""
    import signal
    import time

    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "modec.cli", "-q", "compile", str(tiny_vlm["model"]),
           "--calib", str(tiny_vlm["calib"]), "--budget", "3.0", "--sensitivity-samples", "32",
           "--target", "none", "-o", str(out), "--cache-dir", str(cache)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(cache.glob("routing-*.npz")) and proc.poll() is None:
        assert time.monotonic() < deadline, "collect-routing never finished"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not out.exists() and list(tmp_path.glob(".out.tmp-*")) == []
    assert list(cache.glob("sensitivity-*.npz")) == []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    hits = {p["name"]: p["stats"].get("cache_hit") for p in report["passes"]}
    assert hits["collect-routing"] is True and hits["measure-sensitivity"] is False


def test_cli_sweep_writes_table_and_plot(tiny_vlm, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "modec.cli", "-q", "sweep", str(tiny_vlm["model"]),
           "--calib", str(tiny_vlm["calib"]), "--budgets", "2.0:3.0:0.5",
           "--sensitivity-samples", "8", "--eval", str(tiny_vlm["eval"]), "-o", str(out),
           "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["budget"] for row in rows] == [2.0, 2.5, 3.0]
    assert [round(row["average_bits"], 3) for row in rows] == [2.0, 2.5, 3.0]
    sizes = [row["model_bytes"] for row in rows]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # more bits, more bytes
    assert all(0.0 <= row["overall"] <= 1.0 for row in rows)
    assert {p.name for p in out.iterdir()} == {"sweep.json", "sweep.md", "sweep.png"}
    bad = subprocess.run([*cmd[:-1], "--budgets", "4:2:1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--budgets" in bad.stderr
