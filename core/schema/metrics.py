"""Classification metrics on P(Parasitized), all from ``sklearn.metrics``.

scikit-learn is imported where it is used: the scoring CLI needs only the parasitemia summary,
and importing sklearn and scipy.stats was a second of every run's start.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from core.schema.labels import PARASITIZED, UNINFECTED, as_posix, is_parasitized
from core.schema.proportions import wilson_interval
from core.schema.results import UNCERTAIN, calls, counted
from core.schema.screening import Screening


def binary_metrics(
    y_true: Sequence[int] | np.ndarray,
    prob: Sequence[float] | np.ndarray,
    *,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Metrics for labels (1 = Parasitized) and probabilities of Parasitized.

    Returns accuracy, auc, sensitivity (recall of Parasitized), specificity, ppv, npv, f1, mcc
    and the confusion counts tp, fp, tn, fn. A metric that is undefined on this data (AUC with
    one class present, PPV with no positive prediction) is NaN, never a made-up number.
    """
    from sklearn import metrics as skm

    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    if len(y) == 0:
        return {
            "n": 0,
            **dict.fromkeys(
                ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "f1", "mcc"),
                math.nan,
            ),
            "tp": 0,
            "fp": 0,
            "tn": 0,
            "fn": 0,
            "threshold": float(threshold),
        }
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else math.nan

    both = len(np.unique(y)) == 2
    return {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "auc": float(skm.roc_auc_score(y, p)) if both else math.nan,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": float(skm.f1_score(y, pred, zero_division=np.nan)),
        "mcc": float(skm.matthews_corrcoef(y, pred)) if both else math.nan,
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
        "threshold": float(threshold),
    }


