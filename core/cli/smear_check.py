"""``malaria check smear --data DIR``: smear mode measured on annotated fields
(core.evaluation.smear_check), with and without stain matching."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from core.data.images import decode_image
from core.evaluation.smear_check import IOU, field_counts, figures
from core.inference.engines import load_engine
from core.schema.contract import DEFAULT_WEIGHTS
from core.schema.files import write_json
from core.smear.fields import crop_cells, match_stain, segment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", type=Path, required=True, help="folder with images/ and annotations.json"
    )
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="model folder")
    p.add_argument(
        "--tune",
        default="PA1717",
        help="file-name prefix of the fields the segmentation was tuned on",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="JSON of the figures (default: smear_check.json in the model folder)",
    )
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")


def run(args: argparse.Namespace) -> int:
    try:
        annotations = json.loads((args.data / "annotations.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.data / 'annotations.json'}: {exc}", file=sys.stderr)
        return 2
    engine = load_engine(args.weights, threads=args.threads)
    threshold = engine.contract.threshold
    variants = {"own_colours": False, "stain_matched": True}  # the default first
    rows: dict[str, list[tuple[str, dict]]] = {v: [] for v in variants}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    decoded: dict[str, list[float]] = {v: [] for v in variants}
    engine(np.zeros((1, engine.contract.input_size, engine.contract.input_size, 3), np.uint8))
    for entry in sorted(annotations, key=lambda e: e["image_name"]):
        name = entry["image_name"]
        t0 = time.perf_counter()
        image = decode_image((args.data / "images" / name).read_bytes())
        t_decode = time.perf_counter() - t0
        for variant, norm in variants.items():
            t1 = time.perf_counter()
            seg = segment(image)
            cells = seg.cells
            source = match_stain(image, cells) if norm else image
            prob = (
                engine(crop_cells(source, cells, size=engine.contract.input_size))
                if cells
                else np.empty(0)
            )
            dt = time.perf_counter() - t1
            seconds[variant].append(dt)
            decoded[variant].append(dt + t_decode)
            objects = [
                {"x": o.x, "y": o.y, "w": o.w, "h": o.h, "is_cell": o.is_cell} for o in seg.objects
            ]
            rows[variant].append((name, field_counts(objects, entry["objects"], prob, threshold)))
        c = rows["own_colours"][-1][1]
        print(
            f"{name}: {c['recalled']}/{c['annotated']} boxes found, {c['red_cells']} red "
            f"cells, {c['objects'] - c['red_cells']} other objects, infected "
            f"{c['infected_called']}/{c['infected']} called, "
            f"{c['false_called']} others called",
            file=sys.stderr,
        )
    report: dict = {
        "data": str(args.data),
        "weights_sha256": engine.sha256,
        "threshold": threshold,
        "iou": IOU,
        "tune_prefix": args.tune,
        "machine_note": "seconds measured on the machine at hand; compare ratios",
    }
    for variant in variants:
        parts = {
            "all": rows[variant],
            "tune": [r for r in rows[variant] if r[0].startswith(args.tune)],
            "held_out": [r for r in rows[variant] if not r[0].startswith(args.tune)],
        }
        report[variant] = {}
        for part, picked in parts.items():
            if not picked:
                continue
            idx = [i for i, r in enumerate(rows[variant]) if r in picked]
            report[variant][part] = figures(
                [r[1] for r in picked],
                [seconds[variant][i] for i in idx],
                [decoded[variant][i] for i in idx],
            )
    out = args.out or Path(engine.folder) / "smear_check.json"
    write_json(out, report)
    keys = (
        "fields",
        "recall_iou50",
        "infected_sensitivity",
        "false_positive_share_all_objects",
        "false_positive_share_red_cells",
        "precision_vs_boxes",
        "seconds_per_field",
        "seconds_per_field_with_decoding",
    )
    for variant in variants:
        print(f"\n{variant.replace('_', ' ')} (threshold {threshold:.2f})")
        print(f"{'':34}" + "".join(f"{p:>10}" for p in report[variant]))
        for k in keys:
            vals = [report[variant][p][k] for p in report[variant]]
            print(
                f"{k:34}"
                + "".join(f"{v:>10}" if isinstance(v, int) else f"{v:>10.3f}" for v in vals)
            )
    print(f"\nwritten to {out}")
    return 0
