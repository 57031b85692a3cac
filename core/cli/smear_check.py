"""``malaria check smear --data DIR``: smear mode measured on annotated fields, block of shots by
block (core.evaluation.smear_check), with and without stain matching."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from core.cli.options import add_annotated_fields, fail, print_table
from core.data.annotations import AnnotationError, read_annotations
from core.evaluation.smear_check import IOU, by_block, check_field
from core.inference.engines import load_engine
from core.schema.contract import WeightsError
from core.schema.files import write_json

SHOWN = (
    "fields",
    "reported_share",
    "recall_iou50",
    "not_counted_share",
    "infected_sensitivity",
    "false_positive_share_counted",
    "parasitemia_mae",
    "parasitemia_mean",
    "parasitemia_boxes_mean",
    "seconds_per_field",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_annotated_fields(p)
    p.add_argument(
        "--out",
        type=Path,
        help="JSON of the figures (default: smear_check.json in the model folder)",
    )
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")


def run(args: argparse.Namespace) -> int:
    try:
        fields = read_annotations(args.data / "images", args.data / "annotations.json")
        engine = load_engine(args.weights, threads=args.threads)
    except (AnnotationError, WeightsError) as exc:
        return fail(str(exc))
    threshold = engine.contract.threshold
    variants = {"own_colours": False, "stain_matched": True}  # the default first
    engine(np.zeros((1, engine.contract.input_size, engine.contract.input_size, 3), np.uint8))
    report: dict = {
        "data": str(args.data),
        "weights_sha256": engine.sha256,
        "threshold": threshold,
        "iou": IOU,
        "block_prefix": args.blocks,
        "machine_note": "seconds measured on the machine at hand; compare ratios",
        # a model not adapted to a lab's fields gives none a parasitemia (REVIEW_NOT_ADAPTED):
        # the figures are what it reads, which its pages and CSVs withhold
        "withheld": not engine.weights.adapted,
    }
    for variant, norm in variants.items():
        rows = []
        for field in fields:
            rows.append(check_field(field, engine, threshold=threshold, stain_norm=norm))
            if not norm:
                c = rows[-1]
                print(
                    f"{field.name}: {c['recalled']}/{c['annotated']} boxes found, "
                    f"{c['counted_cells']} of {c['red_cells']} red cells counted, infected "
                    f"{c['infected_called']}/{c['infected']} called, {c['false_called']} others "
                    f"called" + (" (review: unlike the model's cells)" if c["review"] else ""),
                    file=sys.stderr,
                )
        report[variant] = {"blocks": by_block(rows, prefix=args.blocks), "fields": rows}
    out = args.out or Path(engine.folder) / "smear_check.json"
    write_json(out, report)
    for variant in variants:
        blocks = report[variant]["blocks"]
        print(f"\n{variant.replace('_', ' ')} (threshold {threshold:.2f}; on the fields reported)")
        print_table(blocks, SHOWN)
    if report["withheld"]:
        print(
            "\nThis model was not adapted to a lab's fields: the smear page and malaria smear "
            "give none of these fields a parasitemia (review); the figures are what it reads."
        )
    print(f"\nwritten to {out}")
    return 0
