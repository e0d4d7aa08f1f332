"""Serial vs Ray (``--workers 2``): speedup and efficiency per stage, and the two-node path.

    python -m tools.bench_ray [--parts bundled scale gptq two-node] [--repeats 3] \
        [--work /tmp/modec-bench-ray] [--json PATH] [--samples 16] \
        [--gptq-model /tmp/scaleA/models/h2048-e128-i768-k8-L2-float16-c8c979de9b] \
        [--gptq-experts 16] [--workers 2]

Parts (each prints a Markdown table; ``--json`` keeps every measurement):

1. ``bundled``: ``modec compile examples/digits-vlm/model.onnx --target none --no-cache
   --sensitivity-samples S`` in a fresh process, in four modes, alternating, ``--repeats``
   times each: in process and with ``--workers N``, each at ``--threads 2`` (the default)
   and ``--threads 1``. A Ray task reserves as many CPUs as it has threads, so with 2 CPUs
   ``--threads 2`` runs one task at a time and ``--threads 1`` two. Per pass: seconds (the
   report's ``passes[].seconds``), medians, speedup = serial / Ray at the same threads,
   efficiency = the ``--threads 1`` speedup / N. Every output is compared byte for byte
   with the first serial output of the same ``--threads`` (all files but ``report.json`` /
   ``report.html``).
2. ``scale``: the same on an L = 2 scale model of `tools.scale_model` (fp16, 8 calibration
   samples, all 8 probed, ``--quantizer rtn``: GPTQ is part 3; built once into
   ``WORK/models``): ``--scale-shape wide`` (default) has the experts at full width (hidden
   2048, intermediate 768) but 16 of them, top-4, and 128² images; ``quick`` the shapes of
   ``tools.bench_scale --quick``. Reduced on purpose: with all 128 experts at full width
   the exact probes of L = 2 take hours (docs/scale.md).
3. ``gptq``: GPTQ at full width on layer 0 of the L = 2 fp16 scale model (``--gptq-model``,
   a `tools.scale_model` build): `quantize_projection` of the first ``--gptq-experts``
   experts of gate, up and down (their weights from the model; Hessians X·Xᵀ of 512 random
   tokens each, as GPTQ's work does not depend on H's values): in process (`SerialEngine`) and
   on a local Ray runtime of N CPUs, with 2 and 1 threads per task, and as before this
   change (`gptq_quantize` per expert with torch's default threads); ``--repeats`` times
   each, the codes compared byte for byte. (In part 1 GPTQ runs on the engine inside the
   compile, through the quantize-experts pass.)
4. ``two-node``: a `ray.cluster_utils.Cluster` of two nodes of one CPU each on this machine;
   ``modec compile --ray-address HEAD --threads 1`` of the bundled model (part 1's
   settings); the output compared byte for byte with the serial ``--threads 1`` one, and
   the nodes its tasks ran on counted.

``--before SITE`` adds a fifth mode to parts 1 and 2: the serial compile of another modec
(a wheel of the previous commit installed with ``pip install --no-deps --target SITE``).

Every figure is recorded with the 1-minute load average before and after it
(``os.getloadavg``): the machine is shared, and a busy core slows both sides unevenly. Ray
processes are shut down after every run (the CLI's local runtime ends with the compile; the
GPTQ engine and the cluster are closed here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "digits-vlm"
TIMED = {"report.json", "report.html"}
DEFAULT_GPTQ_MODEL = Path("/tmp/scaleA/models/h2048-e128-i768-k8-L2-float16-c8c979de9b")


@dataclass
class CompileRun:
    """One ``modec compile`` in a fresh process."""

    mode: str  # "serial" or "ray"
    wall: float
    passes: dict[str, float]
    per_worker: dict[str, list[dict[str, Any]]]
    load_before: float
    load_after: float
    identical: bool | None = None
    nodes: int = 0


@dataclass
class Part:
    name: str
    what: str
    runs: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load1() -> float:
    return os.getloadavg()[0]


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in TIMED}


def compile_once(
    model: Path, calib: Path, out: Path, args: list[str], mode: str, site: Path | None = None
) -> CompileRun:
    cmd = [sys.executable, "-m", "modec.cli", "-q", "compile", str(model), "--calib", str(calib),
           "--target", "none", "--no-cache", "--force", "-o", str(out), *args]  # fmt: skip
    env = dict(os.environ)
    if site is not None:  # another modec (a wheel installed into ``site``) first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(":")
    before = load1()
    t0 = time.perf_counter()
    # Not from the checkout's directory: ``python -m`` puts the current directory first on
    # the path, where it would find this checkout's modec instead of ``site``'s.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"compile failed ({mode}): {proc.stderr.strip()}")
    report = json.loads((out / "report.json").read_text())
    if site is not None and "engine" in report:
        raise SystemExit(f"{site}: this checkout's modec ran, not the one installed there")
    passes = {p["name"]: float(p["seconds"]) for p in report["passes"]}
    workers = {p["name"]: p["workers"].get("per_worker", []) for p in report["passes"]
               if p.get("workers")}  # fmt: skip
    nodes = len({w["node"] for ws in workers.values() for w in ws})
    return CompileRun(mode, wall, passes, workers, before, load1(), nodes=nodes)


#: The modes of a compile comparison: name, threads per task (``--threads``), Ray or not.
MODES = (("serial 2t", 2, False), ("ray 2t", 2, True), ("serial 1t", 1, False),
         ("ray 1t", 1, True))  # fmt: skip


def compare_compiles(
    part: Part, model: Path, calib: Path, work: Path, extra: list[str], repeats: int,
    workers: int, before: Path | None,
) -> None:  # fmt: skip
    """Every mode of `MODES` (and ``before``), alternating, ``repeats`` times; each output
    compared with the first serial output of the same ``--threads``."""
    reference: dict[str, dict[str, bytes]] = {}
    modes: list[tuple[str, list[str], Path | None, str]] = [
        (name, ["--threads", str(t), *(["--workers", str(workers)] if ray else [])], None,
         f"{t}t")
        for name, t, ray in MODES
    ]  # fmt: skip
    if before is not None:
        modes.append(("before", [], before, "2t"))  # its default --threads, 2
    for r in range(repeats):
        for mode, flags, site, key in modes:
            out = work / f"{part.name}-{mode.replace(' ', '-')}-{r}"
            run = compile_once(model, calib, out, [*extra, *flags], mode, site)
            files = outputs(out)
            reference.setdefault(key, files)
            run.identical = files == reference[key]
            part.runs.append(run)
            print(f"[bench_ray] {part.name} {mode} #{r}: {run.wall:.1f} s (load "
                  f"{run.load_before:.2f} → {run.load_after:.2f}), same bytes as serial "
                  f"{key}: {run.identical}", file=sys.stderr, flush=True)  # fmt: skip


def compile_table(part: Part, workers: int) -> str:
    runs: list[CompileRun] = part.runs
    names = list(runs[0].passes) if runs else []
    has_before = any(r.mode == "before" for r in runs)
    head = ("| stage | serial --threads 2 | --workers {w} --threads 2 | speedup | serial "
            "--threads 1 | --workers {w} --threads 1 | speedup | efficiency |")  # fmt: skip
    rule = "|---|---|---|---|---|---|---|---|"
    if has_before:
        head += " before this change (serial, default --threads 2) |"
        rule += "---|"
    rows = [f"### {part.name}: {part.what}", "", "Seconds, medians over the repeats.", "",
            head.format(w=workers), rule]  # fmt: skip
    for name in [*names, "(whole compile, wall)"]:

        def med(mode: str, name: str = name) -> float:
            vals = [(r.wall if name.startswith("(") else r.passes.get(name, 0.0))
                    for r in runs if r.mode == mode]  # fmt: skip
            return statistics.median(vals) if vals else float("nan")

        s2, p2, s1, p1 = (med(m) for m, _, _ in MODES)
        if max(s2, p2, s1, p1) < 0.05:
            continue
        row = (f"| {name} | {s2:.2f} | {p2:.2f} | {s2 / p2:.2f}× | {s1:.2f} | {p1:.2f} | "
               f"{s1 / p1:.2f}× | {s1 / p1 / workers:.0%} |")  # fmt: skip
        rows.append(row + (f" {med('before'):.2f} |" if has_before else ""))
    loads = [x for r in runs for x in (r.load_before, r.load_after)]
    same = all(r.identical for r in runs if r.mode != "before")
    n = {m: sum(r.mode == m for r in runs) for m, _, _ in MODES}
    rows += ["", f"Runs per mode: {n}, alternating; 1-minute load average "
             f"{min(loads):.2f}–{max(loads):.2f} over the runs; every output byte-identical to "
             f"the first serial output of the same --threads: {'yes' if same else 'NO'}. "
             "Efficiency: the --threads 1 speedup over the workers."]  # fmt: skip
    if has_before:
        same_before = all(r.identical for r in runs if r.mode == "before")
        verdict = "yes" if same_before else "no"
        rows.append(f"Before this change (a wheel of the previous commit): outputs identical "
                    f"to this change's serial --threads 2 output: {verdict}.")  # fmt: skip
    for mode in ("ray 2t", "ray 1t"):
        last = [r for r in runs if r.mode == mode][-1:]
        for r in last:
            for stage, ws in r.per_worker.items():
                busy = ", ".join(f"{w['worker']}: {w['tasks']} tasks {w['seconds']:.1f} s"
                                 for w in ws)  # fmt: skip
                rows.append(f"- last {mode} run, {stage}: {busy}")
    return "\n".join(rows + part.notes)


def part_bundled(args: argparse.Namespace) -> Part:
    part = Part("bundled", f"examples/digits-vlm, --sensitivity-samples {args.samples}")
    compare_compiles(part, BUNDLED / "model.onnx", BUNDLED / "calib.npz", args.work,
                     ["--sensitivity-samples", str(args.samples)], args.repeats,
                     args.workers, args.before)  # fmt: skip
    return part


#: ``--scale-shape`` presets: the experts of the L = 2 scale model at full width but 16 of
#: them (``wide``, the default), or the quick shapes of ``tools.bench_scale --quick``.
SCALE_SHAPES = {
    "wide": {"experts": 16, "top_k": 4, "vision_dim": 128, "image_size": 128},
    "quick": {"hidden": 256, "experts": 16, "intermediate": 128, "top_k": 4, "vocab": 1024,
              "vision_dim": 128, "image_size": 128},
}  # fmt: skip


def part_scale(args: argparse.Namespace) -> Part:
    from tools import scale_model

    shape = SCALE_SHAPES[args.scale_shape]
    cfg = scale_model.ScaleConfig(**{**scale_model.ScaleConfig().to_dict(), **shape,
                                     "layers": 2, "dtype": "float16"})  # fmt: skip
    where = args.work / "models" / f"{args.scale_shape}-L2"
    if scale_model.cached(where, cfg, 8) is None:
        scale_model.build(where, cfg, 8)
    what = (f"L = 2 scale model, {args.scale_shape} shapes (hidden {cfg.hidden}, "
            f"{cfg.experts} experts, intermediate {cfg.intermediate}, top-{cfg.top_k}, "
            f"{cfg.image_size}² images), fp16, 8 calibration samples, MODE with exact probes "
            "on all 8, --quantizer rtn (GPTQ: part gptq)")  # fmt: skip
    part = Part("scale", what)
    compare_compiles(part, where / scale_model.MODEL_FILE, where / scale_model.CALIB_FILE,
                     args.work, ["--sensitivity-samples", "8", "--quantizer", "rtn"],
                     args.scale_repeats or args.repeats, args.workers, args.before)  # fmt: skip
    return part


@dataclass
class GPTQRun:
    mode: str
    seconds: float
    load_before: float
    load_after: float
    identical: bool | None = None


def part_gptq(args: argparse.Namespace) -> Part:
    import numpy as np

    from modec.distributed import RayEngine, SerialEngine
    from modec.driver import load_inputs
    from modec.method.quantize import expert_weights, quantize_projection
    from modec.moe.canonical import expert_slice, is_moe_node
    from modec.pipeline import Pipeline
    from modec.pipelines import CompileOptions

    n, tokens_per_expert = args.gptq_experts, 512
    part = Part("gptq", f"GPTQ of layer 0's first {n} experts × (gate, up, down) at full width "
                f"(hidden 2048, intermediate 768) of {args.gptq_model.name}; Hessians X·Xᵀ of "
                f"{tokens_per_expert} random tokens per expert")  # fmt: skip
    model, ctx = load_inputs(args.gptq_model / "model.onnx", args.gptq_model / "calib.npz",
                             CompileOptions(method="uniform"))  # fmt: skip
    model, _ = Pipeline.parse("find-moe,canonicalize-moe").run(model, ctx)
    node = next(nd for nd in model.graph if is_moe_node(nd))
    rng = np.random.default_rng(0)
    widths = tuple((2, 3, 4)[e % 3] for e in range(n))
    jobs = []
    for proj, value in expert_weights(node).items():
        w = np.stack([expert_slice(value, e) for e in range(n)])  # only these experts' bytes
        x = rng.standard_normal((n, tokens_per_expert, w.shape[2]))
        jobs.append((proj, w, np.einsum("etk,etl->ekl", x, x)))
    tokens = np.full(n, tokens_per_expert, np.int64)
    part.notes.append(
        "- Real weights, synthetic Hessians: the full layer's Hessians (4.9 GB, a 27 s "
        "calibration run) would not fit beside the other tenants of this machine, and "
        "GPTQ's work does not depend on H's values (no expert falls back to RTN here)."
    )

    def quantize(engine: Any) -> list[Any]:
        return [quantize_projection(w, widths, 128, method="gptq", hessians=h, tokens=tokens,
                                    label=f"layer 0 {proj}", engine=engine)
                for proj, w, h in jobs]  # fmt: skip

    def before_change() -> list[Any]:
        """What quantize_projection did before the engines: `gptq_quantize` per expert in
        this process with its default threads (torch: one per core)."""
        from modec.numerics.gptq import gptq_quantize
        from modec.numerics.schemes import QuantScheme

        out = []
        for _, w, h in jobs:
            codes = []
            for e, width in enumerate(widths):
                scheme = QuantScheme(width, 128)
                res = gptq_quantize(w[e], h[e], scheme, n_tokens=int(tokens[e]))
                codes.append(res.qweight)
            out.append(SimpleNamespace(codes=codes))
        return out

    def key(res: list[Any]) -> bytes:
        return b"".join(c.q.tobytes() + c.scale.tobytes() + c.zero.tobytes()
                        for r in res for c in r.codes)  # fmt: skip

    reference: bytes | None = None

    def timed(mode: str, run_it: Any) -> None:
        nonlocal reference
        before = load1()
        t = time.perf_counter()
        res = run_it()
        run = GPTQRun(mode, time.perf_counter() - t, before, load1())
        k = key(res)
        reference = reference or k
        run.identical = k == reference
        part.runs.append(run)
        print(f"[bench_ray] gptq {mode}: {run.seconds:.1f} s (load {run.load_before:.2f} → "
              f"{run.load_after:.2f}), same codes: {run.identical}", file=sys.stderr,
              flush=True)  # fmt: skip

    # One Ray runtime per process at a time: the --threads 1 engine with the serial modes
    # alternating, then the --threads 2 engine.
    engine = RayEngine(workers=args.workers, threads=1)
    try:
        quantize(engine)  # warm-up: the workers import torch once (not timed)
        for _ in range(args.repeats):
            timed("serial 2t", lambda: quantize(SerialEngine(2)))
            timed("ray 1t", lambda: quantize(engine))
            timed("serial 1t", lambda: quantize(SerialEngine(1)))
            timed("before", before_change)
    finally:
        engine.close()
    if args.workers >= 2:
        engine = RayEngine(workers=args.workers, threads=2)
        try:
            quantize(engine)
            for _ in range(args.repeats):
                timed("ray 2t", lambda: quantize(engine))
        finally:
            engine.close()
    return part


def gptq_table(part: Part, workers: int) -> str:
    runs: list[GPTQRun] = part.runs

    def med(mode: str) -> float:
        vals = [r.seconds for r in runs if r.mode == mode]
        return statistics.median(vals) if vals else float("nan")

    s2, p2, s1, p1, b = (med(m) for m in ("serial 2t", "ray 2t", "serial 1t", "ray 1t",
                                           "before"))  # fmt: skip
    loads = [x for r in runs for x in (r.load_before, r.load_after)]
    same = all(r.identical for r in runs)
    return "\n".join([
        f"### gptq: {part.what}", "", "Seconds, medians over the repeats.", "",
        f"| stage | serial --threads 2 | Ray {workers} CPUs, 2 threads/task | speedup | serial "
        f"--threads 1 | Ray {workers} CPUs, 1 thread/task | speedup | efficiency | before this "
        "change (torch's default threads) |", "|---|---|---|---|---|---|---|---|---|",
        f"| GPTQ | {s2:.2f} | {p2:.2f} | {s2 / p2:.2f}× | {s1:.2f} | {p1:.2f} | "
        f"{s1 / p1:.2f}× | {s1 / p1 / workers:.0%} | {b:.2f} |", "",
        f"{sum(r.mode == 'ray 1t' for r in runs)} repeats; 1-minute load average "
        f"{min(loads):.2f}–{max(loads):.2f}; codes byte-identical in every mode: "
        f"{'yes' if same else 'NO'}.",
        *part.notes,
    ])  # fmt: skip


def part_two_node(args: argparse.Namespace, serial_files: dict[str, bytes] | None) -> Part:
    from ray.cluster_utils import Cluster

    part = Part("two-node", "ray.cluster_utils.Cluster: 2 nodes × 1 CPU on this machine, "
                f"bundled model, --sensitivity-samples {args.samples}")  # fmt: skip
    extra = ["--sensitivity-samples", str(args.samples)]
    if serial_files is None:  # nodes of one CPU: tasks of one thread, against serial --threads 1
        out = args.work / "two-node-serial"
        part.runs.append(compile_once(BUNDLED / "model.onnx", BUNDLED / "calib.npz", out,
                                      [*extra, "--threads", "1"], "serial"))  # fmt: skip
        serial_files = outputs(out)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # 1 task each
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = args.work / "two-node-ray"
        run = compile_once(BUNDLED / "model.onnx", BUNDLED / "calib.npz", out,
                           [*extra, "--threads", "1", "--ray-address", cluster.address],
                           "ray")  # fmt: skip
        run.identical = outputs(out) == serial_files
        part.runs.append(run)
    finally:
        cluster.shutdown()
    print(f"[bench_ray] two-node: {run.wall:.1f} s on {run.nodes} node(s), same bytes: "
          f"{run.identical}", file=sys.stderr, flush=True)  # fmt: skip
    return part


def two_node_table(part: Part) -> str:
    run = next(r for r in part.runs if r.mode == "ray")
    used = sorted({w["node"] for ws in run.per_worker.values() for w in ws})
    return "\n".join([
        f"### two-node: {part.what}", "",
        f"- compile {run.wall:.1f} s (load {run.load_before:.2f} → {run.load_after:.2f}); tasks "
        f"ran on {len(used)} node(s) ({', '.join(used)}); output byte-identical to the serial "
        f"run: {'yes' if run.identical else 'NO'}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["bundled", "scale", "gptq", "two-node"],
                    choices=["bundled", "scale", "gptq", "two-node"])  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16, help="bundled: --sensitivity-samples")
    ap.add_argument("--scale-shape", choices=sorted(SCALE_SHAPES), default="wide")
    ap.add_argument("--scale-repeats", type=int, default=0, help="scale: repeats (0: --repeats)")
    ap.add_argument("--gptq-model", type=Path, default=DEFAULT_GPTQ_MODEL)
    ap.add_argument("--gptq-experts", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "modec-bench-ray")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--before", type=Path, default=None, metavar="SITE",
                    help="also compile serially with the modec in SITE (see above)")  # fmt: skip
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    tables: list[str] = []
    parts: list[Part] = []
    serial_files = None
    for name in args.parts:
        if name == "bundled":
            part = part_bundled(args)
            tables.append(compile_table(part, args.workers))
            serial_files = outputs(args.work / "bundled-serial-1t-0")
        elif name == "scale":
            part = part_scale(args)
            tables.append(compile_table(part, args.workers))
        elif name == "gptq":
            part = part_gptq(args)
            tables.append(gptq_table(part, args.workers))
        else:
            part = part_two_node(args, serial_files)
            tables.append(two_node_table(part))
        parts.append(part)
        print(tables[-1] + "\n", flush=True)
    if args.json:
        doc = {"cpus": os.cpu_count(), "workers": args.workers, "repeats": args.repeats,
               "parts": [{"name": p.name, "what": p.what, "notes": p.notes,
                          "runs": [asdict(r) for r in p.runs]} for p in parts]}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
