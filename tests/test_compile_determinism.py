"""Two ``modec compile`` runs in fresh processes write the same bytes; so does a warm cache.

Each run is ``python -m modec.cli -q compile`` of the tiny digits-vlm for ``llvm`` in its own
process (its own hash seeds, thread pools, TVM build), the first two with separate EMPTY
cache directories and side by side, the third after them with the first run's (now warm)
cache. Every file of the output must be byte-identical across the three, except
``report.json`` and ``report.html``, which hold timings.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Files that record timings and so differ between runs by design (docs/report.md).
TIMED = {"report.json", "report.html"}
#: What an llvm compile writes besides the report (docs/artifact.md, `modec.driver`).
EXPECTED = {"model.so", "weights.safetensors", "manifest.json", "experts.safetensors",
            "allocation.json", "model.sim.onnx"}  # fmt: skip


def _command(tiny_vlm, out, cache):
    return [
        sys.executable, "-m", "modec.cli", "-q", "compile", str(tiny_vlm["model"]),
        "--calib", str(tiny_vlm["calib"]), "--target", "llvm", "--sensitivity-samples", "4",
        "--cache-dir", str(cache), "-o", str(out),
    ]  # fmt: skip


def _finish(proc, out):
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{out}: exit {proc.returncode}\n{stderr}"
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _cache_hits(out):
    sections = json.loads((out / "report.json").read_text())["sections"]
    return sections["collect-routing"]["cache_hit"], sections["measure-sensitivity"]["cache_hit"]


@pytest.mark.slow
def test_compiles_in_fresh_processes_are_byte_identical(tiny_vlm, tmp_path):
    runs = [(tmp_path / f"out{i}", tmp_path / f"cache{i}") for i in range(3)]
    for _, cache in runs[:2]:
        cache.mkdir()
    # The two cold runs side by side (2 cores: half the wall time, and the builds contend).
    cold = [subprocess.Popen(_command(tiny_vlm, out, cache), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
            for out, cache in runs[:2]]  # fmt: skip
    files = [_finish(proc, out) for proc, (out, _) in zip(cold, runs[:2], strict=True)]
    assert sorted(p.name for p in runs[0][1].iterdir()) == sorted(
        p.name for p in runs[1][1].iterdir()
    )
    warm = subprocess.Popen(_command(tiny_vlm, runs[2][0], runs[0][1]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # fmt: skip
    files.append(_finish(warm, runs[2][0]))
    assert [_cache_hits(out) for out, _ in runs] == [(False, False), (False, False), (True, True)]
    names = set(files[0])
    assert names >= EXPECTED | TIMED
    for i, other in enumerate(files[1:], start=1):
        assert set(other) == names, f"run {i} wrote other files"
        differ = sorted(n for n in names - TIMED if files[0][n] != other[n])
        assert not differ, f"run {i} ({'warm' if i == 2 else 'cold'} cache) differs in {differ}"


@pytest.mark.slow  # ~1 min on two cores: two compiles side by side
def test_hf_family_compiles_in_fresh_processes_are_byte_identical(tmp_path):
    """The tiny Qwen3-MoE family: a KV cache (kernels over ``past + new_`` shapes, whose
    scalar parameters TVM orders by object address; `modec.lowering.determinism`) and, on a
    CPU with AVX-512 VNNI and VBMI, the int8 dense and expert kernels (elsewhere modec
    refuses those flags, so the runs compile the float-input kernels)."""
    from modec.kernels import grouped_moe_a8
    from tests.test_hf import SENTENCES, modec, write_jsonl
    from tests.test_hf_families import _build_dir

    d = _build_dir("qwen3moe", tmp_path / "qwen3moe")
    calib = tmp_path / "calib.npz"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", SENTENCES)
    r = modec("calib", "build", "--model", str(d), "--prompts", str(prompts), "-o", str(calib))
    assert r.returncode == 0, r.stderr
    runs = [(tmp_path / f"out{i}", tmp_path / f"cache{i}") for i in range(2)]
    vnni = grouped_moe_a8.supports("llvm")  # the int8 kernels' instructions
    int8 = ["--expert-act-bits", "8", "--dense-act-bits", "8"] if vnni else []
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "modec.cli", "-q", "compile", str(d), "--calib", str(calib),
             "--target", "llvm", "--method", "uniform", "--quantizer", "rtn", "--dense-bits",
             "4", *int8, "--cache-dir", str(cache), "-o", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        for out, cache in runs
    ]  # fmt: skip
    files = [_finish(proc, out) for proc, (out, _) in zip(procs, runs, strict=True)]
    assert set(files[0]) == set(files[1]) >= {"model.so", "manifest.json"} | TIMED
    differ = sorted(n for n in set(files[0]) - TIMED if files[0][n] != files[1][n])
    assert not differ, f"the second process's build differs in {differ}"
