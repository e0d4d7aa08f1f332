"""Export digits-vlm to ONNX and check onnxruntime against PyTorch.

    python -m tools.digits_vlm.export --weights build/digits-vlm/model.pt \
        --out examples/digits-vlm/model.onnx [--form stacked|dispatch|dense] \
        [--exporter dynamo|torchscript]

``stacked`` (the default) is the form transformers' ``batched_mm`` experts export to: the
chosen experts' weights are gathered from ``[E, N, K]`` initializers. The check runs
onnxruntime and PyTorch on batches whose batch size and sequence length differ from the
export sample and fails if they disagree by more than 1e-4.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from modec.data import _default_mode
from tools.digits_vlm import scenes
from tools.digits_vlm.model import DigitsVLM, DigitsVLMConfig, MoEForm

log = logging.getLogger(__name__)
INPUT_NAMES = ["input_ids", "attention_mask", "pixel_values"]


def load_trained(path: str | os.PathLike[str]) -> DigitsVLM:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsVLM(DigitsVLMConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def sample_batch(n: int, seed: int, multimodal: bool = True) -> dict[str, np.ndarray]:
    pools = scenes.digit_pools()
    fams = scenes.MULTIMODAL_FAMILIES if multimodal else scenes.TEXT_FAMILIES
    counts = {f: 0 for f in fams}
    for i in range(n):
        counts[fams[i % len(fams)]] += 1
    arrays = scenes.collate(scenes.make_split(pools["eval"], counts, seed=seed))
    return {k: arrays[k] for k in INPUT_NAMES}


def export(
    model: DigitsVLM,
    path: str | os.PathLike[str],
    form: MoEForm = "stacked",
    exporter: str = "dynamo",
    opset: int = 18,
) -> onnx.ModelProto:
    """Export with dynamic batch and sequence axes; returns the saved model."""
    model.set_moe_form(form)
    example = {k: torch.from_numpy(v) for k, v in sample_batch(3, seed=123).items()}
    args = tuple(example[k] for k in INPUT_NAMES)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1024)
        seq = torch.export.Dim("seq", min=2, max=model.cfg.max_positions)
        prog = torch.onnx.export(
            model,
            args,
            input_names=INPUT_NAMES,
            output_names=["logits"],
            dynamic_shapes={
                "input_ids": {0: batch, 1: seq},
                "attention_mask": {0: batch, 1: seq},
                "pixel_values": {0: batch},
            },
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
        assert prog is not None
        proto = prog.model_proto
    else:
        buf = io.BytesIO()
        torch.onnx.export(
            model,
            args,
            buf,  # type: ignore[arg-type]
            input_names=INPUT_NAMES,
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "pixel_values": {0: "batch"},
                "logits": {0: "batch", 1: "seq"},
            },
            opset_version=opset,
            dynamo=False,
        )
        proto = onnx.load_from_string(buf.getvalue())
    model.set_moe_form("train")
    proto.producer_name = "modec-tools-digits-vlm"
    proto.doc_string = f"digits-vlm, MoE form {form}, exporter {exporter}"
    onnx.checker.check_model(proto)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".onnx.tmp")
    os.close(fd)
    onnx.save(proto, tmp)
    os.chmod(tmp, _default_mode())
    os.replace(tmp, dest)
    return proto


def check_against_torch(
    model: DigitsVLM, path: str | os.PathLike[str], atol: float = 1e-4
) -> float:
    """Max |ORT - torch| over batches of other shapes than the export sample."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n, mm, seed in ((1, True, 7), (5, True, 8), (4, False, 9), (16, True, 10)):
        feeds = sample_batch(n, seed=seed, multimodal=mm)
        (got,) = sess.run(["logits"], feeds)
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[k]) for k in INPUT_NAMES)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > atol:
        raise AssertionError(f"onnxruntime differs from torch by {worst:.3g} (> {atol})")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("build/digits-vlm/model.pt"))
    ap.add_argument("--out", type=Path, default=Path("examples/digits-vlm/model.onnx"))
    ap.add_argument("--form", choices=["stacked", "dispatch", "dense"], default="stacked")
    ap.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    model = load_trained(args.weights)
    export(model, args.out, args.form, args.exporter)
    worst = check_against_torch(model, args.out)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB); max |ORT - torch| = {worst:.2e}")


if __name__ == "__main__":
    main()
