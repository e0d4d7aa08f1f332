"""tools/scale_model.py: deterministic, streamed to external data, what find-moe expects, and
computing the model its docstring describes; its calibration set loads and compiles."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from modec import data
from modec.frontend import input_specs, load_onnx, load_onnx_proto
from modec.moe.discover import find_moe
from tools import scale_model as sm

ROOT = Path(__file__).resolve().parents[1]
# 2 layers × 8 experts at hidden 64; 64×64 images (16 vision tokens) keep compiles short.
TINY = dict(
    layers=2, hidden=64, experts=8, intermediate=32, top_k=2, vocab=64, vision_dim=32,
    image_size=64,
)  # fmt: skip
CALIB = 6


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def built(request, tmp_path_factory) -> tuple[sm.ScaleConfig, Path]:
    cfg = sm.ScaleConfig(**TINY, dtype=request.param)  # type: ignore[arg-type]
    out = tmp_path_factory.mktemp(f"scale-{request.param}")
    sm.build(out, cfg, CALIB)
    return cfg, out


def test_build_is_deterministic_and_streams_weights_to_external_data(built, tmp_path):
    cfg, out = built
    again = tmp_path / "again"
    sm.build(again, cfg, CALIB)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert names == ["calib.npz", "config.json", "layer-000.bin", "layer-001.bin",
                     "model.onnx", "shared.bin"]  # fmt: skip
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    # Another seed changes the weights, not the graph.
    other = tmp_path / "seed1"
    sm.build(other, sm.ScaleConfig(**{**cfg.to_dict(), "seed": 1}), CALIB)
    assert (other / "layer-000.bin").read_bytes() != (out / "layer-000.bin").read_bytes()
    # The graph proto holds no weight bytes: every float weight is an aligned external slice.
    proto = onnx.load(str(out / sm.MODEL_FILE), load_external_data=False)
    want_type = sm.DTYPES[cfg.dtype][0]
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 9 + 9 * cfg.layers  # shared: vision 5, embeddings 2, norm, head
    for t in external:
        assert t.data_type == want_type and not t.raw_data, t.name
        ref = {e.key: e.value for e in t.external_data}
        assert int(ref["offset"]) % sm.ALIGN == 0
        size = int(ref["length"])
        assert size == math.prod(t.dims) * 2  # fp16 and bf16
        assert int(ref["offset"]) + size <= (out / ref["location"]).stat().st_size
    layer0 = {t.name for t in external if dict((e.key, e.value) for e in t.external_data)
              ["location"] == "layer-000.bin"}  # fmt: skip
    assert "model.layers.0.mlp.experts.gate_up_proj" in layer0
    assert all(not t.data_location for t in proto.graph.initializer if t not in external)
    doc = json.loads((out / sm.CONFIG_FILE).read_text())
    assert doc["config"] == cfg.to_dict() and sm.cached(out, cfg, CALIB) is not None
    assert sm.cached(out, sm.ScaleConfig(**{**cfg.to_dict(), "layers": 3}), CALIB) is None


def test_find_moe_sees_every_layer_as_stacked_experts(built):
    cfg, out = built
    regions = find_moe(load_onnx(out / sm.MODEL_FILE))
    assert [(r.num_experts, r.top_k, r.form) for r in regions] == [
        (cfg.experts, cfg.top_k, "stacked_gather")
    ] * cfg.layers
    for r in regions:
        assert r.router.scoring == "softmax" and r.router.norm_topk_prob
        assert r.experts.gate.shape == (cfg.experts, cfg.intermediate, cfg.hidden)
        assert r.experts.down.shape == (cfg.experts, cfg.hidden, cfg.intermediate)


def test_calibration_set_loads_and_fits_the_model(built):
    cfg, out = built
    ds = data.load(out / sm.CALIB_FILE)
    data.check_against(ds, input_specs(load_onnx_proto(out / sm.MODEL_FILE)))
    assert len(ds) == CALIB
    assert int(ds.multimodal.sum()) == CALIB - 1  # one text-only sample in 6 (1/8, at least 1)
    vision = (ds.modality == data.VISION).sum(axis=1)
    assert set(vision[ds.multimodal].tolist()) == {cfg.patches}
    assert not ds.inputs["pixel_values"][~ds.multimodal].any()
    assert ds.inputs["pixel_values"][ds.multimodal].std() > 0.05  # drawn pictures, not blank


def _reference(w: dict[str, np.ndarray], cfg: sm.ScaleConfig, feeds: dict) -> np.ndarray:
    """The model of tools/scale_model.py's docstring in numpy (float32 compute)."""
    ids, mask, px = feeds["input_ids"], feeds["attention_mask"], feeds["pixel_values"]
    b, t = ids.shape
    c, p, n = cfg.channels, cfg.patch, cfg.grid

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_eps) * g

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    centered = (px - 0.5) * 2.0
    patches = centered.reshape(b, c, n, p, n, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, n * n, -1)
    v = patches @ w["visual.patch_embed.weight"] + w["visual.pos_embed"]
    v = np.tanh(rms(v, w["visual.norm.weight"]) @ w["visual.merger.fc1.weight"])
    v = v @ w["visual.merger.fc2.weight"]
    is_img = ids == sm.IMAGE_ID
    slot = np.clip(np.cumsum(is_img, axis=1) - 1, 0, cfg.patches - 1)
    feats = np.take_along_axis(v, slot[..., None], axis=1)
    x = np.where(is_img[..., None], feats, w["model.embed_tokens.weight"][ids])
    x = x + w["model.embed_positions.weight"][np.maximum(np.cumsum(mask, 1) - 1, 0)]
    allowed = np.tril(np.ones((t, t), bool))[None, None] & mask.astype(bool)[:, None, None, :]
    bias = np.where(allowed, 0.0, -1e9).astype(np.float32)
    h_, d = cfg.heads, cfg.head_dim
    for layer in range(cfg.layers):
        pre = f"model.layers.{layer}"
        a = rms(x, w[f"{pre}.input_layernorm.weight"])
        q, k, vv = (
            (a @ w[f"{pre}.self_attn.{m}_proj.weight"]).reshape(b, t, h_, d).transpose(0, 2, 1, 3)
            for m in "qkv"
        )
        probs = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias)
        ctx = (probs @ vv).transpose(0, 2, 1, 3).reshape(b, t, h_ * d)
        x = x + ctx @ w[f"{pre}.self_attn.o_proj.weight"]
        m = rms(x, w[f"{pre}.post_attention_layernorm.weight"]).reshape(-1, cfg.hidden)
        scores = softmax(m @ w[f"{pre}.mlp.gate.weight"].T)
        top = np.argsort(-scores, axis=-1, kind="stable")[:, : cfg.top_k]
        tw = np.take_along_axis(scores, top, -1)
        tw = tw / tw.sum(-1, keepdims=True)
        gu, down = w[f"{pre}.mlp.experts.gate_up_proj"], w[f"{pre}.mlp.experts.down_proj"]
        i = cfg.intermediate
        y = np.zeros_like(m)
        for tok in range(m.shape[0]):
            for s in range(cfg.top_k):
                e = top[tok, s]
                g_u = gu[e] @ m[tok]
                act = g_u[:i] / (1 + np.exp(-g_u[:i])) * g_u[i:]
                y[tok] += tw[tok, s] * (down[e] @ act)
        x = x + y.reshape(b, t, cfg.hidden)
    logits: np.ndarray = rms(x, w["model.norm.weight"]) @ w["lm_head.weight"]
    return logits


