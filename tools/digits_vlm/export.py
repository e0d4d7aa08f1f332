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
from typing import Any

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


def sample_batch(n: int, seed: int, multimodal: bool = True, task: Any = scenes
                 ) -> dict[str, np.ndarray]:  # fmt: skip
    """``n`` evaluation-pool samples of ``task`` (a scenes module: digits-vlm's by default)."""
    pools = task.digit_pools()
    fams = task.MULTIMODAL_FAMILIES if multimodal else task.TEXT_FAMILIES
    counts = {f: 0 for f in fams}
    for i in range(n):
        counts[fams[i % len(fams)]] += 1
    arrays = task.collate(task.make_split(pools["eval"], counts, seed=seed))
    return {k: arrays[k] for k in INPUT_NAMES}


def export(
    model: DigitsVLM,
    path: str | os.PathLike[str],
    form: MoEForm = "stacked",
    exporter: str = "dynamo",
    opset: int = 18,
    task: Any = scenes,
    name: str = "digits-vlm",
) -> onnx.ModelProto:
    """Export with dynamic batch and sequence axes; returns the saved model."""
    model.set_moe_form(form)
    example = {k: torch.from_numpy(v) for k, v in sample_batch(3, seed=123, task=task).items()}
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
    proto.producer_name = f"modec-tools-{name}"
    proto.doc_string = f"{name}, MoE form {form}, exporter {exporter}"
    onnx.checker.check_model(proto)
    _save(proto, path)
    return proto


class _Cached(torch.nn.Module):
    """`DigitsVLM.forward_cached` with flat inputs and outputs, for export."""

    def __init__(self, model: DigitsVLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, cache = self.model.forward_cached(input_ids, attention_mask, pixel_values, pairs)
        return (logits, *(t for kv in cache for t in kv))


class _CachedText(_Cached):
    """The same without ``pixel_values``: the text decoder onnxruntime-genai-style pipelines
    run after the prompt (a baseline for tools/bench_decode.py)."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, cache = self.model.forward_cached(input_ids, attention_mask, None, pairs)
        return (logits, *(t for kv in cache for t in kv))


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every layer (the names Hugging Face
    exports and onnxruntime-genai read: ``past_key_values`` in, ``present`` out)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def export_cached(
    model: DigitsVLM, path: str | os.PathLike[str], opset: int = 18, text_only: bool = False,
    task: Any = scenes, name: str = "digits-vlm",
) -> onnx.ModelProto:  # fmt: skip
    """Export the decoder-with-cache form (dynamo, stacked experts): inputs ``input_ids``
    [B, T], ``attention_mask`` [B, P + T], ``pixel_values`` and ``past_key_values.{i}.key`` /
    ``.value`` [B, heads, P, head dim]; outputs ``logits`` [B, T, V] and ``present.{i}.key`` /
    ``.value`` [B, heads, P + T, head dim]. P may be 0 (a prompt with no cache).
    ``text_only``: no ``pixel_values`` (the decoder of the steps after a prompt)."""
    cfg = model.cfg
    model.set_moe_form("stacked")
    feeds = sample_batch(3, seed=123, task=task)
    b = feeds["input_ids"].shape[0]
    p = 5
    head = cfg.hidden // cfg.num_heads
    gen = torch.Generator().manual_seed(0)
    shape = (b, cfg.num_heads, p, head)
    past = [torch.randn(shape, generator=gen) for _ in range(2 * cfg.num_layers)]
    mask = np.concatenate([np.ones((b, p), np.int64), feeds["attention_mask"]], axis=1)
    pixels = () if text_only else (torch.from_numpy(feeds["pixel_values"]),)
    args = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(mask), *pixels, *past)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=cfg.max_positions)
    cached = torch.export.Dim("past", min=0, max=cfg.max_positions)
    total = torch.export.Dim("total", min=1, max=cfg.max_positions)
    prompt = INPUT_NAMES[:2] if text_only else INPUT_NAMES
    in_names = [*prompt, *cache_names(cfg.num_layers, "past_key_values")]
    out_names = ["logits", *cache_names(cfg.num_layers, "present")]
    image: tuple[dict[int, object], ...] = () if text_only else ({0: batch},)
    dyn = ({0: batch, 1: seq}, {0: batch, 1: total}, *image,
           tuple({0: batch, 2: cached} for _ in past))  # fmt: skip
    prog = torch.onnx.export(
        (_CachedText if text_only else _Cached)(model), args, input_names=in_names,
        output_names=out_names,
        dynamic_shapes=dyn, opset_version=opset, dynamo=True, optimize=True,
        verbose=False,
    )  # fmt: skip
    assert prog is not None
    proto = prog.model_proto
    model.set_moe_form("train")
    proto.producer_name = f"modec-tools-{name}"
    proto.doc_string = f"{name} with a KV cache, MoE form stacked, exporter dynamo"
    onnx.checker.check_model(proto)
    _save(proto, path)
    return proto


def _save(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".onnx.tmp")
    os.close(fd)
    onnx.save(proto, tmp)
    os.chmod(tmp, _default_mode())
    os.replace(tmp, dest)


def trained_from_onnx(
    path: str | os.PathLike[str], cfg: DigitsVLMConfig | None = None, task: Any = scenes
) -> DigitsVLM:
    """The PyTorch model whose `export` is the ONNX file ``path`` (the bundled
    ``examples/digits-vlm/model.onnx``: its training checkpoint is not shipped).

    The exporter renames and transposes some weights (``val_12`` is ``qkv.weight``ᵀ). A
    model with distinct random values in every parameter is exported the same way, and
    each of its initializers is matched to the parameter it holds (as is, or transposed);
    the file's initializers then fill those parameters. Raises if a parameter is not
    found exactly once.
    """
    from onnx import numpy_helper

    cfg = cfg or DigitsVLMConfig()
    probe = DigitsVLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in probe.parameters():
            prm.copy_(torch.rand(prm.shape, generator=gen) + 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export(probe, Path(tmp) / "probe.onnx", task=task)
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    params = dict(probe.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for init in exported.graph.initializer:
        value = numpy_helper.to_array(init)
        for name, prm in params.items():
            want = prm.detach().numpy()
            for transposed in (False, True):
                cand = want.T if transposed else want
                if cand.shape == value.shape and np.array_equal(cand, value):
                    got = src[init.name].T if transposed else src[init.name]
                    state[name] = torch.from_numpy(np.ascontiguousarray(got))
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"{path}: no initializer holds parameters {missing}")
    model = DigitsVLM(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_against_torch(
    model: DigitsVLM, path: str | os.PathLike[str], atol: float = 1e-4, task: Any = scenes
) -> float:
    """Max |ORT - torch| over batches of other shapes than the export sample."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n, mm, seed in ((1, True, 7), (5, True, 8), (4, False, 9), (16, True, 10)):
        feeds = sample_batch(n, seed=seed, multimodal=mm, task=task)
        (got,) = sess.run(["logits"], feeds)
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[k]) for k in INPUT_NAMES)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > atol:
        raise AssertionError(f"onnxruntime differs from torch by {worst:.3g} (> {atol})")
    return worst


