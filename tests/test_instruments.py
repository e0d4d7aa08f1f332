"""Instruments: the per-pass peak RSS of `PassTimer` (`PeakRSS`, VmHWM or ru_maxrss)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modec.instruments import RU_MAXRSS, VMHWM, PassTimer, PeakRSS

ROOT = Path(__file__).resolve().parents[1]
MB = 10**6

# A fresh interpreter: ru_maxrss (the fallback) is the peak since the process started, so
# only there does a pass's excursion show above what ran before whatever the method.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from dataclasses import dataclass

    import numpy as np
    import onnx_ir as ir

    from modec import pipeline as pl
    from modec.instruments import PassTimer

    @pl.register
    @dataclass
    class Idle(pl.Pass):
        name = "rss-idle"

        def run(self, model, ctx):
            np.ones(1000).sum()
            return pl.PassResult(model, modified=False)

    @pl.register
    @dataclass
    class Alloc(pl.Pass):
        name = "rss-alloc"
        mib: int = 256

        def run(self, model, ctx):
            block = np.ones(self.mib * 2**20 // 8)  # every page written
            ctx.stat("sum", float(block[:: 4096].sum()))
            del block  # numpy's large blocks are mmap'ed: freed back to the kernel here
            return pl.PassResult(model, modified=False)

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.Node("", "Relu", [x], num_outputs=1)
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18}, name="g")
    timer = PassTimer()
    ctx = pl.PassContext(instruments=[timer])
    pipe = pl.Pipeline.parse("rss-idle,rss-alloc,rss-idle")
    _, records = pipe.run(ir.Model(graph, ir_version=10), ctx)
    print(json.dumps({
        "entries": [timer.entry(i) for i in range(len(records))],
        "process_peak": timer.process_peak_bytes,
        "record_fields": [getattr(r, "peak_rss_bytes", None) for r in records],
    }))
    """
)


def _run_pipeline() -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_pass_allocating_256_mib_peaks_that_much_above_the_previous_pass():
    doc = _run_pipeline()
    idle, alloc, after = doc["entries"]
    assert idle["peak_rss_source"] == alloc["peak_rss_source"]
    assert alloc["peak_rss_bytes"] - idle["peak_rss_bytes"] >= 200 * MB, doc
    assert all(e["seconds"] >= 0 for e in doc["entries"])
    assert doc["process_peak"] >= alloc["peak_rss_bytes"]  # survives the reset after it
    if alloc["peak_rss_source"] == VMHWM:
        # The high-water mark was reset before the third pass: the freed block is gone.
        assert after["peak_rss_bytes"] <= alloc["peak_rss_bytes"] - 200 * MB, doc
    else:
        assert after["peak_rss_bytes"] >= alloc["peak_rss_bytes"]  # the process peak
    # Once the runner records the timer's entry in PassRecord, it must be the same kind.
    fields = doc["record_fields"]
    if any(f is not None for f in fields):
        assert fields[1] - fields[0] >= 200 * MB, doc


def test_vmhwm_is_used_where_clear_refs_is_writable():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"/proc/self/clear_refs is not writable here ({exc})")
    import numpy as np

    rss = PeakRSS()
    assert rss.source == VMHWM
    rss.reset()
    base = rss.peak()
    block = np.ones(256 * 2**20 // 8)
    assert rss.peak() - base >= 200 * MB
    del block
    rss.reset()  # the kernel forgets the block (ru_maxrss too); `overall` does not
    assert rss.peak() < base + 200 * MB
    assert rss.overall - base >= 200 * MB


def test_falls_back_to_ru_maxrss_and_says_so(tmp_path):
    # A directory cannot be opened for writing: as when /proc is read-only.
    rss = PeakRSS(clear_refs=str(tmp_path))
    assert rss.source == RU_MAXRSS
    rss.reset()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert rss.peak() >= maxrss > 0
    # A status file without VmHWM (or none at all) falls back too.
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t  1000 kB\n")
    assert PeakRSS(status=str(status)).source == RU_MAXRSS
    assert PeakRSS(status=str(tmp_path / "missing")).source == RU_MAXRSS


def test_timer_entry_holds_seconds_and_peak():
    timer = PassTimer()
    timer.before_pass(None, None)  # type: ignore[arg-type]
    timer.after_pass(None, None, None)  # type: ignore[arg-type]
    entry = timer.entry()
    assert set(entry) == {"seconds", "peak_rss_bytes", "peak_rss_source"}
    assert entry["seconds"] >= 0 and entry["peak_rss_bytes"] > 0
    assert entry["peak_rss_source"] in (VMHWM, RU_MAXRSS)
