"""The seed study: which layer of a pretrained network makes the best features, and how models
compare, always with patients kept apart.

    malaria study layers --data ../shared/data/nih_cells_dev.zip --out weights/study
    malaria study models --data ../shared/data/nih_cells_dev.zip --out weights/study

``layers``: globally pooled features of every stage of the ImageNet MobileNetV2 (cached on disk
in chunks, so an interrupted run resumes without recomputing), a standardised logistic
regression per layer, patient-grouped 5-fold cross-validation (StratifiedGroupKFold by case),
and the same for the best layer with a random cell-level split, to show the leakage.

``models``: one fixed patient split (the reference model's, from its card: by default
``weights/holdout``, the shipped model having no test patients), comparing the best
linear probe, the fine-tuned MobileNetV2, MobileNetV3-small and a small CNN trained from
scratch: parameters, MB on disk, CPU images/s and test metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from core.data.sources import load_array
from core.data.splits import DataError, Sample, Split, labelled_samples
from core.nets.model import build_model, default_contract, features, load_model, normalize
from core.schema.contract import (
    CARD_FILE,
    HOLDOUT_WEIGHTS,
    WEIGHTS_FILE,
    ModelContract,
    predictions_path,
)
from core.schema.files import cpu_count, repo_relative, write_json
from core.schema.labels import PARASITIZED_INDEX, is_parasitized
from core.schema.metrics import binary_metrics
from core.training.recipe import TrainConfig, prepare_data
from core.training.train import CHECKPOINT

# The end of every inverted-residual block group of MobileNetV2, and the final 1x1 conv.
MOBILENET_V2_STAGES = {
    "block1_16ch": "features.1",
    "block2_24ch": "features.3",
    "block3_32ch": "features.6",
    "block4_64ch": "features.10",
    "block5_96ch": "features.13",
    "block6_160ch": "features.16",
    "block7_320ch": "features.17",
    "last_conv_1280ch": "features.18",
}
METRICS = ("accuracy", "auc", "sensitivity", "specificity", "f1", "mcc")
CHUNK = 1024  # images per cached feature file
# From random weights a 100-step range test shows no descent before divergence (the loss sits
# at ln 2 until about 5e-3), so its "steepest descent" is noise; a fixed one-cycle peak it is.
SCRATCH_LR = 3e-3


def _fingerprint(samples: Sequence[Sample], stages: dict[str, str]) -> str:
    """Cache key: which images, in which order, and which stages are extracted."""
    text = "\n".join([*(s.path for s in samples), *(f"{k}={v}" for k, v in stages.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def extract_features(
    samples: Sequence[Sample],
    sources: dict,
    cache: Path,
    *,
    stages: dict[str, str] = MOBILENET_V2_STAGES,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Globally average-pooled features of each stage: name -> float32 (N, channels).

    Features are computed once per chunk of images and cached under ``cache``; a rerun (or a
    resumed run) loads the chunks already there.
    """
    contract = ModelContract()
    model = build_model("mobilenet_v2", pretrained=True).eval()
    model = model.to(memory_format=torch.channels_last)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(path).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out.mean(dim=(2, 3)))
        )
        for name, path in stages.items()
    ]
    folder = cache / f"features_{_fingerprint(samples, stages)}"
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    try:
        bar = tqdm(total=len(samples), desc="features", unit="img", disable=not progress)
        for start in range(0, len(samples), CHUNK):
            path = folder / f"part_{start // CHUNK:04d}.npz"
            chunk = samples[start : start + CHUNK]
            if not path.is_file():
                images = torch.from_numpy(
                    load_array([sources[s.path] for s in chunk], size=contract.input_size)
                )
                feats: dict[str, list[np.ndarray]] = {n: [] for n in stages}
                for i in range(0, len(images), batch_size):
                    model(normalize(images[i : i + batch_size], contract))
                    for name in stages:
                        feats[name].append(outputs[name].numpy())
                tmp = path.with_suffix(".tmp.npz")
                arrays: dict[str, Any] = {n: np.concatenate(v) for n, v in feats.items()}
                np.savez(tmp, **arrays)
                tmp.replace(path)
            parts.append(path)
            bar.update(len(chunk))
        bar.close()
    finally:
        for h in hooks:
            h.remove()
    merged: dict[str, list[np.ndarray]] = {name: [] for name in stages}
    for p in parts:
        with np.load(p) as z:
            for name in stages:
                merged[name].append(z[name])
    return {name: np.concatenate(v).astype(np.float32) for name, v in merged.items()}


