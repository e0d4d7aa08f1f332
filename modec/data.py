"""modec's calibration / evaluation dataset format.

A dataset is one ``.npz`` file (see ``docs/data-format.md``):

- ``__header__``: a 0-d string array holding JSON::

      {"format": "modec-dataset", "version": 1,
       "inputs": {"input_ids": {"dtype": "int64"},
                  "pixel_values": {"dtype": "float32", "encoding":
                                   {"stored": "uint8", "scale": 0.0039215, "offset": 0.0}}},
       "image_token_id": 2,            # optional: derive the modality mask from input_ids
       "answer_position": "last",      # where the answer is read (the last position)
       "families": ["cell", ...],      # optional: names for the ``family`` codes
       "vocab": ["<pad>", ...]}        # optional: token strings, for display only

- ``input/<name>``: one array per model input, first axis = samples. Sequences are left-padded
  to one length so that the last position is the answer position of every sample.
- ``modality``: int8 [S, T], 0 = padding, 1 = text, 2 = vision. Optional when the header
  gives ``image_token_id`` (then vision = input_ids == image_token_id, padding =
  attention_mask == 0, text = the rest).
- ``answer``: int64 [S], the answer token id (eval sets; optional for calibration); or
  int64 [S, A] for multi-token answers: each row's n tokens, then -1 padding. The inputs then
  end with the answer's first n - 1 tokens (teacher forcing), so answer token j is predicted
  at position T - n + j and the last one, as always, at the last position.
- ``family``: int64 [S], index into ``families`` (optional).

Readers get a `Dataset` whose ``inputs`` are decoded to the declared dtypes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modec import kv_cache
from modec.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "modec-dataset"
VERSION = 1
PAD, TEXT, VISION = 0, 1, 2
MODALITY_NAMES = {PAD: "padding", TEXT: "text", VISION: "vision"}


@dataclass(frozen=True)
class InputSpec:
    """What a model expects of one input: its dtype and shape (None = dynamic axis)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass
class Dataset:
    """A decoded dataset. ``inputs`` arrays share their first (sample) axis."""

    path: str
    inputs: dict[str, np.ndarray]
    modality: np.ndarray
    answer: np.ndarray | None = None
    family: np.ndarray | None = None
    header: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.modality.shape[0])

    @property
    def families(self) -> list[str]:
        return list(self.header.get("families", []))

    @property
    def multimodal(self) -> np.ndarray:
        """Boolean [S]: the sample has at least one vision token."""
        return np.asarray((self.modality == VISION).any(axis=1))

    def subset(self, index: np.ndarray | slice) -> Dataset:
        """A view of some samples (same header)."""
        return Dataset(
            path=self.path,
            inputs={k: v[index] for k, v in self.inputs.items()},
            modality=self.modality[index],
            answer=None if self.answer is None else self.answer[index],
            family=None if self.family is None else self.family[index],
            header=self.header,
        )

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield (sample indices, inputs) in order, trimmed to the longest sample in the batch.

        Sequences are left-padded, so the leading columns that are padding for every sample
        of a batch are dropped (text-only batches then run at their own short length).
        """
        n = len(self)
        seq_axes = _sequence_inputs(self)
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size))
            mod = self.modality[idx]
            used = (mod != PAD).any(axis=0)
            first = int(np.argmax(used)) if used.any() else mod.shape[1] - 1
            batch = {}
            for name, arr in self.inputs.items():
                a = arr[idx]
                batch[name] = a[:, first:] if name in seq_axes else a
            yield idx, batch

    def prompt(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index``'s inputs as a one-sample batch (trimmed like `batches`), without
        the answer tokens a multi-token answer's input ends with (teacher forcing): the
        prompt a generator continues."""
        _, feeds = next(self.subset(np.asarray([index])).batches(1))
        if self.answer is None or self.answer.ndim == 1:
            return feeds
        cut = int(answer_lengths(self.answer[index : index + 1])[0]) - 1
        if cut == 0:
            return feeds
        seq = _sequence_inputs(self)
        return {k: (v[:, :-cut] if k in seq else v) for k, v in feeds.items()}

    def trimmed_modality(self, idx: np.ndarray) -> np.ndarray:
        """The modality mask of the samples ``idx``, trimmed like `batches` trims inputs."""
        mod = self.modality[idx]
        used = (mod != PAD).any(axis=0)
        first = int(np.argmax(used)) if used.any() else mod.shape[1] - 1
        return np.asarray(mod[:, first:])


