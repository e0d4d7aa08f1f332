"""What each ``modec`` subcommand does; `modec.cli` parses the arguments and calls these.

Each ``cmd_*`` takes the parsed arguments and returns the exit code (errors are raised as
`modec.errors.ModecError` and turned into one line by `modec.cli.main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from modec.errors import EXIT_OK, EXIT_USAGE, UsageError

log = logging.getLogger("modec")


def _notify(quiet: bool) -> Any:
    """Tells the user about slow one-off steps (a Hugging Face export) on stderr."""
    if quiet:
        return None

    def tell(message: str) -> None:
        sys.stderr.write(f"modec: {message}\n")

    return tell


def _model_file(path: str, cache_dir: str | None, quiet: bool) -> str:
    """``path``, or the cached ONNX export of a Hugging Face model directory."""
    from modec import hf

    if not hf.is_hf_dir(path):
        return path
    from modec.driver import default_cache_dir

    return str(hf.cached_export(path, cache_dir or default_cache_dir(), _notify(quiet)))


def cmd_eval(args: argparse.Namespace) -> int:
    from modec import data
    from modec.evaluate import Resampling, compare, evaluate
    from modec.runners import runner_for

    if args.resamples < 1:
        raise UsageError(f"--resamples {args.resamples}: need at least 1 bootstrap resample")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: need a non-negative integer")
    opts = Resampling(args.resamples, args.seed)
    model = _model_file(args.model, args.cache_dir, args.quiet)
    backend, runner = runner_for(model, args.threads)
    ds = data.load(args.data)
    data.check_against(ds, runner.inputs)
    other: tuple[str, Any] | None = None
    if args.compare is not None:
        other = runner_for(_model_file(args.compare, args.cache_dir, args.quiet), args.threads)
        data.check_against(ds, other[1].inputs)
    if args.kl_to is not None:
        return _eval_kl(args, opts, backend, runner, ds, other)
    batch = args.batch_size or 64
    result = evaluate(runner, ds, batch_size=batch)
    doc = {"model": args.model, "data": args.data, "backend": backend, **result.to_json(opts)}
    note = f"accuracy: Wilson score; answer NLL (nats): {opts.describe()}"
    if other is None:
        text = [f"{args.model} on {args.data} ({result.overall.n} samples, {backend})",
                result.table(opts), f"95% intervals: {note}"]  # fmt: skip
    else:
        res_b = evaluate(other[1], ds, batch_size=batch)
        diff = compare(result, res_b, opts)
        doc_b = {k: v for k, v in res_b.to_json(opts).items() if k != "intervals"}
        doc["compare"] = {"model": args.compare, "backend": other[0], **doc_b}
        doc["difference"] = diff.to_json()
        text = [f"A = {args.model} ({backend}) on {args.data} ({result.overall.n} samples)",
                result.table(opts), "", f"B = {args.compare} ({other[0]})", res_b.table(opts),
                "", "A - B, paired by sample", diff.table(), "",
                f"95% intervals: {note}; A - B: paired, same resamples. McNemar p: exact "
                "two-sided sign test on the samples only one of A and B gets right"]  # fmt: skip
    out = json.dumps(doc, indent=2) if args.json else "\n".join(text)
    sys.stdout.write(out + "\n")
    return EXIT_OK


def _eval_kl(
    args: argparse.Namespace, opts: Any, backend: str, runner: Any, ds: Any,
    other: tuple[str, Any] | None,
) -> int:  # fmt: skip
    """``modec eval MODEL --kl-to REFERENCE [--compare B]``: next-token KL and top-1
    agreement, no labels."""
    from modec import data
    from modec.evaluate import compare_kl, kl_divergences
    from modec.runners import runner_for

    ref_backend, reference = runner_for(
        _model_file(args.kl_to, args.cache_dir, args.quiet), args.threads
    )
    data.check_against(ds, reference.inputs)
    models = [runner] if other is None else [runner, other[1]]
    results = kl_divergences(reference, models, ds, batch_size=args.batch_size or 8)
    result = results[0]
    doc = {"model": args.model, "reference": args.kl_to, "data": args.data,
           "backend": backend, "reference_backend": ref_backend,
           "kl": result.to_json(opts), "intervals": opts.to_json()}  # fmt: skip
    title = (
        f"{args.model} ({backend}) against {args.kl_to} ({ref_backend}) on {args.data} "
        f"({result.samples} samples): KL(reference ‖ model) of the next token; 95% intervals: "
        f"{opts.describe()}"
    )
    text = [title, result.table(opts)]
    if other is not None:
        diff = compare_kl(result, results[1], opts)
        doc["compare"] = {"model": args.compare, "backend": other[0],
                          "kl": results[1].to_json(opts)}  # fmt: skip
        doc["difference"] = diff.to_json()
        text = [f"A = {title}", result.table(opts), "",
                f"B = {args.compare} ({other[0]})", results[1].table(opts), "",
                "A - B, paired by sample (same resamples)", diff.table()]  # fmt: skip
    out = json.dumps(doc, indent=2) if args.json else "\n".join(text)
    sys.stdout.write(out + "\n")
    return EXIT_OK


def cmd_calib_build(args: argparse.Namespace) -> int:
    from modec import calibration

    if args.dataset is None and args.prompts is None and args.text_only is None:
        raise UsageError(
            "calib build needs samples: --prompts (with --images for a vision-language "
            "model), --text-only, or --dataset with --text-column"
        )
    result = calibration.build(
        args.model, args.output, images=args.images, prompts=args.prompts,
        text_only=args.text_only, dataset=args.dataset, image_column=args.image_column,
        text_column=args.text_column, split=args.split, samples=args.samples,
        max_tokens=args.max_tokens, seed=args.seed,
    )  # fmt: skip
    sys.stdout.write(result.line() + "\n")
    return EXIT_OK


def cmd_calib(args: argparse.Namespace) -> int:
    raise UsageError("calib needs a subcommand: modec calib build --model DIR ... -o calib.npz")


BUNDLED_HELP = """modec compile needs a model. To run the bundled example:

  modec compile examples/digits-vlm/model.onnx --calib examples/digits-vlm/calib.npz \\
      --budget 3.0 -o out/digits-vlm --eval examples/digits-vlm/eval.npz
