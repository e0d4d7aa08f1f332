"""Dense lowering: scheduled matmul kernels vs numpy, the tiny decoder vs onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from modec.errors import InternalError, ModelError  # noqa: E402
from modec.lowering.dense import (  # noqa: E402
    DenseModule,
    compile_module,
    import_onnx,
    lower_dense,
)
from modec.lowering.matmul_kernels import (  # noqa: E402
    matmul_nt_packed_primfunc,
    matmul_nt_primfunc,
    matmul_primfunc,
)
from modec.lowering.tiny_model import TinyConfig, build_tiny_decoder, tiny_inputs  # noqa: E402

CFG = TinyConfig()


@pytest.fixture(scope="module")
def tiny() -> onnx.ModelProto:
    return build_tiny_decoder(CFG)


@pytest.fixture(scope="module")
def lowered(tiny: onnx.ModelProto) -> tuple[DenseModule, object]:
    dm = lower_dense(tiny)
    return dm, compile_module(dm)


@pytest.mark.parametrize(
    ("batched", "m", "n", "k", "shape"),
    [
        (False, None, 64, 64, (33, 64, 64)),  # symbolic M, tail of 1 row
        (False, None, 20, 7, (1, 7, 20)),  # N not a multiple of 16, M = 1
        (False, 5, 96, 64, (5, 64, 96)),  # all static, M not a multiple of 4
        (False, 1, 1, 32, (1, 32, 1)),  # static 1 x 1 output (a gate of one row): no Y loop
        (True, None, None, 16, (6, 11, 16, 13)),  # QKᵀ: symbolic M and N
        (True, None, 16, None, (6, 11, 13, 16)),  # PV: symbolic M and K
    ],
)
def test_matmul_kernel_matches_numpy(
    batched: bool, m: int | None, n: int | None, k: int | None, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    func = matmul_primfunc(batched, m, n, k).with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    if batched:
        b, mm, kk, nn = shape
        a = rng.standard_normal((b, mm, kk), dtype=np.float32)
        w = rng.standard_normal((b, kk, nn), dtype=np.float32)
    else:
        mm, kk, nn = shape
        a = rng.standard_normal((mm, kk), dtype=np.float32)
        w = rng.standard_normal((kk, nn), dtype=np.float32)
    ref = a @ w
    y = tvm.runtime.tensor(np.full(ref.shape, np.nan, dtype=np.float32))
    ex(tvm.runtime.tensor(a), tvm.runtime.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("m", "n", "k", "shape"),
    [
        (None, None, 32, (6, 11, 13)),  # symbolic M and N, 8 vectors of K
        (8, None, 128, (4, 8, 257)),  # a decode step of grouped-query attention
        (1, None, 64, (3, 1, 5)),  # one query row, fewer keys than a tile
        (None, 7, 16, (2, 5, 7)),  # static N not a multiple of the tile
        (None, None, 4, (4, 3, 9)),  # one vector of K: products, no reduction loop
        (None, None, 24, (2, 3, 6)),  # 24 = 6 vectors of 4
        (2, None, 6, (2, 2, 5)),  # K not a multiple of 4: vectors of 2 lanes
        (None, None, 128, (2, 37, 70)),  # a prompt: row and key tiles with partial ends
        (None, 40, 16, (2, 9, 40)),  # static N of 2.5 vectors: a partial last key block
    ],
)
@pytest.mark.parametrize("packed", [False, True])
def test_keys_as_stored_kernel_matches_numpy(
    m: int | None, n: int | None, k: int, shape: tuple[int, int, int], packed: bool
) -> None:
    """``A · Bᵀ`` on B as stored (attention's scores without a transposed key copy): the
    decode kernel (vectors along K) and the prompt's (key blocks copied transposed), which
    gives the decode kernel's bytes."""
    rng = np.random.default_rng(0)
    b, mm, nn = shape
    a = rng.standard_normal((b, mm, k), dtype=np.float32)
    w = rng.standard_normal((b, nn, k), dtype=np.float32)
    ref = a @ w.transpose(0, 2, 1)
    outs = []
    for make in (matmul_nt_primfunc, matmul_nt_packed_primfunc)[: 1 + packed]:
        func = make(m, n, k).with_attr("global_symbol", "main")
        ex = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
        y = tvm.runtime.tensor(np.full(ref.shape, np.nan, dtype=np.float32))
        ex(tvm.runtime.tensor(a), tvm.runtime.tensor(w), y)
        outs.append(y.numpy())
    np.testing.assert_allclose(outs[-1], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs[-1], outs[0])


@pytest.mark.parametrize("n", [1, 5, 13])
def test_kernels_read_a_prefix_of_the_cache(n: int) -> None:
    """Attention's two kernels on a cache updated in place (``prefix``): B holds C = 16
    positions, of which the first n are read; the rest is NaN and must not reach Y."""
    rng = np.random.default_rng(n)
    b, m, k, cap = 6, 3, 8, 16
    cache = np.full((b, cap, k), np.nan, dtype=np.float32)
    cache[:, :n] = rng.standard_normal((b, n, k), dtype=np.float32)
    q = rng.standard_normal((b, m, k), dtype=np.float32)
    p = rng.standard_normal((b, m, n), dtype=np.float32)
    cases = [
        (matmul_nt_primfunc(None, None, k, prefix=True), q, q @ cache[:, :n].transpose(0, 2, 1)),
        (matmul_primfunc(True, None, k, None, prefix=True), p, p @ cache[:, :n]),
    ]
    for func, a, ref in cases:
        ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), "llvm")
        y = tvm.runtime.tensor(np.full(ref.shape, np.nan, dtype=np.float32))
        ex(tvm.runtime.tensor(a), tvm.runtime.tensor(cache), y)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batched"):
        matmul_primfunc(False, None, k, None, prefix=True)


