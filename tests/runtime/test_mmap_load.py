"""Both runtimes map ``weights.safetensors`` and run the params from the mapping (issue #15).

The artifact's weights file puts every tensor at a 64-byte aligned offset (padding tensors
``__pad.K``, `modec.safetensors_io.write_safetensors(align=64)`); the Python runtime and the
C API map it read-only and hand each param to the VM as a tensor pointing into the mapping.
Checked here, each load in a fresh process: the peak RSS growth during load stays far below
the weights' size (the old loaders peaked at twice that size), the params the kernels read
are file-backed pages of the mapping (/proc/self/smaps), outputs are identical to the copying
path (an artifact whose params are misaligned in the file, which both runtimes copy), the
mapping is read-only and released with the session, and a file replaced by name after load
does not change a running session.

Run as a script it prints the load figures of docs/artifact.md for any CPU artifact:

    python tests/runtime/test_mmap_load.py ARTIFACT [--lib build/runtime-test/libmodec_runtime.so]
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from modec.artifact import MANIFEST, WEIGHTS, sha256_file  # noqa: E402
from modec.safetensors_io import PAD_PREFIX, TensorEntry, write_safetensors  # noqa: E402
from tools.cxx import build_modec_run  # noqa: E402

BUILD = ROOT / "build" / "runtime-test"
MIB = 1 << 20

# ---- the child processes: one load (and one run) in a fresh process ------------------------

_COMMON = r"""
import json, os, sys, time
import numpy as np

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

def weights_mapping():
    # (permissions, Rss bytes) of the mapping of weights.safetensors, or None
    found, perms, rss = False, None, 0
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            found = line.rstrip().endswith("/weights.safetensors")
            if found:
                perms = line.split()[1]
        elif found and first == "Rss:":
            rss += int(line.split()[1]) * 1024
    return None if perms is None else [perms, rss]

