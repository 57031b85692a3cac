"""The quality gate: is an image one red cell like those the model learnt from?

A classifier calls *anything* Parasitized or Uninfected: a photo, noise, a blank frame. Each
scored image therefore gets ``quality``: ``ok``, or a short reason it is not counted. Two kinds
of check, so that the classifier is never trusted alone:

- **image statistics** (no model): the NIH crops are one roughly round cell, bright and
  pink-to-lilac, on a black background that fills the corners. ``blank`` (almost flat),
  ``not a cell (...)`` (no dark corners, a bright area of the wrong size or not one round blob,
  colours no stained cell has, a cell too dark or too pale) and ``out of focus`` (the cell's
  edge against the black background is soft) are read from a 64 px copy of the image, about a
  quarter of a millisecond per image;
- **the model's own features** (``unlike the training cells``): the Mahalanobis distance of the
  pooled penultimate features (the ONNX graph returns them from the same forward pass as the
  probability) to the nearest class mean of the training patients' cells, with their tied,
  shrunk covariance (Lee et al., NeurIPS 2018). Its limit is a high quantile of the distances of
  the validation patients' cells, so a new patient's normal cells pass. The fit and the limit
  are stored in ``quality.npz`` in the model folder (plain arrays, never a pickle), tied to the
  weights' sha256; ``malaria calibrate gate`` rebuilds it (core.evaluation.gate_check).
  Models without one are gated on image statistics only (``Gate.note`` says so).

The image limits below are facts of the NIH crops, set with a margin outside the range of the
shipped model's 12,191 training and validation cells (``malaria calibrate gate`` prints those
ranges); the test patients were not looked at. The quality reasons and the review band are in
core.schema.results.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.schema.contract import FILES_KEY, GATE_FILES, ModelFolder, WeightsError
from core.schema.files import atomic_path
from core.schema.results import BLANK, NO_COLOUR, NOT_A_CELL, OK, OUT_OF_FOCUS, UNLIKE_TRAINING

# The int8 engine's features are not the fp32 graph's (quantisation moves them by more than the
# spread of the training cells in some directions): it gets a calibration of its own.
CALIBRATION_FILE, INT8_CALIBRATION_FILE = GATE_FILES


def calibration_file(engine: str) -> str:
    """The file of the feature calibration for the engine named ``engine``."""
    return INT8_CALIBRATION_FILE if engine == "onnx-int8" else CALIBRATION_FILE


STATS_SIDE = 64  # image statistics are read from a copy this size: 16x fewer pixels than 128


@dataclass(frozen=True)
class ImageLimits:
    """Limits on image statistics (``image_stats``); the NIH training and validation cells'
    range is in each comment (0-255 brightness; shares of the 64 px image)."""

    background_max: int = 30  # brightest channel at most this: background (as core.explain.locate)
    min_spread: float = 12.0  # brightness std across the image; cells 56-112: below is blank
    # mean (brightest - darkest channel) over the cell; 2.8 and above in 3,502 NIH cells (every
    # 4th of the development set), 0 for a grey image (R = G = B, a single-channel file)
    min_chroma: float = 1.5
    min_dark_corners: float = 0.5  # share of the four corner patches that is background; 0.61-1
    min_area: float = 0.3  # share of the image that is bright; 0.37-0.85
    max_area: float = 0.92
    min_fill: float = 0.6  # bright area / area of the ellipse of its moments; 0.67-1 (one blob)
    min_brightness: float = 100.0  # mean brightest channel over the cell; 138-224
    max_brightness: float = 245.0
    min_colour: float = -35.0  # red - green and blue - green over the cell; both -20 or above
    min_sharpness: float = 0.9  # steepest 1% of brightness steps / cell brightness; 1.1-2.1


def channel_span(images: np.ndarray) -> np.ndarray:
    """Brightest minus darkest channel of each pixel of RGB uint8 images (..., 3): uint8."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    # elementwise over the three planes: max(-1) reduces along a 3-wide axis, 25x slower here
    # (30 ms against 1.2 ms a batch of 64), most of the quality gate's cost
    return np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)


