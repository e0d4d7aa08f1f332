"""Loading ONNX models whose weights live in external data without reading the weights.

The models are MoE layers as transformers 5 exports them (``batched_mm``: a router ``Gemm``,
``TopK``, ``GatherND`` of stacked ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``),
written here with onnx helpers; every weight goes to external data files, streamed a block at
a time. Memory is measured in a fresh interpreter (`_run_probe`), from /proc/self/status.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from modec import cache
from modec.data import Dataset
from modec.driver import check_weights_finite
from modec.errors import ModelError
from modec.frontend import (
    OrtRunner,
    input_specs,
    load_onnx,
    load_onnx_proto,
    ort_session,
    tensor_bytes,
    tensor_chunks,
)

DTYPES = {"float16": (TensorProto.FLOAT16, np.dtype(np.float16)),
          "bfloat16": (TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16))}  # fmt: skip
#: Elements written per block (the builder never holds a whole weight).
BLOCK = 1 << 20
#: One bf16 NaN and +inf, as bits.
BF16_NAN, BF16_INF = 0x7FC0, 0x7F80
REPO = Path(__file__).resolve().parents[1]


class _Writer:
    """Appends weights to external data files; returns their external TensorProtos."""

    def __init__(self, out: Path, dtype: str, seed: int) -> None:
        self.out, self.seed = out, seed
        self.onnx_type, self.np_dtype = DTYPES[dtype]
        self.offsets: dict[str, int] = {}

    def weight(self, name: str, shape: tuple[int, ...], file: str, sparse: bool = False
               ) -> TensorProto:  # fmt: skip
        n = int(np.prod(shape))
        nbytes = n * self.np_dtype.itemsize
        offset = self.offsets.get(file, 0)
        offset = (offset + 4095) // 4096 * 4096
        with open(self.out / file, "r+b" if file in self.offsets else "wb") as f:
            if sparse:  # a hole: the file's size grows, nothing is written
                f.truncate(offset + nbytes)
            else:
                f.seek(offset)
                rng = np.random.default_rng([self.seed, len(self.offsets), offset])
                block = rng.standard_normal(min(n, BLOCK), dtype=np.float32) * 0.02
                block = block.astype(self.np_dtype)
                for start in range(0, n, BLOCK):
                    f.write(block[: min(BLOCK, n - start)].tobytes())
        self.offsets[file] = offset + nbytes
        t = TensorProto(name=name, data_type=self.onnx_type, dims=shape)
        _set_external(t, file, offset, nbytes)
        return t


def _set_external(t: TensorProto, location: str, offset: int, length: int | None = None) -> None:
    del t.external_data[:]
    entries = {"location": location, "offset": offset, "length": length}
    for key, value in entries.items():
        if value is not None:
            t.external_data.add(key=key, value=str(value))
    t.data_location = TensorProto.EXTERNAL


def build_moe(out: Path, *, dtype: str = "float16", experts: int = 8, hidden: int = 64,
              inter: int = 32, top_k: int = 2, layers: int = 1, seed: int = 0,
              sparse: bool = False) -> Path:  # fmt: skip
    """``out/model.onnx``: ``layers`` MoE layers on ``x [T, hidden]`` (residual adds); the
    router of layer l in ``router.bin``, its experts in ``layer-l.bin``."""
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(out, dtype, seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    consts: dict[str, str] = {}

    def op(op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> list[str]:
        outs = [f"{op_type.lower()}_{len(nodes)}_{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{len(nodes)}", **attrs))
        return outs

    def const(values: list[int]) -> str:
        key = str(values)
        if key not in consts:
            consts[key] = f"const_{len(consts)}"
            inits.append(numpy_helper.from_array(np.array(values, np.int64), consts[key]))
        return consts[key]

    def f32(name: str) -> str:
        return op("Cast", [name], to=TensorProto.FLOAT)[0]

    e, h, i, k = experts, hidden, inter, top_k
    x = "x"
    for layer in range(layers):
        p = f"model.layers.{layer}.mlp"
        inits.append(w.weight(f"{p}.gate.weight", (e, h), "router.bin"))
        logits = op("Gemm", [x, f32(inits[-1].name)], transB=1)[0]
        probs = op("Softmax", [logits], axis=-1)[0]
        top_w, top_i = op("TopK", [probs, const([k])], 2, axis=-1, largest=1, sorted=1)
        weights = op("Div", [top_w, op("ReduceSum", [top_w, const([-1])], keepdims=1)[0]])[0]
        rows = op("Expand", [op("Unsqueeze", [x, const([1])])[0], const([1, k, 1])])[0]
        rows = op("Reshape", [rows, const([-1, 1, h])])[0]
        ids = op("Unsqueeze", [op("Reshape", [top_i, const([-1])])[0], const([1])])[0]
        file = f"layer-{layer}.bin"
        inits.append(w.weight(f"{p}.experts.gate_up_proj", (e, 2 * i, h), file, sparse))
        w_gu = op("Transpose", [f32(op("GatherND", [inits[-1].name, ids])[0])],
                  perm=[0, 2, 1])[0]  # fmt: skip
        gu = op("Squeeze", [op("MatMul", [rows, w_gu])[0], const([1])])[0]
        one = const([1])
        gate = op("Slice", [gu, const([0]), const([i]), one, one])[0]
        up = op("Slice", [gu, const([i]), const([2 * i]), one, one])[0]
        act = op("Mul", [op("Mul", [gate, op("Sigmoid", [gate])[0]])[0], up])[0]
        act = op("Unsqueeze", [act, one])[0]
        inits.append(w.weight(f"{p}.experts.down_proj", (e, h, i), file, sparse))
        w_d = op("Transpose", [f32(op("GatherND", [inits[-1].name, ids])[0])],
                 perm=[0, 2, 1])[0]  # fmt: skip
        y = op("Squeeze", [op("MatMul", [act, w_d])[0], one])[0]
        y = op("Mul", [y, op("Reshape", [weights, const([-1, 1])])[0]])[0]
        y = op("ReduceSum", [op("Reshape", [y, const([-1, k, h])])[0], one], keepdims=0)[0]
        x = op("Add", [x, y])[0]
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", h])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    (out / "model.onnx").write_bytes(model.SerializeToString())
    return out / "model.onnx"


def _tensor(model: ir.Model, suffix: str, layer: int = 0) -> ir.ExternalTensor:
    t = model.graph.initializers[f"model.layers.{layer}.mlp.{suffix}"].const_value
    assert isinstance(t, ir.ExternalTensor)
    return t


def _poke(t: ir.ExternalTensor, index: int, bits: int) -> None:
    """Overwrite element ``index`` of a 16-bit external tensor in its file."""
    with open(t.path, "r+b") as f:
        f.seek((t.offset or 0) + 2 * index)
        f.write(np.uint16(bits).tobytes())


def _one_line(exc: pytest.ExceptionInfo[ModelError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


#: Run in a fresh interpreter: RSS (MiB) after the imports, then the growth of the peak
#: (VmHWM, reset through /proc/self/clear_refs before each step) during each step.
PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np, onnx_ir as ir
    from modec import cache
    from modec.data import Dataset
    from modec.driver import check_weights_finite
    from modec.frontend import load_onnx

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def step(name, fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak starts again from the current RSS
        before = status("VmRSS")
        out = fn()
        figures[name] = {"peak_growth_mib": status("VmHWM") - before,
                         "rss_growth_mib": status("VmRSS") - before}
        return out

    figures = {"rss_after_imports_mib": status("VmRSS")}
    model = step("load", lambda: load_onnx(sys.argv[1]))
    inits = [v.const_value for v in model.graph.initializers.values()]
    ext = [t for t in inits if isinstance(t, ir.ExternalTensor)]
    figures["external_tensors"] = len(ext)
    figures["external_bytes"] = sum(t.nbytes for t in ext)
    figures["dtypes"] = sorted({t.dtype.name for t in ext})
    if sys.argv[2] == "all":
        step("check_weights_finite", lambda: check_weights_finite(model))
        ds = Dataset("probe", {"x": np.zeros((1, 2, 4), np.float32)}, np.zeros((1, 2), bool))
        key = step("content_key", lambda: cache.content_key("probe", model, ds, {}))
        figures["key"] = key
        figures["key_again"] = cache.content_key("probe", load_onnx(sys.argv[1]), ds, {})
    else:  # read one element far into the file through the mmap, then unmap it
        t = ext[-1]
        figures["last_element"] = float(t.numpy().reshape(-1)[-1])
        t.release()
        from modec.moe.discover import find_moe  # what modec inspect runs first

        regions = step("find_moe", lambda: find_moe(model))
        figures["experts"] = [r.num_experts for r in regions]
    figures["mapped_after"] = sum(t.raw is not None for t in ext)
    print(json.dumps(figures))
""")


