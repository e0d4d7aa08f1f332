"""lower-tvm as a pass: it needs the artifact directory, writes the Artifact fact and stats."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from modec.errors import UsageError
from modec.facts import Artifact
from modec.pipeline import Pipeline

ANALYSIS = "collect-routing,select-key-vision"
DECIDE = "allocate-bits{method=uniform},quantize-experts{method=rtn}"


def test_needs_an_artifact_dir(analysed):
    model, ctx = analysed(f"{ANALYSIS},{DECIDE}")
    with pytest.raises(UsageError, match=r"lower-tvm needs RunOptions\.artifact_dir"):
        Pipeline.parse("lower-tvm").run(model, ctx)


def test_writes_the_artifact_and_records_the_pipeline(analysed, tmp_path):
    model, ctx = analysed(f"{ANALYSIS},{DECIDE}")
    ctx.options = replace(ctx.options, artifact_dir=str(tmp_path), pipeline="the-pipeline")
    Pipeline.parse("lower-tvm").run(model, ctx)
    manifest = ctx.facts.get(Artifact).manifest
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["sections"]["pipeline"] == {"lower-tvm": "lower-tvm", "text": "the-pipeline"}
    assert [layer["widths"] for layer in on_disk["sections"]["moe"]["layers"]] == [[3] * 4] * 2
    assert len(manifest.params) == ctx.stats["lower-tvm"]["params"]
    assert ctx.stats["lower-tvm"]["moe_layers"] == 2
    assert ctx.report["lower-tvm"]["packed_expert_bytes"] > 0
    assert {p.name for p in tmp_path.iterdir()} >= {"model.so", "weights.safetensors",
                                                      "manifest.json"}  # fmt: skip
