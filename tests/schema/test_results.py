"""The review column (core.schema.results): gate failures and the band around the threshold,
and what the parasitemia summary counts of them."""

from __future__ import annotations

import pandas as pd
import pytest

from core.schema.metrics import parasitemia_summary
from core.schema.results import OK, UNCERTAIN, review


def test_review_marks_gate_failures_and_the_band_and_leaves_the_rest():
    df = pd.DataFrame(
        {
            "path": list("abcdef"),
            "case_id": ["C1"] * 6,
            "prob_parasitized": [0.9, 0.55, 0.36, 0.2, 0.5, None],
            "prediction": [
                "Parasitized",
                "Parasitized",
                "Uninfected",
                "Uninfected",
                "Parasitized",
                None,
            ],
            "quality": [OK, OK, OK, OK, "blank", None],
            "error": [None] * 5 + ["corrupt"],
        }
    )
    assert list(review(df, threshold=0.5, band=0.15)) == ["", UNCERTAIN, UNCERTAIN, "", "blank", ""]
    assert list(review(df, threshold=0.5, band=0.0)) == ["", "", "", "", "blank", ""]
    old = df.drop(columns="quality")  # runs stored before the gate: everything counts
    assert list(review(old, threshold=0.5, band=0.1)) == ["", UNCERTAIN, "", "", UNCERTAIN, ""]
    with pytest.raises(ValueError, match="band"):
        review(df, threshold=0.5, band=0.6)
    s = parasitemia_summary(df.assign(review=review(df, threshold=0.5, band=0.15))).iloc[0]
    assert (s["cells"], s["errors"], s["not_counted"], s["scored"]) == (6, 1, 1, 4)
    assert (s["parasitized"], s["uncertain"]) == (2, 2)  # the blank image counts nowhere
    assert s["parasitemia"] == 0.5
