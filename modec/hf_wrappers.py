"""The modules `modec.hf.export_onnx` traces: text and LLaVA-style wrappers, the VLM sample.

The text wrapper takes ``(input_ids, attention_mask)`` and computes position ids from the mask
(as ``generate`` does), so a left-padded sample gets the logits it has alone; the LLaVA-style
wrapper also takes ``pixel_values [B, C, H, W]`` and gives each sample's image tokens its own
image's features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modec.errors import ModelError
from modec.hf import PROCESSOR_FILES, load_processor


def wrappers() -> tuple[type[Any], type[Any]]:
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


def vlm_sample(directory: Path, image_token_id: int) -> dict[str, Any]:
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
