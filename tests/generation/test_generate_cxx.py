"""Generation in the C/C++ runtime (docs/generation.md, "C API") against the Python runtime.

The cached digits-vlm artifact (`cached_vlm`) generates through `examples/modec_run
--generate` (the C++ wrapper over `modec_generate`) and through `modec.runtime`'s
`Session.generate`: the tokens must be identical, greedy and sampled, for prompts of 1 and 4
left-padded rows of the bundled eval set. The greedy tokens must also equal a recomputation
of the whole sequence at every step (the model run without a KV cache), so that the two
runtimes agreeing does not hide a cache both get wrong. `runtime/tests/c_api_test.c
--generate` checks the C API itself (the low-level loop, the callback, stop tokens, bad
settings and prompts).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import modec.runtime as rt
import numpy as np
import pytest

from modec import data
from modec.artifact import MANIFEST, read_manifest
from modec.errors import BadInputError
from modec.lowering.tiny_model import TinyConfig, tiny_inputs
from tools.cxx import build_c_api_test

pytestmark = pytest.mark.cxx
ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "runtime-test"
N = 16


@pytest.fixture(scope="module")
def cxx() -> dict[str, Path]:
    """The runtime build: ``modec_run`` and ``c_api_test``."""
    try:
        exe = build_c_api_test(BUILD)
    except subprocess.CalledProcessError as e:  # show the compiler's message, not just the rc
        pytest.fail(f"runtime build failed:\n{e.stdout}\n{e.stderr}")
    if exe is None:
        pytest.skip("cmake, g++ or a C compiler not installed")
    return {"modec_run": BUILD / "modec_run", "c_api_test": exe}


@pytest.fixture(scope="module")
def session(cached_vlm: dict[str, Path]) -> rt.Session:
    return rt.load(cached_vlm["out"])


def _prompt(eval_path: Path, rows: list[int]) -> dict[str, np.ndarray]:
    """Rows of the eval set: left-padded, the leading all-padding columns trimmed."""
    ds = data.load(eval_path)
    _, feeds = next(ds.subset(np.array(rows)).batches(len(rows)))
    return feeds


@pytest.fixture(scope="module")
def prompts(cached_vlm: dict[str, Path]) -> dict[int, dict[str, np.ndarray]]:
    """Batch 1 (one image row) and batch 4 (rows of different lengths)."""
    four = _prompt(cached_vlm["eval"], [0, 1, 2, 3])
    assert (four["attention_mask"][:, 0] == 0).any() and (four["attention_mask"][:, 0] == 1).any()
    return {1: _prompt(cached_vlm["eval"], [5]), 4: four}


def _save(tmp: Path, feeds: dict[str, np.ndarray]) -> list[str]:
    args = []
    for k, v in feeds.items():
        np.save(tmp / f"{k}.npy", v)
        args.append(f"{k}={tmp / (k + '.npy')}")
    return args


def _cli(app: Path, artifact: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(app), str(artifact), *map(str, args)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _options(n: int, opts: dict[str, Any]) -> list[str]:
    out = ["--generate", str(n)]
    for k, v in opts.items():
        for x in v if k == "stop" else [v]:
            out += ["--" + k.replace("_", "-"), repr(x) if isinstance(x, float) else str(x)]
    return out


def _generate_cxx(app: Path, artifact: Path, tmp: Path, feeds: dict[str, np.ndarray], n: int,
                  **opts: Any) -> tuple[list[list[int]], list[list[int | None]], str]:  # fmt: skip
    """modec_run --generate: each row's tokens, the streamed steps (None: a finished row)."""
    res = _cli(app, artifact, *_options(n, opts), *_save(tmp, feeds))
    assert res.returncode == 0, res.stderr
    rows: list[list[int]] = []
    steps: list[list[int | None]] = []
    for line in res.stdout.splitlines():
        head, _, rest = line.partition(":")
        if head.startswith("tokens["):
            assert int(head[7:-1]) == len(rows)
            rows.append([int(t) for t in rest.split()])
        elif head.startswith("step "):
            assert int(head[5:]) == len(steps)
            steps.append([None if t == "." else int(t) for t in rest.split()])
    return rows, steps, res.stdout


def _streamed(steps: list[list[int | None]], batch: int) -> list[list[int]]:
    return [[t for s in steps if (t := s[b]) is not None] for b in range(batch)]


