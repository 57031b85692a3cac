"""Smear mode's check on annotated fields (core.evaluation.smear_check): boxes matched by hand."""

from __future__ import annotations

import numpy as np
import pytest

from core.data.annotations import box_iou
from core.evaluation.smear_check import field_counts, match


def test_box_iou_and_matching_by_hand():
    a = np.array([[0, 0, 10, 10], [100, 100, 10, 10]])
    b = np.array([[5, 0, 10, 10], [0, 0, 10, 10], [300, 300, 5, 5]])
    iou = box_iou(a, b)
    assert iou[0, 0] == pytest.approx(50 / 150) and iou[0, 1] == 1.0 and iou[1].max() == 0
    assert match(a, b) == {0: 1}
    boxes = [
        {"type": "ring", "bbox": {"x": "0", "y": "0", "w": "10", "h": "10"}},
        {"type": "red blood cell", "bbox": {"x": "100", "y": "100", "w": "10", "h": "10"}},
    ]
    objects = [
        {"x": 0, "y": 0, "w": 10, "h": 10, "is_cell": True},
        {"x": 200, "y": 0, "w": 10, "h": 10, "is_cell": True},
        {"x": 400, "y": 0, "w": 5, "h": 5, "is_cell": False},
    ]
    c = field_counts(objects, boxes, np.array([0.9, 0.8]), 0.5)
    assert (c["annotated"], c["recalled"], c["infected"], c["infected_called"]) == (2, 1, 1, 1)
    # the unboxed red cell called parasitized counts against us; the debris is not called
    assert (c["not_infected_objects"], c["false_called"], c["boxed_cells"]) == (2, 1, 1)
