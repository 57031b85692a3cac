"""``malaria check heatmaps``: every CAM method x stage scored for pointing at the stained
parasite on a model's test (or validation) patients (core.evaluation.explain_check)."""

from __future__ import annotations

import argparse

from core.cli.options import add_weights
from core.evaluation.explain_check import SPLITS, check_model
from core.explain.cams import METHODS
from core.schema.contract import explain_check_paths
from core.schema.files import atomic_path, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_weights(p)
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="the model's patients to check on (val: where the default was chosen; oof: every "
        "development cell, for a model trained on every patient)",
    )
    p.add_argument("--road-cells", type=int, default=16, help="cells per row for ROAD (0: none)")
    p.add_argument(
        "--slow-cells", type=int, default=8, help="cells per row for ScoreCAM and AblationCAM"
    )
    p.add_argument("--limit", type=int, help="at most this many cells (a quick look)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))


def run(args: argparse.Namespace) -> int:
    table, summary = check_model(
        args.weights,
        split=args.split,
        road_cells=args.road_cells,
        slow_cells=args.slow_cells,
        limit=args.limit,
        methods=args.methods,
    )
    csv_path, json_path = explain_check_paths(args.weights, args.split)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    write_json(json_path, summary)
    print(table.sort_values("pointing", ascending=False).to_string(index=False))
    d = summary["default"]
    print(
        f"default ({d['method']} at {d['layer']}, predicted class): pointing {d['pointing']:.3f}"
        f" on {summary['cells_checked']} cells; written to {csv_path}"
    )
    return 0
