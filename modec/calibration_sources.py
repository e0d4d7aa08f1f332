"""Where `modec calib build` takes its samples from: prompt files, image folders, a data set.

Each source gives `Sample`s (text, and an image loader for multimodal ones); bad files, missing
columns and unreadable images are one-line `BadInputError`s naming the file and line or row.
`modec.calibration` tokenizes, mixes and writes them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modec.errors import BadInputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class Sample:
    """One calibration sample before tokenization."""

    source: str  # where it came from, for error messages (``prompts.jsonl:3``)
    text: str
    image: Callable[[], Any] | None = None  # loads the PIL image
    image_name: str = ""


def read_jsonl(
    path: str | os.PathLike[str], keys: Sequence[str]
) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-empty line; a JSON string is ``{keys[0]: s}``."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{path}: no such file; pass a JSON-lines file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: not readable as UTF-8 text ({exc})") from exc
    out: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if isinstance(obj, str):
            obj = {keys[0]: obj}
        if not isinstance(obj, dict):
            raise BadInputError(
                f"{path}:{n}: expected a JSON object or string, got {type(obj).__name__}"
            )
        text = next((obj[k] for k in keys if k in obj), None)
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(
                f'{path}:{n}: no text; write {{"{keys[0]}": "..."}} or a JSON string'
            )
        out.append((n, {**obj, keys[0]: text}))
    if not out:
        raise BadInputError(f"{path}: holds no lines; it needs at least one")
    return out


def list_images(spec: str | os.PathLike[str]) -> tuple[list[Path], Path]:
    """The images of a directory (name order) or a list file; and the base directory."""
    p = Path(spec)
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise BadInputError(
                f"{spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the directory"
            )
        return found, p
    if not p.is_file():
        raise BadInputError(f"{spec}: no such directory or list file of images")
    try:
        names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{spec}: not a readable list of image paths ({exc})") from exc
    paths = [(p.parent / n) if not Path(n).is_absolute() else Path(n) for n in names if n]
    if not paths:
        raise BadInputError(f"{spec}: the image list is empty")
    for q in paths:
        if not q.is_file():
            raise BadInputError(f"{q}: no such image (listed in {spec})")
    return paths, p.parent


def _image_loader(path: Path) -> Callable[[], Any]:
    def load() -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BadInputError(f"{path}: not a readable image ({cause})") from exc

    return load


def samples_from_files(
    images: str | os.PathLike[str] | None,
    prompts: str | os.PathLike[str] | None,
    text_only: str | os.PathLike[str] | None,
    vlm: bool,
    model: str | os.PathLike[str] = "",
) -> tuple[list[Sample], list[Sample]]:
    """``(multimodal, text-only)`` samples from image files and JSON-lines prompts."""
    mm: list[Sample] = []
    text: list[Sample] = []
    if images is not None and not vlm:
        raise BadInputError(
            f"--images {images}: {model} is a text-only model (no image processor in the "
            "directory); pass --prompts alone to build text samples"
        )
    if prompts is not None and not vlm:
        text += [Sample(f"{prompts}:{n}", obj["prompt"])
                 for n, obj in read_jsonl(prompts, ("prompt", "text"))]  # fmt: skip
    elif prompts is not None:
        lines = read_jsonl(prompts, ("prompt", "text"))
        files, base = list_images(images) if images is not None else ([], Path(prompts).parent)
        named = set()
        for n, obj in lines:
            if "image" not in obj:
                continue
            q = Path(str(obj["image"]))
            q = q if q.is_absolute() else base / q
            if not q.is_file():
                raise BadInputError(f"{prompts}:{n}: no such image {q}")
            named.add(q.resolve())
            mm.append(Sample(f"{prompts}:{n}", obj["prompt"], _image_loader(q), str(q)))
        free = [(n, obj) for n, obj in lines if "image" not in obj]
        rest = [q for q in files if q.resolve() not in named]
        if free and not rest:
            n = free[0][0]
            raise BadInputError(
                f"{prompts}:{n}: names no image and no --images are left to pair it with; "
                'pass --images DIR, add an "image" key, or put text-only prompts in '
                "--text-only"
            )
        if rest and not free:
            raise BadInputError(
                f"--images {images}: {len(rest)} image(s) no prompt line names, and {prompts} "
                'has no line without an "image" to pair them with'
            )
        for i, q in enumerate(rest):
            n, obj = free[i % len(free)]
            mm.append(Sample(f"{prompts}:{n}", obj["prompt"], _image_loader(q), str(q)))
    elif images is not None:
        raise BadInputError(f"--images {images}: needs --prompts (what to ask about each image)")
    if text_only is not None:
        text += [Sample(f"{text_only}:{n}", obj["text"])
                 for n, obj in read_jsonl(text_only, ("text", "prompt"))]  # fmt: skip
    return mm, text


def samples_from_dataset(
    path: str | os.PathLike[str],
    text_column: str,
    image_column: str | None,
    vlm: bool,
    split: str | None = None,
    model: str | os.PathLike[str] = "",
) -> tuple[list[Sample], list[Sample]]:
    """``(multimodal, text-only)`` samples from a ``datasets`` data set on disk."""
    if image_column is not None and not vlm:
        raise BadInputError(
            f"--image-column {image_column}: {model} is a text-only model (no image processor "
            "in the directory); drop --image-column to build text samples"
        )
    if not Path(path).is_dir():
        raise BadInputError(f"{path}: no such directory; pass a data set saved with save_to_disk")
    import datasets

    try:
        loaded: Any = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(
            f"{path}: not a data set saved with datasets' save_to_disk ({cause})"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        pick = split or ("train" if "train" in names else names[0])
        if pick not in names:
            raise BadInputError(f"{path}: no split {pick!r}; it has {names}")
        loaded = loaded[pick]
    elif split is not None:
        log.info("%s: one split; --split %s ignored", path, split)
    columns = list(loaded.column_names)
    for flag, col in (("--text-column", text_column), ("--image-column", image_column)):
        if col is not None and col not in columns:
            raise BadInputError(f"{path}: no column {col!r} ({flag}); its columns are {columns}")
    if vlm and image_column is None:
        log.info("%s: no --image-column; every row is a text-only sample", path)
    if image_column is not None and isinstance(loaded.features[image_column], datasets.Image):
        loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
    mm: list[Sample] = []
    text: list[Sample] = []
    texts = loaded[text_column]
    cells = loaded[image_column] if image_column is not None else [None] * len(texts)
    for i, (t, cell) in enumerate(zip(texts, cells, strict=True)):
        source = f"{path} row {i}"
        if not isinstance(t, str) or not t.strip():
            raise BadInputError(f"{source}: column {text_column!r} holds no text ({t!r})")
        if cell is None:
            text.append(Sample(source, t))
        else:
            mm.append(Sample(source, t, _cell_loader(cell, Path(path), source), source))
    return mm, text


def _cell_loader(cell: Any, base: Path, source: str) -> Callable[[], Any]:
    """A loader for one image cell: a PIL image, a path, or ``{"bytes": ..., "path": ...}``."""

    def load() -> Any:
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            if isinstance(cell, Image.Image):
                return cell
            if isinstance(cell, dict) and cell.get("bytes"):
                with Image.open(io.BytesIO(cell["bytes"])) as im:
                    im.load()
                    return im.copy()
            where = cell.get("path") if isinstance(cell, dict) else cell
            if isinstance(where, str):
                q = Path(where) if Path(where).is_absolute() else base / where
                return _image_loader(q)()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BadInputError(f"{source}: not a readable image ({cause})") from exc
        raise BadInputError(f"{source}: the image cell holds {type(cell).__name__}, not an image")

    return load
