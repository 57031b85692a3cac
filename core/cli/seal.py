"""``malaria seal FOLDER...``: accept the contract of model cards written before contracts were
hashed. Validates each and records its contract_sha256. Read the contract first (classes,
threshold, input size): sealing says it is right."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli.options import fail
from core.schema.contract import WeightsError, seal_card


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", type=Path, help="model folders (holding card.json)")


def run(args: argparse.Namespace) -> int:
    for folder in args.folders:
        try:
            digest = seal_card(folder)
        except WeightsError as exc:
            return fail(str(exc))
        print(f"{folder}: contract_sha256 {digest}")
    return 0
