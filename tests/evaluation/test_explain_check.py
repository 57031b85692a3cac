"""The heatmap check (core.evaluation.explain_check) recorded for the shipped model."""

from __future__ import annotations

import pandas as pd

from core.explain.cams import METHODS
from core.explain.heatmap import DEFAULT_METHOD
from core.schema.contract import DEFAULT_WEIGHTS


def test_the_shipped_heatmap_check_is_current_and_meets_the_goal():
    """The check of every method x stage on the shipped model's test patients (or, trained on
    every patient, its development cells) was computed for these weights and this default, and
    the default finds the parasite in >= 90 % of cells."""
    import json

    from core.schema.contract import ModelFolder

    model = ModelFolder.open(DEFAULT_WEIGHTS)
    table_path, summary_path = model.explain_check()
    summary = json.loads(summary_path.read_text())
    card, sha = model.card, model.sha256
    assert summary["model_sha256"] == sha
    assert summary["split"] == ("test" if model.split["test"] else "oof")
    d = summary["default"]
    assert (d["method"], d["layer"]) == (DEFAULT_METHOD, card["contract"]["target_layer"])
    assert d["pointing"] >= 0.9 and summary["cells_checked"] >= 700
    table = pd.read_csv(table_path).set_index(["method", "layer"])
    assert len(table) == len(METHODS) * len(card["contract"]["cam_layers"])
    assert table.loc[(DEFAULT_METHOD, d["layer"]), "cells"] == summary["cells_checked"]
    assert table.loc[("gradcam", "features.18"), "pointing"] < 0.2  # the old default
    if not model.split["test"]:  # cells it learnt: its recipe's fold models, on unseen patients
        unseen = card["estimate"]["heatmap"]
        assert unseen["pointing"] >= 0.9 and unseen["cells"] >= 1000
        assert (unseen["method"], unseen["layer"]) == (d["method"], d["layer"])
