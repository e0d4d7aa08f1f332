"""Hugging Face directories on the CLI: `modec inspect / compile / eval DIR`, exported once to
ONNX (modec.hf) from tiny random-weight checkpoints saved here with save_pretrained.

Fixtures (no downloads): a WordLevel tokenizer trained on a few sentences, a Mixtral causal
LM (text MoE) and a LLaVA vision-language model with a Mixtral language model and a CLIP
vision tower, its processor built from ``LlavaProcessor`` + ``CLIPImageProcessorPil``.
The builders are imported by tests/test_calib_build.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SENTENCES = [
    "what is in the image", "how many digits are there", "describe the picture please",
    "the sum of two and three is five", "a red square on a blue field", "count the dots",
]  # fmt: skip
SPECIALS = ["<pad>", "<unk>", "<s>", "<image>", "<user>", "<bot>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<bot>{% endif %}"
)
IMAGE_SIZE = 32  # CLIP input; 8x8 patches -> 16 image tokens


def build_tokenizer(chat_template: str | None = None):  # type: ignore[no-untyped-def]
    """A WordLevel tokenizer trained on `SENTENCES`, ``<image>`` its image token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_processor(tokenizer):  # type: ignore[no-untyped-def]
    import transformers as tf
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                   do_center_crop=False)  # fmt: skip
    return tf.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )  # fmt: skip


def _text_config(vocab: int, experts: int) -> dict[str, object]:
    return dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_local_experts=experts, num_experts_per_tok=2,
    )  # fmt: skip


