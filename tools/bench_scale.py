"""How compile time, memory and artifact size grow with depth, on random paper-shaped models.

    python -m tools.bench_scale [--layers 1 2 4] [--dtypes float16 bfloat16] [--quick] \
        [--target llvm] [--calib 32] [--work /tmp/modec-bench-scale] [--json PATH] \
        [--compile-args "--sensitivity-samples 8"] [--max-rss-gib 20] [--timeout S]

For every (dtype, L) it

1. builds the `tools.scale_model` model with L MoE decoder layers (Qwen3-VL-30B-A3B's MoE
   shapes unless overridden; ``--quick``: hidden 256, 16 experts, intermediate 128, top-4,
   128×128 images) and its calibration set, or reuses the build cached in
   ``WORK/models/<config>/`` (`tools.scale_model.cached`);
2. runs ``modec compile MODEL --calib CALIB --budget 3.0 --target TARGET -o OUT --no-cache``
   in a fresh process and records its wall time, its peak RSS (the largest of: ``VmHWM`` of
   the process polled every 50 ms, its ``ru_maxrss`` from ``wait4`` and the per-pass peaks:
   modec's PassTimer resets the kernel's high-water mark before each pass, which also lowers
   ``ru_maxrss``, so no single one of them covers the whole run), and from ``report.json``
   each pass's seconds and ``peak_rss_bytes``; then the size of the output directory and of
   the deployable artifact (``model.so``, ``weights.safetensors``, ``manifest.json``);
3. with an artifact: loads it with the Python runtime (``modec.runtime.load``) in a fresh
   process (load seconds, RSS after the load, peak RSS) and, if ``tools.cxx`` can build it
   (into ``WORK/build-runtime``), runs the C++ ``modec_run`` example on one 8-token
   text-only sample (its wall time and peak RSS are the load plus that run);
4. fits every measured quantity against L by least squares (slope per layer, intercept,
   the value the line gives at L = 48) per dtype, prints Markdown tables and writes
   everything as JSON (``--json``).

The compile's stderr (progress bars, warnings) goes to ``WORK/out/<model>.log``. Outputs of
each compile are deleted after they are measured (``--keep-outputs`` keeps them);
the model builds stay in the work directory (one full-width layer is ~1.2 GB on disk). A
compile whose RSS passes ``--max-rss-gib`` or that runs past ``--timeout`` is killed and
recorded as such.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from tools import scale_model
from tools.scale_model import ScaleConfig

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
MIB = 2**20
#: The depth the fits are extrapolated to (Qwen3-VL-30B-A3B).
TARGET_LAYERS = 48
QUICK = {
    "hidden": 256, "experts": 16, "intermediate": 128, "top_k": 4, "vocab": 1024,
    "vision_dim": 128, "image_size": 128,
}  # fmt: skip
ARTIFACT_FILES = ("model.so", "weights.safetensors", "manifest.json")

_PY_LOAD = """
import json, sys, time
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out
t0 = time.perf_counter()
import numpy, modec.runtime as rt
t1 = time.perf_counter()
before = status()["VmRSS"]
sess = rt.load(sys.argv[1])
t2 = time.perf_counter()
after = status()
print(json.dumps({"import_seconds": t1 - t0, "load_seconds": t2 - t1,
                  "rss_before_load_bytes": before, "rss_after_load_bytes": after["VmRSS"],
                  "peak_rss_bytes": after["VmHWM"]}))