def _recomputed(session: rt.Session, feeds: dict[str, np.ndarray], n: int) -> list[list[int]]:
    """Greedy tokens with the whole sequence run through ``main`` at every step (an empty
    cache each time): the numpy reference of the loop without a KV cache."""
    gen = session.manifest.sections["generation"]
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    batch = ids.shape[0]
    picked = []
    for _ in range(n):
        inp = {**feeds, "input_ids": ids, "attention_mask": mask}
        for c in gen["cache"]:
            inp[c["past"]] = np.zeros((batch, c["heads"], 0, c["head_dim"]), np.float32)
        tok = session.run(inp)["logits"][:, -1].argmax(-1)
        picked.append(tok)
        ids = np.concatenate([ids, tok[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)
    out: list[list[int]] = np.stack(picked, axis=1).tolist()
    return out


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_matches_python_and_a_recomputation(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], session: rt.Session,
    prompts: dict[int, dict[str, np.ndarray]], tmp_path: Path, batch: int,
) -> None:  # fmt: skip
    feeds = prompts[batch]
    rows, steps, out = _generate_cxx(cxx["modec_run"], cached_vlm["out"], tmp_path, feeds, N)
    assert rows == session.generate(feeds, max_new_tokens=N).tokens
    assert rows == _recomputed(session, feeds, N)
    assert [len(r) for r in rows] == [N] * batch
    assert len(steps) == N and _streamed(steps, batch) == rows
    assert f"generated {N * batch} tokens in {batch} rows" in out.splitlines()[-1]
    assert "tokens/s" in out.splitlines()[-1]


def test_the_benchmark_loads_the_c_api_in_process(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], session: rt.Session,
    prompts: dict[int, dict[str, np.ndarray]],
) -> None:  # fmt: skip
    """`tools.bench_decode.CxxDecoder` (the C API through ctypes, in this process beside the
    Python runtime): the same greedy tokens as `Session.generate`, and both phases timed."""
    from tools.bench_decode import CxxDecoder

    dec = CxxDecoder(BUILD / "libmodec_runtime.so", cached_vlm["out"])
    try:
        for batch in (1, 4):
            prefill, decode, rows = dec(prompts[batch], N)
            assert rows == session.generate(prompts[batch], max_new_tokens=N).tokens
            assert [len(r) for r in rows] == [N] * batch
            assert prefill > 0 and decode > 0
    finally:
        dec.close()


SAMPLED = [
    {"temperature": 0.8, "top_k": 10, "top_p": 0.9, "seed": 7},
    {"temperature": 1.5, "seed": 3},
    {"temperature": 1.0, "top_p": 0.5, "seed": 2**64 - 1},
    {"temperature": 2.0, "top_k": 5, "seed": 123456789},
    {"temperature": 3.0, "top_k": 40, "top_p": 0.97, "seed": 0},
]


@pytest.mark.parametrize("batch", [1, 4])
def test_sampling_matches_python(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], session: rt.Session,
    prompts: dict[int, dict[str, np.ndarray]], tmp_path: Path, batch: int,
) -> None:  # fmt: skip
    """Seeded sampling (SplitMix64, top-k, top-p in float64) picks the same tokens; the
    settings do sample (the tokens differ from greedy and between seeds)."""
    feeds = prompts[batch]
    greedy = session.generate(feeds, max_new_tokens=N).tokens
    seen = []
    for opts in SAMPLED:
        rows, steps, _ = _generate_cxx(cxx["modec_run"], cached_vlm["out"], tmp_path, feeds, N,
                                       **opts)  # fmt: skip
        assert rows == session.generate(feeds, max_new_tokens=N, **opts).tokens, opts
        assert _streamed(steps, batch) == rows
        seen.append(rows)
    assert any(rows != greedy for rows in seen)
    assert len({json.dumps(rows) for rows in seen}) > len(SAMPLED) // 2