def _probe() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))


def cross_validate(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, *, folds: int = 5, seed: int = 0
) -> list[dict]:
    """Per-fold metrics of the linear probe; grouped by case when ``groups`` is given."""
    if groups is None:
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)
    else:
        splits = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups)
    out = []
    for train_idx, test_idx in splits:
        clf = _probe().fit(x[train_idx], y[train_idx])
        out.append(binary_metrics(y[test_idx], clf.predict_proba(x[test_idx])[:, 1]))
    return out


def _summarise(fold_metrics: list[dict]) -> dict:
    row = {}
    for m in METRICS:
        values = np.array([f[m] for f in fold_metrics], dtype=float)
        row[m], row[f"{m}_std"] = float(np.nanmean(values)), float(np.nanstd(values))
    return row


def _labels(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([int(s.label == PARASITIZED_INDEX) for s in samples])


def study_layers(
    data: Sequence[str | Path], out: Path, *, folds: int = 5, seed: int = 0, progress: bool = True
) -> pd.DataFrame:
    """Run the layer study; write ``layers.csv`` and ``layers.json`` into ``out``."""
    samples, sources = labelled_samples(data)
    feats = extract_features(samples, sources, out / "cache", progress=progress)
    y, groups = _labels(samples), np.array([s.case_id for s in samples])
    rows = []
    for name, x in tqdm(feats.items(), desc="layers", disable=not progress):
        t0 = time.perf_counter()
        per_fold = cross_validate(x, y, groups, folds=folds, seed=seed)
        rows.append(
            {
                "layer": name,
                "module": MOBILENET_V2_STAGES[name],
                "features": x.shape[1],
                **_summarise(per_fold),
                "seconds": time.perf_counter() - t0,
            }
        )
    table = pd.DataFrame(rows)
    best = table.loc[table["accuracy"].idxmax()]
    cell = _summarise(cross_validate(feats[best["layer"]], y, None, folds=folds, seed=seed))
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "layers.csv", index=False)
    write_json(
        out / "layers.json",
        {
            "best_layer": best["layer"],
            "best_accuracy": float(best["accuracy"]),
            "best_auc": float(best["auc"]),
            "last_layer_accuracy": float(table.iloc[-1]["accuracy"]),
            "cell_level_split": {
                "accuracy": cell["accuracy"],
                "auc": cell["auc"],
                "note": "random StratifiedKFold by cell: cells of one patient on both sides",
            },
            "protocol": f"ImageNet MobileNetV2 (frozen), global average pooling per stage, "
            f"StandardScaler + LogisticRegression(C=0.5), StratifiedGroupKFold("
            f"{folds}) by case, seed {seed}",
            "images": len(samples),
            "cases": int(len(set(groups))),
            "data": [str(d) for d in data],
        },
    )
    return table


