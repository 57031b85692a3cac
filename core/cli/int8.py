"""``malaria calibrate int8`` and ``malaria check int8``: a model's int8 calibration cells, and
the agreement check that decides whether int8 may be its default engine (core.inference.quantize,
core.evaluation.int8_check).

    malaria calibrate int8 weights/default --data ../shared/data/nih_cells_dev.zip
    malaria check int8 weights/default --data ../shared/data/nih_cells_dev.zip
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.cli.options import fail
from core.data.sources import iter_sources
from core.data.splits import Split
from core.evaluation.int8_check import check as check_int8
from core.evaluation.int8_check import pick_calibration, write_calibration
from core.inference.quantize import default_engine
from core.schema.contract import WeightsError, read_card

ERRORS = (WeightsError, ValueError, FileNotFoundError, KeyError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="model folder (holding card.json)")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="the model's development data (folders or zips in the NIH layout)",
    )


def add_calibrate(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--cells", type=int, default=256, help="calibration cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--float-blocks", nargs="*", default=["features.1"], help="model stages kept in float"
    )


def add_check(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--part",
        choices=("val", "test"),
        default="test",
        help="which patients to check on; only the test check sets the default",
    )


def calibrate(args: argparse.Namespace) -> int:
    try:
        split = Split.from_json(read_card(args.folder)["split"])
        sources = pick_calibration(
            list(iter_sources(args.data)), split, n=args.cells, seed=args.seed
        )
        rec = write_calibration(
            args.folder, sources, split, seed=args.seed, float_blocks=args.float_blocks
        )
    except ERRORS as exc:
        return fail(str(exc))
    print(
        f"{rec.cells} cells of {len(rec.cases)} training patients in "
        f"{args.folder / rec.file}; the int8 graph is rebuilt on next use"
    )
    return 0


def check(args: argparse.Namespace) -> int:
    try:
        print(json.dumps(check_int8(args.folder, args.data, part=args.part), indent=2))
        if args.part == "test":
            print(f"default engine: {default_engine(read_card(args.folder))}")
    except ERRORS as exc:
        return fail(str(exc))
    return 0
