"""A model exported with a KV cache compiles as its plain export does (docs/generation.md):
the analysis runs it with empty caches, so the allocation and the quantized experts are
the same bytes."""

from __future__ import annotations

from pathlib import Path

from modec.driver import CompileOptions, compile_model

BUNDLED = Path(__file__).resolve().parents[2] / "examples" / "digits-vlm"


def test_cached_and_plain_exports_allocate_alike(cached_vlm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    o = CompileOptions(budget=2.5, sensitivity_samples=4, target="none", cache_dir=None)
    compile_model(BUNDLED / "model.onnx", cached_vlm["calib"], tmp_path / "plain", o)
    compile_model(cached_vlm["onnx"], cached_vlm["calib"], tmp_path / "cached", o)
    for name in ("allocation.json", "experts.safetensors"):
        plain = (tmp_path / "plain" / name).read_bytes()
        assert plain == (tmp_path / "cached" / name).read_bytes(), name
