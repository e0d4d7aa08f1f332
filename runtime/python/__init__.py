"""modec.runtime: load a modec artifact and run it from Python (TVM runtime, no PyTorch).

    sess = modec.runtime.load("out/")
    outputs = sess.run({"input_ids": ids, "attention_mask": mask})

`load` checks, in this order, before anything is mapped into the process: the manifest
(JSON, schema version, fields: as strictly as the C++ runtime, see `_check`), the target
(device kind and CPU architecture), then every file's size and SHA-256 (read through a
small buffer), then the weights' header against the manifest's params. Each failure is one
line: `modec.errors.ModelError`. ``weights.safetensors`` is then mapped read-only and each
param handed to the VM as a tensor pointing into the mapping (no copy; the mapping lives as
long as any of those tensors); a param that is not 64-byte aligned in the file (an artifact
written before the aligned layout) is copied instead (docs/artifact.md, Loading).
`Session.run` validates input names, dtypes, ranks, static dims and the consistency of
symbolic dims and raises `modec.errors.BadInputError`; a model that fails to run on inputs
its manifest allows, or returns outputs other than the manifest's, raises `ModelError`.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from modec.runtime import _check, _generation
from modec.runtime._tvm import ALIGN

from modec import kv_cache
from modec.artifact import LIBRARY, WEIGHTS, Manifest, TensorSpec, check_target
from modec.cuda_arch import arch_runs_on
from modec.errors import BadInputError, ModelError

__all__ = ["Session", "load"]

logger = logging.getLogger(__name__)


def _last_line(exc: BaseException) -> str:
    """The last non-empty line of an error's message (TVM's carry a traceback first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _map_weights(f: BinaryIO, path: Path, specs: list[TensorSpec]) -> list[np.ndarray]:
    """The params, in order, as read-only arrays over a mapping of the open weights file
    (nothing is read or copied: the pages come in when the kernels touch them). Other
    tensors in the file (the padding ``__pad.K``) are not looked at, as in the C++ runtime.

    Raises:
        ModelError: the header is not the manifest's params (`_check.weight_slices`), or
            the file cannot be mapped or changed since it was hashed.
    """
    size = os.fstat(f.fileno()).st_size
    base, header = _check.read_weights_header(f, path, size)
    slices = _check.weight_slices(header, base, size, specs, path)
    try:
        data = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot map {path}: {_last_line(exc)}") from exc
    if os.fstat(f.fileno()).st_size != size:  # shrunk: the pages past its end would SIGBUS
        raise ModelError(f"{path} changed while it was loaded; copy the artifact again")
    out = []
    for spec, (offset, nbytes) in zip(specs, slices, strict=True):
        dtype = _check.numpy_dtype(spec.dtype)
        a = np.frombuffer(data, dtype, count=nbytes // dtype.itemsize, offset=offset)
        out.append(a.reshape(tuple(int(d) for d in spec.shape)))
    return out


def _check_cuda_arch(manifest: Manifest, arch: str, name: str) -> None:
    """Refuse a CUDA artifact with no SASS this GPU runs (`modec.cuda_arch.arch_runs_on`)."""
    archs = list(manifest.target.get("archs", []))
    if not any(arch_runs_on(a, arch) for a in archs):
        raise ModelError(
            f"artifact built for CUDA archs {', '.join(archs)}; this GPU ({name}) is {arch}: "
            f'rebuild with --target \'{{"kind": "cuda", "arch": "{arch}"}}\''
        )


class Session:
    """A loaded artifact; `run` maps input arrays by ONNX name to output arrays."""

    def __init__(self, path: Path, manifest: Manifest, device: str, weights_file: BinaryIO) -> None:
        from modec.runtime._tvm import Runtime

        self.path = path
        self.manifest = manifest
        with weights_file:
            weights = _map_weights(weights_file, path / WEIGHTS, manifest.params)
        self._rt = Runtime(device)
        if device == "cuda":
            _check_cuda_arch(manifest, *self._rt.cuda_device())
        library = _check.read_library(path / LIBRARY, manifest)
        try:
            vm = self._rt.load_vm(path / LIBRARY, library)
            self._main = vm[manifest.entry]
            #: the generation contract (docs/generation.md), None without a KV cache
            self.generation = _generation.read_section(manifest, path)
            self._entries = {"main": (self._main, manifest.inputs)}
            if self.generation is not None and self.generation.decode_entry != "main":
                decode = self.generation.decode_entry
                self._entries[decode] = (vm[decode], self.generation.decode_inputs)
        except ModelError:
            raise
        except Exception as exc:  # TVM raises its own error types; say what to do
            raise ModelError(
                f"cannot load {path / LIBRARY} ({_last_line(exc)}); rebuild "
                f"the artifact with TVM {manifest.tvm_version or '?'}"
            ) from exc
        self._params = []
        #: how many params are copies, not views of the mapped weights file (misaligned in
        #: the file, a CUDA device, or a numpy without read-only DLPack export)
        self.copied_params = 0
        for w in weights:
            tensor, mapped = self._rt.param(w)
            self._params.append(tensor)
            self.copied_params += not mapped
        misaligned = sum(1 for w in weights if w.ctypes.data % ALIGN)
        if misaligned and device == "cpu":
            logger.warning(
                "%s: %d of %d params are not %d-byte aligned in the file (an artifact written "
                "before the aligned layout) and were copied; rebuild the artifact to map them",
                path / WEIGHTS, misaligned, len(weights), ALIGN,
            )  # fmt: skip
        if self.copied_params > misaligned and device == "cpu":
            logger.warning(
                "%s: %d params were copied: numpy %s cannot hand read-only arrays over "
                "through DLPack (numpy >= 2.1 can)",
                path / WEIGHTS, self.copied_params - misaligned, np.__version__,
            )  # fmt: skip
        logger.info("loaded %s: %d params", path, len(weights))

    @property
    def inputs(self) -> list[TensorSpec]:
        """The inputs the session expects, in calling order."""
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """The outputs `run` returns."""
        return self.manifest.outputs

    def _check(self, inputs: Mapping[str, Any], specs: list[TensorSpec] | None = None) -> list[Any]:
        specs = self.inputs if specs is None else specs
        names = [s.name for s in specs]
        missing = [n for n in names if n not in inputs]
        unknown = [n for n in inputs if n not in names]
        if missing or unknown:
            raise BadInputError(
                f"inputs must be exactly {names}; missing {missing}, unknown {unknown}"
            )
        sym: dict[str, int] = {}
        out = []
        for spec in specs:
            given = inputs[spec.name]
            a = given if isinstance(given, Held) else np.asarray(given)
            if str(a.dtype) != spec.dtype:
                raise BadInputError(
                    f"input {spec.name!r} has dtype {a.dtype}, expected {spec.dtype}; cast it"
                )
            if a.ndim != len(spec.shape):
                raise BadInputError(
                    f"input {spec.name!r} has rank {a.ndim} {list(a.shape)}, expected "
                    f"{len(spec.shape)} {list(spec.shape)}"
                )
            for i, (got, want) in enumerate(zip(a.shape, spec.shape, strict=True)):
                if isinstance(want, int) and got != want:
                    raise BadInputError(
                        f"input {spec.name!r} dim {i} is {got}, expected {want} "
                        f"(shape {list(spec.shape)})"
                    )
                if isinstance(want, str):
                    if sym.setdefault(want, got) != got:
                        raise BadInputError(
                            f"input {spec.name!r} dim {i} ({want}) is {got}, but another input "
                            f"has {want}={sym[want]}"
                        )
                    if got == 0 and not (i == 2 and kv_cache.is_past(spec.name)):
                        # An empty KV cache (P = 0, a prompt) is the one empty input allowed.
                        raise BadInputError(f"input {spec.name!r} dim {i} ({want}) is empty")
            out.append(a if isinstance(a, Held) else np.ascontiguousarray(a))
        return out

    def _past_length(self, inputs: Mapping[str, Any], past_length: int | None) -> int:
        """``past_length`` checked against the in-place decode entry's inputs: the new
        positions must fit in the buffers, the mask must cover the old and the new ones."""
        gen = self.generation
        assert gen is not None
        if past_length is None:
            raise BadInputError(f"entry {gen.decode_entry!r} updates the KV cache in place: pass "
                                "past_length, the positions the cache holds")  # fmt: skip
        new = int(inputs[gen.tokens].shape[1])
        capacity = int(inputs[gen.cache[0].past].shape[2])
        if not 0 <= past_length <= capacity - new:
            raise BadInputError(
                f"past_length {past_length} + {new} new position(s) do not fit the cache's "
                f"{capacity}; pass 0 <= past_length <= {capacity - new} (or larger buffers)"
            )
        if gen.attention_mask is not None:
            total = int(inputs[gen.attention_mask].shape[1])
            if total != past_length + new:
                raise BadInputError(
                    f"{gen.attention_mask!r} covers {total} positions; past_length {past_length} "
                    f"+ {new} new ones need {past_length + new}"
                )
        return past_length

    def run(
        self, inputs: Mapping[str, np.ndarray], entry: str = "main", past_length: int | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model.

        Args:
            inputs: one array per input of the entry, by ONNX input name.
            entry: ``main`` (every model input), or the ``decode`` entry of a model with a KV
                cache (``Session.generation.decode_entry``; docs/generation.md).
            past_length: for a decode entry that updates the cache in place
                (``Session.generation.cache_in_place``): the positions the cache buffers
                hold; the step's keys and values are written after them, into the arrays
                given (a numpy array is copied in: read the updated cache from the outputs).

        Returns:
            One array per model output, by ONNX output name.

        Raises:
            BadInputError: wrong names, dtype, rank or dims, an unknown entry, or a
                ``past_length`` missing, not wanted or not fitting the cache.
        """
        results = self._invoke(entry, inputs, past_length)
        return {spec.name: self._rt.numpy(r) for spec, r in zip(self.outputs, results, strict=True)}

    def _invoke(
        self, entry: str, inputs: Mapping[str, Any], past_length: int | None = None
    ) -> list[Any]:
        """Call an entry; ``inputs`` are arrays (checked against the entry's specs) or, for
        the cache, tensors a previous call returned (passed as they are); ``past_length``:
        the positions the cache holds, for a decode entry that updates it in place. Returns
        the VM's output tensors, checked against the manifest's outputs."""
        func, args = self._arguments(entry, inputs, past_length)
        return self._checked_outputs(self._call(func, args))

    def _arguments(
        self, entry: str, inputs: Mapping[str, Any], past_length: int | None = None
    ) -> tuple[Any, list[Any]]:
        """`_invoke`'s checks: the entry's VM function and its argument list (the weights
        not included: `_call` appends them). For the in-place decode entry the list ends
        with the past length (a shape value)."""
        if entry not in self._entries:
            raise BadInputError(f"entry {entry!r} is not one of {sorted(self._entries)}")
        func, specs = self._entries[entry]
        checked = self._check(inputs, specs)
        args = [a.tensor if isinstance(a, Held) else self._rt.tensor(a) for a in checked]
        gen = self.generation
        if gen is not None and gen.cache_in_place and entry == gen.decode_entry:
            given = {spec.name: a for spec, a in zip(specs, checked, strict=True)}
            args.append(self._rt.shape([self._past_length(given, past_length)]))
        elif past_length is not None:
            raise BadInputError(f"past_length is for a decode entry that updates the KV cache in "
                                f"place; entry {entry!r} does not")  # fmt: skip
        return func, args

    def _call(self, func: Any, args: list[Any]) -> list[Any]:
        """The VM call: ``args`` (from `_arguments`, or a list of the same tensors' kinds and
        shapes) then the weights. Returns the output tensors, unchecked."""
        try:
            res: Any = func(*args, *self._params)
        # The inputs passed the manifest's checks: whatever TVM raises (ValueError, TypeError,
        # RuntimeError...) says model.so and its manifest disagree.
        except Exception as exc:
            raise ModelError(
                f"{self.path / LIBRARY} failed to run ({_last_line(exc)}); its manifest does not "
                "match it, rebuild the artifact"
            ) from exc
        return [res] if hasattr(res, "shape") else list(res)

    def _checked_outputs(self, results: list[Any]) -> list[Any]:
        """``results`` after checking them against the manifest's outputs."""
        if len(results) != len(self.outputs):
            raise ModelError(
                f"{self.path / LIBRARY} returned {len(results)} outputs, the manifest lists "
                f"{len(self.outputs)}; the artifact is inconsistent, rebuild it"
            )
        for spec, r in zip(self.outputs, results, strict=True):
            got = (str(getattr(r, "dtype", "?")), tuple(int(d) for d in getattr(r, "shape", ())))
            if (
                got[0] != spec.dtype
                or len(got[1]) != len(spec.shape)
                or any(
                    isinstance(w, int) and g != w for g, w in zip(got[1], spec.shape, strict=True)
                )
            ):
                raise ModelError(
                    f"output {spec.name!r} is {got[0]}{list(got[1])}, the manifest says "
                    f"{spec.dtype}{list(spec.shape)}; manifest.json does not match model.so, "
                    "rebuild the artifact"
                )
        return results

    def generate(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        max_new_tokens: int = 32,
        stop: Sequence[int] = (),
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        callback: _generation.Callback | None = None,
    ) -> _generation.Generation:
        """Generate tokens after a prompt (docs/generation.md): prefill, then one decode step
        per token, the KV cache kept in the VM's tensors.

        Args:
            inputs: the prompt: every input of ``main`` but the cache (left-padded
                ``input_ids`` and ``attention_mask``, ``pixel_values``...).
            max_new_tokens: the most tokens per row (0: prefill only).
            stop: token ids that end a row (kept as its last token).
            temperature: 0 picks the largest logit; > 0 samples.
            top_k: sample among the k most likely tokens (0: all).
            top_p: sample among the most likely tokens that make up this share (1: all).
            seed: the sampler's seed (SplitMix64).
            callback: ``callback(step, tokens, finished)`` after each step, with each
                row's token and whether it is done; returning a true value stops.

        Returns:
            Each row's tokens and the prefill and decode times.

        Raises:
            ModelError: the artifact has no KV cache.
            BadInputError: wrong inputs or settings.
        """
        settings = _generation.Settings(max_new_tokens, tuple(int(t) for t in stop),
                                        temperature, top_k, top_p, seed)  # fmt: skip
        return _generation.generate(self, inputs, settings, callback)


class Held:
    """A tensor a call returned, passed to the next call as it is (the KV cache): the
    input checks read its dtype and shape; its data stays in the VM's memory."""

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor
        self.dtype = _check.numpy_dtype(str(tensor.dtype))
        self.shape = tuple(int(d) for d in tensor.shape)
        self.ndim = len(self.shape)


def load(path: str | os.PathLike[str], device: str = "cpu") -> Session:
    """Load and verify an artifact directory.

    Args:
        path: the artifact directory (``manifest.json``, ``model.so``, weights).
        device: "cpu" (the artifact's target must be a CPU one built for this
            architecture) or "cuda".

    Returns:
        A `Session`.

    Raises:
        ModelError: corrupted / unknown-version manifest, missing or truncated files,
            checksum mismatch, an artifact built for another target.
        BadInputError: an unknown device name.
    """
    if device not in ("cpu", "cuda"):
        raise BadInputError(f"device {device!r} is not 'cpu' or 'cuda'")
    base = Path(path)
    if not base.is_dir():
        raise ModelError(f"artifact directory {base} does not exist")
    manifest = _check.read_manifest(base)
    check_target(manifest, device)
    return Session(base, manifest, device, _check.verify(base, manifest))
