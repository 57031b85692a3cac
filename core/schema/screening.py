"""The "likely infected" flag of a patient (or a field, a folder): its rule, and how a model
folder's rule is chosen on predictions of patients its models never saw.

Two rules, named by the card's ``screening.rule``:

- ``calls`` (models calibrated since 2026-12): a patient is flagged when it holds more
  confident parasitized calls (P(Parasitized) >= ``call_threshold``) than healthy patients'
  cells give: a one-sided binomial test of that count against ``rate``, the share of healthy
  patients' cells called so (the upper end of its 95% Wilson interval, out of fold), flagged
  when its p-value is below ``alpha``. Few confident calls among 70 cells can be a real,
  light infection; a parasitemia interval cannot say so.
- ``interval`` (older cards, which record only ``cutoff``): flagged when the 95% Wilson
  interval of the parasitemia lies wholly above ``cutoff``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.schema.labels import PARASITIZED
from core.schema.proportions import binomial_p, wilson_interval

RULES = ("calls", "interval")
CALL_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98)  # the candidates ``choose`` compares
ALPHAS = (1e-4, 1e-3, 1e-2, 0.05)
FALSE_ALARM_COST = 10  # ``choose`` trades one healthy patient flagged for ten infected missed


class ScreeningError(ValueError):
    """A card's screening record that cannot be used (unknown rule, a value out of range)."""