def evict(art):
    # drop the artifact's pages from the page cache (a cold load)
    for name in os.listdir(art):
        fd = os.open(os.path.join(art, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

art, cold, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
"""

_PYTHON = (
    _COMMON
    + r"""
import tvm_ffi
import modec.runtime as rt
from modec.runtime._tvm import load_libraries
load_libraries("cpu")  # the TVM libraries are not what is measured
if cold:
    evict(art)
before = status()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak during load
t = time.perf_counter()
s = rt.load(art)
load_s = time.perf_counter() - t
loaded, mapped = status(), weights_mapping()
feeds = {sp.name: np.ones([d if isinstance(d, int) else 4 for d in sp.shape], sp.dtype)
         for sp in s.inputs}
res = s.run(feeds)
ran, mapped_ran = status(), weights_mapping()
np.savez(out, **res)
del s, res
import gc; gc.collect()
print(json.dumps({"load_s": load_s, "before": before, "loaded": loaded, "ran": ran,
                  "mapped": mapped, "mapped_ran": mapped_ran, "closed": weights_mapping()}))
"""
)

_CXX = (
    _COMMON
    + r"""
import ctypes
from tools.c_api import DTYPES as DT, Handle as P, Tensor as T, load
lib = load(sys.argv[4])
if cold:
    evict(art)
before = status()
open("/proc/self/clear_refs", "w").write("5")
s = P()
t = time.perf_counter()
st = lib.modec_open(art.encode(), b"cpu", ctypes.byref(s))
load_s = time.perf_counter() - t
assert st == 0, lib.modec_last_error()
loaded, mapped = status(), weights_mapping()
keep, ins = [], (T * lib.modec_num_inputs(s))()
for i in range(len(ins)):
    info = T()
    assert lib.modec_input_info(s, i, ctypes.byref(info)) == 0
    a = np.ones([d if d >= 0 else 4 for d in info.shape[:info.ndim]], DT[info.dtype])
    shape = (ctypes.c_int64 * a.ndim)(*a.shape)
    keep += [a, shape]
    ins[i] = T(info.name, info.dtype, a.ndim, shape, a.ctypes.data)
n = ctypes.c_size_t(lib.modec_num_outputs(s))
outs = (T * n.value)()
st = lib.modec_run(s, ins, len(ins), outs, ctypes.byref(n))
assert st == 0, lib.modec_last_error()
res = {}
for o in outs[: n.value]:
    shape = tuple(o.shape[: o.ndim])
    size = int(np.prod(shape)) * np.dtype(DT[o.dtype]).itemsize
    res[o.name.decode()] = np.frombuffer(ctypes.string_at(o.data, size), DT[o.dtype]).reshape(shape)
ran, mapped_ran = status(), weights_mapping()
np.savez(out, **res)
lib.modec_close(s)
print(json.dumps({"load_s": load_s, "before": before, "loaded": loaded, "ran": ran,
                  "mapped": mapped, "mapped_ran": mapped_ran, "closed": weights_mapping()}))
"""
)


def measure(
    runtime: str, art: Path, out: Path, *, cold: bool = False, lib: Path | None = None
) -> dict[str, Any]:
    """Load ``art`` in a fresh process with ``runtime`` ("python", or "cxx" through ``lib``),
    run it once on inputs of ones (symbolic dims 4) and save the outputs to ``out`` (.npz).

    Returns:
        ``load_s``; ``/proc/self/status`` figures (bytes) ``before`` the load, once
        ``loaded`` (its ``VmHWM`` is the peak during the load) and after the run (``ran``);
        ``[permissions, Rss]`` of the weights file's mapping after load (``mapped``), after
        the run (``mapped_ran``) and once the session is closed (``closed``: None when
        unmapped).
    """
    code = _PYTHON if runtime == "python" else _CXX
    args = [sys.executable, "-c", code, str(art), "1" if cold else "0", str(out)]
    if runtime == "cxx":
        args.append(str(lib))
    res = subprocess.run(args, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout.splitlines()[-1])
    return result


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# ---- artifacts -----------------------------------------------------------------------------


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _misaligned_params(art: Path) -> int:
    base, header = _header(art / WEIGHTS)
    params = json.loads((art / MANIFEST).read_text())["params"]
    return sum((base + header[p["name"]]["data_offsets"][0]) % 64 != 0 for p in params)


def unaligned_copy(src: Path, dst: Path) -> Path:
    """``src`` with its weights rewritten in the reference safetensors layout (what artifacts
    held before the aligned layout), the header grown by metadata until the data starts
    off a 64-byte boundary, so that every param is misaligned; the manifest's checksum is
    updated."""
    from safetensors import safe_open

    shutil.copytree(src, dst)
    with safe_open(str(src / WEIGHTS), "np") as f:
        names = [k for k in f.keys() if not k.startswith(PAD_PREFIX)]  # noqa: SIM118
        arrays = {k: f.get_tensor(k) for k in names}
    for pad in range(8):
        meta = {"pad": "x" * pad} if pad else None
        write_safetensors(dst / WEIGHTS, [TensorEntry.of(k, a) for k, a in arrays.items()], meta)
        if _header(dst / WEIGHTS)[0] % 64:
            break
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = {"sha256": sha256_file(dst / WEIGHTS),
                                  "bytes": (dst / WEIGHTS).stat().st_size}  # fmt: skip
    (dst / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return dst


@pytest.fixture(scope="module")
def big_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny decoder with 157 MB of dense weights (vocabulary 16000, width 1024)."""
    from modec.lowering.build import build_artifact
    from modec.lowering.tiny_model import TinyConfig, build_tiny_decoder

    out = tmp_path_factory.mktemp("big") / "art"
    cfg = TinyConfig(vocab=16000, dim=1024, heads=16, ffn=1024, layers=1)
    build_artifact(build_tiny_decoder(cfg), out)
    return out


@pytest.fixture(scope="module")
def libmodec() -> Path:
    try:
        app = build_modec_run(BUILD)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"runtime build failed:\n{e.stdout}\n{e.stderr}")
    if app is None:
        pytest.skip("cmake or g++ not installed")
    return app.parent / "libmodec_runtime.so"


RUNTIMES = ["python", pytest.param("cxx", marks=pytest.mark.cxx)]


def _lib(request: pytest.FixtureRequest, runtime: str) -> Path | None:
    return request.getfixturevalue("libmodec") if runtime == "cxx" else None


# ---- the aligned layout --------------------------------------------------------------------


def test_aligned_layout_is_valid_safetensors(tmp_path: Path) -> None:
    """align=64: every tensor starts at a multiple of 64 in the file, the offsets stay
    contiguous (padding tensors fill the gaps), and `safetensors` reads the tensors back;
    the default layout has no padding (tests/test_safetensors_io.py checks it byte for byte
    against the reference writer)."""
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "a": rng.normal(size=(3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.uint8),
        "c": np.ones((2, 3), np.float16), "empty": np.zeros((0, 4), np.float32),
        "z": np.arange(3, dtype=np.int64), "flag": np.array([True, False]),
    }  # fmt: skip
    entries = [TensorEntry.of(k, a) for k, a in arrays.items()]
    for meta in (None, {"k": "v" * 13}):
        path = tmp_path / "aligned.safetensors"
        write_safetensors(path, entries, metadata=meta, align=64)
        base, header = _header(path)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        assert base % 64 == 0
        spans = sorted(v["data_offsets"] for v in tensors.values())
        assert spans[0][0] == 0 and path.stat().st_size == base + spans[-1][1]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        pads = sorted(k for k in tensors if k.startswith(PAD_PREFIX))
        assert all((base + tensors[k]["data_offsets"][0]) % 64 == 0 for k in arrays)
        assert pads and set(tensors) == set(arrays) | set(pads)
        with safe_open(str(path), "np") as f:
            for k, a in arrays.items():
                np.testing.assert_array_equal(f.get_tensor(k), a)
            for k in pads:
                got = f.get_tensor(k)
                assert got.dtype == np.uint8 and 0 < got.size < 64 and not got.any()
            assert (f.metadata() or None) == meta
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, entries)
    assert not any(k.startswith(PAD_PREFIX) for k in _header(plain)[1])


