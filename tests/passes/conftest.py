"""The analysis prefix of the MODE pipeline on the tiny digits-vlm, run once per module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from modec.driver import load_inputs
from modec.pipeline import Pipeline
from modec.pipelines import CompileOptions

PREFIX = "find-moe,canonicalize-moe,find-attention"


@pytest.fixture(scope="module")
def analysed(tiny_vlm: dict[str, Any]) -> Callable[..., tuple[Any, Any]]:
    """``analysed(passes, **run_options) -> (model, ctx)``: the tiny model after PREFIX + passes.

    ``run_options`` replace fields of the context's `modec.pipeline.RunOptions` (seed,
    threads, cache_dir).
    """

    def run(passes: str, **options: Any) -> tuple[Any, Any]:
        model, ctx = load_inputs(tiny_vlm["model"], tiny_vlm["calib"], CompileOptions())
        ctx.options = replace(ctx.options, **options)
        text = f"{PREFIX},{passes}" if passes else PREFIX
        model, _ = Pipeline.parse(text).run(model, ctx)
        return model, ctx

    return run