def test_keys_as_stored_kernel_refuses_an_odd_k() -> None:
    for make in (matmul_nt_primfunc, matmul_nt_packed_primfunc):
        with pytest.raises(ValueError, match="even K"):
            make(None, None, 3)


def test_all_matmuls_scheduled(lowered: tuple[DenseModule, object]) -> None:
    dm, _ = lowered
    # 2 layers x (q, k, v, o, up, down) + LM head; QKᵀ and PV per layer.
    assert dm.stats["matmul_dense"] == 2 * 6 + 1
    assert dm.stats["matmul_batched"] == 2 * 2
    assert dm.stats.get("matmul_default", 0) == 0
    assert "R.matmul" not in dm.mod["main"].script()
    assert [s.name for s in dm.inputs] == ["input_ids", "attention_mask"]
    assert dm.inputs[0].shape == ("B", "T")
    assert dm.outputs[0].shape == ("B", "T", CFG.vocab)


def _kernel_calls(ex: object) -> list[str]:
    """The callees of ``main``'s VM code that are kernels (not VM builtins)."""
    text = relax.VMExecutable(ex).as_text()
    body = text.split("@main:", 1)[1].split("\n@", 1)[0]
    calls = [line.split()[1] for line in body.splitlines() if line.strip().startswith("call ")]
    return [c for c in calls if not c.startswith(("vm.builtin.", "runtime."))]


def test_cpu_pipeline_fuses_element_wise_chains(lowered: tuple[DenseModule, object]) -> None:
    # TVM's CPU pipeline (FuseOps/FuseTIR): element-wise and norm chains become fused_*
    # kernels, so fewer calls than without fusion; modec's own kernels stay as they are.
    dm, ex = lowered
    kernels = _kernel_calls(ex)
    fused = [k for k in kernels if k.startswith("fused_")]
    assert fused, kernels
    assert sum(k.startswith("modec_dense_") for k in kernels) == 2 * 6 + 1
    assert not any(k.startswith("fused_") and "modec_" in k for k in kernels)
    plain = relax.get_pipeline("default")  # TVM's pipeline without fusion, for the count
    with tvm.target.Target("llvm"):
        unfused = tvm.compile(dm.mod, target="llvm", relax_pipeline=plain)
    assert len(kernels) < len(_kernel_calls(unfused))


