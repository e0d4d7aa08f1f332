"""``modec calib build``: a calibration set made by the model's own processor or tokenizer.

Sources of samples:

- ``--images DIR_OR_LIST`` with ``--prompts prompts.jsonl``: multimodal samples, one per
  image (a directory's image files in name order, or a text file listing one path per
  line). Each prompt line is a JSON object ``{"prompt": "...", "image": "name.png"}`` or a
  JSON string; a line that names an image is one sample with that image (relative to the
  ``--images`` directory, else to the prompts file), and the images no line names are given
  the lines without an image in turn (image ``i`` gets the ``i mod n``-th).
- ``--text-only texts.jsonl``: text-only samples, ``{"text": "..."}`` or a JSON string.
- ``--dataset PATH`` (a ``datasets`` data set saved with ``save_to_disk``) with
  ``--text-column`` and, for a VLM, ``--image-column``: a row whose image is empty is a
  text-only sample.
- A text MoE model (no processor): ``--prompts`` alone gives text samples; images are an
  error.

Each sample is rendered with the chat template when the processor (VLM) or tokenizer (text
model) has one (the image placed first, or where the prompt writes the image token), else
taken as written (a multimodal prompt then needs the image token, e.g. ``<image>``); then
tokenized and, for a VLM, processed with its image (image-token expansion, ``pixel_values``).
Qwen3-VL(-MoE) directories (``config.json`` model type ``qwen3_vl`` / ``qwen3_vl_moe``) use
`modec.qwen3_vl_processor` instead of ``AutoProcessor`` (transformers' ``Qwen3VLProcessor``
needs torchvision): every image resized to the export's one grid, ``pixel_values [n², C·T·P²]``
per sample, the grid written into the header's ``source``.
The modality mask comes from the image token id (2 vision, 1 text, 0 padding). Samples are
drawn and shuffled deterministically from the seed, keeping the multimodal / text-only ratio
of the sources; sequences are left-padded to the longest (modec's executor trims the columns
that are padding for a whole batch). Text-only samples of a VLM carry zero image inputs of
the same shape (their tokens never reference them). One image per sample.

Every problem (a missing or unreadable image, a missing column, a prompt without an image
placeholder where one is needed) is a one-line `BadInputError` (exit 3).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modec import data
from modec.calibration_sources import (
    Sample,
    read_jsonl,
    samples_from_dataset,
    samples_from_files,
)
from modec.errors import BadInputError
from modec.hf import load_processor
from modec.qwen3_vl_processor import (
    Qwen3VLFixedGridProcessor,
    is_qwen3_vl_dir,
    load_qwen3_vl_processor,
)

log = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask")
DEFAULT_MAX_TOKENS = 512

__all__ = ["BuildResult", "Sample", "build", "read_jsonl", "samples_from_dataset",
           "samples_from_files"]  # fmt: skip


@dataclass(frozen=True)
class BuildResult:
    """What `build` wrote."""

    path: Path
    samples: int
    multimodal: int
    text_only: int
    tokens: int  # the padded length T
    vision_tokens: int
    text_tokens: int

    def line(self) -> str:
        return (
            f"modec calib build: wrote {self.path}: {self.samples} samples ({self.multimodal} "
            f"multimodal, {self.text_only} text-only), {self.tokens} tokens per sample after "
            f"left padding; {self.vision_tokens} vision and {self.text_tokens} text tokens"
        )


def _choose(mm: list[Sample], text: list[Sample], samples: int | None, seed: int) -> list[Sample]:
    """Up to ``samples`` samples, the multimodal share kept, in a seeded order."""
    total = len(mm) + len(text)
    if total == 0:
        raise BadInputError("no samples: pass --prompts (and --images), --text-only or --dataset")
    if samples is not None and samples < 1:
        raise BadInputError(f"--samples {samples}: needs at least 1")
    n = total if samples is None else min(samples, total)
    if samples is not None and samples > total:
        log.warning("--samples %d: the sources hold %d samples; using all", samples, total)
    n_mm = round(n * len(mm) / total)
    if mm and n_mm == 0 and n > len(text):
        n_mm = 1
    n_text = min(n - n_mm, len(text))
    n_mm = n - n_text
    rng = np.random.default_rng(seed)
    pick = [mm[i] for i in sorted(rng.permutation(len(mm))[:n_mm])] + [
        text[i] for i in sorted(rng.permutation(len(text))[:n_text])
    ]
    return [pick[i] for i in rng.permutation(len(pick))]


class _Renderer:
    """Turns a `Sample` into token ids (and image inputs) with the model's own tools."""

    def __init__(self, processor: Any | None, tokenizer: Any, model: str) -> None:
        self.processor = processor
        self.tokenizer = tokenizer
        self.model = model
        self.image_token: str | None = None
        self.image_token_id: int | None = None
        if processor is not None:
            token = getattr(processor, "image_token", None)
            tid = getattr(processor, "image_token_id", None)
            if isinstance(token, str) and not isinstance(tid, int):
                tid = tokenizer.convert_tokens_to_ids(token)
            if not isinstance(token, str) or not isinstance(tid, int):
                raise BadInputError(
                    f"{model}: the processor names no image token; modec needs it to tell "
                    "vision tokens from text tokens"
                )
            self.image_token, self.image_token_id = token, int(tid)
        self.template = (
            getattr(processor, "chat_template", None)
            if processor is not None
            else getattr(tokenizer, "chat_template", None)
        )

    def _render(self, s: Sample, with_image: bool) -> str:
        token = self.image_token
        if token is not None:
            count = s.text.count(token)
            if not with_image and count:
                raise BadInputError(
                    f"{s.source}: a text-only prompt holds the image token {token!r}; remove "
                    "it or give the sample an image"
                )
            if with_image and count > 1:
                raise BadInputError(
                    f"{s.source}: {count} image tokens {token!r}; modec takes one image per sample"
                )
        if not self.template:
            if with_image and token is not None and token not in s.text:
                raise BadInputError(
                    f"{s.source}: no image placeholder {token!r} in the prompt; {self.model} "
                    f"has no chat template to place the image, so write {token!r} where the "
                    "image goes"
                )
            return s.text
        if self.processor is not None:
            content: list[dict[str, str]] = [{"type": "text", "text": s.text}]
            if with_image:
                before, after = "", s.text
                if token is not None and token in s.text:
                    before, _, after = s.text.partition(token)
                content = [{"type": "text", "text": before}] if before.strip() else []
                content.append({"type": "image"})
                if after.strip():
                    content.append({"type": "text", "text": after})
            messages: Any = [{"role": "user", "content": content}]
            rendered = self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": s.text}], tokenize=False, add_generation_prompt=True
            )
        rendered = str(rendered)
        if with_image and token is not None and token not in rendered:
            raise BadInputError(
                f"{s.source}: the chat template of {self.model} placed no image placeholder "
                f"{token!r}; write {token!r} in the prompt where the image goes"
            )
        return rendered

    def __call__(self, s: Sample) -> dict[str, np.ndarray]:
        with_image = s.image is not None
        text = self._render(s, with_image)
        special = not self.template  # a rendered template holds its special tokens already
        if with_image:
            assert s.image is not None and self.processor is not None
            image = s.image()
            try:
                out = self.processor(text=[text], images=[image], return_tensors="np",
                                     add_special_tokens=special)  # fmt: skip
            except (ValueError, TypeError, OSError) as exc:
                cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise BadInputError(
                    f"{s.source}: the processor rejects image {s.image_name} ({cause})"
                ) from exc
            names = set(getattr(self.processor, "model_input_names", ()) or ())
            arrays = {k: np.asarray(v) for k, v in out.items()
                      if k in TEXT_INPUTS or (k in names and k not in _TOKEN_KEYS)}  # fmt: skip
        else:
            out = self.tokenizer(text, return_tensors="np", add_special_tokens=special)
            arrays = {k: np.asarray(out[k]) for k in TEXT_INPUTS}
        for k in TEXT_INPUTS:
            arrays[k] = arrays[k][0].astype(np.int64)
        if with_image and not (arrays["input_ids"] == self.image_token_id).any():
            raise BadInputError(
                f"{s.source}: no image token {self.image_token!r} after processing; the "
                "prompt must reference its image"
            )
        for k, v in arrays.items():
            if k not in TEXT_INPUTS and v.ndim and v.shape[0] == 1:
                arrays[k] = v[0]  # the image axis of one image per sample
        return arrays


