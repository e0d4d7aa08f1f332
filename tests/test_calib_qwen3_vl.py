"""`modec calib build` for Qwen3-VL-MoE (modec.qwen3_vl_processor), then `modec compile`.

The directory is the tiny random Qwen3-VL-MoE of `tests.test_hf_families` (8x8 patch grid of
16-pixel patches, merge 2: 128x128-pixel images, 16 image tokens) with what a release ships
beside the weights, all written here (nothing is downloaded): a WordLevel tokenizer whose
special tokens have the config's ids, ``preprocessor_config.json`` as the Qwen3-VL releases
write it (``Qwen2VLImageProcessorFast``, patch 16, mean and std 0.5) and ``chat_template.json``
holding a Qwen3-VL-style template (``<|im_start|>`` turns, an image item rendered as
``<|vision_start|><|image_pad|><|vision_end|>``).

What is checked:

- against transformers' own ``Qwen3VLProcessor`` (its ``apply_chat_template`` and ``__call__``,
  built with no video processor, which it needs only for videos and which needs torchvision):
  the same text, token ids and ``pixel_values`` for an image transformers resizes to the grid;
- the patch order against the vision tower's own positions
  (``transformers.vision_utils.get_vision_position_ids``): patch ``k`` holds the normalised
  pixels of the block at its ``(h, w)``, ``temporal_patch_size`` times;
- the built set's logits through modec's export equal transformers' model fed the same
  pixels in its flattened layout with ``image_grid_thw`` (per sample, and two images in one
  batch);
- ``modec calib build`` then ``modec compile DIR --calib`` on the command line;
- every problem with the directory or a prompt is one line, exit 3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modec import data
from modec.cli import main
from tests.test_hf import SENTENCES, draw_images, write_jsonl

# The ids the tiny config of tests.test_hf_families gives its vision tokens (vocab 64).
IMAGE_ID, VIDEO_ID, START_ID, END_ID = 60, 61, 62, 63
GRID, PATCH, MERGE, TEMPORAL = 8, 16, 2, 2
IMAGE_TOKENS = GRID * GRID // (MERGE * MERGE)
WIDTH = 3 * TEMPORAL * PATCH * PATCH

#: Qwen3-VL's chat template, cut to what a one-turn user message uses.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for item in message.content %}"
    "{%- if item.type == 'image' or 'image' in item %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
#: preprocessor_config.json as the Qwen3-VL releases write it.
PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": PATCH,
    "temporal_patch_size": TEMPORAL, "merge_size": MERGE, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}  # fmt: skip


def build_qwen_tokenizer():  # type: ignore[no-untyped-def]
    """A WordLevel tokenizer on `SENTENCES` whose vision tokens have the config's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = sorted({w for s in SENTENCES for w in s.split()} | {"user", "assistant", "?"})
    vocab = {t: i for i, t in enumerate(specials + words)}
    assert len(vocab) < IMAGE_ID
    vocab |= {"<|image_pad|>": IMAGE_ID, "<|video_pad|>": VIDEO_ID,
              "<|vision_start|>": START_ID, "<|vision_end|>": END_ID}  # fmt: skip
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t in vocab if t.startswith("<")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                   unk_token="<unk>", eos_token="<|im_end|>")  # fmt: skip


def add_release_files(d: Path) -> Path:
    """The tokenizer, preprocessor_config.json and chat_template.json beside config.json."""
    build_qwen_tokenizer().save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.test_hf_families import _build_qwen3_vl_dir

    root = tmp_path_factory.mktemp("calib_qwen3_vl")
    d = add_release_files(_build_qwen3_vl_dir(root / "qwen3vl"))
    draw_images(root / "images", 4)
    prompts = write_jsonl(root / "prompts.jsonl", [
        "what is in the image", {"prompt": "count the dots <|image_pad|> please"},
    ])  # fmt: skip
    texts = write_jsonl(root / "texts.jsonl", [{"text": s} for s in SENTENCES[:3]])
    return {"dir": d, "images": root / "images", "prompts": prompts, "texts": texts,
            "cache": root / "cache", "root": root}  # fmt: skip


def processor_files_only(src: Path, dest: Path) -> Path:
    """A copy of a model directory without its weights (calib build does not read them)."""
    dest.mkdir()
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy(p, dest / p.name)
    return dest


