"""The deployable artifact: ``model.so``, ``weights.safetensors`` and ``manifest.json``.

This module is TVM-free: it writes and checks the directory; `modec.lowering.build`
produces the library and `modec.runtime` / ``runtime/`` (C++) load it. The format is
documented in docs/artifact.md; the rules that make it safe to ship:

1. The manifest has a versioned schema (`SCHEMA`) and lists every file with its SHA-256 and
   byte size; a loader checks both before it maps anything.
2. Two identical compiles give byte-identical ``weights.safetensors`` and ``manifest.json``:
   no timestamps, timings or absolute paths; JSON with sorted keys.
3. The directory is written atomically: a temporary sibling directory, then a rename. An
   existing directory is replaced only if it is empty, holds a modec artifact, or
   ``force=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeAlias

import numpy as np

from modec.errors import BadInputError, ModelError
from modec.interrupt import checkpoint

logger = logging.getLogger(__name__)

#: Schema identifier written to and required from ``manifest.json``.
SCHEMA = "modec.artifact/1"
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"

#: numpy dtype name -> safetensors dtype tag (the C++ runtime reads the same tags).
SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: dtype (numpy name) and shape with symbolic dims as strings."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        """The manifest form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> TensorSpec:
        """Parse the manifest form (raises KeyError/TypeError on a malformed entry)."""
        shape = tuple(d if isinstance(d, str) else int(d) for d in obj["shape"])
        return TensorSpec(str(obj["name"]), str(obj["dtype"]), shape)


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact with its checksum."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``.

    Attributes:
        target: ``kind`` ("llvm" or "cuda"), ``device`` ("cpu"/"cuda"), ``machine``
            (``platform.machine()`` of the build host for CPU code) and the target options
            (``mcpu``, ``arch``).
        inputs: model inputs in calling order (the ONNX graph inputs).
        outputs: model outputs in return order.
        params: weight tensors in calling order after the inputs; their names are the
            tensor names in ``weights.safetensors``.
        files: file name -> checksum and size.
        entry: the VM function to call.
        tvm_version: the TVM version that built ``model.so``.
        sections: free-form sections the compiler fills (``lowering``, ``moe``,
            ``pipeline``, ...).
    """

    target: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    params: list[TensorSpec]
    files: dict[str, FileEntry]
    entry: str = "main"
    tvm_version: str = ""
    sections: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json``."""
        return {
            "schema": SCHEMA,
            "entry": self.entry,
            "calling_convention": "inputs_then_params",
            "tvm_version": self.tvm_version,
            "target": self.target,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "params": [t.to_json() for t in self.params],
            "files": {
                k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in sorted(self.files.items())
            },
            "sections": self.sections,
        }

    @staticmethod
    def from_json(obj: Any, where: str = MANIFEST) -> Manifest:
        """Parse and validate a manifest object.

        Raises:
            ModelError: wrong schema version or a missing / malformed field.
        """
        if not isinstance(obj, dict):
            raise ModelError(f"{where}: not a JSON object; rebuild the artifact")
        schema = obj.get("schema")
        if schema != SCHEMA:
            raise ModelError(
                f"{where}: schema {schema!r} is not {SCHEMA!r}; rebuild the artifact with this "
                "modec version or use a matching runtime"
            )
        try:
            return Manifest(
                target=dict(obj["target"]),
                inputs=[TensorSpec.from_json(t) for t in obj["inputs"]],
                outputs=[TensorSpec.from_json(t) for t in obj["outputs"]],
                params=[TensorSpec.from_json(t) for t in obj["params"]],
                files={
                    str(k): FileEntry(str(v["sha256"]), int(v["bytes"]))
                    for k, v in obj["files"].items()
                },
                entry=str(obj.get("entry", "main")),
                tvm_version=str(obj.get("tvm_version", "")),
                sections=dict(obj.get("sections", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{where}: malformed field ({exc!r}); rebuild the artifact") from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_bytes(manifest: Manifest) -> bytes:
    """The canonical serialization: sorted keys, 2-space indent, trailing newline."""
    return (json.dumps(manifest.to_json(), sort_keys=True, indent=2) + "\n").encode()


#: File-offset alignment of every tensor in ``weights.safetensors``: the runtimes map the file
#: and pass pointers into the mapping to the kernels, which load 64-byte vectors with aligned
#: instructions (a misaligned param crashes them: docs/artifact.md, Loading).
WEIGHTS_ALIGN = 64


class LazyParam(Protocol):
    """A weight computed when it is written (e.g. `modec.moe.lazy.LazyArray`): its shape and
    dtype are known up front, ``numpy()`` produces the value."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def numpy(self) -> np.ndarray: ...


#: A weight as `write_artifact` takes it: an array, or a lazy one produced only when written.
ParamValue: TypeAlias = "np.ndarray | LazyParam"


def save_weights(params: Mapping[str, ParamValue], path: str | os.PathLike[str]) -> None:
    """Write the weights as safetensors (no metadata, so the bytes depend on the data only),
    one tensor at a time (`modec.safetensors_io`), each at a `WEIGHTS_ALIGN`-byte aligned
    file offset (padding tensors ``__pad.K`` fill the gaps; loaders ignore them).

    A lazy weight (`LazyParam`) is produced when its turn comes and dropped once written, so
    the writer holds one weight at a time.
    """
    from modec.safetensors_io import TensorEntry, write_safetensors

    entries = []
    for name, arr in params.items():
        if str(arr.dtype) not in SAFETENSORS_DTYPES:
            raise ModelError(
                f"weight {name!r} has dtype {arr.dtype}, which the artifact cannot hold"
            )
        data = arr if isinstance(arr, np.ndarray) else arr.numpy
        entries.append(TensorEntry(name, str(arr.dtype), _shape(arr), data))
    write_safetensors(path, entries, align=WEIGHTS_ALIGN)


def _shape(arr: ParamValue) -> tuple[int, ...]:
    return tuple(int(d) for d in arr.shape)


def _is_modec_artifact(path: Path) -> bool:
    try:
        obj = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and str(obj.get("schema", "")).startswith("modec.artifact/")


def host_machine() -> str:
    """The CPU architecture name the manifest records and loaders compare (``x86_64``)."""
    return platform.machine()


def write_artifact(
    out_dir: str | os.PathLike[str],
    *,
    write_library: Callable[[Path], None],
    params: Mapping[str, ParamValue],
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    target: dict[str, Any],
    tvm_version: str,
    sections: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Manifest:
    """Write an artifact directory atomically.

    Args:
        out_dir: the directory to create or replace.
        write_library: writes the compiled library to the given path (``model.so``).
        params: weights in calling order (arrays, or `LazyParam`s produced one at a time
            while the weights file is written); names become safetensors tensor names.
        inputs: model inputs in calling order.
        outputs: model outputs in return order.
        target: the target description (see `Manifest.target`).
        tvm_version: the TVM version that compiled the library.
        sections: free-form JSON-serializable sections (no timings, for determinism).
        force: replace an existing directory that is not a modec artifact.

    Returns:
        The manifest as written.

    Raises:
        BadInputError: ``out_dir`` exists, is not empty, is not a modec artifact and
            ``force`` is False; or it is a file.
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise BadInputError(f"output {out} exists and is not a directory; choose another path")
        if any(out.iterdir()) and not _is_modec_artifact(out) and not force:
            raise BadInputError(
                f"output directory {out} is not empty and holds no modec artifact; choose an "
                "empty path or pass force=True (--force) to replace it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_library(tmp / LIBRARY)
        save_weights(params, tmp / WEIGHTS)
        param_specs = [TensorSpec(n, str(a.dtype), _shape(a)) for n, a in params.items()]
        files = {
            f: FileEntry(sha256_file(tmp / f), (tmp / f).stat().st_size) for f in (LIBRARY, WEIGHTS)
        }
        manifest = Manifest(
            target=dict(target),
            inputs=list(inputs),
            outputs=list(outputs),
            params=param_specs,
            files=files,
            tvm_version=tvm_version,
            sections=dict(sections or {}),
        )
        (tmp / MANIFEST).write_bytes(manifest_bytes(manifest))
        os.chmod(tmp, 0o755)
        checkpoint()  # an interrupt swallowed during the build leaves OUT as it was
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / "old")
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote artifact %s (%d params)", out, len(params))
    return manifest


def read_manifest(out_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``manifest.json`` of an artifact directory.

    Raises:
        ModelError: missing directory / manifest, invalid JSON, wrong schema.
    """
    path = Path(out_dir) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ModelError(f"{path} not found; is {out_dir} a modec artifact directory?") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}; rebuild the artifact") from exc
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from exc
    return Manifest.from_json(obj, str(path))


def verify_files(
    out_dir: str | os.PathLike[str], manifest: Manifest, *, keep: str | None = None
) -> BinaryIO | None:
    """Check that every listed file exists with the recorded size and SHA-256.

    Each file is hashed through one open handle in 1 MiB reads (never held whole). With
    ``keep``, that file's handle is returned open at offset 0 instead of closed: a loader
    that maps it maps exactly the bytes that were checked, even if another file replaces it
    by name afterwards.

    Raises:
        ModelError: a file is missing, truncated / grown, or its checksum differs.
    """
    base = Path(out_dir)
    for required in (LIBRARY, WEIGHTS):
        if required not in manifest.files:
            raise ModelError(f"{base / MANIFEST} lists no {required}; rebuild the artifact")
    kept = None
    try:
        for name, entry in sorted(manifest.files.items()):
            if "/" in name or "\\" in name or name.startswith("."):
                raise ModelError(f"{base / MANIFEST}: file name {name!r} is not a plain file name")
            f = _open_verified(base / name, entry)
            if name == keep:
                kept = f
            else:
                f.close()
    except BaseException:
        if kept is not None:
            kept.close()
        raise
    return kept


def _open_verified(p: Path, entry: FileEntry) -> BinaryIO:
    try:
        f = open(p, "rb")  # noqa: SIM115 (returned open, or closed below)
    except FileNotFoundError as exc:
        raise ModelError(f"{p} is missing; copy the whole artifact directory") from exc
    try:
        size = os.fstat(f.fileno()).st_size
        if size != entry.bytes:
            raise ModelError(
                f"{p} has {size} bytes, the manifest says {entry.bytes} (truncated or "
                "modified); copy the artifact again"
            )
        h = hashlib.sha256()
        read = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            read += len(chunk)
        if read != entry.bytes:  # changed while it was read
            raise ModelError(
                f"{p} has {read} bytes, the manifest says {entry.bytes} (truncated or "
                "modified); copy the artifact again"
            )
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise ModelError(
                f"{p} SHA-256 {digest[:12]}… does not match the manifest "
                f"({entry.sha256[:12]}…); the file is corrupted, copy the artifact again"
            )
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return f


def check_target(manifest: Manifest, device: str) -> None:
    """Refuse an artifact built for another device kind or CPU architecture.

    Raises:
        ModelError: the artifact's device or machine differs from this host's.
    """
    want = manifest.target.get("device")
    if want != device:
        raise ModelError(
            f"artifact built for target {manifest.target.get('kind')!r} (device {want!r}); "
            f"this runtime runs on {device!r}: rebuild with the matching --target"
        )
    machine = manifest.target.get("machine")
    # A CUDA artifact's model.so holds host code too: its machine must match when recorded.
    if machine != host_machine() and (device == "cpu" or machine is not None):
        raise ModelError(
            f"artifact built for CPU architecture {machine!r}, this host is "
            f"{host_machine()!r}: rebuild it on (or for) this machine"
        )
