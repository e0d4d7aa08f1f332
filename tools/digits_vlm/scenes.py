"""Digit scenes: a small multimodal question-answering dataset built from real scanned digits.

Images are 64×64 canvases holding 1–3 handwritten digits from scikit-learn's bundled
``load_digits`` (1,797 scans of 8×8 pixels, shipped inside the package: no download),
upscaled 2× into the cells of a 4×4 grid, on a low-noise background. With 8×8-pixel
patches an image is 64 vision tokens, of which a digit covers 4: at least 81% of the vision
tokens of every image are background, as in real images where most vision tokens are
redundant.

Questions are short word sequences with a single-token answer:

- multimodal (need the image): ``cell`` (digit at a named cell), ``count``, ``sum``,
  ``max``, ``present`` (is digit d in the image);
- text-only (carry no vision tokens): ``arith`` (plus / minus), ``compare``, ``succ``
  (successor / predecessor), ``parity``.

A sample is ``<bos> <image>×64 question...`` (text-only: ``<bos> question...``), left-padded;
the answer is predicted at the last position. Everything is deterministic from a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

CANVAS = 64
CELL = 16  # a 4×4 grid of 16×16 cells; a digit is upscaled 8×8 → 16×16
GRID = CANVAS // CELL
PATCH = 8
NUM_PATCHES = (CANVAS // PATCH) ** 2
NOISE = 0.04  # background noise amplitude (pixels are in [0, 1])
PIXEL_LEVELS = 255  # images are stored as k / 255 so the dataset file can hold uint8

SPECIALS = ["<pad>", "<bos>", "<image>", "?"]
NUMBERS = [str(i) for i in range(28)]  # sums of up to three digits reach 27
WORDS = [
    "what",
    "digit",
    "is",
    "at",
    "row",
    "col",
    "how",
    "many",
    "digits",
    "the",
    "sum",
    "of",
    "largest",
    "there",
    "a",
    "plus",
    "minus",
    "greater",
    "than",
    "comes",
    "after",
    "before",
    "even",
    "odd",
    "yes",
    "no",
]
VOCAB = SPECIALS + NUMBERS + WORDS
TOKEN = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, IMAGE_ID = TOKEN["<pad>"], TOKEN["<bos>"], TOKEN["<image>"]

MULTIMODAL_FAMILIES = ["cell", "count", "sum", "max", "present"]
TEXT_FAMILIES = ["arith", "compare", "succ", "parity"]
FAMILIES = MULTIMODAL_FAMILIES + TEXT_FAMILIES
MAX_QUESTION = 12  # words, including '?'
SEQ_LEN = 1 + NUM_PATCHES + MAX_QUESTION


@dataclass(frozen=True)
class DigitPool:
    """A disjoint subset of the scanned digits: images in [0, 1] (8×8) and labels."""

    images: np.ndarray
    labels: np.ndarray

    def by_label(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.labels == d) for d in range(10)]


def digit_pools(seed: int = 0) -> dict[str, DigitPool]:
    """Split the 1,797 scans into disjoint pools: train 70%, calib 10%, eval 20%.

    The split is stratified by label so every pool holds every digit.
    """
    from sklearn.datasets import load_digits  # tools-only dependency

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "calib": [], "eval": []}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        a, b = int(0.7 * len(idx)), int(0.8 * len(idx))
        parts["train"] += idx[:a].tolist()
        parts["calib"] += idx[a:b].tolist()
        parts["eval"] += idx[b:].tolist()
    return {k: DigitPool(images[sorted(v)], labels[sorted(v)]) for k, v in parts.items()}


def render(
    pool: DigitPool, rng: np.random.Generator, n_digits: int, size: int = CANVAS,
    cell: int = CELL, reading_order: bool = False,
) -> tuple[np.ndarray, dict[tuple[int, int], int]]:  # fmt: skip
    """Draw ``n_digits`` random scans into distinct random cells of a noisy ``size``²
    canvas (``cell``-pixel cells; facts-vlm: 128 and 16). ``reading_order``: fill the cells
    row by row, so the returned dict lists the digits in reading order."""
    grid = size // cell
    canvas = rng.uniform(0.0, NOISE, size=(size, size)).astype(np.float32)
    cells = rng.choice(grid * grid, size=n_digits, replace=False)
    placed: dict[tuple[int, int], int] = {}
    for c in sorted(int(v) for v in cells) if reading_order else cells:
        k = int(rng.integers(len(pool.labels)))
        big = np.kron(pool.images[k], np.ones((2, 2), dtype=np.float32))
        r, col = divmod(int(c), grid)
        y, x = r * cell, col * cell
        canvas[y : y + cell, x : x + cell] = np.maximum(canvas[y : y + cell, x : x + cell], big)
        placed[(r, col)] = int(pool.labels[k])
    # Pixels are k / 255 computed as the dataset reader decodes them (k · float32(1/255)),
    # so the files can store them exactly as uint8.
    levels = np.round(canvas * PIXEL_LEVELS).astype(np.float32)
    return levels * np.float32(1.0 / PIXEL_LEVELS), placed


def question(
    family: str, rng: np.random.Generator, placed: dict[tuple[int, int], int] | None
) -> tuple[list[str], str]:
    """A question of one family and its single-token answer."""
    if family == "cell":
        assert placed
        (r, c), d = list(placed.items())[int(rng.integers(len(placed)))]
        return ["what", "digit", "is", "at", "row", str(r + 1), "col", str(c + 1), "?"], str(d)
    if family == "count":
        assert placed
        return ["how", "many", "digits", "?"], str(len(placed))
    if family == "sum":
        assert placed
        return ["what", "is", "the", "sum", "of", "digits", "?"], str(sum(placed.values()))
    if family == "max":
        assert placed
        return ["what", "is", "the", "largest", "digit", "?"], str(max(placed.values()))
    if family == "present":
        assert placed
        present = set(placed.values())
        want = bool(rng.integers(2))
        pick = sorted(present) if want else sorted(set(range(10)) - present)
        d = pick[int(rng.integers(len(pick)))]
        return ["is", "there", "a", str(d), "?"], "yes" if want else "no"
    if family == "arith":
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        if rng.integers(2):
            return ["what", "is", str(a), "plus", str(b), "?"], str(a + b)
        a, b = max(a, b), min(a, b)
        return ["what", "is", str(a), "minus", str(b), "?"], str(a - b)
    if family == "compare":
        a, b = (int(v) for v in rng.choice(10, size=2, replace=False))
        return ["is", str(a), "greater", "than", str(b), "?"], "yes" if a > b else "no"
    if family == "succ":
        if rng.integers(2):
            a = int(rng.integers(0, 10))
            return ["what", "comes", "after", str(a), "?"], str(a + 1)
        a = int(rng.integers(1, 11))
        return ["what", "comes", "before", str(a), "?"], str(a - 1)
    if family == "parity":
        a = int(rng.integers(0, 28))
        kind = "even" if rng.integers(2) else "odd"
        return ["is", str(a), kind, "?"], "yes" if (a % 2 == 0) == (kind == "even") else "no"
    raise ValueError(f"unknown family {family!r}")


@dataclass(frozen=True)
class Sample:
    family: str
    tokens: list[int]  # unpadded
    image: np.ndarray | None  # [64, 64] or None for text-only
    answer: int
    patch_labels: np.ndarray | None = None  # [64]: digit under each patch, 10 = background
    #: (token index, answer id) of every question; empty = just the last position.
    targets: tuple[tuple[int, int], ...] = ()


def patch_labels(
    placed: dict[tuple[int, int], int], size: int = CANVAS, cell: int = CELL
) -> np.ndarray:
    """The digit covering each 8×8 patch (row-major), 10 for background."""
    side = size // PATCH
    labels = np.full((side, side), 10, dtype=np.int64)
    per_cell = cell // PATCH
    for (r, c), d in placed.items():
        labels[r * per_cell : (r + 1) * per_cell, c * per_cell : (c + 1) * per_cell] = d
    return labels.reshape(-1)


def make_sample(family: str, pool: DigitPool, rng: np.random.Generator) -> Sample:
    if family in MULTIMODAL_FAMILIES:
        image, placed = render(pool, rng, int(rng.integers(1, 4)))
        words, ans = question(family, rng, placed)
        tokens = [BOS_ID] + [IMAGE_ID] * NUM_PATCHES + [TOKEN[w] for w in words]
        return Sample(family, tokens, image, TOKEN[ans], patch_labels(placed))
    words, ans = question(family, rng, None)
    return Sample(family, [BOS_ID] + [TOKEN[w] for w in words], None, TOKEN[ans])


def make_dialogue(multimodal: bool, pool: DigitPool, rng: np.random.Generator,
                  turns: int) -> Sample:  # fmt: skip
    """Several questions about one image (or text-only), each answered before the next.

    Training only: every question's answer is supervised at its '?' position, so one
    forward pass trains ``turns`` answers. The first turn is exactly an evaluation-style
    sample, since attention is causal.
    """
    families = MULTIMODAL_FAMILIES if multimodal else TEXT_FAMILIES
    placed = None
    tokens = [BOS_ID]
    image = labels = None
    if multimodal:
        image, placed = render(pool, rng, int(rng.integers(1, 4)))
        labels = patch_labels(placed)
        tokens += [IMAGE_ID] * NUM_PATCHES
    targets = []
    first = ""
    # Distinct families per dialogue, so a later answer cannot be copied from an earlier one.
    picks = rng.choice(len(families), size=min(turns, len(families)), replace=False)
    for turn, f in enumerate(picks):
        fam = families[int(f)]
        first = first or fam
        words, ans = question(fam, rng, placed)
        tokens += [TOKEN[w] for w in words]
        targets.append((len(tokens) - 1, TOKEN[ans]))
        if turn + 1 < len(picks):
            tokens.append(TOKEN[ans])
    return Sample(first, tokens, image, targets[-1][1], labels, tuple(targets))


def collate(
    samples: list[Any], seq_len: int | None = None, *, size: int = CANVAS,
    num_patches: int = NUM_PATCHES, families: list[str] = FAMILIES, image_id: int = IMAGE_ID,
    pad_id: int = PAD_ID, answer_width: int | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Left-pad a list of samples into model inputs plus modality / answer / family arrays.

    One-token answers (``answer_width`` None) give ``answer`` [S], read at the last
    position. Otherwise each sample's answer is a tuple of token ids, the input ends with
    all of them but the last, and ``answer`` is [S, answer_width] right-padded with -1
    (docs/data-format.md, multi-token answers). The keyword arguments are facts-vlm's
    shapes and vocabulary where it calls this."""
    t = seq_len or max(len(s.tokens) for s in samples)
    n = len(samples)
    ids = np.full((n, t), pad_id, dtype=np.int64)
    mask = np.zeros((n, t), dtype=np.int64)
    modality = np.zeros((n, t), dtype=np.int8)
    pixels = np.zeros((n, 1, size, size), dtype=np.float32)
    patches = np.full((n, num_patches), -100, dtype=np.int64)
    targets = np.full((n, t), -100, dtype=np.int64)
    if answer_width is None:
        answer = np.array([s.answer for s in samples], dtype=np.int64)
    else:
        answer = np.full((n, answer_width), -1, dtype=np.int64)
    for i, s in enumerate(samples):
        L = len(s.tokens)
        ids[i, t - L :] = s.tokens
        mask[i, t - L :] = 1
        modality[i, t - L :] = np.where(np.asarray(s.tokens) == image_id, 2, 1)
        if s.image is not None:
            pixels[i, 0] = s.image
        if s.patch_labels is not None:
            patches[i] = s.patch_labels
        if answer_width is None:
            pairs = s.targets or ((L - 1, s.answer),)
        else:
            answer[i, : len(s.answer)] = s.answer
            pairs = s.targets or tuple((L - len(s.answer) + j, a) for j, a in enumerate(s.answer))
        for pos, tgt in pairs:
            targets[i, t - L + pos] = tgt
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "modality": modality,
        "answer": answer,
        "family": np.array([families.index(s.family) for s in samples], dtype=np.int64),
        "patch_labels": patches,
        "targets": targets,
    }


def make_split(
    pool: DigitPool, families_counts: dict[str, int], seed: int, shuffle: bool = True,
    make: Callable[[str, DigitPool, np.random.Generator], Any] | None = None,
) -> list[Any]:  # fmt: skip
    """Deterministic samples: ``families_counts[f]`` of each family, shuffled with ``seed``;
    ``make`` builds one sample (default: this module's `make_sample`)."""
    make = make or make_sample
    rng = np.random.default_rng(seed)
    samples = [make(f, pool, rng) for f, n in families_counts.items() for _ in range(n)]
    if shuffle:
        order = rng.permutation(len(samples))
        samples = [samples[i] for i in order]
    return samples