def curves(
    y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ROC (fpr, tpr, threshold) and precision-recall (recall, precision, threshold) curves."""
    from sklearn import metrics as skm

    fpr, tpr, roc_t = skm.roc_curve(y_true, prob)
    precision, recall, pr_t = skm.precision_recall_curve(y_true, prob)
    roc = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(roc_t, 1.0)})
    pr = pd.DataFrame({"recall": recall, "precision": precision, "threshold": np.append(pr_t, 1.0)})
    return roc, pr


NO_CASE = "(no case id)"
TOP_LEVEL = "(top level)"


def group_of(path: str, group_by: str, case: str) -> str:
    """The summary group of one result: its case id, or its parent folder (zip members too).
    Files whose names carry no case id share the group ``(no case id)``; files outside any
    folder, ``(top level)``."""
    if group_by == "case":
        return NO_CASE if not case or case.startswith("?") else case
    parent = str(as_posix(path).parent)
    return TOP_LEVEL if parent == "." else parent


def group_names(results: pd.DataFrame, *, group_by: str = "case") -> list[str]:
    """:func:`group_of` for each result row (``path``, ``case_id``), as the summaries name it."""
    return [group_of(p, group_by, c) for p, c in zip(results["path"], results["case_id"])]


def _natural_key(text: str) -> list:
    """C3 before C12: digit runs compare as numbers."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"([0-9]+)", str(text)))]


_COUNTS = ["cells", "errors", "not_counted", "parasitized", "confident", "uncertain", "prob_sum"]
NO_SCREENING = Screening()  # the interval rule at cutoff 0: any parasitemia clearly above zero


def parasitemia_counts(
    results: pd.DataFrame, *, group_by: str = "case", confident_at: float = 1.0
) -> pd.DataFrame:
    """Per-group counts of result rows (path, case_id, prediction, prob, error, and where
    present quality and review: ``core.inference.gate``; rows with a ``duplicate_of`` are left out),
    indexed by group: cells, errors, not_counted (failed the quality gate), parasitized,
    confident (counted with P(Parasitized) >= ``confident_at``: the screening flag's calls),
    uncertain (in the review band), prob_sum. Counts of chunks add up, so a run of any size can
    be summarised chunk by chunk. Raises ValueError for an unknown ``group_by``."""
    if group_by not in ("case", "folder"):
        raise ValueError(f"group_by must be 'case' or 'folder', got {group_by!r}")
    if "duplicate_of" in results:  # a second copy of a file: counted once, as the first
        results = results[results["duplicate_of"].isna()]
    if results.empty:
        return pd.DataFrame(columns=_COUNTS, index=pd.Index([], name="group"))
    scored = results["error"].isna()
    ok = counted(results)
    review = results["review"] if "review" in results else pd.Series("", results.index)
    rows = pd.DataFrame(
        {
            "group": group_names(results, group_by=group_by),
            "cells": 1,
            "errors": (~scored).astype(int),
            "not_counted": (scored & ~ok).astype(int),
            "parasitized": (ok & (results["prediction"] == PARASITIZED)).astype(int),
            "confident": (ok & (results["prob_parasitized"] >= confident_at)).astype(int),
            "uncertain": (ok & (review == UNCERTAIN)).astype(int),
            "prob_sum": results["prob_parasitized"].where(ok, 0.0).astype(float),
        }
    )
    return rows.groupby("group", sort=True)[_COUNTS].sum()


def summary_from_counts(
    counts: pd.DataFrame, *, screening: Screening = NO_SCREENING
) -> pd.DataFrame:
    """Parasitemia per group from :func:`parasitemia_counts` (summed over chunks, counted
    ``confident_at=screening.confident_at``).

    Columns: group, cells (rows), errors, not_counted (failed the quality gate: listed for
    review, left out of everything after), scored (the cells counted), parasitized, uncertain
    (counted, but in the review band), parasitemia (parasitized / scored), ci_low/ci_high (95%
    Wilson), mean_prob, confident (the flag's calls), flag_p (the flag's binomial p-value; NaN
    under the ``interval`` rule), likely_infected (``screening`` judges the group; never the
    ``(no case id)`` group, which pools files of unknown patients), flag_rule (the rule in
    words).
    """
    cols = [
        "group",
        "cells",
        "errors",
        "not_counted",
        "scored",
        "parasitized",
        "uncertain",
        "parasitemia",
        "ci_low",
        "ci_high",
        "mean_prob",
        "confident",
        "flag_p",
        "likely_infected",
        "flag_rule",
    ]
    rule = screening.describe()
    rows = []
    for group, c in counts.sort_index(key=lambda idx: idx.map(_natural_key)).iterrows():
        n = int(c["cells"] - c["errors"] - c["not_counted"])
        k = int(c["parasitized"])
        lo, hi = wilson_interval(k, n)
        confident = int(c["confident"])
        flagged, evidence = screening.judge(cells=n, confident=confident, ci_low=lo)
        rows.append(
            {
                "group": group,
                "cells": int(c["cells"]),
                "errors": int(c["errors"]),
                "not_counted": int(c["not_counted"]),
                "scored": n,
                "parasitized": k,
                "uncertain": int(c["uncertain"]),
                "parasitemia": k / n if n else math.nan,
                "ci_low": lo,
                "ci_high": hi,
                "mean_prob": c["prob_sum"] / n if n else math.nan,
                "confident": confident,
                "flag_p": evidence if screening.rule == "calls" else math.nan,
                "likely_infected": flagged and group != NO_CASE,
                "flag_rule": rule,
            }
        )
    return pd.DataFrame(rows, columns=cols)


def parasitemia_summary(
    results: pd.DataFrame | Iterable[pd.DataFrame],
    *,
    group_by: str = "case",
    screening: Screening = NO_SCREENING,
) -> pd.DataFrame:
    """Per-group parasitemia of result rows, given as one frame or as chunks of one run (only
    per-group counts are kept between chunks); see :func:`summary_from_counts`."""
    chunks = [results] if isinstance(results, pd.DataFrame) else results
    at = screening.confident_at
    parts = [parasitemia_counts(chunk, group_by=group_by, confident_at=at) for chunk in chunks]
    parts = [p for p in parts if not p.empty]
    counts = (
        pd.concat(parts).groupby(level=0).sum()
        if parts
        else parasitemia_counts(pd.DataFrame(), group_by=group_by)
    )
    return summary_from_counts(counts, screening=screening)


def confusion_cell(
    predictions: pd.DataFrame, *, threshold: float, true: str, predicted: str
) -> pd.DataFrame:
    """The labelled predictions (label, prob_parasitized) of one cell of the confusion matrix at
    ``threshold``: labelled ``true`` and called ``predicted``, the most confident first (the
    added ``distance`` is |P(Parasitized) - threshold|)."""
    called = calls(predictions["prob_parasitized"], threshold=threshold)
    cell = predictions[(predictions["label"] == true) & (called == predicted)]
    distance = (cell["prob_parasitized"] - threshold).abs()
    return cell.assign(distance=distance).sort_values("distance", ascending=False)


def per_case(predictions: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """Per patient of labelled predictions (case_id, label, prob_parasitized): cells, accuracy
    at ``threshold``, true_parasitized, called_parasitized, mean_prob; the least accurate first."""
    called = calls(predictions["prob_parasitized"], threshold=threshold)
    return (
        predictions.assign(
            correct=called == predictions["label"],
            called=called == PARASITIZED,
            parasitized=is_parasitized(predictions["label"]),
        )
        .groupby("case_id")
        .agg(
            cells=("path", "size"),
            accuracy=("correct", "mean"),
            true_parasitized=("parasitized", "sum"),
            called_parasitized=("called", "sum"),
            mean_prob=("prob_parasitized", "mean"),
        )
        .reset_index()
        .sort_values("accuracy")
    )


def screening_calibration(predictions: pd.DataFrame, *, threshold: float) -> dict:
    """Cutoff for the "likely infected" flag from held-out predictions (path, case_id, label,
    prob_parasitized), e.g. the validation split's.

    The flag fires when a patient's parasitemia interval lies wholly above what the model calls
    parasitized among truly uninfected cells: the cutoff is the upper end of the 95% Wilson
    interval of the false-positive rate on the Uninfected cells.
    """
    neg = predictions[predictions["label"] == UNINFECTED]
    fp = int((neg["prob_parasitized"] >= threshold).sum())
    lo, hi = wilson_interval(fp, len(neg))
    return {
        "cutoff": hi,
        "false_positive_rate": fp / len(neg) if len(neg) else math.nan,
        "uninfected_cells": int(len(neg)),
        "cases": int(neg["case_id"].nunique()),
        "threshold": float(threshold),
        "method": "upper 95% Wilson bound of the false-positive rate on the validation "
        "split's Uninfected cells; flag = parasitemia interval's lower bound "
        "above it",
    }


def flag_performance(summary: pd.DataFrame, infected_cases: set[str]) -> dict:
    """Patient-level sensitivity/specificity of ``likely_infected`` against known infection."""
    truth = summary["group"].isin(infected_cases)
    flag = summary["likely_infected"].astype(bool)
    tp, fn = int((truth & flag).sum()), int((truth & ~flag).sum())
    tn, fp = int((~truth & ~flag).sum()), int((~truth & flag).sum())
    return {
        "infected_patients": tp + fn,
        "healthy_patients": tn + fp,
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "missed": sorted(summary.loc[truth & ~flag, "group"]),
        "false_alarms": sorted(summary.loc[~truth & flag, "group"]),
    }


def label_smoothing_floor(eps: float) -> float:
    """The lowest training loss that label smoothing ``eps`` allows with two classes: the
    entropy of the smoothed target (1 - eps/2, eps/2)."""
    q = eps / 2
    return -((1 - q) * math.log(1 - q) + q * math.log(q)) if q > 0 else 0.0
