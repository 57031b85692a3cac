"""Which explanations find the parasite: every method x stage over a model's labelled test split.

    malaria check heatmaps [--weights weights/default] [--split test|val]
                                 [--road-cells 16] [--slow-cells 8]

For each CAM method at each stage of the network, over the Parasitized cells of the model's
test patients (``test_predictions.csv`` in its folder; ``--split val``: its validation
patients, on which the default was chosen) in which the stain locator
(``core.explain.locate``) finds a parasite:
- ``pointing``: share of maps (for the Parasitized class) whose peak falls on that parasite;
- ``mass_in_cell``: mean share of the map's mass on the cell rather than the background;
- ``road``: mean ROAD score on the first ``road_cells`` of those cells (ROAD costs about half a
  second a map: it tells how much the model uses the pixels, not what they are);
- ``ms_per_image``: wall time of the map itself, batched.
ScoreCAM and AblationCAM (they run the network once per channel batch: up to a minute a map
at the last stage) are measured on the first ``slow_cells`` cells only; every row says how
many cells it used. Time a quiet machine: ``ms_per_image`` is wall time.

The table goes to ``explain_check.csv`` in the model folder (``explain_check_val.csv`` for the
validation split), with ``explain_check.json`` beside it: the command, the locator's found
rates on both classes and the default explanation's pointing for the class the model predicts
(what the Explain page shows first).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn
from tqdm import tqdm

from core.data.sources import open_source, read_image
from core.explain.cams import METHODS, explain, explainable
from core.explain.heatmap import DEFAULT_METHOD, SLOW_METHODS, Explanation
from core.explain.locate import POINTING_TOLERANCE, Stain, locate
from core.nets.model import LoadedModel, load_model
from core.schema.contract import explain_check_paths, predictions_path
from core.schema.files import invocation, write_json
from core.schema.labels import CLASSES, PARASITIZED, UNINFECTED

SPLITS = ("test", "val", "oof")


@dataclass(frozen=True)
class CheckCells:
    """The labelled cells a check runs on, with their stain-located parasites."""

    images: list[np.ndarray]  # RGB uint8 (H, W, 3), Parasitized cells with a located parasite
    stains: list[Stain]
    found_parasitized: float  # share of Parasitized cells where the locator finds a parasite
    found_uninfected: float  # ... and of Uninfected cells (a false find, or a missed label)
    n_parasitized: int
    n_uninfected: int


def check_cells(predictions: pd.DataFrame, *, limit: int | None = None) -> CheckCells:
    """Read the cells listed in a predictions table (path, label) and locate their parasites.

    Raises FileNotFoundError naming the first image that cannot be found.
    """
    images: list[np.ndarray] = []
    stains: list[Stain] = []
    found: dict[str, list[bool]] = {c: [] for c in CLASSES}
    for path, label in zip(predictions["path"], predictions["label"]):
        image = read_image(open_source(path))
        stain = locate(image)
        found[label].append(stain.found)
        if label == PARASITIZED and stain.found and (limit is None or len(images) < limit):
            images.append(image)
            stains.append(stain)
    return CheckCells(
        images,
        stains,
        float(np.mean(found[PARASITIZED])),
        float(np.mean(found[UNINFECTED])),
        len(found[PARASITIZED]),
        len(found[UNINFECTED]),
    )


def _mean(values: Sequence[float | bool | None]) -> float:
    kept = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(kept)) if kept else float("nan")


def check_method(
    loaded: LoadedModel,
    cells: CheckCells,
    *,
    method: str,
    layer: str,
    net: nn.Module,
    road_cells: int,
    slow_cells: int,
) -> dict:
    """One row of the table: pointing, mass on the cell, ROAD and time of one method x stage,
    for the Parasitized class; SLOW_METHODS stop at ``slow_cells`` cells."""

    def run(lo: int, hi: int, faithfulness: bool) -> list[Explanation]:
        with contextlib.redirect_stderr(io.StringIO()):  # ScoreCAM's per-batch progress bars
            return explain(
                loaded,
                cells.images[lo:hi],
                method=method,
                layer=layer,
                target="parasitized",
                faithfulness=faithfulness,
                net=net,
                stains=cells.stains[lo:hi],
            )

    n = min(len(cells.images), slow_cells) if method in SLOW_METHODS else len(cells.images)
    exps = run(0, min(n, road_cells), True)
    road = [e.road for e in exps]
    if n > len(exps):
        exps += run(len(exps), n, False)
    return {
        "method": method,
        "layer": layer,
        "map_size": "x".join(map(str, exps[0].map_size)),
        "pointing": _mean([e.points_at_parasite for e in exps]),
        "cells": len(exps),
        "mass_in_cell": _mean([e.mass_in_cell for e in exps]),
        "road": _mean(road),
        "road_cells": len(road),
        "ms_per_image": float(np.mean([e.ms for e in exps])),
    }


def check_model(
    folder: Path,
    *,
    split: str = "test",
    road_cells: int = 16,
    slow_cells: int = 8,
    limit: int | None = None,
    methods: Sequence[str] = tuple(METHODS),
    progress: bool = True,
) -> tuple[pd.DataFrame, dict]:
    """The method x stage table of a model folder and its summary (see the module docstring).

    Raises FileNotFoundError if the folder has no test predictions or their images are gone.
    """
    loaded = load_model(folder)
    preds_path = predictions_path(folder, split)
    if not preds_path.is_file():
        raise FileNotFoundError(
            f"{preds_path} is missing: this model has no labelled {split} split"
        )
    predictions = pd.read_csv(preds_path)
    if split == "oof":  # ordered by fold: a seeded shuffle spreads --limit over every patient
        predictions = predictions.sample(frac=1, random_state=0)
    cells = check_cells(predictions, limit=limit)
    if not cells.images:
        raise ValueError("the locator found no parasite in any Parasitized test cell")
    net = explainable(loaded)
    c = loaded.contract
    jobs = [(m, layer) for m in methods for layer in c.cam_layers]
    rows = [
        check_method(
            loaded,
            cells,
            method=m,
            layer=layer,
            net=net,
            road_cells=road_cells,
            slow_cells=slow_cells,
        )
        for m, layer in tqdm(jobs, desc="method x stage", disable=not progress)
    ]
    table = pd.DataFrame(rows, columns=list(rows[0]) if rows else ["method", "layer"])
    table["default"] = (table["method"] == DEFAULT_METHOD) & (table["layer"] == c.target_layer)
    default = explain(
        loaded, cells.images, target="predicted", faithfulness=False, net=net, stains=cells.stains
    )
    summary = {
        "command": invocation("check heatmaps"),
        "model_sha256": loaded.sha256,
        "split": split,
        **(
            {
                "note": "a model trained on every patient (no test patients): the development "
                "cells it learnt; the locator does not use the model, so pointing still says "
                "whether a map finds the stained parasite"
            }
            if split == "oof"
            else {}
        ),
        "cases": int(predictions["case_id"].nunique()),
        "parasitized_cells": cells.n_parasitized,
        "uninfected_cells": cells.n_uninfected,
        "locator_found_parasitized": cells.found_parasitized,
        "locator_found_uninfected": cells.found_uninfected,
        "cells_checked": len(cells.images),
        "pointing_tolerance_px_at_128": POINTING_TOLERANCE,
        "default": {
            "method": DEFAULT_METHOD,
            "layer": c.target_layer,
            "target": "predicted",
            # the peak on the stain whichever class is predicted: a missed parasitized cell's
            # map for Uninfected counts as not pointing unless it lands on the parasite
            "pointing": _mean([e.peak_on_stain for e in default]),
        },
    }
    return table, summary


def default_pointing(folder: Path) -> dict:
    """The default map's pointing on a model folder's test split, written beside it
    (``explain_check.json``, no method table): cheap enough to run after every fold model, on the
    patients it never saw. A split without a located parasite checks no cell."""
    try:
        _, summary = check_model(folder, road_cells=0, methods=(), progress=False)
    except ValueError as e:
        summary = {
            "split": "test",
            "cells_checked": 0,
            "default": {"pointing": None},
            "note": str(e),
        }
    summary["command"] = "malaria folds (after the fold model: the default map only)"
    write_json(explain_check_paths(folder)[1], summary)
    return summary
