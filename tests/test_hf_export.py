"""A Hugging Face directory exported without loading its weights (`modec.hf`, `modec.hf_weights`).

Tiny random-weight checkpoints made here (``save_pretrained``, or streamed into safetensors by
`write_checkpoint` without holding the model): the export references the shards in place
(external data at the checkpoint's offsets, stored dtype, a ``Cast`` to float32), writes only
the stacked experts of per-expert checkpoints to its own data file, gives the logits of the
export that loads every weight (float32: within 1e-5) and of transformers on the bf16-rounded
weights (within 1e-4), keeps its peak memory flat in the size of the weights, and is
deterministic. Bad checkpoints are one-line errors; a conversion it does not bind falls back
to loading the model, with a log line.

Measuring the peak RSS of a large export (docs/hf_export.md):

    python -m tests.test_hf_export /tmp/q3big --layers 2 --paths new old
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.models import HF_MODELS, VOCAB, build_hf

FAMILIES = (*HF_MODELS, "qwen3vl")


def qwen3_moe_config(**kw: Any) -> Any:
    import transformers as tf

    args: dict[str, Any] = dict(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
        norm_topk_prob=True, max_position_embeddings=128,
    )  # fmt: skip
    args.update(kw)
    return tf.Qwen3MoeConfig(**args)


def write_checkpoint(
    directory: Path, config: Any, dtype: str = "bfloat16", shard_bytes: int = 2**31,
    seed: int = 0, zeros: bool = False,
) -> int:  # fmt: skip
    """Write ``config`` and a checkpoint of random weights (``zeros``: a sparse file of zeros)
    in the layout ``save_pretrained`` writes (per-expert tensors for Qwen3-MoE), one tensor
    at a time: memory is one tensor whatever the model's size. Returns the weights' bytes."""
    import ml_dtypes
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from modec import hf_weights
    from modec.safetensors_io import TensorEntry, write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    model = hf_weights.empty_model(directory, vlm=False)
    tied = set(dict(getattr(model, "all_tied_weights_keys", None) or {}))
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    saved = revert_weight_conversion(model, {k: v for k, v in state.items() if k in names})
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    item = np_dtype.itemsize
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in sorted(saved.items())}
    del model, state, saved
    torch.manual_seed(seed)

    def make(name: str, shape: tuple[int, ...]) -> Any:
        def produce() -> np.ndarray:
            if name.endswith("norm.weight"):
                return np.ones(shape, np_dtype)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            scale = 1 / math.sqrt(shape[-1])
            return (rng.standard_normal(shape, np.float32) * scale).astype(np_dtype)

        return produce

    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * item
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        files = ["model.safetensors"]
    for file, names_ in zip(files, shards, strict=True):
        if zeros:
            _write_zeros(directory / file, [(n, dtype, shapes[n]) for n in names_])
        else:
            entries = [TensorEntry(n, dtype, shapes[n], make(n, shapes[n])) for n in names_]
            write_safetensors(directory / file, entries)
    if len(files) > 1:
        weight_map = {n: f for f, ns in zip(files, shards, strict=True) for n in ns}
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return sum(math.prod(s) for s in shapes.values()) * item


def _write_zeros(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]]) -> None:
    """A safetensors file whose data is a hole (zeros, no disk blocks)."""
    from modec.safetensors_io import DTYPE_TAGS

    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in sorted(tensors):
        n = math.prod(shape) * (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize)
        header[name] = {"dtype": DTYPE_TAGS[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}  # fmt: skip
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)


def _save_family(family: str, path: Path, dtype: str) -> Path:
    """The tiny fixture family (or Qwen3-VL-MoE) saved in ``dtype``."""
    import torch

    if family == "qwen3vl":
        from tests.test_hf_families import _build_qwen3_vl_dir

        src = _build_qwen3_vl_dir(path.with_name(f"{path.name}-src"))
        if dtype == "float32":
            return src
        import transformers as tf

        m = tf.AutoModelForImageTextToText.from_pretrained(src, local_files_only=True)
        m.to(getattr(torch, dtype)).save_pretrained(path)
        return path
    model = build_hf(family).m
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return path


def _feeds(family: str) -> dict[str, np.ndarray]:
    if family == "qwen3vl":
        from tests.test_hf_families import _qwen3_vl_batch, _qwen3_vl_row

        rows = [[5, 7, 8, 9], _qwen3_vl_row([], [7, 8, 9, 10, 11]), _qwen3_vl_row([5, 6], [7])]
        return _qwen3_vl_batch(rows, seed=1)
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask}


def _transformers_logits(d: Path, family: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """transformers' own logits of each row alone (float32 on the stored weights)."""
    import torch
    import transformers as tf

    vl = family == "qwen3vl"
    cls: Any = tf.AutoModelForImageTextToText if vl else tf.AutoModelForCausalLM
    model = cls.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i in range(feeds["input_ids"].shape[0]):
            keep = feeds["attention_mask"][i] == 1
            ids = torch.from_numpy(feeds["input_ids"][i][keep][None])
            kw: dict[str, Any] = {}
            if vl and bool((ids == 60).any()):
                kw = dict(pixel_values=torch.from_numpy(feeds["pixel_values"][i]),
                          image_grid_thw=torch.tensor([[1, 8, 8]]),
                          mm_token_type_ids=(ids == 60).long())  # fmt: skip
            out.append(model(input_ids=ids, use_cache=False, **kw).logits.numpy()[0])
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- the checkpoint's index and the expressions --------------------------------------------


