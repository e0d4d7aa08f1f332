"""Peak memory (max RSS) of `modec compile` and of the runtimes, on the bundled example.

    python -m tools.bench_memory [--model examples/digits-vlm/model.onnx] [--runs 3]

Every measurement is a fresh process run under ``/usr/bin/time -f %M`` (peak resident set
size, KiB), median of ``--runs``:

1. ``modec compile`` to quantized weights (``--target none``) and with the TVM lowering
   (``--target llvm``), no cache, so the calibration and sensitivity passes run;
2. inference on the compiled artifact, batch 1 and batch 16 of the evaluation set: the
   Python runtime (`modec.runtime`; also with ``import torch`` made to fail, as on a machine
   without PyTorch), the C++ example app (`runtime/examples/modec_run`,
   built with CMake into ``build/runtime``), and onnxruntime on the fp32 ONNX model;
3. the bare interpreter with the imports each Python run needs, so that the model's own
   share can be read off.

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from modec import data
from tools.cxx import build_modec_run

ROOT = Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"

_PY_RUNTIME = """
import sys, numpy as np
import modec.runtime as rt
s = rt.load(sys.argv[1])
z = np.load(sys.argv[2])
s.run({k: z[k] for k in z.files})
"""
_PY_ORT = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
z = np.load(sys.argv[2])
s.run(None, {k: z[k] for k in z.files})
"""
# tvm_ffi imports torch whenever it is installed (a workaround for a symbol clash on
# Windows), which costs ~200 MiB; a deployment without PyTorch does not pay it. This variant
# makes `import torch` fail first, as it does there.
_PY_RUNTIME_NO_TORCH = "import sys\nsys.modules['torch'] = None\n" + _PY_RUNTIME
_IMPORT_RUNTIME = "import numpy, modec.runtime"
_IMPORT_ORT = "import numpy, onnxruntime"


def peak_kib(cmd: list[str], runs: int) -> float:
    """Median peak RSS (KiB) of ``cmd`` over ``runs`` fresh processes."""
    out = []
    for _ in range(runs):
        r = subprocess.run([TIME, "-f", "%M", *cmd], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"bench_memory: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        out.append(float(r.stderr.strip().splitlines()[-1]))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="examples/digits-vlm/model.onnx")
    ap.add_argument("--calib", default="examples/digits-vlm/calib.npz")
    ap.add_argument("--eval", default="examples/digits-vlm/eval.npz")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not Path(TIME).exists():
        raise SystemExit(f"bench_memory needs {TIME} (GNU time); install it (apt install time)")
    py = sys.executable
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        compile_cmd = [py, "-m", "modec.cli", "-q", "compile", args.model, "--calib",
                       args.calib, "--budget", "3.0", "--no-cache"]  # fmt: skip
        for target in ("none", "llvm"):
            out = tmp / f"out-{target}"
            kib = peak_kib([*compile_cmd, "--target", target, "-o", str(out), "--force"],
                           args.runs)  # fmt: skip
            rows.append((f"`modec compile --target {target}` (no cache)", kib))
        artifact = tmp / "out-llvm"
        ds = data.load(args.eval)
        cxx = build_modec_run(ROOT / "build" / "runtime")
        rows.append(("interpreter + `import numpy, modec.runtime`",
                     peak_kib([py, "-c", _IMPORT_RUNTIME], args.runs)))  # fmt: skip
        rows.append(("interpreter + `import numpy, onnxruntime`",
                     peak_kib([py, "-c", _IMPORT_ORT], args.runs)))  # fmt: skip
        for batch in (1, 16):
            idx = np.flatnonzero(ds.multimodal)[:batch]
            _, feeds = next(ds.subset(idx).batches(batch))
            npz = tmp / f"feeds{batch}.npz"
            arrays: dict[str, Any] = dict(feeds)
            np.savez(npz, **arrays)
            run_py = [py, "-c", _PY_RUNTIME, str(artifact), str(npz)]
            rows.append((f"Python runtime, batch {batch}", peak_kib(run_py, args.runs)))
            run_py = [py, "-c", _PY_RUNTIME_NO_TORCH, str(artifact), str(npz)]
            rows.append((f"Python runtime, batch {batch}, PyTorch not installed",
                         peak_kib(run_py, args.runs)))  # fmt: skip
            if cxx is not None:
                npys = []
                for k, v in feeds.items():
                    p = tmp / f"{k}{batch}.npy"
                    np.save(p, v)
                    npys.append(f"{k}={p}")
                cmd = [str(cxx), str(artifact), *npys, "--out", str(tmp / f"cxx{batch}")]
                rows.append((f"C++ `modec_run`, batch {batch}", peak_kib(cmd, args.runs)))
            run_ort = [py, "-c", _PY_ORT, args.model, str(npz)]
            rows.append((f"onnxruntime fp32, batch {batch}", peak_kib(run_ort, args.runs)))
        sizes = {p.name: p.stat().st_size for p in artifact.iterdir() if p.is_file()}
    print(f"| process | peak RSS (MiB, median of {args.runs}) |")
    print("|---|---|")
    for name, kib in rows:
        print(f"| {name} | {kib / 1024:.1f} |")
    print()
    print("artifact files (bytes): " + ", ".join(f"{k} {v}" for k, v in sorted(sizes.items())))
    if cxx is None:
        print("C++ app not measured: cmake or g++ missing")


if __name__ == "__main__":
    main()
