"""`modec eval A --compare B`: 95% intervals and the paired comparison of two models.

A is the bundled digits-vlm in fp32 (onnxruntime); B is the same model with every expert
RTN-quantized (`quantize_model_rtn`, written back as a simulated-quantization .onnx that
modec's executor runs). On a few samples of every family of the example's evaluation set,
the numbers the CLI prints are checked against per-sample results computed here: each sample
run alone at its own length, scored and its answer NLL taken with a log-softmax written here.
The statistics themselves are checked in tests/test_stats.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from modec import data
from modec.evaluate import Comparison, EvalResult, Resampling, Split, compare
from modec.stats import (
    bootstrap_mean_interval,
    mcnemar_exact_p,
    paired_bootstrap_difference,
    wilson_interval,
)

ROOT = Path(__file__).resolve().parents[1] / "examples" / "digits-vlm"
MODEL, EVAL = ROOT / "model.onnx", ROOT / "eval.npz"


def modec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modec.cli", *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _rtn(path: Path, bits: int) -> Path:
    import onnx_ir as ir

    from modec.method.quantize import quantize_model_rtn
    from modec.moe.canonical import canonicalize_moe, is_moe_node

    model = ir.load(str(MODEL))
    canonicalize_moe(model)
    experts = [int(n.attributes["num_experts"].value) for n in model.graph if is_moe_node(n)]
    quantize_model_rtn(model, tuple((bits,) * e for e in experts), 64)
    ir.save(model, str(path))
    return path


def _subset(ds: data.Dataset, per_family: int, path: Path) -> Path:
    assert ds.family is not None
    pick = np.concatenate([np.flatnonzero(ds.family == c)[:per_family]
                           for c in range(len(ds.families))])  # fmt: skip
    sub = ds.subset(pick)
    header = {k: v for k, v in ds.header.items() if k != "inputs"}
    data.save(path, sub.inputs, modality=sub.modality, answer=sub.answer, family=sub.family,
              header=header)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("compare")
    ds = data.load(EVAL)
    return {
        # 1-bit experts: a difference the test must find (2-bit RTN barely changes this model).
        "q1": _rtn(tmp / "rtn1.onnx", 1),
        "q2": _rtn(tmp / "rtn2.onnx", 2),
        "eval": _subset(ds, 5, tmp / "eval45.npz"),
        "small": _subset(ds, 1, tmp / "eval9.npz"),
    }


def _unpadded(ds: data.Dataset):
    """(sample indices, inputs) of the samples of each length, their padding cut off: no
    sample of a batch is padded."""
    length = (ds.modality != data.PAD).sum(axis=1)
    t = ds.modality.shape[1]
    for n in np.unique(length):
        idx = np.flatnonzero(length == n)
        assert (ds.modality[idx, t - n :] != data.PAD).all()  # left-padded
        yield idx, {k: a[idx][:, t - n :] if a.ndim == 2 and a.shape[1] == t else a[idx]
                    for k, a in ds.inputs.items()}  # fmt: skip


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _runner(path: Path):
    """onnxruntime for the fp32 model; modec's executor for a simulated-quantization one."""
    if path == MODEL:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run(None, feeds)[0]
    from modec.runners import SimulatedRunner

    return SimulatedRunner(path, threads=1)


