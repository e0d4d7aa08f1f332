"""Qwen3-VL's processor for `modec calib build`: no torchvision, the export's one image grid.

transformers' ``Qwen3VLProcessor`` cannot be built beside modec's CPU torch: it requires a
video processor, and every video processor imports torchvision. Its image half is
``Qwen2VLImageProcessor``, which transformers 5 still ships as a PIL + numpy class
(``Qwen2VLImageProcessorPil``, what ``AutoImageProcessor`` picks when torchvision is absent);
its text half is the tokenizer, the chat template and one replacement rule.
`Qwen3VLFixedGridProcessor` puts them together as ``Qwen3VLProcessor.__call__`` does, with one
change the export needs (`modec.hf_qwen3_vl` takes one fixed grid ``(1, n, n) =
qwen3_vl_grid(config)``, ``pixel_values [B, n², C·T·P²]``):

1. Every image is resized to ``n·patch_size`` pixels square, whatever its size and aspect
   ratio (stretched, not cropped), with the processor's resample filter through the PIL resize
   ``Qwen2VLImageProcessorPil.resize`` itself calls. ``Qwen3VLProcessor`` would instead keep the
   aspect ratio within ``size.shortest_edge``..``size.longest_edge`` pixels (``smart_resize``),
   a grid the export does not take.
2. ``Qwen2VLImageProcessorPil`` does every other step unchanged (``do_resize=False``): RGB
   conversion, rescale, normalisation with the config's ``image_mean`` / ``image_std``, the
   ``temporal_patch_size`` repetition of the one frame, and the patch order (``merge_size ×
   merge_size`` blocks, row-major over blocks): ``pixel_values [n², C·T·P²]``, exactly one
   image's rows of transformers' flattened layout (its ``image_grid_thw`` is ``[[1, n, n]]``).
3. The text: the processor's chat template (``chat_template.jinja`` / ``chat_template.json`` /
   ``processor_config.json``, read as ``ProcessorMixin.get_processor_dict`` reads them, and
   rendered as ``ProcessorMixin.apply_chat_template`` renders it) writes
   ``<|vision_start|><|image_pad|><|vision_end|>`` for the image; the ``<|image_pad|>``
   becomes ``n²/merge²`` of them (``Qwen3VLProcessor.replace_image_token``); then the
   tokenizer. The image tokens must sit between one vision start and one vision end token.

The directory must hold ``config.json`` (the grid, and the token ids checked against the
tokenizer's), the tokenizer files and ``preprocessor_config.json`` (or a transformers 5
``processor_config.json`` with an ``image_processor`` section) naming ``patch_size``,
``temporal_patch_size``, ``merge_size``, ``image_mean`` and ``image_std``: the class defaults
are Qwen2-VL's (patch 14, CLIP mean and std), so a missing key is an error, as is a value that
disagrees with ``config.json``'s ``vision_config``. Every error is one line naming the file and
the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modec.errors import ModelError
from modec.hf import CONFIG, PROCESSOR_FILES, TOKENIZER_FILES, _first_line, read_config
from modec.hf_qwen3_vl import qwen3_vl_grid

#: ``config.json`` model types that are Qwen3-VL (dense or MoE language model).
QWEN3_VL_MODEL_TYPES = frozenset({"qwen3_vl", "qwen3_vl_moe"})
PROCESSOR_CLASS = "Qwen3VLProcessor"
#: Keys the image processor config must name (the class defaults are Qwen2-VL's).
REQUIRED_KEYS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
#: ``Qwen3VLProcessor``'s tokens when the tokenizer names none.
IMAGE_TOKEN, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"

__all__ = [
    "QWEN3_VL_MODEL_TYPES",
    "Qwen3VLFixedGridProcessor",
    "is_qwen3_vl_dir",
    "load_qwen3_vl_processor",
]


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing or not one (transformers says why)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _processor_class(d: Path) -> str | None:
    for name in PROCESSOR_FILES:
        obj = _read_json(d / name)
        if obj is not None and isinstance(obj.get("processor_class"), str):
            return str(obj["processor_class"])
    return None


def is_qwen3_vl_dir(directory: str | os.PathLike[str]) -> bool:
    """A Qwen3-VL(-MoE) directory: by ``config.json``'s model type, else by its processor class."""
    d = Path(directory)
    if not d.is_dir():
        return False
    if (d / CONFIG).is_file():
        return read_config(d).get("model_type") in QWEN3_VL_MODEL_TYPES
    return _processor_class(d) == PROCESSOR_CLASS


@dataclass(frozen=True)
class _Tokens:
    """The processor's special tokens and their ids (checked against ``config.json``)."""

    image: str
    image_id: int
    start: str
    start_id: int
    end: str
    end_id: int


