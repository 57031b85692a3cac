"""Calibrated probabilities: temperature scaling and how far P(Parasitized) is from the truth.

A network trained with cross-entropy says 0.05 where 1% of such cells are parasitized, or 0.7
where 95% are. Temperature scaling divides the logits by one number T, fitted on predictions of
cells the model never saw (out of fold), so that P(Parasitized) means what it says. With two
classes P = sigmoid(logit / T), which keeps every call at 0.5 and the ranking (AUC) as they are.
The contract carries T (``ModelContract.temperature``); every engine applies it.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15  # the usual choice (Guo et al. 2017): wide enough to fill, narrow enough to see
_EPS = 1e-12  # keeps logits finite (|logit| <= 27.6) for probabilities of exactly 0 or 1


def logit(prob: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of probabilities, float64, clipped to stay finite."""
    p = np.clip(np.asarray(prob, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def rescale(prob: np.ndarray, temperature: float) -> np.ndarray:
    """P(Parasitized) under another temperature: sigmoid(logit(p) / temperature), float64.

    ``rescale(p, T)`` turns an uncalibrated model's probabilities into the calibrated ones, and
    ``rescale(q, 1 / T)`` gives the uncalibrated back."""
    return 1 / (1 + np.exp(-logit(prob) / temperature))


def fit_temperature(prob: np.ndarray, label: np.ndarray) -> float:
    """The temperature minimising the log loss of ``rescale(prob, T)`` on these cells.

    ``prob``: P(Parasitized) at temperature 1, (N,); ``label``: 1 = Parasitized, (N,). Raises
    ValueError without both classes (a temperature fitted on one class only grows without
    bound)."""
    from scipy.optimize import minimize_scalar

    z, y = logit(prob), np.asarray(label, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("fitting a temperature needs cells of both classes")

    def log_loss(t: float) -> float:
        # log(1 + e^-x) written stably: np.logaddexp(0, -x)
        return float(np.mean(np.where(y, np.logaddexp(0, -z / t), np.logaddexp(0, z / t))))

    return float(minimize_scalar(log_loss, bounds=(0.05, 20.0), method="bounded").x)


def reliability(prob: np.ndarray, label: np.ndarray, *, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin of P(Parasitized): low, high, cells, mean predicted, share truly
    parasitized (the reliability diagram's points); empty bins are left out."""
    p, y = np.asarray(prob, dtype=np.float64), np.asarray(label, dtype=np.float64)
    index = np.clip((p * bins).astype(int), 0, bins - 1)
    rows = []
    for b in range(bins):
        member = index == b
        if member.any():
            rows.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "cells": int(member.sum()),
                    "predicted": float(p[member].mean()),
                    "observed": float(y[member].mean()),
                }
            )
    return rows


def expected_calibration_error(
    prob: np.ndarray, label: np.ndarray, *, bins: int = ECE_BINS
) -> float:
    """ECE: the cells' share-weighted mean of |mean predicted - share parasitized| over
    equal-width bins; NaN for no cells."""
    rows = reliability(prob, label, bins=bins)
    n = sum(r["cells"] for r in rows)
    if not n:
        return math.nan
    return sum(r["cells"] * abs(r["predicted"] - r["observed"]) for r in rows) / n


def cross_fitted(prob: np.ndarray, label: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each fold's probabilities rescaled with the temperature fitted on the other folds: the
    honest estimate of calibration on patients the temperature never saw."""
    p, y, folds = np.asarray(prob), np.asarray(label), np.asarray(folds)
    out = np.empty(len(p), dtype=np.float64)
    for fold in np.unique(folds):
        held = folds == fold
        out[held] = rescale(p[held], fit_temperature(p[~held], y[~held]))
    return out
