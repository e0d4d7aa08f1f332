"""Local Hugging Face model directories: check the files, load, export to ONNX (cached).

A directory holds ``config.json``, the weights as ``*.safetensors`` (one file, or shards
listed by ``model.safetensors.index.json``) and, for calibration, the tokenizer or processor
files. modec never downloads: every load passes ``local_files_only=True`` and a missing file
is a one-line `ModelError` naming it.

- Text MoE models load with ``AutoModelForCausalLM``; vision-language models (a config with a
  ``vision_config``) with ``AutoModelForImageTextToText``. Both with
  ``experts_implementation="batched_mm"`` (the experts then export as stacked gathers, the
  form modec canonicalizes) and eager attention (an explicit Softmax, where find-attention
  reads the attention the key-vision filter needs), in the checkpoint's dtype; a checkpoint
  that is not float32 is cast to float32 for the export, since the calibration statistics,
  GPTQ and onnxruntime on the CPU run in float32.
- The export is the dynamo exporter (``torch.onnx.export(dynamo=True)``, opset 18) of a
  wrapper with dynamic batch and sequence axes returning the logits: ``(input_ids,
  attention_mask)`` for a text model; ``(input_ids, attention_mask, pixel_values)`` for a
  LLaVA-style VLM (a ``vision_tower`` and a ``multi_modal_projector``, one fixed-size image
  per sample, ``pixel_values [B, C, H, W]``), where each sample's image tokens take its own
  image's features. Position ids come from the attention mask (as ``generate`` computes
  them), so a left-padded sample gets the logits it has alone. Other VLMs are a one-line
  error from `export_onnx`: export them yourself.
- Qwen3-VL-MoE (flattened patches, ``image_grid_thw``, M-RoPE, deepstack features) exports
  through `export_qwen3_vl` (Python only for now; `export_onnx` still refuses it and says so),
  with transformers' own export patches (``transformers.exporters``) and everything the
  image grid decides precomputed for one fixed grid ``(1, n, n)``, ``n = √num_position_embeddings``
  (the vision tower's learned position table): ``(input_ids, attention_mask, pixel_values
  [B, n², C·T·P²])``, one image per sample, M-RoPE positions computed from the mask and the
  image tokens as ``get_rope_index`` does.
- `onnx_model` / `cached_export` export once into ``CACHE/hf/``, keyed by the directory's
  files (names, sizes, modification times, ``config.json``'s bytes) and the transformers /
  torch versions; weights larger than 1 GiB go to external data beside the ``.onnx``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modec.errors import ModelError

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHT_INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
#: Bumped whenever the exported graph for the same directory changes.
EXPORT_VERSION = "modec.hf-export/1"
ONNX_NAME = "model.onnx"
#: Above this many bytes of parameters the export writes external data.
EXTERNAL_DATA_BYTES = 1 << 30

__all__ = [
    "export_qwen3_vl",
    "is_hf_dir",
    "is_vlm",
    "load_model",
    "load_processor",
    "onnx_model",
    "qwen3_vl_grid",
    "read_config",
    "weight_files",
]


def is_hf_dir(path: str | os.PathLike[str]) -> bool:
    """A directory with a ``config.json`` (then the other files are checked on use)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` as a dict; a missing or unreadable file is a one-line error."""
    d = Path(directory)
    if not d.is_dir():
        raise ModelError(
            f"{directory}: no such directory; pass a local Hugging Face model directory "
            "(config.json + *.safetensors); modec does not download models"
        )
    path = d / CONFIG
    if not path.is_file():
        raise ModelError(
            f"{directory}: missing {CONFIG}; a Hugging Face model directory needs config.json "
            "and its *.safetensors weights (modec does not download: copy the files there)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not readable JSON ({_first_line(exc)})") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a directory; a missing one is a one-line error naming it."""
    d = Path(directory)
    index = d / WEIGHT_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(
                f"{index}: not a readable safetensors index ({_first_line(exc)})"
            ) from exc
        for shard in shards:
            if not (d / shard).is_file():
                raise ModelError(
                    f"{directory}: missing {shard} (listed in {WEIGHT_INDEX}); copy every "
                    "shard into the directory (modec does not download)"
                )
        return [d / s for s in shards]
    found = sorted(d.glob("*.safetensors"))
    if found:
        return found
    other = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f"; it holds {other[0]}, which modec does not read: re-save the model with "
        "save_pretrained(safe_serialization=True)"
        if other
        else " (modec does not download: copy the weights there)"
    )
    raise ModelError(f"{directory}: missing {WEIGHTS} (no *.safetensors weights){hint}")


def is_vlm(config: dict[str, Any]) -> bool:
    """A vision-language model: its config nests a vision tower's config."""
    return "vision_config" in config


def _image_token_id(config: dict[str, Any]) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def load_processor(directory: str | os.PathLike[str]) -> tuple[Any | None, Any]:
    """``(processor, tokenizer)`` of a directory; the processor is None for text models.

    The processor is loaded when the directory has processor files and it has an image
    processor; else the tokenizer alone. A directory with neither is a one-line error.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"{directory}: no such directory; pass a local model directory")
    has_proc = any((d / f).is_file() for f in PROCESSOR_FILES)
    has_tok = any((d / f).is_file() for f in TOKENIZER_FILES)
    if not has_proc and not has_tok:
        raise ModelError(
            f"{directory}: missing tokenizer.json (no tokenizer or processor files: one of "
            f"{', '.join(TOKENIZER_FILES + PROCESSOR_FILES)}); copy them from the model's "
            "release (modec does not download)"
        )
    import transformers

    try:
        if has_proc:
            auto: Any = transformers.AutoProcessor
            proc: Any = auto.from_pretrained(str(d), local_files_only=True)
            tok = getattr(proc, "tokenizer", None) or proc
            if getattr(proc, "image_processor", None) is None:
                proc = None
        else:
            proc = None
            tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
        raise ModelError(
            f"{directory}: transformers cannot load its "
            f"{'processor' if has_proc else 'tokenizer'} ({_first_line(exc)}); check the "
            "tokenizer and processor files"
        ) from exc
    return proc, tok


def load_model(directory: str | os.PathLike[str]) -> Any:
    """The transformers model of a directory, in eval mode, float32 (see the module doc)."""
    config = read_config(directory)
    weight_files(directory)
    import torch
    import transformers

    vlm = is_vlm(config)
    cls: Any = (
        transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    )
    try:
        with _quiet():
            model: Any = cls.from_pretrained(
                str(directory), experts_implementation="batched_mm", local_files_only=True,
                dtype="auto", attn_implementation="eager",
            )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as exc:
        kind = "an image-text-to-text" if vlm else "a causal LM"
        raise ModelError(
            f"{directory}: transformers cannot load it as {kind} model ({_first_line(exc)}); "
            "check config.json and the safetensors files"
        ) from exc
    model = model.eval()
    if model.dtype != torch.float32:
        log.info("%s: %s checkpoint, exported in float32", directory, model.dtype)
        model = model.float()
    model.config.use_cache = False
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars, Python warnings or info logs from transformers / torch.onnx."""
    import warnings

    from transformers.utils import logging as transformers_logging

    tf_logging: Any = transformers_logging
    bars = tf_logging.is_progress_bar_enabled()
    level = tf_logging.get_verbosity()
    onnx_log = logging.getLogger("torch.onnx")
    onnx_level = onnx_log.level
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(onnx_level)
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _wrappers() -> tuple[type[Any], type[Any]]:
    import torch

    def positions(attention_mask: torch.Tensor) -> torch.Tensor:
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    class TextLM(torch.nn.Module):
        """``(input_ids, attention_mask) -> logits``."""

        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return self.m(
                input_ids=input_ids, attention_mask=attention_mask,
                position_ids=positions(attention_mask), use_cache=False,
            ).logits  # fmt: skip

    class ImageTextLM(torch.nn.Module):
        """``(input_ids, attention_mask, pixel_values) -> logits``, one image per sample.

        LLaVA-style: the vision tower's features at ``vision_feature_layer`` (less the CLS
        token for the ``default`` strategy) go through the projector, and sample ``b``'s
        ``k``-th image token takes its own image's ``k``-th feature. A text-only sample
        carries a placeholder image (zeros) that none of its tokens takes. transformers'
        own forward concatenates the features of the whole batch (``list(features)``),
        which fixes the batch size in an export and mixes samples up when only some have
        images.
        """

        def __init__(self, m: Any, image_token_id: int) -> None:
            super().__init__()
            self.m = m
            self.image_token_id = image_token_id
            self.layer = m.config.vision_feature_layer
            self.strategy = m.config.vision_feature_select_strategy

        def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            inner = self.m.model
            out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
            hidden = [out.hidden_states[i] for i in layers]
            if self.strategy == "default":
                hidden = [h[:, 1:] for h in hidden]
            feats: torch.Tensor = inner.multi_modal_projector(torch.cat(hidden, dim=-1))
            return feats

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            pixel_values: torch.Tensor,
        ) -> Any:  # fmt: skip
            embeds = self.m.get_input_embeddings()(input_ids)
            feats = self.features(pixel_values.to(embeds.dtype))  # [B, N, D]
            is_image = input_ids == self.image_token_id
            rank = (is_image.to(torch.int64).cumsum(1) - 1).clamp(0, feats.shape[1] - 1)
            index = rank.unsqueeze(-1).expand(-1, -1, feats.shape[-1])
            embeds = torch.where(is_image.unsqueeze(-1), feats.gather(1, index), embeds)
            return self.m(
                inputs_embeds=embeds, attention_mask=attention_mask,
                position_ids=positions(attention_mask), use_cache=False,
            ).logits  # fmt: skip

    return TextLM, ImageTextLM


def _vlm_sample(directory: Path, image_token_id: int) -> dict[str, Any]:
    """Two samples with one image each, made by the directory's own processor."""
    import numpy as np
    from PIL import Image

    proc, _ = load_processor(directory)
    if proc is None:
        raise ModelError(
            f"{directory}: a vision-language model needs its processor files "
            f"({' or '.join(PROCESSOR_FILES)}) to export; copy them from the model's release"
        )
    token = getattr(proc, "image_token", None)
    if not isinstance(token, str):
        raise ModelError(f"{directory}: the processor names no image_token; cannot export")
    size = _processor_image_size(proc.image_processor)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))
        for _ in range(2)
    ]
    out = proc(text=[f"{token} a", f"{token} b"], images=images, return_tensors="pt",
               padding=True)  # fmt: skip
    extra = sorted(
        k for k in out if k not in ("input_ids", "attention_mask", "pixel_values")
        and k in getattr(proc, "model_input_names", ())
    )  # fmt: skip
    pixels = out.get("pixel_values")
    if extra or pixels is None or pixels.ndim != 4 or pixels.shape[0] != 2:
        shape = None if pixels is None else list(pixels.shape)
        raise ModelError(
            f"{directory}: its processor returns {sorted(out)} (pixel_values {shape}); modec "
            "exports vision-language models whose processor gives one pixel_values [C, H, W] "
            "per image (LLaVA-style) — export this model to ONNX yourself and pass the file"
        )
    ids = out["input_ids"]
    if int((ids == image_token_id).sum()) == 0:
        raise ModelError(
            f"{directory}: the processor's image token {token!r} is not the config's "
            f"image_token_id {image_token_id}"
        )
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _processor_image_size(image_processor: Any) -> tuple[int, int]:
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if size is None:
            continue
        h, w = _size_field(size, "height"), _size_field(size, "width")
        if isinstance(h, int) and isinstance(w, int):
            return h, w
        edge = _size_field(size, "shortest_edge")
        if isinstance(edge, int):
            return edge, edge
    return 224, 224


def _size_field(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def export_onnx(directory: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Load ``directory`` and export it to ``path`` (see the module docstring)."""
    import torch

    d = Path(directory)
    config = read_config(d)
    model = load_model(d)
    text_lm, image_text_lm = _wrappers()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=4096)
    tokens = {0: batch, 1: seq}
    if is_vlm(config):
        image_token_id = _image_token_id(config)
        if image_token_id is None:
            raise ModelError(f"{d}/{CONFIG}: a vision-language config without image_token_id")
        inner = getattr(model, "model", None)
        if _is_qwen3_vl(model):
            return _export_qwen3_vl_model(d, model, path)
        if not all(hasattr(inner, a) for a in ("vision_tower", "multi_modal_projector")) or not all(
            hasattr(model.config, a)
            for a in ("vision_feature_layer", "vision_feature_select_strategy")
        ):  # fmt: skip
            raise ModelError(
                f"{d}: {type(model).__name__} is neither LLaVA-style (a vision_tower and a "
                "multi_modal_projector) nor Qwen3-VL; modec exports those vision-language models "
                "only — export this one to ONNX yourself and pass the file"
            )
        sample = _vlm_sample(d, image_token_id)
        wrapper: Any = image_text_lm(model, image_token_id)
        names = ["input_ids", "attention_mask", "pixel_values"]
        shapes: dict[str, Any] = {"input_ids": tokens, "attention_mask": tokens,
                                  "pixel_values": {0: batch}}  # fmt: skip
        args = tuple(sample[n] for n in names)
    else:
        vocab = config.get("vocab_size") or getattr(model.config, "vocab_size", None)
        ids = torch.arange(16, dtype=torch.int64).reshape(2, 8) % int(vocab or 2)
        wrapper = text_lm(model)
        names = ["input_ids", "attention_mask"]
        shapes = {"input_ids": tokens, "attention_mask": tokens}
        args = (ids, torch.ones_like(ids))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with _quiet():
            prog = torch.onnx.export(
                wrapper, args, input_names=names, output_names=["logits"],
                dynamic_shapes=shapes, opset_version=18, dynamo=True, optimize=True,
                verbose=False,
            )  # fmt: skip
    except Exception as exc:
        raise ModelError(
            f"{d}: torch.onnx.export failed ({type(exc).__name__}: {_first_line(exc)}); export "
            "the model to ONNX yourself and pass the .onnx file"
        ) from exc
    assert prog is not None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    prog.save(str(out), external_data=nbytes > EXTERNAL_DATA_BYTES)
    return out


def _is_qwen3_vl(model: Any) -> bool:
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    return all(hasattr(inner, a) for a in ("visual", "get_vision_position_ids")) and hasattr(
        lm, "_deepstack_process"
    )


def qwen3_vl_grid(config: Any) -> tuple[int, int, int]:
    """The one image grid ``(t, h, w)`` in patches a Qwen3-VL export takes: ``(1, n, n)``.

    ``n`` is the side of the vision tower's learned position table (``√num_position_embeddings``,
    48 for the released models: 768×768 pixels at patch 16), rounded down to a multiple of the
    spatial merge size. The processor must resize every image to ``n·patch_size`` pixels square.
    """
    vision = config.vision_config
    merge = int(vision.spatial_merge_size)
    side = math.isqrt(int(vision.num_position_embeddings)) // merge * merge
    if side < merge:
        raise ModelError(f"vision_config.num_position_embeddings too small for a {merge}x merge")
    return 1, side, side


def _qwen3_vl_wrapper(model: Any, grid: tuple[int, int, int]) -> Any:
    """``(input_ids, attention_mask, pixel_values [B, P, D]) -> logits`` for one image grid.

    What transformers computes from ``image_grid_thw`` with ``.tolist()`` and Python loops is
    computed here for the one grid and tiled over the batch: the vision tower's interpolation
    indices and weights, its rotary positions and ``cu_seqlens`` (every image ``P`` patches).
    Sample ``b``'s ``k``-th image token takes its own image's ``k``-th merged feature (and
    deepstack feature); a text-only sample carries a zero image none of its tokens takes.
    M-RoPE positions: a text token's is its rank among the sample's text tokens, plus the
    image's extent (``max(h, w) / merge``) after the image; the ``k``-th image token's is the
    number of text tokens before it plus the image's ``(t, h, w)`` position of token ``k``,
    as ``get_rope_index`` gives them. The deepstack features are added where the image tokens
    are with a ``where`` instead of boolean indexing (data-dependent shapes).
    """
    import types

    import torch
    from transformers.exporters.utils import _prepare_grid_thw_vision_inputs

    inner = model.model
    config = model.config
    merge = int(config.vision_config.spatial_merge_size)
    grid_thw = torch.tensor([list(grid)], dtype=torch.int64)
    patches = grid[0] * grid[1] * grid[2]
    tokens = patches // (merge * merge)
    pre: dict[str, Any] = {"grid_thw": grid_thw}
    _prepare_grid_thw_vision_inputs(inner.visual, pre)
    image_table = inner.get_vision_position_ids(0, grid_thw[0], 1, merge)  # [3, tokens]
    extent = max(grid[1], grid[2]) // merge
    image_token_id = int(config.image_token_id)

    def dense_deepstack(self: Any, hidden: Any, mask: Any, embeds: Any) -> Any:
        return hidden + torch.where(mask.unsqueeze(-1), embeds.to(hidden.dtype), 0.0)

    class Qwen3VLImageTextLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            pixel_values: torch.Tensor,
        ) -> Any:  # fmt: skip
            b = pixel_values.shape[0]
            vision = inner.visual(
                pixel_values.reshape(b * patches, -1), grid_thw=grid_thw.expand(b, 3),
                interp_indices=pre["interp_indices"].repeat(b, 1),
                interp_weights=pre["interp_weights"].repeat(b, 1),
                position_ids=pre["position_ids"].repeat(b, 1),
                cu_seqlens=(torch.arange(b + 1) * patches).to(torch.int32),
                max_seqlen=patches, return_dict=True,
            )  # fmt: skip
            embeds = self.m.get_input_embeddings()(input_ids)
            is_image = input_ids == image_token_id
            rank = (is_image.to(torch.int64).cumsum(1) - 1).clamp(0, tokens - 1)

            def per_token(feats: torch.Tensor) -> torch.Tensor:
                f = feats.reshape(b, tokens, -1)
                return f.gather(1, rank.unsqueeze(-1).expand(-1, -1, f.shape[-1]))

            feats = per_token(vision.pooler_output).to(embeds.dtype)
            embeds = torch.where(is_image.unsqueeze(-1), feats, embeds)
            deep = [per_token(f) for f in vision.deepstack_features]
            text = attention_mask.bool() & ~is_image
            n_text = text.to(torch.int64).cumsum(1)  # text tokens up to here, inclusive
            after = (is_image.to(torch.int64).cumsum(1) > 0) & ~is_image
            text_pos = (n_text - 1).clamp(min=0) + after.to(torch.int64) * extent
            image_pos = n_text.unsqueeze(0) + image_table[:, rank]  # [3, B, T]
            position_ids = torch.where(
                is_image.unsqueeze(0), image_pos, text_pos.unsqueeze(0).expand(3, -1, -1)
            )
            lm = inner.language_model
            lm._deepstack_process = types.MethodType(dense_deepstack, lm)
            try:
                hidden = lm(
                    inputs_embeds=embeds, attention_mask=attention_mask,
                    position_ids=position_ids, visual_pos_masks=is_image,
                    deepstack_visual_embeds=deep, use_cache=False,
                ).last_hidden_state  # fmt: skip
            finally:
                del lm._deepstack_process
            return self.m.lm_head(hidden)

    return Qwen3VLImageTextLM().eval()


def export_qwen3_vl(directory: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Export a Qwen3-VL(-MoE) directory to ``path``: one image per sample at `qwen3_vl_grid`.

    Inputs ``(input_ids, attention_mask, pixel_values [B, n², C·T·P²])`` with dynamic batch and
    sequence axes; output the logits. The trace runs under transformers' own export patches
    (``transformers.exporters``: the vision attention's per-image loop becomes one batched
    attention, asserts are dropped before the ONNX translation), as its ``OnnxExporter`` does.
    A text-only sample passes zero pixels.
    """

    d = Path(directory)
    config = read_config(d)
    if not is_vlm(config):
        raise ModelError(f"{d}: not a vision-language model (no vision_config in {CONFIG})")
    model = load_model(d)
    if not _is_qwen3_vl(model):
        raise ModelError(f"{d}: {type(model).__name__} is not a Qwen3-VL model")
    return _export_qwen3_vl_model(d, model, path)


def _export_qwen3_vl_model(d: Path, model: Any, path: str | os.PathLike[str]) -> Path:
    """`export_qwen3_vl` of a loaded model (`export_onnx` takes this path for Qwen3-VL)."""
    import torch

    try:
        import transformers.exporters.exporter_dynamo  # noqa: F401  (registers its patches)
        from transformers.exporters import exporter_onnx
        from transformers.exporters.utils import (  # noqa: F401  (used by the wrapper)
            _prepare_grid_thw_vision_inputs,
            apply_fx_node_fixes,
            apply_patches,
        )
    except ImportError as exc:
        raise ModelError(
            f"{d}: this transformers has no exporters package ({_first_line(exc)}); "
            "Qwen3-VL exports need transformers >= 5.24"
        ) from exc
    grid = qwen3_vl_grid(model.config)
    vision = model.config.vision_config
    width = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    patches = grid[0] * grid[1] * grid[2]
    tokens = patches // int(vision.spatial_merge_size) ** 2
    wrapper = _qwen3_vl_wrapper(model, grid)
    cfg = model.config
    vocab = int(cfg.text_config.vocab_size)
    row = [1 % vocab, int(cfg.vision_start_token_id), *[int(cfg.image_token_id)] * tokens,
           int(cfg.vision_end_token_id), 2 % vocab, 3 % vocab]  # fmt: skip
    ids = torch.tensor([row, [*row[1:], 4 % vocab]], dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    pixels = torch.randn(2, patches, width, generator=torch.Generator().manual_seed(0))
    args = (ids, mask, pixels)
    names = ["input_ids", "attention_mask", "pixel_values"]
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=4096)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
              "pixel_values": {0: batch}}  # fmt: skip
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with _quiet(), torch.no_grad(), apply_patches("dynamo"), apply_patches("onnx"):
            program = torch.export.export(wrapper, args, dynamic_shapes=shapes)
            apply_fx_node_fixes("onnx", program.graph_module)
            onnx_program: Any = torch.onnx.export(
                program, args, input_names=names, output_names=["logits"],
                custom_translation_table=exporter_onnx._ONNX_TRANSLATION_TABLE,
                opset_version=18, dynamo=True, optimize=True, verbose=False,
            )  # fmt: skip
            exporter_onnx.apply_onnx_ir_fixes(onnx_program)
    except Exception as exc:
        raise ModelError(
            f"{d}: the Qwen3-VL export failed ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(out), external_data=nbytes > EXTERNAL_DATA_BYTES)
    return out


def export_key(directory: str | os.PathLike[str]) -> str:
    """What an export depends on: the directory's files and the exporter's versions."""
    import torch
    import transformers

    d = Path(directory)
    h = hashlib.sha256(f"{EXPORT_VERSION}:{transformers.__version__}:{torch.__version__}".encode())
    h.update((d / CONFIG).read_bytes())
    for p in sorted(d.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def onnx_model(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None,
    notify: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """The ONNX file to compile for ``path``: ``path`` itself, or a directory's export.

    A Hugging Face directory is exported once into ``cache_dir/hf/`` (reused while its files
    are unchanged); with ``cache_dir=None`` into a temporary directory removed on exit.
    ``notify`` is told when an export starts (it can take minutes for a real model).
    """
    if not Path(path).is_dir():
        yield str(path)
        return
    read_config(path)
    weight_files(path)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="modec-hf-") as tmp:
            if notify is not None:
                notify(f"exporting {path} to ONNX (not cached: --no-cache)")
            yield str(export_onnx(path, Path(tmp) / ONNX_NAME))
        return
    yield str(cached_export(path, cache_dir, notify))


def cached_export(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    notify: Callable[[str], None] | None = None,
) -> Path:
    """The cached export of a directory, made on first use (see `onnx_model`)."""
    read_config(path)
    weight_files(path)
    root = Path(cache_dir) / "hf"
    final = root / export_key(path)[:32]
    if (final / ONNX_NAME).is_file():
        log.info("%s: using the export in %s", path, final)
        return final / ONNX_NAME
    root.mkdir(parents=True, exist_ok=True)
    if notify is not None:
        notify(f"exporting {path} to ONNX (once; cached in {final})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        export_onnx(path, tmp / ONNX_NAME)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same export first
            if not (final / ONNX_NAME).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / ONNX_NAME
