"""Calibrate a model folder on its out-of-fold predictions: the temperature that makes
P(Parasitized) mean what it says, and the screening flag's rule on that calibrated scale.

    malaria calibrate weights/default

Reads ``OUT/oof_predictions.csv`` (``malaria folds``: every development cell predicted by a
fold model that never saw its patient; written at temperature 1), fits the temperature
(core.schema.calibration) and chooses the ``calls`` flag rule (core.schema.screening) on them,
and writes both into the card with what they were measured to do: the expected calibration
error before, and after with each fold's temperature fitted on the other folds; the flag with
the rule chosen on the other folds, per fold (the honest estimate), beside the flag of the
rule chosen on every patient. ``malaria folds --final`` does this for the model it trains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from core.schema.calibration import (
    ECE_BINS,
    cross_fitted,
    expected_calibration_error,
    fit_temperature,
    rescale,
)
from core.schema.contract import OOF_FILE, ModelContract, WeightsError, read_card, write_card
from core.schema.labels import PARASITIZED
from core.schema.metrics import flag_performance
from core.schema.screening import Screening, choose, out_of_fold_flags


@dataclass(frozen=True)
class Calibration:
    temperature: float
    screening: Screening
    record: dict  # what the card's ``calibration`` says: the figures behind both


def calibrate(oof: pd.DataFrame) -> Calibration:
    """The temperature and flag rule of out-of-fold predictions (path, case_id, label,
    prob_parasitized at temperature 1, fold). Raises ValueError without both classes, or
    without healthy and infected patients."""
    prob, parasitized = oof["prob_parasitized"].to_numpy(), (oof["label"] == PARASITIZED)
    temperature = fit_temperature(prob, parasitized)
    calibrated = oof.assign(prob_parasitized=rescale(prob, temperature))
    screening, chosen_flags = choose(calibrated)
    honest = out_of_fold_flags(oof)
    flags = pd.DataFrame({"group": honest["case_id"], "likely_infected": honest["flagged"]})
    record = {
        "method": "temperature scaling fitted on out-of-fold predictions (log loss)",
        "temperature": temperature,
        "cells": int(len(oof)),
        "bins": ECE_BINS,
        "ece_before": expected_calibration_error(prob, parasitized),
        "ece_after": expected_calibration_error(
            cross_fitted(prob, parasitized, oof["fold"].to_numpy()), parasitized
        ),
        "ece_after_source": "each fold's cells at the temperature fitted on the other folds",
        "screening_chosen_on_all": chosen_flags,
        "screening_out_of_fold": {
            "source": "each fold's patients judged by the temperature and rule chosen on "
            "the other folds",
            **flag_performance(flags, set(honest.loc[honest["infected"], "case_id"])),
        },
    }
    return Calibration(temperature, screening, record)


def calibrated_card(card: dict, calibration: Calibration) -> dict:
    """``card`` with the calibration's temperature in its contract, its screening rule and its
    record; sealed when written (write_card)."""
    contract = replace(
        ModelContract.from_json(card["contract"]), temperature=calibration.temperature
    )
    out = {
        **card,
        "contract": contract.to_json(),
        "screening": calibration.screening.to_json(),
        "calibration": calibration.record,
    }
    if "estimate" in out:  # the k-fold estimate's flag is the one chosen fold by fold
        out["estimate"] = {
            **out["estimate"],
            "screening": calibration.record["screening_out_of_fold"],
        }
    return out


def calibrate_folder(folder: Path | str) -> Calibration:
    """Calibrate the model folder ``folder`` on its OOF_FILE and rewrite its card. Raises
    WeightsError (no usable card, no out-of-fold predictions) or ValueError."""
    folder = Path(folder)
    card = read_card(folder)
    if not (folder / OOF_FILE).is_file():
        raise WeightsError(
            f"{folder} has no {OOF_FILE}: calibrate a model trained by `malaria folds --final`"
        )
    calibration = calibrate(pd.read_csv(folder / OOF_FILE))
    write_card(folder, calibrated_card(card, calibration))
    return calibration
