"""The output directory is one transaction: nothing partial, old output kept until the commit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modec import output


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _fake_output(path: Path, tag: str) -> None:
    path.mkdir(parents=True)
    (path / "report.json").write_text(f'{{"schema": "modec.report/2", "tag": "{tag}"}}')
    (path / "model.sim.onnx").write_bytes(tag.encode() * 1000)


def test_commit_replaces_the_output_in_one_step(tmp_path):
    out = tmp_path / "out"
    _fake_output(out, "old")
    with output.transaction(out) as tmp:
        (tmp / "report.json").write_text('{"schema": "modec.report/2", "tag": "new"}')
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")
        assert _tree(out)["report.json"].endswith(b'"old"}')  # not touched before the commit
    assert set(_tree(out)) == {"report.json", "sub/f"}
    assert b'"new"' in _tree(out)["report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup left


def test_failure_inside_leaves_the_old_output_and_no_temp_dir(tmp_path):
    out = tmp_path / "out"
    _fake_output(out, "old")
    before = _tree(out)
    with pytest.raises(RuntimeError), output.transaction(out) as tmp:
        (tmp / "report.json").write_text("partial")
        raise RuntimeError("a pass failed")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        with output.transaction(out) as tmp:
            fd = os.open(tmp / "secret", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors does
            os.close(fd)
            (tmp / "plain").write_text("x")
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "secret": want_file, "plain": want_file,
    }  # fmt: skip
    assert out.stat().st_mode & 0o777 == want_dir


def test_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    """Where renameat2 is not offered, the old output is moved aside and removed after."""
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    _fake_output(out, "old")
    with output.transaction(out) as tmp:
        (tmp / "report.json").write_text("new")
    assert _tree(out) == {"report.json": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_kill_9_while_writing_keeps_the_previous_output(tiny_vlm, tmp_path):
    """SIGKILL once the staged output is being written: OUT is byte-for-byte the old one."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "modec.cli", "-q", "compile", str(tiny_vlm["model"]),
           "--calib", str(tiny_vlm["calib"]), "--sensitivity-samples", "4", "--target", "none",
           "-o", str(out), "--cache-dir", str(cache)]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    before = _tree(out)
    # The second run reads its analysis from the cache and goes straight to writing; kill it
    # as soon as the first file of the staged output appears.
    proc = subprocess.Popen([*cmd, "--budget", "2.5"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    staged: list[Path] = []
    while proc.poll() is None and time.monotonic() < deadline:
        staged = [p for d in tmp_path.glob(".out.tmp-*") for p in d.iterdir()]
        if staged:
            break
        time.sleep(0.001)
    assert staged, "the compile finished before it was seen writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _tree(out) == before  # the previous output is intact, nothing partial in it
    # The killed run's staging directory is left beside OUT (named .out.tmp-*), never in it.
    assert list(tmp_path.glob(".out.tmp-*"))