def test_stop_tokens(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], session: rt.Session,
    prompts: dict[int, dict[str, np.ndarray]], tmp_path: Path,
) -> None:  # fmt: skip
    """A row ends at its first stop token, kept as its last; the other rows go on (streamed
    as "." once finished)."""
    feeds = prompts[4]
    greedy = session.generate(feeds, max_new_tokens=N).tokens
    # A token that one row picks midway and that some row never picks.
    stop = next(t for r in greedy for t in r[2 : N - 2] if any(t not in o for o in greedy))
    rows, steps, _ = _generate_cxx(cxx["modec_run"], cached_vlm["out"], tmp_path, feeds, N,
                                   stop=[stop, 10**6])  # fmt: skip
    assert rows == session.generate(feeds, max_new_tokens=N, stop=[stop, 10**6]).tokens
    for row, full in zip(rows, greedy, strict=True):
        if stop in full:
            assert row == full[: full.index(stop) + 1]
        else:
            assert row == full
    assert any(len(r) < N for r in rows) and any(len(r) == N for r in rows)
    assert _streamed(steps, 4) == rows and len(steps) == N


def test_max_new_tokens_zero(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], session: rt.Session,
    prompts: dict[int, dict[str, np.ndarray]], tmp_path: Path,
) -> None:  # fmt: skip
    rows, steps, out = _generate_cxx(cxx["modec_run"], cached_vlm["out"], tmp_path, prompts[4], 0)
    assert rows == [[]] * 4 == session.generate(prompts[4], max_new_tokens=0).tokens
    assert steps == [] and "generated 0 tokens in 4 rows" in out


