"""Every text MoE family through a Hugging Face directory and the CLI, down to ``--target llvm``.

For each tiny random-weight family of `tests.fixtures.models` (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3, GPT-OSS) the model is saved with ``save_pretrained`` next to a locally
trained tokenizer with a chat template (`tests.test_hf.build_tokenizer`), then:

1. ``modec calib build --model DIR --prompts prompts.jsonl -o calib.npz`` (the tokenizer's
   chat template, left padding);
2. ``modec compile DIR --calib calib.npz --target llvm --method mc-moe`` (the directory is
   exported by `modec.hf`, with position ids from the mask, not the fixtures' own wrapper,
   and without loading its weights: they are referenced in the safetensors file, the
   stacked experts written beside it; tests/test_hf_export.py);
3. the compiled artifact matches the simulated-quantization model (``CompiledRunner`` vs
   ``SimulatedRunner``) within 1e-4 relative on a left-padded batch of a shape the export
   never saw, and generates (the export has a KV cache) the simulated model's greedy
   tokens; ``modec run OUT --prompt …`` generates from text;
4. ``modec eval OUT --data calib.npz --kl-to DIR --json`` reports a finite KL against the
   directory's own export (onnxruntime).

Measured on two cores (another test run loading them): 27-47 s per family, 3.5-4.5 minutes
for the six; every family is marked ``slow`` (the marker's ~30 s threshold) and still runs by
default.

Last, Qwen3-VL-MoE through `modec.hf_qwen3_vl.export_qwen3_vl` (which ``modec compile DIR``
also takes): logits equal transformers' own, find-moe, ``--target llvm`` compiled =
simulated, KL per modality (about 27 s). Results: docs/families.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from tests.fixtures.models import HF_MODELS, VOCAB, build_hf
from tests.test_hf import CHAT_TEMPLATE, SENTENCES, build_tokenizer, modec, write_jsonl


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf_families")
    return write_jsonl(root / "prompts.jsonl", [*SENTENCES, *(f"{s} please" for s in SENTENCES)])


def _build_dir(family: str, path: Path) -> Path:
    """The fixture family saved as a Hugging Face directory with a chat-template tokenizer."""
    tok = build_tokenizer(CHAT_TEMPLATE)
    assert len(tok) <= VOCAB
    model = build_hf(family).m  # the transformers model inside the fixtures' export wrapper
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _feeds(ids: np.ndarray, pad: int) -> dict[str, np.ndarray]:
    mask = np.ones_like(ids)
    mask[0, :pad] = 0
    ids = np.where(mask == 1, ids, 0)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.slow  # 27-47 s per family on two cores
@pytest.mark.parametrize("family", HF_MODELS)
def test_family_directory_compiles_llvm_and_evals(
    family: str, prompts: Path, tmp_path: Path
) -> None:
    from modec.runners import CompiledRunner, SimulatedRunner

    d = _build_dir(family, tmp_path / family)
    cache = tmp_path / "cache"
    calib = tmp_path / "calib.npz"
    r = modec("calib", "build", "--model", str(d), "--prompts", str(prompts), "-o", str(calib))
    assert r.returncode == 0, r.stderr
    assert "12 samples (0 multimodal, 12 text-only)" in r.stdout

    out = tmp_path / "out"
    r = modec("compile", str(d), "--calib", str(calib), "--target", "llvm", "--method",
              "mc-moe", "--sensitivity-samples", "4", "--cache-dir", str(cache),
              "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").is_file()

    # A left-padded batch of a shape the export sample ([2, 8]) is not.
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, 11)).astype(np.int64)
    feeds = _feeds(ids, pad=3)
    want = SimulatedRunner(out)(feeds)
    got = CompiledRunner(out)(feeds)
    assert got.shape == want.shape == (3, 11, VOCAB)
    assert np.isfinite(want).all()
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{family}: compiled vs simulated max relative error {err:.2e}")
    assert err < 1e-4, f"{family}: relative error {err:.2e}"

    # Generation: the export carries the KV cache; greedy tokens from the artifact (prompt,
    # then one cached step per token) equal the simulated model re-run over the whole
    # sequence for every token; `modec run` encodes a prompt with the directory's tokenizer.
    from modec.runtime import load

    from tests.generation.test_generate_python import reference_greedy

    got_tokens = load(out).generate(feeds, max_new_tokens=5).tokens
    assert got_tokens == reference_greedy(out, feeds, 5), family
    r = modec("run", str(out), "--prompt", "the cat sat", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr

    r = modec("eval", str(out), "--data", str(calib), "--kl-to", str(d), "--json",
              "--cache-dir", str(cache))  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "compiled" and doc["reference_backend"] == "onnxruntime"
    kl = doc["kl"]
    assert kl["all"]["positions"] == kl["text"]["positions"] > 0
    assert kl["vision"]["positions"] == 0
    mean = kl["all"]["mean_kl"]
    print(f"{family}: KL {mean:.3e}, top-1 agreement {kl['all']['top1_agreement']:.3f}")
    assert math.isfinite(mean) and mean >= 0


# ---- Qwen3-VL-MoE: flattened patches, M-RoPE, deepstack (modec.hf_qwen3_vl) --------

QWEN3_VL_IMAGE, QWEN3_VL_START, QWEN3_VL_END = 60, 62, 63


def _build_qwen3_vl_dir(path: Path) -> Path:
    """A tiny random Qwen3-VL-MoE (2 MoE layers, 4 experts, top-2; a 1-block vision tower
    with a deepstack merger, an 8x8 position grid: 64 patches, 16 image tokens)."""
    import torch
    import transformers as tf

    from tests.test_hf import _randomize

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                max_position_embeddings=128,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])  # fmt: skip
    cfg = tf.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=QWEN3_VL_IMAGE,
        video_token_id=61, vision_start_token_id=QWEN3_VL_START,
        vision_end_token_id=QWEN3_VL_END,
    )  # fmt: skip
    model = tf.Qwen3VLMoeForConditionalGeneration(cfg).eval()
    _randomize(model)
    model.save_pretrained(path)
    return path


def _qwen3_vl_batch(rows: list[list[int]], seed: int) -> dict[str, np.ndarray]:
    """Left-padded rows; a row with image tokens gets random patches, others zeros."""
    t = max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    pixels = np.random.default_rng(seed).standard_normal((len(rows), 64, 1536)).astype(np.float32)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :], mask[i, t - len(r) :] = r, 1
        if QWEN3_VL_IMAGE not in r:
            pixels[i] = 0
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _qwen3_vl_row(before: list[int], after: list[int]) -> list[int]:
    return [*before, QWEN3_VL_START, *[QWEN3_VL_IMAGE] * 16, QWEN3_VL_END, *after]


def test_qwen3_vl_moe_exports_compiles_and_matches(tmp_path: Path) -> None:
    """export_qwen3_vl: every row (text-only, left-padded, image anywhere) gets transformers'
    logits; find-moe sees both MoE layers; compile --target llvm matches the simulated model."""
    import onnx_ir as ir
    import torch
    import transformers as tf

    from modec import data, hf_qwen3_vl
    from modec.driver import compile_model
    from modec.evaluate import kl_divergence
    from modec.frontend import OrtRunner
    from modec.moe.discover import find_moe
    from modec.pipelines import CompileOptions
    from modec.runners import CompiledRunner, SimulatedRunner

    d = _build_qwen3_vl_dir(tmp_path / "qwen3vl")
    path = hf_qwen3_vl.export_qwen3_vl(d, tmp_path / "model.onnx")
    assert hf_qwen3_vl.qwen3_vl_grid(tf.AutoConfig.from_pretrained(d)) == (1, 8, 8)
    regions = find_moe(ir.load(str(path)))
    assert [(r.num_experts, r.form) for r in regions] == [(4, "stacked_gather")] * 2

    rows = [[5, 7, 8, 9], _qwen3_vl_row([], [7, 8, 9, 10, 11]), _qwen3_vl_row([5, 6], [7])]
    feeds = _qwen3_vl_batch(rows, seed=1)
    got = OrtRunner(path)(feeds)
    model = tf.AutoModelForImageTextToText.from_pretrained(d, local_files_only=True).eval()
    t = feeds["input_ids"].shape[1]
    grid = torch.tensor([[1, 8, 8]])
    with torch.no_grad():
        for i, r in enumerate(rows):
            ids = torch.tensor([r])
            kw = {}
            if QWEN3_VL_IMAGE in r:
                kw = dict(pixel_values=torch.from_numpy(feeds["pixel_values"][i]),
                          image_grid_thw=grid,
                          mm_token_type_ids=(ids == QWEN3_VL_IMAGE).long())  # fmt: skip
            want = model(input_ids=ids, **kw).logits.numpy()[0]
            np.testing.assert_allclose(got[i, t - len(r) :], want, rtol=1e-4, atol=1e-4)

    # Calibration: 4 multimodal and 4 text-only samples, the first two left-padded.
    rng = np.random.default_rng(2)
    calib_rows = [
        _qwen3_vl_row(list(rng.integers(0, 58, 2 + i % 3)), list(rng.integers(0, 58, 3)))
        if i % 2 == 0 else list(rng.integers(0, 58, 6 + i))
        for i in range(8)
    ]  # fmt: skip
    calib_feeds = _qwen3_vl_batch(calib_rows, seed=3)
    ids, mask = calib_feeds["input_ids"], calib_feeds["attention_mask"]
    modality = np.where(mask == 0, 0, np.where(ids == QWEN3_VL_IMAGE, 2, 1)).astype(np.int8)
    calib = tmp_path / "calib.npz"
    data.save(calib, calib_feeds, modality=modality, header={"image_token_id": QWEN3_VL_IMAGE})
    out = tmp_path / "out"
    options = CompileOptions(target="llvm", sensitivity_samples=4, cache_dir=str(tmp_path / "c"))
    result = compile_model(path, calib, out, options)
    assert result.allocation is not None and len(result.allocation.widths) == 2
    batch = {k: v[:3] for k, v in calib_feeds.items()}
    want = SimulatedRunner(out)(batch)
    got = CompiledRunner(out)(batch)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"qwen3-vl-moe: compiled vs simulated max relative error {err:.2e}")
    assert err < 1e-4
    kl = kl_divergence(OrtRunner(path), CompiledRunner(out), data.load(calib))
    assert kl.splits["vision"].positions == 4 * 16
    for split in ("all", "text", "vision"):
        mean = kl.splits[split].mean_kl
        print(f"qwen3-vl-moe: KL {split} {mean:.3e}")
        assert mean is not None and math.isfinite(mean) and mean >= 0
