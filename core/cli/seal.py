"""``malaria seal FOLDER... [--force]``: accept a model card as it is. Validates each (its
contract, screening cutoff and weights' sha256), records the sha256 of its quality-gate files
and its contract_sha256 over every value that changes a result
(core.schema.contract.SEALED_KEYS). Read those values first (classes, threshold, input size,
screening cutoff, int8 record): sealing says they are right. A card sealed already is refused
without ``--force``."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli.options import fail
from core.schema.contract import WeightsError, seal_card


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", type=Path, help="model folders (holding card.json)")
    p.add_argument(
        "--force",
        action="store_true",
        help="seal cards that are sealed already (after a value or a gate file was checked)",
    )


def run(args: argparse.Namespace) -> int:
    for folder in args.folders:
        try:
            digest = seal_card(folder, force=args.force)
        except WeightsError as exc:
            return fail(str(exc))
        print(f"{folder}: contract_sha256 {digest}")
    return 0