"""


@dataclass
class Measured:
    """One process run under `run_measured`."""

    returncode: int | None
    seconds: float
    peak_rss_bytes: int
    killed: str | None = None
    stdout: str = ""
    stderr: str = ""


def _proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def run_measured(
    cmd: list[str],
    *,
    cwd: Path = ROOT,
    timeout: float | None = None,
    max_rss: int | None = None,
    log: Path | None = None,
) -> Measured:
    """Run ``cmd`` in its own process group; wall time and peak RSS (polled ``VmHWM``, and
    ``ru_maxrss`` from ``wait4``). Killed (the group) past ``timeout`` s or ``max_rss`` bytes."""
    err_path = log or Path(tempfile.mkstemp(prefix="bench-scale-", suffix=".log")[1])
    t0 = time.perf_counter()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
    peak = 0
    killed: list[str] = []
    done = threading.Event()

    def kill(why: str) -> None:
        killed.append(why)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started above

    def poll() -> None:
        nonlocal peak
        while not done.wait(0.05):
            st = _proc_status(proc.pid)
            peak = max(peak, st.get("VmHWM", 0), st.get("VmRSS", 0))
            if max_rss is not None and st.get("VmRSS", 0) > max_rss and not killed:
                kill(f"RSS over {max_rss / GIB:.1f} GiB")
            if timeout is not None and time.perf_counter() - t0 > timeout and not killed:
                kill(f"over {timeout:.0f} s")

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    assert proc.stdout is not None
    stdout = proc.stdout.read()  # until the child closes it (exits)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text(errors="replace")
    if log is None:
        err_path.unlink()
    peak = max(peak, usage.ru_maxrss * 1024)
    return Measured(proc.returncode, seconds, peak, killed[0] if killed else None, stdout, stderr)


def _dir_bytes(path: Path, names: tuple[str, ...] | None = None) -> int:
    if not path.is_dir():
        return 0
    return sum(
        p.stat().st_size
        for p in path.iterdir()
        if p.is_file() and (names is None or p.name in names)
    )


def model_dir(work: Path, cfg: ScaleConfig, calib: int) -> Path:
    """Where the build of ``cfg`` is cached: the main shapes, then a hash of everything
    (``config.json`` inside spells it out; `tools.scale_model.cached` checks it)."""
    d = cfg.to_dict()
    short = {"hidden": "h", "experts": "e", "intermediate": "i", "top_k": "k", "layers": "L"}
    head = "-".join(f"{short[k]}{d[k]}" for k in short)
    what = {**d, "calib": calib, "version": scale_model.VERSION}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return work / "models" / f"{head}-{cfg.dtype}-{key[:10]}"


@dataclass
class Run:
    """Every measurement of one (dtype, layers) point."""

    dtype: str
    layers: int
    model_bytes: int = 0
    build_seconds: float | None = None  # None: reused from the cache
    compile: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    python_runtime: dict[str, Any] | None = None
    cxx_runtime: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def ensure_model(work: Path, cfg: ScaleConfig, calib: int, run: Run) -> Path:
    where = model_dir(work, cfg, calib)
    doc = scale_model.cached(where, cfg, calib)
    if doc is None:
        if where.exists():
            shutil.rmtree(where)
        t0 = time.perf_counter()
        doc = scale_model.build(where, cfg, calib)
        run.build_seconds = time.perf_counter() - t0
    run.model_bytes = sum(v for k, v in doc["files"].items() if k != scale_model.CALIB_FILE)
    return where


def compile_point(model: Path, out: Path, args: argparse.Namespace, run: Run) -> None:
    cmd = [
        sys.executable, "-m", "modec.cli", "compile", str(model / scale_model.MODEL_FILE),
        "--calib", str(model / scale_model.CALIB_FILE), "--budget", str(args.budget),
        "--target", args.target, "-o", str(out), "--no-cache", "--force",
        *shlex.split(args.compile_args),
    ]  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    m = run_measured(
        cmd,
        timeout=args.timeout or None,
        max_rss=int(args.max_rss_gib * GIB) if args.max_rss_gib else None,
        log=log,
    )
    run.compile = {
        "command": shlex.join(cmd),
        "returncode": m.returncode,
        "seconds": m.seconds,
        "peak_rss_bytes": m.peak_rss_bytes,
        "killed": m.killed,
        "log": str(log),
    }
    report_path = out / "report.json"
    if m.returncode != 0 or not report_path.exists():
        tail = m.stderr.strip().splitlines()[-3:]
        run.notes.append(
            f"compile failed ({m.killed or f'exit {m.returncode}'}): {' | '.join(tail)}"
        )
        return
    report = json.loads(report_path.read_text())
    for p in report.get("passes", []):
        run.passes.append(
            {
                "name": p["name"],
                "seconds": p["seconds"],
                "peak_rss_bytes": p.get("peak_rss_bytes"),
                "peak_rss_source": p.get("peak_rss_source"),
            }
        )
    per_pass = [p["peak_rss_bytes"] for p in run.passes if p["peak_rss_bytes"] is not None]
    if per_pass:
        run.compile["peak_rss_bytes"] = max(m.peak_rss_bytes, *per_pass)
    else:
        run.notes.append(
            "report.json has no per-pass peak_rss_bytes (the runner does not record it)"
        )
    run.compile["out_bytes"] = _dir_bytes(out)
    run.compile["artifact_bytes"] = _dir_bytes(out, ARTIFACT_FILES)


def python_runtime_point(out: Path, args: argparse.Namespace, run: Run) -> None:
    m = run_measured([sys.executable, "-c", _PY_LOAD, str(out)], timeout=args.timeout or None)
    if m.returncode != 0:
        run.notes.append(f"python runtime load failed: {m.stderr.strip().splitlines()[-1:]}")
        return
    doc = json.loads(m.stdout.strip().splitlines()[-1])
    run.python_runtime = {**doc, "process_seconds": m.seconds}


def cxx_point(exe: Path, out: Path, cfg: ScaleConfig, work: Path, run: Run) -> None:
    feeds = work / "cxx-feeds"
    feeds.mkdir(parents=True, exist_ok=True)
    t = 8
    ids = np.concatenate([[scale_model.BOS_ID], np.arange(t - 1) + scale_model.FIRST_WORD])
    arrays: dict[str, np.ndarray] = {
        "input_ids": ids.astype(np.int64).reshape(1, t),
        "attention_mask": np.ones((1, t), dtype=np.int64),
        "pixel_values": np.zeros((1, cfg.channels, cfg.image_size, cfg.image_size), np.float32),
    }
    specs = []
    for name, a in arrays.items():
        path = feeds / f"{name}.npy"
        np.save(path, a)
        specs.append(f"{name}={path}")
    m = run_measured([str(exe), str(out), *specs, "--out", str(feeds / "out")])
    if m.returncode != 0:
        run.notes.append(f"modec_run failed (exit {m.returncode}): {m.stderr.strip()[-300:]}")
        return
    run.cxx_runtime = {"seconds": m.seconds, "peak_rss_bytes": m.peak_rss_bytes, "tokens": t}


def build_cxx(work: Path) -> tuple[Path | None, str | None]:
    """The `modec_run` example built with CMake into ``WORK/build-runtime-<source>``, or why
    not (one build folder per checkout: CMake refuses a folder configured from another)."""
    from tools.cxx import ROOT, build_modec_run

    source = hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]
    try:
        exe = build_modec_run(work / f"build-runtime-{source}")
    except subprocess.CalledProcessError as exc:
        return None, f"the C++ runtime did not build: {(exc.stderr or '').strip()[-300:]}"
    if exe is None:
        return None, "cmake or g++ missing"
    return exe, None


def series(runs: list[Run]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Every measured quantity as (layers, value) points, keyed by (dtype, quantity)."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}

    def add(run: Run, name: str, value: float | None) -> None:
        if value is not None:
            out.setdefault((run.dtype, name), []).append((run.layers, float(value)))

    for r in runs:
        add(r, "model on disk (GiB)", r.model_bytes / GIB)
        if r.compile.get("returncode") == 0:
            add(r, "compile wall (s)", r.compile["seconds"])
            add(r, "compile peak RSS (GiB)", r.compile["peak_rss_bytes"] / GIB)
            add(r, "output dir (GiB)", r.compile["out_bytes"] / GIB)
            if r.compile["artifact_bytes"]:
                add(r, "artifact (GiB)", r.compile["artifact_bytes"] / GIB)
        for p in r.passes:
            add(r, f"{p['name']} (s)", p["seconds"])
            if p["peak_rss_bytes"] is not None:
                add(r, f"{p['name']} peak RSS (GiB)", p["peak_rss_bytes"] / GIB)
        if r.python_runtime:
            add(r, "python runtime load (s)", r.python_runtime["load_seconds"])
            add(
                r,
                "python runtime RSS after load (GiB)",
                r.python_runtime["rss_after_load_bytes"] / GIB,
            )
        if r.cxx_runtime:
            add(r, "modec_run load + 8-token run (s)", r.cxx_runtime["seconds"])
            add(r, "modec_run peak RSS (GiB)", r.cxx_runtime["peak_rss_bytes"] / GIB)
    return out


def fit(points: list[tuple[int, float]]) -> dict[str, Any] | None:
    """Least squares ``value = intercept + slope · layers``; None below two distinct depths."""
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    if len(set(xs.tolist())) < 2:
        return None
    a = np.stack([np.ones_like(xs), xs], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(a, ys, rcond=None)
    pred = intercept + slope * xs
    ss = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float(((ys - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    out: dict[str, Any] = {
        "slope": float(slope), "intercept": float(intercept), "r2": r2,
        f"at_{TARGET_LAYERS}": float(intercept + slope * TARGET_LAYERS),
    }  # fmt: skip
    if len(set(xs.tolist())) >= 3:
        # A pass that re-runs the layers after each probed one (measure-sensitivity) grows
        # like L²: the quadratic fit says how much of that the line misses.
        c = np.polynomial.polynomial.polyfit(xs, ys, 2)
        out["quadratic"] = [float(v) for v in c]  # c0 + c1·L + c2·L²
        out[f"quadratic_at_{TARGET_LAYERS}"] = float(
            np.polynomial.polynomial.polyval(TARGET_LAYERS, c)
        )
    return out


def fits_of(runs: list[Run]) -> list[dict[str, Any]]:
    """`fit` of every measured quantity, per dtype."""
    fits = []
    for (dtype, quantity), pts in series(runs).items():
        f = fit(pts)
        if f is not None:
            fits.append({"quantity": quantity, "dtype": dtype, "points": pts, **f})
    return fits


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def tables(runs: list[Run], fits: list[dict[str, Any]]) -> str:
    lines = [
        "| dtype | L | model GiB | build s | compile s | compile peak GiB | artifact MiB | "
        "py load s | py RSS after load GiB | modec_run s | modec_run peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c, py, cx = r.compile, r.python_runtime or {}, r.cxx_runtime or {}
        ok = c.get("returncode") == 0
        art = c.get("artifact_bytes", 0) if ok else 0
        lines.append(
            f"| {r.dtype} | {r.layers} | {r.model_bytes / GIB:.2f} | "
            f"{'cached' if r.build_seconds is None else _fmt(r.build_seconds, 1)} | "
            f"{_fmt(c.get('seconds'), 1) if ok else 'failed'} | "
            f"{_fmt(c.get('peak_rss_bytes', 0) / GIB) if c else '–'} | "
            f"{_fmt(art / MIB, 1) if art else '–'} | "
            f"{_fmt(py.get('load_seconds'))} | "
            f"{_fmt(py['rss_after_load_bytes'] / GIB) if py else '–'} | "
            f"{_fmt(cx.get('seconds'))} | "
            f"{_fmt(cx['peak_rss_bytes'] / GIB) if cx else '–'} |"
        )
    names = list(dict.fromkeys(p["name"] for r in runs for p in r.passes))
    if names:
        cols = [r for r in runs if r.passes]
        lines += ["", "Per pass: seconds / peak RSS GiB (`report.json`)", ""]
        lines.append("| pass | " + " | ".join(f"{r.dtype} L={r.layers}" for r in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for n in names:
            cells = []
            for r in cols:
                p = next((q for q in r.passes if q["name"] == n), None)
                if p is None:
                    cells.append("–")
                    continue
                rss = p["peak_rss_bytes"]
                cells.append(f"{p['seconds']:.1f} / {'–' if rss is None else f'{rss / GIB:.2f}'}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if fits:
        lines += [
            "",
            f"Least-squares fit against L (value = intercept + slope·L; at L={TARGET_LAYERS})",
            "",
        ]
        lines.append(
            f"| quantity | dtype | slope / layer | intercept | R² | at L={TARGET_LAYERS} |"
        )
        lines.append("|---|---|---|---|---|---|")
        for f in fits:
            lines.append(
                f"| {f['quantity']} | {f['dtype']} | {f['slope']:.3f} | {f['intercept']:.3f} | "
                f"{f['r2']:.3f} | {f[f'at_{TARGET_LAYERS}']:.1f} |"
            )
        lines += [
            "",
            "measure-sensitivity re-runs the layers after each probed one, so its time grows "
            "like L² and the line underestimates it far out; the JSON also holds a quadratic "
            "fit (`quadratic`: c0, c1, c2) where three or more depths were measured.",
        ]
    notes = [f"- {r.dtype} L={r.layers}: {n}" for r in runs for n in r.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def write_json(
    args: argparse.Namespace,
    base: ScaleConfig,
    calib: int,
    runs: list[Run],
    fits: list[dict[str, Any]],
) -> None:
    """Write every measurement so far (called after each point: a long run that is stopped
    keeps what it measured)."""
    doc = {
        "config": {
            **base.to_dict(),
            "calib": calib,
            "target": args.target,
            "budget": args.budget,
            "compile_args": args.compile_args,
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "runs": [r.__dict__ for r in runs],
        "fits": fits,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(scale_model.DTYPES),
                    default=["float16", "bfloat16"])  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="a small config for smoke tests")
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (32; quick 8)")
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--target", default="llvm", help="modec compile --target (llvm, none, ...)")
    ap.add_argument("--compile-args", default="", help="more modec compile arguments")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "modec-bench-scale")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement here")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per compile (0: none)")
    ap.add_argument("--max-rss-gib", type=float, default=0,
                    help="kill a compile whose RSS passes this (0: no limit)")  # fmt: skip
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--no-cxx", action="store_true", help="skip the C++ modec_run example")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="print the tables of an earlier --json instead of running")  # fmt: skip
    scale_model.add_config_args(ap)
    args = ap.parse_args(argv)
    if args.from_json:
        earlier = [Run(**r) for r in json.loads(args.from_json.read_text())["runs"]]
        print(tables(earlier, fits_of(earlier)))
        return
    calib = args.calib or (8 if args.quick else 32)
    shape_names = {f.name for f in fields(ScaleConfig)} - {"layers", "dtype"}
    values = {k: v for k, v in vars(args).items() if k in shape_names}
    if args.quick:  # the quick shapes, except where an option was given
        defaults = ScaleConfig()
        values.update({k: v for k, v in QUICK.items() if values[k] == getattr(defaults, k)})
    base = ScaleConfig(**values)
    args.work.mkdir(parents=True, exist_ok=True)
    cxx: Path | None = None
    cxx_why: str | None = "skipped (--no-cxx)" if args.no_cxx else None
    if args.target == "llvm" and not args.no_cxx:
        cxx, cxx_why = build_cxx(args.work)
    runs: list[Run] = []
    for dtype in args.dtypes:
        for layers in args.layers:
            cfg = ScaleConfig(**{**base.to_dict(), "layers": layers, "dtype": dtype})
            run = Run(dtype, layers)
            runs.append(run)
            print(f"[bench_scale] {dtype} L={layers}: model", file=sys.stderr, flush=True)
            model = ensure_model(args.work, cfg, calib, run)
            out = args.work / "out" / f"{model.name}"
            print(f"[bench_scale] {dtype} L={layers}: compile", file=sys.stderr, flush=True)
            compile_point(model, out, args, run)
            if run.compile.get("returncode") == 0 and run.compile.get("artifact_bytes"):
                python_runtime_point(out, args, run)
                if cxx is not None:
                    cxx_point(cxx, out, cfg, args.work, run)
                elif cxx_why:
                    run.notes.append(f"C++ modec_run not measured: {cxx_why}")
            if not args.keep_outputs and out.exists():
                shutil.rmtree(out)
            if args.json:
                write_json(args, base, calib, runs, fits_of(runs))
    fits = fits_of(runs)
    print(tables(runs, fits))
    if args.json:
        write_json(args, base, calib, runs, fits)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
