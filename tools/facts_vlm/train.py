"""Train facts-vlm on the CPU, deterministically from a seed.

    python -m tools.facts_vlm.train --out build/facts-vlm [--steps N] [--seed S] [--threads T]

Writes ``model.pt`` (state dict + config) and ``train_log.json`` into ``--out``. The loop is
digits-vlm's (`tools.digits_vlm.train.train`) on facts-vlm's data: one batch in four is
multimodal, three are text-only (1,024 memorized entities need many presentations, and a
text batch costs about a fifth of a multimodal one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.digits_vlm.model import DigitsVLMConfig
from tools.digits_vlm.train import train
from tools.facts_vlm import scenes

STEPS = 5200
BATCH = 32
LR = 2e-3
#: Batch kinds in turn (True: multimodal): one multimodal batch in four.
MIX = (True, False, False, False)
TURNS = (3, 5)


def config() -> DigitsVLMConfig:
    """digits-vlm's layer shapes on 128×128 images (256 patches) and facts-vlm's vocabulary."""
    return DigitsVLMConfig(
        vocab_size=len(scenes.VOCAB),
        image_token_id=scenes.IMAGE_ID,
        image_size=scenes.CANVAS,
        patch=scenes.PATCH,
        max_positions=320,
    )


def run(out: Path, steps: int = STEPS, seed: int = 0, threads: int = 2) -> dict[str, object]:
    return train(out, steps, seed, BATCH, LR, config(), threads, task=scenes,
                 mix=MIX, turns=TURNS, name="facts-vlm")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/facts-vlm"))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()
    summary = run(args.out, args.steps, args.seed, args.threads)
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
