"""The quality gate: is an image one red cell like those the model learnt from?

    python -m core.quality calibrate [--weights weights/default] [--data CELLS.zip]
    python -m core.quality check [--weights weights/default] [--data CELLS.zip] [--smear DIR]

(defaults: ``../shared/data/nih_cells_dev.zip`` and ``../shared/data/smear_dev/images``)

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
  weights' sha256; ``calibrate`` rebuilds it. Models without one are gated on image statistics
  only (``Gate.note`` says so).

The image limits below are facts of the NIH crops, set with a margin outside the range of the
shipped model's 12,191 training and validation cells (``calibrate`` prints those ranges); the
test patients were not looked at. ``check`` measures the share of the test patients' cells
flagged and of generated non-cell images (``core.noncells``) flagged.

The review band is separate: a cell that passes the gate but whose P(Parasitized) lies within
``band`` of the threshold is ``uncertain``: still counted by its call, and listed for a human.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from core.contract import DEFAULT_WEIGHTS, WEIGHTS_FILE, WeightsError
from core.files import cpu_count

OK = "ok"
BLANK = "blank"
OUT_OF_FOCUS = "out of focus"
NOT_A_CELL = "not a cell"
UNLIKE_TRAINING = "unlike the training cells"
UNCERTAIN = "uncertain"  # the review band's mark; never a quality value
CALIBRATION_FILE = "quality.npz"
# The int8 engine's features are not the fp32 graph's (quantisation moves them by more than the
# spread of the training cells in some directions): it gets a calibration of its own.
INT8_CALIBRATION_FILE = "quality_int8.npz"


def calibration_file(engine: str) -> str:
    """The file of the feature calibration for the engine named ``engine``."""
    return INT8_CALIBRATION_FILE if engine == "onnx-int8" else CALIBRATION_FILE


CHECK_FILE = "quality_check.json"
# Half-width of the review band around the threshold. Chosen on the shipped model's validation
# patients: 2.3% of their cells fall inside, where its accuracy is 0.47 against 0.97 outside.
REVIEW_BAND = 0.15
# Non-cell kinds (core.noncells) measured and reported apart: cell-shaped fakes and two cells
# in one crop, which neither check is built to catch.
BEYOND_GOAL = ("look-alike",)
STATS_SIDE = 64  # image statistics are read from a copy this size: 16x fewer pixels than 128


@dataclass(frozen=True)
class ImageLimits:
    """Limits on image statistics (``image_stats``); the NIH training and validation cells'
    range is in each comment (0-255 brightness; shares of the 64 px image)."""

    background_max: int = 30  # brightest channel at most this: background (as core.locate)
    min_spread: float = 12.0  # brightness std across the image; cells 56-112: below is blank
    min_dark_corners: float = 0.5  # share of the four corner patches that is background; 0.61-1
    min_area: float = 0.3  # share of the image that is bright; 0.37-0.85
    max_area: float = 0.92
    min_fill: float = 0.6  # bright area / area of the ellipse of its moments; 0.67-1 (one blob)
    min_brightness: float = 100.0  # mean brightest channel over the cell; 138-224
    max_brightness: float = 245.0
    min_colour: float = -35.0  # red - green and blue - green over the cell; both -20 or above
    min_sharpness: float = 0.9  # steepest 1% of brightness steps / cell brightness; 1.1-2.1


def image_stats(
    images: np.ndarray, *, background_max: int = ImageLimits.background_max
) -> dict[str, np.ndarray]:
    """Statistics of a batch of RGB uint8 images (N, H, W, 3), each a float32 array (N,):
    ``spread``, ``dark_corners``, ``area``, ``fill``, ``brightness``, ``red_green``,
    ``blue_green``, ``sharpness`` (see ImageLimits). Vectorised over the batch."""
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
    steps = (
        np.abs(vf[:, 1:, :-1] - vf[:, :-1, :-1]) + np.abs(vf[:, :-1, 1:] - vf[:, :-1, :-1])
    ).reshape(n, -1)
    top = max(1, steps.shape[1] // 100)
    sharpness = np.partition(steps, -top, axis=1)[:, -top:].mean(1) / np.maximum(brightness, 1)
    return {
        "spread": vf.reshape(n, -1).std(1),
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


# ---------------------------------------------------------------------------------------------
# The model-side score: Mahalanobis distance of the pooled features
# ---------------------------------------------------------------------------------------------


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
        from core.files import atomic_path

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
    def load(cls, path: Path) -> FeatureModel:
        """Raises WeightsError for a file that is not a calibration (pickles are refused)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    z["means"].astype(np.float32),
                    z["components"].astype(np.float32),
                    z["variances"].astype(np.float32),
                    float(z["residual"]),
                    float(z["limit"]),
                    float(z["quantile"]),
                    str(z["weights_sha256"]),
                    *([str(z["held_out"])] if "held_out" in z.files else []),
                )
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(
                f"{path} is not a quality calibration ({exc}); rebuild it with "
                "python -m core.quality calibrate"
            ) from None


