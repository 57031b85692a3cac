"""Building and measuring the quality gate (core.inference.gate) of a model, offline.

    malaria calibrate gate [--weights weights/default] [--data CELLS.zip]
    malaria check gate [--weights weights/default] [--data CELLS.zip] [--smear DIR]

``calibrate`` fits the feature model on the training patients' cells and sets its limit on the
validation patients' (for a model trained on every patient: its training cells' quantile times
the ratio its fold runs measured, ``quality_folds.json``); ``check`` measures the share of the
test patients' cells flagged and of generated non-cell images (core.data.noncells) flagged,
through the scoring pipeline itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.noncells import as_png, non_cells
from core.data.sources import load_array
from core.data.splits import labelled_samples
from core.inference.engines import load_engine
from core.inference.gate import FeatureModel, ImageLimits, calibration_file, image_stats
from core.inference.pipeline import score_uploads
from core.schema.contract import WEIGHTS_FILE, ModelFolder, fold_runs, reseal
from core.schema.files import cpu_count, write_json
from core.schema.results import OK, REVIEW_BAND, is_counted

CHECK_FILE = "quality_check.json"


# Non-cell kinds (core.data.noncells) measured and reported apart: cell-shaped fakes and two cells
# in one crop, which neither check is built to catch.
BEYOND_GOAL = ("look-alike",)


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


def _split_cells(data: Sequence[str], split: dict, parts: Sequence[str]):
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
                "ratio (malaria calibrate gate finds them in the model folder)"
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
    reseal(weights)
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
            f"{Path(weights) / 'folds'}: run malaria folds there first (they set its limit)"
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
        "command": "malaria check gate",
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
