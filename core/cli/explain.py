"""``malaria explain INPUT... --out DIR``: heatmaps of cell images (core.explain.cams), one PNG
per map (or a grid with ``--method all``) and ``scores.csv`` with where each points."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image

from core.cli.options import add_weights
from core.data.images import ImageError
from core.data.sources import iter_sources, read_image
from core.explain.cams import METHODS, explain, explainable, grid
from core.explain.heatmap import (
    DEFAULT_METHOD,
    TARGETS,
)
from core.nets.model import load_model
from core.schema.export import write_csv
from core.schema.labels import as_posix


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files, folders or zips")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=[*METHODS, "all"])
    p.add_argument(
        "--layer",
        help="network stage, or stages joined by '+' to fuse them "
        "(default: the model's target layer)",
    )
    p.add_argument("--target", default="predicted", choices=TARGETS)
    add_weights(p)
    p.add_argument("--out", type=Path, required=True, help="folder for PNGs and scores.csv")
    p.add_argument("--no-faithfulness", action="store_true", help="skip ROAD (about 0.5 s per map)")


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.weights)
    net = explainable(loaded)
    methods = list(METHODS) if args.method == "all" else [args.method]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    status = 0
    for n, src in enumerate(iter_sources(args.inputs)):
        try:
            image = read_image(src)
        except ImageError as exc:
            rows.append({"path": src.path, "error": str(exc)})
            status = 1
            continue
        exps = [
            explain(
                loaded,
                [image],
                method=m,
                target=args.target,
                layer=args.layer,
                faithfulness=not args.no_faithfulness,
                net=net,
            )[0]
            for m in methods
        ]
        stem = f"{n:05d}_{as_posix(src.path).stem}"
        if len(exps) == 1:
            Image.fromarray(exps[0].overlay).save(args.out / f"{stem}_{exps[0].method}.png")
        else:
            grid(image, exps).save(args.out / f"{stem}_all.png")
        rows += [
            {
                "path": src.path,
                "method": e.method,
                "layer": e.layer,
                "target": e.target,
                "prob_parasitized": e.prob_parasitized,
                "points_at_parasite": e.points_at_parasite,
                "peak_on_stain": e.peak_on_stain,
                "mass_in_cell": e.mass_in_cell,
                "road": e.road,
                "ms": e.ms,
                "error": None,
            }
            for e in exps
        ]
    write_csv(args.out / "scores.csv", pd.DataFrame(rows))  # file names are user input
    print(f"{len(rows)} rows written to {args.out / 'scores.csv'}")
    return status