COMPONENTS = 128  # leading directions kept; 32-1280 all flag 0.2-0.4% of the test cells


def fit_features(
    features: np.ndarray,
    labels: np.ndarray,
    held_out: np.ndarray,
    *,
    quantile: float,
    weights_sha256: str,
    components: int = COMPONENTS,
) -> FeatureModel:
    """Fit class means and the tied covariance (Ledoit-Wolf shrinkage) on ``features`` (N, C)
    with class ``labels`` (N,); the limit is the ``quantile`` of ``held_out`` features'
    distances (other patients than those fitted)."""
    from sklearn.covariance import LedoitWolf

    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    vals, vecs = np.linalg.eigh(LedoitWolf(assume_centered=True).fit(centred).covariance_)
    vals, vecs = vals[::-1], vecs[:, ::-1]  # largest first
    k = min(components, len(vals) - 1)
    model = FeatureModel(
        means.astype(np.float32),
        np.ascontiguousarray(vecs[:, :k], np.float32),
        vals[:k].astype(np.float32),
        float(vals[k:].mean()),
        np.inf,
        quantile,
        weights_sha256,
    )
    limit = float(np.quantile(model.distance(held_out), quantile))
    return replace(model, limit=limit)


# ---------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """Both checks for one model's images; ``features`` None gates on image statistics only."""

    features: FeatureModel | None = None
    limits: ImageLimits = ImageLimits()
    note: str = ""  # why there is no model-side check, when there is none

    @classmethod
    def for_model(cls, folder: Path | str, sha256: str, engine: str = "onnx") -> Gate:
        """The gate of the model in ``folder`` whose weights hash to ``sha256``, scored by
        ``engine``: with its calibration when that engine's file (``quality.npz``, or
        ``quality_int8.npz`` for onnx-int8) is there and was made for these weights."""
        name = calibration_file(engine)
        path = Path(folder) / name
        if not path.is_file():
            return cls(
                note=f"no {name} in this model folder: image checks only "
                "(python -m core.quality calibrate --weights FOLDER)"
            )
        fm = FeatureModel.load(path)
        if fm.weights_sha256 != sha256:
            return cls(
                note=f"{path} was made for other weights: image checks only; rebuild "
                "it with python -m core.quality calibrate"
            )
        return cls(fm)

    def __call__(self, images: np.ndarray, features: np.ndarray | None = None) -> list[str]:
        """``quality`` of each RGB uint8 image (N, H, W, 3) whose pooled features are
        ``features`` (N, C): OK or the reason it is not counted."""
        out = image_reasons(
            image_stats(images, background_max=self.limits.background_max), self.limits
        )
        if self.features is not None and features is not None and len(features):
            far = self.features.distance(features) > self.features.limit
            out = [UNLIKE_TRAINING if r == OK and f else r for r, f in zip(out, far)]
        return out

    def describe(self) -> str:
        if self.features is None:
            return self.note
        return (
            f"image checks and feature distance (limit {self.features.limit:.1f}, the "
            f"{self.features.quantile:.1%} quantile of {self.features.held_out})"
        )


def is_counted(quality: pd.Series) -> pd.Series:
    """Rows whose quality lets them count: OK, or unknown (results stored before the gate)."""
    return quality.isna() | (quality == OK)


def counted(results: pd.DataFrame) -> pd.Series:
    """Result rows that count in parasitemia: scored (no error) and passing the gate."""
    quality = results["quality"] if "quality" in results else pd.Series(None, results.index)
    return results["error"].isna() & results["prob_parasitized"].notna() & is_counted(quality)


def review(results: pd.DataFrame, *, threshold: float, band: float = REVIEW_BAND) -> pd.Series:
    """Why each result row needs a human: its quality reason (not counted), UNCERTAIN (counted,
    but P(Parasitized) within ``band`` of ``threshold``), or "" (nothing to review; error rows
    too: their ``error`` says why). Raises ValueError for a band outside [0, 0.5]."""
    if not 0 <= band <= 0.5:
        raise ValueError(f"the review band must be in [0, 0.5], got {band}")
    prob = results["prob_parasitized"].astype(float)
    ok = counted(results)
    out = pd.Series("", index=results.index, dtype=object)
    out[ok & ((prob - threshold).abs() < band)] = UNCERTAIN
    failed = results["error"].isna() & prob.notna() & ~ok
    if failed.any():  # only where there is a quality column
        out[failed] = results.loc[failed, "quality"]
    return out


