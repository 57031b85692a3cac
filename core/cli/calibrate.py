"""``malaria calibrate probabilities WEIGHTS``: fit the temperature and the screening flag of a
model folder on its out-of-fold predictions (core.training.calibrate) and write them into its
card. Then re-run ``malaria check int8 WEIGHTS``: the int8 graph is made again for the new
probabilities."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli.options import fail
from core.schema.contract import WeightsError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", type=Path, help="a model folder with oof_predictions.csv")


def run(args: argparse.Namespace) -> int:
    from core.training.calibrate import calibrate_folder

    try:
        c = calibrate_folder(args.weights)
    except (WeightsError, ValueError) as exc:
        return fail(str(exc))
    r, flags = c.record, c.record["screening_out_of_fold"]
    print(
        f"{args.weights}: temperature {c.temperature:.3f}; expected calibration error "
        f"{r['ece_before']:.4f} -> {r['ece_after']:.4f} ({r['bins']} bins, out of fold)"
    )
    print(f"flag: {c.screening.describe()}")
    print(
        f"out of fold: flags {flags['sensitivity']:.1%} of {flags['infected_patients']} infected "
        f"patients (missed: {', '.join(flags['missed']) or 'none'}) and "
        f"{1 - flags['specificity']:.1%} of {flags['healthy_patients']} healthy ones "
        f"({', '.join(flags['false_alarms']) or 'none'})"
    )
    return 0