def _per_sample(path: Path, ds: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Whether each sample is right, and −log p(answer), without padding."""
    run = _runner(path)
    assert ds.answer is not None
    ok, nll = np.zeros(len(ds), bool), np.zeros(len(ds))
    for idx, feeds in _unpadded(ds):
        lp = _log_softmax(np.asarray(run(feeds))[:, -1])
        ok[idx] = lp.argmax(axis=-1) == ds.answer[idx]
        nll[idx] = -lp[np.arange(len(idx)), ds.answer[idx]]
    return ok, nll


def _splits(ds: data.Dataset) -> list[tuple[list[str], np.ndarray]]:
    """(JSON path, sample mask) of every split of the table."""
    mm = ds.multimodal
    assert ds.family is not None
    out = [(["overall"], np.ones(len(ds), bool)), (["multimodal"], mm), (["text_only"], ~mm)]
    out += [(["families", name], ds.family == c) for c, name in enumerate(ds.families)]
    return out


def _at(doc: dict, path: list[str]) -> dict:
    for key in path:
        doc = doc[key]
    return doc


def test_compare_json_against_per_sample_reference(files):
    seed, resamples = 7, 2000
    r = modec("eval", str(MODEL), "--data", str(files["eval"]), "--compare", str(files["q1"]),
              "--json", "--resamples", str(resamples), "--seed", str(seed))  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    ds = data.load(files["eval"])
    assert doc["samples"] == len(ds) == 45
    assert doc["backend"] == "onnxruntime" and doc["compare"]["backend"] == "simulated"
    assert doc["compare"]["model"] == str(files["q1"])
    assert doc["intervals"]["resamples"] == resamples and doc["intervals"]["seed"] == seed
    assert doc["intervals"]["accuracy"] == "Wilson score interval"
    ok_a, nll_a = _per_sample(MODEL, ds)
    ok_b, nll_b = _per_sample(files["q1"], ds)
    boot = {"resamples": resamples, "seed": seed}
    for path, mask in _splits(ds):
        for ok, nll, res in (
            (ok_a, nll_a, _at(doc, path)),
            (ok_b, nll_b, _at(doc["compare"], path)),
        ):
            n, k = int(mask.sum()), int(ok[mask].sum())
            assert (res["n"], res["correct"]) == (n, k), path
            assert res["accuracy_ci95"] == pytest.approx(list(wilson_interval(k, n)[1:]), abs=1e-12)
            assert res["answer_nll"] == pytest.approx(nll[mask].mean(), rel=1e-4, abs=1e-7)
            want = bootstrap_mean_interval(nll[mask], **boot)
            assert res["answer_nll_ci95"] == pytest.approx(list(want[1:]), rel=1e-3, abs=1e-6)
            lo, hi = res["answer_nll_ci95"]
            assert lo <= res["answer_nll"] <= hi and lo >= 0
        d = _at(doc["difference"], path)
        ca, cb = ok_a[mask], ok_b[mask]
        a_only, b_only = int((ca & ~cb).sum()), int((~ca & cb).sum())
        assert (d["n"], d["a_only_correct"], d["b_only_correct"]) == (mask.sum(), a_only, b_only)
        assert d["mcnemar_p"] == pytest.approx(mcnemar_exact_p(a_only, b_only), rel=1e-12)
        assert d["accuracy_difference"] == pytest.approx(ca.mean() - cb.mean(), abs=1e-12)
        # Paired by sample: the CLI's interval is the one of these exact pairs.
        want = paired_bootstrap_difference(ca.astype(float), cb.astype(float), **boot)
        assert d["accuracy_difference_ci95"] == pytest.approx(list(want[1:]), abs=1e-12)
        assert d["answer_nll_difference"] == pytest.approx((nll_a - nll_b)[mask].mean(), rel=1e-4)
        want = paired_bootstrap_difference(nll_a[mask], nll_b[mask], **boot)
        assert d["answer_nll_difference_ci95"] == pytest.approx(list(want[1:]), rel=1e-3, abs=1e-6)
    # 1-bit experts lose accuracy, and the comparison sees it.
    overall = doc["difference"]["overall"]
    assert overall["a_only_correct"] > 5 * max(1, overall["b_only_correct"])
    assert overall["accuracy_difference_ci95"][0] > 0 and overall["mcnemar_p"] < 1e-3
    assert overall["answer_nll_difference_ci95"][1] < 0


def test_compare_table(files, capsys):
    from modec.cli import main

    args = ["eval", str(MODEL), "--data", str(files["small"]), "--compare", str(files["q1"]),
            "--resamples", "1000"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    blocks = text.split("\n\n")
    assert len(blocks) == 4, text
    assert blocks[0].startswith(f"A = {MODEL} (onnxruntime) on {files['small']} (9 samples)")
    assert blocks[1].startswith(f"B = {files['q1']} (simulated)")
    assert blocks[2].startswith("A - B, paired by sample")
    assert (
        "Wilson" in blocks[3] and "McNemar" in blocks[3] and "1000 resamples, seed 0" in blocks[3]
    )
    labels = ["overall", "multimodal", "text-only", *doc["families"]]
    for block in blocks[:3]:
        lines = block.splitlines()
        assert lines[1].split()[0] in ("split",), block
        assert [ln.split()[0] for ln in lines[2:]] == labels, block
    # The numbers of the table are those of --json.
    acc = blocks[0].splitlines()[2].split()
    overall = doc["overall"]
    assert acc[1] == f"{100 * overall['accuracy']:.2f}%"
    assert acc[2:4] == [f"[{100 * v:.2f}%," if i == 0 else f"{100 * v:.2f}%]"
                        for i, v in enumerate(overall["accuracy_ci95"])]  # fmt: skip
    diff = blocks[2].splitlines()[2].split()
    d = doc["difference"]["overall"]
    assert diff[1:3] == [f"{100 * d['accuracy_difference']:+.2f}", "pp"]
    assert diff[6:8] == [str(d["a_only_correct"]), str(d["b_only_correct"])]
    assert float(diff[8]) == pytest.approx(d["mcnemar_p"], rel=1e-2)


def test_compare_with_itself_is_exactly_zero(files, capsys):
    from modec.cli import main

    assert main(["eval", str(files["q2"]), "--data", str(files["small"]), "--compare",
                 str(files["q2"]), "--json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    for path, _ in _splits(data.load(files["small"])):
        d = _at(doc["difference"], path)
        assert (d["a_only_correct"], d["b_only_correct"], d["mcnemar_p"]) == (0, 0, 1.0)
        assert d["accuracy_difference"] == 0.0 and d["accuracy_difference_ci95"] == [0.0, 0.0]
        assert d["answer_nll_difference"] == 0.0
        assert d["answer_nll_difference_ci95"] == [0.0, 0.0]


def _kl_by_sample(ref: Path, models: list[Path], ds: data.Dataset) -> list[dict[str, tuple]]:
    """Per model, split and sample: positions, summed KL(p_ref ‖ p_model), top-1 agreements."""
    r, runs = _runner(ref), [_runner(m) for m in models]
    out = [{k: (np.zeros(len(ds)), np.zeros(len(ds)), np.zeros(len(ds)))
            for k in ("all", "text", "vision")} for _ in models]  # fmt: skip
    for idx, feeds in _unpadded(ds):
        lp = _log_softmax(np.asarray(r(feeds)))
        mod = ds.modality[idx][:, -lp.shape[1] :]
        for res, m in zip(out, runs, strict=True):
            lq = _log_softmax(np.asarray(m(feeds)))
            kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
            agree = lp.argmax(-1) == lq.argmax(-1)
            for k, sel in (
                ("all", mod > 0),
                ("text", mod == data.TEXT),
                ("vision", mod == data.VISION),
            ):
                res[k][0][idx] = sel.sum(axis=1)
                res[k][1][idx] = (kl * sel).sum(axis=1)
                res[k][2][idx] = (agree & sel).sum(axis=1)
    return out


def test_compare_kl_to_a_reference(files, capsys):
    from modec.cli import main

    ds = data.load(files["small"])
    assert main(["eval", str(files["q1"]), "--data", str(files["small"]), "--compare",
                 str(files["q2"]), "--kl-to", str(MODEL), "--json", "--resamples", "1000",
                 "--seed", "3"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert doc["compare"]["model"] == str(files["q2"]) and doc["intervals"]["seed"] == 3
    got = _kl_by_sample(MODEL, [files["q1"], files["q2"]], ds)
    ref = {"a": got[0], "b": got[1]}
    boot = {"resamples": 1000, "seed": 3}
    for split in ("all", "text", "vision"):
        for side, kl_doc in (("a", doc["kl"]), ("b", doc["compare"]["kl"])):
            pos, kl, agree = ref[side][split]
            keep = pos > 0
            res = kl_doc[split]
            assert res["positions"] == pos.sum()
            assert res["mean_kl"] == pytest.approx(kl.sum() / pos.sum(), rel=1e-3)
            want = bootstrap_mean_interval(kl[keep] / pos[keep], pos[keep], **boot)
            assert res["mean_kl_ci95"] == pytest.approx(list(want[1:]), rel=1e-3)
            want = bootstrap_mean_interval(agree[keep] / pos[keep], pos[keep], **boot)
            assert res["top1_agreement_ci95"] == pytest.approx(list(want[1:]), abs=1e-12)
        d = doc["difference"][split]
        (pos, kl_a, ag_a), (_, kl_b, ag_b) = ref["a"][split], ref["b"][split]
        keep = pos > 0
        assert d["mean_kl_difference"] == pytest.approx(
            doc["kl"][split]["mean_kl"] - doc["compare"]["kl"][split]["mean_kl"], rel=1e-9
        )
        want = paired_bootstrap_difference(
            kl_a[keep] / pos[keep], kl_b[keep] / pos[keep], pos[keep], **boot
        )
        assert d["mean_kl_difference_ci95"] == pytest.approx(list(want[1:]), rel=1e-3)
        want = paired_bootstrap_difference(
            ag_a[keep] / pos[keep], ag_b[keep] / pos[keep], pos[keep], **boot
        )
        assert d["top1_agreement_difference_ci95"] == pytest.approx(list(want[1:]), abs=1e-12)
        # 1-bit experts are further from the original than 2-bit ones, on every split.
        assert d["mean_kl_difference_ci95"][0] > 0
        assert d["top1_agreement_difference_ci95"][1] < 0


def _result(correct: np.ndarray, nll: np.ndarray, mm: np.ndarray) -> EvalResult:
    def split(mask: np.ndarray) -> Split:
        return Split(int(mask.sum()), int(correct[mask].sum()))

    return EvalResult(overall=split(np.ones_like(mm)), multimodal=split(mm), text_only=split(~mm),
                      correct=correct, answer_nll=nll, multimodal_mask=mm)  # fmt: skip


def _json(c: Comparison) -> dict[str, Any]:
    return json.loads(json.dumps(c.to_json()))


def test_compare_is_seeded_and_pairs_by_index():
    rng = np.random.default_rng(0)
    mm = rng.random(400) < 0.5
    ca = rng.random(400) < 0.8
    cb = np.where(rng.random(400) < 0.15, ~ca, ca)
    na, nb = rng.exponential(size=400), rng.exponential(size=400)
    a, b = _result(ca, na, mm), _result(cb, nb, mm)
    one = _json(compare(a, b, Resampling(500, seed=1)))
    assert one == _json(compare(a, b, Resampling(500, seed=1)))
    other = _json(compare(a, b, Resampling(500, seed=2)))
    key = "accuracy_difference_ci95"
    assert one["overall"][key] != other["overall"][key]
    # Paired, not pooled: B's results moved to other samples give the same point estimate
    # and another interval.
    perm = rng.permutation(400)
    shuffled = _json(compare(a, _result(cb[perm], nb[perm], mm), Resampling(500, seed=1)))
    want = one["overall"]["accuracy_difference"]
    assert shuffled["overall"]["accuracy_difference"] == pytest.approx(want)
    assert shuffled["overall"][key] != one["overall"][key]
    # Results of other samples (another modality mask) are refused.
    with pytest.raises(ValueError, match="same samples"):
        compare(a, _result(cb, nb, mm[perm]), Resampling(10))
    # A sample out of B's vocabulary: no answer NLL for that split, counts still there.
    nb2 = nb.copy()
    nb2[np.flatnonzero(mm)[0]] = math.nan
    d = _json(compare(a, _result(cb, nb2, mm), Resampling(200)))
    assert d["multimodal"]["answer_nll_difference"] is None
    assert d["multimodal"]["b_only_correct"] == int((~ca & cb)[mm].sum())
    assert d["text_only"]["answer_nll_difference"] is not None


@pytest.mark.parametrize(("flag", "value"), [("--resamples", "0"), ("--seed", "-1")])
def test_bad_resampling_flags(flag, value, capsys):
    from modec.cli import main

    assert main(["eval", str(MODEL), "--data", str(EVAL), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"modec: error: {flag} {value}")
