# ==== modec.moe fixtures (owner: graph-analysis core) ===================================
# Exported MoE test models, built on first use and cached for the session.
import pathlib as _moe_pathlib

import pytest as _moe_pytest


@_moe_pytest.fixture(scope="session")
def moe_model(tmp_path_factory: _moe_pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``moe_model(name, exporter) -> Path`` of a tiny exported MoE fixture (see tests/fixtures)."""
    from tests.fixtures.models import build_and_export

    root: _moe_pathlib.Path = tmp_path_factory.mktemp("moe_models")

    def get(name: str, exporter: str) -> _moe_pathlib.Path:
        return build_and_export(name, exporter, root)

    return get


# ==== end modec.moe fixtures =============================================================


# ==== tiny digits-vlm (owner: lead) =======================================================
# A small random-weight digits-vlm exported with stacked experts, plus tiny calibration and
# evaluation sets, built once per session. The real pipeline runs on it in seconds.


@_moe_pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: _moe_pytest.TempPathFactory) -> dict[str, _moe_pathlib.Path]:
    import torch

    from modec import data
    from tools.digits_vlm import scenes
    from tools.digits_vlm.export import export
    from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig

    root: _moe_pathlib.Path = tmp_path_factory.mktemp("tiny_vlm")
    torch.manual_seed(0)
    cfg = DigitsVLMConfig(hidden=32, num_layers=2, num_experts=4, intermediate=32,
                          vision_dim=16, vision_layers=1)  # fmt: skip
    model = DigitsVLM(cfg).eval()
    export(model, root / "model.onnx", form="stacked", exporter="dynamo")
    pools = scenes.digit_pools()
    for name, per_family, seed in (("calib", 3, 1), ("eval", 4, 2)):
        samples = scenes.make_split(pools[name], {f: per_family for f in scenes.FAMILIES}, seed)
        arrays = scenes.collate(samples, seq_len=scenes.SEQ_LEN)
        data.save(
            root / f"{name}.npz",
            {k: arrays[k] for k in ("input_ids", "attention_mask", "pixel_values")},
            modality=arrays["modality"], answer=arrays["answer"], family=arrays["family"],
            header={"image_token_id": scenes.IMAGE_ID, "families": scenes.FAMILIES},
        )  # fmt: skip
    return {"model": root / "model.onnx", "calib": root / "calib.npz", "eval": root / "eval.npz"}


# ==== end tiny digits-vlm =================================================================
