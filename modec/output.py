"""A compile's output directory, written as one transaction.

Everything is written into a fresh temporary directory beside ``OUT``: the artifact, the
simulated model, the packed experts, the allocation, ``report.json`` and ``report.html``
(rendered once, from the report in memory). Then every file and the directory are made
0644 / 0755 (less the umask, as any file a user creates), fsynced, and the directory
replaces ``OUT`` in one step: an atomic exchange (``renameat2(RENAME_EXCHANGE)``) where the
file system offers it, else two renames. Nothing touches ``OUT`` after that. A run that is
interrupted — Ctrl-C, an error, ``kill -9`` — before the exchange leaves the previous ``OUT``
as it was (a killed run leaves its temporary directory behind, named ``.OUT.tmp-*``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from modec.errors import BadInputError
from modec.interrupt import checkpoint

SIM_MODEL = "model.sim.onnx"
EXPERTS_FILE = "experts.safetensors"
ALLOCATION_FILE = "allocation.json"
REPORT_FILE = "report.json"
REPORT_SCHEMA = "modec.report/2"
#: Files that mark a directory as modec output (safe to overwrite).
MARKERS = (REPORT_FILE, "manifest.json")


def prepare_out(out: Path, force: bool) -> None:
    """Refuse to overwrite a directory that is not modec output (unless ``force``)."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out}: exists and is not a directory; choose another -o")
    foreign = out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in MARKERS)
    if foreign and not force:
        raise BadInputError(
            f"{out}: exists and is not a previous modec output; choose another -o or pass "
            "--force to replace it"
        )


def staging_dir(out: Path) -> Path:
    """A fresh temporary directory beside ``out`` (same file system, so renames are atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def finish_permissions(directory: Path) -> None:
    """Files 0644 and directories 0755, less the umask (mkdtemp and some writers use 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def fsync_tree(directory: Path) -> None:
    """Flush every file and directory under ``directory`` to the disk."""
    for root, dirs, files in os.walk(directory):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in [*dirs, "."]:
            _fsync_dir(Path(root) / d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where it is not offered."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit(tmp: Path, out: Path) -> None:
    """Make the finished ``tmp`` the output ``out`` in one step; remove the old output after."""
    checkpoint()  # the last moment a Ctrl-C (even one swallowed earlier) leaves OUT as it was
    finish_permissions(tmp)
    fsync_tree(tmp)
    if out.exists():
        if _exchange(tmp, out):
            _fsync_dir(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
            return
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
        os.replace(tmp, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


@contextlib.contextmanager
def transaction(out: Path) -> Iterator[Path]:
    """``with transaction(out) as tmp:`` write into ``tmp``; committed only on success."""
    tmp = staging_dir(out)
    try:
        yield tmp
        commit(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise BadInputError(
                f"{out}: no space left on the device while writing the output (nothing was "
                "changed there); free some space or choose another -o"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
