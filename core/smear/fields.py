"""Smear mode: whole microscope fields in, red cells found and scored, parasitemia out.

    malaria smear INPUT... --out cells.csv [--summary fields.csv] [--overlays DIR] (core.cli.smear)

A field of view (e.g. a 1280x960 camera JPEG of a Giemsa thin smear) is segmented with
classical image processing, at half resolution for speed:

1. foreground: Otsu's threshold on the CIELAB a* (red-green) channel: red cells, white cells
   and stain are redder than the light, greenish or grey background (on L*, darker than it,
   where a* is too pale to hold whole cells); holes smaller than a quarter of a cell (the
   central pallor) are filled;
2. the typical cell radius is measured in the field (median height of the distance transform's
   peaks), so nothing depends on the magnification;
3. touching cells are split by a marker watershed: one marker per peak of the distance to the
   background minus the smoothed redness (a cell is paler in its middle than at its rim, which
   separates cells that touch along a wide front); an object still larger than a clump of
   cells is split again on its own shape, once cut along the dark lines where its cells'
   rims meet (packed cells whose blob has one centre);
4. each region is a red cell unless its size, shape or colour says otherwise: small objects
   (platelets, debris), large ones (white cells, clumps), irregular ones, and objects whose
   pixels are mostly a dark nucleus stain (white cells). Those are listed, never scored or
   counted.

Each red cell is cropped to its box, its background blacked out as in the NIH crops, resized to
the model's input and scored by the engine of ``malaria score`` (``stain_norm`` first matches
the field's colours to the NIH training cells'; off by default, see ``malaria check smear``).
Cells cut by the field's edge are kept and marked ``edge``. Results go to the result store field
by field, so a resumed run scores only the fields that are missing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.filters import sato, threshold_otsu
from skimage.measure import regionprops
from skimage.morphology import remove_small_holes, remove_small_objects
from skimage.segmentation import watershed

from core.data.images import ImageError
from core.data.sources import ImageSource, read_image
from core.inference.gate import no_colour
from core.inference.pipeline import upload_run
from core.inference.store import ResultStore
from core.schema.labels import PARASITIZED, predicted_class
from core.schema.metrics import NO_SCREENING, group_of, summary_from_counts
from core.schema.results import (
    NO_COLOUR,
    OK,
    SMEAR_COLUMNS,
    UNLIKE_TRAINING,
    calls,
    is_counted,
)
from core.schema.screening import Screening

RED_CELL = "red cell"
# Why a red cell found in a field is not counted (its ``quality``): counted cells are whole,
# single red cells. The quality gate does not take a whole cell out of the count (its
# ``known``): the cells unlike those a model knows are its infected ones more often than not
# (an adapted model's gate: 15% of another block's infected cells, 0.1% of its uninfected), so
# leaving them out read parasitemia low; they decide whether a field is reported instead.
CUT_BY_EDGE = "cut by the field's edge"
FRAGMENT = "fragment (part of a cell)"
CLUMP = "clump of two or more cells"
# A field (or a run) most of whose whole red cells lie farther from the cells the model knows
# than its gate allows gets no parasitemia: the model does not know that slide.
UNKNOWN_SHARE = 0.5
UNLIKE_MODEL = "unlike the cells this model was trained or adapted on"
REVIEW_UNKNOWN = f"review: {UNLIKE_MODEL}"
# A model never adapted to a lab's fields (malaria adapt) gives no field a parasitemia: it
# learnt from NIH crops, and on another lab's fields it read about four times the boxes'
# parasitemia (docs/smear.md); its cell calls are still listed, for review.
REVIEW_NOT_ADAPTED = "review: the model was not adapted to a lab's fields (malaria adapt)"
# CIELAB (OpenCV 8-bit scale) mean and std of cell pixels in 3,000 NIH crops of the shipped
# model's 70 training patients (background and a 2 px rim left out): the stain the model knows.
NIH_LAB_MEAN = (169.4, 142.67, 126.14)
NIH_LAB_STD = (14.12, 9.96, 10.96)


@dataclass(frozen=True)
class SegmentConfig:
    """Segmentation settings, chosen on the 20 development fields PA1717xx (never the others)."""

    work_px: int = 640  # fields are segmented with their longer side at most this many px
    hole: float = 0.25  # fill holes smaller than this share of a cell (the central pallor)
    min_cell: float = 0.3  # objects below this share of a typical cell: platelets, debris
    max_cell: float = 2.5  # above: white cells, clumps (an infected P. vivax cell is ~2x)
    min_solidity: float = 0.8  # less convex than this: a clump or debris
    marker_distance: float = 0.6  # min distance between two cells' markers, in cell radii
    # how much the redder rim counts against the distance (1.0 until 2026-12-04; 0.5 found 33
    # of PA1717's 37 infected cells whole instead of 30, and 7 more of its boxes: a parasite's
    # stain is redder than its cell and sank that cell's marker)
    pallor_weight: float = 0.5
    # objects larger than this share of a cell are split again on their shape alone (the
    # distance to their own border): 39 more of PA1717's boxes found as red cells
    resplit: float = 1.8
    # and those still one object above max_cell (cells packed so tight that their blob has one
    # centre) along the dark lines inside them, where two cells' rims meet: the pixels above
    # this quantile of the blob's ridge filter are cut before the distance is taken (1: no cut;
    # PA1717: 35 of its 37 infected cells found whole, 3,137 of its boxes; 0.8 and 0.6: 34-35,
    # 3,120-3,127)
    ridge: float = 0.7
    nucleus_share: float = 0.3  # white cell: more than this share of pixels nucleus-dark
    nucleus_dark: float = 45.0  # L* below the field's red-cell median by this much
    # Red cells counted only whole and single (chosen on the PA1717 block's boxed cells: 5.5% of
    # its whole boxed cells and none of its infected ones fall outside, by size or the edge)
    min_whole: float = 0.7  # below this share of a typical cell: a fragment
    clump_size: float = 1.8  # above this share of a typical cell and less solid than
    clump_solidity: float = 0.9  # this: two or more cells merged (an infected cell is round)
    # A typical cell's radius is at most this share of the field's shorter side (0.03-0.04 in
    # the development fields): one blob over much of the field (a red disc, a half-red field)
    # then measures as "large", not as a field of one giant cell.
    max_radius: float = 0.1
    # the a* foreground is too pale when its cells measure below this share of the radius that
    # the lightness foreground gives (then that is segmented; 1 field of the 80 development ones)
    pale_radius: float = 0.5
    min_side: int = 32  # px of the field's shorter side at the working scale: a few cells


class FieldError(ValueError):
    """A field that cannot be segmented (too small, no colour); the message is for the user."""


@dataclass(frozen=True)
class FieldObject:
    """One object found in a field; coordinates in the field's pixels."""

    x: int
    y: int
    w: int
    h: int
    area: int  # mask pixels at the field's resolution
    edge: bool  # touches the field's border: cut by it
    kind: str  # RED_CELL, or why it is not one
    mask: np.ndarray = field(repr=False)  # bool (h, w): the object inside its box
    quality: str = OK  # OK, or why it is not counted (its kind, if not a red cell)

    @property
    def is_cell(self) -> bool:
        return self.kind == RED_CELL


