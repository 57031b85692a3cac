"""How well smear mode finds and scores the cells of annotated thin-smear fields.

    malaria check smear --data ../shared/data/smear_dev [--weights DIR] [--out FILE]

``--data`` is a folder with ``images/`` and ``annotations.json`` (the layout of
``smear_dev``: one object per image with its ``objects``, each a ``type`` and a ``bbox`` of
``x, y, w, h``). Found objects are matched one to one to the annotated boxes (Hungarian
assignment on IoU, a match needs IoU >= 0.5). Printed, for the tuning fields (``--tune``, a
file-name prefix: the segmentation was tuned on them), the held-out fields and all fields:

- recall: annotated cells (every type but ``difficult``) matched by a found red cell;
- sensitivity: annotated infected cells matched by a red cell called Parasitized;
- false-positive share: of all found objects (red cells, white cells, debris...) not matched
  to an infected or difficult box, the share called Parasitized; and of the red cells alone;
- precision against the boxes, for information only (many red cells have no box);
- seconds per field: segmentation, cropping and scoring (decoding excluded), and with decoding.

Each figure with and without stain matching (``core.smear.fields.match_stain``), so that the gap
between the NIH crops and this lab is measured; the JSON (``--out``) holds them all.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

INFECTED = ("ring", "trophozoite", "schizont", "gametocyte")
IOU = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), boxes as x, y, w, h:
    float (N, M)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    y1 = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def match(truth: np.ndarray, found: np.ndarray, *, iou: float = IOU) -> dict[int, int]:
    """One-to-one matches {truth index: found index} with IoU >= ``iou`` (Hungarian)."""
    if len(truth) == 0 or len(found) == 0:
        return {}
    m = box_iou(truth, found)
    rows, cols = linear_sum_assignment(-m)
    return {int(r): int(c) for r, c in zip(rows, cols) if m[r, c] >= iou}


def field_counts(
    objects: list[dict], boxes: list[dict], prob: np.ndarray, threshold: float
) -> dict[str, int]:
    """Counts for one field. ``objects``: x, y, w, h, is_cell of each found object;
    ``boxes``: the field's annotations; ``prob``: P(Parasitized) of the red cells, in order."""
    cells = [o for o in objects if o["is_cell"]]
    called = np.asarray(prob) >= threshold
    truth = np.array([[float(b["bbox"][k]) for k in "xywh"] for b in boxes]).reshape(-1, 4)
    kinds = [b["type"] for b in boxes]
    found = np.array([[c[k] for k in "xywh"] for c in cells], float).reshape(-1, 4)
    matched = match(truth, found)  # annotation -> red cell
    counted = [i for i, k in enumerate(kinds) if k != "difficult"]
    infected = [i for i, k in enumerate(kinds) if k in INFECTED]
    excluded = {
        matched[i]
        for i, k in enumerate(kinds)
        if i in matched and (k in INFECTED or k == "difficult")
    }
    other_cells = [j for j in range(len(cells)) if j not in excluded]
    n_other = len(objects) - len(excluded)
    return {
        "annotated": len(counted),
        "recalled": sum(i in matched for i in counted),
        "infected": len(infected),
        "infected_found": sum(i in matched for i in infected),
        "infected_called": sum(i in matched and bool(called[matched[i]]) for i in infected),
        "objects": len(objects),
        "red_cells": len(cells),
        "not_infected_objects": n_other,
        "not_infected_cells": len(other_cells),
        "false_called": int(sum(bool(called[j]) for j in other_cells)),
        "boxed_cells": len(set(matched.values())),
    }


def figures(
    counts: list[dict[str, int]], seconds: list[float], seconds_decoded: list[float]
) -> dict[str, float | int]:
    t = {k: sum(c[k] for c in counts) for k in counts[0]}

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "fields": len(counts),
        **t,
        "recall_iou50": ratio(t["recalled"], t["annotated"]),
        "infected_sensitivity": ratio(t["infected_called"], t["infected"]),
        "false_positive_share_all_objects": ratio(t["false_called"], t["not_infected_objects"]),
        "false_positive_share_red_cells": ratio(t["false_called"], t["not_infected_cells"]),
        "precision_vs_boxes": ratio(t["boxed_cells"], t["red_cells"]),
        "seconds_per_field": float(np.mean(seconds)),
        "seconds_per_field_with_decoding": float(np.mean(seconds_decoded)),
    }