def _run_probe(model: Path, mode: str = "all") -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(model), mode], capture_output=True, text=True,
        env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(figures, indent=1))
    return figures


@pytest.fixture(scope="module")
def big_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers of 24 experts at hidden 1024, intermediate 1024: 288 MiB of fp16."""
    return build_moe(tmp_path_factory.mktemp("big"), dtype="float16", experts=24, hidden=1024,
                     inter=1024, top_k=4, layers=2)  # fmt: skip


def test_large_fp16_model_loads_checks_and_hashes_without_reading_its_weights(big_fp16):
    figures = _run_probe(big_fp16)
    weight_mib = int(figures["external_bytes"]) / 2**20  # type: ignore[call-overload]
    assert weight_mib > 280
    assert figures["external_tensors"] == 6 and figures["dtypes"] == ["FLOAT16"]
    for step in ("load", "check_weights_finite", "content_key"):
        growth = figures[step]["peak_growth_mib"]  # type: ignore[index]
        assert growth < 50, f"{step}: peak RSS grew {growth:.0f} MiB for {weight_mib:.0f} MiB"
    assert figures["key"] == figures["key_again"]
    assert figures["mapped_after"] == 0  # read with plain reads: nothing left mapped


def test_a_model_past_2_gib_in_a_sparse_file_loads(tmp_path):
    """One layer whose experts take 2.25 GiB of bf16 (a sparse file: holes, a few real bytes);
    its proto could not be held by protobuf with the weights inside."""
    path = build_moe(tmp_path, dtype="bfloat16", experts=48, hidden=4096, inter=2048, top_k=2,
                     sparse=True)  # fmt: skip
    model = load_onnx(path)
    down = _tensor(model, "experts.down_proj")
    assert (down.offset or 0) + down.nbytes > 2**31
    _poke(down, down.size - 1, 0x4040)  # 3.0 in bf16, the last element of the last tensor
    figures = _run_probe(path, mode="one")
    assert int(figures["external_bytes"]) > 2**31  # type: ignore[call-overload]
    assert figures["load"]["peak_growth_mib"] < 50  # type: ignore[index]
    assert figures["last_element"] == 3.0
    assert figures["experts"] == [48]  # the MoE layer is found (its memory: in the figures)
    assert figures["mapped_after"] == 0
    proto = load_onnx_proto(path, external_data=False)  # graph only: what OrtRunner reads
    assert proto.ByteSize() < 2**20
    assert input_specs(model) == input_specs(proto)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp16_and_bf16_weights_load_as_external_tensors_and_pass_the_check(tmp_path, dtype):
    path = build_moe(tmp_path, dtype=dtype, layers=2)
    model = load_onnx(path)
    onnx_type = ir.DataType(DTYPES[dtype][0])
    weights = {n: v.const_value for n, v in model.graph.initializers.items()
               if not n.startswith("const_")}  # fmt: skip
    assert len(weights) == 6
    for t in weights.values():
        assert isinstance(t, ir.ExternalTensor) and t.dtype == onnx_type
        assert os.path.dirname(t.path) == str(tmp_path)
        assert t.raw is None  # not mapped by the load
    # The same values as onnx's own loader reads.
    full = {i.name: numpy_helper.to_array(i) for i in load_onnx_proto(path).graph.initializer}
    for name, t in weights.items():
        np.testing.assert_array_equal(t.numpy().view(np.uint16), full[name].view(np.uint16))
        t.release()
    check_weights_finite(model)


def test_nan_and_inf_planted_in_bf16_external_weights_are_found(tmp_path, monkeypatch):
    path = build_moe(tmp_path, dtype="bfloat16")
    down = _tensor(load_onnx(path), "experts.down_proj")
    _poke(down, 1234, BF16_NAN)
    with pytest.raises(ModelError) as e:
        check_weights_finite(load_onnx(path))
    assert "initializer 'model.layers.0.mlp.experts.down_proj' holds 1 NaN" in _one_line(e)
    _poke(down, 1234, 0)
    check_weights_finite(load_onnx(path))
    # +inf in the stacked expert weight (a GatherND table: a weight) is refused too.
    gate_up = _tensor(load_onnx(path), "experts.gate_up_proj")
    _poke(gate_up, gate_up.size - 1, BF16_INF)
    with pytest.raises(ModelError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' "
                       r"\(a [^)]*\) holds 1 ±inf"):  # fmt: skip
        check_weights_finite(load_onnx(path))
    _poke(gate_up, gate_up.size - 1, 0)
    # Counted over every chunk: NaNs in the first, a middle and the last of 1 KiB chunks.
    monkeypatch.setattr("modec.frontend.CHUNK_BYTES", 1024)
    assert down.nbytes >= 16 * 1024
    for index in (0, down.size // 2 + 1, down.size - 1):
        _poke(down, index, BF16_NAN | 0x8000)  # a negative NaN
    with pytest.raises(ModelError, match="down_proj' holds 3 NaN"):
        check_weights_finite(load_onnx(path))


def test_a_missing_data_file_is_named(tmp_path):
    path = build_moe(tmp_path)
    (tmp_path / "layer-0.bin").unlink()
    for load in (load_onnx, load_onnx_proto, OrtRunner):
        with pytest.raises(ModelError) as e:
            load(path)
        msg = _one_line(e)
        assert "the external data file 'layer-0.bin' is missing" in msg
        assert "'model.layers.0.mlp.experts.gate_up_proj'" in msg
        assert "copy it next to the model" in msg


def test_a_truncated_data_file_is_named_with_its_size(tmp_path):
    path = build_moe(tmp_path)
    down = _tensor(load_onnx(path), "experts.down_proj")
    need = (down.offset or 0) + down.nbytes
    os.truncate(tmp_path / "layer-0.bin", need - 1)
    with pytest.raises(ModelError) as e:
        load_onnx(path)
    assert _one_line(e).startswith(f"{path}: the external data file 'layer-0.bin' is truncated "
                                   f"({need - 1} bytes, tensor "
                                   f"'model.layers.0.mlp.experts.down_proj' needs {need}): "
                                   "copy it next to the model")  # fmt: skip


def test_data_outside_the_model_directory_is_refused(tmp_path):
    path = build_moe(tmp_path / "m")
    proto = onnx.load(str(path), load_external_data=False)
    router = proto.graph.initializer[0]
    (tmp_path / "router.bin").write_bytes((tmp_path / "m" / "router.bin").read_bytes())
    _set_external(router, "../router.bin", 0, router.dims[0] * router.dims[1] * 2)
    onnx.save(proto, str(path))
    with pytest.raises(ModelError) as e:
        load_onnx(path)
    assert "'../router.bin' of tensor 'model.layers.0.mlp.gate.weight' lies outside" in (
        _one_line(e)
    )
    # A link inside the directory to a file outside it: onnx-ir would refuse to map it.
    _set_external(router, "router-link.bin", 0)
    onnx.save(proto, str(path))
    (tmp_path / "m" / "router-link.bin").symlink_to(tmp_path / "router.bin")
    with pytest.raises(ModelError, match=r"'router-link\.bin' of tensor .* is a link to"):
        load_onnx(path)


def _key(model: ir.Model) -> str:
    h = hashlib.sha256()
    cache.hash_model(h, model)
    return h.hexdigest()


def test_cache_key_follows_every_weight_byte_and_not_the_storage(tmp_path):
    path = build_moe(tmp_path / "ext", dtype="bfloat16", layers=2)
    ds = Dataset("d", {"x": np.zeros((2, 3, 64), np.float32)}, np.zeros((2, 3), bool))
    key = cache.content_key("routing", load_onnx(path), ds, {"a": 1})
    assert key == cache.content_key("routing", load_onnx(path), ds, {"a": 1})
    down = _tensor(load_onnx(path), "experts.down_proj", layer=1)
    with open(down.path, "r+b") as f:  # one byte of the last weight
        f.seek((down.offset or 0) + down.nbytes - 1)
        old = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([old[0] ^ 1]))
    assert cache.content_key("routing", load_onnx(path), ds, {"a": 1}) != key
    with open(down.path, "r+b") as f:
        f.seek((down.offset or 0) + down.nbytes - 1)
        f.write(old)
    assert cache.content_key("routing", load_onnx(path), ds, {"a": 1}) == key
    # The same model with its weights inside the .onnx has the same key.
    inline = tmp_path / "inline.onnx"
    onnx.save(load_onnx_proto(path), str(inline))
    assert not list(tmp_path.glob("*.bin"))
    inline_model = load_onnx(inline)
    assert not any(isinstance(v.const_value, ir.ExternalTensor)
                   for v in inline_model.graph.initializers.values())  # fmt: skip
    assert cache.content_key("routing", inline_model, ds, {"a": 1}) == key
    # A change of structure changes it; the model is left as it was.
    model = load_onnx(path)
    before = _key(model)
    model.graph.node(0).name = "renamed"
    assert _key(model) != before
    assert all(
        isinstance(v.const_value, ir.ExternalTensor)
        for n, v in model.graph.initializers.items()
        if not n.startswith("const_")
    )


def test_a_content_digest_replaces_the_bytes(tmp_path):
    """A lazily computed tensor may name its content (`cache.CONTENT_DIGEST`): not read."""
    model = load_onnx(build_moe(tmp_path))
    stacks = [_tensor(model, "experts.gate_up_proj"), _tensor(model, "experts.down_proj")]
    before = _key(model)
    for t in stacks:
        t.meta[cache.CONTENT_DIGEST] = f"{t.name}-v1"
    (tmp_path / "layer-0.bin").unlink()  # reading either now would fail
    with_digest = _key(model)
    assert with_digest != before
    stacks[0].meta[cache.CONTENT_DIGEST] = "v2"
    assert _key(model) != with_digest
    del stacks[0].meta[cache.CONTENT_DIGEST]
    with pytest.raises(ModelError, match=r"layer-0\.bin' is missing \(tensor '.*gate_up_proj'"):
        _key(model)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_chunks_are_bounded_and_cover_the_tensor(tmp_path, dtype):
    t = _tensor(load_onnx(build_moe(tmp_path, dtype=dtype)), "experts.down_proj")
    chunks = [c.copy() for c in tensor_chunks(t, chunk_bytes=1000)]  # not a divisor
    assert all(c.nbytes <= 1000 for c in chunks) and len(chunks) == -(-t.nbytes // 1000)
    assert all(c.dtype == DTYPES[dtype][1] for c in chunks)
    want = t.numpy().reshape(-1).copy()  # a view would keep the mapping open
    np.testing.assert_array_equal(np.concatenate(chunks).view(np.uint16), want.view(np.uint16))
    assert b"".join(bytes(b) for b in tensor_bytes(t, chunk_bytes=999)) == t.tobytes()
    t.release()
    inline = ir.tensor(want.reshape(t.shape.numpy()))
    assert b"".join(bytes(b) for b in tensor_bytes(inline, chunk_bytes=999)) == t.tobytes()
    got = np.concatenate([c.copy() for c in tensor_chunks(inline, chunk_bytes=1000)])
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_onnxruntime_runs_an_external_data_model_from_its_path(tmp_path):
    path = build_moe(tmp_path / "m", dtype="float16", layers=2)
    runner = OrtRunner(path)
    assert all(i.data_location == TensorProto.EXTERNAL and not i.raw_data
               for i in runner.proto.graph.initializer if i.name.startswith("model."))  # fmt: skip
    assert runner.inputs == input_specs(load_onnx(path))
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    inline = load_onnx_proto(path).SerializeToString()  # weights read into the proto
    want = ort_session(inline).run(None, {"x": x})[0]
    np.testing.assert_array_equal(runner({"x": x}), want)
    assert np.abs(want - x).max() > 0  # the experts did something


def test_string_initializers_are_hashed_with_the_structure():
    def model(word: bytes) -> ir.Model:
        g = helper.make_graph(
            [helper.make_node("Identity", ["s"], ["y"])], "g", [],
            [helper.make_tensor_value_info("y", TensorProto.STRING, [1])],
            [helper.make_tensor("s", TensorProto.STRING, [1], [word])],
        )  # fmt: skip
        return ir.serde.deserialize_model(
            helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        )

    assert _key(model(b"a")) == _key(model(b"a")) != _key(model(b"b"))
