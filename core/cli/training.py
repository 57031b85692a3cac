"""The commands that make models (core.training), each a thin wrapper over its stage:

    malaria train --data DATA --out RUN [--resume]      one model, patients split apart
    malaria folds --data DATA --out DIR [--final]       k patient-grouped folds, then all patients
    malaria lr-find --data DATA --out DIR               the learning-rate range test
    malaria study layers|models --data DATA             layer and model studies

Exit 2 for bad input (a recipe, split or data folder they cannot use: one line, no traceback),
130 interrupted, with how to go on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from core.cli.options import INTERRUPTED, fail
from core.schema.contract import HOLDOUT_WEIGHTS, WeightsError
from core.training import folds, lr_find, study, train
from core.training.recipe import add_recipe_arguments

# TrainingError, DataError and ImageError are ValueErrors.
ERRORS = (ValueError, WeightsError, FileNotFoundError)


def _job(
    stage: Callable[[argparse.Namespace], object], args: argparse.Namespace, *, then: str
) -> int:
    """Run one training stage as a command: its exit code, ``then`` saying how an interrupted
    run goes on."""
    try:
        stage(args)
    except ERRORS as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print(f"\ninterrupted{then}", file=sys.stderr)
        return INTERRUPTED
    return 0


def add_train(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="run folder")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--split",
        type=Path,
        help="use the case split of this split.json or "
        "card.json (e.g. to compare models on the same patients)",
    )
    where.add_argument(
        "--all-patients",
        action="store_true",
        help="train on every patient (no validation or test patients): the last "
        "epoch is kept, and its estimate must come from malaria folds",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def add_folds(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument(
        "--final",
        action="store_true",
        help="then train the recipe on every patient into OUT (the model to ship)",
    )


def add_lr_find(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, nargs="+", help="labelled folder(s) or zip(s)")
    p.add_argument("--arch", default="mobilenet_v2")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument(
        "--follow-links",
        action="store_true",
        help="read images that symbolic links in a data folder point to outside it",
    )


def add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", choices=("layers", "models"))
    p.add_argument("--data", required=True, nargs="+", help="labelled folder(s) or zip(s)")
    p.add_argument("--out", type=Path, default=Path("weights/study"))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8, help="epochs for the from-scratch models")
    p.add_argument(
        "--reference",
        type=Path,
        default=HOLDOUT_WEIGHTS,
        help="model folder with test patients whose split and test predictions the models "
        "study uses (default: weights/holdout; the shipped model has no test patients)",
    )
    p.add_argument("--no-progress", action="store_true")


def run_train(args: argparse.Namespace) -> int:
    return _job(train.run, args, then=": OUT/checkpoint.pt holds the last finished epoch; --resume")


def run_folds(args: argparse.Namespace) -> int:
    return _job(folds.run, args, then=": finished folds are kept; go on with --resume")


def run_lr_find(args: argparse.Namespace) -> int:
    return _job(lr_find.run, args, then="")


def run_study(args: argparse.Namespace) -> int:
    return _job(study.run, args, then="")
