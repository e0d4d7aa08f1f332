"""The training loop (tools/digits_vlm/train.py) runs on both examples' data and its
validation scores every answer token (facts-vlm's answers have several)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.digits_vlm import scenes as digits_scenes
from tools.digits_vlm.model import DigitsVLM
from tools.digits_vlm.train import accuracy, train
from tools.facts_vlm import scenes as facts_scenes
from tools.facts_vlm.train import config as facts_config


@pytest.mark.parametrize("example", ["digits", "facts"])
def test_a_few_steps_train_and_log(example: str, tmp_path: Path) -> None:
    from tools.digits_vlm.model import DigitsVLMConfig

    task = digits_scenes if example == "digits" else facts_scenes
    cfg = DigitsVLMConfig() if example == "digits" else facts_config()
    log = train(tmp_path, 2, 0, 4, 1e-3, cfg, threads=1, task=task, mix=(True, False),
                val_per_family=2, name=example)  # fmt: skip
    assert log["steps"] == 2 and (tmp_path / "model.pt").exists()
    saved = json.loads((tmp_path / "train_log.json").read_text())
    assert set(saved["log"][-1]["families"]) == set(task.FAMILIES)


def test_validation_needs_every_answer_token_right() -> None:
    torch.manual_seed(0)
    model = DigitsVLM(facts_config()).eval()
    pools = facts_scenes.digit_pools()
    samples = facts_scenes.make_split(pools["eval"], {"code": 6, "color": 6}, seed=1)
    batch = facts_scenes.collate(samples)
    with torch.no_grad():
        logits = model(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask",
                                                              "pixel_values")))  # fmt: skip
    pred = logits.argmax(-1).numpy()
    tgt = batch["targets"]
    want: dict[str, list[bool]] = {}
    for i, s in enumerate(samples):
        pos = np.flatnonzero(tgt[i] >= 0)
        assert len(pos) == len(s.answer)  # every answer token is a target
        want.setdefault(s.family, []).append(bool((pred[i, pos] == tgt[i, pos]).all()))
    got = accuracy(model, samples, task=facts_scenes)
    assert got == {f: sum(v) / len(v) for f, v in sorted(want.items())}
