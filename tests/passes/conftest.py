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


def compile_int8_pair(
    tiny_vlm: dict[str, Any], root: Any, flag: str, **base: Any
) -> dict[int, Any]:
    """The tiny model compiled twice (uniform RTN 3.0, ``base`` options), with ``flag``
    (``expert_act_bits`` or ``dense_act_bits``) at 0 and at 8: {bits: output dir}."""
    from modec.driver import compile_model

    outs = {}
    for bits in (0, 8):
        outs[bits] = root / f"act{bits}"
        chosen: dict[str, Any] = {**base, flag: bits}
        o = CompileOptions(method="uniform", quantizer="rtn", budget=3.0, target="llvm",
                           cache_dir=None, **chosen)  # fmt: skip
        compile_model(tiny_vlm["model"], tiny_vlm["calib"], outs[bits], o)
    return outs


def int8_agreement(outs: dict[int, Any], eval_path: Any) -> tuple[Any, float]:
    """On the first 16 evaluation samples: per sample, max |compiled − simulated| / max
    |simulated| of the int8 output at real positions (left padding is masked out); and the
    mean |int8 − float-input| simulated logits relative to the float ones' mean."""
    import numpy as np

    from modec import data
    from modec.runners import CompiledRunner, SimulatedRunner

    _, feeds = next(iter(data.load(eval_path).batches(16)))
    a8, sim8 = CompiledRunner(outs[8])(feeds), SimulatedRunner(outs[8])(feeds)
    sim32 = SimulatedRunner(outs[0])(feeds)
    real = feeds["attention_mask"].astype(bool)[..., None]
    gap = np.where(real, np.abs(a8 - sim8), 0.0).max(axis=(1, 2))
    per_sample = gap / np.where(real, np.abs(sim8), 0.0).max(axis=(1, 2))
    return per_sample, float(np.abs(sim8 - sim32).mean() / np.abs(sim32).mean())
