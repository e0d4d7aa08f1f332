"""The real CLI in a subprocess: eval, inspect, compile, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def modec(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modec.cli", *args], capture_output=True, text=True, cwd=cwd,
        timeout=600,
    )  # fmt: skip


def test_eval_onnx_json(tiny_vlm):
    r = modec("eval", str(tiny_vlm["model"]), "--data", str(tiny_vlm["eval"]), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "onnxruntime"
    assert doc["samples"] == 36
    assert doc["multimodal"]["n"] == 20 and doc["text_only"]["n"] == 16
    assert set(doc["families"]) == {"cell", "count", "sum", "max", "present", "arith",
                                    "compare", "succ", "parity"}  # fmt: skip
    fam_correct = sum(f["correct"] for f in doc["families"].values())
    assert fam_correct == doc["overall"]["correct"]


def test_eval_table(tiny_vlm):
    r = modec("eval", str(tiny_vlm["model"]), "--data", str(tiny_vlm["eval"]))
    assert r.returncode == 0, r.stderr
    assert "multimodal" in r.stdout and "text-only" in r.stdout and "36" in r.stdout


def test_inspect_finds_layers(tiny_vlm):
    r = modec("inspect", str(tiny_vlm["model"]), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["num_moe_layers"] == 2 and info["num_experts"] == 8
    for layer in info["moe_layers"]:
        assert layer["top_k"] == 2 and layer["router"]["scoring"] == "softmax"
        assert layer["router"]["norm_topk_prob"] is True
        assert layer["form"] == "stacked_gather"
        assert layer["attention"]["kind"] == "probs"
    assert 0 < info["parameters"]["expert_share"] < 1


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["eval", "missing.onnx", "--data", "{eval}"], 3, "no such model file"),
        (["eval", "{junk}", "--data", "{eval}"], 3, "not a readable ONNX model"),
        (["eval", "{model}", "--data", "missing.npz"], 3, "no such data file"),
        (["eval", "{model}", "--data", "{badmask}"], 3, "key 'modality' has length"),
        (["eval", "{model}"], 2, "--data"),
        (["compile", "{model}"], 2, "no calibration data; pass --calib"),
        (["compile", "{model}", "--calib", "{calib}", "--budget", "1.5", "-o", "{out}"], 4,
         "below the smallest candidate width 2"),
        (["compile", "{model}", "--calib", "{calib}", "--bits", "2,9", "-o", "{out}"], 3,
         "unsupported bit width 9"),
        (["compile", "{nomoe}", "--calib", "{calib}", "-o", "{out}"], 3, "no MoE layer found"),
        (["compile", "{model}", "--calib", "{calib}", "-o", "{foreign}"], 3,
         "not a previous modec output"),
        (["compile", "{model}", "--calib", "{calib}", "--target", "tpu", "-o", "{out}"], 2,
         "--target tpu: bad kernel target 'tpu'"),
        (["compile", "{model}", "--calib", "{calib}", "--method", "uniform", "--budget", "2.5",
          "-o", "{out}"], 3, "--method uniform needs an integer --budget among --bits"),
        (["compile", "{model}", "--calib", "{calib}", "--method", "nope", "-o", "{out}"], 2,
         "invalid choice: 'nope'"),
    ],
)  # fmt: skip
def test_bad_input_one_line_and_exit_code(tiny_vlm, tmp_path, args, code, message):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    bad = tmp_path / "badmask.npz"
    with np.load(tiny_vlm["eval"]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["modality"] = arrays["modality"][:, :-3]
    np.savez(bad, **arrays)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    nomoe = tmp_path / "nomoe.onnx"
    _dense_model(nomoe)
    subst = {"eval": tiny_vlm["eval"], "model": tiny_vlm["model"], "calib": tiny_vlm["calib"],
             "junk": junk, "badmask": bad, "out": tmp_path / "out", "foreign": foreign,
             "nomoe": nomoe}  # fmt: skip
    r = modec(*[a.format(**subst) for a in args])
    assert r.returncode == code, (r.returncode, r.stderr)
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("modec: error")]
    assert len(err_lines) == 1 and message in err_lines[0], r.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written on failure"
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def _dense_model(path):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    g = helper.make_graph(
        [helper.make_node("MatMul", ["input_ids_f", "w"], ["logits"])], "dense",
        [helper.make_tensor_value_info("input_ids_f", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 4])], [w],
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_compile_without_model_prints_how_to_run_the_example():
    r = modec("compile")
    assert r.returncode == 2
    assert "examples/digits-vlm/model.onnx" in r.stderr


def test_passes_lists_every_pipeline_and_pass():
    from modec.pipelines import PIPELINES, CompileOptions, standard_pipeline

    r = modec("passes")
    assert r.returncode == 0, r.stderr
    for name in PIPELINES:
        # Each named pipeline is printed as the text --pipeline takes back.
        assert standard_pipeline(CompileOptions(method=name)).text() in r.stdout
    for name in ("find-moe", "select-key-vision", "measure-sensitivity", "lower-tvm"):
        assert f"  {name} " in r.stdout
    assert "reads RoutingStats; writes KeyVision" in r.stdout
    assert "key_ratio=0.2" in r.stdout and "group_size=128" in r.stdout


@pytest.mark.parametrize("flag", ["-q", "-v"])
def test_verbosity_before_or_after_the_subcommand(flag):
    before, after = modec(flag, "passes"), modec("passes", flag)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert before.stdout == after.stdout
    assert modec("-q", "passes", "-v").returncode == 0  # the subcommand's flag wins
    from modec.cli import _log_level, build_parser

    for argv, level in (
        (["-q", "passes", "-v"], 10),
        (["-v", "passes", "-q"], 40),
        (["passes", "-q"], 40),
        (["-q", "passes"], 40),
        (["passes"], 30),
    ):
        args = build_parser().parse_args(argv)
        assert _log_level(args) == level, argv
        assert args.quiet == (level == 40), argv  # what the commands read (progress bars)
    assert modec("passes", "-q", "-v").returncode == 2  # one or the other


def test_every_help_text_formats() -> None:
    """``modec --help`` and ``modec CMD --help`` print (a stray ``%`` in a help string made
    argparse raise TypeError instead)."""
    import argparse

    from modec.cli import build_parser

    parser = build_parser()
    assert "eval" in parser.format_help()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert subs, "no subcommands"
    for name, sp in subs[0].choices.items():
        assert sp.format_help().startswith("usage: "), name
