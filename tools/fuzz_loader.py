"""Fuzz the artifact loader's validation code (runtime/fuzz/) with libFuzzer.

    python -m tools.fuzz_loader --seconds 60            # build, seed, fuzz each target 60 s
    python -m tools.fuzz_loader --replay                # only replay the regression seeds
    python -m tools.fuzz_loader --artifact out/ --seconds 300 --targets manifest

Builds each target of runtime/fuzz/ with clang (``-fsanitize=fuzzer,address,undefined``, UB
aborts) from the TVM-free sources only (runtime/src/json.cc, artifact_check.cc), writes a
seed corpus made from a real artifact (its ``manifest.json``, its safetensors header, a small
valid safetensors file repacked from its smallest params, its ``model.so`` cut after the program
headers and after 4 KiB) plus hand-made edge cases, replays runtime/fuzz/corpus/, then
runs each target for ``--seconds`` in one process on one core (libFuzzer's default
in-process mode; ``-jobs``/``-workers`` would fork children that log to files). Prints the
executions, the corpus growth and every finding; exits 1 on a finding (the crashing input is
under ``WORK/crashes/``: fix the bug, then copy the input into runtime/fuzz/corpus/TARGET/ as
a regression seed), 2 when clang with libFuzzer is missing.

Without ``--artifact`` the tiny test decoder is compiled into ``WORK/artifact`` (needs TVM).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "runtime" / "fuzz"
SRC = ROOT / "runtime" / "src"
#: target name -> libFuzzer dictionary (in runtime/fuzz/)
TARGETS = {"json": "json.dict", "manifest": "manifest.dict", "safetensors_header": "manifest.dict",
           "library": "library.dict"}  # fmt: skip
#: the sources every target links: the TVM-free loader code only
SOURCES = ("json.cc", "artifact_check.cc")
FLAGS = ("-std=c++17", "-g", "-O1", "-fno-omit-frame-pointer",
         "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all")  # fmt: skip
CLANGS = ("clang++", "clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++-15",
          "clang++-14")  # fmt: skip


class FuzzSetupError(RuntimeError):
    """No clang, or clang without libFuzzer."""


def find_clang() -> str | None:
    """The first clang++ on PATH (plain name first, then versioned ones), or None."""
    for name in CLANGS:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def has_libfuzzer(clang: str, work: Path) -> bool:
    """Whether ``clang`` links a trivial libFuzzer target with the sanitizers."""
    work.mkdir(parents=True, exist_ok=True)
    src = work / "probe.cc"
    src.write_text(
        "#include <cstddef>\n#include <cstdint>\n"
        'extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n'
    )
    res = subprocess.run([clang, *FLAGS, str(src), "-o", str(work / "probe")],
                         capture_output=True, text=True)  # fmt: skip
    return res.returncode == 0


def build_targets(work: Path, clang: str | None = None) -> dict[str, Path]:
    """Compile every target into ``WORK/bin``; name -> executable.

    Raises:
        FuzzSetupError: no clang++ or no libFuzzer.
        subprocess.CalledProcessError: a compile error (stderr holds clang's message).
    """
    clang = clang or find_clang()
    if clang is None:
        raise FuzzSetupError("no clang++ on PATH (apt-get install clang)")
    bindir = work / "bin"
    if not has_libfuzzer(clang, bindir):
        raise FuzzSetupError(f"{clang} cannot link -fsanitize=fuzzer (libclang-rt-dev missing?)")
    out = {}
    for name in TARGETS:
        exe = bindir / f"fuzz_{name}"
        sources = [str(FUZZ / f"fuzz_{name}.cc"), *(str(SRC / s) for s in SOURCES)]
        cmd = [clang, *FLAGS, "-I", str(ROOT / "runtime" / "include"), "-I", str(SRC),
               *sources, "-o", str(exe)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[name] = exe
    return out


# ---- seed corpus ---------------------------------------------------------------------------


def _safetensors(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _small_valid(manifest: dict[str, Any], weights: bytes) -> tuple[list[Any], bytes]:
    """The artifact's params of at most 1 KiB repacked into a small valid safetensors file
    (real names, dtypes, shapes and bytes; offsets recomputed), with their params list."""
    (n,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + n])
    params, new_header, body = [], {}, b""
    for p in manifest["params"]:
        t = header[p["name"]]
        b, e = t["data_offsets"]
        if e - b > 1024:
            continue
        chunk = weights[8 + n + b : 8 + n + e]
        new_header[p["name"]] = dict(t, data_offsets=[len(body), len(body) + len(chunk)])
        body += chunk
        params.append(p)
    return params, _safetensors(new_header, body)


def _json_edge_cases() -> dict[str, bytes]:
    return {
        "empty": b"",
        "object": b"{}",
        "array": b"[]",
        "nested_64": b"[" * 64 + b"]" * 64,
        "nested_66": b"[" * 66 + b"]" * 66,
        "numbers": b"[0, -0, 1.5, -1e999, 1e400, 9223372036854775807, -9223372036854775808, "
        b"123456789012345678, 12345678901234567890, 1E+2, -]",
        "escapes": b'["\\u00e9\\uD83D\\uDE00\\n\\t\\"\\\\\\/", "\\u12", "\\x", "a\\u-001"]',
        "control": b'["a\x01b"]',
        "trailing_comma": b'{"a": 1,}',
        "duplicate_keys": b'{"a": 1, "a": [true, false, null]}',
        "literals": b"[tru, nul, fals]",
        "high_bytes": b'{"\xff\xfe": "\xc3\xa9"}',
    }


def _manifest_edge_cases(manifest: dict[str, Any]) -> dict[str, bytes]:
    def edit(**change: Any) -> bytes:
        m = json.loads(json.dumps(manifest))
        for key, value in change.items():
            if value is None:
                m.pop(key, None)
            else:
                m[key] = value
        return json.dumps(m).encode()

    spec = manifest["params"][0]
    files = manifest["files"]
    cases = {f"no_{k}": edit(**{k: None}) for k in manifest}
    cases.update(
        {
            "schema_2": edit(schema="modec.artifact/2"),
            "schema_int": edit(schema=1),
            "target_cuda": edit(target={"kind": "cuda", "device": "cuda", "arch": "sm_90"}),
            "target_no_machine": edit(target={"kind": "llvm", "device": "cpu"}),
            "target_machine_int": edit(target={"device": "cpu", "machine": 7}),
            "param_symbolic": edit(params=[dict(spec, shape=["V", 64])]),
            "param_negative": edit(params=[dict(spec, shape=[-1])]),
            "param_huge": edit(params=[dict(spec, shape=[2147483648, 2147483648])]),
            "param_19_digits": edit(params=[dict(spec, shape=[4611686018427387904, 4])]),
            "param_dtype": edit(params=[dict(spec, dtype="bfloat16")]),
            "param_float_dim": edit(params=[dict(spec, shape=[1.5])]),
            "input_no_name": edit(inputs=[{"dtype": "int64", "shape": ["B"]}]),
            "files_dotdot": edit(files={**files, "../x": files["model.so"]}),
            "files_nul": edit(files={**files, "a\u0000b": files["model.so"]}),
            "files_empty_name": edit(files={**files, "": files["model.so"]}),
            "files_hidden": edit(files={**files, ".x": files["model.so"]}),
            "files_bytes_str": edit(files={**files, "model.so": {"sha256": "x", "bytes": "1"}}),
            "entry_list": edit(entry=["main"]),
            "not_object": b"[]",
        }
    )
    return cases


def _safetensors_edge_cases(manifest: dict[str, Any], weights: bytes) -> dict[str, bytes]:
    def case(params: list[Any], file: bytes) -> bytes:
        return json.dumps(params).encode() + b"\0" + file

    f32 = {"name": "w", "dtype": "float32", "shape": [2, 3]}
    ok_header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    (n,) = struct.unpack("<Q", weights[:8])
    small_params, small = _small_valid(manifest, weights)

    def _big(shape: list[int]) -> bytes:
        header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
        return case([dict(f32, shape=shape)], _safetensors(header, b""))

    def hdr(**t: Any) -> bytes:
        return _safetensors({"w": dict(ok_header["w"], **t)}, bytes(24))

    return {
        # the real header with its params, without the data (offsets out of range)...
        "real_header": case(manifest["params"], weights[: 8 + n]),
        # ... and a small valid file made of the artifact's small params
        "real_small_valid": case(small_params, small),
        "valid": case([f32], _safetensors(ok_header, bytes(24))),
        "valid_metadata": case(
            [f32], _safetensors({"__metadata__": {"a": "b"}, **ok_header}, bytes(24))
        ),
        "empty_params": case([], _safetensors({}, b"")),
        "zero_size": case(
            [dict(f32, shape=[0, 3])],
            _safetensors({"w": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}, b""),
        ),
        "too_short": case([f32], b"\x01\x00"),
        "header_length_huge": case([f32], struct.pack("<Q", 1 << 40) + b"{}"),
        "header_length_max": case([f32], b"\xff" * 8 + b"{}"),
        "header_not_json": case([f32], struct.pack("<Q", 3) + b"{x}"),
        "header_array": case([f32], struct.pack("<Q", 2) + b"[]"),
        "missing_tensor": case([dict(f32, name="v")], _safetensors(ok_header, bytes(24))),
        "dtype_differs": case([dict(f32, dtype="int32")], _safetensors(ok_header, bytes(24))),
        "shape_differs": case([f32], hdr(shape=[3, 2])),
        "offsets_negative": case([f32], hdr(data_offsets=[-24, 0])),
        "offsets_reversed": case([f32], hdr(data_offsets=[24, 0])),
        "offsets_past_end": case([f32], hdr(data_offsets=[0, 48])),
        "offsets_arity": case([f32], hdr(data_offsets=[0])),
        "offsets_float": case([f32], hdr(data_offsets=[0, 24.0])),
        # 2^31 * 2^31 float32 = 2^64 bytes: the size wraps to 0 in size_t and matched [0, 0]
        "shape_bytes_wrap": _big([2147483648, 2147483648]),
        "shape_numel_overflow": _big([100000000000000000, 1000]),
    }


def _elf(segments: list[tuple[int, int]], size: int, shoff: int = 0, shnum: int = 0) -> bytes:
    """A minimal ELF64 little-endian shared object header: one PT_LOAD per (offset, filesz),
    program headers right after the ELF header, zero-padded to ``size`` bytes."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, shoff, 0, 64, 56,
                               len(segments), 64, shnum, 0)  # fmt: skip
    phdrs = b"".join(struct.pack("<IIQQQQQQ", 1, 5, off, off, off, filesz, filesz, 4096)
                     for off, filesz in segments)  # fmt: skip
    data = head + phdrs
    return data + bytes(max(0, size - len(data)))


