from __future__ import annotations

import math

import pandas as pd
import pytest

from core.schema.metrics import binary_metrics, parasitemia_summary
from core.schema.screening import Screening


def test_metrics_on_a_hand_checked_case():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1]
    m = binary_metrics(y, p, threshold=0.5)
    # tp=3 fn=1 fp=1 tn=5
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["ppv"] == pytest.approx(0.75) and m["npv"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(0.75)
    mcc = (3 * 5 - 1 * 1) / math.sqrt(4 * 4 * 6 * 6)
    assert m["mcc"] == pytest.approx(mcc)
    # AUC: positives 0.9 .8 .7 .2 vs negatives .6 and five .1 -> 21.5... count pairs
    pairs = sum((a > b) + 0.5 * (a == b) for a in p[:4] for b in p[4:])
    assert m["auc"] == pytest.approx(pairs / 24)


def test_undefined_metrics_are_nan_not_invented():
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(m["auc"]) and math.isnan(m["sensitivity"]) and m["specificity"] == 1


def test_parasitemia_summary_groups_and_flags():
    rows = []
    for i in range(20):  # C1: 10 of 20 parasitized
        rows.append((f"a/C1_{i}.png", "C1", "Parasitized" if i < 10 else "Uninfected", 0.5, None))
    for i in range(30):  # C2: none parasitized, one error row
        rows.append((f"b/C2_{i}.png", "C2", "Uninfected", 0.1, None))
    rows.append(("b/C2_bad.png", "C2", None, None, "corrupt"))
    df = pd.DataFrame(rows, columns=["path", "case_id", "prediction", "prob_parasitized", "error"])
    s = parasitemia_summary(df, screening=Screening(cutoff=0.02)).set_index("group")
    assert s.loc["C1", "parasitemia"] == 0.5 and s.loc["C1", "likely_infected"]
    assert s.loc["C2", "scored"] == 30 and s.loc["C2", "errors"] == 1
    assert not s.loc["C2", "likely_infected"] and s.loc["C2", "parasitemia"] == 0
    by_folder = parasitemia_summary(df, group_by="folder").set_index("group")
    assert set(by_folder.index) == {"a", "b"}
    with pytest.raises(ValueError):
        parasitemia_summary(df, group_by="slide")
    assert s.loc["C1", "mean_prob"] == pytest.approx(0.5)

    # a run read back in chunks gives the same summary as the whole run at once
    chunks = [df.iloc[i : i + 7] for i in range(0, len(df), 7)]
    pd.testing.assert_frame_equal(
        parasitemia_summary(iter(chunks), screening=Screening(cutoff=0.02)),
        parasitemia_summary(df, screening=Screening(cutoff=0.02)),
    )
    assert parasitemia_summary(iter([]), screening=Screening(cutoff=0.02)).empty


def test_parasitemia_groups_sort_naturally_and_name_the_ungrouped():
    df = pd.DataFrame(
        {
            "path": ["a/C12_x.png", "a/C3_y.png", "slide_1.png", "b/C100_1.png"],
            "case_id": ["C12", "C3", "?slide_1", "C100"],
            "prediction": ["Parasitized", "Uninfected", None, "Uninfected"],
            "prob_parasitized": [0.9, 0.1, None, 0.2],
            "error": [None, None, "bad", None],
        }
    )
    summary = parasitemia_summary(df)
    assert list(summary["group"]) == ["(no case id)", "C3", "C12", "C100"]
    df.loc[2] = ["slide_1.png", "?slide_1", "Parasitized", 0.99, None]
    pooled = parasitemia_summary(df, screening=Screening()).set_index("group").loc["(no case id)"]
    assert pooled["parasitemia"] == 1 and not pooled["likely_infected"]  # not a patient
    odd = df.assign(path=["x3²/a.png", "x12/b.png", "x3/c.png", "x3²/d.png"])
    assert list(parasitemia_summary(odd, group_by="folder")["group"]) == ["x3", "x3²", "x12"]
    assert list(parasitemia_summary(df, group_by="folder")["group"]) == ["(top level)", "a", "b"]
