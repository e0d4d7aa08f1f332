"""The analysis prefix of the MODE pipeline on the tiny digits-vlm, run once per module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from modec.driver import CompileOptions, build_pipeline, load_inputs

PREFIX = "find-moe,canonicalize-moe,find-attention"


@pytest.fixture(scope="module")
def analysed(tiny_vlm: dict[str, Any]) -> Callable[[str], tuple[Any, Any]]:
    """``analysed(passes) -> (model, ctx)``: the tiny model after PREFIX plus ``passes``."""

    def run(passes: str, **options: Any) -> tuple[Any, Any]:
        model, ctx = load_inputs(tiny_vlm["model"], tiny_vlm["calib"], CompileOptions())
        ctx.options.update(options)
        text = f"{PREFIX},{passes}" if passes else PREFIX
        model, _ = build_pipeline(text).run(model, ctx)
        return model, ctx

    return run
