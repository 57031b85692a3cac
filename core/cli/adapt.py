"""``malaria adapt FIELDS_DIR --annotations FILE --out weights/mylab``: fine-tune a model on a
lab's annotated fields, set that lab's threshold and gate, and measure the recipe leaving one
block of shots out at a time (core.training.adapt). The base model folder is not changed."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from core.cli.options import INTERRUPTED, add_weights, fail, print_table
from core.data.annotations import AnnotationError, read_annotations
from core.schema.contract import WeightsError
from core.schema.files import invocation
from core.training.adapt import AdaptConfig, adapt
from core.training.recipe import TrainingError

SHOWN = (
    "fields",
    "reported_share",
    "infected_sensitivity",
    "false_positive_share_counted",
    "parasitemia_mae",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fields", type=Path, help="folder of the lab's field images")
    p.add_argument(
        "--annotations",
        type=Path,
        required=True,
        help="the fields' boxes, in the format of smear_dev/annotations.json",
    )
    p.add_argument("--out", type=Path, required=True, help="the new model folder to write")
    add_weights(p, help="the model folder to adapt (not changed)")
    p.add_argument("--epochs", type=int, default=AdaptConfig.epochs)
    p.add_argument(
        "--stain",
        type=float,
        default=AdaptConfig.stain,
        help="HED stain jitter of the training cells (0: none)",
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=6,
        help="characters of a field's name that name its block of shots (the check leaves "
        "one block out at a time)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the leave-one-block-out check")


def run(args: argparse.Namespace) -> int:
    try:
        if args.out.exists():
            raise TrainingError(f"{args.out} exists: give a new folder to --out")
        if args.epochs < 1:
            raise TrainingError(f"--epochs must be at least 1, got {args.epochs}")
        if not 0 <= args.stain < 1:
            raise TrainingError(f"--stain must be in [0, 1), got {args.stain}")
        fields = read_annotations(args.fields, args.annotations)
        start = time.perf_counter()
        card = adapt(
            fields,
            base=args.weights,
            out=args.out,
            cfg=replace(AdaptConfig(), epochs=args.epochs, stain=args.stain),
            prefix=args.blocks,
            check=not args.no_check,
            command=invocation("adapt"),
            log=lambda line: print(line, file=sys.stderr),
        )
    except (AnnotationError, TrainingError, WeightsError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {args.out}", file=sys.stderr)
        return INTERRUPTED
    check = card["adaptation"].get("check")
    if check:
        print_table(check["blocks"], SHOWN, head="left-out block")
    minutes = (time.perf_counter() - start) / 60
    print(
        f"adapted model written to {args.out} (threshold {card['contract']['threshold']:.3f}; "
        f"{minutes:.1f} min)"
    )
    return 0
