"""The ``modec`` command line.

Exit codes: 0 ok, 2 usage, 3 bad input, 4 infeasible budget, 5 internal error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modec import __version__
from modec.errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ModecError, UsageError
from modec.interrupt import catch_sigint

log = logging.getLogger("modec")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with the documented usage code (2) and one-line errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"modec: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


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


def _cmd_eval(args: argparse.Namespace) -> int:
    from modec import data
    from modec.runners import runner_for

    model = _model_file(args.model, args.cache_dir, args.quiet)
    backend, runner = runner_for(model, args.threads)
    ds = data.load(args.data)
    data.check_against(ds, runner.inputs)
    if args.kl_to is not None:
        return _eval_kl(args, backend, runner, ds)
    from modec.evaluate import evaluate

    result = evaluate(runner, ds, batch_size=args.batch_size or 64)
    if args.json:
        doc = {"model": args.model, "data": args.data, "backend": backend, **result.to_json()}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(f"{args.model} on {args.data} ({result.overall.n} samples, {backend})\n")
        sys.stdout.write(result.table() + "\n")
    return EXIT_OK


def _eval_kl(args: argparse.Namespace, backend: str, runner: Any, ds: Any) -> int:
    """``modec eval MODEL --kl-to REFERENCE``: next-token KL and top-1 agreement, no labels."""
    from modec import data
    from modec.evaluate import kl_divergence
    from modec.runners import runner_for

    ref_backend, reference = runner_for(
        _model_file(args.kl_to, args.cache_dir, args.quiet), args.threads
    )
    data.check_against(ds, reference.inputs)
    result = kl_divergence(reference, runner, ds, batch_size=args.batch_size or 8)
    if args.json:
        doc = {"model": args.model, "reference": args.kl_to, "data": args.data,
               "backend": backend, "reference_backend": ref_backend,
               "kl": result.to_json()}  # fmt: skip
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(
            f"{args.model} ({backend}) against {args.kl_to} ({ref_backend}) on {args.data} "
            f"({result.samples} samples): KL(reference ‖ model) of the next token\n"
        )
        sys.stdout.write(result.table() + "\n")
    return EXIT_OK


def _cmd_calib_build(args: argparse.Namespace) -> int:
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


def _cmd_calib(args: argparse.Namespace) -> int:
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


def _cmd_compile(args: argparse.Namespace) -> int:
    from modec import driver
    from modec.pipelines import CompileOptions
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
        method=args.method, scope=args.scope, sense=args.sense,
        budget_bytes=args.budget_bytes, key_ratio=args.key_ratio,
        sensitivity_samples=args.sensitivity_samples, quantizer=args.quantizer,
        seed=args.seed, threads=args.threads, target=args.target,
        cache_dir=None if args.no_cache else args.cache_dir or driver.default_cache_dir(),
    )  # fmt: skip
    res = driver.compile_model(
        args.model, args.calib, args.output, opts, pipeline=args.pipeline, force=args.force,
        progress=_progress_factory(args.quiet), eval_path=args.eval,
        dump_ir_after=args.dump_ir_after, dump_ir_dir=args.dump_ir_dir,
        notify=_notify(args.quiet),
    )  # fmt: skip
    if res.summary:
        sys.stdout.write(format_summary(res.summary) + "\n")
    else:
        sys.stdout.write(f"modec compile: wrote {res.out} (pipeline {res.report['pipeline']})\n")
    return EXIT_OK


def _cmd_passes(args: argparse.Namespace) -> int:
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


def _cmd_sweep(args: argparse.Namespace) -> int:
    from modec import sweep
    from modec.pipelines import CompileOptions

    if args.calib is None:
        raise UsageError(f"{args.model}: no calibration data; pass --calib DATA")
    budgets = sweep.parse_budgets(args.budgets)
    opts = CompileOptions(
        bits=_parse_bits(args.bits), group_size=args.group_size, method=args.method,
        seed=args.seed, threads=args.threads, sensitivity_samples=args.sensitivity_samples,
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


def _cmd_inspect(args: argparse.Namespace) -> int:
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


def _cmd_report(args: argparse.Namespace) -> int:
    from modec.report import write_report_html

    path = write_report_html(args.output)
    sys.stdout.write(f"{path}\n")
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return EXIT_OK


def _verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q, accepted before and after the subcommand (the subcommand's wins if given)."""
    g = parser.add_mutually_exclusive_group()
    suffix = "" if top else "_after"
    g.add_argument("-v", "--verbose", action="store_true", dest=f"verbose{suffix}",
                   help="log debug messages")  # fmt: skip
    g.add_argument("-q", "--quiet", action="store_true", dest=f"quiet{suffix}",
                   help="log errors only")  # fmt: skip