def test_c_api_generation(cxx: dict[str, Path], cached_vlm: dict[str, Path]) -> None:
    """runtime/tests/c_api_test.c --generate: modec_generate against the prefill / pick /
    decode-step loop, the callback stopping early, stop tokens, max_new_tokens 0, bad settings
    and prompts, modec_run with an empty cache."""
    res = subprocess.run([str(cxx["c_api_test"]), str(cached_vlm["out"]), "--generate"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1].endswith(" passed, 0 failed") and "FAIL" not in res.stdout
    for line in (
        "ok   modec_generate(greedy) == the low-level loop; the callback streamed every token\n",
        "ok   modec_generate(sampled) == the low-level loop with modec_pick_tokens\n",
        "ok   the callback's non-zero return stops the generation after its step\n",
        "ok   a stop token ends its row and is kept as its last token\n",
        "ok   max_new_tokens 0: no token, no callback\n",
        "ok   modec_run(P = 0 cache): its last position's logits are the prefill's\n",
        "ok   modec_decode_step(3 tokens for 2 rows): MODEC_ERR_INVALID_ARGUMENT",
        "ok   modec_prefill(the cache given): MODEC_ERR_INPUT: input 'past_key_values.0.key' is "
        "the KV cache",
        "ok   modec_generate(max_new_tokens -1): MODEC_ERR_INVALID_ARGUMENT",
        "ok   sampling: SplitMix64 seed 0 draws u = 0.883 (docs/generation.md)\n",
        "ok   sampling: one draw per unfinished row, finished rows untouched\n",
    ):
        assert line in res.stdout, line


def test_decode_entry_main(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], session: rt.Session,
    prompts: dict[int, dict[str, np.ndarray]], tmp_path: Path,
) -> None:  # fmt: skip
    """`decode.entry` "main": each step calls main with the prompt's pixel_values again; the
    same tokens as the decode entry, in both runtimes."""
    art = tmp_path / "main-entry"
    shutil.copytree(cached_vlm["out"], art)
    m = json.loads((art / MANIFEST).read_text())
    m["sections"]["generation"]["decode"] = {"entry": "main", "inputs": m["inputs"],
                                             "reason": "test"}  # fmt: skip
    (art / MANIFEST).write_text(json.dumps(m))
    feeds = prompts[4]
    opts = SAMPLED[0]
    rows, _, _ = _generate_cxx(cxx["modec_run"], art, tmp_path, feeds, N, **opts)
    assert rows == rt.load(art).generate(feeds, max_new_tokens=N, **opts).tokens
    assert rows == session.generate(feeds, max_new_tokens=N, **opts).tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact without a KV cache (the tiny decoder)."""
    from modec.lowering.build import build_artifact
    from modec.lowering.tiny_model import build_tiny_decoder

    out = tmp_path_factory.mktemp("tiny") / "art"
    build_artifact(build_tiny_decoder(TinyConfig()), out)
    return out


def test_artifact_without_a_cache_refuses(cxx: dict[str, Path], tiny: Path, tmp_path: Path) -> None:
    args = _save(tmp_path, tiny_inputs(TinyConfig(), 2, 3))
    res = _cli(cxx["modec_run"], tiny, "--generate", 4, *args)
    assert res.returncode == 1, res.stderr  # MODEC_ERR_INVALID_ARGUMENT
    assert res.stderr.splitlines() == [
        "modec_run: MODEC_ERR_INVALID_ARGUMENT: the artifact has no KV cache: export the model "
        "with past_key_values inputs"
    ]
    assert _cli(cxx["modec_run"], tiny, *args, "--out", tmp_path).returncode == 0  # it still runs
    res = subprocess.run([str(cxx["c_api_test"]), str(tiny)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout
    assert "ok   modec_generate(no KV cache): MODEC_ERR_INVALID_ARGUMENT: the artifact has no KV " \
           "cache" in res.stdout  # fmt: skip
    assert "ok   modec_prefill(no KV cache): MODEC_ERR_INVALID_ARGUMENT" in res.stdout


def _with_cache(session: rt.Session, feeds: dict[str, np.ndarray], past: int = 0,
                **dims: int) -> dict[str, np.ndarray]:  # fmt: skip
    """The prompt plus a cache of ``past`` positions (zeros); ``dims`` overrides a cache dim
    ("d1": 0 ...)."""
    batch = feeds["input_ids"].shape[0]
    out = dict(feeds)
    for c in session.manifest.sections["generation"]["cache"]:
        shape = [batch, c["heads"], past, c["head_dim"]]
        for k, v in dims.items():
            shape[int(k[1:])] = v
        out[c["past"]] = np.zeros(shape, np.float32)
    return out


def test_empty_cache_is_the_only_empty_input(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], session: rt.Session,
    prompts: dict[int, dict[str, np.ndarray]], tmp_path: Path,
) -> None:  # fmt: skip
    """modec_run accepts a cache of P = 0 (dim 2 of past_key_values.*), equal to the Python
    runtime's run; a 0 in any other dim, of the cache or not, is still refused."""
    feeds = _with_cache(session, prompts[4])
    res = _cli(cxx["modec_run"], cached_vlm["out"], *_save(tmp_path, feeds), "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    ref = session.run(feeds)
    for name in ("logits", "present.0.key", "present.3.value"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), ref[name])
    assert ref["present.0.key"].shape[2] == feeds["input_ids"].shape[1]
    for dims, message in (
        ({"d1": 0}, "input 'past_key_values.0.key' dim 1 is 0 (must be >= 1; only the past "
                    "length, dim 2, may be 0)"),
        ({"d3": 0}, "input 'past_key_values.0.key' dim 3 is 0"),
    ):  # fmt: skip
        bad = _with_cache(session, prompts[4], **dims)
        res = _cli(cxx["modec_run"], cached_vlm["out"], *_save(tmp_path, bad), "--out", tmp_path)
        assert res.returncode == 7, res.stderr
        assert message in res.stderr
    bad = {**feeds, "input_ids": feeds["input_ids"][:, :0], "attention_mask":
           feeds["attention_mask"][:, :0]}  # fmt: skip
    res = _cli(cxx["modec_run"], cached_vlm["out"], *_save(tmp_path, bad), "--out", tmp_path)
    assert res.returncode == 7
    assert "input 'input_ids' dim 1 is 0 (must be >= 1)" in res.stderr


def test_prompt_and_settings_refused(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], session: rt.Session,
    prompts: dict[int, dict[str, np.ndarray]], tmp_path: Path,
) -> None:  # fmt: skip
    """Both runtimes refuse a prompt that carries the cache, and bad settings; modec_run's
    own usage errors exit 64."""
    app, art = cxx["modec_run"], cached_vlm["out"]
    cached = _with_cache(session, prompts[1])
    res = _cli(app, art, "--generate", 2, *_save(tmp_path, cached))
    assert res.returncode == 7 and "is the KV cache, which generation starts empty" in res.stderr
    with pytest.raises(BadInputError, match="KV cache"):
        session.generate(cached, max_new_tokens=2)
    args = _save(tmp_path, prompts[1])
    for opts, message in (
        (["--top-p", "0"], "top_p is 0"),
        (["--top-p", "1.5"], "top_p is 1.5"),
        (["--temperature", "-1"], "temperature is -1"),
        (["--temperature", "nan"], "temperature is nan"),
    ):
        res = _cli(app, art, "--generate", 2, *opts, *args)
        assert res.returncode == 1, (opts, res.stderr)  # MODEC_ERR_INVALID_ARGUMENT
        assert message in res.stderr and len(res.stderr.splitlines()) == 1
    usage = (["--generate", "-1"], ["--generate", "x"], ["--generate"], ["--temperature", "0.5"],
             ["--generate", "2", "--top-k", "1.5"], ["--generate", "2", "--seed", "-3"],
             ["--generate", "2", "--bogus", "1"])  # fmt: skip
    for bad in usage:
        res = _cli(app, art, *bad, *args)
        assert res.returncode == 64, (bad, res.stderr)
        assert res.stderr.startswith("usage: modec_run ARTIFACT_DIR")


