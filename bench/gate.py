"""What the quality gate costs in scoring speed, measured in one run on this machine.

    python -m bench.gate --data ../shared/data/nih_cells_dev.zip [--n 2000] [--repeats 3]

Scores the same PNG files on disk (decoding, resizing, ONNX Runtime, result rows) with the
shipped model's gate and with a gate that passes everything, alternating the two ``repeats``
times so that a machine whose load changes during the run hurts both alike; prints the best
rate of each and their ratio, and the gate's own parts in ms per image.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import png_folder, subset
from core.schema.contract import DEFAULT_WEIGHTS
from core.schema.files import REPO_ROOT as ROOT
from core.schema.files import cpu_count


def main() -> None:
    from core.data.sources import iter_sources, load_array
    from core.inference.engines import load_engine
    from core.inference.gate import Gate, image_reasons, image_stats
    from core.inference.pipeline import score_sources
    from core.schema.results import OK

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/nih_cells_dev.zip")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    folder = png_folder(args.data, ROOT / ".cache" / "bench_png")
    engine = load_engine(args.weights, "onnx")
    gate = engine.gate

    class PassAll(Gate):
        def __call__(self, images: np.ndarray, features: np.ndarray | None = None) -> list[str]:
            return [OK] * len(images)

    passes = PassAll()

    with tempfile.TemporaryDirectory() as tmp:
        sources = list(iter_sources([subset(folder, args.n, Path(tmp) / "cells")]))
        score_sources(sources[:256], engine)  # warm-up: page cache, ONNX Runtime
        rates: dict[str, list[float]] = {"with the gate": [], "gate passing everything": []}
        for _ in range(args.repeats):
            for name, g in (("with the gate", gate), ("gate passing everything", passes)):
                engine.gate = g
                t0 = time.perf_counter()
                score_sources(sources, engine)
                rates[name].append(len(sources) / (time.perf_counter() - t0))
        engine.gate = gate
        images = load_array(sources[:1024], size=engine.contract.input_size)
    _, features = engine.score(images[:256])
    t0 = time.perf_counter()
    for i in range(0, len(images), 64):
        image_reasons(image_stats(images[i : i + 64]))
    stats_ms = (time.perf_counter() - t0) * 1000 / len(images)
    fm = gate.features
    dist_ms = float("nan")
    if fm is not None:
        t0 = time.perf_counter()
        for _ in range(4):
            fm.distance(features)
        dist_ms = (time.perf_counter() - t0) * 1000 / (4 * len(features))
    print(f"machine: {cpu_count()} cores; {len(sources):,} PNG cells, best of {args.repeats}")
    best = {k: max(v) for k, v in rates.items()}
    for name, rate in best.items():
        print(
            f"  malaria score pipeline, {name:26s} {rate:7.0f} img/s  (runs: "
            + ", ".join(f"{r:.0f}" for r in rates[name])
            + ")"
        )
    print(f"  ratio: {best['with the gate'] / best['gate passing everything']:.2f}")
    print(
        f"  image statistics {stats_ms:.3f} ms/img (one thread); feature distance "
        f"{dist_ms:.3f} ms/img"
    )


if __name__ == "__main__":
    main()