#: Per-token processor outputs other than ids and mask (dropped: modec's exports take none).
_TOKEN_KEYS = frozenset({"token_type_ids", "mm_token_type_ids"})


def build(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    text_only: str | os.PathLike[str] | None = None,
    dataset: str | os.PathLike[str] | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    split: str | None = None,
    samples: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
) -> BuildResult:
    """Build a calibration set for ``model`` (a local model directory) and write ``out``.

    ``max_tokens`` None is `DEFAULT_MAX_TOKENS`, plus the image tokens of a processor that
    gives every image the same number (Qwen3-VL at its fixed grid: 576 for the released
    models), so that the default leaves room for the text.
    """
    if max_tokens is not None and max_tokens < 2:
        raise BadInputError(f"--max-tokens {max_tokens}: needs at least 2")
    processor: Any
    if is_qwen3_vl_dir(model):
        processor, tokenizer = load_qwen3_vl_processor(model)
    else:
        processor, tokenizer = load_processor(model)
    vlm = processor is not None
    fixed = processor if isinstance(processor, Qwen3VLFixedGridProcessor) else None
    fixed_tokens = fixed.image_tokens if fixed is not None else None
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS + (fixed_tokens or 0)
    if dataset is not None:
        if any(x is not None for x in (images, prompts, text_only)):
            raise BadInputError(
                "--dataset replaces --images / --prompts / --text-only; pass one or the other"
            )
        if text_column is None:
            raise BadInputError(f"--dataset {dataset}: needs --text-column (the prompt column)")
        mm, text = samples_from_dataset(dataset, text_column, image_column, vlm, split, model)
    else:
        mm, text = samples_from_files(images, prompts, text_only, vlm, model)
    chosen = _choose(mm, text, samples, seed)
    render = _Renderer(processor, tokenizer, str(model))
    rows = [_fit(render(s), s, max_tokens, fixed_tokens) for s in chosen]
    inputs, modality = _collate(rows, chosen, render, tokenizer)
    header: dict[str, Any] = {
        "source": {"builder": "modec calib build", "model": str(model), "seed": seed,
                   "max_tokens": max_tokens},
    }  # fmt: skip
    if fixed is not None:
        side = fixed.image_size
        header["source"].update(image_grid_thw=list(fixed.grid), image_size=[side, side])
    if render.image_token_id is not None:
        header["image_token_id"] = render.image_token_id
    dest = Path(out)
    if not dest.parent.is_dir():
        raise BadInputError(f"-o {out}: no such directory {dest.parent}")
    data.save(dest, inputs, modality=modality, header=header, encodings=_encodings(inputs))
    n_mm = sum(s.image is not None for s in chosen)
    return BuildResult(
        path=dest, samples=len(chosen), multimodal=n_mm, text_only=len(chosen) - n_mm,
        tokens=int(modality.shape[1]), vision_tokens=int((modality == data.VISION).sum()),
        text_tokens=int((modality == data.TEXT).sum()),
    )  # fmt: skip