@pytest.fixture(scope="module")
def hf_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepSeek-V3 Hugging Face directory (cached keys 16 wide, values 8) compiled
    through `modec.hf`'s cached export (RTN, 4 bits)."""
    from modec.driver import CompileOptions, compile_model
    from tests.fixtures.models import VOCAB, build_hf

    root = tmp_path_factory.mktemp("hf_cxx")
    build_hf("deepseek").m.save_pretrained(root / "hf")
    ids = np.random.default_rng(5).integers(1, VOCAB, (8, 12)).astype(np.int64)
    data.save(root / "calib.npz", {"input_ids": ids, "attention_mask": np.ones_like(ids)},
              modality=np.ones_like(ids, dtype=np.uint8))  # fmt: skip
    o = CompileOptions(method="uniform", quantizer="rtn", budget=4.0, target="llvm",
                       cache_dir=None)  # fmt: skip
    compile_model(root / "hf", root / "calib.npz", root / "out", o)
    return root / "out"


def test_hf_family_generates_the_same_in_cxx(
    cxx: dict[str, Path], hf_artifact: Path, tmp_path: Path
) -> None:  # fmt: skip
    """An artifact compiled from a Hugging Face directory generates the same greedy tokens
    in C++, in Python and in the recomputation without a cache (two left-padded rows)."""
    from tests.fixtures.models import VOCAB

    gen = json.loads((hf_artifact / MANIFEST).read_text())["sections"]["generation"]
    assert {c["head_dim"] for c in gen["cache"]} == {16, 8}  # keys and values differ
    ids = np.random.default_rng(6).integers(1, VOCAB, (2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    session = rt.load(hf_artifact)
    rows, steps, _ = _generate_cxx(cxx["modec_run"], hf_artifact, tmp_path, feeds, 8)
    assert rows == session.generate(feeds, max_new_tokens=8).tokens
    assert rows == _recomputed(session, feeds, 8)
    assert _streamed(steps, 2) == rows


def test_int8_inputs_generate_alike(
    cxx: dict[str, Path], cached_vlm: dict[str, Path], prompts: dict[int, dict[str, np.ndarray]],
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
) -> None:  # fmt: skip
    """The cached model compiled with ``--expert-act-bits 8 --dense-bits 4 --dense-act-bits
    8`` (the VNNI kernels of the experts and of the attention projections and head, the KV
    cache in place): both runtimes pick the same greedy tokens, for 4 rows of different
    lengths."""
    from modec.driver import CompileOptions, compile_model
    from modec.kernels import grouped_moe_a8

    if not grouped_moe_a8.supports("llvm"):
        pytest.skip("this CPU has no AVX-512 VNNI and VBMI")
    out = tmp_path_factory.mktemp("act8") / "out"
    o = CompileOptions(method="uniform", quantizer="rtn", budget=4.0, target="llvm",
                       cache_dir=None, expert_act_bits=8, dense_bits=4,
                       dense_act_bits=8)  # fmt: skip
    compile_model(cached_vlm["onnx"], cached_vlm["calib"], out, o)
    assert read_manifest(out).sections["dense"]["act_bits"] == 8
    feeds = prompts[4]
    rows, _, _ = _generate_cxx(cxx["modec_run"], out, tmp_path, feeds, N)
    assert rows == rt.load(out).generate(feeds, max_new_tokens=N).tokens
    assert [len(r) for r in rows] == [N] * 4
