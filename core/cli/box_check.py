"""``malaria check boxes --data DIR``: another lab's annotated cells cut from their boxes and
scored, block of shots by block (core.evaluation.box_check)."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli.options import add_annotated_fields, fail, print_table
from core.data.annotations import AnnotationError, read_annotations
from core.evaluation.box_check import check_boxes
from core.inference.engines import load_engine
from core.schema.contract import WeightsError
from core.schema.files import write_json

SHOWN = (
    "infected",
    "uninfected",
    "sensitivity",
    "uninfected_called",
    "auc",
    "unlike_share",
    "unlike_share_infected",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_annotated_fields(p)
    p.add_argument(
        "--out", type=Path, help="JSON of the figures (default: box_check.json in the model folder)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        fields = read_annotations(args.data / "images", args.data / "annotations.json")
        engine = load_engine(args.weights)
    except (AnnotationError, WeightsError) as exc:
        return fail(str(exc))
    figures = check_boxes(fields, engine, prefix=args.blocks)
    print_table(figures, SHOWN, head="block")
    write_json(
        args.out or Path(args.weights) / "box_check.json",
        {
            "data": str(args.data),
            "weights_sha256": engine.sha256,
            "engine": engine.name,
            "threshold": engine.contract.threshold,
            "figures": figures,
        },
    )
    return 0