def _log_level(args: argparse.Namespace) -> int:
    """The log level; ``args.verbose``/``args.quiet`` become the effective flags (the
    subcommand's when given there), which is what the commands read (progress bars)."""
    if getattr(args, "verbose_after", False) or getattr(args, "quiet_after", False):
        args.verbose, args.quiet = args.verbose_after, args.quiet_after
    return logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING


def build_parser() -> argparse.ArgumentParser:
    from modec.pipelines import PIPELINES, CompileOptions

    d = CompileOptions()  # the defaults, declared once (modec.defaults)
    p = _Parser(
        prog="modec",
        description="Modality-aware mixed-precision compiler for MoE vision-language models.",
        epilog="Exit codes: 0 ok, 2 usage, 3 bad input, 4 infeasible budget, 5 internal error.",
    )
    p.add_argument("--version", action="version", version=f"modec {__version__}")
    _verbosity(p, top=True)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        _verbosity(sp, top=False)
        return sp

    bits = ",".join(str(b) for b in d.bits)
    co = command("compile", "quantize a MoE model's experts with MODE")
    co.add_argument("model", nargs="?",
                    help="an .onnx file or a local Hugging Face model directory "
                         "(config.json + *.safetensors; exported to ONNX once)")  # fmt: skip
    co.add_argument("--calib", help="calibration data (modec dataset .npz)")
    co.add_argument("--budget", type=float, default=d.budget, help="average bits per expert")
    co.add_argument("--bits", default=bits, help=f"candidate widths (default {bits})")
    co.add_argument("--group-size", type=int, default=d.group_size)
    co.add_argument("--method", default=d.method, choices=list(PIPELINES),
                    help="the named pipeline (modec passes lists them)")  # fmt: skip
    co.add_argument("--scope", choices=["layer", "global"], default=d.scope)
    co.add_argument("--sense", choices=["eq", "le"], default=d.sense)
    co.add_argument("--budget-bytes", type=int, default=d.budget_bytes,
                    help="byte budget (overrides --budget)")  # fmt: skip
    co.add_argument("--key-ratio", type=float, default=d.key_ratio,
                    help="share of key vision tokens")  # fmt: skip
    co.add_argument("--sensitivity-samples", type=int, default=d.sensitivity_samples)
    co.add_argument("--quantizer", choices=["gptq", "rtn"], default=d.quantizer)
    co.add_argument("--target", default=d.target,
                    help="TVM target of the compiled artifact: llvm (default, this CPU), "
                         "cuda (sm_90; built here, runs on a GPU machine) or none (simulated "
                         "quantization only, no kernels)")  # fmt: skip
    co.add_argument("--pipeline", help="pipeline text (overrides the named pipeline)")
    co.add_argument(
        "--cache-dir",
        help="where routing statistics and sensitivities are cached, keyed by content hash "
        "(default: $XDG_CACHE_HOME/modec or ~/.cache/modec)",
    )
    co.add_argument("--no-cache", action="store_true", help="recompute; read and write no cache")
    co.add_argument("--seed", type=int, default=d.seed)
    co.add_argument("--threads", type=int, default=d.threads)
    co.add_argument("--eval", help="evaluation data: report fp32 and quantized accuracy")
    co.add_argument("--dump-ir-after", action="append", metavar="PASS",
                    help="write the graph as ONNX after PASS (repeatable; 'all' for every "
                         "pass) into --dump-ir-dir")  # fmt: skip
    co.add_argument("--dump-ir-dir", metavar="DIR", help="where --dump-ir-after writes "
                    "(default: OUT.ir beside the output)")  # fmt: skip
    co.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    co.add_argument("--force", action="store_true", help="replace a non-modec output directory")
    co.set_defaults(func=_cmd_compile)

    sw = command("sweep", "accuracy and size against budget (one calibration)")
    sw.add_argument("model", help="an .onnx file")
    sw.add_argument("--calib", help="calibration data (modec dataset .npz)")
    sw.add_argument("--budgets", default="2.0:4.0:0.25", help="start:stop:step or a,b,c")
    sw.add_argument("--bits", default=bits)
    sw.add_argument("--group-size", type=int, default=d.group_size)
    sw.add_argument("--method", default=d.method, choices=list(PIPELINES))
    sw.add_argument("--sensitivity-samples", type=int, default=d.sensitivity_samples)
    sw.add_argument("--seed", type=int, default=d.seed)
    sw.add_argument("--threads", type=int, default=d.threads)
    sw.add_argument("--eval", help="evaluation data (accuracy per budget)")
    sw.add_argument("-o", "--output", default="sweep", help="where the table and plot go")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func=_cmd_sweep)

    ins = command("inspect", "what a model or a modec output contains")
    ins.add_argument("path", help="an .onnx file, a Hugging Face model directory or a modec "
                     "output directory")  # fmt: skip
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--cache-dir", help="where a Hugging Face directory's ONNX export is cached")
    ins.set_defaults(func=_cmd_inspect)

    rep = command("report", "write OUT/report.html from OUT/report.json")
    rep.add_argument("output", metavar="OUT", help="a modec output directory")
    rep.add_argument("--open", action="store_true", help="open the page in a web browser")
    rep.set_defaults(func=_cmd_report)

    ev = command("eval", "accuracy of a model on an evaluation set")
    ev.add_argument("model", help="an .onnx file, a Hugging Face model directory or a modec "
                    "output directory")  # fmt: skip
    ev.add_argument("--data", required=True, help="a modec dataset (.npz); with answers "
                    "unless --kl-to")  # fmt: skip
    ev.add_argument("--kl-to", metavar="REFERENCE",
                    help="instead of accuracy: the next-token KL(reference ‖ model) and top-1 "
                         "agreement at every non-pad position, all / text / vision, against "
                         "REFERENCE (the original .onnx, run by onnxruntime); no labels "
                         "needed")  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=None,
                    help="samples per batch (default 64; 8 with --kl-to)")  # fmt: skip
    ev.add_argument("--cache-dir", help="where a Hugging Face directory's ONNX export is cached")
    ev.add_argument("--threads", type=int, default=d.threads)
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=_cmd_eval)

    cal = command("calib", "calibration data from a model's own processor or tokenizer")
    cal.set_defaults(func=_cmd_calib)
    cal_sub = cal.add_subparsers(dest="calib_command", parser_class=_Parser)
    cb = cal_sub.add_parser("build", help="build a calibration set (modec dataset .npz)")
    _verbosity(cb, top=False)
    cb.add_argument("--model", required=True, metavar="DIR",
                    help="the model directory (tokenizer; processor for a VLM)")  # fmt: skip
    cb.add_argument("--images", metavar="DIR_OR_LIST",
                    help="a directory of images, or a text file listing image paths")  # fmt: skip
    cb.add_argument("--prompts", metavar="JSONL",
                    help='one prompt per line: {"prompt": "...", "image": "a.png"} or a string '
                         "(text samples for a text-only model)")  # fmt: skip
    cb.add_argument("--text-only", metavar="JSONL",
                    help='text-only samples: {"text": "..."} or a string per line')  # fmt: skip
    cb.add_argument("--dataset", metavar="PATH",
                    help="a datasets data set saved with save_to_disk")  # fmt: skip
    cb.add_argument("--image-column", help="the --dataset column holding images")
    cb.add_argument("--text-column", help="the --dataset column holding prompts")
    cb.add_argument("--split", help="the --dataset split (default: train, else the first)")
    cb.add_argument("--samples", type=int, help="how many samples (default: all)")
    cb.add_argument("--max-tokens", type=int, default=512,
                    help="longest sample in tokens (default 512)")  # fmt: skip
    cb.add_argument("--seed", type=int, default=d.seed, help="drawing and order of samples")
    cb.add_argument("-o", "--output", required=True, help="the .npz to write")
    cb.set_defaults(func=_cmd_calib_build)

    ps = command("passes", "the named pipelines and every pass with its options")
    ps.set_defaults(func=_cmd_passes)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=_log_level(args), format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with catch_sigint():
            return int(args.func(args))
    except ModecError as exc:
        sys.stderr.write(f"modec: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("modec: interrupted\n")
        return 130
    except Exception as exc:  # a bug: say so, keep the traceback behind -v
        log.debug("internal error", exc_info=True)
        sys.stderr.write(
            f"modec: internal error: {type(exc).__name__}: {exc} (rerun with -v for the "
            "traceback and report it)\n"
        )
        return EXIT_INTERNAL


def run() -> None:
    """The ``modec`` command: `main`, then exit with its code.

    After an interrupt the exit goes through ``os._exit`` (streams flushed first): once, a
    compile interrupted under heavy load printed "interrupted" (main returned 130) and still
    exited -2, i.e. by SIGINT. The likely cause is CPython's "unhandled KeyboardInterrupt"
    flag, which stays set when the interrupt once crossed C code that evaluates Python, and
    makes the interpreter end by SIGINT at exit. ``os._exit`` makes the documented 130 certain.
    """
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