def check_cached(
    model: DigitsVLM, path: str | os.PathLike[str], atol: float = 1e-4, task: Any = scenes
) -> float:
    """Max |ORT - torch| of the cached export over prompts of other shapes than the export
    sample, each run as a prefill of all but its last 3 tokens and 3 one-token steps;
    compared with the full forward pass at the positions the mask keeps."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cfg = model.cfg
    head = cfg.hidden // cfg.num_heads
    past_names = cache_names(cfg.num_layers, "past_key_values")
    worst = 0.0
    for n, mm, seed in ((1, True, 7), (5, True, 8), (4, False, 9)):
        feeds = sample_batch(n, seed=seed, multimodal=mm, task=task)
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[k]) for k in INPUT_NAMES)).numpy()
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        t = ids.shape[1]
        cache = [np.zeros((n, cfg.num_heads, 0, head), np.float32) for _ in past_names]
        got = []
        for lo, hi in ((0, t - 3), (t - 3, t - 2), (t - 2, t - 1), (t - 1, t)):
            step = {"input_ids": ids[:, lo:hi], "attention_mask": mask[:, :hi],
                    "pixel_values": feeds["pixel_values"]}  # fmt: skip
            step.update(zip(past_names, cache, strict=True))
            out = sess.run(None, step)
            got.append(out[0])
            cache = out[1:]
        diff = np.abs(np.concatenate(got, axis=1) - want).max(axis=-1)
        worst = max(worst, float(diff[mask.astype(bool)].max()))
    if worst > atol:
        raise AssertionError(f"onnxruntime differs from torch by {worst:.3g} (> {atol})")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--example", choices=["digits-vlm", "facts-vlm"], default="digits-vlm",
                    help="whose data shapes the export sample (and whose config --from-onnx "
                    "reads)")  # fmt: skip
    ap.add_argument("--weights", type=Path, default=Path("build/digits-vlm/model.pt"))
    ap.add_argument("--out", type=Path, default=Path("examples/digits-vlm/model.onnx"))
    ap.add_argument("--form", choices=["stacked", "dispatch", "dense"], default="stacked")
    ap.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    ap.add_argument("--from-onnx", type=Path, default=None, metavar="ONNX",
                    help="take the weights from this export (e.g. the bundled model.onnx) "
                    "instead of --weights")  # fmt: skip
    ap.add_argument(
        "--cached",
        action="store_true",
        help="export the decoder with a KV cache (past_key_values / present)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    task: Any = scenes
    cfg = None
    if args.example == "facts-vlm":
        from tools.facts_vlm import scenes as task
        from tools.facts_vlm.train import config

        cfg = config()
    model = (
        trained_from_onnx(args.from_onnx, cfg, task) if args.from_onnx
        else load_trained(args.weights)
    )  # fmt: skip
    if args.cached:
        export_cached(model, args.out, task=task, name=args.example)
        worst = check_cached(model, args.out, task=task)
        size = args.out.stat().st_size
        print(f"wrote {args.out} ({size / 2**20:.1f} MiB); max |ORT - torch| = {worst:.2e}")
        return
    export(model, args.out, args.form, args.exporter, task=task, name=args.example)
    worst = check_against_torch(model, args.out, task=task)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB); max |ORT - torch| = {worst:.2e}")


if __name__ == "__main__":
    main()
