"""Patient-grouped k-fold training: an out-of-fold prediction for every development cell, an
estimate of a recipe on patients its models never saw, and (``--final``) the model to ship.

    malaria folds --data ../shared/data/nih_cells_dev.zip --out runs/r5 --epochs 5 \
        --lr 1e-3 --freeze 4 --final

``OUT/folds/fold{k}/`` is one ``malaria train`` run per fold (its test part = that fold's
patients); ``OUT/oof_predictions.csv`` (path, case_id, label, prob_parasitized, fold) holds
each cell predicted by the fold model that never saw its patient; ``OUT/folds.json`` the
5-fold estimate: pooled cell metrics, their spread over folds, and the per-patient screening
flag, each fold's patients judged by the temperature and flag rule chosen on the other folds.
With ``--final`` the same recipe is then trained on every patient into ``OUT`` itself, its
card's metrics taken from that estimate (the only one left: no patient is held out), its
temperature and flag rule fitted on every out-of-fold prediction (core.training.calibrate).
Interrupted runs go on with ``--resume``: finished folds are kept, a started one resumes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.splits import Split, fold_splits, labelled_samples
from core.evaluation.explain_check import default_pointing
from core.schema.contract import (
    CARD_FILE,
    FOLDS_FILE,
    OOF_FILE,
    WEIGHTS_FILE,
    explain_check_paths,
    predictions_path,
)
from core.schema.files import write_json
from core.schema.labels import is_parasitized
from core.schema.metrics import binary_metrics, flag_performance
from core.schema.screening import out_of_fold_flags
from core.training.calibrate import calibrate
from core.training.recipe import (
    TrainConfig,
    command,
    config_from_args,
    data_from_args,
    recipe_contract,
)
from core.training.train import CHECKPOINT, fit

SPREAD = ("accuracy", "auc", "sensitivity", "specificity", "mcc")


def fold_dir(out: Path, k: int) -> Path:
    return out / "folds" / f"fold{k}"


def run_folds(
    args: argparse.Namespace,
    cfg: TrainConfig,
    splits: list[Split],
) -> None:
    """Train every fold not finished yet (a fold with a card is done; one with a checkpoint
    resumes)."""
    contract = recipe_contract(cfg)
    for k, split in enumerate(splits):
        run = fold_dir(args.out, k)
        if (run / CARD_FILE).is_file():
            continue
        print(
            f"fold {k + 1}/{len(splits)}: train {len(split.train)}, val {len(split.val)}, "
            f"test {len(split.test)} patients",
            flush=True,
        )
        data = data_from_args(args, cfg, split)
        fit(
            cfg,
            data,
            run,
            contract=contract,
            resume=(run / CHECKPOINT).is_file(),
            progress=not args.no_progress,
            card={
                "training_command": command(
                    "folds", args, "--out", str(args.out), "--folds", str(args.folds)
                ),
                "training_data": [str(d) for d in args.data],
                "fold": k,
            },
        )
    for k in range(len(splits)):  # also for folds trained before this check existed
        run = fold_dir(args.out, k)
        if (run / WEIGHTS_FILE).is_file() and not explain_check_paths(run)[1].is_file():
            default_pointing(run)


def collect(out: Path, folds: int) -> tuple[pd.DataFrame, list[dict]]:
    """The out-of-fold predictions (with their fold) and the fold models' cards, each with its
    heatmap check (``explain_check``) where the fold has one."""
    frames, cards = [], []
    for k in range(folds):
        run = fold_dir(out, k)
        frames.append(pd.read_csv(predictions_path(run, "test")).assign(fold=k))
        card = json.loads((run / CARD_FILE).read_text())
        check = explain_check_paths(run)[1]
        if check.is_file():
            card["explain_check"] = json.loads(check.read_text())
        cards.append(card)
    return pd.concat(frames, ignore_index=True), cards


def pointing(cards: list[dict]) -> dict | None:
    """How often the default heatmap peaks on the stained parasite in cells of patients the
    fold models never saw, pooled over the folds' checked cells; None unless every fold has its
    check."""
    if not all(c.get("explain_check") for c in cards):
        return None
    checks: list[dict] = [c["explain_check"] for c in cards]
    cells = [int(c["cells_checked"]) for c in checks]
    if not sum(cells):
        return None
    hits = [(c["default"]["pointing"] or 0.0) * n for c, n in zip(checks, cells)]
    first = next(c for c, n in zip(checks, cells) if n)
    return {
        "pointing": float(sum(hits) / sum(cells)),
        "cells": int(sum(cells)),
        "per_fold": [c["default"]["pointing"] for c in checks],
        **{k: first["default"][k] for k in ("method", "layer", "target")},
    }


def estimate(oof: pd.DataFrame, cards: list[dict], threshold: float) -> dict:
    """The k-fold estimate: pooled metrics, per-fold spread, and the per-patient flag."""
    pooled = binary_metrics(
        is_parasitized(oof["label"]), oof["prob_parasitized"], threshold=threshold
    )
    per_fold = [
        binary_metrics(is_parasitized(f["label"]), f["prob_parasitized"], threshold=threshold)
        for _, f in oof.groupby("fold")
    ]
    spread = {m: float(np.nanstd([f[m] for f in per_fold])) for m in SPREAD}
    honest = out_of_fold_flags(oof)
    flags = pd.DataFrame({"group": honest["case_id"], "likely_infected": honest["flagged"]})
    infected = set(honest.loc[honest["infected"], "case_id"])
    return {
        "cells": int(len(oof)),
        "patients": int(oof["case_id"].nunique()),
        "folds": len(cards),
        "pooled": pooled,
        "per_fold_std": spread,
        "per_fold": per_fold,
        "screening": flag_performance(flags, infected),
        "best_epochs": [int(c["best_epoch"]) for c in cards],
        "heatmap": pointing(cards),
    }


def run(args: argparse.Namespace) -> dict:
    cfg = config_from_args(args)
    contract = recipe_contract(cfg)
    samples, _ = labelled_samples(args.data, follow_links=args.follow_links)
    splits = fold_splits(samples, folds=args.folds, seed=cfg.seed)
    run_folds(args, cfg, splits)
    oof, cards = collect(args.out, args.folds)
    oof.to_csv(args.out / OOF_FILE, index=False)
    result = {
        "recipe": command("folds", args, "--out", str(args.out), "--folds", str(args.folds)),
        **estimate(oof, cards, contract.threshold),
    }
    write_json(args.out / FOLDS_FILE, result)
    m, s = result["pooled"], result["screening"]
    print(
        f"{args.folds}-fold estimate on {result['patients']} patients, {result['cells']} "
        f"cells: accuracy {m['accuracy']:.4f}, AUC {m['auc']:.4f}; flag catches "
        f"{s['sensitivity']:.1%} of {s['infected_patients']} infected patients, flags "
        f"{1 - s['specificity']:.1%} of {s['healthy_patients']} healthy ones"
    )
    if result["heatmap"]:
        h = result["heatmap"]
        print(f"default heatmap on the parasite in {h['pointing']:.1%} of {h['cells']} cells")
    if args.final:
        calibration = calibrate(oof)
        contract = replace(contract, temperature=calibration.temperature)
        cases = tuple(sorted({smp.case_id for smp in samples}))
        data = data_from_args(args, cfg, Split(cases, (), (), cfg.seed))
        card = fit(
            cfg,
            data,
            args.out,
            contract=contract,
            resume=(args.out / CHECKPOINT).is_file(),
            progress=not args.no_progress,
            card={
                "training_command": command(
                    "folds",
                    args,
                    "--out",
                    str(args.out),
                    "--folds",
                    str(args.folds),
                    "--final",
                ),
                "training_data": [str(d) for d in args.data],
                "screening": calibration.screening.to_json(),
                "calibration": calibration.record,
                "estimate": {
                    "source": f"{args.folds}-fold out-of-fold predictions "
                    f"({OOF_FILE}): every cell predicted by a "
                    "model that never saw its patient",
                    **{k: result[k] for k in ("pooled", "per_fold_std", "screening", "heatmap")},
                },
            },
        )
        return card
    return result