"""


def _progress_factory(quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm import tqdm

    def make(total: int, desc: str) -> Any:
        return tqdm(total=total, desc=desc, unit="it", leave=False, file=sys.stderr)

    return make


def _parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError as exc:
        raise UsageError(f"--bits {text!r}: expected comma-separated integers, e.g. 2,3,4") from exc
    if not bits:
        raise UsageError("--bits is empty; pass e.g. 2,3,4")
    return bits


def cmd_compile(args: argparse.Namespace) -> int:
    from modec import driver
    from modec.distributed import EngineSpec
    from modec.pipelines import CompileOptions
    from modec.streaming import parse_memory
    from modec.summary import format_summary

    if args.model is None:
        sys.stderr.write(BUNDLED_HELP)
        return EXIT_USAGE
    if args.calib is None:
        raise UsageError(
            f"{args.model}: no calibration data; pass --calib DATA (a modec dataset .npz, "
            "see docs/data-format.md)"
        )
    opts = CompileOptions(
        budget=args.budget, bits=_parse_bits(args.bits), group_size=args.group_size,
        method=args.method, scope=args.scope, sense=args.sense, joint=args.joint,
        joint_weighting=args.joint_weighting, calibrate_costs=args.calibrate_costs,
        budget_bytes=args.budget_bytes, key_ratio=args.key_ratio,
        sensitivity_samples=args.sensitivity_samples, sensitivity=args.sensitivity,
        quantizer=args.quantizer, seed=args.seed, threads=args.threads, target=args.target,
        dense_bits=args.dense_bits or 0, expert_act_bits=args.expert_act_bits or 0,
        dense_act_bits=args.dense_act_bits or 0,
        cache_dir=None if args.no_cache else args.cache_dir or driver.default_cache_dir(),
        max_memory=parse_memory(args.max_memory) if args.max_memory else 0,
    )  # fmt: skip
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: give a positive number of CPUs")
    engine = EngineSpec(workers=args.workers, address=args.ray_address)
    res = driver.compile_model(
        args.model, args.calib, args.output, opts, pipeline=args.pipeline, force=args.force,
        progress=_progress_factory(args.quiet), eval_path=args.eval,
        dump_ir_after=args.dump_ir_after, dump_ir_dir=args.dump_ir_dir,
        notify=_notify(args.quiet), engine=engine,
    )  # fmt: skip
    if res.summary:
        sys.stdout.write(format_summary(res.summary) + "\n")
    else:
        sys.stdout.write(f"modec compile: wrote {res.out} (pipeline {res.report['pipeline']})\n")
    return EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    from modec.pipelines import PIPELINES, CompileOptions, registered_passes, standard_pipeline

    out: list[str] = ["pipelines (--method NAME):"]
    for name, what in PIPELINES.items():
        out.append(f"  {name:<15} {what}")
        out.append(f"  {'':<15} {standard_pipeline(CompileOptions(method=name)).text()}")
    out.append("")
    out.append("passes (--pipeline 'name{option=value,...},...'):")
    for name, cls in registered_passes().items():
        opts = ", ".join(
            f"{f.name}={_default_text(f)}"
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        )
        reads = ", ".join(t.__name__ for t in _class_reads(cls)) or "-"
        writes = ", ".join(t.__name__ for t in cls.writes) or "-"
        out.append(f"  {name:<20} reads {reads}; writes {writes}")
        if opts:
            out.append(f"  {'':<20} options: {opts}")
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK


def _default_text(f: dataclasses.Field[Any]) -> str:
    from modec.pipeline_text import format_value

    return format_value(f.default) if f.default is not dataclasses.MISSING else "?"


def _class_reads(cls: Any) -> tuple[type, ...]:
    """A pass class's reads (an instance property where they depend on options)."""
    reads = cls.reads
    return tuple(reads) if isinstance(reads, tuple) else tuple(cls().reads)


