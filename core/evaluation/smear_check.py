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

import time

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from core.data.annotations import DIFFICULT, INFECTED_STAGES, AnnotatedField, block_of, box_iou
from core.data.images import decode_image
from core.inference.engines import Engine
from core.schema.results import OK
from core.smear.fields import score_field, smear_totals

IOU = 0.5


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
    """Counts for one field. ``objects``: x, y, w, h, is_cell and (optionally) ``counted`` of
    each found object (a red cell that is not counted is neither a call nor a miss against the
    boxes: it is listed, not reported); ``boxes``: the field's annotations; ``prob``:
    P(Parasitized) of the red cells, in order."""
    cells = [o for o in objects if o["is_cell"]]
    counted_cell = np.array([bool(o.get("counted", True)) for o in cells], bool)
    called = (np.asarray(prob) >= threshold) & counted_cell
    truth = np.array([[float(b["bbox"][k]) for k in "xywh"] for b in boxes]).reshape(-1, 4)
    kinds = [b["type"] for b in boxes]
    found = np.array([[c[k] for k in "xywh"] for c in cells], float).reshape(-1, 4)
    matched = match(truth, found)  # annotation -> red cell
    annotated = [i for i, k in enumerate(kinds) if k != DIFFICULT]
    infected = [i for i, k in enumerate(kinds) if k in INFECTED_STAGES]
    excluded = {
        matched[i]
        for i, k in enumerate(kinds)
        if i in matched and (k in INFECTED_STAGES or k == DIFFICULT)
    }
    other_cells = [j for j in range(len(cells)) if j not in excluded]
    n_other = len(objects) - len(excluded)
    return {
        "annotated": len(annotated),
        "recalled": sum(i in matched for i in annotated),
        "infected": len(infected),
        "infected_found": sum(i in matched for i in infected),
        "infected_counted": sum(i in matched and bool(counted_cell[matched[i]]) for i in infected),
        "infected_called": sum(i in matched and bool(called[matched[i]]) for i in infected),
        "objects": len(objects),
        "red_cells": len(cells),
        "counted_cells": int(counted_cell.sum()),
        "counted_called": int(called.sum()),
        "not_infected_objects": n_other,
        "not_infected_cells": len(other_cells),
        "not_infected_counted": int(sum(bool(counted_cell[j]) for j in other_cells)),
        "false_called": int(sum(bool(called[j]) for j in other_cells)),
        "boxed_cells": len(set(matched.values())),
    }


def check_field(
    field: AnnotatedField, engine: Engine, *, threshold: float, stain_norm: bool = False
) -> dict:
    """One annotated field through smear mode as a user gets it (segmentation, the smear gate,
    ``engine`` and its quality gate): its counts (:func:`field_counts`), the parasitemia it
    reports against the boxes', whether it is under review, and the seconds it took
    (``seconds``: segmentation, cropping and scoring; ``decoding``: reading the image)."""
    t0 = time.perf_counter()
    image = decode_image(field.path.read_bytes())
    t1 = time.perf_counter()
    result = score_field(image, engine, stain_norm=stain_norm)
    seconds = time.perf_counter() - t1
    objects = [
        {"x": o.x, "y": o.y, "w": o.w, "h": o.h, "is_cell": o.is_cell}
        | ({"counted": o.quality == OK} if o.is_cell else {})
        for o in result.segmentation.objects
    ]
    boxes = [{"type": b.kind, "bbox": dict(zip("xywh", b.xywh, strict=True))} for b in field.boxes]
    c = field_counts(objects, boxes, result.prob, threshold)
    # what the model reads, also where it withholds it (a model not adapted reports no field):
    # the check measures the reading, and the review the gate alone would give
    totals = smear_totals(pd.DataFrame(result.rows(field.name, threshold)), adapted=True)
    return {
        "field": field.name,
        **c,
        "parasitemia_boxes": field.parasitemia,
        "parasitemia": totals.parasitemia,  # None under review or without counted cells
        "unknown_share": totals.unknown_share,
        "review": totals.review,
        "seconds": seconds,
        "decoding": t1 - t0,
    }


def figures(rows: list[dict]) -> dict[str, float | int]:
    """Smear mode's figures over ``rows`` of :func:`check_field`: the fields it reports (not
    under review) and, for the share reported, all of them."""
    reported = [r for r in rows if not r["review"]]
    keys = [k for k in rows[0] if isinstance(rows[0][k], int) and not isinstance(rows[0][k], bool)]
    t = {k: sum(r[k] for r in reported) for k in keys}

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    errors = [
        abs(r["parasitemia"] - r["parasitemia_boxes"])
        for r in reported
        if r["parasitemia"] is not None and r["parasitemia_boxes"] == r["parasitemia_boxes"]
    ]
    return {
        "fields": len(rows),
        "fields_reported": len(reported),
        "reported_share": ratio(len(reported), len(rows)),
        **t,
        "recall_iou50": ratio(t["recalled"], t["annotated"]),
        "infected_sensitivity": ratio(t["infected_called"], t["infected"]),
        "false_positive_share_counted": ratio(t["false_called"], t["not_infected_counted"]),
        "false_positive_share_all_objects": ratio(t["false_called"], t["not_infected_objects"]),
        "not_counted_share": ratio(t["red_cells"] - t["counted_cells"], t["red_cells"]),
        "parasitemia_mae": float(np.mean(errors)) if errors else float("nan"),
        "parasitemia_mean": float(
            np.mean([r["parasitemia"] for r in reported if r["parasitemia"] is not None])
        )
        if errors
        else float("nan"),
        "parasitemia_boxes_mean": float(np.mean([r["parasitemia_boxes"] for r in reported]))
        if reported
        else float("nan"),
        "seconds_per_field": float(np.mean([r["seconds"] for r in rows])),
        "seconds_per_field_with_decoding": float(
            np.mean([r["seconds"] + r["decoding"] for r in rows])
        ),
    }


def by_block(rows: list[dict], *, prefix: int) -> dict[str, dict]:
    """:func:`figures` per block of shots (the first ``prefix`` characters of a field's name),
    then over all fields."""
    blocks: dict[str, list[dict]] = {}
    for r in rows:
        blocks.setdefault(block_of(r["field"], prefix), []).append(r)
    return {**{b: figures(rs) for b, rs in sorted(blocks.items())}, "all": figures(rows)}