def test_aligned_layout_refusals(tmp_path: Path) -> None:
    from modec.errors import ModelError

    a = np.zeros(3, np.float32)
    with pytest.raises(ModelError, match="reserved"):
        write_safetensors(tmp_path / "x", [TensorEntry.of(f"{PAD_PREFIX}0", a)], align=64)
    with pytest.raises(ModelError, match="power of two"):
        write_safetensors(tmp_path / "x", [TensorEntry.of("a", a)], align=48)


def test_artifact_weights_are_aligned(tiny_artifact: Path, big_artifact: Path) -> None:
    for art in (tiny_artifact, big_artifact):
        base, header = _header(art / WEIGHTS)
        assert all((base + v["data_offsets"][0]) % 64 == 0 for v in header.values())
        assert _misaligned_params(art) == 0


# ---- loading through the mapping -----------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_load_maps_the_weights(
    request: pytest.FixtureRequest, big_artifact: Path, tmp_path: Path, runtime: str
) -> None:
    """The peak RSS growth during load is far below the weights' size (it was twice that),
    the weights file is mapped read-only, the kernels read the params from it
    (its resident pages grow with the run while the anonymous memory does not), outputs
    equal those of the copying path, and closing the session unmaps the file."""
    if not _clear_refs_works():
        pytest.skip("/proc/self/clear_refs cannot reset the peak RSS here")
    lib = _lib(request, runtime)
    size = (big_artifact / WEIGHTS).stat().st_size
    assert size > 100 * MIB
    m = measure(runtime, big_artifact, tmp_path / "mapped.npz", lib=lib)
    before, loaded, ran = m["before"], m["loaded"], m["ran"]
    assert loaded["VmHWM"] - before["VmRSS"] < size // 8, m
    assert loaded["VmRSS"] - before["VmRSS"] < size // 8, m
    assert m["mapped"] is not None and m["mapped"][0].startswith("r--"), m  # read-only
    assert m["mapped_ran"][1] > size // 4, m  # the params came in through the mapping
    assert ran["RssAnon"] - before["RssAnon"] < size // 8, m
    assert m["closed"] is None, m
    # The copying path: every param misaligned in the file, so both runtimes copy each.
    copied = unaligned_copy(big_artifact, tmp_path / "unaligned")
    assert _misaligned_params(copied) == len(json.loads((copied / MANIFEST).read_text())["params"])
    c = measure(runtime, copied, tmp_path / "copied.npz", lib=lib)
    assert c["loaded"]["RssAnon"] - c["before"]["RssAnon"] > size * 3 // 4, c  # the copies
    got, want = np.load(tmp_path / "mapped.npz"), np.load(tmp_path / "copied.npz")
    assert sorted(got) == sorted(want) == ["logits"]
    np.testing.assert_array_equal(got["logits"], want["logits"])


