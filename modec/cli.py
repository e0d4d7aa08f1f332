"""The ``modec`` command line.

Exit codes: 0 ok, 2 usage, 3 bad input, 4 infeasible budget, 5 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from modec import __version__
from modec.errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, ModecError

log = logging.getLogger("modec")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with the documented usage code (2) and one-line errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"modec: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _cmd_eval(args: argparse.Namespace) -> int:
    from modec import data
    from modec.evaluate import evaluate
    from modec.frontend import OrtRunner

    runner = OrtRunner(args.model, threads=args.threads)
    ds = data.load(args.data)
    data.check_against(ds, runner.inputs)
    result = evaluate(runner, ds, batch_size=args.batch_size)
    if args.json:
        sys.stdout.write(
            json.dumps({"model": args.model, "data": args.data, **result.to_json()}, indent=2)
            + "\n"
        )
    else:
        sys.stdout.write(f"{args.model} on {args.data} ({result.overall.n} samples)\n")
        sys.stdout.write(result.table() + "\n")
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

    ev = sub.add_parser("eval", help="accuracy of a model on an evaluation set")
    ev.add_argument("model", help="an .onnx file")
    ev.add_argument("--data", required=True, help="a modec dataset (.npz) with answers")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=_cmd_eval)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
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