def no_colour(image: np.ndarray, limits: ImageLimits = ImageLimits()) -> bool:
    """Whether an RGB uint8 image (H, W, 3) has no colour to speak of (R = G = B, a
    single-channel file): its mean channel span below ``limits.min_chroma``. Read from a copy
    of about STATS_SIDE px a side, as the image checks are."""
    step = max(1, min(image.shape[:2]) // STATS_SIDE)
    return float(channel_span(image[::step, ::step]).mean()) < limits.min_chroma


def image_stats(
    images: np.ndarray, *, background_max: int = ImageLimits.background_max
) -> dict[str, np.ndarray]:
    """Statistics of a batch of RGB uint8 images (N, H, W, 3), each a float32 array (N,):
    ``spread``, ``chroma``, ``dark_corners``, ``area``, ``fill``, ``brightness``,
    ``red_green``, ``blue_green``, ``sharpness`` (see ImageLimits). Vectorised over the batch."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (N, H, W, 3), got shape {images.shape}")
    n = len(images)
    step = max(1, images.shape[1] // STATS_SIDE)
    x = images[:, ::step, ::step]
    h, w = x.shape[1:3]
    v = np.maximum(np.maximum(x[..., 0], x[..., 1]), x[..., 2])
    bright = v > background_max
    k = max(2, h // 10)
    corners = sum(
        np.count_nonzero(c, (1, 2))
        for c in (bright[:, :k, :k], bright[:, :k, -k:], bright[:, -k:, :k], bright[:, -k:, -k:])
    )
    b = bright.astype(np.float32)
    rows, cols = b.sum(2), b.sum(1)  # the mask's marginals give its moments cheaply
    m = np.maximum(rows.sum(1), 1)
    ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    cy, cx = rows @ ys / m, cols @ xs / m
    syy = rows @ (ys**2) / m - cy**2
    sxx = cols @ (xs**2) / m - cx**2
    sxy = (b @ xs) @ ys / m - cx * cy
    # a filled ellipse's area is 4 pi sqrt(det) of its second moments: ~1 for one round blob
    fill = m / (4 * np.pi * np.sqrt(np.maximum(syy * sxx - sxy**2, 1e-6)))
    flat = b.reshape(n, 1, -1)
    rgb = (flat @ x.reshape(n, -1, 3).astype(np.float32))[:, 0] / m[:, None]
    vf = v.astype(np.float32)
    brightness = (flat[:, 0] * vf.reshape(n, -1)).sum(1) / m
    chroma = (flat[:, 0] * channel_span(x).reshape(n, -1)).sum(1) / m
    steps = (
        np.abs(vf[:, 1:, :-1] - vf[:, :-1, :-1]) + np.abs(vf[:, :-1, 1:] - vf[:, :-1, :-1])
    ).reshape(n, -1)
    top = max(1, steps.shape[1] // 100)
    sharpness = np.partition(steps, -top, axis=1)[:, -top:].mean(1) / np.maximum(brightness, 1)
    return {
        "spread": vf.reshape(n, -1).std(1),
        "chroma": chroma,
        "dark_corners": 1 - corners / (4 * k * k),
        "area": m / (h * w),
        "fill": fill,
        "brightness": brightness,
        "red_green": rgb[:, 0] - rgb[:, 1],
        "blue_green": rgb[:, 2] - rgb[:, 1],
        "sharpness": sharpness,
    }


def image_reasons(stats: dict[str, np.ndarray], limits: ImageLimits = ImageLimits()) -> list[str]:
    """The first failed check of each image, or OK, from ``image_stats``."""
    lim = limits
    rules = (  # in order: the first that fails is the reason given
        (BLANK, stats["spread"] < lim.min_spread),
        (NO_COLOUR, stats["chroma"] < lim.min_chroma),
        (f"{NOT_A_CELL} (no dark background)", stats["dark_corners"] < lim.min_dark_corners),
        (f"{NOT_A_CELL} (size)", (stats["area"] < lim.min_area) | (stats["area"] > lim.max_area)),
        (f"{NOT_A_CELL} (not one round cell)", stats["fill"] < lim.min_fill),
        (
            f"{NOT_A_CELL} (colours)",
            (stats["red_green"] < lim.min_colour) | (stats["blue_green"] < lim.min_colour),
        ),
        (
            f"{NOT_A_CELL} (too dark or too pale)",
            (stats["brightness"] < lim.min_brightness) | (stats["brightness"] > lim.max_brightness),
        ),
        (OUT_OF_FOCUS, stats["sharpness"] < lim.min_sharpness),
    )
    out = [OK] * len(stats["spread"])
    for reason, failed in reversed(rules):  # earlier rules overwrite later ones
        for i in np.flatnonzero(failed):
            out[i] = reason
    return out


@dataclass(frozen=True)
class FeatureModel:
    """Class means and the tied covariance of a model's pooled features, kept as its leading
    principal components and one variance for all the rest (probabilistic PCA): a file of
    about 0.6 MB instead of the 6 MB of a full 1280x1280 matrix, and on the shipped model's
    validation and non-cell images as discriminating (README, "The quality gate")."""

    means: np.ndarray  # float32 (classes, C)
    components: np.ndarray  # float32 (C, K), orthonormal columns: the leading eigenvectors
    variances: np.ndarray  # float32 (K,): their eigenvalues
    residual: float  # mean eigenvalue of the other C - K directions
    limit: float  # distances above it are flagged
    quantile: float  # of the validation cells' distances, that gave ``limit``
    weights_sha256: str
    held_out: str = "validation patients' cells"  # whose distances set ``limit``

    def check(self) -> None:
        """Raises ValueError for values with which the gate would check nothing: an inf or NaN
        limit (or variance) passes every cell."""
        for name in ("limit", "residual"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"its {name} must be finite and above 0, got {value}")
        if not (np.isfinite(self.variances).all() and (self.variances > 0).all()):
            raise ValueError("its variances must be finite and above 0")
        if not (np.isfinite(self.means).all() and np.isfinite(self.components).all()):
            raise ValueError("its means and components must be finite")

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (N,) float32 of features (N, C) to the nearest class mean."""
        f = np.asarray(features, np.float32)
        d2 = []
        for mu in self.means:
            c = f - mu
            p = c @ self.components
            rest = np.maximum(np.square(c).sum(1) - np.square(p).sum(1), 0)
            d2.append((np.square(p) / self.variances).sum(1) + rest / self.residual)
        return np.sqrt(np.min(d2, axis=0))

    def save(self, path: Path) -> None:
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                means=self.means,
                components=self.components,
                variances=self.variances,
                residual=np.float64(self.residual),
                limit=np.float64(self.limit),
                quantile=np.float64(self.quantile),
                weights_sha256=np.str_(self.weights_sha256),
                held_out=np.str_(self.held_out),
            )

    @classmethod
    def load(cls, path: Path, *, sha256: str | None = None) -> FeatureModel:
        """The calibration in ``path``; ``sha256``: what its bytes must hash to (the card's).
        Raises WeightsError for another file, or one that is not a calibration (pickles are
        refused) or whose limits are not finite and positive."""
        try:
            data = Path(path).read_bytes()
            if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
                raise WeightsError(
                    f"{path} does not match the sha256 its model card records: the file was "
                    "changed or replaced; refusing it (rebuild it with malaria calibrate gate)"
                )
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                fm = cls(
                    z["means"].astype(np.float32),
                    z["components"].astype(np.float32),
                    z["variances"].astype(np.float32),
                    float(z["residual"]),
                    float(z["limit"]),
                    float(z["quantile"]),
                    str(z["weights_sha256"]),
                    *([str(z["held_out"])] if "held_out" in z.files else []),
                )
            fm.check()
            return fm
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(
                f"{path} is not a quality calibration ({exc}); rebuild it with "
                "malaria calibrate gate"
            ) from None


