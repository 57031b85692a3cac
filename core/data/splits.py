"""Labelled cell sets and patient-level splits: cases (patients) never straddle two parts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.data.sources import ImageSource, iter_sources
from core.schema.labels import CLASSES, PARASITIZED_INDEX, case_id, label_from_path


class DataError(ValueError):
    """A data set that cannot be used as asked (no images, one class only, too few cases)."""


@dataclass(frozen=True)
class Sample:
    path: str
    case_id: str
    label: int  # index into CLASSES


def labelled_samples(
    inputs: Iterable[str | Path], *, follow_links: bool = False
) -> tuple[list[Sample], dict[str, ImageSource]]:
    """Labelled images under ``inputs`` and a path -> source map to read them.

    Images outside a ``Parasitized``/``Uninfected`` folder are ignored; ``follow_links`` as in
    ``iter_sources`` (a link not followed is a source that fails to read, so training stops
    and names it). Raises DataError if no labelled image is found or only one class is present.
    """
    samples, sources = [], {}
    for src in iter_sources(inputs, follow_links=follow_links):
        label = label_from_path(src.path)
        if label is None:
            continue
        samples.append(Sample(src.path, case_id(src.name), CLASSES.index(label)))
        sources[src.path] = src
    if not samples:
        raise DataError(f"no images under a Parasitized/ or Uninfected/ folder in {list(inputs)}")
    if len({s.label for s in samples}) < 2:
        raise DataError("only one class found; training needs Parasitized and Uninfected images")
    return samples, sources


@dataclass(frozen=True)
class Split:
    """Which cases are in which part. No case is in two parts."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int

    def part_of(self, case: str) -> str:
        for name in ("train", "val", "test"):
            if case in getattr(self, name):
                return name
        raise KeyError(case)

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
        }

    @classmethod
    def from_json(cls, d: dict) -> Split:
        return cls(tuple(d["train"]), tuple(d["val"]), tuple(d["test"]), int(d["seed"]))


def split_by_case(
    samples: Sequence[Sample], *, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0
) -> Split:
    """Seeded split of cases into train/val/test, stratified by case kind.

    A case's kind is "infected" if it has any Parasitized cell, else "healthy"; each kind is
    shuffled and cut in the same proportions so every part gets both kinds where possible.
    Raises DataError with fewer than 3 cases.
    """
    infected = _infected_cases(samples)
    if len(infected) < 3:
        raise DataError(f"need at least 3 cases to split by case, found {len(infected)}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for kind in (True, False):
        cases = sorted(c for c, inf in infected.items() if inf == kind)
        rng.shuffle(cases)
        n_test = int(round(len(cases) * test_frac))
        n_val = int(round(len(cases) * val_frac))
        parts["test"] += cases[:n_test]
        parts["val"] += cases[n_test : n_test + n_val]
        parts["train"] += cases[n_test + n_val :]
    # tiny sets: make sure every part has at least one case
    for name in ("val", "test"):
        if not parts[name] and len(parts["train"]) > 1:
            parts[name].append(parts["train"].pop())
    return Split(
        tuple(sorted(parts["train"])),
        tuple(sorted(parts["val"])),
        tuple(sorted(parts["test"])),
        seed,
    )


def _infected_cases(samples: Sequence[Sample]) -> dict[str, bool]:
    """Case id -> whether any of its cells is labelled Parasitized (the case's kind)."""
    infected: dict[str, bool] = {}
    for s in samples:
        infected[s.case_id] = infected.get(s.case_id, False) or s.label == PARASITIZED_INDEX
    return infected


def fold_splits(
    samples: Sequence[Sample], *, folds: int = 5, val_frac: float = 0.15, seed: int = 0
) -> list[Split]:
    """Patient-grouped k-fold: fold k's cases are its test part, stratified by case kind.

    Each kind (infected, healthy) is shuffled and dealt round-robin into ``folds`` groups, so
    every fold holds the same share of infected patients. Of the other cases a ``val_frac``
    share of all cases (per kind, seeded per fold) picks the fold model's epoch; the rest train
    it. Every case is in exactly one fold's test part. Raises DataError with fewer cases than
    ``2 * folds``.
    """
    infected = _infected_cases(samples)
    if len(infected) < 2 * folds:
        raise DataError(f"{folds}-fold needs at least {2 * folds} cases, found {len(infected)}")
    rng = np.random.default_rng(seed)
    groups: list[list[str]] = [[] for _ in range(folds)]
    for kind in (True, False):
        cases = sorted(c for c, inf in infected.items() if inf == kind)
        rng.shuffle(cases)
        for i, c in enumerate(cases):
            groups[i % folds].append(c)
    out = []
    for k, test in enumerate(groups):
        val, train = [], []
        fold_rng = np.random.default_rng(seed + 1 + k)
        for kind in (True, False):
            rest = sorted(c for c, inf in infected.items() if inf == kind and c not in test)
            fold_rng.shuffle(rest)
            n_val = int(round(len(rest) * val_frac / (1 - 1 / folds)))
            val += rest[:n_val]
            train += rest[n_val:]
        out.append(Split(tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)), seed))
    return out