def test_python_copies_only_misaligned_params(
    tiny_artifact: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An artifact written before the aligned layout still loads: its misaligned params are
    copied (with a warning), the outputs are the mapped artifact's."""
    import modec.runtime as rt

    from modec.lowering.tiny_model import TinyConfig, tiny_inputs

    inp = tiny_inputs(TinyConfig(), 2, 9)
    mapped = rt.load(tiny_artifact)
    assert mapped.copied_params == 0
    old = unaligned_copy(tiny_artifact, tmp_path / "old")
    with caplog.at_level("WARNING", logger="modec.runtime"):
        sess = rt.load(old)
    n = len(sess.manifest.params)
    assert sess.copied_params == _misaligned_params(old) == n
    assert f"{n} of {n} params are not 64-byte aligned" in caplog.text
    np.testing.assert_array_equal(sess.run(inp)["logits"], mapped.run(inp)["logits"])


@pytest.mark.cxx
def test_cxx_checksum_with_both_sha256_implementations(
    libmodec: Path, artifact_copy: Path, tmp_path: Path
) -> None:
    """The C++ runtime hashes with the x86 SHA extensions where the CPU has them and with the
    portable code otherwise (MODEC_SHA256_PORTABLE=1 forces it): both accept the artifact
    (their digests equal hashlib's, which wrote the manifest) and refuse a flipped byte."""
    from modec.lowering.tiny_model import TinyConfig, tiny_inputs

    app = libmodec.parent / "modec_run"
    args = []
    for k, v in tiny_inputs(TinyConfig(), 1, 4).items():
        np.save(tmp_path / f"{k}.npy", v)
        args.append(f"{k}={tmp_path / (k + '.npy')}")

    def run(portable: bool) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MODEC_SHA256_PORTABLE"}
        if portable:
            env["MODEC_SHA256_PORTABLE"] = "1"
        cmd = [str(app), str(artifact_copy), *args, "--out", str(tmp_path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    for portable in (False, True):
        res = run(portable)
        assert res.returncode == 0, (portable, res.stderr)
    data = bytearray((artifact_copy / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (artifact_copy / WEIGHTS).write_bytes(bytes(data))
    for portable in (False, True):
        res = run(portable)
        assert res.returncode == 4 and "SHA-256" in res.stderr, (portable, res.stderr)


# ---- the figures of docs/artifact.md -------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="load time and RSS of an artifact, both runtimes")
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--lib", type=Path, default=BUILD / "libmodec_runtime.so",
                    help="the C++ runtime library (default: %(default)s)")  # fmt: skip
    ap.add_argument("--runs", type=int, default=3, help="loads per runtime and cache state")
    ap.add_argument("--runtimes", default="python,cxx")
    args = ap.parse_args(argv)  # fmt: skip
    size = (args.artifact / WEIGHTS).stat().st_size
    print(f"{args.artifact}: weights {size / MIB:.0f} MiB, "
          f"{_misaligned_params(args.artifact)} misaligned params")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in args.runtimes.split(","):
            for cold in (False, True):
                for _ in range(args.runs):
                    m = measure(runtime, args.artifact, Path(tmp) / "out.npz", cold=cold,
                                lib=args.lib)  # fmt: skip
                    b, lo, r = m["before"], m["loaded"], m["ran"]
                    print(f"{runtime:6} {'cold' if cold else 'warm'}  load {m['load_s']:6.2f} s"
                          f"  RSS before {b['VmRSS'] / MIB:5.0f}  after load "
                          f"{lo['VmRSS'] / MIB:5.0f}  peak during load {lo['VmHWM'] / MIB:5.0f}"
                          f" (+{(lo['VmHWM'] - b['VmRSS']) / MIB:.0f})  after 1st run "
                          f"{r['VmRSS'] / MIB:5.0f} (anon {r['RssAnon'] / MIB:.0f}, file "
                          f"{r['RssFile'] / MIB:.0f}) MiB", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
