"""The int8 agreement check (core.evaluation.int8_check)."""

from __future__ import annotations

import numpy as np
import pytest

import core.evaluation.int8_check


def test_agreement_rule_on_a_hand_checked_case():
    labels = np.array([1, 1, 0, 0])
    fp32 = np.array([0.9, 0.6, 0.4, 0.1], dtype=np.float32)
    same = core.evaluation.int8_check.agreement(fp32, fp32 + 0.01, labels, threshold=0.5)
    assert same["passed"] and same["calls_differing"] == 0 and same["accuracy_diff"] == 0
    flipped = core.evaluation.int8_check.agreement(
        fp32, np.array([0.9, 0.45, 0.4, 0.1]), labels, threshold=0.5
    )
    assert flipped["calls_differing"] == 1 and flipped["accuracy_diff"] == pytest.approx(-0.25)
    assert not flipped["passed"]
