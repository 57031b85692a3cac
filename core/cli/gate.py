"""``malaria calibrate gate`` and ``malaria check gate``: fit a model's quality gate, and measure
it (core.inference.gate, core.evaluation.gate_check).

    malaria calibrate gate [--weights weights/default] [--data CELLS.zip]
    malaria check gate [--weights weights/default] [--data CELLS.zip] [--smear DIR]

(defaults: ``../shared/data/nih_cells_dev.zip`` and ``../shared/data/smear_dev/images``)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.cli.options import add_weights, fail
from core.evaluation.gate_check import BEYOND_GOAL, CHECK_FILE, fold_ratio
from core.evaluation.gate_check import calibrate as calibrate_gate
from core.evaluation.gate_check import check as check_gate
from core.schema.contract import ModelFolder, WeightsError
from core.schema.files import write_json

ERRORS = (WeightsError, FileNotFoundError, ValueError)


def _common(p: argparse.ArgumentParser) -> None:
    add_weights(p)
    p.add_argument(
        "--data",
        nargs="+",
        default=["../shared/data/nih_cells_dev.zip"],
        help="the development cells (folders or zips, NIH layout)",
    )


def add_calibrate(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--quantile",
        type=float,
        default=0.995,
        help="quantile of the validation cells' distances kept as the limit",
    )


def add_check(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--smear",
        type=Path,
        default=Path("../shared/data/smear_dev/images"),
        help="folder of whole smear fields (JPEG) for the non-cell set",
    )


def calibrate(args: argparse.Namespace) -> int:
    try:
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
            calibrate_gate(
                args.weights,
                args.data,
                quantile=args.quantile,
                engine_name=engine_name,
                unseen=unseen,
            )
        return 0
    except ERRORS as exc:
        return fail(str(exc))


def check(args: argparse.Namespace) -> int:
    try:
        result = check_gate(args.weights, args.data, smear=args.smear)
    except ERRORS as exc:
        return fail(str(exc))
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