def test_prim_value_callees_stay_out_of_fusion() -> None:
    # A call_tir passing a Relax scalar: FuseTIR (TVM 0.27) fails on such a group, so its
    # callee is marked opaque; a callee of tensors only is left to FuseOps.
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    from modec.lowering.dense import opaque_prim_value_callees

    @I.ir_module
    class Mod:
        @T.prim_func(private=True)
        def fill(p: T.int64, out: T.Buffer((T.int64(4),), "int64")) -> None:
            for i in range(T.int64(4)):
                out[i] = p + i

        @T.prim_func(private=True)
        def twice(x: T.Buffer((T.int64(4),), "int64"), out: T.Buffer((T.int64(4),), "int64")):
            for i in range(T.int64(4)):
                out[i] = x[i] * T.int64(2)

        @R.function
        def main(p: R.Prim("int64")) -> R.Tensor((4,), "int64"):
            cls = Mod
            a = R.call_tir(cls.fill, (p,), out_ty=R.Tensor((4,), "int64"))
            b = R.call_tir(cls.twice, (a,), out_ty=R.Tensor((4,), "int64"))
            return b

    annotated = relax.transform.AnnotateTIROpPattern()(Mod)
    out = opaque_prim_value_callees(annotated)
    assert int(out["fill"].attrs["op_pattern"]) == 8
    assert int(out["twice"].attrs["op_pattern"]) != 8
    assert int(annotated["fill"].attrs["op_pattern"]) != 8  # the input module unchanged


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (2, 5), (3, 17), (1, 64)])
def test_vm_matches_onnxruntime(
    tiny: onnx.ModelProto, lowered: tuple[DenseModule, object], batch: int, seq: int
) -> None:
    dm, ex = lowered
    vm = relax.VirtualMachine(ex, tvm.cpu())
    inp = tiny_inputs(CFG, batch, seq, seed=batch * 100 + seq)
    ref = ort.InferenceSession(tiny.SerializeToString()).run(None, inp)[0]
    params = [tvm.runtime.tensor(p) for p in dm.params.values()]
    out = vm["main"](*(tvm.runtime.tensor(inp[s.name]) for s in dm.inputs), *params).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def _one_op_model(op: str, domain: str = "") -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name="the_node", domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def test_unsupported_op_names_op_and_node() -> None:
    with pytest.raises(ModelError, match=r"ai\.x::Frobnicate \(node 'the_node'\)"):
        import_onnx(_one_op_model("Frobnicate", "ai.x"))


def test_missing_file_is_model_error(tmp_path: object) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        import_onnx(f"{tmp_path}/nope.onnx")


def test_op_converter_and_hook() -> None:
    """A custom op imports through op_converters; a hook sees and may change the module."""
    seen: list[str] = []

    def hook(dm: DenseModule) -> DenseModule:
        seen.append(dm.mod["main"].script())
        return dm

    model = _one_op_model("MyRelu", "ai.modec")
    dm = lower_dense(
        model, hooks=[hook], op_converters={"MyRelu": lambda bb, i, a: relax.op.nn.relu(i[0])}
    )
    assert "R.nn.relu" in seen[0]
    vm = relax.VirtualMachine(compile_module(dm), tvm.cpu())
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), np.maximum(x, 0))


def test_hook_that_breaks_param_order_is_refused(tiny: onnx.ModelProto) -> None:
    def bad(dm: DenseModule) -> DenseModule:
        dm.params = dict(reversed(list(dm.params.items())))
        return dm

    with pytest.raises(InternalError, match="after hook bad"):
        lower_dense(tiny, hooks=[bad])


def test_cuda_build_only(tiny: onnx.ModelProto) -> None:
    """The CUDA path compiles (dlight GPU schedules; kernels not scheduled by modec)."""
    target = {"kind": "cuda", "arch": "sm_90"}
    dm = lower_dense(tiny, target=target)
    assert "matmul_dense" not in dm.stats  # CPU kernels are not used for CUDA
    ex = compile_module(dm, target)
    host = ex.mod.imports[0]
    assert host.kind == "llvm"
    assert "__global__" in host.imports[0].inspect_source()


