"""Labelled cell sets and patient-level splits: cases (patients) never straddle two parts."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.labels import CLASSES, PARASITIZED, case_id, label_from_path
from core.sources import ImageSource, iter_sources


class DataError(ValueError):
    """A data set that cannot be used as asked (no images, one class only, too few cases)."""



@dataclass(frozen=True)
class Sample:
    path: str
    case_id: str
    label: int  # index into CLASSES


def labelled_samples(inputs: Iterable[str | Path], *, follow_links: bool = False
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
        return {"seed": self.seed, "train": list(self.train), "val": list(self.val),
                "test": list(self.test)}

    @classmethod
    def from_json(cls, d: dict) -> Split:
        return cls(tuple(d["train"]), tuple(d["val"]), tuple(d["test"]), int(d["seed"]))


def split_by_case(samples: Sequence[Sample], *, val_frac: float = 0.15, test_frac: float = 0.15,
                  seed: int = 0) -> Split:
    """Seeded split of cases into train/val/test, stratified by case kind.

    A case's kind is "infected" if it has any Parasitized cell, else "healthy"; each kind is
    shuffled and cut in the same proportions so every part gets both kinds where possible.
    Raises DataError with fewer than 3 cases.
    """
    infected: dict[str, bool] = {}
    for s in samples:
        infected[s.case_id] = infected.get(s.case_id, False) or CLASSES[s.label] == PARASITIZED
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
        parts["val"] += cases[n_test:n_test + n_val]
        parts["train"] += cases[n_test + n_val:]
    # tiny sets: make sure every part has at least one case
    for name in ("val", "test"):
        if not parts[name] and len(parts["train"]) > 1:
            parts[name].append(parts["train"].pop())
    return Split(*(tuple(sorted(parts[k])) for k in ("train", "val", "test")), seed=seed)
