"""quantize-experts on the tiny digits-vlm: GPTQ where the calibration feeds it, the codes the
graph now holds, and the fallback to round-to-nearest where it does not."""

from __future__ import annotations

import numpy as np
import pytest

from modec.executor import Executor
from modec.facts import BitAllocation, Calibration, QuantizedExperts, RoutingStats
from modec.method.hessians import layer_hessians

PREFIX = "collect-routing,select-key-vision,measure-sensitivity{samples=4},allocate-bits"
PROJS = ("gate", "up", "down")


def _dequantize(q, scale, zero, group):
    """(q − z)·s in float32, one fp16 scale and uint8 zero per row and group of K."""
    k = q.shape[-1]
    cols = np.arange(k) // group
    s = scale.astype(np.float32)[..., cols]
    z = zero.astype(np.float32)[..., cols]
    return (q.astype(np.float32) - z) * s


@pytest.fixture(scope="module")
def quantized(analysed):
    return analysed(PREFIX + ",quantize-experts")


def test_well_fed_experts_get_gptq(quantized):
    _, ctx = quantized
    stats = ctx.facts.get(RoutingStats)
    layers = ctx.report["quantize-experts"]["layers"]
    fed = 0
    for layer, rows in enumerate(layers):
        for e, row in enumerate(rows):
            assert row["expert"] == e and row["tokens"] == int(stats.tokens[layer][e])
            if stats.tokens[layer][e] >= 32:  # the pass's default min_tokens
                fed += 1
                for proj in PROJS:
                    assert row[proj]["method"] == "gptq", (layer, e, proj, row[proj])
                    assert row[proj]["reason"] is None
    assert fed >= 6  # most experts of the tiny model see enough tokens
    assert ctx.report["quantize-experts"]["fallbacks"] == 0


def test_starved_experts_fall_back_to_rtn(analysed, quantized):
    _, ctx = analysed(PREFIX + ",quantize-experts{min_tokens=100}")
    stats = ctx.facts.get(RoutingStats)
    layers = ctx.report["quantize-experts"]["layers"]
    starved = [(lay, e) for lay in range(2) for e in range(4) if stats.tokens[lay][e] < 100]
    assert starved, "the tiny model has experts below 100 tokens"
    for layer, rows in enumerate(layers):
        for e, row in enumerate(rows):
            want = "rtn" if (layer, e) in starved else "gptq"
            assert {row[p]["method"] for p in PROJS} == {want}, (layer, e)
            if want == "rtn":
                assert "min_tokens=100" in row["down"]["reason"]
    assert ctx.report["quantize-experts"]["fallbacks"] == len(starved)


def test_graph_holds_the_dequantized_codes(quantized):
    """The simulated-quantization graph is exactly (q − z)·s of the codes, at each width."""
    model, ctx = quantized
    q = ctx.facts.get(QuantizedExperts)
    alloc = ctx.facts.get(BitAllocation)
    assert q.widths == alloc.widths and q.group_size == 128
    params = Executor(model).params
    for layer, p in enumerate(params):
        for proj in PROJS:
            stacked = getattr(p, proj)
            for e, width in enumerate(alloc.widths[layer]):
                qw = q.layers[layer][proj][e]
                assert qw.scheme.bits == width
                assert qw.q.dtype == np.uint8 and int(qw.q.max()) < 2**width
                assert qw.scale.dtype == np.float16 and qw.zero.dtype == np.uint8
                want = _dequantize(qw.q, qw.scale, qw.zero, 128)
                np.testing.assert_array_equal(stacked[e], want, err_msg=f"{layer} {proj} {e}")


def test_gptq_beats_rtn_on_the_calibration_inputs(analysed, quantized):
    """GPTQ's point: a smaller output error tr(ΔW H ΔWᵀ) than RTN at the same widths."""
    model_g, ctx = quantized
    model_r, _ = analysed(PREFIX + ",quantize-experts{method=rtn}")
    model0 = analysed("")[0]
    ds = ctx.facts.get(Calibration).data
    hs = [h for _, h, _ in layer_hessians(model0, ds, batch_size=16, threads=2, max_memory=2**30)]
    fp32 = Executor(model0).params
    err = {"gptq": 0.0, "rtn": 0.0}
    for name, model in (("gptq", model_g), ("rtn", model_r)):
        for layer, (p, p0) in enumerate(zip(Executor(model).params, fp32, strict=True)):
            for proj in PROJS:
                h = hs[layer].h_act if proj == "down" else hs[layer].h_in
                dw = (getattr(p, proj) - getattr(p0, proj)).astype(np.float64)
                err[name] += float(np.einsum("enk,ekl,enl->", dw, h, dw))
    assert err["gptq"] < err["rtn"]


def test_codes_are_mapped_from_unlinked_files(quantized, tmp_path):
    """Every layer's codes live in a memory map (not the heap) whose file is already gone."""
    from modec.method.quantize import spill_codes

    _, ctx = quantized
    q = ctx.facts.get(QuantizedExperts)
    for per_proj in q.layers:
        for codes in per_proj.values():
            assert all(isinstance(c.q, np.memmap) for c in codes)
    codes = q.layers[0]["up"]
    again = spill_codes(codes, str(tmp_path))
    assert not any(tmp_path.iterdir())  # unlinked once mapped
    for a, b in zip(codes, again, strict=True):
        np.testing.assert_array_equal(a.q, b.q)
        assert a.scale is b.scale and a.zero is b.zero and a.scheme == b.scheme