def test_index_reads_headers_and_names_a_bad_file(tmp_path: Path) -> None:
    from modec import hf_weights as hw
    from modec.errors import ModelError
    from modec.safetensors_io import TensorEntry, write_safetensors

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(
        tmp_path / "a.safetensors",
        [TensorEntry.of("w", a), TensorEntry.of("b", np.ones(2, np.int64))],
    )
    index = hw.read_index([tmp_path / "a.safetensors"])
    w = index["w"]
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert (w.dtype, w.shape) == ("float32", (3, 4))
    assert np.array_equal(np.frombuffer(raw[w.offset : w.offset + w.nbytes], np.float32), a.ravel())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-8])
    with pytest.raises(ModelError, match=r"cut\.safetensors: tensor .* truncated or corrupt"):
        hw.read_index([cut])
    (tmp_path / "x.safetensors").write_bytes(b"PK\x03\x04 not safetensors at all")
    with pytest.raises(ModelError, match=r"x\.safetensors: not a safetensors file"):
        hw.read_index([tmp_path / "x.safetensors"])
    with pytest.raises(ModelError, match=r"also in a\.safetensors"):
        hw.read_index([tmp_path / "a.safetensors", tmp_path / "a.safetensors"])


@pytest.mark.parametrize(
    "build",
    [
        lambda s: s["g"],
        lambda s: ("stack", 0, [s["g"], s["u"]]),
        lambda s: ("stack", 1, [s["g"], s["u"]]),
        lambda s: ("cat", 1, [("stack", 0, [s["g"], s["u"]]), ("stack", 0, [s["u"], s["g"]])]),
        lambda s: ("cat", 0, [s["g"], ("swap", 0, 1, s["sq"])]),
        lambda s: ("stack", 0, [("swap", 0, 1, s["sq"]), s["g"]]),
        lambda s: ("swap", 1, 2, ("stack", 0, [s["g"], s["u"], s["g"]])),
        lambda s: ("swap", 0, 2, ("stack", 0, [s["g"], s["u"]])),
    ],
)
def test_written_expressions_equal_numpy(tmp_path: Path, build: Any) -> None:
    """Stacks, concatenations and transposes of checkpoint tensors are written streamed
    (one leading-axis slice at a time where the parts interleave) with numpy's bytes."""
    import io

    import ml_dtypes

    from modec import hf_weights as hw
    from modec.safetensors_io import TensorEntry, write_safetensors

    rng = np.random.default_rng(0)
    arrs = {"g": rng.standard_normal((4, 4)), "u": rng.standard_normal((4, 4)),
            "sq": rng.standard_normal((4, 4))}  # fmt: skip
    arrs = {k: v.astype(ml_dtypes.bfloat16) for k, v in arrs.items()}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, [TensorEntry.of(k, v) for k, v in arrs.items()])
    index = hw.read_index([path])

    def expr(t: Any) -> Any:
        if isinstance(t, hw.Stored):
            return t, arrs[t.key]
        if t[0] == "swap":
            e, v = expr(t[3])
            return hw.Swap(e, t[1], t[2]), np.swapaxes(v, t[1], t[2])
        parts = [expr(p) for p in t[2]]
        es, vs = [p[0] for p in parts], [p[1] for p in parts]
        if t[0] == "stack":
            return hw.Stack(tuple(es), t[1]), np.stack(vs, t[1])
        return hw.Cat(tuple(es), t[1]), np.concatenate(vs, t[1])

    e, want = expr(build(index))
    assert e.shape == want.shape
    buf = io.BytesIO()
    hw._write_expr(e, buf)
    assert buf.getvalue() == np.ascontiguousarray(want).tobytes()