class Qwen3VLFixedGridProcessor:
    """``Qwen3VLProcessor`` for single images at one fixed grid (see the module docstring).

    It has the interface `modec.calibration` uses of a transformers processor:
    ``image_token`` / ``image_token_id``, ``chat_template``, ``apply_chat_template``,
    ``model_input_names`` and ``__call__(text=[prompt], images=[image])`` returning
    ``input_ids`` / ``attention_mask [1, T]`` and ``pixel_values [1, n², C·T·P²]``.
    """

    model_input_names = ("pixel_values",)

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        chat_template: str | None,
        grid: tuple[int, int, int],
        tokens: _Tokens,
        width: int,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.grid = grid
        self.tokens = tokens
        self.width = width  # C·T·P², one patch row
        merge = int(image_processor.merge_size)
        self.image_tokens = grid[0] * grid[1] * grid[2] // (merge * merge)
        self.image_size = grid[1] * int(image_processor.patch_size)  # pixels, square

    @property
    def image_token(self) -> str:
        return self.tokens.image

    @property
    def image_token_id(self) -> int:
        return self.tokens.image_id

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tokenize: Literal[False] = False,
        add_generation_prompt: bool = False,
    ) -> str:
        """The conversation rendered as ``ProcessorMixin.apply_chat_template`` renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        if self.chat_template is None:
            raise ValueError("the processor has no chat template")
        # Annotated ``-> str`` but returns ``(prompts, generation_indices)``.
        rendered: Any = render_jinja_template(
            conversations=[conversation], chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map,
        )  # fmt: skip
        return str(rendered[0][0])

    def pixel_values(self, image: Any) -> np.ndarray:
        """One image as ``[n², C·T·P²]`` float32 patches (steps 1-2 of the module docstring)."""
        from transformers.image_processing_backends import PilBackend
        from transformers.image_utils import ChannelDimension, SizeDict

        ip = self.image_processor
        chw = ip.process_image(image, do_convert_rgb=ip.do_convert_rgb)
        side = self.image_size
        # The resize Qwen2VLImageProcessorPil.resize makes after smart_resize, at the export's
        # size (its own override would pick the smart_resize size instead).
        size = SizeDict(height=side, width=side)
        resized = PilBackend.resize(ip, chw, size, resample=ip.resample)
        out = ip(resized, do_resize=False, do_convert_rgb=False,
                 input_data_format=ChannelDimension.FIRST, return_tensors="np")  # fmt: skip
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        grid = [int(x) for x in np.asarray(out["image_grid_thw"]).reshape(-1)]
        if grid != list(self.grid) or pixels.shape[1] != self.width:
            raise ValueError(
                f"the image gives grid {grid} and patches of {pixels.shape[1]} values; the "
                f"export takes grid {list(self.grid)} and {self.width} values (a "
                f"{chw.shape[0]}-channel image: set do_convert_rgb true in the processor config)"
            )
        return pixels

    def __call__(
        self,
        text: list[str],
        images: list[Any] | None = None,
        return_tensors: Literal["np"] = "np",
        add_special_tokens: bool = False,
    ) -> dict[str, np.ndarray]:
        """Token ids and patches of one prompt with at most one image."""
        if len(text) != 1:
            raise ValueError(f"{len(text)} prompts; the processor takes one at a time")
        prompt = text[0]
        images = list(images or [])
        tok = self.tokens
        found = prompt.count(tok.image)
        if len(images) > 1 or found != len(images):
            raise ValueError(
                f"{found} image tokens {tok.image!r} for {len(images)} image(s); one image per "
                "sample, written once"
            )
        pixels = [self.pixel_values(im) for im in images]
        prompt = prompt.replace(tok.image, tok.image * self.image_tokens)
        enc = self.tokenizer(prompt, return_tensors="np", add_special_tokens=add_special_tokens,
                             return_token_type_ids=False)  # fmt: skip
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if pixels:
            self._check_layout(ids[0])
        out = {"input_ids": ids, "attention_mask": np.asarray(enc["attention_mask"], np.int64)}
        if pixels:
            out["pixel_values"] = np.stack(pixels)
        return out

    def _check_layout(self, ids: np.ndarray) -> None:
        """``vision_start, image × k, vision_end``, once, as Qwen3-VL was trained on."""
        tok = self.tokens
        at = np.flatnonzero(ids == tok.image_id)
        first, last = (int(at[0]), int(at[-1])) if len(at) else (0, -1)
        ok = (
            len(at) == self.image_tokens
            and last - first + 1 == len(at)
            and first > 0
            and last + 1 < len(ids)
            and ids[first - 1] == tok.start_id
            and ids[last + 1] == tok.end_id
            and int((ids == tok.start_id).sum()) == 1
            and int((ids == tok.end_id).sum()) == 1
        )
        if not ok:
            raise ValueError(
                f"the image tokens are not wrapped once in {tok.start} ... {tok.end}; with a chat "
                f"template write only {tok.image} where the image goes, without one write "
                f"{tok.start}{tok.image}{tok.end}"
            )


def _image_config_file(d: Path) -> str:
    """The file transformers reads the image processor from (a nested section wins)."""
    nested = _read_json(d / "processor_config.json")
    if nested is not None and "image_processor" in nested:
        return "processor_config.json"
    return "preprocessor_config.json"


def _token(
    tokenizer: Any, attr: str, default: str, d: Path, key: str, want: Any
) -> tuple[str, int]:
    """A special token as ``Qwen3VLProcessor`` finds it, its id checked against config.json."""
    name = getattr(tokenizer, attr, None)
    token = name if isinstance(name, str) and name else default
    tid = tokenizer.convert_tokens_to_ids(token)
    unknown = tid == getattr(tokenizer, "unk_token_id", None) and token != tokenizer.unk_token
    if not isinstance(tid, int) or unknown:
        raise ModelError(
            f"{d}: the tokenizer has no token {token!r} (Qwen3-VL's {key}); copy the tokenizer "
            "files from the model's release"
        )
    if not isinstance(want, int):
        raise ModelError(f"{d}/{CONFIG}: no {key}; a Qwen3-VL config names it")
    if tid != want:
        raise ModelError(
            f"{d}: the tokenizer gives {token!r} id {tid} but {CONFIG} says {key} {want}; the "
            "tokenizer and the model must come from one release"
        )
    return token, tid


def load_qwen3_vl_processor(
    directory: str | os.PathLike[str],
) -> tuple[Qwen3VLFixedGridProcessor, Any]:
    """``(processor, tokenizer)`` of a Qwen3-VL directory (see the module docstring)."""
    d = Path(directory)
    if not (d / CONFIG).is_file():
        raise ModelError(
            f"{directory}: missing {CONFIG}; Qwen3-VL calibration needs it (the export's image "
            "grid comes from its vision_config): copy it from the model's release"
        )
    config_dict = read_config(d)
    if not any((d / f).is_file() for f in PROCESSOR_FILES):
        raise ModelError(
            f"{directory}: missing preprocessor_config.json (Qwen3-VL's image settings: "
            f"{', '.join(REQUIRED_KEYS)}); copy it from the model's release"
        )
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{directory}: missing tokenizer.json (no tokenizer files: one of "
            f"{', '.join(TOKENIZER_FILES)}); copy them from the model's release"
        )
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    where = _image_config_file(d)
    try:
        config: Any = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
        raw, _ = Qwen2VLImageProcessorPil.get_image_processor_dict(str(d), local_files_only=True)
        images: Any = Qwen2VLImageProcessorPil.from_pretrained(str(d), local_files_only=True)
        mixin: Any = transformers.ProcessorMixin
        processor_dict, _ = mixin.get_processor_dict(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(
            f"{directory}: transformers cannot read its Qwen3-VL config or image processor "
            f"({_first_line(exc)}); check {CONFIG} and {where}"
        ) from exc
    try:
        tokenizer: Any = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
        raise ModelError(
            f"{directory}: transformers cannot load its tokenizer ({_first_line(exc)}); check "
            "the tokenizer files"
        ) from exc
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ModelError(
            f"{d}/{where}: missing {', '.join(missing)}; the defaults are Qwen2-VL's (patch 14, "
            "CLIP mean and std), not Qwen3-VL's: copy the file from the model's release"
        )
    vision = config.vision_config
    for key, have, vkey in (
        ("patch_size", images.patch_size, "patch_size"),
        ("merge_size", images.merge_size, "spatial_merge_size"),
        ("temporal_patch_size", images.temporal_patch_size, "temporal_patch_size"),
    ):
        if int(have) != int(getattr(vision, vkey)):
            raise ModelError(
                f"{d}/{where}: {key} {have} but {CONFIG} has vision_config.{vkey} "
                f"{getattr(vision, vkey)}; the processor and the model must come from one release"
            )
    channels = int(vision.in_channels)
    for key in ("image_mean", "image_std"):
        size = np.asarray(getattr(images, key), dtype=np.float64).size
        if size not in (1, channels):
            raise ModelError(
                f"{d}/{where}: {key} has {size} values; the vision tower takes {channels} channels"
            )
    tokens = _Tokens(
        *_token(tokenizer, "image_token", IMAGE_TOKEN, d, "image_token_id",
                config_dict.get("image_token_id")),
        *_token(tokenizer, "vision_start_token", VISION_START, d, "vision_start_token_id",
                config_dict.get("vision_start_token_id")),
        *_token(tokenizer, "vision_end_token", VISION_END, d, "vision_end_token_id",
                config_dict.get("vision_end_token_id")),
    )  # fmt: skip
    template = processor_dict.get("chat_template")
    if isinstance(template, dict):
        template = template.get("default")
    width = channels * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    grid = qwen3_vl_grid(config)
    proc = Qwen3VLFixedGridProcessor(
        images, tokenizer, template if isinstance(template, str) else None, grid, tokens, width
    )
    return proc, tokenizer
