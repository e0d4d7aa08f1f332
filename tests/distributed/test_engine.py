"""The in-process engine (`modec.distributed.SerialEngine`) and what the passes build on it:
ordered results, the engine's threads in every task, per-worker records, chunking that does
not change δ, GPTQ per expert, per-layer resume from the cache, no Ray in a normal compile.

Nothing here starts Ray (tests/distributed/test_ray.py does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from modec.distributed import (
    ClusterError,
    EngineSpec,
    SerialEngine,
    pinned_threads,
    summarize,
)
from modec.driver import load_inputs
from modec.errors import ModecError, UsageError
from modec.facts import Calibration
from modec.method.probes import ProbeSettings, _chunks, _Layer, expert_work, measure_sensitivity
from modec.method.quantize import quantize_projection
from modec.method.sensitivity import choose_subset
from modec.numerics.gptq import gptq_quantize
from modec.numerics.schemes import QuantScheme
from modec.pipeline import Pipeline
from modec.pipelines import CompileOptions

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "digits-vlm"


def _square(item, offset):
    return item * item + offset


def test_map_keeps_item_order_and_reports_every_item():
    eng = SerialEngine()
    done: list[int] = []
    shared = eng.share(np.arange(3))
    out = eng.map(_square, [3, 1, 2], 10, label="squares", done=done.append)
    assert out == [19, 11, 14] and done == [0, 1, 2]
    assert shared.ref is not None and eng.in_process and eng.parallelism == 1
    (rec,) = eng.take_records()
    assert (rec.label, rec.tasks) == ("squares", 3)
    assert [(w.worker, w.tasks) for w in rec.workers] == [("local", 3)]
    assert eng.take_records() == []  # taken once


def _identity(item, array):
    return array is item


def test_shared_values_are_not_copied_in_process():
    eng = SerialEngine()
    arr = np.zeros(4)
    assert eng.map(_identity, [arr], eng.share(arr), label="same") == [True]


def test_summarize_adds_up_each_worker():
    eng = SerialEngine()
    eng.map(_square, [1, 2], 0, label="a")
    eng.map(_square, [3], 0, label="b")
    doc = summarize(eng.take_records())
    assert [m["label"] for m in doc["maps"]] == ["a", "b"]
    assert [m["tasks"] for m in doc["maps"]] == [2, 1]
    (local,) = doc["per_worker"]
    assert local["worker"] == "local" and local["tasks"] == 3 and local["seconds"] >= 0
    assert summarize([]) == {}


def _threads(item):
    import torch
    from threadpoolctl import threadpool_info

    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return blas, torch.get_num_threads()


@pytest.mark.parametrize("threads", [1, 2])
def test_every_task_runs_with_the_engine_threads_and_they_come_back(threads):
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    other = 3 - threads
    with threadpool_limits(limits=other):
        torch.set_num_threads(other)
        before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        assert before and set(before) == {other}
        ((blas, torch_threads),) = SerialEngine(threads).map(_threads, [0], label="threads")
        assert set(blas) == {threads} and torch_threads == threads
        assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before
        assert torch.get_num_threads() == other
        # An engine without a setting leaves the pools alone.
        ((blas, torch_threads),) = SerialEngine().map(_threads, [0], label="as is")
        assert set(blas) == {other} and torch_threads == other
    torch.set_num_threads(2)


def _fails(item):
    raise UsageError(f"item {item} is bad")


def test_a_task_error_is_raised_as_it_was():
    with pytest.raises(UsageError, match="item 1 is bad"):
        SerialEngine().map(_fails, [1, 2], label="fails")


@pytest.mark.parametrize(
    "spec, match",
    [
        (dict(workers=2, address="auto"), "not both"),
        (dict(workers=-1), "positive"),
    ],
)
def test_engine_spec_refuses_what_cannot_run(spec, match):
    with pytest.raises(UsageError, match=match):
        EngineSpec(**spec)
    assert not EngineSpec().distributed and EngineSpec(workers=2).distributed


def test_an_engine_needs_a_thread():
    with pytest.raises(UsageError, match="at least 1"):
        SerialEngine(threads=0)


def test_cluster_error_exits_like_bad_input():
    assert ClusterError("x").exit_code == 3 and issubclass(ClusterError, ModecError)


# -- what the passes do on it --------------------------------------------------------------


@pytest.fixture(scope="module")
def canonical(tiny_vlm):
    model, ctx = load_inputs(tiny_vlm["model"], tiny_vlm["calib"], CompileOptions())
    model, _ = Pipeline.parse("find-moe,canonicalize-moe").run(model, ctx)
    ds = ctx.facts.get(Calibration).data
    return model, ds.subset(choose_subset(ds.multimodal, 6, 0))


SETTINGS = ProbeSettings(bits=(2, 4), group_size=128, positions="answer", batch_size=4)


def test_probe_chunking_does_not_change_delta(canonical):
    """Four experts dealt to 3 chunks (what 3 workers get) or all four in one: the same bytes."""
    model, subset = canonical
    one, layers_one, _ = measure_sensitivity(model, subset, SETTINGS)
    many, layers_many, _ = measure_sensitivity(model, subset, replace(SETTINGS, workers=3))
    assert [r["chunks"] for r in layers_one] == [1, 1]
    assert [r["chunks"] for r in layers_many] == [3, 3]
    assert (one.delta_text > 0).any()
    for a, b in ((one.delta_text, many.delta_text), (one.delta_vision, many.delta_vision)):
        assert a.tobytes() == b.tobytes()


def _layer_job(n_exp: int, rng: np.random.Generator) -> _Layer:
    """A layer's probe job with skewed routing: a long multimodal batch and a short text-only
    one, the low experts routed far more often than the high ones."""
    from types import SimpleNamespace

    from modec.data import TEXT, VISION

    mm = np.full((2, 200), VISION, np.int8)
    mm[:, :12] = TEXT
    mods = [mm, np.full((2, 24), TEXT, np.int8)]
    p = 1.0 / np.arange(1, n_exp + 1) ** 2
    routed = [rng.choice(n_exp, (m.size, 2), p=p / p.sum()) for m in mods]
    caches = [SimpleNamespace(values={"h": np.zeros((m.size, 8), np.float32)}) for m in mods]
    return _Layer(0, caches, routed, mods, [np.zeros(0)] * 2, [np.zeros(0)] * 2, "logits",
                  (2, 3, 4), 128)  # fmt: skip


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_probe_chunks_are_one_per_worker_and_balanced(workers):
    """Every expert in exactly one chunk, one chunk per worker, and the estimated work
    dealt evenly: no chunk holds more than the mean plus the largest expert's work."""
    job = _layer_job(16, np.random.default_rng(workers))
    work = expert_work(job, 16)
    assert work.max() > 2 * work.min()  # the routing is skewed, or the test shows nothing
    chunks = _chunks(job, 16, replace(SETTINGS, workers=workers))
    assert len(chunks) == workers
    assert sorted(e for c in chunks for e in c) == list(range(16))
    assert all(c == sorted(c) for c in chunks) and chunks == sorted(chunks, key=lambda c: c[0])
    loads = [work[c].sum() for c in chunks]
    assert max(loads) <= work.sum() / workers + work.max()
    # Consecutive experts instead (what the in-process chunking does) are far less even.
    even = [work[i : i + 16 // workers].sum() for i in range(0, 16, 16 // workers)]
    assert max(loads) < max(even)


def test_probe_chunks_in_process_and_under_a_memory_budget():
    """In process: consecutive experts, as many as the memory holds. With workers and too
    little memory for a worker's share: more chunks, a multiple of the workers."""
    job = _layer_job(16, np.random.default_rng(0))
    assert _chunks(job, 16, SETTINGS) == [list(range(16))]
    assert _chunks(job, 16, replace(SETTINGS, max_memory=1)) == [[e] for e in range(16)]
    per_expert = 2 * len(job.bits) * sum(np.asarray(c.values["h"]).nbytes for c in job.caches)
    chunks = _chunks(job, 16, replace(SETTINGS, workers=2, max_memory=per_expert * 2 * 3))
    assert len(chunks) == 6 and max(len(c) for c in chunks) <= 3  # 3 experts fit a chunk
    assert sorted(e for c in chunks for e in c) == list(range(16))


def test_gptq_on_the_engine_equals_gptq_per_expert():
    """quantize_projection's tasks give what `gptq_quantize` gives for each expert with the
    engine's threads, fallbacks included, in expert order."""
    rng = np.random.default_rng(0)
    e, n, k = 4, 16, 256
    w = rng.standard_normal((e, n, k)).astype(np.float32)
    x = rng.standard_normal((e, 64, k))
    h = np.einsum("etk,etl->ekl", x, x)
    tokens = np.array([64, 64, 8, 64])  # expert 2: below min_tokens, RTN
    widths = (2, 3, 4, 3)
    ticks: list[int] = []
    eng = SerialEngine(threads=1)
    res = quantize_projection(w, widths, 128, method="gptq", hessians=h, tokens=tokens,
                              label="layer 0 up", tick=lambda: ticks.append(1),
                              engine=eng)  # fmt: skip
    assert len(ticks) == e and eng.take_records()[0].tasks == e
    for i in range(e):
        with pinned_threads(1):
            want = gptq_quantize(w[i], h[i], QuantScheme(widths[i], 128), n_tokens=int(tokens[i]))
        assert res.codes[i].q.tobytes() == want.qweight.q.tobytes()
        assert res.codes[i].scale.tobytes() == want.qweight.scale.tobytes()
        assert res.dequantized[i].tobytes() == want.dequantized.tobytes()
        assert res.entries[i]["method"] == want.method
    assert [r["method"] for r in res.entries] == ["gptq", "gptq", "rtn", "gptq"]


class _FailOnLayer(SerialEngine):
    """Stops the run (as a lost cluster would) when asked for the probes of one layer."""

    def __init__(self, label):
        super().__init__()
        self.label = label

    def map(self, fn, items, *args, label, **kw):
        if label == self.label:
            raise ClusterError(f"{label}: the cluster went away")
        return super().map(fn, items, *args, label=label, **kw)


def test_a_stopped_run_resumes_at_the_first_unfinished_layer(tiny_vlm, tmp_path):
    def run(engine, cache_dir):
        model, ctx = load_inputs(tiny_vlm["model"], tiny_vlm["calib"], CompileOptions())
        ctx.options = replace(ctx.options, cache_dir=cache_dir)
        ctx.engine = engine
        text = "find-moe,canonicalize-moe,find-attention,measure-sensitivity{samples=4}"
        Pipeline.parse(text).run(model, ctx)
        return ctx.report["measure-sensitivity"]

    cache = str(tmp_path / "cache")
    with pytest.raises(ClusterError, match="probes layer 1"):
        run(_FailOnLayer("probes layer 1"), cache)
    parts = sorted(p.name for p in (tmp_path / "cache").glob("sensitivity-*.layer*.npz"))
    assert len(parts) == 1 and parts[0].endswith(".layer0.npz")  # layer 0 was finished
    resumed = run(SerialEngine(), cache)
    assert [r["resumed"] for r in resumed["layers"]] == [True, False]
    assert resumed["cache_hit"] is False
    fresh = run(SerialEngine(), None)
    assert resumed["delta_text"] == fresh["delta_text"]
    assert resumed["delta_vision"] == fresh["delta_vision"]
    # The whole entry is stored now, its pieces removed; the next run is a plain hit.
    assert not list((tmp_path / "cache").glob("sensitivity-*.layer*.npz"))
    assert run(SerialEngine(), cache)["cache_hit"] is True


def test_a_normal_compile_does_not_import_ray(tmp_path):
    """Without --workers or --ray-address modec never imports Ray (in a fresh process)."""
    script = (
        "import sys; from modec.cli import main; "
        f"code = main(['-q', 'compile', {str(BUNDLED / 'model.onnx')!r}, '--calib', "
        f"{str(BUNDLED / 'calib.npz')!r}, '--target', 'none', '--sensitivity-samples', '2', "
        f"'--quantizer', 'rtn', '--no-cache', '-o', {str(tmp_path / 'out')!r}]); "
        "print(code, 'ray' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["0", "False"], proc.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["engine"]["kind"] == "serial"
    passes = {p["name"]: p for p in report["passes"]}
    assert passes["measure-sensitivity"]["workers"]["per_worker"][0]["worker"] == "local"
    assert passes["find-moe"]["workers"] == {}