def _randomize(model) -> None:  # type: ignore[no-untyped-def]
    """Weights big enough that quantization moves the logits (init std 0.02 barely does)."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            base = 1.0 if "norm" in n else 0.0
            p.copy_(base + torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.05))


def build_mixtral_dir(path: Path, tokenizer=None) -> Path:  # type: ignore[no-untyped-def]
    """A tiny Mixtral causal LM (2 layers, 8 experts, top-2) with a chat-template tokenizer."""
    import torch
    import transformers as tf

    tok = tokenizer or build_tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**_text_config(len(tok), 8))).eval()
    _randomize(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_llava_dir(path: Path) -> Path:
    """A tiny LLaVA VLM: CLIP vision tower, Mixtral language model (2 layers, 4 experts)."""
    import torch
    import transformers as tf

    tok = build_tokenizer()
    proc = build_processor(tok)
    torch.manual_seed(1)
    text = {"model_type": "mixtral", **_text_config(len(tok), 4)}
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, image_size=IMAGE_SIZE,
                  patch_size=8, projection_dim=32)  # fmt: skip
    cfg = tf.LlavaConfig(
        text_config=text, vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    _randomize(model)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def draw_images(directory: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` PNGs of coloured rectangles on noise, of different sizes."""
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = 40 + 4 * i, 36 + 2 * i
        im = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        draw.rectangle([x0, y0, x0 + w // 3, y0 + h // 3],
                       fill=tuple(int(c) for c in rng.integers(100, 256, 3)))  # fmt: skip
        paths.append(directory / f"img{i:02d}.png")
        im.save(paths[-1])
    return paths


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def modec(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    if env_cache is not None:
        env["XDG_CACHE_HOME"] = str(env_cache)
    return subprocess.run([sys.executable, "-m", "modec.cli", *args], capture_output=True,
                          text=True, timeout=600, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "mixtral": build_mixtral_dir(root / "mixtral"),
        "llava": build_llava_dir(root / "llava"),
        "cache": root / "cache",
        "root": root,
    }


# ---- missing files: one line, exit 3, never a download ------------------------------------


def test_missing_files_are_named(tmp_path, dirs):
    import shutil

    from modec import hf
    from modec.errors import ModelError

    d = tmp_path / "m"
    shutil.copytree(dirs["mixtral"], d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"missing model\.safetensors"):
        hf.weight_files(d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"holds pytorch_model\.bin.*safe_serialization"):
        hf.weight_files(d)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors"}}))  # fmt: skip
    with pytest.raises(ModelError, match=r"missing model-00001-of-00002\.safetensors"):
        hf.weight_files(d)
    (d / "config.json").unlink()
    with pytest.raises(ModelError, match=r"missing config\.json"):
        hf.read_config(d)
    with pytest.raises(ModelError, match="does not download"):
        hf.read_config("mistralai/Mixtral-8x7B-v0.1")
    # On the command line: one line and exit code 3, for compile and inspect.
    (d / "config.json").write_text((dirs["mixtral"] / "config.json").read_text())
    for args in (["inspect", str(d)], ["compile", str(d), "--calib", "c.npz", "-o",
                                       str(tmp_path / "out")]):  # fmt: skip
        r = modec(*args, env_cache=tmp_path / "cache")
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("modec: error")]
        assert r.returncode == 3 and len(errors) == 1, r.stderr
        assert "missing model-00001-of-00002.safetensors" in errors[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_model_kind_picks_the_auto_class():
    from modec import hf

    assert not hf.is_vlm({"model_type": "mixtral"})
    assert hf.is_vlm({"model_type": "qwen3_vl_moe", "vision_config": {}, "text_config": {}})


# ---- a text MoE: inspect, calib build, compile, eval --kl-to ------------------------------


def test_text_moe_directory_end_to_end(dirs, tmp_path):
    d, cache = dirs["mixtral"], dirs["cache"]
    r = modec("inspect", str(d), "--json", "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    assert "exporting" in r.stderr  # told once, on stderr
    info = json.loads(r.stdout)
    assert info["path"] == str(d)
    # Exported beside the weights (it references them in place), not into the cache.
    assert Path(info["onnx"]).parent == d and Path(info["onnx"]).name.startswith("modec-")
    assert info["num_moe_layers"] == 2 and info["num_experts"] == 16
    assert all(layer["form"] == "stacked_gather" for layer in info["moe_layers"])
    assert all(layer["attention"]["kind"] == "probs" for layer in info["moe_layers"])
    # A decoder with its KV cache (modec.hf_wrappers.TextLM): `modec run` generates with it.
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask"] + [
        f"past_key_values.{layer}.{kind}" for layer in (0, 1) for kind in ("key", "value")
    ]  # fmt: skip

    prompts = write_jsonl(tmp_path / "p.jsonl", SENTENCES * 2)
    calib = tmp_path / "calib.npz"
    r = modec("calib", "build", "--model", str(d), "--prompts", str(prompts), "--samples", "10",
              "-o", str(calib))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "10 samples (0 multimodal, 10 text-only)" in r.stdout

    out = tmp_path / "out"
    r = modec("compile", str(d), "--calib", str(calib), "--target", "none",
              "--sensitivity-samples", "4", "--cache-dir", str(cache), "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "exporting" not in r.stderr  # the export made by inspect is reused
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["model"] == str(d)

    r = modec("eval", str(out), "--data", str(calib), "--kl-to", str(d), "--json",
              "--cache-dir", str(cache))  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "simulated" and doc["reference_backend"] == "onnxruntime"
    kl = doc["kl"]
    assert kl["all"]["positions"] == kl["text"]["positions"] > 0
    assert kl["vision"]["positions"] == 0 and kl["vision"]["mean_kl"] is None
    assert 0 < kl["all"]["mean_kl"] < 0.5 and kl["all"]["top1_agreement"] > 0.5


def test_text_export_matches_transformers_with_left_padding(dirs):
    """Position ids come from the mask: a left-padded row gets the logits it has alone."""
    import torch
    import transformers as tf

    from modec import hf
    from modec.frontend import OrtRunner

    path = hf.cached_export(dirs["mixtral"], dirs["cache"])
    ids = np.array([[0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], dtype=np.int64)
    mask = (np.arange(6) >= np.array([[2], [0]])).astype(np.int64)
    got = OrtRunner(path)({"input_ids": ids, "attention_mask": mask})
    model = tf.AutoModelForCausalLM.from_pretrained(dirs["mixtral"], local_files_only=True).eval()
    with torch.no_grad():
        alone = model(input_ids=torch.from_numpy(ids[:1, 2:]), use_cache=False).logits.numpy()
        full = model(input_ids=torch.from_numpy(ids[1:]), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got[0, 2:], alone[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], full[0], rtol=1e-4, atol=1e-4)


# ---- a vision-language MoE ----------------------------------------------------------------


def test_vlm_export_takes_each_samples_own_image(dirs):
    """One image per sample, text-only rows in between: every row gets transformers' logits."""
    import onnx_ir as ir
    import torch
    import transformers as tf
    from PIL import Image

    from modec import hf
    from modec.frontend import OrtRunner
    from modec.moe.discover import find_moe

    d = dirs["llava"]
    path = hf.cached_export(d, dirs["cache"])
    runner = OrtRunner(path)
    assert [s.name for s in runner.inputs] == ["input_ids", "attention_mask", "pixel_values"] + [
        f"past_key_values.{layer}.{kind}" for layer in (0, 1) for kind in ("key", "value")
    ]  # a decoder with its KV cache; OrtRunner passes empty caches
    assert [r.num_experts for r in find_moe(ir.load(str(path)))] == [4, 4]
    proc = tf.AutoProcessor.from_pretrained(d, local_files_only=True)
    images = [Image.open(p) for p in draw_images(dirs["root"] / "i", 2)]
    mm = [proc(text=[f"<image> {s}"], images=[im], return_tensors="np")
          for s, im in zip(SENTENCES[:2], images, strict=True)]  # fmt: skip
    text = proc.tokenizer(SENTENCES[3], return_tensors="np")
    rows = [text, mm[0], mm[1]]  # a text-only row first: its placeholder image is skipped
    t = max(r["input_ids"].shape[1] for r in rows)
    ids = np.zeros((3, t), dtype=np.int64)
    mask = np.zeros((3, t), dtype=np.int64)
    pixels = np.zeros((3, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        ids[i, t - n :], mask[i, t - n :] = r["input_ids"][0], 1
        if "pixel_values" in r:
            pixels[i] = r["pixel_values"][0]
    got = runner({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})
    model = tf.AutoModelForImageTextToText.from_pretrained(d, local_files_only=True).eval()
    with torch.no_grad():
        for i, r in enumerate(rows):
            kw = {k: torch.from_numpy(np.asarray(v)) for k, v in r.items()}
            want = model(**kw, use_cache=False).logits.numpy()[0]
            n = r["input_ids"].shape[1]
            np.testing.assert_allclose(got[i, t - n :], want, rtol=1e-4, atol=1e-4)


def test_vlm_directory_calib_build_compile_and_kl(dirs, tmp_path):
    """Calibration, compile and KL; then generation: the artifact's decode entry drops the
    vision tower, and its greedy tokens (the image at the prompt only, then cached steps)
    equal the simulated model re-run over the whole sequence, image included."""
    from modec.runtime import load

    from modec import data, hf
    from modec.calibration import build
    from modec.driver import CompileOptions, compile_model
    from modec.evaluate import kl_divergence
    from modec.frontend import OrtRunner
    from modec.runners import SimulatedRunner
    from tests.generation.test_generate_python import reference_greedy

    d = dirs["llava"]
    images = draw_images(tmp_path / "images", 6)
    prompts = write_jsonl(tmp_path / "p.jsonl", ["<image> what is in the image",
                                                 {"prompt": "count the dots <image>"}])  # fmt: skip
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    calib = tmp_path / "calib.npz"
    res = build(d, calib, images=images[0].parent, prompts=prompts, text_only=texts, seed=3)
    assert (res.multimodal, res.text_only) == (6, 6) and res.vision_tokens == 6 * 16
    opts = CompileOptions(sensitivity_samples=4, target="llvm", cache_dir=str(dirs["cache"]))
    out = compile_model(d, calib, tmp_path / "out", opts)
    assert out.allocation is not None and len(out.allocation.widths) == 2
    ds = data.load(calib)
    ref = OrtRunner(hf.cached_export(d, dirs["cache"]))
    kl = kl_divergence(ref, SimulatedRunner(tmp_path / "out"), ds)
    assert kl.splits["vision"].positions == 96
    assert kl.splits["text"].positions + 96 == kl.splits["all"].positions
    assert 0 < kl.splits["all"].mean_kl < 0.5

    art = tmp_path / "out"
    gen = json.loads((art / "manifest.json").read_text())["sections"]["generation"]
    assert gen["decode"]["entry"] == "decode" and gen["prompt_only"] == ["pixel_values"]
    # Two multimodal samples and a text-only one, left-padded to one length.
    mm = np.flatnonzero(ds.multimodal)
    rows = np.array([mm[0], mm[1], np.flatnonzero(~ds.multimodal)[0]])
    (_, feeds), *_ = ds.subset(rows).batches(3)
    got = load(art).generate(feeds, max_new_tokens=5).tokens
    assert got == reference_greedy(art, feeds, 5)

    # `modec run --image`: processor.json describes the directory's processor, and a prompt
    # and image become what that processor makes of them.
    import transformers as tf
    from PIL import Image

    from modec.prompting import text_prompt

    proc_doc = json.loads((art / "processor.json").read_text())
    assert proc_doc["image_tokens"] == 16 and proc_doc["image_size"] == [IMAGE_SIZE] * 2
    inputs = {i["name"]: (i["dtype"], tuple(i["shape"])) for i in gen["decode"]["inputs"]}
    inputs["pixel_values"] = ("float32", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE))
    mine, _ = text_prompt(art, "<image> count the dots", images[0], inputs)
    theirs = tf.AutoProcessor.from_pretrained(d, local_files_only=True)(
        text=["<image> count the dots"], images=[Image.open(images[0])], return_tensors="np"
    )
    np.testing.assert_array_equal(mine["input_ids"], theirs["input_ids"])
    np.testing.assert_allclose(mine["pixel_values"], theirs["pixel_values"], atol=1e-5)
    r = modec("run", str(art), "--prompt", "<image> count the dots", "--image",
              str(images[0]), "--max-new-tokens", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr


def test_qwen3_vl_directory_takes_the_qwen3_vl_export(tmp_path):
    """Qwen3-VL-MoE loads as image-text-to-text and exports through export_qwen3_vl."""
    from modec import hf
    from tests.test_hf_families import _build_qwen3_vl_dir

    d = _build_qwen3_vl_dir(tmp_path / "qwen3vl")
    model = hf.load_model(d)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    path = hf.export_onnx(d, tmp_path / "x.onnx")
    import onnx_ir as ir

    from modec.moe.discover import find_moe

    names = [v.name for v in ir.load(str(path)).graph.inputs]
    assert names == ["input_ids", "attention_mask", "pixel_values"]
    assert [r.num_experts for r in find_moe(ir.load(str(path)))] == [4, 4]


def test_qwen3_moe_directory_exports_and_matches(tmp_path):
    """A second family: Qwen3-MoE (q/k norms, top-k renormalised) through the same export."""
    import onnx_ir as ir
    import torch
    import transformers as tf

    from modec import hf
    from modec.frontend import OrtRunner
    from modec.moe.discover import find_moe

    torch.manual_seed(2)
    cfg = tf.Qwen3MoeConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
        norm_topk_prob=True, max_position_embeddings=128,
    )  # fmt: skip
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    _randomize(model)
    model.save_pretrained(tmp_path / "qwen3moe")
    path = hf.cached_export(tmp_path / "qwen3moe", tmp_path / "cache")
    regions = find_moe(ir.load(str(path)))
    assert [(r.num_experts, r.form) for r in regions] == [(8, "stacked_gather")] * 2
    ids = np.array([[0, 5, 6, 7, 8], [9, 10, 11, 12, 13]], dtype=np.int64)
    mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    got = OrtRunner(path)({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        alone = model(input_ids=torch.from_numpy(ids[:1, 1:]), use_cache=False).logits.numpy()
        full = model(input_ids=torch.from_numpy(ids[1:]), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got[0, 1:], alone[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], full[0], rtol=1e-4, atol=1e-4)
