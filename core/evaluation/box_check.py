"""Another lab's cells cut straight from their annotation boxes: how the model calls them when
segmentation is out of the way.

    malaria check boxes --data ../shared/data/smear_dev [--weights DIR]

Each box that is not ``difficult`` is cut from its field, the ellipse inscribed in it kept and
the rest black (as the NIH crops), resized to the contract size and scored. Per block of shots
and over all: infected cells called parasitized (sensitivity), uninfected cells called
parasitized, the AUC of infected against uninfected, and the share the quality gate finds
unlike the training cells. This separates what the classifier knows of a lab from what its
segmentation finds (``malaria check smear``); ``malaria adapt`` measures it on each left-out
block too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from core.data.annotations import DIFFICULT, AnnotatedField, block_of
from core.data.images import decode_image
from core.inference.engines import Engine
from core.smear.fields import ellipse_crop


def box_crops(
    field: AnnotatedField, image: np.ndarray, *, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(crops uint8 (N, size, size, 3), infected bool (N,)) of the field's boxes that are not
    ``difficult`` and hold at least 4x4 pixels inside ``image`` (RGB uint8 (H, W, 3))."""
    crops, infected = [], []
    height, width = image.shape[:2]
    for box in field.boxes:
        if box.kind == DIFFICULT:
            continue
        x, y, w, h = box.xywh
        if min(x + w, width) - max(0, x) < 4 or min(y + h, height) - max(0, y) < 4:
            continue
        crops.append(ellipse_crop(image, box.xywh, size=size))
        infected.append(box.infected)
    empty = np.zeros((0, size, size, 3), np.uint8)
    return (np.stack(crops) if crops else empty), np.array(infected, bool)


Scored = dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]


def score_boxes(
    fields: Iterable[AnnotatedField],
    engine: Engine,
    *,
    prefix: int = 6,
    threshold: float | None = None,
) -> Scored:
    """Per block of shots (``prefix`` characters of a field's name), per field: (called at
    ``threshold``, default the engine's, P(Parasitized), infected, unlike the training cells)
    of its boxes."""
    size = engine.contract.input_size
    threshold = engine.contract.threshold if threshold is None else threshold
    scored: Scored = {}
    for field in fields:
        image = decode_image(field.path.read_bytes(), size=None)
        crops, infected = box_crops(field, image, size=size)
        if not len(crops):
            continue
        prob, features = engine.score(crops)
        scored.setdefault(block_of(field.name, prefix), []).append(
            (prob >= threshold, prob, infected, engine.gate.unlike(features))
        )
    return scored


def box_figures(scored: Scored) -> dict[str, dict]:
    """Figures (see the module docstring) per block of ``scored`` and over ``all``."""
    from sklearn.metrics import roc_auc_score

    def share(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else float("nan")

    out = {}
    for block in [*sorted(scored), "all"]:
        parts = [p for b in sorted(scored) for p in scored[b]] if block == "all" else scored[block]
        if not parts:
            continue
        called, prob, infected, unlike = (np.concatenate(x) for x in zip(*parts))
        both = 0 < infected.sum() < len(infected)
        out[block] = {
            "infected": int(infected.sum()),
            "uninfected": int((~infected).sum()),
            "sensitivity": share(called[infected]),
            "uninfected_called": share(called[~infected]),
            # the ranking, whatever the threshold: does the model know this lab's parasites?
            "auc": float(roc_auc_score(infected, prob)) if both else float("nan"),
            "unlike_share": share(unlike),
            "unlike_share_infected": share(unlike[infected]),
        }
    return out


def check_boxes(
    fields: Iterable[AnnotatedField], engine: Engine, *, prefix: int = 6
) -> dict[str, dict]:
    """Figures (see the module docstring) per block of shots and over ``all``, at the engine's
    threshold."""
    return box_figures(score_boxes(fields, engine, prefix=prefix))
