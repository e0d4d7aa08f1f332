"""modec on Ray (`modec.distributed.RayEngine`): the same bytes as the in-process run, a
killed worker retried, GPTQ's tasks, clean shutdown, and a one-line error for a cluster that
is not there.

The compiles use the bundled digits-vlm with ``--sensitivity-samples 4 --target none
--threads 1``: the probes (4 layers × 16 experts), GPTQ (4 layers × 16 experts × 3
projections) and the 4 ILP solves run on Ray, without the TVM build; with one thread per
task two tasks run at once on the 2 CPUs (``--threads 2``, the default, gives the same bytes
as a serial ``--threads 2`` run: tools/bench_ray.py checks it). GPTQ on Ray is also checked
on its own below. Where Ray is not installed or cannot start a local runtime the tests skip
and say why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'modec[distributed]'")

from modec.distributed import ClusterError, EngineSpec, RayEngine, SerialEngine  # noqa: E402
from modec.driver import compile_model  # noqa: E402
from modec.method.quantize import quantize_projection  # noqa: E402
from modec.pipelines import CompileOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "digits-vlm"
ARGS = ["--target", "none", "--sensitivity-samples", "4", "--no-cache", "--threads", "1"]
#: What a ``--target none`` compile writes besides the report (which holds timings).
ARTIFACT = {"allocation.json", "experts.safetensors", "model.sim.onnx"}
TIMED = {"report.json", "report.html"}


def _compile_cli(
    out: Path, *extra: str, tmpdir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "modec.cli", "-q", "compile", str(BUNDLED / "model.onnx"),
           "--calib", str(BUNDLED / "calib.npz"), *ARGS, "-o", str(out), *extra]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir else None
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out.parent,
                          env=env)  # fmt: skip


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in TIMED}


def _processes_under(root: Path) -> set[int]:
    """Processes whose command line names a path under ``root`` (a Ray runtime's session
    directory is on the command lines of its GCS, raylet and workers)."""
    pids = set()
    key = str(root).encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if key in cmd:
                pids.add(int(d.name))
    return pids


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict[str, bytes]:
    """The in-process compile (no flag: no Ray), the reference of every test here."""
    out = tmp_path_factory.mktemp("serial") / "out"
    proc = _compile_cli(out)
    assert proc.returncode == 0, proc.stderr
    files = _files(out)
    assert set(files) >= ARTIFACT
    return files


@pytest.fixture(scope="module")
def engine():
    """A local Ray runtime of 2 CPUs in this process, shut down after the module."""
    try:
        eng = RayEngine(workers=2, threads=1)
    except ClusterError as exc:
        pytest.skip(f"Ray cannot start a local runtime here: {exc}")
    yield eng
    eng.close()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_two_workers_write_the_same_bytes_and_shut_down(serial, tmp_path):
    out = tmp_path / "out"
    # The compile's temp dir: short (Ray's socket paths must stay under 107 bytes) and its
    # own, so that what is left in it is this compile's (other sessions may run Ray too).
    tmpdir = Path(tempfile.mkdtemp(prefix="mdc", dir="/tmp"))
    try:
        proc = _compile_cli(out, "--workers", "2", tmpdir=tmpdir)
        _check_two_workers(proc, out, tmpdir, serial)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _check_two_workers(proc, out, tmpdir, serial):
    if proc.returncode != 0 and "could not start a local Ray runtime" in proc.stderr:
        pytest.skip(f"Ray cannot start a local runtime here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert _files(out) == serial
    report = json.loads((out / "report.json").read_text())
    engine = report["engine"]
    assert (engine["kind"], engine["parallelism"], engine["threads_per_task"]) == ("ray", 2, 1)
    passes = {p["name"]: p for p in report["passes"]}
    probes = passes["measure-sensitivity"]["workers"]
    assert [m["label"] for m in probes["maps"]] == [f"probes layer {i}" for i in range(4)]
    # 16 experts in one chunk per worker and layer: the workers between them ran all 8 tasks.
    assert sum(w["tasks"] for w in probes["per_worker"]) == 8
    assert all(w["worker"] != "local" and w["seconds"] > 0 for w in probes["per_worker"])
    assert passes["allocate-bits"]["workers"]["maps"][0]["tasks"] == 4  # one ILP per layer
    gptq = passes["quantize-experts"]["workers"]
    assert [(m["label"], m["tasks"]) for m in gptq["maps"]] == [
        (f"GPTQ layer {i} {p}", 16) for i in range(4) for p in ("gate", "up", "down")
    ]
    assert all(w["worker"] != "local" for w in gptq["per_worker"])
    # The local runtime is gone with the compile, its temporary directory too.
    for _ in range(20):
        if not _processes_under(tmpdir):
            break
        time.sleep(0.5)
    assert not _processes_under(tmpdir)
    assert not list(tmpdir.glob("modec-ray-*"))


def _kill_first_attempt(fn, marker: str):
    """``fn``, except that the first call (over all workers) kills its own worker process.

    A closure: cloudpickle sends it by value, so the workers need not import this file.
    """

    def run(item, *args):
        if not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(item, *args)

    return run


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_bytes_do_not_change(
    serial, engine, tmp_path, monkeypatch
):
    marker = tmp_path / "killed"
    plain = engine.map

    def map_(fn, items, *args, label, **kw):
        if label == "probes layer 1":
            fn = _kill_first_attempt(fn, str(marker))
        return plain(fn, items, *args, label=label, **kw)

    monkeypatch.setattr(engine, "map", map_)
    out = tmp_path / "out"
    opts = CompileOptions(sensitivity_samples=4, target="none", cache_dir=None, threads=1)
    compile_model(BUNDLED / "model.onnx", BUNDLED / "calib.npz", out, opts, engine=engine)
    assert marker.exists(), "no worker was killed: the test proved nothing"
    assert _files(out) == serial


@pytest.mark.slow
def test_gptq_tasks_on_ray_equal_in_process(engine, caplog):
    rng = np.random.default_rng(1)
    e, n, k = 5, 32, 256
    w = rng.standard_normal((e, n, k)).astype(np.float32)
    x = rng.standard_normal((e, 80, k))
    h = np.einsum("etk,etl->ekl", x, x)
    tokens = np.array([80, 80, 80, 5, 80])  # expert 3 falls back to RTN, with a warning
    widths = (2, 3, 4, 2, 3)
    here = quantize_projection(w, widths, 128, method="gptq", hessians=h, tokens=tokens,
                               label="layer 0 down", engine=SerialEngine(threads=1))  # fmt: skip
    caplog.clear()
    ticks: list[int] = []
    there = quantize_projection(w, widths, 128, method="gptq", hessians=h, tokens=tokens,
                                label="layer 0 down", engine=engine,
                                tick=lambda: ticks.append(1))  # fmt: skip
    assert len(ticks) == e
    assert there.dequantized.tobytes() == here.dequantized.tobytes()
    for a, b in zip(here.codes, there.codes, strict=True):
        assert a.q.tobytes() == b.q.tobytes() and a.scale.tobytes() == b.scale.tobytes()
    assert there.entries == here.entries  # losses too: one thread on both sides
    # The worker's fallback warning is logged here, on the driver.
    assert any("layer 0 down expert 3" in r.getMessage() for r in caplog.records)
    (rec,) = [r for r in engine.take_records() if r.label == "GPTQ layer 0 down"]
    assert rec.tasks == e and sum(w.tasks for w in rec.workers) == e


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_cluster_is_a_one_line_error(tmp_path):
    out = tmp_path / "out"
    port = _closed_port()
    proc = _compile_cli(out, "--ray-address", f"127.0.0.1:{port}")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modec: error: cannot reach the Ray cluster")
    assert not out.exists()


def test_workers_and_address_together_are_a_usage_error(tmp_path):
    proc = _compile_cli(tmp_path / "out", "--workers", "2", "--ray-address", "auto")
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_a_task_cannot_have_more_threads_than_the_runtime_cpus(tmp_path):
    proc = _compile_cli(tmp_path / "out", "--workers", "1", "--threads", "2")
    assert proc.returncode == 2 and "give --workers at least 2" in proc.stderr


def test_engine_spec_opens_nothing_without_flags():
    assert not EngineSpec().distributed
