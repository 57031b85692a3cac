"""``malaria report RUN_ID --out report.html``: the per-patient HTML report of a scored run
(core.evaluation.report), every number from the run's own model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.cli.options import add_band, add_group_by, add_store, add_threshold, count
from core.evaluation.report import disk_reader, model_heatmaps, render_report, report_info
from core.inference.store import ResultStore, StoreError
from core.schema.contract import WeightsError
from core.schema.export import OutputError, check_output
from core.schema.files import atomic_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", help="a run in the result store (malaria score prints it)")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument("--case", nargs="+", dest="groups", help="only these patients (or folders)")
    add_store(p)
    add_threshold(p, help="decision threshold on P(Parasitized); default: the run's")
    add_band(p)
    add_group_by(p)
    p.add_argument(
        "--gallery", type=count, default=8, help="most suspicious cells per patient (0: none)"
    )
    p.add_argument("--no-heatmaps", action="store_true", help="cells only (faster)")


def run(args: argparse.Namespace) -> int:
    try:
        check_output(args.out)
        if args.threshold is not None and not 0 <= args.threshold <= 1:
            raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
        with ResultStore(args.store) as store:
            run = store.run(args.run_id)
            results = store.results(args.run_id)
        info = report_info(run, threshold=args.threshold, band=args.band, group_by=args.group_by)
        read = disk_reader if run.kind == "files" else (lambda path: None)
        heat = None if args.no_heatmaps else model_heatmaps(run.weights)
        text = render_report(
            results, info, groups=args.groups, read=read, heatmaps=heat, gallery=args.gallery
        )
        with atomic_path(args.out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except (OutputError, StoreError, WeightsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report of run {run.run_id} written to {args.out}", file=sys.stderr)
    return 0
