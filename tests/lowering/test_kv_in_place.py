"""`modec.lowering.kv_in_place`: the decode entry appends to preallocated cache buffers and
attention reads their first positions, on a transformers export with grouped-query attention
(4 query heads over 2 kv heads, 2 layers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from tvm import relax

from modec.lowering.dense import compile_module, schedule_dense_ops
from modec.lowering.kv_in_place import CAPACITY, cache_in_place
from modec.lowering.onnx_import import DenseModule, import_onnx


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from modec import hf
    from tests.fixtures.models import build_hf

    d = tmp_path_factory.mktemp("qwen3moe")
    build_hf("qwen3moe").m.to(torch.float32).save_pretrained(d)
    return hf.export_onnx(d, d / "model.onnx")


def _params(dm: DenseModule) -> list[tvm_ffi.Tensor]:
    return [tvm.runtime.tensor(np.asarray(v.read() if hasattr(v, "read") else v))
            for v in dm.params.values()]  # fmt: skip


def test_decode_in_place_equals_the_concatenating_main(exported: Path) -> None:
    """Four decode steps on buffers written in place give main's logits (which concatenates
    the cache) bit for bit; the buffers returned are the ones passed, holding main's cache."""
    dm, made = cache_in_place(import_onnx(onnx.load(str(exported))), None)
    assert made is not None and made.made
    past = [s for s in made.inputs if s.name.startswith("past_key_values.")]
    assert len(past) == 4 and all(s.shape[2] == CAPACITY for s in past)
    dm = schedule_dense_ops(dm)
    # Both matmuls of both layers read the buffers; no slice of the cache is left to copy.
    assert dm.stats["matmul_cache_in_place"] == 4
    values = {b.var: b.value for block in dm.mod["decode"].body.blocks for b in block.bindings}
    ops = {v: getattr(getattr(x, "op", None), "name", "") for v, x in values.items()}
    appends = [v for v, op in ops.items() if op == "relax.call_tir_inplace"]
    slices = [x for v, x in values.items() if ops[v] == "relax.strided_slice"]
    assert len(appends) == 4 and not [x for x in slices if x.args[0] in appends]
    vm = relax.VirtualMachine(compile_module(dm), tvm.cpu())
    params = _params(dm)
    rng = np.random.default_rng(0)
    batch, prompt, steps = 2, 5, 4
    ids = rng.integers(1, 40, (batch, prompt)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # left padding
    empty = [tvm.runtime.tensor(np.zeros((batch, 2, 0, 8), np.float32)) for _ in range(4)]
    out = vm["main"](tvm.runtime.tensor(ids), tvm.runtime.tensor(mask), *empty, *params)
    cache = [out[i].numpy() for i in range(1, 5)]
    bufs = []
    for c in cache:
        b = np.full((batch, 2, prompt + steps, 8), np.nan, np.float32)
        b[:, :, :prompt] = c
        bufs.append(tvm.runtime.tensor(b))
    for p in range(prompt, prompt + steps):
        tok = tvm.runtime.tensor(rng.integers(1, 40, (batch, 1)).astype(np.int64))
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        m = tvm.runtime.tensor(mask)
        want = vm["main"](tok, m, *[tvm.runtime.tensor(c) for c in cache], *params)
        got = vm["decode"](tok, m, *bufs, tvm_ffi.Shape([p]), *params)
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
        cache = [want[i].numpy() for i in range(1, 5)]
        for i, b in enumerate(bufs):
            assert got[i + 1].same_as(b)
            np.testing.assert_array_equal(b.numpy()[:, :, : p + 1], cache[i])


def test_a_past_read_elsewhere_keeps_the_concat(exported: Path) -> None:
    """A model that reads a past input other than through the concat (here: returns it as
    an extra output) keeps the concatenating form, with the reason."""
    model = onnx.load(str(exported))
    model.graph.node.append(onnx.helper.make_node("Identity", ["past_key_values.0.key"], ["echo"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("echo", onnx.TensorProto.FLOAT,
                                                                 None))  # fmt: skip
    dm = import_onnx(model)
    same, made = cache_in_place(dm, None)
    assert made is not None and not made.made and "read other than" in made.reason
    assert same is dm and "decode" not in [gv.name_hint for gv in same.mod.get_global_vars()]
