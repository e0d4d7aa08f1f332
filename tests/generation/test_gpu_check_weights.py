"""tools/gpu_check's stand-in weights: the GPU machine gets an artifact without its weights
file and fills every tensor from the safetensors header with random values. Checked here on
a CPU artifact: the filled file passes the runtime's size and SHA-256 checks and generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.generation.test_generate_python import prompts


def test_filled_weights_load_and_generate(cached_vlm: dict[str, Path], tmp_path: Path) -> None:
    from modec.runtime import load

    from tools.gpu_check import _fill_weights

    out = cached_vlm["out"]
    art = tmp_path / "art"
    art.mkdir()
    for name in ("manifest.json", "model.so"):
        shutil.copy2(out / name, art / name)
    with open(out / "weights.safetensors", "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        (art / "weights.header").write_bytes(n.to_bytes(8, "little") + fh.read(n))
    _fill_weights(art)
    original, filled = (out / "weights.safetensors").read_bytes(), (art / "weights.safetensors")
    assert filled.stat().st_size == len(original)
    assert filled.read_bytes()[: 8 + n] == original[: 8 + n]  # the same header, new data
    assert filled.read_bytes() != original
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["files"]["weights.safetensors"]["bytes"] == len(original)

    feeds = prompts(cached_vlm["eval"], [0, 1300])  # a text-only and a multimodal sample
    tokens = load(art).generate(feeds, max_new_tokens=3).tokens
    assert len(tokens) == 2 and all(len(t) == 3 for t in tokens)
