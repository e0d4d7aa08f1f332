"""Local Hugging Face model directories: check the files, load, export to ONNX (cached).

A directory holds ``config.json``, the weights as ``*.safetensors`` (one file, or shards
listed by ``model.safetensors.index.json``) and, for calibration, the tokenizer or processor
files. modec never downloads: every load passes ``local_files_only=True`` and a missing file
is a one-line `ModelError` naming it.

- Text MoE models are built with ``AutoModelForCausalLM``; vision-language models (a config
  with a ``vision_config``) with ``AutoModelForImageTextToText``. Both with
  ``experts_implementation="batched_mm"`` (the experts then export as stacked gathers, the
  form modec canonicalizes) and eager attention (an explicit Softmax, where find-attention
  reads the attention the key-vision filter needs), in float32: the calibration statistics,
  GPTQ and onnxruntime on the CPU run in float32.
- The export never loads the weights (`export_onnx`, `modec.hf_weights`): the model is built
  with its parameters on the meta device, traced with fake tensors, and every initializer of
  the graph is then bound to the checkpoint's bytes — an external-data reference into the
  ``.safetensors`` shard when the tensor is a checkpoint tensor (or its transpose) and the
  ``.onnx`` sits beside the shards, else a tensor streamed into the export's own data file
  (experts stacked from per-expert checkpoint tensors). Weights keep their stored dtype; a
  bf16/fp16 weight is read through a ``Cast`` to float32. Peak memory is the trace's
  (~0.5 GB), whatever the weights' size. A checkpoint it cannot bind (a quantized one, a
  conversion other than stacking, concatenating or transposing) is exported the old way,
  every weight loaded by transformers in float32, with a warning.
- The traced module is a wrapper with dynamic batch, sequence and cache axes returning the
  logits and the KV cache (the dynamo exporter, opset 18, its optimizer without folding
  weights): ``(input_ids, attention_mask, past_key_values…)`` for a text model (a decoder
  with its cache, docs/generation.md); ``(input_ids, attention_mask, pixel_values,
  past_key_values…)`` for a LLaVA-style VLM (a ``vision_tower`` and a
  ``multi_modal_projector``, one fixed-size image per sample, ``pixel_values [B, C, H, W]``),
  where each sample's image tokens take its own image's features. Position ids come from the
  attention mask (as ``generate`` computes them), so a left-padded sample gets the logits it
  has alone. Other VLMs (neither
  LLaVA-style nor Qwen3-VL) are a one-line error from `export_onnx`: export them yourself.
- Qwen3-VL-MoE (flattened patches, ``image_grid_thw``, M-RoPE, deepstack features) is traced
  by `modec.hf_qwen3_vl` at one fixed image grid; `export_onnx` takes that path for it.
- `onnx_model` / `cached_export` export once, keyed by the directory's files (names, sizes,
  modification times, ``config.json``'s bytes) and the transformers / torch versions:
  beside the weights as ``modec-<key>.onnx`` (+ ``modec-<key>.data`` for the tensors that are
  not in the checkpoint as they are), which onnx, onnx-ir and onnxruntime accept as external
  data only there (`weights_home`); where that directory cannot hold it, into
  ``CACHE/hf/<key>/`` with every weight copied (docs/hf_export.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
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
EXPORT_VERSION = "modec.hf-export/4"  # 3: text models with their KV cache; 4: LLaVA-style too
ONNX_NAME = "model.onnx"
#: Above this many bytes of parameters the old export (every weight loaded) writes external data.
EXTERNAL_DATA_BYTES = 1 << 30
#: Name prefix of the files an export writes beside a directory's weights.
EXPORT_PREFIX = "modec-"

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
    """The transformers model of a directory with every weight loaded, in eval mode, float32
    (a bf16/fp16 checkpoint is cast): the fallback export's model, needing memory for the
    whole model in float32; `export_onnx` itself never loads the weights."""
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
    """Export ``directory`` to ``path`` without loading its weights (see the module docstring).

    The weights are referenced in their shards when ``path`` is in the directory that holds
    them (`weights_home`), else copied tensor by tensor into ``path``'s data file. A checkpoint
    whose tensors modec cannot bind (`modec.hf_weights.CannotBind`: a quantized checkpoint, a
    conversion other than stacking, concatenating or transposing) is exported the old way,
    every weight loaded in float32 by transformers, with a warning saying why.
    """
    from modec import hf_weights

    d = Path(directory)
    config = read_config(d)
    files = weight_files(d)
    out = Path(path)
    try:
        return _export_unloaded(d, config, files, out)
    except hf_weights.CannotBind as exc:
        log.warning(
            "%s: %s: exporting with every weight loaded by transformers in float32 (needs "
            "memory for the whole model)", d, exc,
        )  # fmt: skip
    return _export_loaded(d, config, out)


def _export_unloaded(
    d: Path, config: dict[str, Any], files: list[Path], out: Path
) -> Path:  # fmt: skip
    """Trace a weightless model, bind the checkpoint's tensors, optimize, save."""
    from modec import hf_weights as hw

    index = hw.read_index(files)
    with _quiet():
        try:
            model = hw.empty_model(d, is_vlm(config))
        except hw.CannotBind:
            raise
        except Exception as exc:  # any failure: the loading export then says what is wrong
            raise hw.CannotBind(
                f"transformers cannot build the model without its weights "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
        plan = hw.plan_weights(model, index)
        hw.fake_parameters(model)
    program, wrapper, fixes = _trace(d, config, model, optimize=False)
    onnx_model = program.model
    home, why = weights_home(files)
    out_dir = out.parent.resolve()
    in_place = home is not None and home == out_dir
    if not in_place:
        where = "outside the weights' directory" if home is not None else why
        log.info("%s: weights copied into the export's data file (%s)", d, where)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = hw.bind(onnx_model, hw.state_keys(wrapper, model), plan, out_dir,
                    f"{out.stem}.data", in_place)  # fmt: skip
    _optimize(onnx_model)
    hw.cast_after_gathers(onnx_model.graph)
    if fixes:
        from modec.hf_qwen3_vl import ir_fixes

        ir_fixes(onnx_model)
    log.info(
        "%s: %d weights referenced in the shards (%.2f GiB), %d written to %s.data "
        "(%.2f GiB), %d Casts to float32 (%s)", d, stats.referenced,
        stats.referenced_bytes / 2**30, stats.written, out.stem, stats.written_bytes / 2**30,
        stats.casts, ", ".join(f"{n} {t}" for t, n in sorted(stats.dtypes.items())),
    )  # fmt: skip
    import onnx_ir as ir

    tmp = out_dir / f".{out.name}.tmp-{os.getpid()}"
    try:
        ir.save(onnx_model, tmp)
        os.replace(tmp, out_dir / out.name)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _optimize(model: Any) -> None:
    """The dynamo exporter's ``optimize=True`` (onnxscript's optimizer and ONNX fusions),
    except that nothing computed from a weight is folded into a new constant: every weight
    stays the checkpoint's tensor (a small model's graph is then the shape of a large one's,
    where the optimizer's size limits keep the weights anyway)."""
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    weights = {
        v for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }  # fmt: skip
    derived: set[ir.Value] = set()

    def should_fold(node: ir.Node) -> bool | None:
        if any(v is not None and (v in weights or v in derived) for v in node.inputs):
            derived.update(node.outputs)
            return False
        return None

    with _quiet():
        onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
        onnxscript.rewriter.onnx_fusions.fuse(model)


def _export_loaded(d: Path, config: dict[str, Any], out: Path) -> Path:
    """The old export: the whole model loaded by transformers in float32, traced, saved."""
    model = load_model(d)
    program, _, fixes = _trace(d, config, model, optimize=True)
    if fixes:
        from modec.hf_qwen3_vl import ir_fixes

        ir_fixes(program.model)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    # Saved aside, then moved in (the .onnx last): an interrupted export leaves no .onnx that
    # a later run would take for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{EXPORT_PREFIX}tmp-", dir=out.parent))
    try:
        program.save(str(tmp / out.name), external_data=nbytes > EXTERNAL_DATA_BYTES)
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == out.name):
            os.replace(p, out.parent / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _trace(
    d: Path, config: dict[str, Any], model: Any, optimize: bool
) -> tuple[Any, Any, bool]:  # fmt: skip
    """``(ONNXProgram, the traced module, whether transformers' ONNX IR fixes apply)``."""
    import torch

    from modec.hf_wrappers import cache_shapes, vlm_sample, wrappers

    text_lm, image_text_lm = wrappers()
    wrapper: Any
    batch = torch.export.Dim("batch", min=1, max=1024)
    if is_vlm(config):
        image_token_id = _image_token_id(config)
        if image_token_id is None:
            raise ModelError(f"{d}/{CONFIG}: a vision-language config without image_token_id")
        inner = getattr(model, "model", None)
        from modec.hf_qwen3_vl import is_qwen3_vl, qwen3_vl_program

        if is_qwen3_vl(model):
            program, wrapper = qwen3_vl_program(d, model, optimize)
            return program, wrapper, True
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
    # A decoder with its KV cache (docs/generation.md): sampled with 3 past tokens, every
    # length dynamic; the past may be empty. A LLaVA-style VLM takes one image per sample
    # (prompt-only: the runtimes' decode entry drops the vision tower).
    vocab = int(config.get("vocab_size") or getattr(model.config, "vocab_size", 2) or 2)
    kv = cache_shapes(model, vocab)
    new = torch.export.Dim("new", min=1, max=4096)
    past, total = torch.export.Dim("past", min=0, max=8192), torch.export.Dim("total")
    caches = [torch.zeros(2, heads, 3, dim) for heads, dim in kv]
    kinds = [f"{i // 2}.{'value' if i % 2 else 'key'}" for i in range(len(kv))]
    cache_names = [f"past_key_values.{k}" for k in kinds]
    outputs = ["logits"] + [f"present.{k}" for k in kinds]
    cache_dims = tuple({0: batch, 2: past} for _ in kv)
    if is_vlm(config):
        ids = sample["input_ids"]
        mask = torch.cat([torch.ones(2, 3, dtype=torch.int64), sample["attention_mask"]], 1)
        wrapper = image_text_lm(model, image_token_id, len(kv) // 2)
        names = ["input_ids", "attention_mask", "pixel_values", *cache_names]
        dynamic: Any = ({0: batch, 1: new}, {0: batch, 1: total}, {0: batch}, cache_dims)
        args: tuple[Any, ...] = (ids, mask, sample["pixel_values"], *caches)
    else:
        ids = torch.arange(10, dtype=torch.int64).reshape(2, 5) % vocab
        wrapper = text_lm(model, len(kv) // 2)
        names = ["input_ids", "attention_mask", *cache_names]
        dynamic = ({0: batch, 1: new}, {0: batch, 1: total}, cache_dims)
        args = (ids, torch.ones(2, 8, dtype=torch.int64), *caches)
    try:
        with _quiet():
            prog = torch.onnx.export(
                wrapper, args, input_names=names, output_names=outputs,
                dynamic_shapes=dynamic, opset_version=18, dynamo=True, optimize=optimize,
                verbose=False,
            )  # fmt: skip
    except Exception as exc:
        raise ModelError(
            f"{d}: torch.onnx.export failed ({type(exc).__name__}: {_first_line(exc)}); export "
            "the model to ONNX yourself and pass the .onnx file"
        ) from exc
    assert prog is not None
    return prog, wrapper, False


def weights_home(files: list[Path]) -> tuple[Path | None, str]:
    """The directory an export can be written into to reference ``files`` (the shards) in
    place, or ``(None, why not)``.

    onnx, onnx-ir and onnxruntime read external data only from a plain file inside the model's
    directory (not through a link leading out of it, not with several hard links), so the
    ``.onnx`` must sit in the directory that really holds the shards (a Hugging Face cache
    snapshot links them from its ``blobs`` directory: that one), which must be writable.
    """
    homes = {f.resolve().parent for f in files}
    if len(homes) != 1:
        return None, f"the shards lie in {len(homes)} directories"
    home = homes.pop()
    for f in files:
        if f.resolve().stat().st_nlink > 1:
            return None, f"{f.name} has several hard links, which onnx-ir refuses to read"
    if not os.access(home, os.W_OK | os.X_OK):
        return None, f"{home} is not writable"
    return home, ""


def _ours(name: str) -> bool:
    """A file modec writes beside a directory's weights (not part of its export key)."""
    return name.startswith((EXPORT_PREFIX, f".{EXPORT_PREFIX}"))


def export_key(directory: str | os.PathLike[str]) -> str:
    """What an export depends on: the directory's files and the exporter's versions."""
    import torch
    import transformers

    d = Path(directory)
    h = hashlib.sha256(f"{EXPORT_VERSION}:{transformers.__version__}:{torch.__version__}".encode())
    h.update((d / CONFIG).read_bytes())
    for p in sorted(d.iterdir()):
        if p.is_file() and not _ours(p.name):
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

    A Hugging Face directory is exported once (`cached_export`: beside its weights, or into
    ``cache_dir/hf/``) and reused while its files are unchanged; with ``cache_dir=None`` the
    export is temporary (beside the weights, or in a temporary directory) and removed on exit.
    ``notify`` is told when an export starts (it can take minutes for a real model).
    """
    if not Path(path).is_dir():
        yield str(path)
        return
    read_config(path)
    files = weight_files(path)
    if cache_dir is not None:
        yield str(cached_export(path, cache_dir, notify))
        return
    home, _ = weights_home(files)
    if home is None:
        with tempfile.TemporaryDirectory(prefix="modec-hf-") as tmp:
            if notify is not None:
                notify(f"exporting {path} to ONNX (not cached: --no-cache)")
            yield str(export_onnx(path, Path(tmp) / ONNX_NAME))
        return
    out = home / f"{EXPORT_PREFIX}tmp-{os.getpid()}-{secrets.token_hex(4)}.onnx"
    if notify is not None:
        notify(f"exporting {path} to ONNX (not cached: --no-cache; removed after use)")
    try:
        yield str(export_onnx(path, out))
    finally:
        for p in (out, out.with_suffix(".data"), out.with_name(f"{out.name}.data")):
            p.unlink(missing_ok=True)


def cached_export(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    notify: Callable[[str], None] | None = None,
) -> Path:
    """The export of a directory, made on first use (see `onnx_model`).

    Beside the weights (`weights_home`): ``modec-<key>.onnx`` and, for the tensors that are
    not a checkpoint tensor byte for byte, ``modec-<key>.data``; an older export of the same
    directory is removed. Where the weights cannot be referenced in place: into
    ``cache_dir/hf/<key>/`` with every weight copied (a log line says why).
    """
    read_config(path)
    files = weight_files(path)
    key = export_key(path)[:32]
    home, why = weights_home(files)
    if home is not None:
        final = home / f"{EXPORT_PREFIX}{key}.onnx"
        if final.is_file():
            log.info("%s: using the export %s", path, final)
            return final
        if notify is not None:
            notify(f"exporting {path} to ONNX (once; beside its weights: {final})")
        export_onnx(path, final)
        if home == Path(path).resolve():
            _remove_stale(home, key)
        return final
    root = Path(cache_dir) / "hf"
    final = root / key
    if (final / ONNX_NAME).is_file():
        log.info("%s: using the export in %s", path, final)
        return final / ONNX_NAME
    log.info("%s: the export cannot reference its weights in place (%s): they are copied "
             "into %s", path, why, final)  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    if notify is not None:
        notify(f"exporting {path} to ONNX (once; cached in {final}, weights copied: {why})")
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


def _remove_stale(home: Path, key: str) -> None:
    """Remove the exports of earlier states of the directory ``home`` (other keys; not the
    temporary exports of ``--no-cache`` runs, which remove their own)."""
    for p in sorted(home.iterdir()):
        name = p.name
        if _ours(name) and key not in name and f"{EXPORT_PREFIX}tmp-" not in name and p.is_file():
            log.info(
                "%s: removing %s (the export of an earlier state of the directory)", home, name
            )
            p.unlink(missing_ok=True)
