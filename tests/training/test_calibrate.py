"""``malaria calibrate probabilities``: the temperature and the flag rule of a model folder,
fitted on its out-of-fold predictions (core.training.calibrate)."""

from __future__ import annotations

import json
import shutil

import pytest

from core import cli
from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder


@pytest.fixture
def uncalibrated(tmp_path):
    """The shipped model's card, weights and out-of-fold predictions, its card as before
    calibration: no temperature, the older interval flag."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.safetensors", "oof_predictions.csv"):
        shutil.copy(DEFAULT_WEIGHTS / name, folder / name)
    card = json.loads((DEFAULT_WEIGHTS / "card.json").read_text())
    card["contract"].pop("temperature", None)
    card["screening"] = {"cutoff": 0.029, "method": "Wilson"}
    (folder / "card.json").write_text(json.dumps(card))
    assert cli.main(["seal", "--force", str(folder)]) == 0  # a card edited by hand
    return folder


def test_calibrating_writes_a_sealed_temperature_and_the_calls_rule(uncalibrated, capsys):
    assert ModelFolder.open(uncalibrated).contract.temperature == 1.0
    assert cli.main(["calibrate", "probabilities", str(uncalibrated)]) == 0
    out = capsys.readouterr().out
    model = ModelFolder.open(uncalibrated)  # the card still verifies: resealed
    assert 0.5 < model.contract.temperature < 0.9  # the shipped model is under-confident
    assert model.screening.rule == "calls"
    record = model.card["calibration"]
    assert record["ece_after"] < record["ece_before"] / 2 and record["ece_after"] < 0.02
    honest = record["screening_out_of_fold"]
    assert model.card["estimate"]["screening"] == honest
    assert honest["infected_patients"] == 75 and honest["healthy_patients"] == 25
    assert f"{record['ece_after']:.4f}" in out and "binomial" in out


def test_a_folder_without_out_of_fold_predictions_is_refused_in_one_line(uncalibrated, capsys):
    (uncalibrated / "oof_predictions.csv").unlink()
    assert cli.main(["calibrate", "probabilities", str(uncalibrated)]) == 2
    err = capsys.readouterr().err.strip()
    assert "oof_predictions.csv" in err and len(err.splitlines()) == 1
