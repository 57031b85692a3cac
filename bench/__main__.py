"""Speed benchmarks, every figure and ratio measured in this one run on this machine.

    python -m bench --data ../shared/data/nih_cells_dev.zip      (or: make bench)

Scoring, end to end (PNG files on disk to CSV on disk, process start included) with the int8
and fp32 ONNX engines against a naive loop that opens, transforms and classifies one image at a
time with PyTorch; the engines on pre-decoded batches; decoding alone; peak RSS at 1,000 and at
all images; the screening flag's patient-level sensitivity and specificity on the development
patients.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import png_folder, score_cli, subset
from core.schema.contract import DEFAULT_WEIGHTS, ModelContract, read_card
from core.schema.files import REPO_ROOT, cpu_count

ROOT = REPO_ROOT
os.environ.setdefault("TQDM_DISABLE", "1")  # ScoreCAM's per-batch bars would drown the tables


def naive_loop(folder: Path, weights: Path, n: int) -> float:
    """Images/s of the loop most demo apps run: open, transform, classify, one at a time."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from core.nets.model import load_model

    loaded = load_model(weights)
    c = loaded.contract
    tf = transforms.Compose(
        [
            transforms.Resize((c.input_size, c.input_size)),
            transforms.ToTensor(),
            transforms.Normalize(c.mean, c.std),
        ]
    )
    files = sorted(folder.rglob("*.png"))[:n]
    t0 = time.perf_counter()
    with torch.no_grad():
        for f in files:
            x = tf(Image.open(f).convert("RGB")).unsqueeze(0)
            loaded.model(x).softmax(1)
    return len(files) / (time.perf_counter() - t0)


def engine_only(weights: Path, images: np.ndarray) -> dict[str, float]:
    """Inference alone on decoded uint8 images: ONNX Runtime and PyTorch eager, batch 64."""
    from concurrent.futures import ThreadPoolExecutor

    from core.inference.engines import load_engine

    out = {}
    batches = [images[i : i + 64] for i in range(0, len(images), 64)]
    for name, kind, threads, workers in (
        ("ONNX Runtime int8, 1 thread, 2 batches at a time (malaria score)", "onnx-int8", 1, 2),
        ("ONNX Runtime fp32, 2 threads, 1 batch at a time", "onnx", 2, 1),
        ("ONNX Runtime fp32, 1 thread, 2 batches at a time (malaria score)", "onnx", 1, 2),
        ("PyTorch eager channels_last, 2 threads", "torch", 2, 1),
    ):
        engine = load_engine(weights, kind, threads=threads)
        engine(batches[0])  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(engine, batches))
        out[name] = len(images) / (time.perf_counter() - t0)
    return out


def decode_timings(datas: list[bytes], size: int) -> dict[str, float]:
    """Images/s of decoding alone (PNG bytes in memory -> uint8 array), best of 3: Pillow's
    decoder alone, decode_image with Pillow for every image (as before OpenCV took the plain
    PNGs: the baseline), and decode_image as malaria score runs it."""
    import io
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext
    from unittest import mock

    from PIL import Image

    from core.data import images

    def pillow_load(data: bytes) -> None:  # zlib and the row filters, nothing else
        with Image.open(io.BytesIO(data)) as img:
            img.load()

    def decode(data: bytes) -> None:
        images.decode_image(data, size=size)

    pillow_only = mock.patch.object(images, "_plain_png", lambda _: False)
    out = {}
    for name, fn, workers, setting in (
        ("Pillow's PNG decoder alone (Image.load), 1 thread", pillow_load, 1, nullcontext()),
        ("decode_image, Pillow for every image (before), 1 thread", decode, 1, pillow_only),
        ("decode_image (what malaria score runs), 1 thread", decode, 1, nullcontext()),
        ("decode_image, 2 threads", decode, 2, nullcontext()),
    ):
        best = 0.0
        with setting:
            for _ in range(3):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(fn, datas))
                best = max(best, len(datas) / (time.perf_counter() - t0))
        out[name] = best
    return out


