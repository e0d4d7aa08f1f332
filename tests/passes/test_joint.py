"""allocate-bits' joint check (``--joint select``, `modec.method.joint`) on the tiny digits-vlm.

The joint KL is checked against an independent computation: the whole model run with
`Executor.run` after every expert's stack is replaced by its RTN-quantized copy, the KL
read with the same positions; with GPTQ, against the model quantize-experts builds; the
cross-fitted KL against the two half runs it pools. The selection is checked against its
own figures: the default (narrowest) range is kept unless another's 95% interval of the
KL difference lies below zero, then the lowest of those; the full range (the paper's
allocation) is always a candidate, and uniform is one whenever the budget is a width.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from modec.executor import Executor
from modec.facts import BitAllocation, Calibration
from modec.method.joint import joint_kl, width_ranges
from modec.method.probes import ProbeSettings, probe_batches
from modec.method.sensitivity import choose_subset, kl_divergence, log_softmax
from modec.numerics.quant import quantize_rtn
from modec.numerics.schemes import QuantScheme

ANALYSIS = "collect-routing,select-key-vision,measure-sensitivity{samples=8,bits=1:2:3:4}"
SELECT = ANALYSIS + ",allocate-bits{bits=1:2:3:4,budget=2.0,joint=select,joint_samples=8}"


def test_width_ranges_are_contiguous_and_start_with_the_full_range() -> None:
    assert width_ranges((4, 2, 3)) == [(2, 3, 4), (2,), (2, 3), (3,), (3, 4), (4,)]
    assert width_ranges((3,)) == [(3,)]


def test_select_range_needs_a_significant_improvement_over_the_narrowest() -> None:
    from modec.method.joint import select_range

    rng = np.random.default_rng(0)
    pos = np.full(200, 2)
    base = rng.exponential(0.1, 200) * pos
    ranges = [(1, 2, 3, 4), (1, 2), (1, 2, 3)]
    # {1,2} is the default; {1,2,3,4} is lower on average but within noise; {1,2,3} is
    # lower on every sample: chosen
    noisy = base + rng.normal(-0.005, 0.2, 200) * pos
    clear = base * 0.5
    default, chosen, iv = select_range(ranges, np.stack([noisy, base, clear]), pos)
    assert default == 1 and chosen == 2
    assert iv[1].estimate == iv[1].low == iv[1].high == 0.0
    assert iv[0].low < 0 < iv[0].high and iv[2].high < 0
    # nothing clearly better: the default stays, even with the lowest mean elsewhere
    default, chosen, _ = select_range(ranges, np.stack([noisy, base, base + 1e-3]), pos)
    assert chosen == default == 1 and noisy.sum() < base.sum()
    # two clearly better: the lower mean wins
    _, chosen, _ = select_range(ranges, np.stack([base * 0.4, base, clear]), pos)
    assert chosen == 0


def test_balanced_weighting_gives_each_kind_of_sample_half_the_weight() -> None:
    """Weighted by positions, the 180 multimodal samples drown the text-only samples'
    damage and a wider range looks significantly better; balanced, the text-only samples
    weigh half and the default stays."""
    from modec.method.joint import sample_weights, select_range

    rng = np.random.default_rng(1)
    mm = np.r_[np.ones(180, bool), np.zeros(20, bool)]
    pos = np.where(mm, 8, 6)
    w = sample_weights(pos, mm, "balanced")
    assert w[mm].sum() == pytest.approx(1.0) and w[~mm].sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(w[mm] / w[mm][0], 1.0)  # by positions within a kind
    np.testing.assert_array_equal(sample_weights(pos, mm, "positions"), pos)
    one_kind = sample_weights(pos, np.ones(200, bool), "balanced")  # by positions
    np.testing.assert_allclose(one_kind / one_kind.sum(), pos / pos.sum())
    with pytest.raises(ValueError, match="weighting"):
        sample_weights(pos, mm, "tokens")  # type: ignore[arg-type]
    base = rng.uniform(0.05, 0.15, 200) * pos
    spread = np.where(mm, base * 0.8, base * 1.6)  # better on images, worse on text
    ranges = [(2, 3, 4), (3,)]
    kl = np.stack([spread, base])
    _, chosen, iv = select_range(ranges, kl, pos)
    assert chosen == 0 and iv[0].high < 0
    _, chosen, iv = select_range(ranges, kl, pos, w)
    assert chosen == 1 and iv[0].estimate > 0
    per = kl / pos
    halves = [0.5 * (per[c][mm] @ pos[mm] / pos[mm].sum() + per[c][~mm] @ pos[~mm]
                     / pos[~mm].sum()) for c in (0, 1)]  # fmt: skip
    assert iv[0].estimate == pytest.approx(halves[0] - halves[1], rel=1e-9)


def _independent_kl(model, subset, settings, widths) -> float:
    ex = Executor(model, intra_op_threads=1)
    qex = Executor(model, intra_op_threads=1)
    for li in range(len(qex.moe)):
        p = qex.params[li]
        kw = {}
        for proj in ("gate", "up", "down"):
            stack = getattr(p, proj)
            if stack is not None:
                kw[proj] = np.stack([  # width 0: the expert left in fp32
                    stack[e] if b == 0 else
                    quantize_rtn(stack[e], QuantScheme(int(b), settings.group_size)).dequantize()
                    for e, b in enumerate(widths[li])
                ])  # fmt: skip
        qex.params._cache[li] = replace(p, **kw)
    out = ex.output_names[0]
    total, n = 0.0, 0
    for b in probe_batches(subset, settings):
        ref = log_softmax(ex.run(b.feeds).outputs[out][b.positions])
        got = qex.run(b.feeds).outputs[out][b.positions]
        total += float(kl_divergence(ref, got).sum())
        n += int(b.positions.sum())
    return total / n


def test_joint_kl_equals_a_full_run_with_every_expert_quantized(analysed) -> None:
    model, ctx = analysed("collect-routing")
    ds = ctx.facts.get(Calibration).data
    subset = ds.subset(choose_subset(ds.multimodal, 8, 0))
    settings = ProbeSettings(bits=(1, 2, 3, 4), group_size=32, positions="answer",
                             batch_size=4, threads=1)  # fmt: skip
    rng = np.random.default_rng(0)
    cands = [[[2, 2, 2, 2], [2, 2, 2, 2]], rng.integers(1, 5, size=(2, 4)).tolist(),
             [[4, 4, 4, 4], [4, 4, 4, 4]]]  # fmt: skip
    got = joint_kl(model, subset, settings, cands)
    want = [_independent_kl(model, subset, settings, c) for c in cands]
    np.testing.assert_allclose(got.overall, want, rtol=1e-5)
    assert got.overall[2] < got.overall[0]  # 4 bits everywhere is closer to fp32 than 2
    assert got.positions > 0 and np.isfinite(got.multimodal).all()
    # overall is the position-weighted mean of the two kinds of samples
    assert got.overall.min() >= min(got.multimodal.min(), got.text_only.min()) - 1e-12


def test_gptq_joint_kl_equals_the_quantize_experts_model(analysed) -> None:
    """With GPTQ the joint runs quantize each expert as quantize-experts does: a candidate's
    KL equals that of the model the pass builds at the same widths."""
    from modec.passes.quantize_experts import QuantizeExpertsPass

    from modec.method.joint import JointQuantizer
    from modec.pipeline import Pipeline

    model, ctx = analysed("collect-routing")
    ds = ctx.facts.get(Calibration).data
    settings = ProbeSettings(bits=(2, 3, 4), group_size=128, positions="answer",
                             batch_size=8, threads=1)  # fmt: skip
    mixed = [[2, 4, 3, 2], [3, 3, 2, 4]]
    got = joint_kl(model, ds, settings, [mixed], JointQuantizer("gptq", ds))
    rtn = joint_kl(model, ds, settings, [mixed])
    qctx = ctx.fork()
    widths = tuple(tuple(w) for w in mixed)
    qctx.facts.put(BitAllocation("fixed", (2, 3, 4), 2.875, 128, widths, 0.0, "fixed", 0.0, False))
    import onnx_ir as ir

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    quantized, _ = Pipeline([QuantizeExpertsPass()], name="q").run(copy, qctx)
    methods = {e["up"]["method"] for layer in qctx.report["quantize-experts"]["layers"]
               for e in layer}  # fmt: skip
    assert "gptq" in methods  # the check below compares GPTQ, not only RTN fallbacks
    ex, qex = Executor(model, intra_op_threads=1), Executor(quantized, intra_op_threads=1)
    out = ex.output_names[0]
    total, n = 0.0, 0
    for b in probe_batches(ds, settings):
        ref = log_softmax(ex.run(b.feeds).outputs[out][b.positions])
        total += float(kl_divergence(ref, qex.run(b.feeds).outputs[out][b.positions]).sum())
        n += int(b.positions.sum())
    np.testing.assert_allclose(got.overall, [total / n], rtol=1e-5)
    assert abs(rtn.overall[0] - got.overall[0]) > 1e-3 * got.overall[0]  # RTN differs


def test_cross_fitting_judges_each_fold_with_the_other_folds_hessians(analysed) -> None:
    """Each calibration sample lands in exactly one fold, the folds split both kinds of
    sample; a fold's KL is the KL of experts GPTQ'd on every other sample, and the pooled
    figures are the position-weighted means of the two runs."""
    from modec.method.joint import JointQuantizer, cross_fitted_kl, folds

    model, ctx = analysed("collect-routing")
    ds = ctx.facts.get(Calibration).data
    f0, f1 = folds(ds, np.arange(len(ds)))
    assert np.intersect1d(f0, f1).size == 0 and np.union1d(f0, f1).size == len(ds)
    for f in (f0, f1):
        assert ds.multimodal[f].any() and (~ds.multimodal[f]).any()
    settings = ProbeSettings(bits=(2, 3, 4), group_size=128, positions="answer",
                             batch_size=8, threads=1)  # fmt: skip
    cands = [[[2, 4, 3, 2], [3, 3, 2, 4]], [[3, 3, 3, 3], [3, 3, 3, 3]]]
    q = JointQuantizer("gptq", ds)
    got = cross_fitted_kl(model, ds, settings, cands, q)
    runs = [joint_kl(model, ds.subset(f), settings, cands,
                     JointQuantizer("gptq", ds.subset(np.setdiff1d(np.arange(len(ds)), f))))
            for f in (f0, f1)]  # fmt: skip
    pos = sum(r.positions for r in runs)
    np.testing.assert_allclose(got.overall, sum(r.overall * r.positions for r in runs) / pos)
    assert got.positions == pos and got.sample_kl.shape == (2, len(ds))
    np.testing.assert_allclose(got.sample_kl.sum(axis=1) / got.sample_positions.sum(), got.overall)
    mm = sum(r.multimodal * r.kind_positions[0] for r in runs) / sum(r.kind_positions[0]
                                                                    for r in runs)  # fmt: skip
    np.testing.assert_allclose(got.multimodal, mm)
    # each sample's kind comes along: the balanced mean is the mean of the two kinds' means
    from modec.method.joint import sample_weights

    assert got.sample_multimodal.sum() == ds.multimodal.sum()
    w = sample_weights(got.sample_positions, got.sample_multimodal, "balanced")
    per = got.sample_kl / got.sample_positions
    np.testing.assert_allclose(per @ w / w.sum(), 0.5 * (got.multimodal + got.text_only))
    # in-sample GPTQ fits the judged samples: their KL differs from the cross-fitted one
    inside = joint_kl(model, ds, settings, cands, q)
    assert not np.allclose(inside.overall, got.overall, rtol=1e-3)
    # a part of the calibration set is named by its indices
    with pytest.raises(ValueError, match="indices"):
        cross_fitted_kl(model, ds.subset(f0), settings, cands, q)
    part = cross_fitted_kl(model, f0, settings, cands, q)
    assert part.sample_kl.shape == (2, f0.size)


@pytest.fixture(scope="module")
def selected(analysed):
    return analysed(SELECT)


def test_select_keeps_the_narrowest_range_unless_another_is_significantly_closer(selected):
    _, ctx = selected
    sec = ctx.report["allocate-bits"]
    joint = sec["joint"]
    rows = joint["candidates"]
    assert rows[0]["widths"] == [1, 2, 3, 4]  # the paper's allocation is always measured
    # budget 2.0 is a width: the default is uniform 2-bit (the range {2}), and every range
    # starting at 2 gives it too, measured once
    default = joint["default"]
    assert rows[default]["widths"] == [2] and rows[default]["histogram"] == {"2": 8}
    uniform = [r for r in rows if r["widths"][0] == 2]
    assert all(r["histogram"] == {"2": 8} and r["kl_vs_default"] == [0.0, 0.0, 0.0]
               for r in uniform)  # fmt: skip
    assert len({r["same_as"] for r in uniform}) == 1
    for r in rows:  # "better": the whole 95% interval of KL − default's KL is below zero
        est, lo, hi = r["kl_vs_default"]
        assert lo <= est <= hi and r["better"] == (hi < 0)
        assert est == pytest.approx(r["kl"] - rows[default]["kl"], rel=1e-9, abs=1e-15)
    better = [i for i, r in enumerate(rows) if r["better"]]
    chosen = joint["chosen"]
    if better:
        assert chosen in better and rows[chosen]["kl"] == min(rows[i]["kl"] for i in better)
    else:
        assert chosen == default
    alloc = ctx.facts.get(BitAllocation)
    assert alloc.average == 2.0
    assert set(w for layer in alloc.widths for w in layer) <= set(rows[chosen]["widths"])
    assert sec["widths"] == [list(w) for w in alloc.widths]
    # ranges that cannot reach 2.0 bits on average are listed, not solved
    assert [3] in joint["infeasible"] and [3, 4] in joint["infeasible"]
    assert joint["samples"] == 8 and joint["quantizer"] == "gptq"


def test_balanced_select_judges_by_the_mean_of_the_two_kinds(analysed) -> None:
    _, ctx = analysed(SELECT.replace("joint=select", "joint=select,joint_weighting=balanced"))
    joint = ctx.report["allocate-bits"]["joint"]
    rows, default = joint["candidates"], joint["default"]
    assert joint["weighting"] == "balanced"

    def half(r):
        return 0.5 * (r["kl_multimodal"] + r["kl_text_only"])

    for r in rows:
        est, lo, hi = r["kl_vs_default"]
        assert lo <= est <= hi and r["better"] == (hi < 0)
        assert est == pytest.approx(half(r) - half(rows[default]), rel=1e-9, abs=1e-15)
    better = [i for i, r in enumerate(rows) if r["better"]]
    want = min(better, key=lambda i: (half(rows[i]), i)) if better else default
    assert joint["chosen"] == want


def test_guard_stands_on_uniform_where_the_budget_is_a_width_else_on_the_full_range() -> None:
    from types import SimpleNamespace

    from modec.method.joint import guard_default, select_range

    def res(widths, budget):
        flat = [w for layer in widths for w in layer]
        return SimpleNamespace(allocation=SimpleNamespace(average=float(np.mean(flat)),
                                                          budget=budget))  # fmt: skip

    # 3.0 over {2,3,4}: the range {3} gives uniform 3-bit
    tried = [((2, 3, 4), res([[2, 4]], 3.0)), ((2,), None), ((3,), res([[3, 3]], 3.0))]
    tried = [t for t in tried if t[1] is not None]
    assert guard_default(tried) == 1
    # 2.5 (sense=le): {2} is feasible but is not the budget's width; the full range stands
    tried = [((2, 3, 4), res([[2, 3]], 2.5)), ((2,), res([[2, 2]], 2.5))]
    assert guard_default(tried) == 0
    rng = np.random.default_rng(2)
    pos = np.full(100, 3)
    base = rng.uniform(0.1, 0.2, 100) * pos
    kl = np.stack([base, base * 0.5])  # the narrow range is clearly closer ...
    assert select_range([(2, 3, 4), (2, 3)], kl, pos)[:2] == (1, 1)
    default, chosen, iv = select_range([(2, 3, 4), (2, 3)], kl, pos, default=0)
    assert (default, chosen) == (0, 1) and iv[1].high < 0  # ... and replaces the standing one
    kl = np.stack([base, base + rng.normal(0, 0.05, 100) * pos])  # within noise: it stays
    assert select_range([(2, 3, 4), (2, 3)], kl, pos, default=0)[:2] == (0, 0)


def test_guard_option_keeps_the_full_range_unless_another_is_significantly_closer(analysed):
    text = ANALYSIS + ",allocate-bits{bits=1:2:3:4,budget=2.5,joint=guard,joint_samples=8}"
    _, ctx = analysed(text)
    joint = ctx.report["allocate-bits"]["joint"]
    rows = joint["candidates"]
    assert joint["rule"] == "guard" and joint["default"] == 0 and rows[0]["widths"] == [1, 2, 3, 4]
    better = [i for i, r in enumerate(rows) if r["better"]]
    want = min(better, key=lambda i: (rows[i]["kl"], i)) if better else 0
    assert joint["chosen"] == want
    for r in rows:
        assert r["kl_vs_default"][0] == pytest.approx(r["kl"] - rows[0]["kl"], rel=1e-9,
                                                      abs=1e-15)  # fmt: skip


def test_select_is_deterministic_and_off_keeps_the_full_range(selected, analysed) -> None:
    _, ctx = selected
    _, again = analysed(SELECT)
    assert again.facts.get(BitAllocation).widths == ctx.facts.get(BitAllocation).widths
    assert again.report["allocate-bits"]["joint"]["candidates"] == \
        ctx.report["allocate-bits"]["joint"]["candidates"]  # fmt: skip
    _, off = analysed(ANALYSIS + ",allocate-bits{bits=1:2:3:4,budget=2.0}")
    full = ctx.report["allocate-bits"]["joint"]["candidates"][0]
    assert "joint" not in off.report["allocate-bits"]
    assert off.report["allocate-bits"]["histogram"] == full["histogram"]
    assert off.report["allocate-bits"]["objective"] == pytest.approx(full["objective"])


def test_select_runs_on_every_calibration_sample_by_default(analysed) -> None:
    """δ's probes use a 32-sample subset; the joint runs take the whole calibration set
    unless ``joint_samples`` says otherwise (the 8 of `SELECT`)."""
    _, ctx = analysed(ANALYSIS + ",allocate-bits{bits=1:2:3:4,budget=3.0,joint=select}")
    joint = ctx.report["allocate-bits"]["joint"]
    assert joint["samples"] == len(ctx.facts.get(Calibration).data) > 8
    assert [r["widths"] for r in joint["candidates"]] == [
        [1, 2, 3, 4], [1, 2, 3], [2, 3], [2, 3, 4], [3], [3, 4]
    ]  # fmt: skip
    assert joint["infeasible"] == [[1], [1, 2], [2], [4]]
    uniform = [r for r in joint["candidates"] if r["widths"][0] == 3]
    assert uniform and all(r["histogram"] == {"3": 8} for r in uniform)


def test_joint_option_is_checked() -> None:
    from modec.passes.allocate_bits import AllocateBitsPass

    from modec.errors import BadInputError

    with pytest.raises(BadInputError, match="--joint must be off, select or guard"):
        AllocateBitsPass(joint="maybe")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="joint_weighting must be positions or balanced"):
        AllocateBitsPass(joint="select", joint_weighting="tokens")  # type: ignore[arg-type]
    for n in (-1, 1):  # one sample cannot be split in two halves
        with pytest.raises(BadInputError, match="joint_samples must be 0"):
            AllocateBitsPass(joint="select", joint_samples=n)


def test_cli_joint_options_reach_the_pass(capsys) -> None:
    from modec.cli import build_parser
    from modec.pipelines import CompileOptions, standard_pipeline

    parser = build_parser()
    args = parser.parse_args(["compile", "m.onnx", "--joint", "select",
                              "--joint-weighting", "balanced"])  # fmt: skip
    assert (args.joint, args.joint_weighting) == ("select", "balanced")
    assert parser.parse_args(["compile", "m.onnx"]).joint_weighting == "positions"
    assert parser.parse_args(["compile", "m.onnx", "--joint", "guard"]).joint == "guard"
    assert "joint=guard" in standard_pipeline(CompileOptions(joint="guard")).text()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["compile", "m.onnx", "--joint-weighting", "tokens"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    text = standard_pipeline(CompileOptions(joint="select", joint_weighting="balanced")).text()
    assert "joint=select" in text and "joint_weighting=balanced" in text
    assert "joint_weighting" not in standard_pipeline(CompileOptions()).text()


CALIBRATED = ANALYSIS + ",allocate-bits{bits=1:2:3:4,budget=2.0,calibrate_costs=true,quantizer=rtn}"


def test_calibrated_scale_is_each_layers_joint_kl_over_its_sum_of_delta(analysed) -> None:
    """``--calibrate-costs`` (rule 8): for every (layer, width) the KL of the model with that
    layer's experts all at the width and every other layer in fp32 (an independent run),
    read on δ's samples at δ's positions, over Σ_e δ(e, b); and the ILP solved with the
    costs scaled by it gives the pass's widths."""
    from modec.facts import KeyVision, RoutingStats, Sensitivity
    from modec.method.allocate import AllocationProblem, layer_shapes, solve_allocation

    model, ctx = analysed(CALIBRATED)
    sens = ctx.facts.get(Sensitivity)
    ds = ctx.facts.get(Calibration).data
    assert sens.subset == tuple(choose_subset(ds.multimodal, 8, 0).tolist())
    entry = ctx.report["allocate-bits"]["calibrated"]
    assert (entry["samples"], entry["positions"], entry["quantizer"]) == (8, "answer", "rtn")
    settings = ProbeSettings(bits=(1, 2, 3, 4), group_size=128, positions=sens.positions,
                             batch_size=32, threads=1)  # fmt: skip
    subset = ds.subset(np.asarray(sens.subset))
    n_layers, n_experts = sens.delta_text.shape[:2]
    additive = (sens.delta_text + sens.delta_vision).sum(axis=1)
    np.testing.assert_allclose(entry["additive"], additive, rtol=1e-12)
    for li in range(n_layers):
        for j, b in enumerate((1, 2, 3, 4)):
            widths = [[b if k == li else 0] * n_experts for k in range(n_layers)]
            want = _independent_kl(model, subset, settings, widths)
            assert entry["joint"][li][j] == pytest.approx(want, rel=1e-5, abs=1e-12)
            assert entry["scale"][li][j] == pytest.approx(want / additive[li, j], rel=1e-5)
    assert np.all(np.asarray(entry["joint"])[:, 0] > np.asarray(entry["joint"])[:, 3])
    problem = AllocationProblem(method="mode", budget=2.0, bits=(1, 2, 3, 4), group_size=128,
                                scope="layer", sense="eq", budget_bytes=0, seed=0)  # fmt: skip
    args = (layer_shapes(model), ctx.facts.get(RoutingStats), ctx.facts.get(KeyVision), sens,
            problem)  # fmt: skip
    got = solve_allocation(*args, scale=np.asarray(entry["scale"])).allocation
    assert got.widths == ctx.facts.get(BitAllocation).widths
    plain = solve_allocation(*args).allocation
    _, off = analysed(ANALYSIS + ",allocate-bits{bits=1:2:3:4,budget=2.0}")
    assert plain.widths == off.facts.get(BitAllocation).widths
    assert "calibrated" not in off.report["allocate-bits"]


