"""The compiled artifact runs the experts the simulated model runs, on the real compile path.

One ``compile_model`` of the tiny digits-vlm for ``llvm`` (budget 2.75: widths 2, 3 and 4 in
both layers, so 3-bit codes straddle words), then, read from the files alone:

1. ``model.sim.onnx``'s expert weights are exactly (q − z)·s in float32 of the codes in
   ``experts.safetensors`` (dequantized here);
2. those codes, scales and zeros are exactly what ``weights.safetensors`` holds packed
   (``moe{l}.{proj}.w{bits}.codes|scale|zero``, layout ``n16k32`` of docs/packing.md: codes
   through `modec.numerics.packing.unpack_codes`, scales and zeros de-interleaved here);
3. the compiled logits (`modec.runtime`) match the simulated ones (modec's executor) on
   batches of 1 and 3 samples at odd and even lengths, within `REL_BOUND`.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file

from modec import data
from modec.driver import CompileOptions, compile_model
from modec.numerics.packing import unpack_codes
from modec.numerics.schemes import QuantScheme

PROJS = ("gate", "up", "down")
#: Canonical MoE node inputs of the stacked expert weights (docs/ir.md).
INPUT = {"gate": 3, "up": 4, "down": 5}
GROUP = 128
#: max |compiled − simulated| / max |simulated| per batch. Measured 9.3e-7 on this model
#: (fp32 arithmetic in another order in TVM's kernels); 1e-5 leaves a 10x margin.
REL_BOUND = 1e-5


@pytest.fixture(scope="module")
def out(tiny_vlm, tmp_path_factory):
    o = CompileOptions(sensitivity_samples=4, budget=2.75, target="llvm", cache_dir=None)
    path = tmp_path_factory.mktemp("compiled") / "out"
    compile_model(tiny_vlm["model"], tiny_vlm["calib"], path, o)
    return path


def _widths(out):
    import json

    return json.loads((out / "allocation.json").read_text())["widths"]


def _sim_experts(out):
    """Per MoE node (graph order) and projection, the stacked float32 weights [E, N, K]."""
    m = onnx.load(str(out / "model.sim.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.domain == "ai.modec" and n.op_type == "MoE"]
    return [{p: inits[n.input[i]] for p, i in INPUT.items()} for n in nodes]


def _dequantize(q, scale, zero):
    cols = np.arange(q.shape[-1]) // GROUP
    s = scale.astype(np.float32)[..., cols]
    z = zero.astype(np.float32)[..., cols]
    return (q.astype(np.float32) - z) * s


def _rows(p, n):
    """[E, N_pad/16, G, 16] (row 16·nb + lane) → [E, N, G]."""
    e, nb, g, lanes = p.shape
    return p.transpose(0, 1, 3, 2).reshape(e, nb * lanes, g)[:, :n]


def _packed_mismatches(out):
    """Every (tensor, layer, proj, width) where the packed weights disagree with the codes."""
    experts = load_file(str(out / "experts.safetensors"))
    packed = load_file(str(out / "weights.safetensors"))
    sim = _sim_experts(out)
    bad = []
    for layer, widths in enumerate(_widths(out)):
        for proj in PROJS:
            n, k = sim[layer][proj].shape[1:]
            for b in sorted(set(widths)):
                members = [e for e, w in enumerate(widths) if w == b]  # index order
                key = f"moe{layer}.{proj}.w{b}"
                q = unpack_codes(packed[f"{key}.codes"], n, k, QuantScheme(b, GROUP))
                scale, zero = packed[f"{key}.scale"], packed[f"{key}.zero"]
                assert scale.dtype == np.float16 and zero.dtype == np.uint8
                for i, e in enumerate(members):
                    mine = f"l{layer}.{proj}.e{e}"
                    if not np.array_equal(q[i], experts[f"{mine}.codes"]):
                        bad.append(f"{key}.codes expert {e}")
                    if not np.array_equal(_rows(scale, n)[i], experts[f"{mine}.scale"]):
                        bad.append(f"{key}.scale expert {e}")
                    if not np.array_equal(_rows(zero, n)[i], experts[f"{mine}.zero"]):
                        bad.append(f"{key}.zero expert {e}")
                # Padding rows hold scale 0 and zero 0 (docs/packing.md).
                if (_rows(scale, scale.shape[1] * 16)[:, n:] != 0).any():
                    bad.append(f"{key}.scale padding")
    return bad


def test_simulated_weights_are_the_dequantized_codes(out):
    experts = load_file(str(out / "experts.safetensors"))
    sim = _sim_experts(out)
    widths = _widths(out)
    assert len(sim) == len(widths) == 2
    assert {w for layer in widths for w in layer} == {2, 3, 4}
    for layer, per in enumerate(sim):
        for proj in PROJS:
            for e, b in enumerate(widths[layer]):
                key = f"l{layer}.{proj}.e{e}"
                q = experts[f"{key}.codes"]
                assert q.dtype == np.uint8 and int(q.max()) < 2**b
                want = _dequantize(q, experts[f"{key}.scale"], experts[f"{key}.zero"])
                np.testing.assert_array_equal(per[proj][e], want, err_msg=key)


def test_packed_weights_hold_the_codes(out):
    assert _packed_mismatches(out) == []


def test_one_perturbed_code_is_found(out, tmp_path):
    """The check above can fail: one code word changed in the artifact is reported."""
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    packed = load_file(str(copy / "weights.safetensors"))
    key = next(k for k in sorted(packed) if k.endswith(".down.w3.codes"))
    layer = int(key.split(".")[0].removeprefix("moe"))
    codes = packed[key].copy()
    codes.flat[5] ^= np.uint32(1 << 3)  # one bit of one code of row 5 of the group's 1st expert
    packed[key] = codes
    save_file(packed, str(copy / "weights.safetensors"))
    first = _widths(out)[layer].index(3)
    assert _packed_mismatches(copy) == [f"{key} expert {first}"]


def _batches(ds):
    """(name, feeds) of batch 1 and 3 at odd and even sequence lengths."""
    mm, t_full = np.flatnonzero(ds.multimodal), ds.modality.shape[1]
    text = np.flatnonzero(~ds.multimodal)
    length = (ds.modality != 0).sum(1)
    out = []
    for i in [mm[np.argmax(length[mm] % 2)], mm[np.argmin(length[mm] % 2)], text[0]]:
        real = ds.modality[i] != 0  # one sample at its own length
        feeds = {
            k: (a[i : i + 1][:, real] if a.ndim == 2 and a.shape[1] == t_full else a[i : i + 1])
            for k, a in ds.inputs.items()
        }
        out.append((f"sample {i}", feeds))
    for idx in (mm[:3], text[:3], np.r_[mm[3], text[3:5]]):  # padded batches of 3
        _, feeds = next(ds.subset(idx).batches(3))
        out.append((f"samples {idx.tolist()}", feeds))
    return out


def test_compiled_logits_match_simulated(out, tiny_vlm):
    import modec.runtime

    from modec.runners import SimulatedRunner

    sess = modec.runtime.load(out)
    sim = SimulatedRunner(out)
    batches = _batches(data.load(tiny_vlm["eval"]))
    shapes = {f["input_ids"].shape for _, f in batches}
    assert {b for b, _ in shapes} == {1, 3}
    assert any(t % 2 for _, t in shapes) and any(t % 2 == 0 for _, t in shapes)
    worst = 0.0
    for name, feeds in batches:
        got = sess.run(feeds)["logits"]
        want = sim(feeds)
        assert got.shape == want.shape
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        worst = max(worst, rel)
        assert rel < REL_BOUND, f"{name} {feeds['input_ids'].shape}: {rel:.2e}"
    print(f"compiled vs simulated: max relative difference {worst:.2e} (bound {REL_BOUND})")