def test_cuda_kernels_of_a_dim_named_like_a_cxx_keyword() -> None:
    """Hugging Face exports name the new tokens' dimension ``new``: a symbolic size becomes a
    CUDA kernel parameter of its name, so the importer renames such dims (the manifest keeps
    the ONNX name), and nvcc compiles the kernels."""
    from modec.kernels.cuda import nvcc_available
    from modec.kernels.cuda_aot import compile_fatbin

    dims = ["batch size", "new", 8]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8], np.arange(8, dtype=np.float32))
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        "g", [x], [y], [w],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    target = {"kind": "cuda", "arch": "sm_90"}
    dm = lower_dense(model, target=target)
    assert [i.shape for i in dm.inputs] == [("batch size", "new", 8)]
    src = compile_module(dm, target).mod.imports[0].imports[0].inspect_source()
    assert "int64_t new_" in src and "int64_t new)" not in src and "int64_t new," not in src
    if nvcc_available():
        assert compile_fatbin(src, ["sm_90"])


def test_transposed_weights_are_stored_transposed() -> None:
    """transformers' form: ``MatMul(x, Transpose(W))`` with W ``[out, in]``. W is stored
    transposed (``W.T``) and the graph has no transpose left; a weight also read as it is
    (a tied embedding and head) keeps its tensor and gets a transposed copy. Same outputs
    as onnxruntime."""
    rng = np.random.default_rng(0)
    vocab, hid, out = 11, 8, 16
    emb = rng.standard_normal((vocab, hid), dtype=np.float32)
    w = rng.standard_normal((out, hid), dtype=np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h"]),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "wt"], ["proj"]),
        helper.make_node("Transpose", ["emb"], ["embt"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "embt"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["B", "T", out]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", vocab])],
        [onnx.numpy_helper.from_array(emb, "emb"), onnx.numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    dm = lower_dense(model)
    assert list(dm.params) == ["emb", "w.T", "emb.T"]
    np.testing.assert_array_equal(np.asarray(dm.params["w.T"]), w.T)
    np.testing.assert_array_equal(np.asarray(dm.params["emb.T"]), emb.T)
    assert dm.stats["weights_transposed"] == 2 and dm.stats["weights_transposed_copies"] == 1
    assert "permute_dims" not in dm.mod["main"].script()
    vm = relax.VirtualMachine(compile_module(dm), tvm.cpu())
    ids = np.array([[1, 4, 10], [0, 2, 3]], dtype=np.int64)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})
    params = [tvm.runtime.tensor(np.ascontiguousarray(p)) for p in dm.params.values()]
    got = vm["main"](tvm.runtime.tensor(ids), *params)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_reads_the_kv_heads(tmp_path: object) -> None:
    """A transformers export with grouped-query attention (4 query heads over 2 kv heads)
    and a KV cache: both attention matmuls of each layer run on the kv heads themselves (no
    repeat_kv copy), and the artifact equals onnxruntime on a prompt and a decode step."""
    from pathlib import Path

    import torch
    from modec.runtime import load

    from modec import hf
    from modec.lowering.build import build_artifact
    from tests.fixtures.models import build_hf

    d = Path(str(tmp_path)) / "qwen3moe"
    build_hf("qwen3moe").m.to(torch.float32).save_pretrained(d)
    onnx_path = hf.export_onnx(d, d / "model.onnx")
    manifest = build_artifact(str(onnx_path), d / "out")
    stats = manifest.sections["lowering"]["stats"]
    assert stats["attention_kv_heads"] == 4  # two layers, keys and values
    assert stats["matmul_keys_as_stored"] == 2  # the scores: no transposed key copy
    sess, ref = load(d / "out"), ort.InferenceSession(str(onnx_path))
    past = [i for i in ref.get_inputs() if i.name.startswith("past_key_values.")]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 40, (2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    empty = {p.name: np.zeros((2, p.shape[1], 0, p.shape[3]), np.float32) for p in past}
    feeds = {"input_ids": ids, "attention_mask": mask, **empty}
    for _ in range(2):
        got, want = sess.run(feeds), ref.run(None, feeds)
        for o, w in zip(ref.get_outputs(), want, strict=True):
            np.testing.assert_allclose(got[o.name], w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        feeds = {"input_ids": rng.integers(1, 40, (2, 1)).astype(np.int64), "attention_mask": mask,
                 **{p.name: w for p, w in zip(past, want[1:], strict=True)}}  # fmt: skip