def test_onnxruntime_computes_the_documented_model(built):
    import onnxruntime as ort

    cfg, out = built
    proto = onnx.load(str(out / sm.MODEL_FILE))  # with the external data
    w = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float32)
        for t in proto.graph.initializer
        if t.data_type == sm.DTYPES[cfg.dtype][0]
    }
    ds = data.load(out / sm.CALIB_FILE)
    # A text-only sample first: left padding; the image samples: the placeholder scatter.
    order = np.argsort(ds.multimodal, kind="stable")[:3]
    feeds = {k: v[order] for k, v in ds.inputs.items()}
    sess = ort.InferenceSession(str(out / sm.MODEL_FILE), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], feeds)
    want = _reference(w, cfg, feeds)
    real = feeds["attention_mask"].astype(bool)
    assert np.abs(got - want)[real].max() < 1e-3 * np.abs(want[real]).max()
    assert 0.3 < float(want[real].std()) < 3.0  # unit-scale logits: activations stayed O(1)


def test_compile_cli_on_the_scale_model(tmp_path):
    cfg = sm.ScaleConfig(**TINY, dtype="bfloat16")  # type: ignore[arg-type]
    out = tmp_path / "model"
    sm.build(out, cfg, CALIB)
    res = subprocess.run(
        [sys.executable, "-m", "modec.cli", "-q", "compile", str(out / sm.MODEL_FILE),
         "--calib", str(out / sm.CALIB_FILE), "--budget", "3.0", "--target", "none",
         "--sensitivity-samples", "4", "--no-cache", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    alloc = json.loads((tmp_path / "out" / "allocation.json").read_text())
    assert [len(w) for w in alloc["widths"]] == [cfg.experts] * cfg.layers
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passes"][0]["name"] == "find-moe"