# ---------------------------------------------------------------------------------------------
# Command line: calibrate, check
# ---------------------------------------------------------------------------------------------


def _split_cells(data: Sequence[str], split: dict, parts: Sequence[str]):
    from core.splits import labelled_samples

    samples, sources = labelled_samples(data)
    keep = {c for p in parts for c in split[p]}
    return [s for s in samples if s.case_id in keep], sources


def _features(engine, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    probs, feats = zip(*(engine.score(images[i : i + batch]) for i in range(0, len(images), batch)))
    return np.concatenate(probs), np.concatenate(feats)


FOLDS_CHECK_FILE = "quality_folds.json"


@dataclass(frozen=True)
class UnseenRatio:
    """How much farther unseen patients' cells lie than training cells, measured on the k-fold
    models: a model trained on every patient has no one left to set its limit on."""

    ratio: float  # median over folds of (held-out quantile / training quantile)
    folds: list[dict]  # per fold: its ratio, and its test cells flagged at the others' ratio

    def record(self) -> dict:
        flagged = sum(f["test_flagged"] for f in self.folds)
        cells = sum(f["test_cells"] for f in self.folds)
        return {
            "ratio": self.ratio,
            "method": "per fold model: the quantile of its validation and test patients' "
            "distances over that of its training cells'; the limit of a model trained on every "
            "patient = the median ratio x the quantile of its training cells' distances",
            "cross_fitted": "each fold's test cells flagged at its own training quantile x the "
            "median ratio of the other folds: every development cell once, by a gate built "
            "without its patient",
            "test_cells": cells,
            "test_flagged": flagged,
            "test_share": flagged / cells if cells else float("nan"),
            "folds": self.folds,
        }


def unseen_ratio(
    runs: Sequence[Path], samples: Sequence, images: np.ndarray, *, quantile: float
) -> UnseenRatio:
    """The ``UnseenRatio`` of the fold runs ``runs`` (fp32 features), over the development
    cells ``samples`` (decoded in ``images``)."""
    from core.score import load_engine

    cases = np.array([s.case_id for s in samples])
    labels = np.array([s.label for s in samples])
    per_fold = []
    for run in runs:
        engine = load_engine(run, "onnx", threads=cpu_count())
        split = engine.weights.split
        _, feats = _features(engine, images)
        train = np.isin(cases, split["train"])
        test = np.isin(cases, split["test"])
        fm = fit_features(
            feats[train], labels[train], feats[train], quantile=quantile, weights_sha256=""
        )
        d = fm.distance(feats)
        unseen = np.quantile(d[np.isin(cases, split["val"] + split["test"])], quantile)
        per_fold.append((run, fm.limit, float(unseen), d[test]))
    ratios = [u / t for _, t, u, _ in per_fold]
    folds = []
    for k, (run, trained, unseen, test_d) in enumerate(per_fold):
        others = float(np.median([r for j, r in enumerate(ratios) if j != k]))
        folds.append(
            {
                "run": run.name,
                "training_quantile": trained,
                "held_out_quantile": unseen,
                "ratio": ratios[k],
                "test_cells": int(len(test_d)),
                "test_flagged": int((test_d > others * trained).sum()),
            }
        )
    return UnseenRatio(float(np.median(ratios)), folds)


def calibrate(
    weights: Path,
    data: Sequence[str],
    *,
    quantile: float = 0.995,
    engine_name: str = "onnx",
    unseen: UnseenRatio | None = None,
) -> FeatureModel:
    """Fit the feature model on the training patients' cells of the model in ``weights`` as
    ``engine_name`` computes their features, set its limit on the validation patients' (for
    a model with none: its training cells' quantile x ``unseen.ratio``) and save it beside the
    weights (``calibration_file(engine_name)``)."""
    from core.images import load_array
    from core.score import load_engine

    name = calibration_file(engine_name)
    # the file is replaced: an unreadable or outdated one must not stop the engine loading
    (Path(weights) / name).unlink(missing_ok=True)
    engine = load_engine(weights, engine_name, threads=cpu_count())
    split = engine.weights.split
    samples, sources = _split_cells(data, split, ("train", "val"))
    images = load_array([sources[s.path] for s in samples], size=engine.contract.input_size)
    _, feats = _features(engine, images)
    train = np.array([s.case_id in set(split["train"]) for s in samples])
    labels = np.array([s.label for s in samples])
    if split["val"]:
        fm = fit_features(
            feats[train],
            labels[train],
            feats[~train],
            quantile=quantile,
            weights_sha256=engine.sha256,
        )
        basis = f"{(~train).sum():,} cells of {len(split['val'])} validation patients"
    else:
        if unseen is None:
            raise ValueError(
                "this model was trained on every patient: its limit needs the fold runs' "
                "ratio (python -m core.quality calibrate finds them in the model folder)"
            )
        fm = fit_features(feats, labels, feats, quantile=quantile, weights_sha256=engine.sha256)
        fm = replace(
            fm,
            limit=fm.limit * unseen.ratio,
            held_out=f"its training cells x {unseen.ratio:.3f} (how much farther the fold "
            "models' unseen patients lie)",
        )
        basis = f"its {len(feats):,} training cells x {unseen.ratio:.3f}"
    fm.save(Path(weights) / name)
    stats = image_stats(images)
    print(
        f"{name} ({engine_name}): fitted on {train.sum():,} cells of {len(split['train'])} "
        f"training patients; limit {fm.limit:.2f} = {quantile:.1%} quantile of {basis}",
        file=sys.stderr,
    )
    print("image statistics of these cells (min, 0.1%, 99.9%, max):", file=sys.stderr)
    for name, v in stats.items():
        lo, q1, q9, hi = np.quantile(v, [0, 0.001, 0.999, 1])
        print(f"  {name:12s} {lo:8.3f} {q1:8.3f} {q9:8.3f} {hi:8.3f}", file=sys.stderr)
    return fm


def fold_ratio(weights: Path, data: Sequence[str], *, quantile: float) -> UnseenRatio:
    """The ``UnseenRatio`` of a model trained on every patient, from its fold runs' weights,
    written to ``quality_folds.json`` beside it; where the weights are gone, as that file
    records it (calibrating again after the engines change needs no fold model)."""
    from core.contract import ModelFolder, fold_runs
    from core.files import write_json
    from core.images import load_array

    runs = [r for r in fold_runs(weights) if (r / WEIGHTS_FILE).is_file()]
    recorded = Path(weights) / FOLDS_CHECK_FILE
    if not runs and recorded.is_file():
        # the ratio depends on the fold models and the cells, not on the engine now calibrated
        rec = json.loads(recorded.read_text())
        if rec.get("quantile", quantile) != quantile:
            raise ValueError(
                f"{recorded} holds the fold runs' ratio at the {rec['quantile']} quantile, "
                f"not {quantile}, and their weights are gone to measure it again"
            )
        print(
            f"the fold runs' weights are gone: their ratio {rec['ratio']:.3f} as {recorded} "
            "records it",
            file=sys.stderr,
        )
        return UnseenRatio(rec["ratio"], rec["folds"])
    if not runs:
        raise FileNotFoundError(
            f"{weights} was trained on every patient and its fold runs' weights are not in "
            f"{Path(weights) / 'folds'}: run core.folds there first (they set its limit)"
        )
    model = ModelFolder.open(weights)
    samples, sources = _split_cells(data, model.split, ("train",))
    images = load_array([sources[s.path] for s in samples], size=model.contract.input_size)
    unseen = unseen_ratio(runs, samples, images, quantile=quantile)
    write_json(Path(weights) / FOLDS_CHECK_FILE, {**unseen.record(), "quantile": quantile})
    return unseen


def check(weights: Path, data: Sequence[str], *, smear: Path | None, seed: int = 0) -> dict:
    """Share of the test patients' cells flagged, and of each kind of generated non-cell image
    flagged, through the scoring pipeline itself (decoding, resizing, engine, gate)."""
    from core.images import load_array
    from core.noncells import as_png, non_cells
    from core.score import load_engine, score_uploads

    engine = load_engine(weights, threads=cpu_count())  # the engine users get
    split = engine.weights.split
    part = "test" if split["test"] else "train"  # trained on every patient: see quality_folds
    samples, sources = _split_cells(data, split, (part,))
    images = load_array([sources[s.path] for s in samples], size=engine.contract.input_size)
    probs, feats = _features(engine, images)
    quality = np.array(engine.gate(images, feats))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(samples), size=min(100, len(samples)), replace=False)
    sets = non_cells(
        smear_folder=smear,
        seed=seed,
        cells=[(Path(samples[i].path).stem, images[i]) for i in picked],
    )
    kinds = {}
    for kind, imgs in sets.items():  # look-alikes are measured but kept out of the headline
        if not imgs:
            continue
        df, _ = score_uploads(list(as_png(imgs)), engine=engine)
        flagged = ~is_counted(df["quality"])
        kinds[kind] = {
            "images": int(len(df)),
            "flagged": int(flagged.sum()),
            "share": float(flagged.mean()),
            "reasons": df["quality"].value_counts().to_dict(),
            "passed": sorted(df.loc[~flagged, "path"])[:20],
        }
    flagged_cells = quality != OK
    goal = [k for kind, k in kinds.items() if kind not in BEYOND_GOAL]
    total, caught = sum(k["images"] for k in goal), sum(k["flagged"] for k in goal)
    uncertain = np.abs(probs - engine.contract.threshold) < REVIEW_BAND
    unseen = {}
    if part == "train":
        unseen["unseen_cells"] = json.loads((Path(weights) / FOLDS_CHECK_FILE).read_text())
    return {
        "command": "python -m core.quality check",
        "gate": engine.gate.describe(),
        **unseen,
        f"{part}_cells": {
            "cells": int(len(samples)),
            "patients": len(split[part]),
            "flagged": int(flagged_cells.sum()),
            "share": float(flagged_cells.mean()),
            "reasons": pd.Series(quality[flagged_cells]).value_counts().to_dict(),
            "uncertain_share": float(uncertain[~flagged_cells].mean()),
            "review_band": REVIEW_BAND,
        },
        "non_cells": {
            "images": total,
            "flagged": caught,
            "share": caught / total if total else float("nan"),
            "kinds": kinds,
            "left_out_of_share": list(BEYOND_GOAL),
        },
        "limits": asdict(ImageLimits()),
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m core.quality", description="Build or measure the quality gate of a model."
    )
    p.add_argument("command", choices=("calibrate", "check"))
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="model folder")
    p.add_argument(
        "--data",
        nargs="+",
        default=["../shared/data/nih_cells_dev.zip"],
        help="the development cells (folders or zips, NIH layout)",
    )
    p.add_argument(
        "--smear",
        type=Path,
        default=Path("../shared/data/smear_dev/images"),
        help="folder of whole smear fields (JPEG) for the non-cell set",
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=0.995,
        help="calibrate: quantile of the validation cells' distances kept as the limit",
    )
    return p