def _library_edge_cases(library: bytes) -> dict[str, bytes]:
    return {
        # the real model.so cut after its program headers and after 4 KiB (both truncated)
        "real_head": library[: 64 + 56 * struct.unpack_from("<H", library, 56)[0]],
        "real_4k": library[:4096],
        "valid_one_segment": _elf([(0, 120)], 120),
        "valid_sections": _elf([(0, 120)], 256, shoff=128, shnum=2),
        "segment_past_end": _elf([(0, 4096)], 200),
        "segment_offset_overflow": _elf([(2**64 - 8, 16)], 200),
        "sections_past_end": _elf([(0, 120)], 200, shoff=128, shnum=4),
        "phdrs_past_end": _elf([(0, 120)] * 3, 120)[:150],
        "elf32": b"\x7fELF\x01\x01" + bytes(58),
        "not_elf": b"\x7fELF" + bytes(60),
        "short": b"\x7fEL",
    }


def make_seed_corpus(artifact: Path, seeds: Path) -> dict[str, int]:
    """Write ``SEEDS/TARGET/*`` from a real artifact plus edge cases; target -> seed count."""
    manifest_text = (artifact / "manifest.json").read_bytes()
    manifest = json.loads(manifest_text)
    weights = (artifact / "weights.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", weights[:8])
    corpora: dict[str, dict[str, bytes]] = {
        "json": {
            "manifest": manifest_text,
            "safetensors_header": weights[8 : 8 + n],
            **_json_edge_cases(),
        },
        "manifest": {"real": manifest_text, **_manifest_edge_cases(manifest)},
        "safetensors_header": _safetensors_edge_cases(manifest, weights),
        "library": _library_edge_cases((artifact / "model.so").read_bytes()),
    }
    counts = {}
    for target, cases in corpora.items():
        d = seeds / target
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name, data in cases.items():
            (d / name).write_bytes(data)
        counts[target] = len(cases)
    return counts


