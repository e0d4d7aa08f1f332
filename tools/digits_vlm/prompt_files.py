"""``tokenizer.json`` and ``processor.json`` of digits-vlm (`modec.prompting`), so that
``modec run OUT --prompt "<image> what is at row one col two ?" --image scene.png`` works on
its compiles: `modec compile` copies both from beside the model.

    python -m tools.digits_vlm.prompt_files --out examples/digits-vlm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.digits_vlm import scenes


def tokenizer_json() -> str:
    """A word-level tokenizer over the 58-word vocabulary: whitespace-split words, ``<bos>``
    prepended, an unknown word read as ``<pad>`` (which the model never attends to)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=dict(scenes.TOKEN), unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", scenes.BOS_ID)]
    )
    text: str = tok.to_str(pretty=True)
    return text


def processor_json() -> str:
    """A 64×64 grey image in [0, 1] (8-bit levels / 255, as the data sets store them); 64
    ``<image>`` tokens, one per 8×8 patch."""
    doc = {
        "input": "pixel_values",
        "image_token": scenes.VOCAB[scenes.IMAGE_ID],
        "image_tokens": scenes.NUM_PATCHES,
        "image_size": [scenes.CANVAS, scenes.CANVAS],
        "channels": 1,
        "rescale": 1.0 / scenes.PIXEL_LEVELS,
        "mean": [0.0],
        "std": [1.0],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write(out: Path) -> None:
    (out / "tokenizer.json").write_text(tokenizer_json() + "\n")
    (out / "processor.json").write_text(processor_json())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("examples/digits-vlm"))
    write(ap.parse_args().out)


if __name__ == "__main__":
    main()
