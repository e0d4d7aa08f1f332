"""Train digits-vlm on the CPU, deterministically from a seed.

    python -m tools.digits_vlm.train --out build/digits-vlm [--steps N] [--seed S]

Writes ``model.pt`` (state dict + config) and ``train_log.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tools.digits_vlm import scenes
from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig, load_balance_loss

#: A task module: ``scenes`` here, ``tools.facts_vlm.scenes`` for facts-vlm (the same
#: functions: digit_pools, make_dialogue, make_split, collate, FAMILIES).
Task = Any


def batch_tensors(samples: list[Any], task: Task = scenes) -> dict[str, torch.Tensor]:
    arrays = task.collate(samples)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


@torch.no_grad()
def accuracy(model: DigitsVLM, samples: list[Any], batch: int = 128,
             task: Task = scenes) -> dict[str, float]:  # fmt: skip
    """Accuracy per family on ``samples``: right when every supervised (answer) position's
    argmax is its target."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        b = batch_tensors(chunk, task)
        logits = model(b["input_ids"], b["attention_mask"], b["pixel_values"])
        tgt = b["targets"]
        wrong = (logits.argmax(-1) != tgt) & (tgt >= 0)
        ok = (~wrong.any(dim=1)).tolist()
        for s, good in zip(chunk, ok, strict=True):
            hits.setdefault(s.family, []).append(bool(good))
    model.train()
    return {f: sum(v) / len(v) for f, v in sorted(hits.items())}


def train(
    out: Path,
    steps: int,
    seed: int,
    batch: int,
    lr: float,
    cfg: DigitsVLMConfig,
    threads: int = 2,
    task: Task = scenes,
    mix: Sequence[bool] = (True, True, True, False),
    turns: tuple[int, int] = (3, 4),
    name: str = "digits-vlm",
    val_per_family: int = 40,
) -> dict[str, object]:
    """Train from ``seed``. Batch ``step`` is multimodal when ``mix[step % len(mix)]``, else
    text-only (digits-vlm: three multimodal batches, then a text one); a multimodal / text
    dialogue holds ``turns`` questions."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    pools = task.digit_pools(seed=0)
    model = DigitsVLM(cfg)
    # Stage-1 supervision of the vision tower, as real VLMs start from a pretrained encoder:
    # a training-only head predicts the digit under each patch (10 = background) from the
    # encoder's final features. It is not part of the model and is not exported.
    patch_head = torch.nn.Linear(cfg.vision_dim, 11)
    feats: list[torch.Tensor] = []
    model.visual.norm.register_forward_hook(lambda mod, inp, out: feats.append(out))
    params = list(model.parameters()) + list(patch_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return (
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = np.random.default_rng(seed + 1)
    # Validation on calibration-pool digits (never on eval digits).
    val = task.make_split(pools["calib"], {f: val_per_family for f in task.FAMILIES}, seed=seed + 3)
    log: list[dict[str, object]] = []
    start = time.time()
    bar = tqdm(range(steps), desc=f"train {name}", unit="step")
    for step in bar:
        mm = mix[step % len(mix)]
        n_turns = turns[0] if mm else turns[1]
        b = batch_tensors(
            [task.make_dialogue(mm, pools["train"], rng, n_turns) for _ in range(batch)], task
        )
        feats.clear()
        logits = model(b["input_ids"], b["attention_mask"], b["pixel_values"])
        ce = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=-100)
        patch_logits = patch_head(feats[-1]).reshape(-1, 11)
        labels = b["patch_labels"].reshape(-1)
        patch_ce = (
            F.cross_entropy(patch_logits, labels, ignore_index=-100)
            if bool((labels >= 0).any())
            else patch_logits.sum() * 0.0
        )
        probs = [m.last_router_probs for m in model.moe_layers()]
        aux = load_balance_loss([p for p in probs if p is not None], cfg.top_k)
        loss = ce + 0.01 * aux + 0.5 * patch_ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(ce=f"{ce.item():.3f}", patch=f"{patch_ce.item():.3f}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            acc = accuracy(model, val, task=task)
            mean = sum(acc.values()) / len(acc)
            log.append(
                {
                    "step": step + 1,
                    "ce": ce.item(),
                    "val_acc": mean,
                    "families": acc,
                    "seconds": time.time() - start,
                }
            )
            fams = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
            tqdm.write(f"step {step + 1}: ce {ce.item():.4f} val acc {mean:.4f} ({fams})")
    seconds = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "state_dict": model.state_dict()}, out / "model.pt")
    summary = {
        "steps": steps,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/digits-vlm"))
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()
    np.random.seed(args.seed)
    summary = train(
        args.out, args.steps, args.seed, args.batch, args.lr, DigitsVLMConfig(), args.threads
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
