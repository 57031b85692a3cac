"""Calibrating the quality gate (core.evaluation.gate_check): the feature distance's limit."""

from __future__ import annotations

import numpy as np

from core.evaluation.gate_check import fit_features
from tests.helpers import gaussian_features as _gaussian_features


def test_feature_distance_keeps_its_quantile_and_flags_far_points():
    rng = np.random.default_rng(0)
    fit, labels = _gaussian_features(4000, rng)
    held, _ = _gaussian_features(4000, rng)
    fm = fit_features(fit, labels, held, quantile=0.99, weights_sha256="abc", components=10)
    assert fm.components.shape == (40, 10) and fm.means.shape == (2, 40)
    fresh, _ = _gaussian_features(4000, rng)
    share = float((fm.distance(fresh) > fm.limit).mean())
    assert 0.003 < share < 0.03  # about 1% of new in-distribution points
    far = fresh[:100] + rng.normal(0, 1, (100, 40)) * 3  # inflated along the small directions
    assert (fm.distance(far) > fm.limit).mean() > 0.95
