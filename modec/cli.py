"""The ``modec`` command line.

Exit codes: 0 ok, 2 usage, 3 bad input, 4 infeasible budget, 5 internal error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from modec import __version__, commands
from modec.defaults import DENSE_BITS
from modec.errors import EXIT_INTERNAL, EXIT_USAGE, ModecError
from modec.interrupt import catch_sigint
from modec.numerics.activations import ACT_BITS

log = logging.getLogger("modec")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with the documented usage code (2) and one-line errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"modec: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


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
    co.add_argument("--joint", choices=["off", "select", "guard"], default=d.joint,
                    help="select: solve the ILP over every contiguous range of --bits, run "
                         "each allocation with all experts quantized on the calibration "
                         "set, keep the narrowest range's (uniform when the budget is a "
                         "width) unless a wider one is significantly closer to fp32 "
                         "(checks the additive objective; docs/joint.md); guard: the same "
                         "check, keeping uniform where the budget is a width and else the "
                         "full range's unless another is significantly closer; off: the "
                         "paper's allocation (default %(default)s)")  # fmt: skip
    co.add_argument("--joint-weighting", choices=["positions", "balanced"],
                    default=d.joint_weighting,
                    help="how --joint weighs calibration samples: by KL positions, "
                         "or multimodal and text-only half each (default %(default)s)")  # fmt: skip
    co.add_argument("--calibrate-costs", action="store_true",
                    help="price each layer's widths by the joint KL of the whole layer "
                         "quantized as deployed (GPTQ, cross-fitted) over the sum of its "
                         "experts' δ, then solve the ILP with those costs (δ-based methods; "
                         "docs/joint.md)")  # fmt: skip
    co.add_argument("--budget-bytes", type=int, default=d.budget_bytes,
                    help="byte budget (overrides --budget)")  # fmt: skip
    co.add_argument("--key-ratio", type=float, default=d.key_ratio,
                    help="share of key vision tokens")  # fmt: skip
    co.add_argument("--sensitivity-samples", type=int, default=d.sensitivity_samples)
    co.add_argument("--sensitivity", choices=["auto", "exact", "fisher"], default=d.sensitivity,
                    help="how the KL sensitivities are measured: exact probes (O(L^2) in "
                         "layers), the O(L) Fisher estimate, or auto: fisher from 1e9 expert "
                         "weights, exact below (default %(default)s; "
                         "docs/sensitivity_estimator.md)")  # fmt: skip
    co.add_argument("--quantizer", choices=["gptq", "rtn"], default=d.quantizer)
    co.add_argument("--dense-bits", type=int, choices=DENSE_BITS, default=None,
                    help="also quantize the text decoder's dense matmul weights (attention, "
                         "output head) at this width, RTN, outside MODE's expert allocation; "
                         "default: they stay as stored (docs/dense_quantization.md)")  # fmt: skip
    co.add_argument("--expert-act-bits", type=int, choices=ACT_BITS, default=None,
                    help="the routed experts take their inputs as int8 per weight group "
                         "(AVX-512 VNNI kernels, as llama.cpp's K-quants do), in the artifact "
                         "and the simulated model; default: float32 "
                         "(docs/expert_activations.md)")  # fmt: skip
    co.add_argument("--dense-act-bits", type=int, choices=ACT_BITS, default=None,
                    help="with --dense-bits: the quantized dense matmuls (attention, head) "
                         "take their inputs as int8 per weight group too (AVX-512 VNNI "
                         "kernels); default: float32 (docs/expert_activations.md)")  # fmt: skip
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
    co.add_argument("--workers", type=int, default=0, metavar="N",
                    help="run the sensitivity probes, GPTQ and the ILP solves as tasks on a "
                         "local Ray runtime of N CPUs (pip install 'modec[distributed]'); the "
                         "output is the same bytes as without (docs/distributed.md)")  # fmt: skip
    co.add_argument("--ray-address", metavar="ADDR",
                    help="run those tasks on an existing Ray cluster: its head's HOST:PORT, "
                         "ray://HOST:PORT, or auto (the latest local `ray start`)")  # fmt: skip
    co.add_argument("--max-memory", metavar="SIZE",
                    help="RAM for the calibration activations that the layer-streamed passes "
                         "hold (e.g. 16GiB); past it they spill to memory-mapped files in the "
                         "temp dir (default: half of this machine's RAM)")  # fmt: skip
    co.add_argument("--eval", help="evaluation data: report fp32 and quantized accuracy")
    co.add_argument("--dump-ir-after", action="append", metavar="PASS",
                    help="write the graph as ONNX after PASS (repeatable; 'all' for every "
                         "pass) into --dump-ir-dir")  # fmt: skip
    co.add_argument("--dump-ir-dir", metavar="DIR", help="where --dump-ir-after writes "
                    "(default: OUT.ir beside the output)")  # fmt: skip
    co.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    co.add_argument("--force", action="store_true", help="replace a non-modec output directory")
    co.set_defaults(func=commands.cmd_compile)

    sw = command("sweep", "accuracy and size against budget (one calibration)")
    sw.add_argument("model", help="an .onnx file")
    sw.add_argument("--calib", help="calibration data (modec dataset .npz)")
    sw.add_argument("--budgets", default="2.0:4.0:0.25", help="start:stop:step or a,b,c")
    sw.add_argument("--bits", default=bits)
    sw.add_argument("--group-size", type=int, default=d.group_size)
    sw.add_argument("--method", default=d.method, choices=list(PIPELINES))
    sw.add_argument("--sensitivity-samples", type=int, default=d.sensitivity_samples)
    sw.add_argument("--joint", choices=["off", "select", "guard"], default=d.joint,
                    help="allocate-bits' joint check (modec compile --help)")  # fmt: skip
    sw.add_argument("--joint-weighting", choices=["positions", "balanced"],
                    default=d.joint_weighting, help="(modec compile --help)")  # fmt: skip
    sw.add_argument("--calibrate-costs", action="store_true", help="(modec compile --help)")
    sw.add_argument("--seed", type=int, default=d.seed)
    sw.add_argument("--threads", type=int, default=d.threads)
    sw.add_argument("--eval", help="evaluation data (accuracy per budget)")
    sw.add_argument("-o", "--output", default="sweep", help="where the table and plot go")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func=commands.cmd_sweep)

    ins = command("inspect", "what a model or a modec output contains")
    ins.add_argument("path", help="an .onnx file, a Hugging Face model directory or a modec "
                     "output directory")  # fmt: skip
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--cache-dir", help="where a Hugging Face directory's ONNX export is cached")
    ins.set_defaults(func=commands.cmd_inspect)

    rep = command("report", "write OUT/report.html from OUT/report.json")
    rep.add_argument("output", metavar="OUT", help="a modec output directory")
    rep.add_argument("--open", action="store_true", help="open the page in a web browser")
    rep.set_defaults(func=commands.cmd_report)

    from modec import stats

    ev = command("eval", "accuracy of a model on an evaluation set, with 95%% intervals")
    ev.add_argument("model", help="an .onnx file, a Hugging Face model directory or a modec "
                    "output directory")  # fmt: skip
    ev.add_argument("--data", required=True, help="a modec dataset (.npz); with answers "
                    "unless --kl-to")  # fmt: skip
    ev.add_argument("--kl-to", metavar="REFERENCE",
                    help="instead of accuracy: the next-token KL(reference ‖ model) and top-1 "
                         "agreement at every non-pad position, all / text / vision, against "
                         "REFERENCE (the original .onnx, run by onnxruntime); no labels "
                         "needed")  # fmt: skip
    ev.add_argument("--compare", metavar="B",
                    help="also evaluate B (same kinds as MODEL) on the same samples and report "
                         "MODEL - B per split, paired by sample: the accuracy difference with "
                         "a paired bootstrap 95%% interval and the exact McNemar p-value, and "
                         "the answer-NLL difference (with --kl-to: the KL and top-1 agreement "
                         "differences)")  # fmt: skip
    ev.add_argument("--resamples", type=int, default=stats.RESAMPLES,
                    help="bootstrap resamples for the intervals (default %(default)s)")  # fmt: skip
    ev.add_argument("--seed", type=int, default=stats.SEED,
                    help="seed of the bootstrap resampling (default %(default)s)")  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=None,
                    help="samples per batch (default 64; 8 with --kl-to)")  # fmt: skip
    ev.add_argument("--cache-dir", help="where a Hugging Face directory's ONNX export is cached")
    ev.add_argument("--threads", type=int, default=d.threads)
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=commands.cmd_eval)

    cal = command("calib", "calibration data from a model's own processor or tokenizer")
    cal.set_defaults(func=commands.cmd_calib)
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
    cb.add_argument("--max-tokens", type=int, default=None,
                    help="longest sample in tokens (default 512, plus one image's tokens "
                         "for Qwen3-VL)")  # fmt: skip
    cb.add_argument("--seed", type=int, default=d.seed, help="drawing and order of samples")
    cb.add_argument("-o", "--output", required=True, help="the .npz to write")
    cb.set_defaults(func=commands.cmd_calib_build)

    rn = command("run", "generate text with a compiled artifact (a model with a KV cache)")
    rn.add_argument("output", metavar="OUT", help="a modec output directory")
    rn.add_argument("--prompt", help="prompt text (OUT/tokenizer.json; <image> marks the image)")
    rn.add_argument("--image", help="an image for the prompt (OUT/processor.json; .npy: the "
                    "pixel values)")  # fmt: skip
    rn.add_argument("--prompt-ids", metavar="IDS", help="the prompt as token ids (text only)")
    rn.add_argument("--data", metavar="NPZ", help="take the prompt (and image) from a modec "
                    "data set")  # fmt: skip
    rn.add_argument("--sample", type=int, default=0,
                    help="which sample of --data (its prompt: the tokens of a multi-token "
                    "answer that the input ends with are left out)")  # fmt: skip
    rn.add_argument("--max-new-tokens", type=int, default=32)
    rn.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    rn.add_argument("--top-k", type=int, default=0, help="0: no limit")
    rn.add_argument("--top-p", type=float, default=1.0)
    rn.add_argument("--seed", type=int, default=0)
    rn.add_argument("--stop", type=int, nargs="*", metavar="ID", help="stop token ids")
    rn.add_argument("--json", action="store_true", help="print the result as JSON, no stream")
    rn.set_defaults(func=commands.cmd_run)

    ps = command("passes", "the named pipelines and every pass with its options")
    ps.set_defaults(func=commands.cmd_passes)
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
