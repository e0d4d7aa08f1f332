"""The modules `modec.hf.export_onnx` traces: text and LLaVA-style wrappers, the VLM sample.

The text wrapper takes ``(input_ids, attention_mask, past_key_values.{i}.key|value …)`` and
returns ``(logits, present.{i}.key|value …)``: a decoder with its KV cache, the contract of
docs/generation.md (the mask covers the past and the new tokens; the past may be empty, which
is how the analysis runs it). Position ids come from the mask (as ``generate`` computes them),
so a left-padded sample gets the logits it has alone. The LLaVA-style wrapper takes
``(input_ids, attention_mask, pixel_values [B, C, H, W], past_key_values…)``, returns the
same outputs, and gives each sample's image tokens its own image's features.
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

    def cached(
        m: torch.nn.Module, layers: int, past: tuple[torch.Tensor, ...],
        attention_mask: torch.Tensor, **tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """``m`` on the new tokens (``input_ids`` or ``inputs_embeds``) after ``past``, a
        `DynamicCache` of full layers: ``(logits, *present)``."""
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
        new = next(iter(tokens.values())).shape[1]
        out = m(
            attention_mask=attention_mask, position_ids=positions(attention_mask)[:, -new:],
            use_cache=True, **{cache_argument(m): DynamicCache(ddp_cache_data=pairs)}, **tokens,
        )  # fmt: skip
        present: list[torch.Tensor] = []
        for layer in returned_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    class TextLM(torch.nn.Module):
        """``(input_ids, attention_mask, *past) -> (logits, *present)``, ``past`` and
        ``present`` as ``[key 0, value 0, key 1, …]`` of shape [B, kv heads, length, head dim].

        The cache is a `transformers.DynamicCache` of full layers (``DynamicLayer``), also for
        sliding-window attention: the window is applied by the mask, and every layer's
        ``present`` is ``past`` followed by the new tokens, as the runtimes expect.
        """

        def __init__(self, m: torch.nn.Module, layers: int) -> None:
            super().__init__()
            self.m = m
            self.layers = layers

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
        ) -> Any:  # fmt: skip
            return cached(self.m, self.layers, past, attention_mask, input_ids=input_ids)

    class ImageTextLM(torch.nn.Module):
        """``(input_ids, attention_mask, pixel_values, *past) -> (logits, *present)``, one
        image per sample, the cache as `TextLM`'s.

        LLaVA-style: the vision tower's features at ``vision_feature_layer`` (less the CLS
        token for the ``default`` strategy) go through the projector, and sample ``b``'s
        ``k``-th image token takes its own image's ``k``-th feature. A text-only sample
        carries a placeholder image (zeros) that none of its tokens takes. transformers'
        own forward concatenates the features of the whole batch (``list(features)``),
        which fixes the batch size in an export and mixes samples up when only some have
        images. The image tokens are all in the prompt: a decode step's new tokens take
        none, so the runtimes' decode entry drops the vision tower
        (docs/generation.md).
        """

        def __init__(self, m: Any, image_token_id: int, layers: int) -> None:
            super().__init__()
            self.m = m
            self.image_token_id = image_token_id
            self.layer = m.config.vision_feature_layer
            self.strategy = m.config.vision_feature_select_strategy
            self.layers = layers

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
            pixel_values: torch.Tensor, *past: torch.Tensor,
        ) -> Any:  # fmt: skip
            embeds = self.m.get_input_embeddings()(input_ids)
            feats = self.features(pixel_values.to(embeds.dtype))  # [B, N, D]
            is_image = input_ids == self.image_token_id
            rank = (is_image.to(torch.int64).cumsum(1) - 1).clamp(0, feats.shape[1] - 1)
            index = rank.unsqueeze(-1).expand(-1, -1, feats.shape[-1])
            embeds = torch.where(is_image.unsqueeze(-1), feats.gather(1, index), embeds)
            return cached(self.m, self.layers, past, attention_mask, inputs_embeds=embeds)

    return TextLM, ImageTextLM


def cache_argument(model: Any) -> str:
    """The name of the cache argument of ``model.forward``: ``cache`` (transformers 5.25, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (earlier 5.x releases)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache a forward pass returned (``out.cache``, or ``out.past_key_values`` in earlier
    transformers releases)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_shapes(model: Any, vocab: int) -> list[tuple[int, int]]:
    """``[(kv heads, head dim) for key 0, value 0, key 1, …]`` of a causal LM's KV cache, read
    from one forward pass on fake tensors (no weight is read; keys and values may differ, as
    in DeepSeek's multi-head latent attention)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    ids = torch.arange(4, dtype=torch.int64).reshape(1, 4) % max(vocab, 1)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        shapes: list[tuple[int, int]] = []
        for layer in returned_cache(out).layers:
            for t in (layer.keys, layer.values):
                shapes.append((int(t.shape[1]), int(t.shape[3])))
    return shapes


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


#: PIL resampling filters by the numbers image processors store (``resample``).
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def processor_description(directory: Path) -> dict[str, Any] | None:
    """The ``processor.json`` (`modec.prompting`) of a LLaVA-style directory, so that
    ``modec run --prompt "<image> …" --image FILE`` feeds the artifact what the model's own
    processor would; None where a plain resize cannot reproduce that processor (a crop, a
    resize by the shortest edge, a filter PIL names differently, or no single
    ``pixel_values`` image input): ``modec run --data`` then.

    The number of image tokens one image becomes is counted in the processor's own output.
    """
    import numpy as np
    from PIL import Image

    from modec.hf import _image_token_id, read_config

    config = read_config(directory)
    image_token_id = _image_token_id(config)
    if image_token_id is None or str(config.get("model_type", "")).startswith("qwen3_vl"):
        return None  # Qwen3-VL: image grids of flattened patches, not one resized image
    try:
        proc, _ = load_processor(directory)
    except ModelError:  # what transformers cannot load here, modec run cannot describe
        return None
    if proc is None or not isinstance(getattr(proc, "image_token", None), str):
        return None
    ip = proc.image_processor
    size = getattr(ip, "size", None)
    h, w = _size_field(size, "height"), _size_field(size, "width")
    resample = _RESAMPLE.get(int(getattr(ip, "resample", 2) or 0))
    if (
        not isinstance(h, int) or not isinstance(w, int) or resample is None
        or getattr(ip, "do_center_crop", False) or not getattr(ip, "do_resize", True)
    ):  # fmt: skip
        return None
    blank = Image.fromarray(np.zeros((h, w, 3), np.uint8))
    try:
        out = proc(text=[proc.image_token], images=[blank], return_tensors="np")
    except Exception:  # a processor that wants more than one image and text: not ours
        return None
    pixels = out.get("pixel_values")
    if pixels is None or tuple(pixels.shape) != (1, 3, h, w):
        return None
    rescale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
    normalize = getattr(ip, "do_normalize", True)
    return {
        "input": "pixel_values",
        "image_token": proc.image_token,
        "image_tokens": int((out["input_ids"] == image_token_id).sum()),
        "image_size": [h, w],
        "channels": 3,
        "rescale": rescale,
        "mean": [float(v) for v in ip.image_mean] if normalize else [0.0],
        "std": [float(v) for v in ip.image_std] if normalize else [1.0],
        "resample": resample,
    }
