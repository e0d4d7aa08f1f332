"""Qwen3-VL(-MoE) to ONNX: one image per sample at one fixed grid (see `modec.hf`).

Qwen3-VL's vision tower takes flattened patches and an ``image_grid_thw`` whose
data-dependent splits ``torch.export`` cannot trace. Here everything the image grid decides is
precomputed for one fixed grid ``(1, n, n)``, ``n = √num_position_embeddings`` (the vision
tower's learned position table), the trace runs under transformers' own export patches
(``transformers.exporters``), and the inputs are ``(input_ids, attention_mask, pixel_values
[B, n², C·T·P²])`` with M-RoPE positions computed from the mask and the image tokens as
``get_rope_index`` does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from modec.errors import ModelError
from modec.hf import _first_line, _quiet, is_vlm, read_config


def is_qwen3_vl(model: Any) -> bool:
    """A loaded Qwen3-VL(-MoE) model (its vision tower and deepstack language model)."""
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
    A text-only sample passes zero pixels. The weights are bound as `modec.hf.export_onnx`
    binds them (never loaded; stored dtype kept).
    """
    from modec.hf import export_onnx

    d = Path(directory)
    config = read_config(d)
    if not is_vlm(config) or "qwen3_vl" not in str(config.get("model_type", "")):
        raise ModelError(f"{d}: not a Qwen3-VL model (model_type {config.get('model_type')!r})")
    return export_onnx(d, path)


def ir_fixes(model: Any) -> None:
    """transformers' post-export fixes of a Qwen3-VL ONNX graph (``apply_onnx_ir_fixes``)."""
    from transformers.exporters import exporter_onnx

    fixes: Any = exporter_onnx._IR_FIXES
    for fix in fixes:
        for graph in [model.graph, *model.functions.values()]:
            fix(graph)


def qwen3_vl_program(d: Path, model: Any, optimize: bool) -> tuple[Any, Any]:
    """``(ONNXProgram, traced module)`` of a loaded (or weightless) Qwen3-VL model, traced as
    `export_qwen3_vl` describes; `ir_fixes` is left to the caller (after optimizing)."""
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
    try:
        with _quiet(), torch.no_grad(), apply_patches("dynamo"), apply_patches("onnx"):
            program = torch.export.export(wrapper, args, dynamic_shapes=shapes)
            apply_fx_node_fixes("onnx", program.graph_module)
            onnx_program: Any = torch.onnx.export(
                program, args, input_names=names, output_names=["logits"],
                custom_translation_table=exporter_onnx._ONNX_TRANSLATION_TABLE,
                opset_version=18, dynamo=True, optimize=optimize, verbose=False,
            )  # fmt: skip
    except Exception as exc:
        raise ModelError(
            f"{d}: the Qwen3-VL export failed ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    return onnx_program, wrapper