def _img_per_s(model: torch.nn.Module, contract: ModelContract, n: int = 512) -> float:
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (64, contract.input_size, contract.input_size, 3), dtype=torch.uint8)
    with torch.no_grad():
        model(normalize(x, contract))
        t0 = time.perf_counter()
        for _ in range(n // 64):
            model(normalize(x, contract))
    return n / (time.perf_counter() - t0)


def _model_row(name: str, folder: Path) -> dict:
    loaded = load_model(folder)
    preds = pd.read_csv(predictions_path(folder, "test"))
    m = binary_metrics(
        is_parasitized(preds["label"]),
        preds["prob_parasitized"],
        threshold=loaded.contract.threshold,
    )
    return {
        "model": name,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "mb_on_disk": (folder / WEIGHTS_FILE).stat().st_size / 2**20,
        "img_per_s": _img_per_s(loaded.model, loaded.contract),
        **{k: m[k] for k in METRICS},
        "test_cells": m["n"],
        "folder": str(folder),
    }


def study_models(
    data: Sequence[str | Path],
    out: Path,
    *,
    reference: Path = HOLDOUT_WEIGHTS,
    epochs: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the model comparison on the reference model's split; write ``models.csv/json``."""
    card = json.loads((reference / CARD_FILE).read_text())
    split = Split.from_json(card["split"])
    if not split.test:
        raise DataError(
            f"{reference} has no test patients (trained on all of them): the models study "
            "compares on a reference model's test patients; pass --reference weights/holdout"
        )
    samples, sources = labelled_samples(data)
    feats = extract_features(samples, sources, out / "cache", progress=progress)
    layers = out / "layers.json"
    best = json.loads(layers.read_text())["best_layer"] if layers.is_file() else "block5_96ch"
    y = _labels(samples)
    unknown = {s.case_id for s in samples} - set(split.train + split.val + split.test)
    if unknown:
        raise DataError(
            f"cases not in the reference split: {sorted(unknown)[:5]}; "
            "the models study needs the data the reference model was split on"
        )
    part = np.array([split.part_of(s.case_id) for s in samples])
    fit = part != "test"  # the probe has no epochs to select: train + validation patients
    clf = _probe().fit(feats[best][fit], y[fit])
    prob = clf.predict_proba(feats[best][~fit])[:, 1]
    m = binary_metrics(y[~fit], prob)
    upto = int(MOBILENET_V2_STAGES[best].split(".")[1]) + 1
    stem = features(build_model("mobilenet_v2"))[:upto]  # the frozen layers up to the stage
    probe_params = sum(p.numel() for p in stem.parameters()) + clf[-1].coef_.size + 1
    rows = [
        {
            "model": f"linear probe on ImageNet MobileNetV2 {best}",
            "parameters": probe_params,
            "mb_on_disk": probe_params * 4 / 2**20,
            "img_per_s": _img_per_s(stem, ModelContract()),
            **{k: m[k] for k in METRICS},
            "test_cells": m["n"],
            "folder": "",
        }
    ]
    rows.append(
        _model_row(f"MobileNetV2 fine-tuned from ImageNet ({repo_relative(reference)})", reference)
    )
    for arch, name in (
        ("mobilenet_v3_small", "MobileNetV3-small from scratch"),
        ("small_cnn", "small CNN (4 conv blocks) from scratch"),
    ):
        run = out / "runs" / arch
        if not (run / CARD_FILE).is_file():
            cfg = TrainConfig(arch=arch, epochs=epochs, lr=SCRATCH_LR, pretrained=False)
            contract = default_contract(arch)
            prepared = prepare_data(
                data, contract=contract, cfg=cfg, split=split, progress=progress
            )
            fit(
                cfg,
                prepared,
                run,
                contract=contract,
                progress=progress,
                resume=(run / CHECKPOINT).is_file(),
                card={
                    "training_command": "malaria study models "
                    + shlex.join(["--data", *map(str, data), "--epochs", str(epochs)]),
                    "training_data": [str(d) for d in data],
                },
            )
        rows.append(_model_row(name, run))
    table = pd.DataFrame(rows)
    table.to_csv(out / "models.csv", index=False)
    write_json(
        out / "models.json",
        {
            "protocol": f"one fixed patient split ({repo_relative(reference)}'s): "
            f"{len(split.train)} train / {len(split.val)} validation / "
            f"{len(split.test)} test patients; the linear probe is fitted on train + "
            "validation patients; networks pick their epoch on validation; all are "
            "scored on the test patients. img/s: PyTorch eager, batch 64, "
            f"{cpu_count()} CPU threads.",
            "epochs_from_scratch": epochs,
            "lr_from_scratch": SCRATCH_LR,
            "test_cases": list(split.test),
        },
    )
    return table


def run(args: argparse.Namespace) -> pd.DataFrame:
    torch.set_num_threads(cpu_count())
    if args.study == "layers":
        table = study_layers(args.data, args.out, folds=args.folds, progress=not args.no_progress)
    else:
        table = study_models(
            args.data,
            args.out,
            reference=args.reference,
            epochs=args.epochs,
            progress=not args.no_progress,
        )
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(
            table.drop(columns=[c for c in table.columns if c in ("folder", "module")]).to_string(
                index=False, float_format=lambda v: f"{v:.4f}"
            )
        )
    return table