def tiny_artifact(work: Path) -> Path:
    """The tiny test decoder compiled into ``WORK/artifact`` (reused when present)."""
    out = work / "artifact"
    if not (out / "manifest.json").exists():
        from modec.lowering.build import build_artifact
        from modec.lowering.tiny_model import TinyConfig, build_tiny_decoder

        build_artifact(build_tiny_decoder(TinyConfig()), out)
    return out


# ---- running -------------------------------------------------------------------------------


@dataclass
class Result:
    """One libFuzzer run (fuzzing or replay)."""

    target: str
    mode: str  # "fuzz" or "replay"
    seconds: float
    execs: int = 0
    new_units: int = 0
    corpus: int = 0
    coverage: int = 0
    exec_per_s: int = 0
    peak_rss_mb: int = 0
    returncode: int = 0
    findings: list[str] = field(default_factory=list)
    report: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.findings


def _stat(log: str, name: str) -> int:
    m = re.search(rf"stat::{name}:\s*(\d+)", log)
    return int(m.group(1)) if m else 0


def _report(log: str) -> str:
    """The first sanitizer / libFuzzer / modec finding lines of a log."""
    keep = [line for line in log.splitlines()
            if re.search(r"ERROR: |runtime error:|modec fuzz finding|SUMMARY: |deadly signal|"
                         r"Test unit written|terminate called|what\(\):", line)]  # fmt: skip
    return "\n".join(keep[:12])