@dataclass(frozen=True)
class Segmentation:
    objects: tuple[FieldObject, ...]
    radius: float  # typical red-cell radius, field px
    field_shape: tuple[int, int]  # (H, W)

    @property
    def cells(self) -> list[FieldObject]:
        return [o for o in self.objects if o.is_cell]


def _maxima(height: np.ndarray, *, min_distance: int, keep: np.ndarray) -> np.ndarray:
    """(row, col) of the local maxima of ``height`` (float32 2-D) at least ``min_distance``
    apart (a plateau gives one, at its middle) where ``keep`` (bool) is set: int (N, 2).
    (skimage's peak_local_max spaces peaks in a Python loop: seconds per field here.)"""
    size = 2 * min_distance + 1
    top = cv2.dilate(height, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    plateaus, n = ndi.label((height >= top) & keep)
    if n == 0:
        return np.empty((0, 2), int)
    centres = ndi.center_of_mass(np.ones_like(height), plateaus, np.arange(1, n + 1))
    return np.round(np.array(centres)).astype(int).reshape(-1, 2)


def _foreground(channel: np.ndarray) -> np.ndarray:
    """Pixels of ``channel`` above its Otsu threshold, specks opened away: bool."""
    fg = (channel > threshold_otsu(channel)).astype(np.uint8)
    return cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0


def _cell_radius(fg: np.ndarray) -> float:
    """Typical cell radius (px) of a foreground mask: the median peak of the distance to the
    background, once with every hole filled, then with holes below a cell filled."""
    r = 1.0
    for holes in (None, 0.4):
        filled = (
            ndi.binary_fill_holes(fg)
            if holes is None
            else remove_small_holes(fg, max_size=int(holes * math.pi * r * r))
        )
        if filled.all():  # no background left: the distance to it is undefined (OpenCV: 8e37)
            break
        dist = cv2.distanceTransform(filled.astype(np.uint8), cv2.DIST_L2, 5)
        peaks = _maxima(
            dist,
            min_distance=max(2, int(0.5 * r)),
            keep=dist >= (max(1.5, 0.3 * r) if holes else 1.5),
        )
        if len(peaks) == 0:
            return r
        r = float(np.median(dist[tuple(peaks.T)]))
    return max(r, 2.0)


def segment(image: np.ndarray, *, config: SegmentConfig = SegmentConfig()) -> Segmentation:
    """Find the objects of an RGB uint8 field (H, W, 3) and tell red cells from the rest.

    Raises ValueError for an image that is not RGB, FieldError for a field too small to hold
    cells (``config.min_side``) or without colour (the stain is what is segmented); a field
    without objects gives none.
    """
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    scale = min(1.0, config.work_px / max(H, W))
    if min(H, W) * scale < config.min_side:
        raise FieldError(
            f"a field of {W}x{H} px is too small to segment: its shorter side must be at least "
            f"{math.ceil(config.min_side / scale)} px"
        )
    if no_colour(image):
        raise FieldError(f"not counted: {NO_COLOUR}")
    small = (
        image
        if scale == 1.0
        else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    )
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)
    red = lab[..., 1]
    if float(red.max() - red.min()) < 4:  # a blank or grey field: nothing to find
        return Segmentation((), 0.0, (H, W))
    fg = _foreground(red)
    if not fg.any() or fg.all():
        return Segmentation((), 0.0, (H, W))
    r = _cell_radius(fg)
    # a stain too pale in a* leaves only the cells' rims in the foreground, and the radius
    # measured on them is a fraction of the cells' (PA171695: 10 px where its cells' are 36, no
    # box found): the darker-than-background foreground is taken instead
    dark = _foreground(-lab[..., 0])
    if dark.any() and not dark.all() and r < config.pale_radius * (r_dark := _cell_radius(dark)):
        fg, r = dark, r_dark
    r = min(r, config.max_radius * min(fg.shape))
    a0 = math.pi * r * r
    fg = remove_small_holes(fg, max_size=int(config.hole * a0))
    fg = remove_small_objects(fg, max_size=int(0.1 * a0))
    dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    redness = np.asarray(
        cv2.GaussianBlur(red - float(np.median(red[~fg])), (0, 0), 0.25 * r), dtype=np.float32
    )
    redness = redness / (float(np.percentile(redness[fg], 95)) + 1e-6)
    height = dist / r - config.pallor_weight * redness
    peaks = _maxima(
        height, min_distance=max(1, int(config.marker_distance * r)), keep=dist >= 0.3 * r
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = _resplit(watershed(-height, markers, mask=fg), lab[..., 0], a0=a0, r=r, config=config)
    cell_L = np.median(lab[..., 0][fg])
    objects = [
        _object(p, labels, lab[..., 0], cell_L, a0, scale, (H, W), config)
        for p in regionprops(labels)
    ]
    return Segmentation(tuple(objects), r / scale, (H, W))


def _resplit(
    labels: np.ndarray, lightness: np.ndarray, *, a0: float, r: float, config: SegmentConfig
) -> np.ndarray:
    """``labels`` with each object above ``config.resplit`` cells split again by a watershed on
    the distance to its own border (one marker per cell-sized bulge), an object above
    ``config.max_cell`` cells first cut along its dark ridges (``lightness``: L*, the field's
    shape); changed in place."""
    top = int(labels.max())
    for p in regionprops(labels):
        if p.area <= config.resplit * a0:
            continue
        y0, x0, y1, x1 = p.bbox
        region = inner = p.image
        if p.area > config.max_cell * a0 and config.ridge < 1:
            ridges = sato(lightness[y0:y1, x0:x1], sigmas=(1, 2), black_ridges=True)
            inner = region & (ridges <= np.quantile(ridges[region], config.ridge))
        dist = cv2.distanceTransform(np.pad(inner, 1).astype(np.uint8), cv2.DIST_L2, 5)
        dist = dist[1:-1, 1:-1]
        peaks = _maxima(
            dist, min_distance=max(1, int(config.marker_distance * r)), keep=dist >= 0.3 * r
        )
        if len(peaks) < 2:
            continue
        markers = np.zeros(region.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        parts = watershed(-dist, markers, mask=region)[region]
        labels[y0:y1, x0:x1][region] = np.where(parts == 1, p.label, top + parts - 1)
        top += len(peaks) - 1
    return labels


def _object(
    p,
    labels: np.ndarray,
    L: np.ndarray,
    cell_L: float,
    a0: float,
    scale: float,
    shape: tuple[int, int],
    config: SegmentConfig,
) -> FieldObject:
    y0, x0, y1, x1 = p.bbox
    region = p.image
    dark = float((L[y0:y1, x0:x1][region] < cell_L - config.nucleus_dark).mean())
    rel = p.area / a0
    if rel < config.min_cell:
        kind = "not a red cell: small (platelet or debris)"
    elif rel > config.max_cell:
        kind = "not a red cell: large (white cell, clump or debris)"
    elif dark > config.nucleus_share:
        kind = "not a red cell: dark nucleus stain (white cell)"
    elif p.solidity < config.min_solidity:
        kind = "not a red cell: irregular shape (clump or debris)"
    else:
        kind = RED_CELL
    H, W = shape
    fx0, fy0 = int(x0 / scale), int(y0 / scale)
    fx1, fy1 = min(W, int(math.ceil(x1 / scale))), min(H, int(math.ceil(y1 / scale)))
    mask = (
        cv2.resize(region.astype(np.uint8), (fx1 - fx0, fy1 - fy0), interpolation=cv2.INTER_NEAREST)
        > 0
    )
    edge = y0 == 0 or x0 == 0 or y1 >= labels.shape[0] or x1 >= labels.shape[1]
    if kind != RED_CELL:
        quality = kind
    elif edge:
        quality = CUT_BY_EDGE
    elif rel < config.min_whole:
        quality = FRAGMENT
    elif rel > config.clump_size and p.solidity < config.clump_solidity:
        quality = CLUMP
    else:
        quality = OK
    return FieldObject(
        fx0, fy0, fx1 - fx0, fy1 - fy0, int(mask.sum()), bool(edge), kind, mask, quality
    )


# ---------------------------------------------------------------------------------------------
# Crops as the model knows them
# ---------------------------------------------------------------------------------------------


def match_stain(image: np.ndarray, cells: Sequence[FieldObject]) -> np.ndarray:
    """``image`` with its colours moved so that its red cells' CIELAB mean and std match the NIH
    training cells' (Reinhard et al. 2001, per channel, over all red-cell pixels of the field):
    a stain that is greyer or more magenta than the NIH slides looks like theirs to the model,
    and a parasite stays as much darker than its cell as it was. RGB uint8 (H, W, 3) in and
    out; an image without cells is returned as it is."""
    if not cells:
        return image
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    pixels = np.concatenate([lab[c.y : c.y + c.h, c.x : c.x + c.w][c.mask] for c in cells])
    pixels = pixels.astype(np.float32)
    mean, std = pixels.mean(0), pixels.std(0) + 1e-6
    out = (lab.astype(np.float32) - mean) * (np.array(NIH_LAB_STD) / std) + np.array(NIH_LAB_MEAN)
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def masked_crop(image: np.ndarray, x: int, y: int, mask: np.ndarray, *, size: int) -> np.ndarray:
    """The cell whose ``mask`` (uint8 0/1, (h, w)) lies at (``x``, ``y``) in ``image``, cut to
    the mask's box with everything outside the mask black, as in the NIH crops, and resized to
    (size, size) without keeping the aspect ratio: uint8 (size, size, 3)."""
    h, w = mask.shape
    crop = image[y : y + h, x : x + w] * mask[..., None]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)


def ellipse_crop(
    image: np.ndarray, box: tuple[float, float, float, float], *, size: int
) -> np.ndarray:
    """An annotated cell as ``masked_crop`` cuts a segmented one, the ellipse inscribed in its
    ``box`` (x, y, w, h) standing for its outline; a box past the image's edge is first cut to
    the image (the ellipse then fills what is left of it)."""
    x0, y0 = max(0, round(box[0])), max(0, round(box[1]))
    x1 = min(image.shape[1], round(box[0] + box[2]))
    y1 = min(image.shape[0], round(box[1] + box[3]))
    w, h = max(0, x1 - x0), max(0, y1 - y0)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 2, h // 2), 0, 0, 360, 1, thickness=-1)
    return masked_crop(image, x0, y0, mask, size=size)


def crop_cells(image: np.ndarray, cells: Sequence[FieldObject], *, size: int) -> np.ndarray:
    """``masked_crop`` of each cell: uint8 (N, size, size, 3)."""
    out = np.empty((len(cells), size, size, 3), np.uint8)
    for i, c in enumerate(cells):
        out[i] = masked_crop(image, c.x, c.y, c.mask, size=size)
    return out


@dataclass(frozen=True)
class FieldResult:
    """One field, segmented and scored."""

    segmentation: Segmentation
    prob: np.ndarray  # float32 (number of red cells,): P(Parasitized) of segmentation.cells
    seconds: float  # segmentation, cropping and scoring (decoding excluded)
    # bool (number of red cells,): features beyond the quality gate's limit (all False for a
    # model without a feature calibration)
    unlike: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def rows(self, image: str, threshold: float) -> list[dict]:
        """One SMEAR_COLUMNS row per object: red cells with their probabilities first."""
        probs = iter(self.prob.tolist())
        unlike = iter(self.unlike.tolist() if len(self.unlike) else [False] * len(self.prob))
        rows = []
        for o in self.segmentation.objects:
            p = next(probs) if o.is_cell else None
            rows.append(
                {
                    "image": image,
                    "x": o.x,
                    "y": o.y,
                    "w": o.w,
                    "h": o.h,
                    "area": o.area,
                    "edge": o.edge,
                    "object": o.kind,
                    "quality": o.quality,
                    "known": not next(unlike) if o.is_cell else None,
                    "prob_parasitized": p,
                    "prediction": None if p is None else predicted_class(p, threshold),
                    "error": None,
                }
            )
        if not rows:
            rows.append(error_row(image, "no cells found in this field"))
        return rows


def error_row(image: str, message: str) -> dict:
    return {**dict.fromkeys(SMEAR_COLUMNS), "image": image, "error": message}


def score_field(
    image: np.ndarray, engine, *, stain_norm: bool = False, config: SegmentConfig = SegmentConfig()
) -> FieldResult:
    """Segment an RGB uint8 field (H, W, 3) and score its red cells with ``engine`` (a
    ``core.inference.engines.Engine``)."""
    start = time.perf_counter()
    seg = segment(image, config=config)
    cells = seg.cells
    prob, unlike = np.empty(0, np.float32), np.zeros(0, bool)
    if cells:
        source = match_stain(image, cells) if stain_norm else image
        prob, features = engine.score(crop_cells(source, cells, size=engine.contract.input_size))
        prob, unlike = np.asarray(prob, np.float32), engine.gate.unlike(features)
    return FieldResult(seg, prob, time.perf_counter() - start, unlike)


def restored_field(image: np.ndarray, rows: pd.DataFrame) -> FieldResult:
    """A stored field again, to draw: the RGB uint8 field ``image`` (H, W, 3) segmented anew
    (segmentation is deterministic and needs no model) with the probabilities and quality of
    its stored ``rows`` (SMEAR_COLUMNS, in object order); ``seconds`` is 0. Raises FieldError
    when the objects found are not the stored ones (the file changed since it was scored)."""
    seg = segment(image)
    found = [(o.x, o.y, o.w, o.h) for o in seg.objects]
    if found != list(zip(rows["x"], rows["y"], rows["w"], rows["h"])):
        raise FieldError("this field's image is not the one the run scored (it changed since)")
    red = rows[rows["object"] == RED_CELL]
    unlike = _unlike(red).to_numpy()
    return FieldResult(seg, red["prob_parasitized"].to_numpy(np.float32), 0.0, unlike)


def iter_fields(
    sources: Iterable[ImageSource],
    engine,
    *,
    threshold: float | None = None,
    stain_norm: bool = False,
) -> Iterator[tuple[ImageSource, FieldResult | None, list[dict]]]:
    """(source, result or None, rows) per field; a field that cannot be read is one error row."""
    threshold = engine.contract.threshold if threshold is None else threshold
    for src in sources:
        try:
            image = read_image(src)
        except ImageError as exc:
            yield src, None, [error_row(src.path, str(exc))]
            continue
        try:
            result = score_field(image, engine, stain_norm=stain_norm)
        except FieldError as exc:
            yield src, None, [error_row(src.path, str(exc))]
            continue
        except Exception as exc:  # OpenCV, scikit-image: it costs this field, not the run
            why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
            yield src, None, [error_row(src.path, f"cannot segment this field ({why})")]
            continue
        yield src, result, result.rows(src.path, threshold)


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = (
    "level",
    "group",
    "cells",
    "not_counted",
    "other_objects",
    "errors",
    "parasitized",
    "parasitemia",
    "ci_low",
    "ci_high",
    "mean_prob",
    "confident",
    "flag_p",
    "likely_infected",
    "flag_rule",
    "unknown_share",
    "review",
)


def is_red_cell(cells: pd.DataFrame) -> pd.Series:
    """Rows (SMEAR_COLUMNS) of red cells that were scored, counted or not."""
    return (cells["object"] == RED_CELL) & cells["error"].isna()


def counted_cells(cells: pd.DataFrame) -> pd.Series:
    """Rows of red cells that count in parasitemia: scored, whole, single and inside the field
    (``quality`` OK; unknown in runs stored before it)."""
    return is_red_cell(cells) & is_counted(_column(cells, "quality"))


def _column(cells: pd.DataFrame, name: str) -> pd.Series:
    """``cells[name]``, or all None for rows of a run stored before that column."""
    return cells[name] if name in cells else pd.Series(None, cells.index, dtype=object)


def _unlike(cells: pd.DataFrame) -> pd.Series:
    """Rows the quality gate finds unlike the cells the model knows: ``known`` False, or, in
    runs stored before it, ``quality`` UNLIKE_TRAINING (the gate took such cells out then)."""
    return _column(cells, "known").eq(False) | (_column(cells, "quality") == UNLIKE_TRAINING)


def _unknown(cells: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(whole single red cells, those of them the gate finds unlike the cells it knows)."""
    quality = _column(cells, "quality")
    whole = is_red_cell(cells) & (is_counted(quality) | (quality == UNLIKE_TRAINING))
    return whole, whole & _unlike(cells)


def under_review(cells: pd.DataFrame, *, adapted: bool) -> pd.Series:
    """Rows of the fields the model reports none of: those whose whole red cells mostly (over
    UNKNOWN_SHARE) lie beyond the quality gate's limit (the model does not know those fields),
    and for a model not ``adapted`` to a lab's fields, every field with a whole red cell."""
    whole, unknown = _unknown(cells)
    per_field = pd.DataFrame({"field": cells["image"], "whole": whole, "unknown": unknown})
    sums = per_field.groupby("field")[["whole", "unknown"]].sum()
    review = sums["unknown"] > UNKNOWN_SHARE * sums["whole"]
    if not adapted:
        review = sums["whole"] > 0
    return cells["image"].map(review).fillna(False).astype(bool)


@dataclass(frozen=True)
class SmearTotals:
    """What a set of fields holds, over all of them (:func:`smear_totals`)."""

    fields: int  # images, those that gave an error row too
    red_cells: int  # counted red cells of the fields reported (not adapted: of all fields)
    parasitized: int  # of them, called Parasitized
    unknown_share: float  # of all whole red cells, those unlike the cells the model knows
    fields_review: int  # fields under review (:func:`under_review`), left out of the counts
    review: bool  # every field with red cells is under review: no parasitemia at all

    @property
    def parasitemia(self) -> float | None:
        """Parasitized red cells / counted red cells; None without them or under review."""
        return self.parasitized / self.red_cells if self.red_cells and not self.review else None


# What a model that was never adapted (malaria adapt) knows: every smear field is another lab's
NIH_ONLY = (
    "This model learnt from the NIH cells alone (P. falciparum, thin-smear crops from one lab) "
    "and was not adapted to your lab (malaria adapt): these fields come from another lab than "
    "its training cells."
)
NOT_ADAPTED = (
    "No parasitemia is given: on another lab's fields a model that was not adapted read about "
    "four times the true parasitemia. Adapt it to your lab with a few annotated fields "
    "(the Adapt to your lab page, or malaria adapt); until then its cell calls are listed "
    "for review, not as a count."
)
ADAPTED_ELSEWHERE = (
    "This model was adapted to a lab's fields (malaria adapt), but these look like another "
    "lab's: adapt it to theirs."
)


def domain_note(totals: SmearTotals, *, adapted: bool) -> tuple[str, str] | None:
    """(level: "error", "warning" or "info"; plain sentences) saying whether the fields come
    from another lab than the cells the model learnt from. A model not ``adapted``: a warning
    saying why no parasitemia is given (NOT_ADAPTED) when a field has whole red cells, else
    NIH_ONLY (no field of the NIH set is a whole field). An adapted one: an error when every
    field is under review (REVIEW_UNKNOWN: no parasitemia at all), a warning when some are,
    None when it knows the fields."""
    if not adapted:
        return ("warning", f"{NIH_ONLY} {NOT_ADAPTED}") if totals.review else ("info", NIH_ONLY)
    unlike = f"{totals.unknown_share:.0%} of the whole red cells are {UNLIKE_MODEL}"
    lab = ADAPTED_ELSEWHERE
    if totals.review:
        return "error", f"Another lab's fields: {unlike}, so no parasitemia is given. {lab}"
    if totals.fields_review:
        return "warning", (
            f"{totals.fields_review} of {totals.fields} fields look like another lab's "
            f"({unlike}): they get no parasitemia and are left out of the counts. {lab}"
        )
    return None


def smear_totals(cells: pd.DataFrame, *, adapted: bool) -> SmearTotals:
    """Totals of SMEAR_COLUMNS rows, by their ``prediction`` (re-made at the threshold in use),
    of the fields a model ``adapted`` or not reports (:func:`under_review`)."""
    review = under_review(cells, adapted=adapted)
    ok = counted_cells(cells)
    if adapted:  # fields it does not know are left out; not adapted, it counts all, reports none
        ok &= ~review
    whole, unknown = _unknown(cells)
    return SmearTotals(
        fields=int(cells["image"].nunique()),
        red_cells=int(ok.sum()),
        parasitized=int((ok & (cells["prediction"] == PARASITIZED)).sum()),
        unknown_share=float(unknown.sum() / whole.sum()) if whole.any() else 0.0,
        fields_review=int(cells.loc[review, "image"].nunique()),
        review=bool(whole.any() and review[whole].all()),
    )


def field_summary(
    cells: pd.DataFrame,
    *,
    adapted: bool,
    threshold: float | None = None,
    screening: Screening = NO_SCREENING,
) -> pd.DataFrame:
    """Per field, then per folder (or zip): counted red cells (``cells``), red cells not counted
    (cut by the edge, fragments, clumps, unlike the training cells), other objects, fields that
    gave errors, called parasitized, parasitemia with its 95% Wilson interval, mean
    P(Parasitized), ``likely_infected`` (``screening``'s rule: core.schema.screening),
    ``unknown_share`` (of the whole red cells, those unlike the cells the model knows) and
    ``review``: a field or folder where that share is above UNKNOWN_SHARE gets no parasitemia,
    interval or flag, only REVIEW_UNKNOWN; for a model not ``adapted`` to a lab's fields no
    field with a whole red cell gets them (REVIEW_NOT_ADAPTED). A folder pools the fields that
    are not under review.

    ``cells`` holds SMEAR_COLUMNS rows; with ``threshold`` the predictions are re-made from the
    probabilities (as the dashboard's slider does)."""
    if cells.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    is_cell, ok = is_red_cell(cells), counted_cells(cells)
    whole, unknown = _unknown(cells)
    pred = cells["prediction"]
    if threshold is not None:
        pred = calls(cells["prob_parasitized"], threshold=threshold)
    rows = pd.DataFrame(
        {
            "field": cells["image"],
            "folder": [group_of(p, "folder", "") for p in cells["image"]],
            "cells": is_cell.astype(int) + cells["error"].notna().astype(int),
            "errors": cells["error"].notna().astype(int),
            "not_counted": (is_cell & ~ok).astype(int),
            "uncertain": 0,  # no review band for smear cells
            "other": (~is_cell & cells["error"].isna()).astype(int),
            "parasitized": (ok & (pred == PARASITIZED)).astype(int),
            "confident": (ok & (cells["prob_parasitized"] >= screening.confident_at)).astype(int),
            "prob_sum": cells["prob_parasitized"].where(ok, 0.0).astype(float),
            "whole": whole.astype(int),
            "unknown": unknown.astype(int),
        }
    )
    sums = [
        "cells",
        "errors",
        "not_counted",
        "uncertain",
        "parasitized",
        "confident",
        "prob_sum",
        "other",
    ]
    reported = ~under_review(cells, adapted=adapted)
    parts = []
    for level in ("field", "folder"):
        # a folder pools the fields it reports; not adapted, it reports none but counts all
        picked = rows if level == "field" or not adapted else rows[reported]
        counts = picked.groupby(level, sort=True)[sums].sum()
        # a folder whose every field is under review still gets a row
        groups = rows.groupby(level, sort=True)[["whole", "unknown", "errors", "other"]].sum()
        counts = counts.reindex(groups.index, fill_value=0)
        s = summary_from_counts(counts, screening=screening)
        g = groups.reindex(s["group"])
        share = (g["unknown"] / g["whole"].where(g["whole"] > 0)).fillna(0.0).to_numpy()
        if level == "field":  # under_review's verdict, one per field
            review = (~reported).groupby(cells["image"]).any().reindex(s["group"]).to_numpy()
        elif not adapted:
            review = (g["whole"] > 0).to_numpy()
        else:  # under review when each of its fields with red cells is
            known = picked.groupby("folder")["whole"].sum().reindex(s["group"], fill_value=0)
            review = (known == 0).to_numpy() & (g["whole"] > 0).to_numpy()
        s = s.assign(
            level=level,
            cells=s["scored"],
            other_objects=g["other"].to_numpy(),
            errors=(g["errors"] > 0).astype(int).to_numpy()
            if level == "field"
            else g["errors"].to_numpy(),
            unknown_share=share,
            review=np.where(
                review, np.where(share > UNKNOWN_SHARE, REVIEW_UNKNOWN, REVIEW_NOT_ADAPTED), ""
            ),
        )
        hidden = (
            "parasitized",
            "parasitemia",
            "ci_low",
            "ci_high",
            "mean_prob",
            "confident",
            "flag_p",
        )
        for column in hidden:
            s[column] = s[column].where(~review)
        s["likely_infected"] = s["likely_infected"] & ~review
        parts.append(s)
    out = pd.concat(parts, ignore_index=True)
    return out[list(SUMMARY_COLUMNS)]


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------


def prob_colour(p: float | None) -> tuple[int, int, int]:
    """RGB of an outline: blue (P=0) through white-ish to red (P=1); grey for non-cells."""
    if p is None or p != p:
        return (120, 120, 120)
    p = float(np.clip(p, 0, 1))
    return (int(40 + 215 * p), int(90 + 60 * (1 - abs(2 * p - 1))), int(255 - 215 * p))


def draw_overlay(
    image: np.ndarray,
    segmentation: Segmentation,
    prob: Sequence[float] | np.ndarray,
    *,
    highlight: int | None = None,
) -> np.ndarray:
    """The field with every object outlined: counted red cells coloured by P(Parasitized),
    thick; the rest (other objects, red cells not counted) grey and thin; ``highlight`` (index
    into ``segmentation.objects``) in a thick box. RGB uint8 (H, W, 3)."""
    out = image.copy()
    thick = max(2, round(min(image.shape[:2]) / 400))
    probs = iter(prob)
    for i, o in enumerate(segmentation.objects):
        p = next(probs) if o.is_cell else None
        counted = o.is_cell and o.quality == OK
        contours, _ = cv2.findContours(
            o.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        colour = prob_colour(p if counted else None)
        cv2.drawContours(out, contours, -1, colour, thick if counted else 1, offset=(o.x, o.y))
        if i == highlight:
            cv2.rectangle(
                out, (o.x - 3, o.y - 3), (o.x + o.w + 3, o.y + o.h + 3), (255, 220, 0), thick + 1
            )
    return out


def score_uploads(
    items: Iterable[tuple[str, bytes]],
    engine,
    *,
    store: ResultStore | None = None,
    stain_norm: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, FieldResult], str | None]:
    """Segment and score uploaded fields (name, bytes; zips are opened). Returns the cell rows
    (SMEAR_COLUMNS), the FieldResult of each field that could be read, and the run id in
    ``store``. Raises ValueError if the upload holds no image."""
    sources, run_id = upload_run(items, engine, store, kind="smear-upload")
    rows, results = [], {}
    for i, (src, result, field_rows) in enumerate(
        iter_fields(sources, engine, stain_norm=stain_norm)
    ):
        if store is not None and run_id is not None:
            store.add_smear_rows(run_id, field_rows)
        if result is not None:
            results[src.path] = result
        rows.extend(field_rows)
        if progress:
            progress(i + 1, len(sources))
    if store is not None and run_id is not None:
        store.finish(run_id)
    return pd.DataFrame(rows, columns=list(SMEAR_COLUMNS)), results, run_id
