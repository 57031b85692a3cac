"""A model-free parasite locator from the Giemsa stain, and scores of where a heatmap points.

Giemsa colours a parasite's chromatin far darker and more magenta than the red cell around it,
whatever the cell's own tint (pink, lilac or grey in the NIH crops). Inside the cell mask, a
pixel is stained when its green channel (what the purple dye absorbs) is ``dark`` below the
cell's median and its magenta excess ((R + B) / 2 - G) is ``magenta`` above the cell's median;
connected stained blobs of at least ``min_area`` pixels are the located parasites.

The thresholds were chosen on the shipped model's validation patients (never its test split):
there they find a parasite in 96 % of Parasitized cells and in 5 % of Uninfected ones (some of
which do hold a dot that looks like one: the labels are known to be noisy). A cell with no
located parasite is left out of the pointing score rather than counted as a miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

BACKGROUND_MAX = 30  # NIH crops have a black background; a cell pixel's brightest channel is above
EDGE_PX = 2  # the cell's rim darkens where it meets the black background: not stain
DARK = 40.0  # green below the cell's median by this much (0-255 scale)
MAGENTA = 20.0  # (R + B) / 2 - G above the cell's median by this much
MIN_AREA = 8  # pixels at 128x128; smaller blobs are noise or pigment specks
POINTING_TOLERANCE = 4  # px at 128x128: a peak this close to a parasite's edge points at it


@dataclass(frozen=True)
class Stain:
    """Masks of one cell image, all bool (H, W) at the image's size."""

    cell: np.ndarray  # the red cell (largest bright object), holes filled
    parasite: np.ndarray  # located parasites; all False when none was found

    @property
    def found(self) -> bool:
        return bool(self.parasite.any())


def cell_mask(image: np.ndarray) -> np.ndarray:
    """The largest bright object of an RGB uint8 image (H, W, 3) -> bool (H, W)."""
    bright = ndi.binary_fill_holes(image.max(axis=-1) > BACKGROUND_MAX)
    labels, n = ndi.label(bright)
    if n == 0:
        return bright
    sizes = ndi.sum_labels(bright, labels, np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def locate(image: np.ndarray, *, scale: float | None = None) -> Stain:
    """Cell and parasite masks of an RGB uint8 cell image (H, W, 3), any size.

    ``scale`` is the image's size relative to 128 px (default: its shorter side / 128), so
    the rim and blob sizes mean the same at any resolution.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    scale = scale or min(image.shape[:2]) / 128
    cell = cell_mask(image)
    inner = ndi.binary_erosion(cell, iterations=max(1, round(EDGE_PX * scale)))
    if not inner.any():
        return Stain(cell, np.zeros_like(cell))
    rgb = image.astype(np.float32)
    green = rgb[..., 1]
    magenta = (rgb[..., 0] + rgb[..., 2]) / 2 - green
    stained = (
        inner
        & (green < np.median(green[inner]) - DARK)
        & (magenta > np.median(magenta[inner]) + MAGENTA)
    )
    labels, n = ndi.label(stained)
    if n == 0:
        return Stain(cell, stained)
    sizes = ndi.sum_labels(stained, labels, np.arange(1, n + 1))
    keep = 1 + np.flatnonzero(sizes >= MIN_AREA * scale * scale)
    return Stain(cell, np.isin(labels, keep))


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, col) of a map's maximum (the first one, in row-major order, on a tie)."""
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(r), int(c)


def points_at(heatmap: np.ndarray, target: np.ndarray, *, tolerance: float | None = None) -> bool:
    """Whether the peak of ``heatmap`` (H, W) falls on ``target`` (bool (H, W)), within
    ``tolerance`` px (default: POINTING_TOLERANCE at 128 px, scaled with the image)."""
    if heatmap.shape != target.shape:
        raise ValueError(f"heatmap {heatmap.shape} and target {target.shape} differ in shape")
    if not target.any():
        raise ValueError("nothing to point at: the target mask is empty")
    if tolerance is None:
        tolerance = POINTING_TOLERANCE * min(target.shape) / 128
    r, c = peak(heatmap)
    return bool(ndi.distance_transform_edt(~target)[r, c] <= tolerance)


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of a map's total mass (non-negative (H, W)) that lies on ``mask``; NaN if flat 0."""
    total = float(heatmap.sum())
    return float(heatmap[mask].sum()) / total if total > 0 else float("nan")
