"""Random-weight MoE vision-language models at Qwen3-VL-30B-A3B's MoE shapes, for scaling runs.

    python -m tools.scale_model OUT_DIR --layers L --dtype {float16,bfloat16} --calib N \
        [--hidden 2048 --experts 128 --intermediate 768 --top-k 8 --heads H --vocab 4096 \
         --vision-dim D --image-size 256 --patch 16 --seed 0]

writes ``OUT_DIR/model.onnx`` (graph only: every weight lives in external data),
``OUT_DIR/shared.bin`` (embeddings, vision part, final norm, LM head),
``OUT_DIR/layer-NNN.bin`` (one per decoder layer), ``OUT_DIR/calib.npz`` (a modec dataset
of N samples, `modec.data.save`) and ``OUT_DIR/config.json`` (the configuration and the
sizes written). The defaults are Qwen3-VL-30B-A3B's MoE: hidden 2048, 128 experts of
intermediate 768, top-8, a softmax router with renormalised top-k weights (Qwen3-MoE). One
full-width decoder layer is ~1.2 GB in fp16/bf16, so L >= 2 is past protobuf's 2 GiB.

The model takes what the bundled digits-vlm takes (`tools/digits_vlm/`): ``input_ids``
``[B, T]`` int64 (left padded), ``attention_mask`` ``[B, T]`` int64 and ``pixel_values``
``[B, 3, S, S]`` float32 in [0, 1] (S = 256); the k-th ``<image>`` token (id 2) of a row
takes the k-th of the image's (S / 16)² = 256 patch features. It returns ``logits [B, T, V]``.

- vision: pixels scaled to [-1, 1], 16×16 patches → Linear(3·16·16, D) + learned positions
  → RMSNorm → Linear(D, H) → tanh → Linear(H, H) (the projector; tanh rather than GELU keeps
  a random router's expert loads balanced, see `_vision`);
- decoder: token embedding (placeholders replaced by the image features) + learned positions,
  then L blocks of RMSNorm → causal self-attention (``heads`` × ``hidden / heads``, an
  explicit Softmax over keys with an additive causal + key-padding mask) → RMSNorm → MoE;
  a final RMSNorm and the LM head;
- MoE: a router ``Gemm`` (weight ``[E, H]``) → Softmax → TopK(k) → top-k weights divided by
  their sum, and the experts as transformers 5 exports ``experts_implementation="batched_mm"``
  (`tools/digits_vlm` ``stacked``): ``GatherND`` of the chosen experts' rows of a stacked
  ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``, batched MatMuls
  of one row per (token, slot), SiLU(gate)·up, weighted sum over the k slots.

Weights are stored in ``--dtype`` (fp16 or bf16) and computed in float32: each weight is
read through a ``Cast`` to float32 (after the ``Gather``/``GatherND`` for the embeddings and
the stacked experts, so only the chosen rows are converted), as a mixed-precision export
that keeps fp16/bf16 storage does. onnxruntime runs the model on the CPU.

Initialisation: every matrix has variance 1/fan_in (uniform on ±√(3/fan_in), which numpy
draws ~7× faster than a normal: the variance is what keeps activations O(1)), so each
projection of a unit-RMS input has unit-RMS outputs; the two projections that write into the
residual stream (attention output and expert down projection) are further scaled by
1/√(2·48) (GPT-2's residual scaling with the depth of Qwen3-VL-30B-A3B, fixed so a layer's
weights do not depend on ``--layers``), so the residual stream stays O(1) at any depth up to
48; embeddings have variance 1, norms are 1.

Streaming: the graph proto holds only names, shapes and (file, offset, length) references.
Each tensor is generated in chunks of ``CHUNK`` elements by its own numpy generator (seeded
by ``--seed`` and the tensor name, so a layer's weights do not depend on how many layers
there are) and appended to its ``.bin`` file; offsets are aligned to 4096 bytes. The
builder's memory is a few chunks whatever the model size (it prints its own peak RSS). The
same arguments give the same bytes in every file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from modec import data

#: Elements generated per chunk (16 MiB of float32).
CHUNK = 1 << 22
#: Offset alignment of every tensor in the external data files (a page).
ALIGN = 4096
#: GPT-2 residual scaling uses the depth of the model being imitated (Qwen3-VL-30B-A3B).
RESIDUAL_DEPTH = 48
OPSET = 18
PAD_ID, BOS_ID, IMAGE_ID, QUESTION_ID = 0, 1, 2, 3
#: First id of the ordinary word tokens.
FIRST_WORD = 4
#: Bumped whenever the same configuration would give other bytes: a cached build of another
#: version is rebuilt.
VERSION = 2
MODEL_FILE = "model.onnx"
CALIB_FILE = "calib.npz"
CONFIG_FILE = "config.json"
SHARED_FILE = "shared.bin"
DTYPES: dict[str, tuple[int, Any]] = {
    "float16": (TensorProto.FLOAT16, np.dtype(np.float16)),
    "bfloat16": (TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
}


@dataclass(frozen=True)
class ScaleConfig:
    """The shapes of a scale model. Defaults: Qwen3-VL-30B-A3B's MoE, one layer.

    Attributes:
        heads: attention heads; 0 picks ``min(16, hidden // 64)`` (16 × 128 at hidden 2048).
        max_positions: rows of the position tables; 0 picks ``patches + 256``.
    """

    layers: int = 1
    hidden: int = 2048
    experts: int = 128
    intermediate: int = 768
    top_k: int = 8
    heads: int = 0
    vocab: int = 4096
    vision_dim: int = 1024
    image_size: int = 256
    patch: int = 16
    channels: int = 3
    max_positions: int = 0
    dtype: str = "float16"
    seed: int = 0
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.heads == 0:
            object.__setattr__(self, "heads", max(1, min(16, self.hidden // 64)))
        if self.max_positions == 0:
            object.__setattr__(self, "max_positions", self.patches + 256)
        checks = [
            (self.layers >= 1, "layers >= 1"),
            (self.hidden % self.heads == 0, "hidden divisible by heads"),
            (1 <= self.top_k < self.experts, "1 <= top_k < experts"),
            (self.image_size % self.patch == 0, "image_size divisible by patch"),
            (self.vocab > FIRST_WORD + 1, f"vocab > {FIRST_WORD + 1}"),
            (self.max_positions >= self.patches + 64, "max_positions >= patches + 64"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"scale model config: need {what} ({self})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def patches(self) -> int:
        """Vision tokens per image."""
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Written:
    """What `build_model` wrote: files with their sizes, parameter counts and timings."""

    files: dict[str, int] = field(default_factory=dict)
    params: int = 0
    expert_params: int = 0
    seconds: float = 0.0


class ExternalWriter:
    """Appends generated tensors to ``.bin`` files and returns their external TensorProtos."""

    def __init__(self, out: Path, cfg: ScaleConfig) -> None:
        self.out = out
        self.cfg = cfg
        self.onnx_type, self.np_dtype = DTYPES[cfg.dtype]
        self.itemsize = int(self.np_dtype.itemsize)
        self.file: Any = None
        self.name = ""
        self.offset = 0
        self.written = Written()

    def open(self, name: str) -> None:
        self.close()
        self.name = name
        self.file = open(self.out / f".{name}.tmp", "wb")  # noqa: SIM115 (closed in close())
        self.offset = 0

    def close(self) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self.out / f".{self.name}.tmp", self.out / self.name)
        self.written.files[self.name] = self.offset

    def _chunks(self, name: str, n: int, std: float | None) -> Iterator[np.ndarray]:
        """``n`` values of the tensor ``name``: mean 0 and standard deviation ``std``
        (uniform on ±std·√3: numpy draws it ~7× faster than a normal), or ones for None."""
        if std is None:
            for start in range(0, n, CHUNK):
                yield np.ones(min(CHUNK, n - start), dtype=self.np_dtype)
            return
        seq = np.random.SeedSequence([self.cfg.seed, zlib.crc32(name.encode())])
        rng = np.random.default_rng(seq)
        limit = std * math.sqrt(3.0)
        for start in range(0, n, CHUNK):
            a = rng.random(min(CHUNK, n - start), dtype=np.float32)  # [0, 1)
            a *= np.float32(2 * limit)
            a -= np.float32(limit)
            yield a.astype(self.np_dtype)  # round to nearest even (fp16 and ml_dtypes bf16)

    def tensor(self, name: str, shape: tuple[int, ...], std: float | None) -> TensorProto:
        """Generate ``name`` chunk by chunk into the open file; its external TensorProto."""
        assert self.file is not None, "open() a file first"
        pad = -self.offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        n = math.prod(shape)
        start = self.offset
        for chunk in self._chunks(name, n, std):
            self.file.write(chunk.view(np.uint8).data)
            self.offset += chunk.size * self.itemsize
        length = self.offset - start
        assert length == n * self.itemsize
        t = TensorProto()
        t.name = name
        t.data_type = self.onnx_type
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", start), ("length", length)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self.written.params += n
        return t


class GraphBuilder:
    """Nodes, constants and weights of the scale model, in topological order."""

    def __init__(self, writer: ExternalWriter) -> None:
        self.w = writer
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0
        self._consts: dict[tuple[str, bytes], str] = {}

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> list[str]:
        self._n += 1
        base = f"{op_type.lower()}_{self._n}"
        outs = [base if n_out == 1 else f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"node_{base}", **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        return self.op(op_type, inputs, **attrs)[0]

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer stored in the proto (shapes, axes, scalars)."""
        arr = np.asarray(values, dtype=dtype)
        key = (f"{arr.dtype}{arr.shape}", arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.inits.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, shape: tuple[int, ...], std: float | None) -> str:
        """A generated weight in external data, read through a Cast to float32."""
        self.inits.append(self.w.tensor(name, shape, std))
        return name

    def f32(self, name: str) -> str:
        return self.op1("Cast", [name], to=TensorProto.FLOAT)

    def linear_weight(self, name: str, k: int, n: int, std_scale: float = 1.0) -> str:
        """A ``[k, n]`` matrix ~ N(0, std_scale² / k)."""
        return self.weight(name, (k, n), std_scale / math.sqrt(k))

    def linear(self, x: str, name: str, k: int, n: int, std_scale: float = 1.0) -> str:
        """``x @ W`` with a new ``W [k, n]`` (the dynamo exporter's form of nn.Linear)."""
        return self.matmul(x, self.linear_weight(name, k, n, std_scale))

    def matmul(self, x: str, weight: str) -> str:
        return self.op1("MatMul", [x, self.f32(weight)])

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        """``x / sqrt(mean(x²) + eps) · weight`` (``weight``: a `weight` name, ones)."""
        sq = self.op1("Pow", [x, self.const(2.0, np.float32)])
        mean = self.op1("ReduceMean", [sq, self.const([-1])], keepdims=1)
        std = self.op1("Sqrt", [self.op1("Add", [mean, self.const(eps, np.float32)])])
        normed = self.op1("Mul", [x, self.op1("Reciprocal", [std])])
        return self.op1("Mul", [normed, self.f32(weight)])

    def norm_weight(self, name: str, dim: int) -> str:
        return self.weight(name, (dim,), None)


def _vision(g: GraphBuilder, cfg: ScaleConfig, pixels: str) -> str:
    """Patch embedding + positions → RMSNorm → projector: ``[B, patches, hidden]``.

    Pixels are normalised to [-1, 1] first (what image processors' mean/std does). The
    projector's nonlinearity is a tanh, not Qwen's GELU: GELU's positive mean gives every
    image token one shared direction, which a random (untrained) router turns into a few
    overloaded experts (coefficient of variation of the expert loads 0.8–1.0 against
    0.2–0.26 with tanh, hidden 512, 64 experts, top-8, 8 calibration samples).
    """
    c, p, n = cfg.channels, cfg.patch, cfg.grid
    x = g.op1("Mul", [g.op1("Sub", [pixels, g.const(0.5, np.float32)]), g.const(2.0, np.float32)])
    x = g.op1("Reshape", [x, g.const([0, c, n, p, n, p])])
    x = g.op1("Transpose", [x], perm=[0, 2, 4, 1, 3, 5])  # [B, n, n, C, p, p]
    x = g.op1("Reshape", [x, g.const([0, cfg.patches, cfg.patch_dim])])
    x = g.linear(x, "visual.patch_embed.weight", cfg.patch_dim, cfg.vision_dim)
    pos = g.f32(g.weight("visual.pos_embed", (cfg.patches, cfg.vision_dim), 1.0))
    x = g.op1("Add", [x, pos])
    x = g.rms_norm(x, g.norm_weight("visual.norm.weight", cfg.vision_dim), cfg.rms_eps)
    x = g.op1("Tanh", [g.linear(x, "visual.merger.fc1.weight", cfg.vision_dim, cfg.hidden)])
    return g.linear(x, "visual.merger.fc2.weight", cfg.hidden, cfg.hidden)


def _attention(g: GraphBuilder, cfg: ScaleConfig, x: str, bias: str, prefix: str) -> str:
    h, d = cfg.heads, cfg.head_dim
    split = g.const([0, 0, h, d])
    q = g.op1("Reshape", [g.linear(x, f"{prefix}.q_proj.weight", cfg.hidden, h * d), split])
    k = g.op1("Reshape", [g.linear(x, f"{prefix}.k_proj.weight", cfg.hidden, h * d), split])
    v = g.op1("Reshape", [g.linear(x, f"{prefix}.v_proj.weight", cfg.hidden, h * d), split])
    q = g.op1("Transpose", [q], perm=[0, 2, 1, 3])
    kt = g.op1("Transpose", [k], perm=[0, 2, 3, 1])
    v = g.op1("Transpose", [v], perm=[0, 2, 1, 3])
    scores = g.op1("Mul", [g.op1("MatMul", [q, kt]), g.const(1 / math.sqrt(d), np.float32)])
    probs = g.op1("Softmax", [g.op1("Add", [scores, bias])], axis=-1)  # what MODE reads
    ctx = g.op1("Transpose", [g.op1("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    ctx = g.op1("Reshape", [ctx, g.const([0, 0, h * d])])
    out_scale = 1 / math.sqrt(2 * RESIDUAL_DEPTH)
    return g.linear(ctx, f"{prefix}.o_proj.weight", h * d, cfg.hidden, out_scale)


def _moe(g: GraphBuilder, cfg: ScaleConfig, x: str, x_shape: str, prefix: str) -> str:
    """Softmax router, renormalised top-k, stacked experts (transformers ``batched_mm``)."""
    hd, e, i, k = cfg.hidden, cfg.experts, cfg.intermediate, cfg.top_k
    flat = g.op1("Reshape", [x, g.const([-1, hd])])  # [T, H]
    router = g.weight(f"{prefix}.gate.weight", (e, hd), 1 / math.sqrt(hd))
    logits = g.op1("Gemm", [flat, g.f32(router)], transB=1)
    probs = g.op1("Softmax", [logits], axis=-1)
    top_w, top_i = g.op("TopK", [probs, g.const([k])], n_out=2, axis=-1, largest=1, sorted=1)
    total = g.op1("ReduceSum", [top_w, g.const([-1])], keepdims=1)
    weights = g.op1("Div", [top_w, total])
    # One row per (token, slot).
    rows = g.op1("Expand", [g.op1("Unsqueeze", [flat, g.const([1])]), g.const([1, k, 1])])
    rows = g.op1("Reshape", [rows, g.const([-1, 1, hd])])  # [T·k, 1, H]
    ids = g.op1("Unsqueeze", [g.op1("Reshape", [top_i, g.const([-1])]), g.const([1])])
    gate_up = g.weight(f"{prefix}.experts.gate_up_proj", (e, 2 * i, hd), 1 / math.sqrt(hd))
    w_gu = g.op1("Transpose", [g.f32(g.op1("GatherND", [gate_up, ids]))], perm=[0, 2, 1])
    gu = g.op1("Squeeze", [g.op1("MatMul", [rows, w_gu]), g.const([1])])  # [T·k, 2I]
    one = g.const([1])
    gate = g.op1("Slice", [gu, g.const([0]), g.const([i]), one, one])
    up = g.op1("Slice", [gu, g.const([i]), g.const([2 * i]), one, one])
    act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
    act = g.op1("Unsqueeze", [act, one])  # [T·k, 1, I]
    down_std = 1 / math.sqrt(i) / math.sqrt(2 * RESIDUAL_DEPTH)
    down = g.weight(f"{prefix}.experts.down_proj", (e, hd, i), down_std)
    w_d = g.op1("Transpose", [g.f32(g.op1("GatherND", [down, ids]))], perm=[0, 2, 1])
    y = g.op1("Squeeze", [g.op1("MatMul", [act, w_d]), one])  # [T·k, H]
    y = g.op1("Mul", [y, g.op1("Reshape", [weights, g.const([-1, 1])])])
    y = g.op1("Reshape", [y, g.const([-1, k, hd])])
    y = g.op1("ReduceSum", [y, one], keepdims=0)  # [T, H]
    g.w.written.expert_params += e * 3 * i * hd
    return g.op1("Reshape", [y, x_shape])


def _graph(g: GraphBuilder, cfg: ScaleConfig) -> tuple[list[str], str]:
    """The whole model; returns (input names, output name)."""
    ids, mask, pixels = "input_ids", "attention_mask", "pixel_values"
    g.w.open(SHARED_FILE)
    vis = _vision(g, cfg, pixels)  # [B, P, H]
    embed = g.weight("model.embed_tokens.weight", (cfg.vocab, cfg.hidden), 1.0)
    text = g.f32(g.op1("Gather", [embed, ids]))
    # The k-th <image> token of a row takes the row's k-th patch feature.
    is_image = g.op1("Equal", [ids, g.const(IMAGE_ID)])
    slot = g.op1("CumSum", [g.op1("Cast", [is_image], to=TensorProto.INT64), g.const(1)])
    slot = g.op1("Clip", [g.op1("Sub", [slot, g.const(1)]), g.const(0), g.const(cfg.patches - 1)])
    feats = g.op1("GatherND", [vis, g.op1("Unsqueeze", [slot, g.const([-1])])], batch_dims=1)
    x = g.op1("Where", [g.op1("Unsqueeze", [is_image, g.const([-1])]), feats, text])
    # Positions from the mask (left padding): cumsum - 1, clamped at 0.
    pos = g.op1("CumSum", [mask, g.const(1)])
    pos = g.op1("Max", [g.op1("Sub", [pos, g.const(1)]), g.const(0)])
    pos_table = g.weight("model.embed_positions.weight", (cfg.max_positions, cfg.hidden), 0.02)
    x = g.op1("Add", [x, g.f32(g.op1("Gather", [pos_table, pos]))])
    # Additive attention bias [B, 1, T, T]: causal and key padding.
    t = g.op1("Gather", [g.op1("Shape", [ids]), g.const(1)])
    ar = g.op1("Range", [g.const(0), t, g.const(1)])
    causal = g.op1(
        "LessOrEqual",
        [g.op1("Unsqueeze", [ar, g.const([0])]), g.op1("Unsqueeze", [ar, g.const([1])])],
    )  # [T(query), T(key)]: key <= query
    keys = g.op1("Unsqueeze", [g.op1("Cast", [mask], to=TensorProto.BOOL), g.const([1, 2])])
    allowed = g.op1("And", [causal, keys])  # [B, 1, T, T]
    bias = g.op1("Where", [allowed, g.const(0.0, np.float32), g.const(-1e9, np.float32)])
    # The head's weights go into shared.bin too (written now, used after the layers).
    final_norm = g.norm_weight("model.norm.weight", cfg.hidden)
    head = g.linear_weight("lm_head.weight", cfg.hidden, cfg.vocab)
    x_shape = g.op1("Shape", [x])
    for layer in range(cfg.layers):
        g.w.open(layer_file(layer))
        p = f"model.layers.{layer}"
        h = g.rms_norm(x, g.norm_weight(f"{p}.input_layernorm.weight", cfg.hidden), cfg.rms_eps)
        x = g.op1("Add", [x, _attention(g, cfg, h, bias, f"{p}.self_attn")])
        w = g.norm_weight(f"{p}.post_attention_layernorm.weight", cfg.hidden)
        h = g.rms_norm(x, w, cfg.rms_eps)
        x = g.op1("Add", [x, _moe(g, cfg, h, x_shape, f"{p}.mlp")])
    g.w.close()
    return [ids, mask, pixels], g.matmul(g.rms_norm(x, final_norm, cfg.rms_eps), head)


def layer_file(layer: int) -> str:
    """The external data file of decoder layer ``layer``."""
    return f"layer-{layer:03d}.bin"


def build_model(out: str | os.PathLike[str], cfg: ScaleConfig) -> Written:
    """Write ``model.onnx`` and its external data into ``out`` (see the module docstring)."""
    t0 = time.perf_counter()
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    writer = ExternalWriter(dest, cfg)
    g = GraphBuilder(writer)
    try:
        (ids, mask, pixels), logits_raw = _graph(g, cfg)
    finally:
        writer.close()
    logits = "logits"
    g.nodes.append(helper.make_node("Identity", [logits_raw], [logits], name="node_logits"))
    inputs = [
        helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(
            pixels, TensorProto.FLOAT, ["batch", cfg.channels, cfg.image_size, cfg.image_size]
        ),
    ]
    output = helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "seq", cfg.vocab])
    graph = helper.make_graph(g.nodes, "scale_model", inputs, [output], initializer=g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="modec-tools-scale-model",
        producer_version="1",
        doc_string=f"scale model {json.dumps(cfg.to_dict(), sort_keys=True)}",
    )
    model.ir_version = 8  # opset 18's IR version (what onnxruntime and onnx agree on)
    # Shapes of every value, as exporters write them: a model past 2 GiB is not shape-inferred
    # by modec (its proto cannot be serialized in memory), so the file carries them. The
    # proto here holds no weight bytes: inference reads dims only.
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    path = dest / MODEL_FILE
    tmp = dest / f".{MODEL_FILE}.tmp"
    tmp.write_bytes(model.SerializeToString(deterministic=True))
    onnx.checker.check_model(str(tmp))  # from the file: it checks the external data files too
    os.replace(tmp, path)
    writer.written.files[MODEL_FILE] = path.stat().st_size
    writer.written.seconds = time.perf_counter() - t0
    return writer.written


def draw_image(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """A ``[channels, size, size]`` uint8 picture: a flat background and 3–8 filled shapes."""
    img = np.empty((channels, size, size), dtype=np.uint8)
    img[:] = rng.integers(0, 256, size=(channels, 1, 1), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(3, 9))):
        cy, cx = rng.integers(0, size, size=2)
        ry, rx = rng.integers(size // 16, size // 3, size=2)
        if rng.random() < 0.5:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        else:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        color = rng.integers(0, 256, size=channels, dtype=np.uint8)
        for c in range(channels):
            img[c][inside] = color[c]
    return img


def calibration_arrays(cfg: ScaleConfig, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` samples, left padded: 1/8 text-only (at least one when n >= 2), the rest one
    image each, in a seeded order.

    A multimodal sample is ``<bos>``, 2–12 words, the ``patches`` ``<image>`` tokens, 4–24
    words and ``?``; a text-only one is ``<bos>``, 8–96 words and ``?``. Words are drawn
    uniformly from the vocabulary. Pixels are k/255 (stored as uint8 codes).
    """
    if n < 1:
        raise ValueError("the calibration set needs at least one sample")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA11B]))
    n_text = max(1, round(n / 8)) if n >= 2 else 0
    kinds = np.array([True] * (n - n_text) + [False] * n_text)[rng.permutation(n)]
    words: Callable[[int, int], np.ndarray] = lambda lo, hi: rng.integers(  # noqa: E731
        FIRST_WORD, cfg.vocab, size=int(rng.integers(lo, hi + 1))
    )
    seqs: list[np.ndarray] = []
    images = np.zeros((n, cfg.channels, cfg.image_size, cfg.image_size), dtype=np.uint8)
    for i, multimodal in enumerate(kinds):
        if multimodal:
            parts = [[BOS_ID], words(2, 12), [IMAGE_ID] * cfg.patches, words(4, 24)]
            images[i] = draw_image(rng, cfg.image_size, cfg.channels)
        else:
            parts = [[BOS_ID], words(8, 96)]
        seqs.append(
            np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] + [[QUESTION_ID]])
        )
    t = max(len(s) for s in seqs)
    if t > cfg.max_positions:
        raise ValueError(f"samples of {t} tokens exceed max_positions {cfg.max_positions}")
    input_ids = np.full((n, t), PAD_ID, dtype=np.int64)
    mask = np.zeros((n, t), dtype=np.int64)
    for i, s in enumerate(seqs):
        input_ids[i, t - len(s) :] = s
        mask[i, t - len(s) :] = 1
    pixels = images.astype(np.float32) * np.float32(1.0 / 255.0) + np.float32(0.0)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "family": (~kinds).astype(np.int64),
    }


def write_calibration(
    path: str | os.PathLike[str], cfg: ScaleConfig, n: int, seed: int | None = None
) -> None:
    """A modec dataset (`modec.data.save`) of ``n`` samples for the scale model ``cfg``."""
    arrays = calibration_arrays(cfg, n, cfg.seed if seed is None else seed)
    inputs = {k: arrays[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    data.save(
        path,
        inputs,
        modality=data.derive_modality(inputs["input_ids"], IMAGE_ID, inputs["attention_mask"]),
        family=arrays["family"],
        header={
            "image_token_id": IMAGE_ID,
            "families": ["image", "text"],
            "multimodal_families": ["image"],
            "source": "tools/scale_model.py",
        },
        encodings={"pixel_values": {"stored": "uint8", "scale": 1.0 / 255.0, "offset": 0.0}},
    )


def build(out: str | os.PathLike[str], cfg: ScaleConfig, calib: int) -> dict[str, Any]:
    """Model, calibration set and ``config.json`` in ``out``; returns what config.json holds
    and the build's ``seconds``."""
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / CONFIG_FILE).unlink(missing_ok=True)  # a half-written directory is no cache hit
    written = build_model(dest, cfg)
    t0 = time.perf_counter()
    write_calibration(dest / CALIB_FILE, cfg, calib)
    calib_seconds = time.perf_counter() - t0
    files = {**written.files, CALIB_FILE: (dest / CALIB_FILE).stat().st_size}
    doc = {
        "version": VERSION,
        "config": cfg.to_dict(),
        "calib": calib,
        "files": dict(sorted(files.items())),
        "params": written.params,
        "expert_params": written.expert_params,
    }
    tmp = dest / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")  # no timings: same bytes
    os.replace(tmp, dest / CONFIG_FILE)
    return {**doc, "seconds": {"model": written.seconds, "calib": calib_seconds}}


def cached(out: str | os.PathLike[str], cfg: ScaleConfig, calib: int) -> dict[str, Any] | None:
    """``config.json`` of a finished build of exactly ``cfg`` and ``calib`` in ``out``, else None
    (a different configuration or builder `VERSION`, a missing or resized file, an interrupted
    build)."""
    path = Path(out) / CONFIG_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (doc.get("version"), doc.get("config"), doc.get("calib")) != (VERSION, cfg.to_dict(), calib):
        return None
    for name, size in doc.get("files", {}).items():
        f = Path(out) / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return doc


def peak_rss_bytes() -> int:
    """This process's peak RSS so far (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def config_from_args(args: argparse.Namespace) -> ScaleConfig:
    names = {f.name for f in fields(ScaleConfig)}
    return ScaleConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """The shape options (defaults: Qwen3-VL-30B-A3B's MoE) shared with tools.bench_scale."""
    d = ScaleConfig()
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--experts", type=int, default=d.experts)
    ap.add_argument("--intermediate", type=int, default=d.intermediate)
    ap.add_argument("--top-k", dest="top_k", type=int, default=d.top_k)
    ap.add_argument("--heads", type=int, default=0, help="0: min(16, hidden // 64)")
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--vision-dim", dest="vision_dim", type=int, default=d.vision_dim)
    ap.add_argument("--image-size", dest="image_size", type=int, default=d.image_size)
    ap.add_argument("--patch", type=int, default=d.patch)
    ap.add_argument("--seed", type=int, default=d.seed)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    add_config_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        ap.error(str(exc))
    doc = build(args.out, cfg, args.calib)
    total = sum(doc["files"].values())
    print(
        f"wrote {args.out}: {cfg.layers} layer(s) x {cfg.experts} experts (hidden {cfg.hidden}, "
        f"intermediate {cfg.intermediate}, top-{cfg.top_k}), {cfg.dtype}, "
        f"{doc['params'] / 1e9:.3f} B parameters ({doc['expert_params'] / 1e9:.3f} B in experts), "
        f"{total / 2**30:.2f} GiB in {len(doc['files'])} files; {args.calib} calibration samples; "
        f"{doc['seconds']['model']:.1f} s + {doc['seconds']['calib']:.1f} s; "
        f"builder peak RSS {peak_rss_bytes() / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
