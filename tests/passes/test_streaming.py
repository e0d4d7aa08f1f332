"""Layer-streamed execution (`modec.streaming`) on the tiny digits-vlm: every batch through a
layer equals the batch-at-a-time executor bit for bit, spilled or not; the Hessians that GPTQ
and the output-error signals now compute one layer at a time are the sums of outer products
over the routed, unpadded tokens; and collect-routing's statistics do not depend on the
memory budget."""

from __future__ import annotations

import numpy as np
import pytest

from modec.data import PAD
from modec.errors import BadInputError
from modec.executor import Executor
from modec.facts import Calibration, RoutingStats
from modec.method.hessians import calibration_batches, layer_hessians
from modec.moe.reference import expert_activation
from modec.streaming import SpillStore, parse_memory, stream


@pytest.fixture(scope="module")
def canonical(analysed):
    return analysed("")


@pytest.mark.parametrize("budget", [2**30, 0], ids=["in-ram", "all-spilled"])
def test_stream_equals_batch_runs(canonical, budget, tmp_path):
    model, ctx = canonical
    ds = ctx.facts.get(Calibration).data
    feeds, _ = calibration_batches(ds, 8)
    ex = Executor(model)
    want = [ex.run(f, record_routing=True) for f in feeds]
    seen = set()
    with SpillStore(budget, tmp_path) as store:
        for ev in stream(Executor(model), feeds, store):
            seen.add((ev.layer, ev.batch))
            np.testing.assert_array_equal(
                ev.routing.experts, want[ev.batch].routing[ev.layer].experts
            )
            np.testing.assert_array_equal(
                ev.routing.weights, want[ev.batch].routing[ev.layer].weights
            )
        out = ex.output_names[0]
        for b, w in enumerate(want):
            np.testing.assert_array_equal(store.get((b, out)), w.outputs[out])
        if budget == 0:
            assert store.spilled > 0 and store.peak_resident == 0
            assert any(tmp_path.iterdir())  # the spill files live under the given directory
    assert not any(tmp_path.iterdir())  # and are gone after close
    assert seen == {(layer, b) for layer in range(len(ex.moe)) for b in range(len(feeds))}


def test_stream_frees_values_after_their_last_use(canonical):
    """Only the values crossing the current stage stay held: far fewer than a full run's."""
    model, ctx = canonical
    ds = ctx.facts.get(Calibration).data
    feeds, _ = calibration_batches(ds, 16)
    ex = Executor(model)
    held = []
    with SpillStore(2**30) as store:
        for ev in stream(ex, feeds, store):
            if ev.last:
                held.append(store.resident)
        outputs = sum(store.get((b, ex.output_names[0])).nbytes for b in range(len(feeds)))
        assert store.resident == outputs + sum(
            np.asarray(f[k]).nbytes for f in feeds for k in f if k in ex.output_names
        )
    assert max(held) < 3 * min(held)  # flat over layers, not growing


def test_layer_hessians_are_sums_of_outer_products(canonical):
    model, ctx = canonical
    ds = ctx.facts.get(Calibration).data
    ex = Executor(model)
    got = {layer: (h, p) for layer, h, p in layer_hessians(
        model, ds, batch_size=16, threads=2, max_memory=0)}  # fmt: skip
    assert sorted(got) == list(range(len(ex.moe)))
    h_in = [np.zeros_like(got[layer][0].h_in) for layer in sorted(got)]
    h_act = [np.zeros_like(got[layer][0].h_act) for layer in sorted(got)]
    n_rows = [np.zeros(p.num_experts, np.int64) for p in ex.params]
    for idx, feeds in ds.batches(5):
        mod = ds.trimmed_modality(idx).ravel()
        res = ex.run(feeds, collect_expert_inputs=True)
        for layer, per_expert in res.expert_inputs.items():
            for e, (tok, rows) in per_expert.items():
                keep = mod[tok] != PAD
                x = rows[keep].astype(np.float64)
                h_in[layer][e] += x.T @ x
                a = expert_activation(ex.params[layer], e, rows[keep]).astype(np.float64)
                h_act[layer][e] += a.T @ a
                n_rows[layer][e] += int(keep.sum())
    for layer, (h, _) in got.items():
        np.testing.assert_array_equal(n_rows[layer], h.tokens)
        np.testing.assert_allclose(h.h_in, h_in[layer], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(h.h_act, h_act[layer], rtol=1e-4, atol=1e-4)
        for e in range(h.h_in.shape[0]):  # symmetric positive semi-definite
            m = h.h_in[e]
            np.testing.assert_allclose(m, m.T)
            assert np.linalg.eigvalsh(m).min() > -1e-6 * max(1.0, np.abs(m).max())


def test_collect_routing_does_not_depend_on_the_memory_budget(analysed):
    _, big = analysed("collect-routing", max_memory=2**30)
    _, small = analysed("collect-routing", max_memory=0)
    a = big.facts.get(RoutingStats).to_arrays()
    b = small.facts.get(RoutingStats).to_arrays()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert small.stats["collect-routing"]["spilled_bytes"] > 0
    assert big.stats["collect-routing"]["spilled_bytes"] == 0


@pytest.mark.parametrize(
    ("text", "want"),
    [("16GiB", 16 * 2**30), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("2g", 2 * 2**30),
     ("1.5GiB", 3 * 2**29), ("4096", 4096)],
)  # fmt: skip
def test_parse_memory(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["", "0", "-1GiB", "lots", "3 parsecs", "GiB"])
def test_parse_memory_refuses(text):
    with pytest.raises(BadInputError, match="max-memory"):
        parse_memory(text)


def test_probe_chunks_do_not_change_delta(analysed):
    """A memory budget that holds one expert's variants at a time gives the same δ."""
    from modec.facts import Sensitivity

    text = "measure-sensitivity{samples=6,batch_size=4}"
    _, whole = analysed(text, max_memory=2**30)
    _, chunked = analysed(text, max_memory=1)
    a, b = whole.facts.get(Sensitivity), chunked.facts.get(Sensitivity)
    np.testing.assert_array_equal(a.delta_text, b.delta_text)
    np.testing.assert_array_equal(a.delta_vision, b.delta_vision)
    layers_w = whole.report["measure-sensitivity"]["layers"]
    layers_c = chunked.report["measure-sensitivity"]["layers"]
    assert all(entry["chunks"] == 1 for entry in layers_w)
    n_exp = a.delta_text.shape[1]
    assert all(entry["chunks"] == n_exp for entry in layers_c)
    assert [e["runs"] for e in layers_w] == [e["runs"] for e in layers_c]