def _sequence_inputs(ds: Dataset) -> set[str]:
    """Inputs whose second axis is the token axis (same length as the modality mask)."""
    t = ds.modality.shape[1]
    return {name for name, a in ds.inputs.items() if a.ndim == 2 and a.shape[1] == t and a.shape[0]}


def derive_modality(
    input_ids: np.ndarray, image_token_id: int, attention_mask: np.ndarray | None = None
) -> np.ndarray:
    """Modality mask from an image placeholder token: vision where input_ids == image_token_id."""
    mod = np.full(input_ids.shape, TEXT, dtype=np.int8)
    mod[input_ids == image_token_id] = VISION
    if attention_mask is not None:
        mod[attention_mask == 0] = PAD
    return mod


def save(
    path: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    *,
    modality: np.ndarray | None,
    answer: np.ndarray | None = None,
    family: np.ndarray | None = None,
    header: Mapping[str, Any] | None = None,
    encodings: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write a dataset atomically (temp file + rename).

    Args:
        path: the ``.npz`` to write.
        inputs: model inputs, decoded (in the model's dtypes).
        modality: int8 [S, T] mask, or None when the header gives ``image_token_id``.
        answer: answer token ids, or None.
        family: family codes, or None.
        header: extra header fields (``image_token_id``, ``families``, ``vocab`` ...).
        encodings: per input, a storage encoding ``{"stored": "uint8", "scale": s,
            "offset": o}``: stored = round((x - o) / s). The values must be exactly
            representable, which is checked.
    """
    head: dict[str, Any] = {"format": FORMAT, "version": VERSION, "answer_position": "last"}
    head.update(header or {})
    head["inputs"] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, arr in inputs.items():
        spec: dict[str, Any] = {"dtype": str(arr.dtype)}
        enc = (encodings or {}).get(name)
        if enc is not None:
            stored = np.round((arr - enc["offset"]) / enc["scale"]).astype(enc["stored"])
            back = (stored.astype(arr.dtype) * arr.dtype.type(enc["scale"])) + arr.dtype.type(
                enc["offset"]
            )
            if not np.array_equal(back, arr):
                raise DataError(
                    f"{path}: input {name!r} is not exactly representable with encoding {enc}; "
                    "quantize the values first or drop the encoding"
                )
            spec["encoding"] = dict(enc)
            arrays[f"input/{name}"] = stored
        else:
            arrays[f"input/{name}"] = arr
        head["inputs"][name] = spec
    if modality is not None:
        arrays["modality"] = modality.astype(np.int8)
    if answer is not None:
        arrays["answer"] = answer.astype(np.int64)
    if family is not None:
        arrays["family"] = family.astype(np.int64)
    arrays["__header__"] = np.array(json.dumps(head, sort_keys=True))
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp.npz")
    os.close(fd)
    try:
        # Fixed zip timestamps would need a custom writer; np.savez_compressed writes a fixed
        # date already (1980-01-01), so the file is byte-identical for identical arrays.
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; use what open() would
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load(path: str | os.PathLike[str]) -> Dataset:
    """Read and validate a dataset file; every problem is a one-line `DataError`."""
    p = str(path)
    if not os.path.exists(p):
        raise DataError(f"{p}: no such data file; pass an existing .npz made by modec's tools")
    try:
        npz = np.load(p, allow_pickle=False)
        files = set(npz.files)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{p}: not a readable .npz dataset ({exc}); regenerate the file") from exc
    with npz:
        if "__header__" not in files:
            raise DataError(
                f"{p}: missing key '__header__' (JSON header); write the file with modec.data.save"
            )
        try:
            header = json.loads(str(npz["__header__"]))
        except (json.JSONDecodeError, ValueError) as exc:
            raise DataError(f"{p}: key '__header__' is not valid JSON ({exc})") from exc
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise DataError(
                f"{p}: header says format {header.get('format')!r} version "
                f"{header.get('version')!r}; expected {FORMAT!r} version {VERSION}"
            )
        specs = header.get("inputs")
        if not isinstance(specs, dict) or not specs:
            raise DataError(f"{p}: header has no 'inputs'; list the model inputs it stores")
        inputs: dict[str, np.ndarray] = {}
        for name, spec in specs.items():
            key = f"input/{name}"
            if key not in files:
                raise DataError(f"{p}: missing key {key!r} declared in the header")
            arr = npz[key]
            enc = spec.get("encoding")
            if enc is not None:
                dt = np.dtype(spec["dtype"])
                arr = arr.astype(dt) * dt.type(enc["scale"]) + dt.type(enc["offset"])
            elif str(arr.dtype) != spec["dtype"]:
                raise DataError(
                    f"{p}: key {key!r} has dtype {arr.dtype}, header says {spec['dtype']}"
                )
            inputs[name] = arr
        n = {a.shape[0] for a in inputs.values()}
        if len(n) != 1:
            raise DataError(
                f"{p}: inputs disagree on the number of samples "
                f"({ {k: v.shape[0] for k, v in inputs.items()} }); every input needs one row "
                "per sample"
            )
        count = n.pop()
        if count == 0:
            raise DataError(f"{p}: the dataset is empty; it needs at least one sample")
        if "modality" in files:
            modality = npz["modality"]
        elif "image_token_id" in header and "input_ids" in inputs:
            modality = derive_modality(
                inputs["input_ids"], int(header["image_token_id"]), inputs.get("attention_mask")
            )
        else:
            raise DataError(
                f"{p}: missing key 'modality' and no 'image_token_id' in the header; store a "
                "modality mask (0 pad, 1 text, 2 vision) or name the image token id"
            )
        if modality.ndim != 2 or modality.shape[0] != count:
            raise DataError(
                f"{p}: key 'modality' has shape {modality.shape}; expected [{count}, T]"
            )
        for name, arr in inputs.items():
            if arr.ndim == 2 and arr.dtype.kind in "iu" and arr.shape[1] != modality.shape[1]:
                raise DataError(
                    f"{p}: key 'modality' has length {modality.shape[1]} but input {name!r} has "
                    f"{arr.shape[1]} tokens; the mask needs one entry per token"
                )
        if not np.isin(modality, (PAD, TEXT, VISION)).all():
            raise DataError(f"{p}: key 'modality' holds values other than 0, 1, 2")
        answer = npz["answer"] if "answer" in files else None
        family = npz["family"] if "family" in files else None
        if family is not None and family.shape != (count,):
            raise DataError(f"{p}: key 'family' has shape {family.shape}; expected ({count},)")
        if answer is not None:
            _check_answer(p, answer, inputs, count)
    return Dataset(p, inputs, modality.astype(np.int8), answer, family, header)


def _check_answer(p: str, answer: np.ndarray, inputs: dict[str, np.ndarray], count: int) -> None:
    """``answer`` is [S] (one token) or [S, A] (multi-token: each row's tokens, then -1s; the
    sequence input ``input_ids`` must end with each row's answer but its last token)."""
    if answer.ndim == 1 and answer.shape == (count,):
        return
    if answer.ndim != 2 or answer.shape[0] != count or answer.shape[1] < 1:
        raise DataError(
            f"{p}: key 'answer' has shape {answer.shape}; expected ({count},) or ({count}, A)"
        )
    lengths = answer_lengths(answer)
    tokens = np.arange(answer.shape[1]) < lengths[:, None]
    ok = (lengths > 0) & ((answer >= 0) == tokens).all(axis=1)
    ok &= ((answer == -1) | tokens).all(axis=1)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise DataError(
            f"{p}: key 'answer' row {bad} is {answer[bad].tolist()}; a multi-token answer is "
            "one or more token ids followed only by -1 padding"
        )
    if lengths.max() == 1:
        return
    ids = inputs.get("input_ids")
    if ids is None or ids.ndim != 2:
        raise DataError(
            f"{p}: key 'answer' holds multi-token answers but there is no [S, T] input "
            "'input_ids'; the inputs must end with each answer's tokens but the last "
            "(teacher forcing)"
        )
    for i in np.flatnonzero(lengths > 1):
        n = int(lengths[i])
        tail = ids[i, ids.shape[1] - n + 1 :]
        if n > ids.shape[1] or not np.array_equal(tail, answer[i, : n - 1]):
            raise DataError(
                f"{p}: sample {int(i)}: input_ids ends with {ids[i, -(n - 1) :].tolist()} but its "
                f"answer starts with {answer[i, : n - 1].tolist()}; a multi-token answer's tokens "
                "but the last must end the input (teacher forcing)"
            )


def answer_lengths(answer: np.ndarray) -> np.ndarray:
    """Tokens per answer: 1 for a [S] answer array, the non-padding count of a [S, A] one."""
    if answer.ndim == 1:
        return np.ones(len(answer), dtype=np.int64)
    return np.asarray((answer >= 0).sum(axis=1), dtype=np.int64)


def with_model_inputs(ds: Dataset, specs: list[InputSpec]) -> Dataset:
    """``ds`` checked against the model's inputs (`check_against`), with an empty KV cache
    (P = 0, `modec.kv_cache`) for every cache input of a model exported with one: a data
    set holds prompts; the cache is what a model adds to them."""
    check_against(ds, specs)
    sig = kv_cache.find(specs)
    if sig is None or sig.past_names <= set(ds.inputs):
        return ds
    empty = kv_cache.empty_inputs(sig, len(ds))
    inputs = {**ds.inputs, **{k: v for k, v in empty.items() if k not in ds.inputs}}
    return Dataset(ds.path, inputs, ds.modality, ds.answer, ds.family, ds.header)


def check_against(ds: Dataset, specs: list[InputSpec]) -> None:
    """Check that a dataset provides every model input with the right dtype and rank/shape
    (a KV-cache input it lacks is not an error: `with_model_inputs` adds it, empty)."""
    for spec in specs:
        if spec.name not in ds.inputs and kv_cache.is_past(spec.name):
            continue
        if spec.name not in ds.inputs:
            raise DataError(
                f"{ds.path}: missing key 'input/{spec.name}' (model input {spec.name!r}, "
                f"{spec.dtype}, shape {list(spec.shape)})"
            )
        arr = ds.inputs[spec.name]
        if str(arr.dtype) != spec.dtype:
            raise DataError(
                f"{ds.path}: key 'input/{spec.name}' has dtype {arr.dtype}; the model expects "
                f"{spec.dtype}"
            )
        if len(arr.shape) != len(spec.shape) or any(
            isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape, strict=True)
        ):
            raise DataError(
                f"{ds.path}: key 'input/{spec.name}' has shape {list(arr.shape)}; the model "
                f"expects {list(spec.shape)}"
            )
    extra = set(ds.inputs) - {s.name for s in specs}
    if extra:
        raise DataError(
            f"{ds.path}: inputs {sorted(extra)} are not inputs of the model "
            f"(model inputs: {[s.name for s in specs]})"
        )