@dataclass(frozen=True)
class Screening:
    """One flag rule and its values; see the module docstring."""

    rule: str = "interval"
    cutoff: float = 0.0  # ``interval``: on parasitemia; 0 flags any interval above zero
    call_threshold: float = 0.9  # ``calls``: a confident call, on calibrated P(Parasitized)
    rate: float = 0.0  # ``calls``: healthy cells' share of confident calls
    alpha: float = 0.01  # ``calls``: the binomial test's level
    method: str = ""  # how the values were chosen, in words

    def __post_init__(self) -> None:
        problems = []
        if self.rule not in RULES:
            problems.append(f"rule {self.rule!r} is not one of {', '.join(RULES)}")
        for name, low, high in (
            ("cutoff", 0.0, 1.0),
            ("call_threshold", 0.0, 1.0),
            ("rate", 0.0, 1.0),
            ("alpha", 0.0, 1.0),
        ):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            if not (ok and low <= value <= high):
                problems.append(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
        if self.rule == "calls" and not 0 < self.rate < 1:
            problems.append(f"the calls rule needs a rate in (0, 1), got {self.rate!r}")
        if problems:
            raise ScreeningError("invalid screening rule: " + "; ".join(problems))

    @classmethod
    def from_card(cls, saved: object) -> Screening:
        """The rule a card's ``screening`` record describes; a record without ``rule`` is an
        ``interval`` one. Each rule's own values are required (a record that lost its cutoff
        must not flag at 0). Raises ScreeningError."""
        if not isinstance(saved, dict):
            raise ScreeningError(f"invalid screening record: {saved!r} is not a mapping")
        rule = saved.get("rule", "interval")
        needed = ("cutoff",) if rule == "interval" else ("call_threshold", "rate", "alpha")
        missing = [k for k in needed if k not in saved]
        if missing:
            raise ScreeningError(
                f"invalid screening record: the {rule} rule needs {', '.join(missing)}"
            )
        fields = ("rule", "cutoff", "call_threshold", "rate", "alpha", "method")
        try:
            return cls(**{k: saved[k] for k in fields if k in saved})
        except TypeError as exc:
            raise ScreeningError(f"invalid screening record ({exc})") from None

    def to_json(self) -> dict:
        keep = ("cutoff",) if self.rule == "interval" else ("call_threshold", "rate", "alpha")
        return {"rule": self.rule, **{k: getattr(self, k) for k in keep}, "method": self.method}

    @property
    def confident_at(self) -> float:
        """The P(Parasitized) from which a call counts as confident (1.0 for ``interval``,
        which counts none)."""
        return self.call_threshold if self.rule == "calls" else 1.0

    def describe(self) -> str:
        """The rule in one line that follows "flagged when", for pages and reports."""
        if self.rule == "interval":
            return f"its parasitemia's 95% interval lies wholly above {self.cutoff:.2%}"
        return (
            f"it has more calls at P(Parasitized) ≥ {self.call_threshold:g} than healthy "
            f"patients' cells give ({self.rate:.2%} of them): one-sided binomial "
            f"p < {self.alpha:g}"
        )

    def judge(self, *, cells: int, confident: int, ci_low: float) -> tuple[bool, float]:
        """(flagged, evidence) of one group of ``cells`` counted cells, ``confident`` of them
        called at ``confident_at`` or above, its parasitemia interval starting at ``ci_low``:
        evidence is the binomial p-value for ``calls``, ``ci_low`` for ``interval``."""
        if cells <= 0:
            return False, math.nan
        if self.rule == "interval":
            return bool(ci_low > self.cutoff), ci_low
        p = binomial_p(confident, cells, self.rate)
        return bool(p < self.alpha), p


def _flags(
    predictions: pd.DataFrame, call_threshold: float, rate: float, alpha: float
) -> pd.Series:
    per_case = (
        predictions.assign(confident=predictions["prob_parasitized"] >= call_threshold)
        .groupby("case_id")["confident"]
        .agg(["size", "sum"])
    )
    p = [binomial_p(int(k), int(n), rate) for n, k in zip(per_case["size"], per_case["sum"])]
    return pd.Series(np.array(p) < alpha, index=per_case.index)


def choose(predictions: pd.DataFrame) -> tuple[Screening, dict]:
    """The ``calls`` rule that flags the most infected patients of ``predictions`` (path,
    case_id, label, prob_parasitized: calibrated, out of fold) at a cost of
    ``FALSE_ALARM_COST`` per healthy patient flagged; ties go to the stricter alpha. A patient
    with any Parasitized cell is infected. Returns (rule, its flags: infected / healthy
    patients flagged of how many). Raises ValueError without healthy and infected patients."""
    infected = predictions.groupby("case_id")["label"].apply(lambda s: (s == PARASITIZED).any())
    healthy_cells = predictions[~predictions["case_id"].map(infected)]
    if infected.all() or not infected.any():
        raise ValueError("choosing a screening rule needs healthy and infected patients")

    def outcome(t: float, alpha: float) -> tuple:
        k = int((healthy_cells["prob_parasitized"] >= t).sum())
        # a tiny healthy sample can bound the rate at 1: keep it a rate a test can use
        rate = min(wilson_interval(k, len(healthy_cells))[1], 1 - 1e-6)
        flagged = _flags(predictions, t, rate, alpha)
        tp, fp = int(flagged[infected].sum()), int(flagged[~infected].sum())
        return (tp - FALSE_ALARM_COST * fp, -alpha), t, rate, alpha, tp, fp

    _, t, rate, alpha, tp, fp = max(
        (outcome(t, a) for t, a in itertools.product(CALL_THRESHOLDS, ALPHAS)),
        key=lambda o: o[0],
    )
    rule = Screening(
        rule="calls",
        call_threshold=t,
        rate=rate,
        alpha=alpha,
        method=(
            f"chosen on {len(infected)} patients' out-of-fold calibrated predictions: call "
            f"threshold and alpha from {list(CALL_THRESHOLDS)} x {list(ALPHAS)}, most infected "
            f"patients flagged at {FALSE_ALARM_COST} per healthy one flagged; rate = upper 95% "
            f"Wilson bound of the share of {len(healthy_cells)} cells of "
            f"{int((~infected).sum())} healthy patients called at that threshold"
        ),
    )
    flags = {
        "infected_flagged": tp,
        "infected_patients": int(infected.sum()),
        "healthy_flagged": fp,
        "healthy_patients": int((~infected).sum()),
    }
    return rule, flags


def out_of_fold_flags(predictions: pd.DataFrame) -> pd.DataFrame:
    """The whole choice made honestly per fold: for each fold of ``predictions`` (path,
    case_id, label, prob_parasitized at temperature 1, fold), the temperature is fitted and the
    rule chosen on the other folds, then applied to this fold's patients. Returns one row per
    patient: case_id, fold, infected, cells, confident, p_value, flagged."""
    from core.schema.calibration import fit_temperature, rescale

    rows = []
    for fold in sorted(predictions["fold"].unique()):
        held = predictions["fold"] == fold
        rest = predictions[~held]
        t = fit_temperature(rest["prob_parasitized"], rest["label"] == PARASITIZED)
        rule, _ = choose(rest.assign(prob_parasitized=rescale(rest["prob_parasitized"], t)))
        test = predictions[held].assign(
            prob_parasitized=rescale(predictions.loc[held, "prob_parasitized"], t)
        )
        for case, cells in test.groupby("case_id"):
            confident = int((cells["prob_parasitized"] >= rule.call_threshold).sum())
            flagged, p = rule.judge(cells=len(cells), confident=confident, ci_low=math.nan)
            rows.append(
                {
                    "case_id": case,
                    "fold": fold,
                    "infected": bool((cells["label"] == PARASITIZED).any()),
                    "cells": len(cells),
                    "confident": confident,
                    "p_value": p,
                    "flagged": flagged,
                }
            )
    return pd.DataFrame(rows)