def _fit(
    arrays: dict[str, np.ndarray], s: Sample, max_tokens: int, image_tokens: int | None = None
) -> dict[str, np.ndarray]:
    """Keep a text-only sample's last ``max_tokens`` tokens; a multimodal one must fit.

    ``image_tokens``: what every image costs when the processor fixes it (the fix is then a
    larger ``--max-tokens``, not smaller images).
    """
    n = int(arrays["input_ids"].shape[0])
    if n <= max_tokens:
        return arrays
    if s.image is not None:
        fix = (
            f"raise --max-tokens to at least {n} (every image is {image_tokens} tokens at the "
            "export's fixed grid)"
            if image_tokens is not None
            else "raise --max-tokens or use smaller images (the image tokens cannot be cut)"
        )
        raise BadInputError(
            f"{s.source}: {n} tokens with image {s.image_name}, over --max-tokens {max_tokens}; "
            f"{fix}"
        )
    log.info("%s: %d tokens, keeping the last %d", s.source, n, max_tokens)
    return {k: (v[-max_tokens:] if k in TEXT_INPUTS else v) for k, v in arrays.items()}


def _collate(
    rows: list[dict[str, np.ndarray]], chosen: list[Sample], render: _Renderer, tokenizer: Any
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Left-pad the token inputs, stack the image inputs (zeros for text-only samples)."""
    t = max(int(r["input_ids"].shape[0]) for r in rows)
    n = len(rows)
    pad = tokenizer.pad_token_id
    pad_id = int(pad) if isinstance(pad, int) else 0
    ids = np.full((n, t), pad_id, dtype=np.int64)
    mask = np.zeros((n, t), dtype=np.int64)
    for i, r in enumerate(rows):
        k = int(r["input_ids"].shape[0])
        ids[i, t - k :] = r["input_ids"]
        mask[i, t - k :] = r["attention_mask"]
    inputs: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
    image_keys = sorted({k for r in rows for k in r if k not in TEXT_INPUTS})
    for key in image_keys:
        shapes = {(tuple(r[key].shape), str(r[key].dtype)) for r in rows if key in r}
        if len(shapes) > 1:
            first = next(i for i, r in enumerate(rows) if key in r)
            other = next(
                i for i, r in enumerate(rows)
                if key in r and (tuple(r[key].shape), str(r[key].dtype))
                != (tuple(rows[first][key].shape), str(rows[first][key].dtype))
            )  # fmt: skip
            raise BadInputError(
                f"{chosen[other].image_name}: the processor gives {key} of shape "
                f"{list(rows[other][key].shape)} but {list(rows[first][key].shape)} for "
                f"{chosen[first].image_name}; resize the images to one size"
            )
        (shape, dtype) = shapes.pop()
        stacked = np.zeros((n, *shape), dtype=dtype)
        for i, r in enumerate(rows):
            if key in r:
                stacked[i] = r[key]
        inputs[key] = stacked
    if render.image_token_id is None:
        modality = np.where(mask == 1, data.TEXT, data.PAD).astype(np.int8)
    else:
        modality = data.derive_modality(ids, render.image_token_id, mask)
    return inputs, modality


def _encodings(inputs: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Store pixels as uint8 where they are exactly ``k / 255`` (as decoded in float32)."""
    out: dict[str, dict[str, Any]] = {}
    for name, arr in inputs.items():
        if name in TEXT_INPUTS or arr.dtype != np.float32 or not arr.size:
            continue
        scale = 1.0 / 255.0
        codes = np.round(arr / np.float32(scale))
        if codes.min() < 0 or codes.max() > 255:
            continue
        back = codes.astype(np.uint8).astype(np.float32) * np.float32(scale)
        if np.array_equal(back, arr):
            out[name] = {"stored": "uint8", "scale": scale, "offset": 0.0}
    return out