def explain_timings(weights: Path, images: np.ndarray) -> list[dict]:
    """ms per image of each CAM method, one image at a time and batched (maps only)."""
    from core.explain.cams import METHODS, explain, explainable
    from core.explain.heatmap import SLOW_METHODS
    from core.nets.model import load_model

    loaded = load_model(weights)
    net = explainable(loaded)
    rows = []
    for method in METHODS:
        # perturbation methods cost the same per image at any batch size (one pass per
        # channel per image); a batch of 4 shows that without minutes of waiting
        big = 4 if method in SLOW_METHODS else 32
        explain(loaded, list(images[:2]), method=method, faithfulness=False, net=net)  # warm-up
        singles = 2 if method in SLOW_METHODS else 16
        t0 = time.perf_counter()
        for im in images[:singles]:
            explain(loaded, [im], method=method, faithfulness=False, net=net)
        one = (time.perf_counter() - t0) * 1000 / singles
        t0 = time.perf_counter()
        explain(
            loaded, list(images[:big]), method=method, faithfulness=False, net=net, batch_size=big
        )
        batched = (time.perf_counter() - t0) * 1000 / big
        rows.append(
            {
                "method": method,
                "ms_batch_1": one,
                "batch": big,
                "ms_batched": batched,
                "speed_up": one / batched,
            }
        )
    return rows


def flag_figures(results_csv: Path, summary_csv: Path) -> dict:
    from core.schema.metrics import flag_performance

    results = pd.read_csv(results_csv)
    infected = set(results.loc[results["label"] == "Parasitized", "case_id"])
    return flag_performance(pd.read_csv(summary_csv), infected)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/nih_cells_dev.zip")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--naive-n", type=int, default=1000)
    p.add_argument("--scoring-only", action="store_true", help="skip the explanation timings")
    args = p.parse_args()
    cache = ROOT / ".cache" / "bench_png"
    folder = png_folder(args.data, cache)
    print(f"machine: {cpu_count()} cores; data: {args.data}")

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        small = subset(folder, 1000, tmp / "subset_1000")
        for engine in ("onnx-int8", "onnx"):  # warm the ONNX caches and the page cache
            score_cli(small, args.weights, tmp, engine)
        naive = naive_loop(folder, args.weights, args.naive_n)
        runs = {
            (engine, n): score_cli(inputs, args.weights, tmp, engine)
            for engine in ("onnx-int8", "onnx")
            for n, inputs in ((1000, small), (0, folder))
        }
        rall = runs["onnx-int8", 0]

        from core.data.images import decode_image

        files = sorted(folder.rglob("*.png"))[:2048]
        datas = [f.read_bytes() for f in files]
        decode = decode_timings(datas, 128)
        images = np.stack([decode_image(d, size=128) for d in datas])
        eng = engine_only(args.weights, images)
        flag = flag_figures(rall["results"], rall["summary"])
        cams = [] if args.scoring_only else explain_timings(args.weights, images[:32])

    print("\n## Batch scoring (end to end: PNG files on disk -> CSV, process start included)")
    print(f"{'path':58s} {'images':>7s} {'img/s':>8s} {'x naive':>8s} {'peak RSS':>9s}")
    print(
        f"{'naive loop (PyTorch, one image at a time)':58s} {args.naive_n:7d} {naive:8.0f} "
        f"{1:8.1f} {'':>9s}"
    )
    for (engine, n), r in runs.items():
        label = f"malaria score --engine {engine}, {'1,000' if n else 'all'} images"
        print(
            f"{label:58s} {r['n']:7d} {r['img_per_s']:8.0f} {r['img_per_s'] / naive:8.1f} "
            f"{r['peak_rss_mb']:7.0f} MB"
        )
    print(f"\n## Decoding alone ({len(datas):,} PNGs in memory -> uint8 arrays, best of 3)")
    print(f"{'':58s} {'images':>7s} {'img/s':>8s} {'x before':>8s}")
    before = decode["decode_image, Pillow for every image (before), 1 thread"]
    for name, rate in decode.items():
        print(f"{name:58s} {len(datas):7d} {rate:8.0f} {rate / before:8.2f}")
    print("\n## Inference alone (decoded 128 px images, batch 64)")
    for name, rate in eng.items():
        print(f"{name:58s} {len(images):7d} {rate:8.0f} {rate / naive:8.1f}")
    layer = ModelContract.from_json(read_card(args.weights)["contract"]).target_layer
    if cams:
        print(f"\n## Explanations (ms per image, map only, the default layer {layer})")
        print(f"{'method':14s} {'batch 1':>9s} {'batched':>9s} {'batch':>6s} {'speed-up':>9s}")
    for r in cams:
        print(
            f"{r['method']:14s} {r['ms_batch_1']:9.1f} {r['ms_batched']:9.1f} {r['batch']:6d} "
            f"{r['speed_up']:8.1f}x"
        )
    print("\n## Screening flag on the development patients (all of them, training ones included)")
    print(
        f"infected patients flagged: {flag['sensitivity']:.3f} ({flag['infected_patients']}); "
        f"healthy patients not flagged: {flag['specificity']:.3f} ({flag['healthy_patients']})"
    )
    print(f"missed: {flag['missed']}; false alarms: {flag['false_alarms']}")


if __name__ == "__main__":
    main()
