"""The O(L) Fisher estimate of δ (`modec.method.estimate`) against the exact probes.

On the tiny random-weight digits-vlm (2 layers × 4 experts): with every vocabulary direction
and a small perturbation (8-bit experts) the second-order estimate must equal the exact KL;
at the paper's widths it must rank the experts as the exact probes do. Plus determinism,
the cache key, the report, the fallback of ``auto`` and the CLI option.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import modec.method.estimate as est
from modec.driver import load_inputs
from modec.facts import Calibration, Sensitivity
from modec.method.probes import ProbeSettings, measure_sensitivity
from modec.method.sensitivity import choose_subset, log_softmax
from modec.pipeline import Pipeline
from modec.pipelines import CompileOptions, standard_pipeline
from tools.bench_estimator import spearman

PREFIX = "find-moe,canonicalize-moe,find-attention"


@pytest.fixture(scope="module")
def prepared(tiny_vlm):
    """The tiny model after the structural passes, and an 8-sample sensitivity subset."""
    model, ctx = load_inputs(tiny_vlm["model"], tiny_vlm["calib"], CompileOptions(threads=1))
    model, _ = Pipeline.parse(PREFIX).run(model, ctx)
    ds = ctx.facts.get(Calibration).data
    subset = ds.subset(choose_subset(ds.multimodal, 8, 0))
    assert 0 < subset.multimodal.sum() < len(subset)
    return model, subset, tiny_vlm


def _settings(bits, positions="answer"):
    return ProbeSettings(
        bits=bits, group_size=32, positions=positions, batch_size=4, workers=1, threads=1
    )


def _pairs(exact: Sensitivity, got: Sensitivity):
    for name in ("text", "vision"):
        a, b = getattr(exact, f"delta_{name}"), getattr(got, f"delta_{name}")
        for layer in range(a.shape[0]):
            yield name, layer, a[layer], b[layer]


def _coarse_fisher(p: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Fisher matrix, in the logits' coordinates, of the distribution over {kept, rest}:
    Aᵀ diag(p_c) A with rows d log q_c / dz, written out from the definition."""
    vocab = p.size
    rest = np.setdiff1d(np.arange(vocab), kept)
    rows, probs = [], []
    for i in kept:
        e = np.zeros(vocab)
        e[i] = 1.0
        rows.append(e - p)
        probs.append(p[i])
    if rest.size:
        u = np.zeros(vocab)
        u[rest] = p[rest] / p[rest].sum()
        rows.append(u - p)
        probs.append(p[rest].sum())
    a = np.array(rows)
    return a.T @ np.diag(probs) @ a


@pytest.mark.parametrize("tokens", [3, 7, 50])
def test_directions_factor_the_coarse_grained_fisher(tokens):
    rng = np.random.default_rng(tokens)
    logits = rng.normal(size=(5, 9)) * 2.0
    logp = log_softmax(logits)
    dirs = est.fisher_directions(logp, tokens).astype(np.float64)
    assert dirs.shape == (min(tokens, 9), 5, 9)
    for row in range(5):
        p = np.exp(logp[row])
        got = np.einsum("ki,kj->ij", dirs[:, row], dirs[:, row])
        kept = np.argsort(-p, kind="stable")[: tokens - 1 if tokens < 9 else 9]
        np.testing.assert_allclose(got, _coarse_fisher(p, kept), atol=1e-6)
        full = np.diag(p) - np.outer(p, p)
        # A lower bound of the full Fisher matrix, equal to it with every token kept.
        assert np.linalg.eigvalsh(full - got).min() > -1e-6
        if tokens >= 9:
            np.testing.assert_allclose(got, full, atol=1e-6)


def test_small_perturbation_estimate_equals_the_exact_kl(prepared, monkeypatch):
    """Every vocabulary direction + 8-bit experts: ½ ΔᵀGΔ is the KL to second order, so the
    estimate must match the exact probes closely. This checks the whole backward pass
    (torch stages, MoE vector-Jacobian products, per-sample sums) against onnxruntime."""
    model, subset, _ = prepared
    monkeypatch.setattr(est, "FISHER_TOKENS", 10_000)
    s = _settings((8,))
    exact = measure_sensitivity(model, subset, s)[0]
    got = est.estimate_sensitivity(model, subset, s)[0]
    for name, layer, a, b in _pairs(exact, got):
        assert (b >= 0).all()
        assert ((a == 0) == (b == 0)).all(), (name, layer)
        np.testing.assert_allclose(b, a, rtol=0.02, err_msg=f"{name} layer {layer}")
    np.testing.assert_array_equal(got.unused_text, exact.unused_text)
    np.testing.assert_array_equal(got.unused_vision, exact.unused_vision)


