#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py): check and measure CUDA artifacts and kernels.
#
#   tools/gpu_check.sh [DIR [OUT]]
#
# DIR (default .gpu) is prepared first unless it holds kernels.json already (preparing needs
# the TVM compiler and nvcc, no GPU). Then the run: on a machine without modec installed (the
# lent GPU machine: no compiler, no registry), the wheels prepare wrote into DIR/wheels are
# installed into a private directory first. OUT (default $OUT, else gpu-check-out) receives
# results.json and results.md. GPU_CHECK_TIMEOUT (seconds, default 480) bounds the run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(cd "$repo" && mkdir -p "${1:-.gpu}" && cd "${1:-.gpu}" && pwd)
out=${2:-${OUT:-$repo/gpu-check-out}}
mkdir -p "$out"
py=python3
if [ ! -f "$dir/kernels.json" ]; then
  (cd "$repo" && python -m tools.gpu_check prepare --dir "$dir")
fi
site=""
if ! "$py" -c "import modec.runtime, tvm_ffi" 2>/dev/null; then
  site=$(mktemp -d /tmp/modec-site-XXXXXX)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$dir"/wheels/*.whl
fi
export PYTHONPATH="${site:+$site:}$repo${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MODEC_TVM_LIBRARY_PATH="$dir/lib"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
# Run from outside the repository: its modec/ would shadow the installed package (whose
# modec.runtime maps runtime/python).
cd /tmp
timeout "${GPU_CHECK_TIMEOUT:-480}" "$py" -u -m tools.gpu_check run --dir "$dir" --out "$out"
