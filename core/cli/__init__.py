"""The ``malaria`` command line: one command, a subcommand per job.

    malaria score INPUT... --out results.csv       score cell images (files, folders, zips)
    malaria smear FIELD... --out cells.csv         find and score the red cells of whole fields
    malaria --help                                 every command, one line each

``python -m core`` is the same command. Each subcommand lives in a module of this package with
``add_arguments(parser)`` and ``run(args) -> int``; only the chosen one is imported, so
``malaria score`` never pays for PyTorch. Exit codes (core.cli.options): 0 ok, 1 some inputs
failed (error rows), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # under core.cli
    help: str
    add: str = "add_arguments"  # the module's function that adds this command's options
    run: str = "run"  # the module's function that runs it: (args) -> exit code


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "score": Command("score", "score cell images (files, folders, zips) and give parasitemia"),
    "smear": Command("smear", "find the red cells of whole smear fields, score them"),
    "explain": Command("explain", "heatmaps of why the model calls cells as it does"),
    "report": Command("report", "write the per-patient HTML report of a scored run"),
    "train": Command(
        "training", "train a cell classifier, patients split apart", "add_train", "run_train"
    ),
    "folds": Command(
        "training",
        "k patient-grouped folds of a recipe, then the model on all",
        "add_folds",
        "run_folds",
    ),
    "lr-find": Command("training", "the learning-rate range test", "add_lr_find", "run_lr_find"),
    "study": Command(
        "training", "layer and model studies, patients kept apart", "add_study", "run_study"
    ),
    "audit": Command("audit", "rank the cells whose label is most likely wrong"),
    "adapt": Command(
        "adapt", "fine-tune a model on a lab's annotated fields, checked block by block"
    ),
    "calibrate": {
        "int8": Command(
            "int8", "store a model's int8 calibration cells", "add_calibrate", "calibrate"
        ),
        "gate": Command("gate", "fit a model's quality gate", "add_calibrate", "calibrate"),
        "probabilities": Command(
            "calibrate", "fit a model's temperature and screening flag on out-of-fold cells"
        ),
    },
    "check": {
        "int8": Command("int8", "int8 against fp32 on the test patients", "add_check", "check"),
        "gate": Command("gate", "measure a model's quality gate", "add_check", "check"),
        "heatmaps": Command("heatmaps", "where each CAM method and stage points"),
        "smear": Command("smear_check", "smear mode on annotated fields"),
        "boxes": Command("box_check", "another lab's annotated cells, cut from their boxes"),
    },
    "seal": Command("seal", "accept a model card as it is: seal its values and files"),
}

EPILOG = (
    "Exit status: 0 ok; 1 some inputs gave error rows (all others were done); 2 bad arguments, "
    "input, weights, output or store; 130 interrupted (results so far are kept: --resume)."
)


def _chosen(argv: Sequence[str]) -> list[str]:
    """The command words at the front of ``argv`` (before the first option)."""
    words = []
    for a in argv:
        if a.startswith("-"):
            break
        words.append(a)
    return words[:2]


def _attach(p: argparse.ArgumentParser, cmd: Command) -> None:
    module = importlib.import_module(f"core.cli.{cmd.module}")
    getattr(module, cmd.add)(p)
    p.set_defaults(run=getattr(module, cmd.run))


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of every command; only the command named at the front of ``argv`` gets
    its options (and its module imported)."""
    chosen = _chosen(argv)
    p = argparse.ArgumentParser(
        prog="malaria",
        description="Malaria screening of thin blood smears: score cells and fields, explain, "
        "train and check models.",
        epilog=EPILOG,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, entry in COMMANDS.items():
        if isinstance(entry, Command):
            sp = sub.add_parser(name, help=entry.help, description=entry.help, epilog=EPILOG)
            if chosen[:1] == [name]:
                _attach(sp, entry)
            continue
        group = sub.add_parser(name, help=f"{name}: {', '.join(entry)}")
        inner = group.add_subparsers(dest="what", required=True, metavar="WHAT")
        for what, cmd in entry.items():
            sp = inner.add_parser(what, help=cmd.help, description=cmd.help, epilog=EPILOG)
            if chosen == [name, what]:
                _attach(sp, cmd)
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed arguments of one command line (without ``malaria``); bad ones exit 2."""
    return build_parser(argv).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. Bad arguments exit 2 through argparse."""
    args = parse(list(sys.argv[1:] if argv is None else argv))
    return int(args.run(args))
