"""The int8 graph's calibration cells and the check that decides whether it may be a model's
default engine (the graph itself: core.inference.quantize).

    malaria calibrate int8 weights/default --data ../shared/data/nih_cells_dev.zip
    malaria check int8 weights/default --data ../shared/data/nih_cells_dev.zip

``calibrate`` copies a seeded sample of the model's *training* patients' cells into the model
folder (``calibration.zip``, the PNG files as they were) and records it in the card; the int8
graph is then built from the fp32 export and those cells on first use, anywhere, and cached
per weights hash like the fp32 export. ``check`` scores the model's test patients with both
graphs once and records the agreement rule's verdict in the card: the int8 engine becomes the
model's default only if its accuracy is within 0.003 and its AUC within 0.002 of fp32 there.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from core.data.sources import ImageSource, load_array
from core.data.splits import Split, labelled_samples
from core.inference.engines import load_engine
from core.inference.quantize import (
    CALIBRATION_FILE,
    CARD_KEY,
    METHOD,
    CalibrationSet,
    required_calibration,
)
from core.schema.contract import read_card, sha256_file, write_card
from core.schema.files import atomic_path
from core.schema.labels import CLASSES, PARASITIZED_INDEX, case_id, label_from_path
from core.schema.metrics import binary_metrics

# The agreement rule (issue 12): int8 may be the default only this close to fp32 on test patients.
MAX_ACCURACY_DROP = 0.003


MAX_AUC_DROP = 0.002


def pick_calibration(
    sources: Sequence[ImageSource], split: Split, *, n: int, seed: int = 0
) -> list[ImageSource]:
    """``n`` cells drawn (seeded) from the training patients of ``split``, half of each class
    where there are enough. Raises ValueError if the training patients have no cells."""
    train = set(split.train)
    by_class: dict[str, list[ImageSource]] = {c: [] for c in CLASSES}
    for s in sources:
        label = label_from_path(s.path)
        if label is not None and case_id(s.name) in train:
            by_class[label].append(s)
    if not any(by_class.values()):
        raise ValueError("no cells of the model's training patients in the data given")
    rng = np.random.default_rng(seed)
    picked: list[ImageSource] = []
    for i, cls in enumerate(CLASSES):
        pool = sorted(by_class[cls], key=lambda s: s.path)
        want = min(len(pool), n // 2 if i == 0 else n - len(picked))
        picked += [pool[j] for j in sorted(rng.choice(len(pool), want, replace=False))]
    return picked


def write_calibration(
    folder: Path,
    sources: Sequence[ImageSource],
    split: Split,
    *,
    seed: int,
    float_blocks: Sequence[str] = ("features.1",),
) -> CalibrationSet:
    """Store ``sources`` (the files' bytes as they are) in ``folder``/CALIBRATION_FILE and
    record them in the card (replacing an earlier calibration and its check)."""
    cases = tuple(sorted({case_id(s.name) for s in sources}))
    leaked = set(cases) - set(split.train)
    if leaked:
        raise ValueError(f"calibration cells of non-training patients: {sorted(leaked)}")
    path = folder / CALIBRATION_FILE
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for s in sources:
            info = zipfile.ZipInfo(f"{label_from_path(s.path)}/{s.name}", (1980, 1, 1, 0, 0, 0))
            zf.writestr(info, s.read())
    rec = CalibrationSet(
        CALIBRATION_FILE, sha256_file(path), len(sources), cases, "train", seed, tuple(float_blocks)
    )
    card = read_card(folder)
    card[CARD_KEY] = {
        "calibration": {**asdict(rec), "cases": list(cases), "float_blocks": list(float_blocks)},
        "method": METHOD,
    }
    write_card(folder, card)
    return rec


def agreement(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, *, threshold: float) -> dict:
    """The agreement rule on one set of cells: accuracy and AUC of each graph, their
    differences, the calls that differ and whether int8 passes (within MAX_ACCURACY_DROP and
    MAX_AUC_DROP of fp32, either way)."""
    a, b = (
        binary_metrics(labels, fp32, threshold=threshold),
        binary_metrics(labels, int8, threshold=threshold),
    )
    d_acc, d_auc = b["accuracy"] - a["accuracy"], b["auc"] - a["auc"]
    return {
        "cells": int(len(labels)),
        "accuracy_fp32": a["accuracy"],
        "accuracy_int8": b["accuracy"],
        "auc_fp32": a["auc"],
        "auc_int8": b["auc"],
        "accuracy_diff": d_acc,
        "auc_diff": d_auc,
        "calls_differing": int(((fp32 >= threshold) != (int8 >= threshold)).sum()),
        "max_abs_prob_diff": float(np.abs(fp32 - int8).max()),
        "passed": bool(abs(d_acc) <= MAX_ACCURACY_DROP and abs(d_auc) <= MAX_AUC_DROP),
    }


def check(folder: Path, data: Sequence[str | Path], *, part: str = "test") -> dict:
    """Score the model's ``part`` patients in ``data`` with fp32 and int8 and record the
    agreement rule's verdict in the card (``check``; it decides the default engine only for
    ``part="test"``). A model trained on every patient (``malaria folds --final``) has no test
    patients: its check runs on its training cells less the calibration cells, where only the
    difference between the graphs means anything. Returns the record."""
    card = read_card(folder)
    split = Split.from_json(card["split"])
    decides = part == "test"
    if decides and not split.test:
        part = "train"
    cases = set(getattr(split, part))
    samples, sources = labelled_samples(data)
    calibrated = set()
    if part == "train":
        with zipfile.ZipFile(Path(folder) / required_calibration(folder, card).file) as zf:
            calibrated = {Path(n).name for n in zf.namelist()}
    chosen = [s for s in samples if s.case_id in cases and sources[s.path].name not in calibrated]
    if not chosen:
        raise ValueError(f"no cells of the model's {part} patients in {list(data)}")
    fp32_engine = load_engine(folder, "onnx")
    images = load_array([sources[s.path] for s in chosen], size=fp32_engine.contract.input_size)
    labels = np.array([s.label == PARASITIZED_INDEX for s in chosen], dtype=int)
    probs = {}
    for name in ("onnx", "onnx-int8"):
        engine = fp32_engine if name == "onnx" else load_engine(folder, name)
        probs[name] = np.concatenate(
            [engine(images[i : i + 64]) for i in range(0, len(images), 64)]
        )
    rec = {
        "part": part,
        "patients": len({s.case_id for s in chosen}),
        **agreement(
            probs["onnx"], probs["onnx-int8"], labels, threshold=fp32_engine.contract.threshold
        ),
    }
    if calibrated:
        rec["note"] = (
            "no patient held out: the training patients' cells less the calibration cells; "
            "the model learnt these cells, so only the differences between fp32 and int8 count"
        )
    card = read_card(folder)
    # the verdict is on the graph quantize_onnx makes now: the card says how it was made
    card.setdefault(CARD_KEY, {}).update(
        {"method": METHOD, "check" if decides else f"check_{part}": rec}
    )
    write_card(folder, card)
    return rec
