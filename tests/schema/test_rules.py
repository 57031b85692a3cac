"""The rules pages show and no page re-implements: a result row's kind and a run's counts
(core.schema.results), confusion cells and per-patient accuracy (core.schema.metrics), smear
totals (core.smear.fields), and the typed model card (core.schema.contract.ModelFolder)."""

from __future__ import annotations

import math

import pandas as pd

from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder
from core.schema.labels import PARASITIZED, UNINFECTED
from core.schema.metrics import confusion_cell, label_smoothing_floor, per_case
from core.schema.results import (
    DUPLICATE_KIND,
    ERROR_KIND,
    NOT_COUNTED_KIND,
    OK,
    UNCERTAIN_KIND,
    at_threshold,
    calls,
    row_kinds,
    run_counts,
)
from core.smear.fields import RED_CELL, smear_totals


def _run() -> pd.DataFrame:
    """One row of each kind at threshold 0.5, band 0.1."""
    return pd.DataFrame(
        {
            "path": ["p.png", "u.png", "near.png", "blank.png", "copy.png", "bad.png"],
            "case_id": ["C1"] * 6,
            "prob_parasitized": [0.9, 0.1, 0.55, 0.95, None, None],
            "prediction": [None] * 6,
            "quality": [OK, OK, OK, "blank", None, None],
            "error": [None] * 5 + ["not an image"],
            "duplicate_of": [None] * 4 + ["p.png", None],
        }
    )


def test_each_row_has_one_kind_and_the_counts_follow():
    shown = at_threshold(_run(), threshold=0.5, band=0.1)
    assert list(row_kinds(shown)) == [
        PARASITIZED,
        UNINFECTED,
        UNCERTAIN_KIND,
        NOT_COUNTED_KIND,
        DUPLICATE_KIND,
        ERROR_KIND,
    ]
    counts = run_counts(shown)
    assert (counts.files, counts.cells, counts.duplicates, counts.errors) == (6, 5, 1, 1)
    # the uncertain cell is counted by its call; the blank image is not, whatever its P
    assert (counts.parasitized, counts.not_counted, counts.uncertain) == (2, 1, 1)
    assert counts.for_review == 2
    moved = run_counts(at_threshold(_run(), threshold=0.95, band=0.0))
    assert (moved.parasitized, moved.uncertain) == (0, 0)


def test_calls_leave_rows_without_a_probability_uncalled():
    prob = pd.Series([0.5, 0.49, None], index=[3, 4, 5])
    called = calls(prob, threshold=0.5)
    assert list(called) == [PARASITIZED, UNINFECTED, None] and list(called.index) == [3, 4, 5]


def test_a_confusion_cell_lists_its_cells_most_confident_first():
    preds = pd.DataFrame(
        {
            "path": list("abcde"),
            "case_id": ["C1", "C1", "C2", "C2", "C2"],
            "label": [PARASITIZED, PARASITIZED, UNINFECTED, UNINFECTED, PARASITIZED],
            "prob_parasitized": [0.2, 0.45, 0.9, 0.1, 0.8],
        }
    )
    missed = confusion_cell(preds, threshold=0.5, true=PARASITIZED, predicted=UNINFECTED)
    assert list(missed["path"]) == ["a", "b"]
    cases = per_case(preds, threshold=0.5).set_index("case_id")
    assert cases.loc["C1", "accuracy"] == 0.0 and cases.loc["C2", "accuracy"] == 2 / 3
    assert list(cases.index) == ["C1", "C2"]  # the least accurate first
    assert cases.loc["C2", "called_parasitized"] == 2 and cases.loc["C2", "true_parasitized"] == 1


def test_smear_totals_count_red_cells_only():
    cells = pd.DataFrame(
        {
            "image": ["f1", "f1", "f1", "f2"],
            "object": [RED_CELL, RED_CELL, "white cell", None],
            "prediction": [PARASITIZED, UNINFECTED, None, None],
            "error": [None, None, None, "no cells found in this field"],
        }
    )
    totals = smear_totals(cells, adapted=True)
    assert (totals.fields, totals.red_cells, totals.parasitized) == (2, 2, 1)
    assert totals.parasitemia == 0.5
    assert smear_totals(cells.iloc[2:], adapted=True).parasitemia is None


def test_label_smoothing_floor_is_the_entropy_of_the_smoothed_target():
    assert label_smoothing_floor(0.0) == 0.0
    assert math.isclose(
        label_smoothing_floor(0.1), -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))
    )


def test_the_shipped_model_card_reads_as_typed_values():
    model = ModelFolder.open(DEFAULT_WEIGHTS)
    assert model.training_data and all(isinstance(d, str) for d in model.training_data)
    assert model.training_command and model.created.startswith("20")
    assert model.screening.rule == "calls" and 0 < model.screening.rate < 0.05
    assert model.contract.temperature != 1.0  # calibrated on its out-of-fold predictions
    assert model.best_epoch is not None and model.kept_weights
    assert model.settings["classes"] == list(model.contract.classes)  # as the card records it
    estimate = model.heatmap_estimate
    if estimate is not None:  # a model trained on every patient, with its folds' checks
        assert 0 <= estimate.pointing <= 1 and estimate.cells > 0 and estimate.folds > 1
    assert model.held_out([]) and not model.held_out(["no such patient"])
