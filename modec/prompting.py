"""Prompts for ``modec run``: text through the model's tokenizer, an image through a small
processor description, into the inputs of a generating artifact (docs/generation.md).

An output directory may hold, beside the artifact, the files `modec compile` found beside
the model (an ``.onnx`` file's folder or a Hugging Face directory):

- ``tokenizer.json``: a Hugging Face ``tokenizers`` tokenizer (encode the prompt, decode the
  generated tokens);
- ``processor.json``: how an image becomes the model's image input, as modec reads it::

      {"input": "pixel_values", "image_token": "<image>", "image_tokens": 64,
       "image_size": [64, 64], "channels": 1, "rescale": 0.00392156862745098,
       "mean": [0.0], "std": [1.0], "resample": "bilinear"}

  ``<image>`` in the prompt text stands for ``image_tokens`` copies of the image token;
  the image is resized to ``image_size`` (H, W) with PIL's ``resample`` filter (nearest,
  bilinear (default) or bicubic), read as grey (1 channel) or RGB (3), multiplied by
  ``rescale`` and normalized by ``mean``/``std`` per channel. `modec compile` of a
  LLaVA-style Hugging Face directory writes one from the directory's processor where a plain
  resize reproduces it (`modec.hf_wrappers.processor_description`). A ``.npy`` image
  is taken as the model's pixel values already (``[C, H, W]`` or ``[H, W]``).

Models whose processors do more (dynamic resolution, image grids) need their own
preprocessing: ``modec run --data`` takes a prompt from a modec data set instead.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modec.errors import BadInputError, DataError

#: processor.json's ``resample`` values and PIL's names for them.
_FILTERS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC"}

#: The prompt files `copy_prompt_files` carries into an output directory.
PROMPT_FILES = ("tokenizer.json", "processor.json")


def copy_prompt_files(model_path: str | Path, dest: Path) -> list[str]:
    """Copy the `PROMPT_FILES` found beside the model (an ``.onnx`` file's folder, or the
    Hugging Face directory itself) into ``dest``; return the names copied."""
    src = Path(model_path)
    folder = src if src.is_dir() else src.parent
    copied = []
    for name in PROMPT_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dest / name)
            copied.append(name)
    return copied


class Tokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``)."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as exc:  # not a base dependency: it comes with modec[hf]
            raise BadInputError(
                f"{path} needs the tokenizers package: pip install 'modec[hf]' (or tokenizers)"
            ) from exc

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type
            raise DataError(f"{path}: not a tokenizers tokenizer ({exc})") from exc
        self.path = path

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text).ids
        return ids

    def token_id(self, token: str) -> int | None:
        tid: int | None = self._tok.token_to_id(token)
        return tid

    def decode(self, ids: list[int]) -> str:
        text: str = self._tok.decode(ids, skip_special_tokens=False)
        return text


@dataclass(frozen=True)
class Processor:
    """A ``processor.json`` (see the module docstring)."""

    input: str
    image_token: str
    image_tokens: int
    image_size: tuple[int, int]
    channels: int
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str = "bilinear"

    @staticmethod
    def load(path: Path) -> Processor:
        try:
            d: dict[str, Any] = json.loads(path.read_text())
            proc = Processor(
                str(d["input"]), str(d["image_token"]), int(d["image_tokens"]),
                (int(d["image_size"][0]), int(d["image_size"][1])), int(d["channels"]),
                float(d.get("rescale", 1.0)), tuple(float(v) for v in d.get("mean", [0.0])),
                tuple(float(v) for v in d.get("std", [1.0])), str(d.get("resample", "bilinear")),
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise DataError(f"{path}: not a modec processor description ({exc!r})") from exc
        if proc.channels not in (1, 3) or min(proc.image_size) < 1 or proc.image_tokens < 1:
            raise DataError(f"{path}: channels must be 1 or 3, sizes and image_tokens >= 1")
        if proc.resample not in _FILTERS:
            raise DataError(f"{path}: resample must be one of {', '.join(_FILTERS)}")
        return proc

    def pixels(self, image: Path) -> np.ndarray:
        """The model's pixel values ``[1, C, H, W]`` float32 of an image file."""
        c, (h, w) = self.channels, self.image_size
        if image.suffix.lower() == ".npy":
            try:
                loaded: np.ndarray = np.load(image, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise BadInputError(f"{image}: not a .npy array ({exc})") from exc
            arr = loaded.astype(np.float32)
            arr = arr[None] if arr.ndim == 2 else arr
            if arr.shape != (c, h, w):
                raise BadInputError(
                    f"{image}: pixel values of shape {list(arr.shape)}; the model takes {[c, h, w]}"
                )
            return arr[None]
        try:
            from PIL import Image

            with Image.open(image) as opened:
                mode = "L" if c == 1 else "RGB"
                filt = getattr(Image.Resampling, _FILTERS[self.resample])
                resized = opened.convert(mode).resize((w, h), filt)
                arr = np.asarray(resized, dtype=np.float32)
        except ImportError as exc:
            raise BadInputError("reading images needs pillow: pip install pillow") from exc
        except OSError as exc:
            raise BadInputError(f"{image}: not an image pillow can read ({exc})") from exc
        arr = (arr[None] if c == 1 else arr.transpose(2, 0, 1)) * self.rescale
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        return ((arr - mean) / std)[None].astype(np.float32)


def text_prompt(
    out: Path, text: str, image: Path | None, inputs: dict[str, tuple[str, tuple[Any, ...]]]
) -> tuple[dict[str, np.ndarray], Tokenizer]:
    """The inputs of one prompt (batch 1) from text and an optional image.

    Args:
        out: the output directory (``tokenizer.json``, ``processor.json``).
        text: the prompt; ``<image>`` (the processor's token) marks where the image goes.
        image: an image file, or None.
        inputs: the prompt inputs of the artifact: name -> (dtype, shape).
    """
    tok_path = out / "tokenizer.json"
    if not tok_path.is_file():
        raise BadInputError(
            f"{out} has no tokenizer.json: put it beside the model before compiling, or pass "
            "--prompt-ids / --data"
        )
    tok = Tokenizer(tok_path)
    proc_path = out / "processor.json"
    proc = Processor.load(proc_path) if proc_path.is_file() else None
    feeds: dict[str, np.ndarray] = {}
    if proc is not None and proc.input in inputs:
        if image is not None:
            if proc.image_token not in text:
                raise BadInputError(
                    f"the prompt has no {proc.image_token}; put it where the image goes"
                )
            text = text.replace(proc.image_token, " ".join([proc.image_token] * proc.image_tokens))
            feeds[proc.input] = proc.pixels(image)
        else:  # a text-only prompt: the image input is all zeros, no image token reads it
            dtype, shape = inputs[proc.input]
            feeds[proc.input] = np.zeros((1, *(int(d) for d in shape[1:])), dtype)
    elif image is not None:
        raise BadInputError(
            f"{out} has no processor.json for this model's image input; pass --data to take "
            "a prompt with its image from a modec data set"
        )
    ids = tok.encode(text)
    if not ids:
        raise BadInputError("the prompt is empty after tokenization")
    feeds["input_ids"] = np.asarray([ids], np.int64)
    feeds["attention_mask"] = np.ones((1, len(ids)), np.int64)
    return feeds, tok
