"""`modec calib build`: calibration sets made by the model's own tokenizer or processor.

Tokenizers are trained here with `tokenizers`; images are drawn with Pillow; the processors
are transformers' ``LlavaProcessor`` with a ``CLIPImageProcessorPil`` (no download, no
torchvision). Qwen3-VL (whose ``Qwen3VLProcessor`` needs torchvision) goes through
`modec.qwen3_vl_processor`: tests/test_calib_qwen3_vl.py. The digits-vlm processor (its
58-word vocabulary, 64 ``<image>`` tokens per 64x64 grayscale image, pixels k/255) makes a set
the bundled model's tiny twin (``tiny_vlm``) compiles with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modec import data
from modec.cli import main
from tests.test_hf import (
    CHAT_TEMPLATE,
    SENTENCES,
    build_processor,
    build_tokenizer,
    draw_images,
    write_jsonl,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calib_build")
    text = root / "text_model"
    build_tokenizer(CHAT_TEMPLATE).save_pretrained(text)
    vlm = root / "vlm"
    build_processor(build_tokenizer()).save_pretrained(vlm)
    images = root / "images"
    draw_images(images, 6)
    prompts = write_jsonl(root / "prompts.jsonl", [
        "<image> what is in the image",
        {"prompt": "describe the picture <image> please"},
        {"prompt": "count the dots <image>", "image": "img05.png"},
    ])  # fmt: skip
    texts = write_jsonl(root / "texts.jsonl", [{"text": s} for s in SENTENCES])
    return {"text": text, "vlm": vlm, "images": images, "prompts": prompts, "texts": texts,
            "root": root}  # fmt: skip


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["calib", "build", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("modec: error")]
    assert len(lines) == 1, err
    return lines[0]


def test_text_model_prompts_use_the_chat_template_and_left_pad(dirs, tmp_path, capsys):
    from transformers import AutoTokenizer

    prompts = write_jsonl(tmp_path / "p.jsonl", SENTENCES)
    out = tmp_path / "c.npz"
    code, stdout, err = run(capsys, "--model", str(dirs["text"]), "--prompts", str(prompts),
                            "-o", str(out))  # fmt: skip
    assert code == 0, err
    assert "6 samples (0 multimodal, 6 text-only)" in stdout
    ds = data.load(out)
    assert set(ds.inputs) == {"input_ids", "attention_mask"}
    assert "image_token_id" not in ds.header
    tok = AutoTokenizer.from_pretrained(dirs["text"], local_files_only=True)
    user, bot, pad = (tok.convert_tokens_to_ids(t) for t in ("<user>", "<bot>", "<pad>"))
    ids, mask = ds.inputs["input_ids"], ds.inputs["attention_mask"]
    assert (ids[:, -1] == bot).all() and (mask[:, -1] == 1).all()
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths, strict=True):
        assert (row[: len(row) - n] == pad).all() and row[len(row) - n] == user  # left padding
    assert sorted(lengths.tolist()) == sorted(len(s.split()) + 2 for s in SENTENCES)
    np.testing.assert_array_equal(ds.modality, mask.astype(np.int8))  # 1 text, 0 pad


def test_text_model_refuses_images(dirs, tmp_path, capsys):
    code, _, err = run(capsys, "--model", str(dirs["text"]), "--images", str(dirs["images"]),
                       "--prompts", str(dirs["prompts"]),
                       "-o", str(tmp_path / "c.npz"))  # fmt: skip
    assert code == 3
    assert "is a text-only model (no image processor" in one_error(err)
    assert not (tmp_path / "c.npz").exists()


def test_vlm_images_prompts_and_text_only(dirs, tmp_path, capsys):
    out = tmp_path / "c.npz"
    args = ["--model", str(dirs["vlm"]), "--images", str(dirs["images"]), "--prompts",
            str(dirs["prompts"]), "--text-only", str(dirs["texts"]), "-o", str(out)]  # fmt: skip
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert "12 samples (6 multimodal, 6 text-only)" in stdout
    ds = data.load(out)
    image_id = ds.header["image_token_id"]
    ids, pixels = ds.inputs["input_ids"], ds.inputs["pixel_values"]
    assert pixels.shape == (12, 3, 32, 32) and pixels.dtype == np.float32
    vision = (ds.modality == data.VISION).sum(1)
    assert sorted(vision.tolist()) == [0] * 6 + [16] * 6  # (32/8)^2 patches per image
    np.testing.assert_array_equal(ds.modality == data.VISION, ids == image_id)
    text_rows = vision == 0
    assert not pixels[text_rows].any() and all(pixels[i].any() for i in np.flatnonzero(~text_rows))
    assert ds.multimodal.sum() == 6
    # Deterministic from the seed: the same bytes again, another order with another seed.
    again = tmp_path / "again.npz"
    assert run(capsys, *args[:-1], str(again))[0] == 0
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.npz"
    assert run(capsys, *args[:-1], str(other), "--seed", "7")[0] == 0
    ds2 = data.load(other)
    assert not np.array_equal(ds2.inputs["input_ids"], ids)
    assert sorted(map(bytes, ds2.inputs["input_ids"])) == sorted(map(bytes, ids))


def test_samples_keep_the_multimodal_share(dirs, tmp_path, capsys):
    out = tmp_path / "c.npz"
    code, stdout, err = run(
        capsys, "--model", str(dirs["vlm"]), "--images", str(dirs["images"]), "--prompts",
        str(dirs["prompts"]), "--text-only", str(dirs["texts"]), "--samples", "4", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "4 samples (2 multimodal, 2 text-only)" in stdout


def test_image_pairing_by_name_and_in_turn(dirs, tmp_path):
    """A line naming an image gets it; the others take the remaining images in turn."""
    from modec.calibration import samples_from_files

    mm, text = samples_from_files(dirs["images"], dirs["prompts"], None, vlm=True)
    assert not text
    pairs = {Path(s.image_name).name: s.text for s in mm}
    assert pairs["img05.png"] == "count the dots <image>"
    assert [pairs[f"img0{i}.png"] for i in range(5)] == [
        "<image> what is in the image", "describe the picture <image> please",
    ] * 2 + ["<image> what is in the image"]  # fmt: skip
    listing = tmp_path / "list.txt"
    listing.write_text(f"{dirs['images']}/img01.png\n{dirs['images']}/img03.png\n")
    mm, _ = samples_from_files(listing, write_jsonl(tmp_path / "p.jsonl", ["<image> a"]), None,
                               vlm=True)  # fmt: skip
    assert [Path(s.image_name).name for s in mm] == ["img01.png", "img03.png"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("bad_image", "broken.png: not a readable image"),
        ("no_placeholder", "p.jsonl:1: no image placeholder '<image>' in the prompt"),
        ("text_with_image_token", "t.jsonl:1: a text-only prompt holds the image token"),
        ("two_images", "2 image tokens '<image>'; modec takes one image per sample"),
        ("bad_json", "p.jsonl:2: not valid JSON"),
        ("missing_listed_image", "nope.png: no such image (listed in"),
        ("too_long", "over --max-tokens 8; raise --max-tokens"),
        ("no_images_left", "names no image and no --images are left to pair it with"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_3(dirs, tmp_path, capsys, case, message):
    images = tmp_path / "images"
    draw_images(images, 2)
    prompts = write_jsonl(tmp_path / "p.jsonl", ["<image> what is in the image"])
    extra: list[str] = []
    if case == "bad_image":
        (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "no_placeholder":
        write_jsonl(prompts, ["what is in the image"])
    elif case == "text_with_image_token":
        extra = ["--text-only", str(write_jsonl(tmp_path / "t.jsonl", ["a <image> b"]))]
    elif case == "two_images":
        write_jsonl(prompts, ["<image> and <image>"])
    elif case == "bad_json":
        prompts.write_text('"<image> ok"\n{"prompt": \n')
    elif case == "missing_listed_image":
        listing = tmp_path / "list.txt"
        listing.write_text("images/img00.png\nimages/nope.png\n")
        images = listing
    elif case == "too_long":
        extra = ["--max-tokens", "8"]
    elif case == "no_images_left":
        write_jsonl(prompts, [{"prompt": "<image> a", "image": "img00.png"},
                              {"prompt": "<image> b", "image": "img01.png"},
                              "<image> c"])  # fmt: skip
    out = tmp_path / "c.npz"
    code, _, err = run(capsys, "--model", str(dirs["vlm"]), "--images", str(images),
                       "--prompts", str(prompts), *extra, "-o", str(out))  # fmt: skip
    assert code == 3, err
    assert message in one_error(err)
    assert not out.exists()


def test_usage_errors(dirs, tmp_path, capsys):
    assert main(["calib"]) == 2
    assert "calib needs a subcommand" in capsys.readouterr().err
    code, _, err = run(capsys, "--model", str(dirs["vlm"]), "-o", str(tmp_path / "c.npz"))
    assert code == 2 and "calib build needs samples" in one_error(err)
    code, _, err = run(capsys, "--model", str(tmp_path), "--prompts", str(dirs["prompts"]),
                       "-o", str(tmp_path / "c.npz"))  # fmt: skip
    assert code == 3 and "missing tokenizer.json" in one_error(err)


def test_from_a_datasets_data_set(dirs, tmp_path, capsys):
    import datasets
    from PIL import Image

    images = sorted(dirs["images"].glob("*.png"))[:3]
    rows = {
        "image": [Image.open(p) for p in images] + [None, None],
        "question": ["<image> what is in the image", "describe <image>", "count <image>",
                     "the sum of two and three", "count the dots"],
    }  # fmt: skip
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "c.npz"
    base = ["--model", str(dirs["vlm"]), "--dataset", str(tmp_path / "ds"), "-o", str(out)]
    code, stdout, err = run(capsys, *base, "--image-column", "image", "--text-column",
                            "question")  # fmt: skip
    assert code == 0, err
    assert "5 samples (3 multimodal, 2 text-only)" in stdout
    assert (data.load(out).modality == data.VISION).sum() == 3 * 16
    code, _, err = run(capsys, *base, "--image-column", "picture", "--text-column", "question")
    assert code == 3
    assert "no column 'picture' (--image-column); its columns are ['image', 'question']" in (
        one_error(err))  # fmt: skip
    code, _, err = run(capsys, "--model", str(dirs["text"]), "--dataset", str(tmp_path / "ds"),
                       "--image-column", "image", "--text-column", "question",
                       "-o", str(out))  # fmt: skip
    assert code == 3 and "is a text-only model" in one_error(err)


# ---- digits-vlm: a processor for the bundled model's vocabulary and images ------------------


def build_digits_processor(path: Path) -> Path:
    """digits-vlm as transformers would ship it: word tokens, ``<image>`` x 64 per image."""
    import transformers as tf
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tools.digits_vlm import scenes

    tok = Tokenizer(models.WordLevel(vocab=dict(scenes.TOKEN), unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    images = CLIPImageProcessorPil(
        size={"height": scenes.CANVAS, "width": scenes.CANVAS}, do_resize=False,
        do_center_crop=False, do_normalize=False, do_convert_rgb=False,
        resample=Image.Resampling.NEAREST,
    )  # fmt: skip
    proc = tf.LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=scenes.PATCH,
                             vision_feature_select_strategy="full",
                             image_token="<image>")  # fmt: skip
    proc.save_pretrained(path)
    return path


def test_digits_vlm_set_compiles_with_the_tiny_digits_model(tiny_vlm, tmp_path, capsys):
    from PIL import Image

    from modec.driver import CompileOptions, compile_model
    from modec.frontend import input_specs, load_onnx_proto
    from tools.digits_vlm import scenes

    proc = build_digits_processor(tmp_path / "digits")
    pool = scenes.digit_pools()["calib"]
    rng = np.random.default_rng(0)
    canvases = []
    for i in range(6):
        canvas, _ = scenes.render(pool, rng, 1 + i % 3)
        canvases.append(canvas)
        codes = np.round(canvas * scenes.PIXEL_LEVELS).astype(np.uint8)
        Image.fromarray(codes, mode="L").save(tmp_path / f"scene{i}.png")
    (tmp_path / "scenes").mkdir()
    for i in range(6):
        (tmp_path / f"scene{i}.png").rename(tmp_path / "scenes" / f"scene{i}.png")
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        "<bos> <image> how many digits ?", "<bos> <image> what is the largest digit ?",
    ])  # fmt: skip
    texts = write_jsonl(tmp_path / "t.jsonl", ["<bos> what is 3 plus 4 ?", "<bos> is 7 odd ?"])
    out = tmp_path / "calib.npz"
    code, _, err = run(capsys, "--model", str(proc), "--images", str(tmp_path / "scenes"),
                            "--prompts", str(prompts), "--text-only", str(texts), "-o",
                            str(out))  # fmt: skip
    assert code == 0, err
    ds = data.load(out)
    assert ds.header["image_token_id"] == scenes.IMAGE_ID
    assert (ds.modality == data.VISION).sum(1).tolist().count(scenes.NUM_PATCHES) == 6
    mm = np.flatnonzero(ds.multimodal)
    first = ds.inputs["input_ids"][mm[0]]
    words = [scenes.VOCAB[t] for t in first[ds.inputs["attention_mask"][mm[0]] == 1]]
    assert words[:2] == ["<bos>", "<image>"] and words[-1] == "?"
    # The model sees the scenes' pixels: k/255 (the processor rounds k · (1/255) from float64,
    # 1 ulp from the float32 product the digits tools store, so the set keeps float32).
    for i in mm:
        err = [np.abs(ds.inputs["pixel_values"][i, 0] - c).max() for c in canvases]
        assert min(err) <= 1e-7
    data.check_against(ds, input_specs(load_onnx_proto(tiny_vlm["model"])))
    opts = CompileOptions(sensitivity_samples=4, target="none", cache_dir=None)
    res = compile_model(tiny_vlm["model"], out, tmp_path / "out", opts)
    assert res.allocation is not None
    sections = json.loads((tmp_path / "out" / "report.json").read_text())["sections"]
    assert sections  # routing statistics over the set's text and vision tokens were reported