@dataclass(frozen=True)
class Gate:
    """Both checks for one model's images; ``features`` None gates on image statistics only."""

    features: FeatureModel | None = None
    limits: ImageLimits = ImageLimits()
    note: str = ""  # why there is no model-side check, when there is none

    @classmethod
    def for_model(cls, model: ModelFolder, engine: str = "onnx") -> Gate:
        """The gate of ``model`` scored by ``engine``: with its calibration when that engine's
        file (``quality.npz``, or ``quality_int8.npz`` for onnx-int8) is there and was made for
        these weights. Raises WeightsError if the file differs from the sha256 the card seals
        (or the card records one that is missing, or does not record one that is there)."""
        name = calibration_file(engine)
        path = model.path / name
        recorded = model.card.get(FILES_KEY, {}).get(name)
        if not path.is_file():
            if recorded is not None:
                raise WeightsError(
                    f"{path} is missing, but the model card records it: without it the gate "
                    "would check image statistics only; restore it"
                )
            return cls(
                note=f"no {name} in this model folder: image checks only "
                "(malaria calibrate gate --weights FOLDER)"
            )
        if recorded is None:
            raise WeightsError(
                f"{path} is not recorded in the model card: check it, then "
                f"`malaria seal --force {model.path}`"
            )
        fm = FeatureModel.load(path, sha256=recorded)
        if fm.weights_sha256 != model.sha256:
            return cls(
                note=f"{path} was made for other weights: image checks only; rebuild "
                "it with malaria calibrate gate"
            )
        return cls(fm)

    def __call__(self, images: np.ndarray, features: np.ndarray | None = None) -> list[str]:
        """``quality`` of each RGB uint8 image (N, H, W, 3) whose pooled features are
        ``features`` (N, C): OK or the reason it is not counted."""
        out = image_reasons(
            image_stats(images, background_max=self.limits.background_max), self.limits
        )
        if features is not None and len(features):
            far = self.unlike(features)
            out = [UNLIKE_TRAINING if r == OK and f else r for r, f in zip(out, far)]
        return out

    def unlike(self, features: np.ndarray) -> np.ndarray:
        """bool (N,): pooled features (N, C) farther from the training cells than the limit;
        all False without a feature calibration."""
        if self.features is None:
            return np.zeros(len(features), bool)
        return self.features.distance(features) > self.features.limit

    def describe(self) -> str:
        if self.features is None:
            return self.note
        return (
            f"image checks and feature distance (limit {self.features.limit:.1f}, the "
            f"{self.features.quantile:.1%} quantile of {self.features.held_out})"
        )
