"""The sidebar's line on what a model learnt from (dashboard.text.trained_on)."""

from __future__ import annotations

import json
import shutil

from core.schema.contract import ModelFolder, reseal
from dashboard.text import trained_on


def _with_card(tiny_model, folder, **changes) -> ModelFolder:
    shutil.copytree(tiny_model, folder)
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, **changes}))
    reseal(folder)
    return ModelFolder.open(folder)


def test_an_adapted_model_says_what_it_was_adapted_on(tiny_model, tmp_path):
    assert trained_on(ModelFolder.open(tiny_model)) == ""  # its card names no data
    learnt = {"training_data": ["../data/nih.zip"], "split": {"train": ["C1", "C2"]}}
    base = _with_card(tiny_model, tmp_path / "base", **learnt)
    assert trained_on(base) == "Trained on nih.zip; 2 training patients"
    lab = {"fields": 80, "cells": 8875, "infected_cells": 124}
    adapted = _with_card(tiny_model, tmp_path / "mylab", **learnt, adaptation=lab)
    assert trained_on(adapted) == (
        "Trained on nih.zip; 2 training patients; then adapted to a lab on 80 fields "
        "(8,875 cells, 124 infected)"
    )