def test_paper_widths_rank_experts_as_the_exact_probes(prepared):
    """Default directions, 2/3/4 bits. Measured on this model: ρ 0.94–0.98 (floor 0.85)."""
    model, subset, _ = prepared
    s = _settings((2, 3, 4))
    exact = measure_sensitivity(model, subset, s)[0]
    got = est.estimate_sensitivity(model, subset, s)[0]
    rhos = []
    for name, layer, a, b in _pairs(exact, got):
        rho = spearman(a, b)
        if rho is None:  # δ_vision of the last layer: 0 at the answer position, in both
            assert (a == 0).all() and (b == 0).all(), (name, layer)
            continue
        rhos.append(rho)
        assert rho >= 0.85, (name, layer, rho)
    assert len(rhos) == 3
    # Coarser widths: larger estimates, summed over a layer's experts.
    assert (got.delta_text.sum(1)[:, 0] > got.delta_text.sum(1)[:, 2]).all()


def test_estimate_is_deterministic(prepared):
    model, subset, _ = prepared
    s = _settings((2, 4), positions="text")  # text positions: the signs come from the seed
    first = est.estimate_sensitivity(model, subset, s, seed=3)[0].to_arrays()
    second = est.estimate_sensitivity(model, subset, s, seed=3)[0].to_arrays()
    for key in first:
        assert first[key].tobytes() == second[key].tobytes(), key


def _run_pass(prepared, opts, **run_options):
    _, _, tiny = prepared
    model, ctx = load_inputs(tiny["model"], tiny["calib"], CompileOptions(threads=1))
    ctx.options = replace(ctx.options, **run_options)
    Pipeline.parse(f"{PREFIX},measure-sensitivity{{samples=4,batch_size=4,{opts}}}").run(model, ctx)
    return ctx.report["measure-sensitivity"], ctx.facts.get(Sensitivity)


def test_mode_is_reported_and_keys_the_cache(prepared, tmp_path):
    cache = str(tmp_path)
    exact, s_exact = _run_pass(prepared, "sensitivity=exact", cache_dir=cache)
    fisher, s_fisher = _run_pass(prepared, "sensitivity=fisher", cache_dir=cache)
    assert (exact["sensitivity"], fisher["sensitivity"]) == ("exact", "fisher")
    assert fisher["cache_hit"] is False and exact["cache_key"] != fisher["cache_key"]
    assert not np.array_equal(s_exact.delta_text, s_fisher.delta_text)
    assert len(list(tmp_path.glob("sensitivity-*.npz"))) == 2
    # auto picks exact for a model this small, under exact's cache key (unchanged by the
    # option): a hit.
    auto, _ = _run_pass(prepared, "sensitivity=auto", cache_dir=cache)
    assert auto["sensitivity"] == "exact" and auto["sensitivity_option"] == "auto"
    assert auto["cache_hit"] is True and auto["cache_key"] == exact["cache_key"]
    # The report says how δ was measured and, under auto, why.
    from modec.report.sections.sensitivity import _how

    model = prepared[0]
    assert auto["expert_params"] == est.expert_params(model) < auto["fisher_min_expert_params"]
    assert "measured exactly" in _how(auto) and "expert weights, below" in _how(auto)
    assert "second-order estimate" in _how(fisher) and "auto" not in _how(fisher)


def test_auto_falls_back_to_exact_when_an_op_has_no_rule(prepared, monkeypatch):
    import modec.defaults

    model, _, _ = prepared
    assert est.choose_mode(model, "auto") == "exact"
    monkeypatch.setattr(modec.defaults, "FISHER_MIN_EXPERT_PARAMS", 0)
    assert est.choose_mode(model, "auto") == "fisher"
    ops = dict(est._build_ops())
    del ops["MatMul"]
    monkeypatch.setattr(est, "_OPS", ops)
    report, _ = _run_pass(prepared, "sensitivity=auto")
    assert report["sensitivity"] == "exact"
    assert "ai.onnx::MatMul" in report["sensitivity_fallback"]
    with pytest.raises(est.UnsupportedOpError, match="--sensitivity exact"):
        _run_pass(prepared, "sensitivity=fisher")


def test_cli_option(capsys):
    from modec.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["compile", "m.onnx", "--sensitivity", "fisher"])
    assert args.sensitivity == "fisher"
    assert parser.parse_args(["compile", "m.onnx"]).sensitivity == "auto"
    assert parser.parse_args(["compile", "m.onnx", "--sensitivity", "auto"]).sensitivity == "auto"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["compile", "m.onnx", "--sensitivity", "approximate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    # The option reaches the pass; the default leaves the pipeline text as it was.
    assert "sensitivity=fisher" in standard_pipeline(CompileOptions(sensitivity="fisher")).text()
    assert "sensitivity=" not in standard_pipeline(CompileOptions()).text()
