"""facts-vlm's data: busy digit scenes and a table of invented facts (a harder stick than
digits-vlm, built to feel quantization; docs/results.md, docs/results_facts.md).

Images are 128×128 canvases holding 1–4 scanned digits (scikit-learn's bundled
``load_digits``, split into the same disjoint train / calibration / evaluation pools as
digits-vlm), upscaled 2× into the cells of an 8×8 grid on a noisy background. With 8×8-pixel
patches an image is **256 vision tokens**, of which a digit covers 4: at least 93.75% of the
vision tokens of every image are background.

Questions are word sequences; answers are one or more tokens (multi-token answers end with
``end``):

- multimodal: ``count``, ``sum``, ``max``, ``present`` (is digit d in the image), ``left``
  (is the a left of the b: a relation between two digits), ``where`` (row and column of a
  digit: ``r c end``), ``list`` (the digits in reading order: ``d … end``);
- text-only, computed: ``arith`` (plus / minus), ``compare``;
- text-only, **memorized**: ``color``, ``city`` and ``code`` (two digits, ``d d end``) of one
  of 1,024 invented entities named by two syllables (``ka ron``). The table is fixed by
  `FACT_SEED`; the answers cannot be computed from the question, so a model can only store
  them in its weights — as real LLMs store knowledge in their FFN layers.

A sample is ``<bos> <image>×256 question... answer[:-1]`` (text-only: no image tokens),
left-padded; the answer's tokens are predicted at the last positions (docs/data-format.md,
multi-token answers). Everything is deterministic from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from tools.digits_vlm import scenes as digits
from tools.digits_vlm.scenes import DigitPool, digit_pools

__all__ = ["DigitPool", "digit_pools"]

#: Pixels are multiples of 1/255 (the data sets store them as uint8), as in digits-vlm.
PIXEL_LEVELS = digits.PIXEL_LEVELS
CANVAS = 128
CELL = 16  # an 8×8 grid of 16×16 cells; a digit is upscaled 8×8 → 16×16
GRID = CANVAS // CELL
PATCH = 8
NUM_PATCHES = (CANVAS // PATCH) ** 2
MAX_DIGITS = 4

#: Entity names: two syllables, 32 of each: 1,024 entities. Training mentions them with a
#: long tail (`POPULARITY`), as pretraining text mentions real entities; calibration and
#: evaluation draw them uniformly (examples/facts-vlm/README.md, "Design history").
FIRST = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "tu", "va", "we", "xi", "yo", "za", "bo", "ce",
         "du", "ba", "fa", "ga", "ha", "ja", "ke", "le", "me", "ne", "po", "ru", "si", "te", "vi",
         "wo", "zu"]  # fmt: skip
SECOND = ["ron", "tis", "bel", "mar", "dun", "fez", "gal", "hop", "jin", "kur", "lev", "mox",
          "nib", "pol", "qua", "sek", "dak", "fim", "gor", "hul", "jex", "kip", "lom", "mun",
          "nox", "pid", "rax", "sul", "tov", "vim", "wex", "zor"]  # fmt: skip
COLORS = ["red", "blue", "green", "black", "white", "gray", "pink", "brown"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito"]
#: What writes facts-vlm's data sets (their header's ``source``).
DATA_SOURCE = "tools/facts_vlm/build.py"
#: The seed of the fact table (fixed: the facts are the model's knowledge, not a data split).
FACT_SEED = 20261205
#: Training draws the entity of popularity rank r (1-based, over a permutation fixed by
#: `FACT_SEED`) with probability ∝ r^-ZIPF: the head is mentioned often, the tail rarely.
ZIPF = 0.6

SPECIALS = ["<pad>", "<bos>", "<image>", "?", "end"]
NUMBERS = [str(i) for i in range(37)]  # sums of up to four digits reach 36
WORDS = ["what", "is", "the", "how", "many", "digits", "sum", "of", "largest", "digit", "there",
         "a", "left", "where", "list", "plus", "minus", "greater", "than", "color", "does",
         "live", "code", "yes", "no"]  # fmt: skip
VOCAB = SPECIALS + NUMBERS + WORDS + FIRST + SECOND + COLORS + CITIES
TOKEN = {w: i for i, w in enumerate(VOCAB)}
assert len(TOKEN) == len(VOCAB), "duplicate words"
PAD_ID, BOS_ID, IMAGE_ID, END_ID = TOKEN["<pad>"], TOKEN["<bos>"], TOKEN["<image>"], TOKEN["end"]

MULTIMODAL_FAMILIES = ["count", "sum", "max", "present", "left", "where", "list"]
COMPUTED_FAMILIES = ["arith", "compare"]
KNOWLEDGE_FAMILIES = ["color", "city", "code"]
TEXT_FAMILIES = COMPUTED_FAMILIES + KNOWLEDGE_FAMILIES
FAMILIES = MULTIMODAL_FAMILIES + TEXT_FAMILIES
#: The longest question + answer prefix in words ("where is the 7 ?" + "r c").
MAX_TEXT = 12
SEQ_LEN = 1 + NUM_PATCHES + MAX_TEXT
MAX_ANSWER = MAX_DIGITS + 1


@dataclass(frozen=True)
class Entity:
    name: tuple[str, str]
    color: str
    city: str
    code: tuple[int, int]


def fact_table() -> list[Entity]:
    """The 1,024 invented entities and their attributes (deterministic from `FACT_SEED`)."""
    rng = np.random.default_rng(FACT_SEED)
    out = []
    for a in FIRST:
        for b in SECOND:
            code = rng.integers(0, 10, size=2)
            out.append(Entity((a, b), COLORS[int(rng.integers(len(COLORS)))],
                              CITIES[int(rng.integers(len(CITIES)))],
                              (int(code[0]), int(code[1]))))  # fmt: skip
    return out


FACTS = fact_table()


def popularity() -> tuple[np.ndarray, np.ndarray]:
    """``(rank, p)``: each entity's popularity rank (0 = most mentioned) and its training
    probability ∝ (rank + 1)^-`ZIPF` (deterministic from `FACT_SEED`)."""
    rank = np.random.default_rng(FACT_SEED + 1).permutation(len(FACTS))
    weight = (rank + 1.0) ** -ZIPF
    return rank, weight / weight.sum()


RANK, POPULARITY = popularity()
_CUMULATIVE = np.cumsum(POPULARITY)
_INDEX = {(TOKEN[e.name[0]], TOKEN[e.name[1]]): i for i, e in enumerate(FACTS)}


def entities_in(tokens: list[int]) -> list[int]:
    """The `FACTS` index of every entity a token sequence names, in order."""
    return [_INDEX[pair] for pair in pairwise(tokens) if pair in _INDEX]


def render(
    pool: DigitPool, rng: np.random.Generator, n_digits: int
) -> tuple[np.ndarray, dict[tuple[int, int], int]]:
    """``n_digits`` random scans in distinct cells of the 8×8 grid, in reading order."""
    return digits.render(pool, rng, n_digits, CANVAS, CELL, reading_order=True)


def patch_labels(placed: dict[tuple[int, int], int]) -> np.ndarray:
    """The digit covering each 8×8 patch (row-major), 10 for background."""
    return digits.patch_labels(placed, CANVAS, CELL)


def _entity(rng: np.random.Generator, popular: bool = False) -> Entity:
    """A uniformly drawn entity, or with ``popular`` one drawn by `POPULARITY` (training)."""
    if popular:
        i = min(int(np.searchsorted(_CUMULATIVE, rng.random(), side="right")), len(FACTS) - 1)
        return FACTS[i]
    return FACTS[int(rng.integers(len(FACTS)))]


def question(
    family: str,
    rng: np.random.Generator,
    placed: dict[tuple[int, int], int] | None,
    popular: bool = False,
) -> tuple[list[str], list[str]]:
    """A question of one family and its answer tokens (``popular``: knowledge questions
    draw their entity by `POPULARITY`, as in training)."""
    if family in MULTIMODAL_FAMILIES:
        assert placed
        digits = list(placed.values())  # reading order: cells were placed sorted
    if family == "count":
        return ["how", "many", "digits", "?"], [str(len(placed or {}))]
    if family == "sum":
        return ["what", "is", "the", "sum", "of", "digits", "?"], [str(sum(digits))]
    if family == "max":
        return ["what", "is", "the", "largest", "digit", "?"], [str(max(digits))]
    if family == "present":
        want = bool(rng.integers(2))
        pick = sorted(set(digits)) if want else sorted(set(range(10)) - set(digits))
        d = pick[int(rng.integers(len(pick)))]
        return ["is", "there", "a", str(d), "?"], ["yes" if want else "no"]
    if family == "left":
        # Two digits in different columns, each unique in the image (else "the a" is ambiguous).
        assert placed
        unique = [(rc, d) for rc, d in placed.items() if digits.count(d) == 1]
        pairs = [(p, q) for p in unique for q in unique if p[0][1] != q[0][1]]
        (pa, a), (pb, b) = pairs[int(rng.integers(len(pairs)))]
        return ["is", "the", str(a), "left", "of", "the", str(b), "?"], [
            "yes" if pa[1] < pb[1] else "no"
        ]
    if family == "where":
        assert placed
        unique = [(rc, d) for rc, d in placed.items() if digits.count(d) == 1]
        (r, c), d = unique[int(rng.integers(len(unique)))]
        return ["where", "is", "the", str(d), "?"], [str(r + 1), str(c + 1), "end"]
    if family == "list":
        return ["list", "the", "digits", "?"], [str(d) for d in digits] + ["end"]
    if family == "arith":
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        if rng.integers(2):
            return ["what", "is", str(a), "plus", str(b), "?"], [str(a + b)]
        a, b = max(a, b), min(a, b)
        return ["what", "is", str(a), "minus", str(b), "?"], [str(a - b)]
    if family == "compare":
        a, b = (int(v) for v in rng.choice(10, size=2, replace=False))
        return ["is", str(a), "greater", "than", str(b), "?"], ["yes" if a > b else "no"]
    if family in KNOWLEDGE_FAMILIES:
        e = _entity(rng, popular)
        if family == "color":
            return ["what", "color", "is", *e.name, "?"], [e.color]
        if family == "city":
            return ["where", "does", *e.name, "live", "?"], [e.city]
        return ["what", "is", "the", "code", "of", *e.name, "?"], [str(d) for d in e.code] + ["end"]
    raise ValueError(f"unknown family {family!r}")


def _scene(pool: DigitPool, rng: np.random.Generator, family: str | None = None
           ) -> tuple[np.ndarray, dict[tuple[int, int], int]]:  # fmt: skip
    """A scene that every multimodal family can ask about (``left`` needs two digits
    unique in the image and in different columns; ``where`` one unique digit)."""
    while True:
        lo = 2 if family == "left" else 1
        image, placed = render(pool, rng, int(rng.integers(lo, MAX_DIGITS + 1)))
        digits = list(placed.values())
        unique = [(rc, d) for rc, d in placed.items() if digits.count(d) == 1]
        cols = {rc[1] for rc, _ in unique}
        if family == "left" and len(cols) < 2:
            continue
        if not unique:
            continue
        return image, placed


@dataclass(frozen=True)
class Sample:
    family: str
    tokens: list[int]  # unpadded; ends with answer[:-1]
    image: np.ndarray | None  # [128, 128] or None for text-only
    answer: tuple[int, ...]
    patch_labels: np.ndarray | None = None  # [256]: digit under each patch, 10 = background
    #: (token index, target id) of every supervised position; empty = the answer's.
    targets: tuple[tuple[int, int], ...] = ()


def _append_answer(tokens: list[int], answer: list[int], targets: list[tuple[int, int]]) -> None:
    """Teacher forcing: answer token j is predicted at the position before it."""
    for a in answer:
        targets.append((len(tokens) - 1, a))
        tokens.append(a)


def make_sample(family: str, pool: DigitPool, rng: np.random.Generator) -> Sample:
    image = labels = placed = None
    tokens = [BOS_ID]
    if family in MULTIMODAL_FAMILIES:
        image, placed = _scene(pool, rng, family)
        labels = patch_labels(placed)
        tokens += [IMAGE_ID] * NUM_PATCHES
    words, ans = question(family, rng, placed)
    answer = [TOKEN[w] for w in ans]
    tokens += [TOKEN[w] for w in words] + answer[:-1]
    return Sample(family, tokens, image, tuple(answer), labels)


def make_dialogue(multimodal: bool, pool: DigitPool, rng: np.random.Generator,
                  turns: int) -> Sample:  # fmt: skip
    """Several questions about one image (or text-only), each answered before the next.

    Training only: every answer token is supervised at the position before it, so one
    forward pass trains ``turns`` answers. The first turn is exactly an evaluation-style
    sample, since attention is causal.
    """
    families = MULTIMODAL_FAMILIES if multimodal else TEXT_FAMILIES
    picks = [families[int(f)] for f in rng.choice(len(families), size=min(turns, len(families)),
                                                  replace=False)]  # fmt: skip
    image = labels = placed = None
    tokens = [BOS_ID]
    if multimodal:
        image, placed = _scene(pool, rng, "left" if "left" in picks else None)
        labels = patch_labels(placed)
        tokens += [IMAGE_ID] * NUM_PATCHES
    targets: list[tuple[int, int]] = []
    answer: list[int] = []
    for fam in picks:
        words, ans = question(fam, rng, placed, popular=True)
        tokens += [TOKEN[w] for w in words]
        answer = [TOKEN[w] for w in ans]
        _append_answer(tokens, answer, targets)
    return Sample(picks[0], tokens, image, tuple(answer), labels, tuple(targets))


def collate(samples: list[Sample], seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Left-pad samples into model inputs plus modality / answer / family / target arrays
    (digits-vlm's `collate`); ``answer`` is [S, MAX_ANSWER], right-padded with -1
    (docs/data-format.md)."""
    return digits.collate(samples, seq_len, size=CANVAS, num_patches=NUM_PATCHES,
                          families=FAMILIES, image_id=IMAGE_ID, pad_id=PAD_ID,
                          answer_width=MAX_ANSWER)  # fmt: skip


def make_split(
    pool: DigitPool, families_counts: dict[str, int], seed: int, shuffle: bool = True
) -> list[Sample]:
    """Deterministic samples: ``families_counts[f]`` of each family, shuffled with ``seed``."""
    return digits.make_split(pool, families_counts, seed, shuffle, make=make_sample)
