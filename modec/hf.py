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
  them), so a left-padded sample gets the logits it has alone. Other VLMs (neither
  LLaVA-style nor Qwen3-VL) are a one-line error from `export_onnx`: export them yourself.
- Qwen3-VL-MoE (flattened patches, ``image_grid_thw``, M-RoPE, deepstack features) exports
  through `modec.hf_qwen3_vl` at one fixed image grid; `export_onnx` takes that path for it.
- `onnx_model` / `cached_export` export once into ``CACHE/hf/``, keyed by the directory's
  files (names, sizes, modification times, ``config.json``'s bytes) and the transformers /
  torch versions; weights larger than 1 GiB go to external data beside the ``.onnx``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
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
    "is_hf_dir",
    "is_vlm",
    "load_model",
    "load_processor",
    "onnx_model",
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


def export_onnx(directory: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Load ``directory`` and export it to ``path`` (see the module docstring)."""
    import torch

    d = Path(directory)
    config = read_config(d)
    model = load_model(d)
    from modec.hf_wrappers import vlm_sample, wrappers

    text_lm, image_text_lm = wrappers()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=4096)
    tokens = {0: batch, 1: seq}
    if is_vlm(config):
        image_token_id = _image_token_id(config)
        if image_token_id is None:
            raise ModelError(f"{d}/{CONFIG}: a vision-language config without image_token_id")
        inner = getattr(model, "model", None)
        from modec.hf_qwen3_vl import export_loaded, is_qwen3_vl

        if is_qwen3_vl(model):
            return export_loaded(d, model, path)
        if not all(hasattr(inner, a) for a in ("vision_tower", "multi_modal_projector")) or not all(
            hasattr(model.config, a)
            for a in ("vision_feature_layer", "vision_feature_select_strategy")
        ):  # fmt: skip
            raise ModelError(
                f"{d}: {type(model).__name__} is neither LLaVA-style (a vision_tower and a "
                "multi_modal_projector) nor Qwen3-VL; modec exports those vision-language models "
                "only — export this one to ONNX yourself and pass the file"
            )
        sample = vlm_sample(d, image_token_id)
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
