"""The "likely infected" flag's rules (core.schema.screening)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.schema.metrics import parasitemia_summary
from core.schema.proportions import binomial_p
from core.schema.screening import (
    Screening,
    ScreeningError,
    choose,
    out_of_fold_flags,
)

CALLS = Screening(rule="calls", call_threshold=0.9, rate=0.005, alpha=0.01)


def test_a_few_confident_calls_flag_a_patient_one_does_not():
    flagged, p = CALLS.judge(cells=70, confident=4, ci_low=0.0)
    assert flagged and p < 1e-3
    flagged, p = CALLS.judge(cells=70, confident=1, ci_low=0.0)
    assert not flagged and p > 0.2
    # the interval rule reads the parasitemia interval instead
    assert Screening(cutoff=0.03).judge(cells=70, confident=0, ci_low=0.05) == (True, 0.05)
    assert not Screening(cutoff=0.03).judge(cells=70, confident=99, ci_low=0.01)[0]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"rule": "votes"}, "rule"),
        ({"cutoff": float("nan")}, "cutoff"),
        ({"cutoff": 1.5}, "cutoff"),
        ({"rule": "calls", "call_threshold": 0.9, "rate": 0.0, "alpha": 0.05}, "rate"),
        ({"rule": "calls", "call_threshold": 0.9, "rate": 0.01, "alpha": -1}, "alpha"),
        ({"rule": "calls", "rate": 0.01, "alpha": 0.05}, "needs call_threshold"),
        ({"method": "Wilson"}, "needs cutoff"),  # a record that lost its cutoff flags nobody at 0
        ([0.1], "not a mapping"),
        ({"cutoff": 0.1, "colour": "red"}, None),  # unknown keys are other records' business
    ],
)
def test_a_card_record_is_validated(record, message):
    if message is None:
        assert Screening.from_card(record).cutoff == 0.1
        return
    with pytest.raises(ScreeningError, match=message):
        Screening.from_card(record)


def test_a_card_of_the_older_kind_reads_as_the_interval_rule():
    rule = Screening.from_card({"cutoff": 0.029, "method": "Wilson"})
    assert rule.rule == "interval" and rule.cutoff == 0.029
    again = Screening.from_card(CALLS.to_json())
    assert again == CALLS


def _cells(case: str, n: int, confident: int, rng, *, infected: bool) -> list[dict]:
    probs = list(rng.uniform(0.0, 0.3, n - confident)) + [0.97] * confident
    labels = ["Uninfected"] * n
    if infected:
        labels[-max(confident, 1) :] = ["Parasitized"] * max(confident, 1)
    return [
        {"path": f"{case}_{i}.png", "case_id": case, "label": lab, "prob_parasitized": p}
        for i, (p, lab) in enumerate(zip(probs, labels))
    ]


def _patients(seed: int = 0) -> pd.DataFrame:
    """20 healthy patients (70 cells, one of them with a single confident false call) and 20
    infected ones with 3 to 8 confident calls each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(20):
        rows += _cells(f"H{i}", 70, 1 if i == 0 else 0, rng, infected=False)
        rows += _cells(f"I{i}", 70, 3 + i % 6, rng, infected=True)
    frame = pd.DataFrame(rows)
    return frame.assign(fold=frame["case_id"].str[1:].astype(int) % 5)


def test_the_chosen_rule_flags_the_light_infections_and_not_the_healthy():
    rule, flags = choose(_patients())
    assert rule.rule == "calls" and rule.call_threshold > 0.3
    assert flags == {
        "infected_flagged": 20,
        "infected_patients": 20,
        "healthy_flagged": 0,
        "healthy_patients": 20,
    }
    with pytest.raises(ValueError, match="healthy and infected"):
        choose(_patients().query("case_id.str.startswith('I')"))


def test_out_of_fold_flags_judge_each_fold_by_a_rule_chosen_without_it():
    flags = out_of_fold_flags(_patients())
    assert len(flags) == 40 and set(flags["fold"]) == set(range(5))
    assert flags.loc[flags["infected"], "flagged"].all()
    assert not flags.loc[~flags["infected"], "flagged"].any()


def test_the_summary_counts_confident_calls_and_gives_the_flag_its_p_value():
    rows = pd.DataFrame(
        [
            {"path": f"C1_{i}.png", "case_id": "C1", "prob_parasitized": p, "error": None}
            for i, p in enumerate([0.95] * 4 + [0.6] * 2 + [0.1] * 64)
        ]
    )
    rows["prediction"] = np.where(rows["prob_parasitized"] >= 0.5, "Parasitized", "Uninfected")
    s = parasitemia_summary(rows, screening=CALLS).iloc[0]
    assert s["parasitized"] == 6 and s["confident"] == 4
    assert s["flag_p"] == pytest.approx(binomial_p(4, 70, 0.005))
    assert s["likely_infected"] and "binomial" in s["flag_rule"]
    interval = parasitemia_summary(rows, screening=Screening(cutoff=0.5)).iloc[0]
    assert not interval["likely_infected"] and math.isnan(interval["flag_p"])
