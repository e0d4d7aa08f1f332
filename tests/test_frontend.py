"""Frontends: ONNX files (errors), nn.Modules and local Hugging Face directories."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from modec.errors import ModelError
from modec.frontend import (
    OrtRunner,
    from_hf_dir,
    from_torch,
    input_specs,
    load_onnx,
    load_onnx_proto,
)
from modec.moe.discover import find_moe

BUNDLED = "examples/digits-vlm/model.onnx"


def test_onnx_file_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_onnx(tmp_path / "nope.onnx")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(b"\x08\x09\x12\x04abc")
    with pytest.raises(ModelError, match=r"trunc\.onnx: not a readable ONNX model"):
        load_onnx(trunc)
    with pytest.raises(ModelError, match="is a directory"):
        load_onnx(tmp_path)


def test_an_inline_model_loads_as_before():
    """Weights inside the .onnx: the graph of onnx.load + infer_shapes, tensors in memory."""
    before = onnx.shape_inference.infer_shapes(onnx.load(BUNDLED), data_prop=True)
    model = load_onnx(BUNDLED)
    assert ir.to_proto(model).SerializeToString(deterministic=True) == ir.to_proto(
        ir.serde.deserialize_model(before)
    ).SerializeToString(deterministic=True)
    assert not any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )
    proto = load_onnx_proto(BUNDLED)
    assert proto == load_onnx_proto(BUNDLED, external_data=False) == before
    assert input_specs(model) == input_specs(proto)
    assert [s.dtype for s in input_specs(model)] == ["int64", "int64", "float32"]


def test_an_external_data_model_failing_the_checker_names_the_cause(tmp_path):
    """With external data the checker runs on the file; its errors read as for any model."""
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"]),
         onnx.helper.make_node("MatMul", ["y", "w"], ["y"])],  # y assigned twice
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [w],
    )  # fmt: skip
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.save(m, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.bin",
              size_threshold=0)  # fmt: skip
    assert (tmp_path / "m.bin").stat().st_size == 64
    with pytest.raises(ModelError, match=r"m\.onnx: fails the ONNX checker \(.*y.*\); re-export"):
        load_onnx(tmp_path / "m.onnx")


def test_hf_directory_is_exported_with_batched_mm(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, num_local_experts=8,
                           num_experts_per_tok=2)  # fmt: skip
    hf = tf.MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "mixtral", safe_serialization=True)
    model = from_hf_dir(tmp_path / "mixtral", tmp_path / "mixtral.onnx")
    regions = find_moe(model)
    assert [r.num_experts for r in regions] == [8, 8]
    assert all(r.form == "stacked_gather" for r in regions)
    ids = np.random.default_rng(0).integers(0, 40, (3, 5)).astype(np.int64)
    got = OrtRunner(tmp_path / "mixtral.onnx")(
        {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    )
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_hf_model_id_is_not_downloaded(tmp_path):
    with pytest.raises(ModelError, match="does not download"):
        from_hf_dir("mistralai/Mixtral-8x7B-v0.1", tmp_path / "x.onnx")


def test_nn_module(tmp_path):
    from tools.digits_vlm.export import sample_batch
    from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig

    torch.manual_seed(0)
    m = DigitsVLM(DigitsVLMConfig(hidden=32, num_layers=2, num_experts=4, intermediate=16,
                                  vision_dim=16, vision_layers=1)).eval()  # fmt: skip
    m.set_moe_form("stacked")
    feeds = sample_batch(2, seed=0)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask",
                                                      "pixel_values"))  # fmt: skip
    b = torch.export.Dim("batch", min=1, max=64)
    s = torch.export.Dim("seq", min=2, max=96)
    model = from_torch(m, args, tmp_path / "m.onnx", ["input_ids", "attention_mask",
                                                        "pixel_values"],
                       dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s},
                                       "pixel_values": {0: b}})  # fmt: skip
    assert [r.num_experts for r in find_moe(model)] == [4, 4]