def main(args: argparse.Namespace) -> int:
    try:
        if args.command == "calibrate":
            from core.contract import ModelFolder

            unseen = None
            if not ModelFolder.open(args.weights).split["val"]:
                unseen = fold_ratio(args.weights, args.data, quantile=args.quantile)
                r = unseen.record()
                print(
                    f"fold runs: unseen patients' cells lie {unseen.ratio:.3f}x as far; at that "
                    f"ratio {r['test_flagged']:,} of {r['test_cells']:,} cells "
                    f"({r['test_share']:.2%}) flagged by a gate built without their patient",
                    file=sys.stderr,
                )
            for engine_name in ("onnx", "onnx-int8"):
                calibrate(
                    args.weights,
                    args.data,
                    quantile=args.quantile,
                    engine_name=engine_name,
                    unseen=unseen,
                )
            return 0
        result = check(args.weights, args.data, smear=args.smear)
    except (WeightsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from core.files import write_json

    write_json(Path(args.weights) / CHECK_FILE, result)
    part = "test" if "test_cells" in result else "train"
    t, nc = result[f"{part}_cells"], result["non_cells"]
    print(f"gate: {result['gate']}")
    print(
        f"{part} patients' cells flagged: {t['flagged']:,} of {t['cells']:,} "
        f"({t['share']:.2%}) {t['reasons']}"
    )
    if "unseen_cells" in result:
        u = result["unseen_cells"]
        print(
            f"unseen patients' cells flagged (fold runs, cross-fitted): {u['test_flagged']:,} "
            f"of {u['test_cells']:,} ({u['test_share']:.2%})"
        )
    print(
        f"non-cell images flagged: {nc['flagged']:,} of {nc['images']:,} ({nc['share']:.1%}; "
        f"{', '.join(BEYOND_GOAL)} left out of this share)"
    )
    for kind, k in nc["kinds"].items():
        print(f"  {kind:13s} {k['flagged']:4d} / {k['images']:4d}  ({k['share']:.1%})")
    print(f"{part} cells in the review band (±{t['review_band']}): {t['uncertain_share']:.2%}")
    print(f"written to {Path(args.weights) / CHECK_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
