"""Write the digit-scenes calibration and evaluation sets in modec's dataset format.

    python -m tools.digits_vlm.build_data --out examples/digits-vlm [--seed 0]

- ``calib.npz``: 128 samples from the calibration digit pool, mixed like real calibration
  data: 112 multimodal (the five image families) and 16 text-only.
- ``eval.npz``: 250 samples of each of the nine families (2,250), images drawn from the
  evaluation digit pool (disjoint from train and calibration).

Pixels are multiples of 1/255 and are stored as uint8 (the header records the encoding).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modec import data
from tools.digits_vlm import scenes

CALIB_COUNTS = {
    **{f: 112 // 5 + (1 if i < 112 % 5 else 0) for i, f in enumerate(scenes.MULTIMODAL_FAMILIES)},
    **{f: 4 for f in scenes.TEXT_FAMILIES},
}
EVAL_PER_FAMILY = 250


def write_split(path: Path, samples: list[Any], task: Any = scenes) -> None:
    """``samples`` of ``task`` (a scenes module: digits-vlm's by default) as a data set."""
    arrays = task.collate(samples, seq_len=task.SEQ_LEN)
    inputs = {k: arrays[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    data.save(
        path,
        inputs,
        modality=arrays["modality"],
        answer=arrays["answer"],
        family=arrays["family"],
        header={
            "image_token_id": task.IMAGE_ID,
            "families": task.FAMILIES,
            "multimodal_families": task.MULTIMODAL_FAMILIES,
            "vocab": task.VOCAB,
            "source": getattr(task, "DATA_SOURCE", "tools/digits_vlm/build_data.py"),
        },
        encodings={
            "pixel_values": {"stored": "uint8", "scale": 1.0 / task.PIXEL_LEVELS, "offset": 0.0}
        },
    )


def build(out: Path, seed: int = 0) -> dict[str, Path]:
    pools = scenes.digit_pools(seed=0)
    out.mkdir(parents=True, exist_ok=True)
    calib = scenes.make_split(pools["calib"], CALIB_COUNTS, seed=seed + 100)
    ev = scenes.make_split(pools["eval"], {f: EVAL_PER_FAMILY for f in scenes.FAMILIES}, seed + 200)
    paths = {"calib": out / "calib.npz", "eval": out / "eval.npz"}
    write_split(paths["calib"], calib)
    write_split(paths["eval"], ev)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("examples/digits-vlm"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, path in build(args.out, args.seed).items():
        ds = data.load(path)
        vis = (ds.modality == data.VISION).sum()
        txt = (ds.modality == data.TEXT).sum()
        print(
            f"{name}: {path} ({path.stat().st_size / 2**20:.2f} MiB), {len(ds)} samples, "
            f"{int(ds.multimodal.sum())} multimodal, {vis} vision / {txt} text tokens"
        )


if __name__ == "__main__":
    main()