def test_plan_follows_transformers_conversions(tmp_path: Path) -> None:
    """Per-expert checkpoint tensors stack into transformers' [E, 2I, H] / [E, H, I]; the rest
    are checkpoint tensors as they are; Qwen3-VL-MoE's fused experts are a transpose."""
    from modec import hf
    from modec import hf_weights as hw

    d = _save_family("qwen3moe", tmp_path / "q", "bfloat16")
    model = hw.empty_model(d, vlm=False)
    plan = hw.plan_weights(model, hw.read_index(hf.weight_files(d)))
    gate_up = plan["model.layers.1.mlp.experts.gate_up_proj"]
    assert isinstance(gate_up, hw.Cat) and gate_up.dim == 1 and gate_up.shape == (8, 64, 32)
    gates, ups = gate_up.items
    assert isinstance(gates, hw.Stack) and isinstance(ups, hw.Stack)
    assert [s.key for s in hw.sources(gates)] == [
        f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in range(8)
    ]
    assert isinstance(plan["model.layers.0.mlp.experts.down_proj"], hw.Stack)
    q = plan["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, hw.Stored) and q.dtype == "bfloat16" and q.shape == (32, 32)
    assert all(p.device.type == "meta" for p in model.parameters())


def _released_qwen3_vl_layout(d: Path) -> None:
    """Rewrite a saved Qwen3-VL-MoE checkpoint with its experts ``[E, H, 2I]`` / ``[E, I, H]``,
    as the released checkpoints store them (transformers 5 transposes them on load; its
    ``save_pretrained`` keeps its own ``[E, 2I, H]``)."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(d / "model.safetensors")
    for k in list(weights):
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            weights[k] = np.ascontiguousarray(np.swapaxes(weights[k], 1, 2))
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})


def test_qwen3_vl_released_layout_is_a_transpose_in_place(tmp_path: Path) -> None:
    """Qwen3-VL-MoE's fused experts in the released layout: referenced in the shard, read
    through a Transpose and a Cast; logits equal transformers'."""
    import onnx_ir as ir

    from modec import hf
    from modec import hf_weights as hw
    from modec.frontend import OrtRunner, load_onnx
    from modec.moe.discover import find_moe

    d = _save_family("qwen3vl", tmp_path / "v", "bfloat16")
    _released_qwen3_vl_layout(d)
    plan = hw.plan_weights(hw.empty_model(d, vlm=True), hw.read_index(hf.weight_files(d)))
    fused = plan["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert isinstance(fused, hw.Swap) and isinstance(fused.x, hw.Stored)
    assert fused.x.shape == (4, 32, 64) and fused.shape == (4, 64, 32)
    path = hf.export_onnx(d, d / "modec-x.onnx")
    model = load_onnx(path)
    w = model.graph.initializers["m.model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert isinstance(w.const_value, ir.ExternalTensor)
    assert w.const_value.location == "model.safetensors" and tuple(w.shape) == (4, 32, 64)
    (use,) = w.uses()
    assert use.node.op_type == "Transpose"
    assert [(r.num_experts, r.form) for r in find_moe(model)] == [(4, "stacked_gather")] * 2
    assert not (d / "modec-x.data").exists()  # every weight is referenced in place
    feeds = _feeds("qwen3vl")
    got = OrtRunner(path)(feeds)
    n = feeds["input_ids"].shape[1]
    want = _transformers_logits(d, "qwen3vl", feeds)
    assert max(_rel(got[i, n - len(x) :], x) for i, x in enumerate(want)) < 1e-4


# ---- the export ----------------------------------------------------------------------------


def test_export_references_the_shards_in_place(tmp_path: Path) -> None:
    """Beside the weights: every weight that is a checkpoint tensor is external data at its
    offset in model.safetensors, in bf16, read through a Cast (after the gather for the
    embedding table and the experts); the stacked experts are in the export's data file;
    nothing of a weight is inside the .onnx. Elsewhere every weight is copied."""
    import onnx_ir as ir

    from modec import hf
    from modec import hf_weights as hw
    from modec.frontend import load_onnx
    from modec.moe.discover import find_moe

    d = _save_family("qwen3moe", tmp_path / "q", "bfloat16")
    key = hf.export_key(d)
    path = hf.export_onnx(d, d / "modec-x.onnx")
    assert hf.export_key(d) == key  # the export's own files are not part of the key
    index = hw.read_index(hf.weight_files(d))
    model = load_onnx(path)
    inits = model.graph.initializers
    ext = {
        n: v.const_value for n, v in inits.items() if isinstance(v.const_value, ir.ExternalTensor)
    }
    assert len(ext) == 25 and all(t.dtype == ir.DataType.BFLOAT16 for t in ext.values())
    in_shards = {n: t for n, t in ext.items() if t.location == "model.safetensors"}
    assert len(in_shards) == 21
    for name, t in in_shards.items():
        stored = index[name.removeprefix("m.")]
        assert (t.offset, t.length, tuple(t.shape)) == (stored.offset, stored.nbytes, stored.shape)
    experts = {n for n, t in ext.items() if t.location == "modec-x.data"}
    assert experts == {f"m.model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                       for p in ("gate_up_proj", "down_proj")}  # fmt: skip
    inline = [n for n, v in inits.items() if n not in ext and v.const_value is not None
              and v.const_value.size > 64]  # fmt: skip
    assert not inline, inline
    for name in ("m.model.embed_tokens.weight", "m.model.layers.0.mlp.experts.gate_up_proj"):
        (use,) = inits[name].uses()
        assert use.node.op_type in ("Gather", "GatherND")
        assert [u.node.op_type for u in use.node.outputs[0].uses()] == ["Cast"]
    (use,) = inits["m.model.layers.0.self_attn.q_proj.weight"].uses()
    assert use.node.op_type == "Cast" and use.node.attributes["to"].value == ir.DataType.FLOAT
    assert [(r.num_experts, r.form) for r in find_moe(model)] == [(8, "stacked_gather")] * 2

    elsewhere = hf.export_onnx(d, tmp_path / "out" / "m.onnx")
    copied = load_onnx(elsewhere).graph.initializers.values()
    assert {
        v.const_value.location for v in copied if isinstance(v.const_value, ir.ExternalTensor)
    } == {"m.data"}
    assert (tmp_path / "out" / "m.data").stat().st_size >= sum(s.nbytes for s in index.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_the_loaded_export_and_transformers(family: str, tmp_path: Path) -> None:
    """float32: the same logits as the export that loads every weight (1e-5); bf16: the
    logits of transformers in float32 on the bf16 weights (1e-4), bf16 kept in the file."""
    import onnx_ir as ir

    from modec import hf
    from modec.frontend import OrtRunner, load_onnx
    from modec.moe.discover import find_moe

    feeds = _feeds(family)
    n = feeds["input_ids"].shape[1]
    d32 = _save_family(family, tmp_path / "f32", "float32")
    new = OrtRunner(hf.export_onnx(d32, d32 / "modec-new.onnx"))(feeds)
    old = OrtRunner(hf._export_loaded(d32, hf.read_config(d32), tmp_path / "old.onnx"))(feeds)
    err32 = _rel(new, old)
    d16 = _save_family(family, tmp_path / "bf16", "bfloat16")
    path = hf.export_onnx(d16, d16 / "modec-new.onnx")
    got = OrtRunner(path)(feeds)
    want = _transformers_logits(d16, family, feeds)
    err16 = max(_rel(got[i, n - len(w) :], w) for i, w in enumerate(want))
    print(f"{family}: new vs loaded export (fp32) {err32:.1e}; bf16 vs transformers {err16:.1e}")
    assert err32 <= 1e-5 and err16 <= 1e-4
    model = load_onnx(path)
    dtypes = {v.const_value.dtype for v in model.graph.initializers.values()
              if isinstance(v.const_value, ir.ExternalTensor)}  # fmt: skip
    assert dtypes == {ir.DataType.BFLOAT16}
    assert len(find_moe(model)) == 2


@pytest.mark.parametrize("family", HF_MODELS)
def test_cached_steps_equal_the_full_forward(family: str, tmp_path: Path) -> None:
    """The export is a decoder with its KV cache (docs/generation.md): a left-padded prompt
    of 18 tokens with an empty cache, then three one-token steps fed the returned cache,
    give transformers' logits of each row's whole sequence run alone (past GPT-OSS's
    16-token sliding window; DeepSeek's keys and values of different widths)."""
    import onnxruntime as ort
    import torch

    from modec import hf

    d = _save_family(family, tmp_path / "f32", "float32")
    sess = ort.InferenceSession(str(hf.export_onnx(d, d / "modec-new.onnx")))
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    assert len(past) == 4  # two layers, key and value
    outs = [o.name for o in sess.get_outputs()]
    assert outs[1:] == [p.name.replace("past_key_values", "present") for p in past]
    rng = np.random.default_rng(3)
    ids = rng.integers(1, VOCAB, (2, 18)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    prompt_mask = mask.copy()
    steps = rng.integers(1, VOCAB, (2, 3)).astype(np.int64)
    empty = {p.name: np.zeros((2, p.shape[1], 0, p.shape[3]), np.float32) for p in past}
    got = [sess.run(None, {"input_ids": ids, "attention_mask": mask, **empty})]
    for j in range(3):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        cache = {p.name: v for p, v in zip(past, got[-1][1:], strict=True)}
        got.append(sess.run(None, {"input_ids": steps[:, j : j + 1], "attention_mask": mask,
                                   **cache}))  # fmt: skip
    model = build_hf(family).m
    for row in range(2):
        seq = np.concatenate([ids[row][prompt_mask[row] == 1], steps[row]])
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(seq[None]), use_cache=False).logits[0]
        n = len(seq) - 3
        assert _rel(got[0][0][row, -n:], want[:n].numpy()) < 1e-5, (family, row)
        for j in range(3):
            assert _rel(got[1 + j][0][row, -1], want[n + j].numpy()) < 1e-5, (family, row, j)


def test_export_memory_does_not_grow_with_the_weights(tmp_path: Path) -> None:
    """Peak RSS of the export of a 0.5 GB checkpoint is within 64 MiB of a 2 MB one of the
    same structure (the old export loads it twice over, in float32)."""
    small = tmp_path / "small"
    big = tmp_path / "big"
    write_checkpoint(small, qwen3_moe_config(), zeros=True)
    nbytes = write_checkpoint(big, qwen3_moe_config(hidden_size=768, moe_intermediate_size=768,
                                                    num_experts=64), zeros=True)  # fmt: skip
    assert nbytes > 400 * 2**20
    peaks = {}
    for d in (small, big):
        peaks[d.name], _ = export_peak(d, d / "modec-x.onnx", "new")
    grew = peaks["big"] - peaks["small"]
    print(f"peak RSS {peaks['small'] / 2**20:.0f} -> {peaks['big'] / 2**20:.0f} MiB for "
          f"{nbytes / 2**20:.0f} MiB of weights")  # fmt: skip
    assert grew < 64 * 2**20, grew


def test_export_is_deterministic(tmp_path: Path) -> None:
    """Two exports (another process, another hash seed) are byte-identical."""
    from modec import hf

    a = _save_family("qwen3moe", tmp_path / "a", "bfloat16")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    hf.export_onnx(a, a / "modec-x.onnx")
    export_peak(b, b / "modec-x.onnx", "new", env={"PYTHONHASHSEED": "7"})
    for name in ("modec-x.onnx", "modec-x.data"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---- where the export goes ------------------------------------------------------------------


def test_cached_export_goes_beside_the_weights_or_copies_them(tmp_path: Path, caplog: Any) -> None:
    """cached_export writes beside the weights once and reuses it; an earlier state's export
    is removed. With a hard-linked shard (onnx-ir refuses to read one) it copies the weights
    into the cache, and says why."""
    from modec import hf

    d = _save_family("qwen3moe", tmp_path / "q", "float32")
    cache = tmp_path / "cache"
    first = hf.cached_export(d, cache)
    assert first.parent == d and first.name.startswith("modec-") and not cache.exists()
    assert hf.cached_export(d, cache) == first
    (d / "generation_config.json").write_text("{}")  # the directory changed: a new export
    second = hf.cached_export(d, cache)
    assert second != first and second.is_file() and not first.exists()
    assert not first.with_suffix(".data").exists()

    linked = tmp_path / "linked"
    shutil.copytree(d, linked, ignore=shutil.ignore_patterns("modec-*"))
    os.link(linked / "model.safetensors", tmp_path / "other-link")
    with caplog.at_level(logging.INFO, logger="modec.hf"):
        third = hf.cached_export(linked, cache)
    assert third.parent.parent == cache / "hf"
    assert "hard links" in caplog.text and "copied" in caplog.text


def test_no_cache_export_is_removed_after_use(tmp_path: Path) -> None:
    from modec import hf

    d = _save_family("qwen3moe", tmp_path / "q", "float32")
    before = sorted(p.name for p in d.iterdir())
    with hf.onnx_model(d, None) as path:
        assert Path(path).parent == d and Path(path).is_file()
    assert sorted(p.name for p in d.iterdir()) == before


# ---- bad checkpoints and the fallback --------------------------------------------------------


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from modec import hf
    from modec.errors import ModelError

    d = _save_family("qwen3moe", tmp_path / "q", "float32")
    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelError,
        match=r"no tensor for parameter model\.layers\.1\.self_attn"
        r"\.k_norm\.weight \(transformers would initialize",
    ):
        hf.export_onnx(d, d / "modec-x.onnx")
    weights["model.layers.1.self_attn.k_norm.weight"] = np.ones(4, np.float32)
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelError,
        match=r"k_norm\.weight has shape \[4\], the model built from "
        r"config\.json \[8\]",
    ):
        hf.export_onnx(d, d / "modec-x.onnx")
    assert not list(d.glob("modec-*")) and not list(d.glob(".modec-*"))


def test_unbound_conversion_falls_back_to_loading(
    tmp_path: Path, caplog: Any, monkeypatch: Any
) -> None:
    """A conversion modec does not bind (here a fused QKV split by ``Chunk``, registered the
    way a user registers one with transformers) exports by loading the model, with a warning."""
    import torch
    import transformers as tf
    from safetensors.numpy import load_file, save_file
    from transformers import conversion_mapping as cm
    from transformers.core_model_loading import Chunk, WeightConverter

    from modec import hf
    from modec.frontend import OrtRunner
    from tests.test_hf import _randomize

    d = tmp_path / "q"
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(qwen3_moe_config(num_key_value_heads=4)).eval()
    _randomize(model)
    model.save_pretrained(d)
    weights = load_file(d / "model.safetensors")
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        weights[f"{p}qkv_proj.weight"] = np.concatenate(
            [weights.pop(f"{p}{x}_proj.weight") for x in "qkv"]
        )
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    mapping = [*cm.get_checkpoint_conversion_mapping("qwen3_moe"),
               WeightConverter("self_attn.qkv_proj.weight",
                               ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                "self_attn.v_proj.weight"], [Chunk(dim=0)])]  # fmt: skip
    cm.get_checkpoint_conversion_mapping("qwen3_moe")  # builds the cache
    monkeypatch.setitem(cm._checkpoint_conversion_mapping_cache, "qwen3_moe", mapping)
    with caplog.at_level(logging.WARNING, logger="modec.hf"):
        path = hf.export_onnx(d, d / "modec-x.onnx")
    assert "Chunk is not one modec binds" in caplog.text
    assert "exporting with every weight loaded" in caplog.text
    ids = np.arange(12, dtype=np.int64).reshape(2, 6) % 48
    got = OrtRunner(path)({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert _rel(got, want) < 1e-5


# ---- compiling a bf16 checkpoint ------------------------------------------------------------


@pytest.mark.slow  # 23-40 s on two cores (two compiles)
def test_bf16_directory_compiles(tmp_path: Path) -> None:
    """modec compile DIR (a bf16 Qwen3-MoE) with --target none and --target llvm; the
    compiled artifact equals the simulated model."""
    from modec.runners import CompiledRunner, SimulatedRunner
    from tests.test_hf import CHAT_TEMPLATE, SENTENCES, build_tokenizer, modec, write_jsonl

    pytest.importorskip("tvm")
    d = _save_family("qwen3moe", tmp_path / "q", "bfloat16")
    build_tokenizer(CHAT_TEMPLATE).save_pretrained(d)
    prompts = write_jsonl(tmp_path / "p.jsonl", SENTENCES * 2)
    calib = tmp_path / "calib.npz"
    r = modec("calib", "build", "--model", str(d), "--prompts", str(prompts), "-o", str(calib))
    assert r.returncode == 0, r.stderr
    for target in ("none", "llvm"):
        out = tmp_path / f"out-{target}"
        r = modec("compile", str(d), "--calib", str(calib), "--target", target,
                  "--sensitivity-samples", "4", "--cache-dir", str(tmp_path / "cache"),
                  "-o", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr
    feeds = _feeds("qwen3moe")
    want = SimulatedRunner(tmp_path / "out-llvm")(feeds)
    got = CompiledRunner(tmp_path / "out-llvm")(feeds)
    assert np.isfinite(want).all() and _rel(got, want) < 1e-4


# ---- measuring ------------------------------------------------------------------------------

_CHILD = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
for name in ("torch", "onnxscript", "transformers", "onnx_ir"):
    logging.getLogger(name).setLevel(logging.ERROR)
from pathlib import Path
from modec import hf
d, out, path = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
if path == "new":
    hf.export_onnx(d, out)
else:
    hf._export_loaded(d, hf.read_config(d), out)
# VmHWM: this process's own peak (ru_maxrss would also count the parent's pages at the fork).
(hwm,) = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
peak = int(hwm) * 1024
print(f"peak_rss {peak} seconds {time.perf_counter() - t:.1f}", file=sys.stderr)
"""


def export_peak(
    d: Path, out: Path, path: str, env: dict[str, str] | None = None
) -> tuple[int, float]:  # fmt: skip
    """Peak RSS (bytes) and seconds of one export in a fresh process (``path``: ``new`` or
    ``old``, the export that loads every weight)."""
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(d), str(out), path], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=3600,
    )  # fmt: skip
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    for line in r.stderr.splitlines():
        if line.startswith("modec"):
            print(f"  {line}")
    (peak,) = [int(ln.split()[1]) for ln in r.stderr.splitlines() if ln.startswith("peak_rss")]
    return peak, time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    """Write a Qwen3-30B-A3B-shaped bf16 checkpoint (``--layers`` layers) and measure its
    export's peak RSS with the new and the old path."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--paths", nargs="+", default=["new", "old"], choices=["new", "old"])
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the exports")
    args = ap.parse_args(argv)
    d: Path = args.dir
    if not (d / "config.json").is_file():
        t = time.perf_counter()
        cfg = qwen3_moe_config(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144,
            num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
            max_position_embeddings=4096, tie_word_embeddings=False,
        )  # fmt: skip
        nbytes = write_checkpoint(d, cfg, "bfloat16", shard_bytes=2 * 2**30)
        print(f"checkpoint: {nbytes / 2**30:.2f} GiB bf16 in {time.perf_counter() - t:.0f} s")
    for path in args.paths:
        out = d / f"modec-{path}.onnx" if path == "new" else d.with_name(f"{d.name}-old") / "m.onnx"
        peak, seconds = export_peak(d, out, path)
        print(f"{path}: peak RSS {peak / 2**30:.2f} GiB, {seconds:.0f} s")
        if not args.keep:
            for p in [*d.glob(f"modec-{path}.*"), *out.parent.glob("m.onnx*")]:
                p.unlink()
    if not args.keep:
        shutil.rmtree(d)
        shutil.rmtree(d.with_name(f"{d.name}-old"), ignore_errors=True)


if __name__ == "__main__":
    main()
