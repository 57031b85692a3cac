"""What smear mode costs per field, measured in one run on this machine.

    python -m bench.smear [--data ../shared/data/smear_dev] [--weights DIR] [--repeats 3]

Decodes every field once, then times, per field and alternating ``repeats`` times so that a
machine whose load changes during the run hurts all alike: the segmentation as it was before
its second watershed (the baseline: one marker watershed, pallor weight 1.0), the segmentation
as shipped, and a whole field scored (segmentation, crops, the model's default engine and its
quality gate). Prints the mean, median and slowest field of each (best repeat per field) and
the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from core.schema.contract import DEFAULT_WEIGHTS
from core.schema.files import REPO_ROOT as ROOT


def main() -> None:
    from core.data.images import decode_image
    from core.inference.engines import load_engine
    from core.smear.fields import SegmentConfig, score_field, segment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/smear_dev")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    paths = sorted(q for q in (args.data / "images").iterdir() if q.is_file())
    fields = [decode_image(q.read_bytes()) for q in paths]
    engine = load_engine(args.weights)
    baseline = SegmentConfig(pallor_weight=1.0, resplit=math.inf, pale_radius=0)
    base_name = "segmentation of 2026-12-03 (baseline)"  # one watershed, a* foreground only
    steps = {
        base_name: lambda f: segment(f, config=baseline),
        "segmentation as shipped": segment,
        "a field scored (segment, crop, score, gate)": lambda f: score_field(f, engine),
    }
    score_field(fields[0], engine)  # warm-up: ONNX Runtime's first run
    seconds = {name: np.full((args.repeats, len(fields)), np.inf) for name in steps}
    for r in range(args.repeats):
        for name, step in steps.items():
            for i, f in enumerate(fields):
                t0 = time.perf_counter()
                step(f)
                seconds[name][r, i] = time.perf_counter() - t0
    print(
        f"{len(fields)} fields of {args.data}, {args.weights} ({engine.name}), "
        f"best of {args.repeats}"
    )
    base = seconds[base_name].min(0).mean()
    slowest = int(np.argmax(seconds["a field scored (segment, crop, score, gate)"].min(0)))
    for name, s in seconds.items():
        best = s.min(0)
        print(
            f"  {name:45s} mean {best.mean():.3f} s, median {np.median(best):.3f} s, "
            f"slowest {best.max():.2f} s; {best.mean() / base:.2f}x the baseline"
        )
    print(f"  slowest field scored: {paths[slowest].name}")


if __name__ == "__main__":
    main()
