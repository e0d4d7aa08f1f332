"""``tokenizer.json`` and ``processor.json`` of digits-vlm (`modec.prompting`), so that
``modec run OUT --prompt "<image> what is at row one col two ?" --image scene.png`` works on
its compiles: `modec compile` copies both from beside the model.

    python -m tools.digits_vlm.prompt_files --out examples/digits-vlm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tools.digits_vlm import scenes


def tokenizer_json(task: Any = scenes) -> str:
    """A word-level tokenizer over the task's vocabulary (digits-vlm: 58 words):
    whitespace-split words, ``<bos>`` prepended, an unknown word read as ``<pad>`` (which the
    model never attends to)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=dict(task.TOKEN), unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", task.BOS_ID)]
    )
    text: str = tok.to_str(pretty=True)
    return text


def processor_json(task: Any = scenes) -> str:
    """A grey image in [0, 1] (8-bit levels / 255, as the data sets store them; digits-vlm:
    64×64), one ``<image>`` token per 8×8 patch."""
    doc = {
        "input": "pixel_values",
        "image_token": task.VOCAB[task.IMAGE_ID],
        "image_tokens": task.NUM_PATCHES,
        "image_size": [task.CANVAS, task.CANVAS],
        "channels": 1,
        "rescale": 1.0 / task.PIXEL_LEVELS,
        "mean": [0.0],
        "std": [1.0],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write(out: Path, task: Any = scenes) -> None:
    (out / "tokenizer.json").write_text(tokenizer_json(task) + "\n")
    (out / "processor.json").write_text(processor_json(task))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("examples/digits-vlm"))
    write(ap.parse_args().out)


if __name__ == "__main__":
    main()
