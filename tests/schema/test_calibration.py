"""Temperature scaling and the calibration error (core.schema.calibration)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.schema.calibration import (
    cross_fitted,
    expected_calibration_error,
    fit_temperature,
    logit,
    reliability,
    rescale,
)
from core.schema.contract import ContractError, ModelContract


def _under_confident(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cells whose true log-odds are z, reported by a model that says sigmoid(z / 2): the
    temperature that calibrates it is 0.5."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, n)
    label = rng.random(n) < 1 / (1 + np.exp(-z))
    return 1 / (1 + np.exp(-z / 2)), label


def test_the_fitted_temperature_recovers_how_under_confident_a_model_is():
    prob, label = _under_confident(20_000)
    t = fit_temperature(prob, label)
    assert t == pytest.approx(0.5, rel=0.05)
    before = expected_calibration_error(prob, label)
    after = expected_calibration_error(rescale(prob, t), label)
    assert before > 0.05 and after < 0.015
    # and the honest version, each fold at the others' temperature, says the same
    folds = np.arange(len(prob)) % 5
    assert expected_calibration_error(cross_fitted(prob, label, folds), label) < 0.015


def test_rescaling_keeps_every_call_and_its_inverse_gives_the_probabilities_back():
    p = np.array([1e-6, 0.2, 0.5, 0.7, 0.999])
    q = rescale(p, 0.6)
    assert ((q >= 0.5) == (p >= 0.5)).all() and np.all(np.diff(q) > 0)
    assert q[1] < p[1] and q[3] > p[3]  # below 1: sharper
    np.testing.assert_allclose(rescale(q, 1 / 0.6), p, rtol=1e-6)
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()


def test_the_calibration_error_is_the_weighted_gap_per_bin():
    prob = np.array([0.1] * 10 + [0.9] * 10)
    label = np.array([1] + [0] * 9 + [1] * 5 + [0] * 5)
    # first bin: says 0.1, is 0.1; last bin: says 0.9, is 0.5
    assert expected_calibration_error(prob, label) == pytest.approx(0.5 * 0.4)
    rows = reliability(prob, label)
    assert [r["cells"] for r in rows] == [10, 10]
    assert rows[1]["observed"] == pytest.approx(0.5) and rows[1]["predicted"] == 0.9
    assert math.isnan(expected_calibration_error(np.array([]), np.array([])))


def test_a_temperature_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature(np.array([0.2, 0.9]), np.array([1, 1]))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_the_contract_refuses_a_temperature_that_is_not_a_positive_number(bad):
    with pytest.raises(ContractError, match="temperature"):
        ModelContract(temperature=bad)


def test_an_uncalibrated_contract_is_saved_as_before_a_calibrated_one_with_its_temperature():
    assert "temperature" not in ModelContract().to_json()  # older cards keep their hash
    saved = ModelContract(temperature=0.7).to_json()
    assert saved["temperature"] == 0.7
    assert ModelContract.from_json(saved).temperature == 0.7
