"""``modec run OUT``: a prompt from text and an image, token ids or a data set; tokens stream
to stdout, timings to stderr (docs/generation.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modec import data
from modec.cli import main
from modec.prompting import Tokenizer


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["run", *argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def as_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:  # type: ignore[type-arg]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_data_prompt_matches_the_python_api(cached_vlm, capsys) -> None:  # type: ignore[no-untyped-def]
    import modec.runtime

    out = str(cached_vlm["out"])
    doc = as_json(capsys, out, "--data", str(cached_vlm["eval"]), "--sample", "1",
                  "--max-new-tokens", "4")  # fmt: skip
    ds = data.load(cached_vlm["eval"]).subset(np.asarray([1]))
    _, feeds = next(ds.batches(1))
    want = modec.runtime.load(out).generate(feeds, max_new_tokens=4).tokens[0]
    assert doc["tokens"] == want and doc["decode_steps"] == 3
    assert doc["text"] == Tokenizer(cached_vlm["out"] / "tokenizer.json").decode(want)


def test_text_and_image_prompt_equals_the_data_sample(cached_vlm, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A multimodal eval sample typed as text with its image saved as a PNG gives the tokens
    of the sample itself: the tokenizer and the processor rebuild its inputs exactly."""
    from PIL import Image

    ds = data.load(cached_vlm["eval"])
    i = int(np.flatnonzero(ds.multimodal)[0])
    tok = Tokenizer(cached_vlm["out"] / "tokenizer.json")
    ids = [int(t) for t in ds.inputs["input_ids"][i] if t not in (0, 1, 2)]  # pad, bos, image
    question = tok.decode(ids)
    levels = np.rint(ds.inputs["pixel_values"][i, 0] * 255).astype(np.uint8)
    Image.fromarray(levels, mode="L").save(tmp_path / "scene.png")
    out = str(cached_vlm["out"])
    by_text = as_json(capsys, out, "--prompt", f"<image> {question}", "--image",
                      str(tmp_path / "scene.png"), "--max-new-tokens", "3")  # fmt: skip
    by_data = as_json(capsys, out, "--data", str(cached_vlm["eval"]), "--sample", str(i),
                      "--max-new-tokens", "3")  # fmt: skip
    assert by_text["tokens"] == by_data["tokens"]
    assert by_text["tokens"][0] == int(ds.answer[i])  # type: ignore[index]


def test_stream_text_only_prompt_and_ids(cached_vlm, capsys) -> None:  # type: ignore[no-untyped-def]
    out = str(cached_vlm["out"])
    code, stdout, err = run(capsys, out, "--prompt", "what is 4 plus 6 ?",
                            "--max-new-tokens", "2")  # fmt: skip
    assert code == 0 and stdout.split()[0] == "10"
    assert "tokens/s" in err and "prefill 7 tokens" in err
    tok = Tokenizer(cached_vlm["out"] / "tokenizer.json")
    ids = " ".join(str(t) for t in tok.encode("what is 4 plus 6 ?"))
    doc = as_json(capsys, out, "--prompt-ids", ids, "--max-new-tokens", "2")
    assert tok.decode(doc["tokens"]).split()[0] == "10"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give one prompt"),
        (["--prompt", "is 9 even ?", "--prompt-ids", "1 2"], "give one prompt"),
        (["--prompt-ids", "1 x"], "not integers"),
        (["--data", "DATA", "--image", "a.png"], "--image goes with --prompt"),
        (["--prompt", "is there a 5 ?", "--image", "IMG"], "no <image>"),
        (["--prompt", "<image> is there a 5 ?", "--image", "IMG"], "not an image"),
        (["--prompt", "is 9 even ?", "--top-p", "0"], "top_p"),
    ],
)
def test_bad_run_arguments(cached_vlm, capsys, tmp_path: Path, argv, message) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "bad.png").write_text("not a png")
    argv = [str(cached_vlm["eval"]) if a == "DATA" else a for a in argv]
    argv = [str(tmp_path / "bad.png") if a == "IMG" else a for a in argv]
    code, _, err = run(capsys, str(cached_vlm["out"]), *argv)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