def run_target(
    name: str, exe: Path, corpus: Path, seed_dirs: list[Path], crashes: Path, seconds: int
) -> Result:
    """Fuzz ``exe`` for ``seconds`` (one process): new inputs go to ``corpus``, crashing ones
    to ``crashes/NAME-*``."""
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    cmd = [str(exe), f"-max_total_time={seconds}", "-print_final_stats=1", "-timeout=10",
           "-rss_limit_mb=2048", "-max_len=65536", f"-dict={FUZZ / TARGETS[name]}",
           f"-artifact_prefix={crashes}/{name}-", str(corpus),
           *(str(d) for d in seed_dirs if d.is_dir())]  # fmt: skip
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                         timeout=seconds + 300)  # fmt: skip
    log = res.stderr + res.stdout
    out = Result(name, "fuzz", round(time.monotonic() - t0, 1), returncode=res.returncode)
    out.execs = _stat(log, "number_of_executed_units")
    out.new_units = _stat(log, "new_units_added")
    out.exec_per_s = _stat(log, "average_exec_per_sec")
    out.peak_rss_mb = _stat(log, "peak_rss_mb")
    finals = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: \d+ corp: (\d+)/", log)
    if finals:
        out.coverage, out.corpus = int(finals[-1][0]), int(finals[-1][1])
    out.findings = sorted(str(p) for p in set(crashes.iterdir()) - before)
    if not out.ok:
        out.report = _report(log) or log[-4000:]
    return out


def replay(name: str, exe: Path, inputs: list[Path]) -> Result:
    """Run each input once (the regression seeds); a crash fails."""
    t0 = time.monotonic()
    if not inputs:
        return Result(name, "replay", 0.0)
    res = subprocess.run([str(exe), "-runs=1", *map(str, inputs)], capture_output=True,
                         text=True, errors="replace", timeout=300)  # fmt: skip
    out = Result(name, "replay", round(time.monotonic() - t0, 1), execs=len(inputs),
                 returncode=res.returncode)  # fmt: skip
    if res.returncode != 0:
        out.report = _report(res.stderr + res.stdout) or res.stderr[-4000:]
    return out


def regression_seeds(name: str) -> list[Path]:
    """The committed inputs of runtime/fuzz/corpus/NAME/ (former findings, edge cases)."""
    d = FUZZ / "corpus" / name
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    ap.add_argument("--artifact", type=Path, help="artifact for the seeds (default: tiny one)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "fuzz", help="work directory")
    ap.add_argument("--replay", action="store_true", help="only replay the regression seeds")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    work: Path = args.work
    try:
        exes = build_targets(work)
    except FuzzSetupError as exc:
        print(f"fuzz_loader: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"fuzz_loader: build failed:\n{exc.stderr}", file=sys.stderr)
        return 1
    results = []
    for name in names:
        results.append(replay(name, exes[name], regression_seeds(name)))
    if not args.replay:
        artifact = args.artifact or tiny_artifact(work)
        counts = make_seed_corpus(artifact, work / "seeds")
        print(f"seeds from {artifact}: {counts}")
        for name in names:
            results.append(
                run_target(
                    name,
                    exes[name],
                    work / "corpus" / name,
                    [work / "seeds" / name, FUZZ / "corpus" / name],
                    work / "crashes",
                    args.seconds,
                )
            )
    for r in results:
        status = "ok" if r.ok else "FINDING"
        line = f"{status:8s} {r.mode:6s} {r.target:20s} {r.seconds:7.1f}s "
        if r.mode == "replay":
            line += f"inputs={r.execs} (runtime/fuzz/corpus/{r.target}/)"
        else:
            line += (f"execs={r.execs} exec/s={r.exec_per_s} cov={r.coverage} corpus={r.corpus} "
                     f"new={r.new_units} rss={r.peak_rss_mb}MB")  # fmt: skip
        print(line)
        if not r.ok:
            print(f"  rc={r.returncode} inputs: {r.findings}\n  " + r.report.replace("\n", "\n  "))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=1")
    sys.exit(main())