def reference_processor(d: Path) -> Any:
    """transformers' ``Qwen3VLProcessor`` itself, with no video processor.

    Its constructor checks each sub-processor's class against transformers' registries, and
    the video registry cannot load without torchvision; the subclass skips that check for the
    absent video processor only. Images and text go through the real methods.
    """
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    class Qwen3VLProcessorNoVideo(tf.Qwen3VLProcessor):  # type: ignore[misc]
        def check_argument_for_proper_class(self, argument_name, argument):  # type: ignore[no-untyped-def]
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    return Qwen3VLProcessorNoVideo(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(d, local_files_only=True),
        tokenizer=tf.AutoTokenizer.from_pretrained(d, local_files_only=True),
        video_processor=None, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def run(capsys, *args: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("modec: error")]
    assert len(lines) == 1, err
    return lines[0]


def messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


# ---- the processor: transformers' own Qwen3VLProcessor, and the vision tower's patch order ---


def test_same_text_ids_and_pixels_as_transformers_qwen3_vl_processor(qdir, tmp_path):
    """A square image goes through the real processor's own resize (its size band pinned to
    the grid); a non-square one is first stretched by the resize transformers' PIL image
    processor calls. Either way: the same prompt, ids, mask and pixels, bit for bit."""
    from PIL import Image
    from transformers.image_transforms import resize
    from transformers.image_utils import ChannelDimension

    from modec.qwen3_vl_processor import load_qwen3_vl_processor

    proc, _ = load_qwen3_vl_processor(qdir["dir"])
    assert (proc.grid, proc.image_tokens, proc.image_size) == ((1, GRID, GRID), 16, 128)
    ref = reference_processor(qdir["dir"])
    assert (proc.image_token, proc.image_token_id) == (ref.image_token, ref.image_token_id)
    side = GRID * PATCH
    rng = np.random.default_rng(5)
    square = Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8))
    wide = Image.open(draw_images(tmp_path, 4)[3])  # 48 x 42 pixels, RGB
    for image, text in ((square, "count the dots"), (wide, "what is in the image")):
        prompt = proc.apply_chat_template(messages(text), add_generation_prompt=True)
        want_prompt = ref.apply_chat_template(messages(text), tokenize=False,
                                              add_generation_prompt=True)  # fmt: skip
        assert prompt == want_prompt
        assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
        got = proc(text=[prompt], images=[image])
        if image is square:
            band = {"shortest_edge": side * side, "longest_edge": side * side}
            want = ref(text=[prompt], images=[image], return_tensors="np", size=band)
        else:
            chw = np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)
            stretched = resize(chw, (side, side), resample=ref.image_processor.resample,
                               data_format=ChannelDimension.FIRST,
                               input_data_format=ChannelDimension.FIRST)  # fmt: skip
            want = ref(text=[prompt], images=[Image.fromarray(np.moveaxis(stretched, 0, -1))],
                       return_tensors="np", do_resize=False)  # fmt: skip
        np.testing.assert_array_equal(want["image_grid_thw"], [[1, GRID, GRID]])
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
        np.testing.assert_array_equal(got["pixel_values"][0], want["pixel_values"])
        ids = got["input_ids"][0]
        assert (ids == IMAGE_ID).sum() == IMAGE_TOKENS
        first = int(np.flatnonzero(ids == IMAGE_ID)[0])
        assert ids[first - 1] == START_ID and ids[first + IMAGE_TOKENS] == END_ID