def cmd_sweep(args: argparse.Namespace) -> int:
    from modec import sweep
    from modec.pipelines import CompileOptions

    if args.calib is None:
        raise UsageError(f"{args.model}: no calibration data; pass --calib DATA")
    budgets = sweep.parse_budgets(args.budgets)
    opts = CompileOptions(
        bits=_parse_bits(args.bits), group_size=args.group_size, method=args.method,
        seed=args.seed, threads=args.threads, sensitivity_samples=args.sensitivity_samples,
        joint=args.joint, joint_weighting=args.joint_weighting,
        calibrate_costs=args.calibrate_costs,
    )  # fmt: skip
    rows = sweep.sweep(
        args.model, args.calib, budgets, opts, args.eval, _progress_factory(args.quiet)
    )
    files = sweep.write_sweep(args.output, rows, f"modec sweep: {args.model} ({args.method})")
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        sys.stdout.write((Path(args.output) / "sweep.md").read_text())
        sys.stdout.write(f"wrote {', '.join(files)} to {args.output}\n")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from modec import hf
    from modec import inspection as insp

    if hf.is_hf_dir(args.path):
        onnx_path = _model_file(args.path, args.cache_dir, args.quiet)
        info = {**insp.inspect_model(onnx_path), "path": args.path, "onnx": onnx_path}
    else:
        info = insp.inspect_path(args.path)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        sys.stdout.write(insp.format_info(info) + "\n")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from modec.report import write_report_html

    path = write_report_html(args.output)
    sys.stdout.write(f"{path}\n")
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """``modec run OUT``: generate after a prompt with a compiled artifact, streaming the
    tokens to stdout; timings on stderr (docs/generation.md)."""
    import time

    import numpy as np

    import modec.runtime
    from modec import data, kv_cache, prompting

    sess = modec.runtime.load(args.output)
    prompt_inputs = {
        s.name: (s.dtype, tuple(s.shape)) for s in sess.inputs if not kv_cache.is_past(s.name)
    }
    out = Path(args.output)
    tok = (
        prompting.Tokenizer(out / "tokenizer.json") if (out / "tokenizer.json").is_file() else None
    )
    given = [a for a in (args.prompt, args.prompt_ids, args.data) if a is not None]
    if len(given) != 1:
        raise UsageError("give one prompt: --prompt TEXT, --prompt-ids IDS or --data NPZ")
    if args.image is not None and args.prompt is None:
        raise UsageError("--image goes with --prompt (with --data the image is the sample's)")
    if args.data is not None:
        ds = data.load(args.data)
        if not 0 <= args.sample < len(ds):
            raise UsageError(f"--sample {args.sample}: {args.data} has {len(ds)} samples")
        data.check_against(ds, sess.inputs)
        feeds = ds.prompt(args.sample)
    elif args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError as exc:
            raise UsageError(f"--prompt-ids {args.prompt_ids!r}: not integers") from exc
        if not ids:
            raise UsageError("--prompt-ids is empty")
        feeds = {"input_ids": np.asarray([ids], np.int64),
                 "attention_mask": np.ones((1, len(ids)), np.int64)}  # fmt: skip
        for name, (dtype, shape) in prompt_inputs.items():
            if name in feeds:
                continue
            if any(not isinstance(d, int) for d in shape[1:]):
                raise UsageError(f"input {name!r} has dims {list(shape)}; pass --data")
            feeds[name] = np.zeros((1, *(int(d) for d in shape[1:])), dtype)
    else:
        image = Path(args.image) if args.image is not None else None
        feeds, tok = prompting.text_prompt(out, args.prompt, image, prompt_inputs)
    stream = sys.stdout

    def show(step: int, tokens: Any, finished: Any) -> bool:
        t = int(tokens[0])
        stream.write((tok.decode([t]) if tok is not None else str(t)) + " ")
        stream.flush()
        return False  # go on

    t0 = time.perf_counter()
    gen = sess.generate(
        feeds, max_new_tokens=args.max_new_tokens, stop=args.stop or (),
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        callback=None if args.json else show,
    )  # fmt: skip
    total = time.perf_counter() - t0
    n = len(gen.tokens[0])
    prompt_len = int(np.asarray(feeds["attention_mask"]).sum())
    if args.json:
        doc = {"tokens": gen.tokens[0], "text": tok.decode(gen.tokens[0]) if tok else None,
               "prompt_tokens": prompt_len, "prefill_seconds": gen.prefill_seconds,
               "decode_seconds": gen.decode_seconds, "decode_steps": gen.steps}  # fmt: skip
        stream.write(json.dumps(doc, indent=2) + "\n")
        return EXIT_OK
    stream.write("\n")
    rate = (n - 1) / gen.decode_seconds if n > 1 and gen.decode_seconds > 0 else 0.0
    sys.stderr.write(
        f"{n} tokens in {total:.3f} s: prefill {prompt_len} tokens in "
        f"{gen.prefill_seconds * 1e3:.1f} ms, decode {rate:.1f} tokens/s\n"
    )
    return EXIT_OK