def test_cost_scale_prices_widths_per_layer(analysed) -> None:
    """``solve_allocation``'s ``scale``: one factor for every width of a layer leaves its
    widths as they were; a width made dear is given to no expert."""
    from modec.facts import KeyVision, RoutingStats, Sensitivity
    from modec.method.allocate import AllocationProblem, layer_shapes, solve_allocation

    model, ctx = analysed(ANALYSIS)
    problem = AllocationProblem(method="mode", budget=2.0, bits=(1, 2, 3, 4), group_size=128,
                                scope="layer", sense="eq", budget_bytes=0, seed=0)  # fmt: skip
    args = (layer_shapes(model), ctx.facts.get(RoutingStats), ctx.facts.get(KeyVision),
            ctx.facts.get(Sensitivity), problem)  # fmt: skip
    plain = solve_allocation(*args).allocation
    assert 1 in plain.histogram()  # the additive objective spreads the widths here
    same = solve_allocation(*args, scale=np.array([[3.0] * 4, [0.5] * 4])).allocation
    assert same.widths == plain.widths
    dear = np.ones((2, 4))
    dear[:, 0] = 1e6  # 1 bit a million times dearer: only experts it costs nothing keep it
    res = solve_allocation(*args, scale=dear)
    assert res.allocation.histogram().get(1, 0) < plain.histogram()[1]
    for li, layer in enumerate(res.allocation.widths):
        np.testing.assert_allclose(res.costs[li], solve_allocation(*args).costs[li] * dear[li])
        for e, b in enumerate(layer):
            assert b != 1 or res.costs[li][e, 0] == 0.0
    with pytest.raises(ValueError, match="cost scale of shape"):
        solve_allocation(*args, scale=np.ones((2, 3)))


def test_calibrate_costs_option_is_checked_and_reaches_the_pass() -> None:
    from modec.passes.allocate_bits import AllocateBitsPass

    from modec.cli import build_parser
    from modec.errors import BadInputError
    from modec.pipelines import CompileOptions, standard_pipeline

    with pytest.raises(BadInputError, match="--calibrate-costs scales the δ-based costs"):
        AllocateBitsPass(method="mc-moe", calibrate_costs=True)
    AllocateBitsPass(method="uniform", calibrate_costs=True)  # nothing to scale: ignored
    args = build_parser().parse_args(["compile", "m.onnx", "--calibrate-costs"])
    assert (
        args.calibrate_costs
        and not build_parser().parse_args(["compile", "m.onnx"]).calibrate_costs
    )
    assert "calibrate_costs=true" in standard_pipeline(CompileOptions(calibrate_costs=True)).text()
    assert "calibrate_costs" not in standard_pipeline(CompileOptions()).text()