def test_patch_order_is_the_vision_towers(qdir, tmp_path):
    """Patch ``k`` is the block the vision tower places at position ``k`` (merge-size blocks),
    in the ``[C, T, P, P]`` view its patch embedding takes, ``T`` equal frames; the pixels are
    the image stretched to the grid (PIL bicubic), rescaled and normalised with mean/std 0.5."""
    import torch
    from PIL import Image
    from transformers.vision_utils import get_vision_position_ids

    from modec.qwen3_vl_processor import load_qwen3_vl_processor

    proc, _ = load_qwen3_vl_processor(qdir["dir"])
    image = Image.open(draw_images(tmp_path, 3)[2])  # 48 x 40: stretched, not cropped
    pixels = proc.pixel_values(image)
    assert pixels.shape == (GRID * GRID, WIDTH) and pixels.dtype == np.float32
    side = GRID * PATCH
    rgb = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC))
    norm = ((rgb.astype(np.float64) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)  # [C, H, W]
    where = get_vision_position_ids(torch.tensor([[1, GRID, GRID]]), MERGE).numpy()  # (h, w)
    assert not np.array_equal(where[:, 0] * GRID + where[:, 1], np.arange(GRID * GRID))
    patches = pixels.reshape(GRID * GRID, 3, TEMPORAL, PATCH, PATCH)
    for k, (h, w) in enumerate(where):
        block = norm[:, h * PATCH : (h + 1) * PATCH, w * PATCH : (w + 1) * PATCH]
        for t in range(TEMPORAL):
            np.testing.assert_allclose(patches[k, :, t], block, rtol=0, atol=1e-6)


# ---- the built set: modec's export gives transformers' logits; compile takes it -------------


@pytest.fixture(scope="module")
def built(qdir: dict[str, Path]) -> data.Dataset:
    from modec.calibration import build

    out = qdir["root"] / "calib.npz"
    res = build(qdir["dir"], out, images=qdir["images"], prompts=qdir["prompts"],
                text_only=qdir["texts"], seed=0)  # fmt: skip
    assert (res.multimodal, res.text_only, res.vision_tokens) == (4, 3, 4 * IMAGE_TOKENS)
    return data.load(out)


def test_built_set_layout(built):
    ds = built
    ids, mask, pixels = (ds.inputs[k] for k in ("input_ids", "attention_mask", "pixel_values"))
    assert set(ds.inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert pixels.shape == (7, GRID * GRID, WIDTH) and pixels.dtype == np.float32
    assert ds.header["image_token_id"] == IMAGE_ID
    assert ds.header["source"]["image_grid_thw"] == [1, GRID, GRID]
    assert ds.header["source"]["image_size"] == [128, 128]
    assert ds.header["source"]["max_tokens"] == 512 + IMAGE_TOKENS
    vision = (ds.modality == data.VISION).sum(1)
    assert sorted(vision.tolist()) == [0] * 3 + [IMAGE_TOKENS] * 4
    assert not pixels[vision == 0].any() and all(pixels[i].any() for i in np.flatnonzero(vision))
    assert ((ids == START_ID).sum(1) == (vision > 0)).all()
    pad = ids[mask == 0]
    assert (pad == 0).all()  # <|endoftext|>, left padding


def test_built_set_gives_transformers_logits_through_the_export(qdir, built):
    """Every row of the set (left-padded, text-only rows among them) through modec's export
    equals transformers' model on that sample alone, fed the set's pixels in its flattened
    layout with ``image_grid_thw``; and two images in one transformers batch
    (``pixel_values [2·n², D]``, two grid rows) equal their rows too."""
    import torch
    import transformers as tf

    from modec import hf
    from modec.frontend import OrtRunner

    ds = built
    ids, mask, pixels = (ds.inputs[k] for k in ("input_ids", "attention_mask", "pixel_values"))
    got = OrtRunner(hf.cached_export(qdir["dir"], qdir["cache"]))(dict(ds.inputs))
    model = tf.AutoModelForImageTextToText.from_pretrained(qdir["dir"], local_files_only=True)
    model = model.eval()
    grid = torch.tensor([[1, GRID, GRID]])
    worst = 0.0
    with torch.no_grad():
        for i in range(len(ids)):
            row = torch.from_numpy(ids[i][mask[i] == 1][None])
            kw: dict[str, Any] = {}
            if (row == IMAGE_ID).any():
                kw = dict(pixel_values=torch.from_numpy(pixels[i]), image_grid_thw=grid,
                          mm_token_type_ids=(row == IMAGE_ID).long())  # fmt: skip
            want = model(input_ids=row, **kw).logits.numpy()[0]
            mine = got[i, mask[i] == 1]
            np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-4)
            worst = max(worst, float(np.abs(mine - want).max()))
        lengths = mask.sum(1)
        mm = np.flatnonzero((ids == IMAGE_ID).any(1))
        pair = next([a, b] for a in mm for b in mm if a < b and lengths[a] == lengths[b])
        t = int(lengths[pair[0]])
        rows = torch.from_numpy(ids[pair][:, -t:])
        want = model(
            input_ids=rows, pixel_values=torch.from_numpy(pixels[pair].reshape(-1, WIDTH)),
            image_grid_thw=grid.repeat(2, 1), mm_token_type_ids=(rows == IMAGE_ID).long(),
        ).logits.numpy()  # fmt: skip
        np.testing.assert_allclose(got[pair][:, -t:], want, rtol=1e-4, atol=1e-4)
        worst = max(worst, float(np.abs(got[pair][:, -t:] - want).max()))
    print(f"qwen3-vl calib build: max |export - transformers| logits {worst:.2e}")


def test_calib_build_then_compile_on_the_command_line(qdir, tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    args = ["calib", "build", "--model", str(qdir["dir"]), "--images", str(qdir["images"]),
            "--prompts", str(qdir["prompts"]), "--text-only", str(qdir["texts"]), "-o"]  # fmt: skip
    code, stdout, err = run(capsys, *args, str(calib))
    assert code == 0, err
    assert "7 samples (4 multimodal, 3 text-only)" in stdout and "64 vision" in stdout
    assert run(capsys, *args, str(tmp_path / "again.npz"))[0] == 0
    assert (tmp_path / "again.npz").read_bytes() == calib.read_bytes()  # deterministic
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "compile", str(qdir["dir"]), "--calib", str(calib), "--target", "none",
        "--sensitivity-samples", "4", "--cache-dir", str(qdir["cache"]), "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["model"] == str(qdir["dir"])
    # Every layer routed the set's 4 x 16 image tokens to its top-2 experts.
    counts = report["sections"]["collect-routing"]["count_vision"]
    assert [sum(layer) for layer in counts] == [4 * IMAGE_TOKENS * 2] * 2


@pytest.mark.slow  # about a minute on two cores: the llvm build of a vision tower + 2 MoE layers
def test_calib_build_compile_llvm_compiled_matches_simulated_and_kl(qdir, tmp_path, capsys):
    """#14's chain for Qwen3-VL-MoE from a folder of images and a prompts file: `calib build`,
    `compile DIR --target llvm`, compiled = simulated on the built set, `eval --kl-to`."""
    from modec.runners import CompiledRunner, SimulatedRunner

    calib = tmp_path / "calib.npz"
    code, _, err = run(
        capsys, "calib", "build", "--model", str(qdir["dir"]), "--images", str(qdir["images"]),
        "--prompts", str(qdir["prompts"]), "--text-only", str(qdir["texts"]), "-o", str(calib),
    )  # fmt: skip
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "compile", str(qdir["dir"]), "--calib", str(calib), "--target", "llvm",
        "--method", "mc-moe", "--cache-dir", str(qdir["cache"]), "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert (out / "manifest.json").is_file()
    ds = data.load(calib)
    worst = 0.0
    for _, feeds in ds.batches(3):  # image and text-only rows, left-padded together
        want = SimulatedRunner(out)(feeds)
        got = CompiledRunner(out)(feeds)
        assert got.shape == want.shape and np.isfinite(want).all()
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst < 1e-4, f"compiled vs simulated: max relative error {worst:.2e}"
    code, stdout, err = run(
        capsys, "eval", str(out), "--data", str(calib), "--kl-to", str(qdir["dir"]), "--json",
        "--cache-dir", str(qdir["cache"]),
    )  # fmt: skip
    assert code == 0, err
    kl = json.loads(stdout)["kl"]
    assert kl["vision"]["positions"] == 4 * IMAGE_TOKENS and kl["text"]["positions"] > 0
    assert np.isfinite(kl["all"]["mean_kl"]) and kl["all"]["mean_kl"] >= 0
    print(f"qwen3-vl-moe: compiled vs simulated max relative error {worst:.2e}, "
          f"KL {kl['all']['mean_kl']:.3e}")  # fmt: skip


# ---- errors: one line, exit 3 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_mean_std", "preprocessor_config.json: missing image_mean, image_std; the "
                             "defaults are Qwen2-VL's"),
        ("patch_size", "preprocessor_config.json: patch_size 14 but config.json has "
                       "vision_config.patch_size 16"),
        ("token_id", "the tokenizer gives '<|image_pad|>' id 60 but config.json says "
                     "image_token_id 59"),
        ("no_config", "missing config.json; Qwen3-VL calibration needs it"),
        ("no_preprocessor", "missing preprocessor_config.json (Qwen3-VL's image settings"),
        ("unwrapped_without_template", "the image tokens are not wrapped once in "
                                       "<|vision_start|> ... <|vision_end|>"),
        ("wrapped_twice_with_template", "without one write "
                                        "<|vision_start|><|image_pad|><|vision_end|>"),
        ("too_long", "over --max-tokens 20; raise --max-tokens to at least 2"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_3(qdir, tmp_path, capsys, case, message):
    d = processor_files_only(qdir["dir"], tmp_path / "model")
    prompts = write_jsonl(tmp_path / "p.jsonl", ["what is in the image"])
    extra: list[str] = []
    if case == "missing_mean_std":
        pre = {k: v for k, v in PREPROCESSOR.items() if k not in ("image_mean", "image_std")}
        (d / "preprocessor_config.json").write_text(json.dumps(pre))
    elif case == "patch_size":
        (d / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "patch_size": 14}))
    elif case == "token_id":
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "image_token_id": 59}))
    elif case == "no_config":
        (d / "config.json").unlink()
    elif case == "no_preprocessor":
        (d / "preprocessor_config.json").unlink()
    elif case == "unwrapped_without_template":
        (d / "chat_template.json").unlink()
        write_jsonl(prompts, ["<|image_pad|> what is in the image"])
    elif case == "wrapped_twice_with_template":
        write_jsonl(prompts, ["<|vision_start|><|image_pad|><|vision_end|> what is in the image"])
    elif case == "too_long":
        extra = ["--max-tokens", "20"]
    out = tmp_path / "c.npz"
    code, _, err = run(capsys, "calib", "build", "--model", str(d), "--images",
                       str(qdir["images"]), "--prompts", str(prompts), *extra,
                       "-o", str(out))  # fmt: skip
    assert code == 3, err
    assert message in one_error(err)
    assert not out.exists()
