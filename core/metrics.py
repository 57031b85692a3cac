"""Classification metrics on P(Parasitized), all from ``sklearn.metrics``."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest
from sklearn import metrics as skm


def binary_metrics(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray,
                   *, threshold: float = 0.5) -> dict[str, float]:
    """Metrics for labels (1 = Parasitized) and probabilities of Parasitized.

    Returns accuracy, auc, sensitivity (recall of Parasitized), specificity, ppv, npv, f1, mcc
    and the confusion counts tp, fp, tn, fn. A metric that is undefined on this data (AUC with
    one class present, PPV with no positive prediction) is NaN, never a made-up number.
    """
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else math.nan

    both = len(np.unique(y)) == 2
    return {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)) if len(y) else math.nan,
        "auc": float(skm.roc_auc_score(y, p)) if both else math.nan,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": float(skm.f1_score(y, pred, zero_division=np.nan)) if len(y) else math.nan,
        "mcc": float(skm.matthews_corrcoef(y, pred)) if both else math.nan,
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
        "threshold": float(threshold),
    }


def wilson_interval(k: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (scipy); (nan, nan) when n == 0."""
    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)
