"""The ``modec`` command line.

Exit codes: 0 ok, 2 usage, 3 bad input, 4 infeasible budget, 5 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
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


def _runner(path: str, threads: int) -> tuple[str, Any]:
    """How to run ``path``: a compiled/simulated output directory or an ONNX file."""
    from modec.driver import SIM_MODEL, CompiledRunner, SimulatedRunner
    from modec.errors import ModelError
    from modec.frontend import OrtRunner

    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").exists():
            return "compiled", CompiledRunner(p)
        if (p / SIM_MODEL).exists():
            return "simulated", SimulatedRunner(p, threads)
        raise ModelError(f"{path}: a directory without {SIM_MODEL}; pass a modec output or .onnx")
    runner = OrtRunner(path, threads=threads)
    if any(n.domain == "ai.modec" for n in runner.proto.graph.node):
        return "simulated", SimulatedRunner(p, threads)
    return "onnxruntime", runner


def _cmd_eval(args: argparse.Namespace) -> int:
    from modec import data
    from modec.evaluate import evaluate

    backend, runner = _runner(args.model, args.threads)
    ds = data.load(args.data)
    data.check_against(ds, runner.inputs)
    result = evaluate(runner, ds, batch_size=args.batch_size)
    if args.json:
        doc = {"model": args.model, "data": args.data, "backend": backend, **result.to_json()}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(f"{args.model} on {args.data} ({result.overall.n} samples, {backend})\n")
        sys.stdout.write(result.table() + "\n")
    return EXIT_OK


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

    if args.model is None:
        sys.stderr.write(BUNDLED_HELP)
        return EXIT_USAGE
    if args.calib is None:
        raise UsageError(
            f"{args.model}: no calibration data; pass --calib DATA (a modec dataset .npz, "
            "see docs/data-format.md)"
        )
    opts = driver.CompileOptions(
        budget=args.budget, bits=_parse_bits(args.bits), group_size=args.group_size,
        method=args.method, scope=args.scope, sense=args.sense,
        budget_bytes=args.budget_bytes, key_ratio=args.key_ratio,
        sensitivity_samples=args.sensitivity_samples, quantizer=args.quantizer,
        seed=args.seed, threads=args.threads, target=args.target,
        cache_dir=None if args.no_cache else args.cache_dir or driver.default_cache_dir(),
    )  # fmt: skip
    res = driver.compile_model(
        args.model, args.calib, args.output, opts, pipeline=args.pipeline, force=args.force,
        progress=_progress_factory(args.quiet),
    )  # fmt: skip
    summary = driver.summarize(res)
    if args.eval:
        from modec import data
        from modec.evaluate import evaluate
        from modec.frontend import OrtRunner

        ds = data.load(args.eval)
        base = evaluate(OrtRunner(args.model, threads=args.threads), ds)
        quant = evaluate(driver.SimulatedRunner(res.out, threads=args.threads), ds)
        summary["accuracy"] = {"fp32": base.to_json(), "quantized": quant.to_json()}
        driver.record_accuracy(res.out, summary["accuracy"])
    sys.stdout.write(driver.format_summary(summary) + "\n")
    return EXIT_OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    from modec import driver, sweep

    if args.calib is None:
        raise UsageError(f"{args.model}: no calibration data; pass --calib DATA")
    budgets = sweep.parse_budgets(args.budgets)
    opts = driver.CompileOptions(
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
    from modec import inspection as insp

    info = insp.inspect_path(args.path)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        sys.stdout.write(insp.format_info(info) + "\n")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from modec.report_html import write_report_html

    path = write_report_html(args.output)
    sys.stdout.write(f"{path}\n")
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="modec",
        description="Modality-aware mixed-precision compiler for MoE vision-language models.",
        epilog="Exit codes: 0 ok, 2 usage, 3 bad input, 4 infeasible budget, 5 internal error.",
    )
    p.add_argument("--version", action="version", version=f"modec {__version__}")
    verb = p.add_mutually_exclusive_group()
    verb.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    verb.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    co = sub.add_parser("compile", help="quantize a MoE model's experts with MODE")
    co.add_argument("model", nargs="?", help="an .onnx file")
    co.add_argument("--calib", help="calibration data (modec dataset .npz)")
    co.add_argument("--budget", type=float, default=3.0, help="average bits per expert")
    co.add_argument("--bits", default="2,3,4", help="candidate widths (default 2,3,4)")
    co.add_argument("--group-size", type=int, default=128)
    co.add_argument("--method", default="mode", help="mode, uniform, mc-moe, veq-me, ...")
    co.add_argument("--scope", choices=["layer", "global"], default="layer")
    co.add_argument("--sense", choices=["eq", "le"], default="eq")
    co.add_argument("--budget-bytes", type=int, default=0, help="byte budget (overrides --budget)")
    co.add_argument("--key-ratio", type=float, default=0.2, help="share of key vision tokens")
    co.add_argument("--sensitivity-samples", type=int, default=32)
    co.add_argument("--quantizer", choices=["gptq", "rtn"], default="gptq")
    co.add_argument("--target", default="llvm",
                    help="TVM target of the compiled artifact: llvm (default, this CPU), "
                         "cuda (sm_90; built here, runs on a GPU machine) or none (simulated "
                         "quantization only, no kernels)")  # fmt: skip
    co.add_argument("--pipeline", help="pipeline text (overrides the default MODE pipeline)")
    co.add_argument(
        "--cache-dir",
        help="where routing statistics and sensitivities are cached, keyed by content hash "
        "(default: $XDG_CACHE_HOME/modec or ~/.cache/modec)",
    )
    co.add_argument("--no-cache", action="store_true", help="recompute; read and write no cache")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--threads", type=int, default=2)
    co.add_argument("--eval", help="evaluation data: report fp32 and quantized accuracy")
    co.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    co.add_argument("--force", action="store_true", help="replace a non-modec output directory")
    co.set_defaults(func=_cmd_compile)

    sw = sub.add_parser("sweep", help="accuracy and size against budget (one calibration)")
    sw.add_argument("model", help="an .onnx file")
    sw.add_argument("--calib", help="calibration data (modec dataset .npz)")
    sw.add_argument("--budgets", default="2.0:4.0:0.25", help="start:stop:step or a,b,c")
    sw.add_argument("--bits", default="2,3,4")
    sw.add_argument("--group-size", type=int, default=128)
    sw.add_argument("--method", default="mode")
    sw.add_argument("--sensitivity-samples", type=int, default=32)
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--threads", type=int, default=2)
    sw.add_argument("--eval", help="evaluation data (accuracy per budget)")
    sw.add_argument("-o", "--output", default="sweep", help="where the table and plot go")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func=_cmd_sweep)

    ins = sub.add_parser("inspect", help="what a model or a modec output contains")
    ins.add_argument("path", help="an .onnx file or a modec output directory")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_cmd_inspect)

    rep = sub.add_parser("report", help="write OUT/report.html from OUT/report.json")
    rep.add_argument("output", metavar="OUT", help="a modec output directory")
    rep.add_argument("--open", action="store_true", help="open the page in a web browser")
    rep.set_defaults(func=_cmd_report)

    ev = sub.add_parser("eval", help="accuracy of a model on an evaluation set")
    ev.add_argument("model", help="an .onnx file or a modec output directory")
    ev.add_argument("--data", required=True, help="a modec dataset (.npz) with answers")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=_cmd_eval)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
