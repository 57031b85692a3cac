"""``malaria smear FIELD...``: find the red cells of thin-smear fields of view (files, folders,
zips), score each as Parasitized or Uninfected and report parasitemia per field and folder
(core.smear.fields).

Exit status: 0 all fields scored, 1 some error rows, 2 bad input, weights, output or store, or
nothing scored; 130 interrupted (use --resume).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from core.cli.options import (
    add_follow_links,
    add_outputs,
    add_progress,
    add_resume,
    add_store,
    add_threshold,
    add_weights,
    check_outputs,
    check_threshold,
    fail,
    interrupted,
    resumed,
    start_run,
)
from core.data.sources import iter_sources, read_image, unique_paths
from core.inference.engines import load_engine
from core.inference.store import ResultStore, StoreError
from core.schema.contract import WeightsError
from core.schema.export import write_csv
from core.smear.fields import (
    counted_cells,
    domain_note,
    draw_overlay,
    field_summary,
    is_red_cell,
    iter_fields,
    smear_totals,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="field images, folders or zips")
    add_outputs(
        p,
        out="CSV with one row per object found",
        summary="CSV of parasitemia per field and per folder",
    )
    p.add_argument("--overlays", type=Path, help="folder for each field with its cells outlined")
    add_weights(p)
    add_threshold(p, help="decision threshold on P(Parasitized)")
    p.add_argument(
        "--stain-norm",
        action="store_true",
        help="match each field's colours to the NIH training cells' statistics "
        "before scoring (off by default: on the tuning fields it called 4x "
        "more uninfected cells parasitized)",
    )
    add_resume(p, what="fields")
    add_store(p)
    add_follow_links(
        p, help="read fields that symbolic links in an input folder point to outside it"
    )
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except StoreError as exc:  # one line, as malaria score says it
        return fail(str(exc))


def overlay_name(image: str) -> str:
    """The overlay's file name for a field's path: readable, and never the same for two paths
    (``x_y.JPG`` and ``x/y.JPG`` differ by the hash of the whole path)."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in image.strip("/"))
    return f"{readable[-120:]}-{hashlib.sha256(image.encode()).hexdigest()[:10]}.png"


def _run(args: argparse.Namespace) -> int:
    try:
        check_threshold(args.threshold)
        check_outputs(args.out, args.summary)
        if args.overlays:
            args.overlays.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:  # OutputError is a ValueError
        return fail(str(exc))
    with ResultStore(args.store) as store:
        try:
            if args.resume:
                info = store.run(args.resume)
                if not info.kind.startswith("smear"):
                    raise ValueError(
                        f"run {info.run_id} is not a smear run; resume it with malaria score"
                    )
                inputs, threshold = list(info.inputs), info.threshold
                engine = resumed(info, threads=2)
                run_id = info.run_id
            else:
                if not args.inputs:
                    return fail("give at least one INPUT (or --resume RUN_ID)")
                inputs = [str(Path(i).resolve()) for i in args.inputs]
                engine = load_engine(args.weights, threads=2)
                threshold = engine.contract.threshold if args.threshold is None else args.threshold
                run_id = None
            screening = engine.weights.screening  # before any work: a card without one fails
            sources = unique_paths(iter_sources(inputs, follow_links=args.follow_links))
        except (FileNotFoundError, WeightsError, ValueError) as exc:
            return fail(str(exc))
        if run_id is None:
            run_id = start_run(store, engine, inputs=inputs, threshold=threshold, kind="smear")
        store.set_total(run_id, len(sources))
        done = store.smear_done(run_id)
        todo = [s for s in sources if s.path not in done]
        print(
            f"run {run_id}: {len(sources)} fields, {len(done)} already stored, "
            f"{len(todo)} to segment and score",
            file=sys.stderr,
        )
        seconds = []
        try:
            for src, result, rows in tqdm(
                iter_fields(todo, engine, threshold=threshold, stain_norm=args.stain_norm),
                total=len(todo),
                unit="field",
                disable=args.no_progress,
            ):
                store.add_smear_rows(run_id, rows)
                if result is None:
                    continue
                seconds.append(result.seconds)
                if args.overlays:
                    image = read_image(src)
                    overlay = draw_overlay(image, result.segmentation, result.prob)
                    Image.fromarray(overlay).save(args.overlays / overlay_name(src.path))
        except KeyboardInterrupt:
            return interrupted(store.path, run_id)
        store.finish(run_id)
        cells = store.smear_rows(run_id)
    try:
        if args.out:
            write_csv(args.out, cells)
        summary = field_summary(cells, adapted=engine.weights.adapted, screening=screening)
        if args.summary:
            write_csv(args.summary, summary)
    except OSError as exc:
        return fail(
            f"cannot write the CSV ({exc}); the results are kept in the store: "
            f"export them again with --resume {run_id} --out FILE"
        )
    adapted = engine.weights.adapted
    note = domain_note(smear_totals(cells, adapted=adapted), adapted=adapted)
    if note is not None:  # first: whether these fields are another lab's than the model's
        print(note[1], file=sys.stderr)
    folders = summary[summary["level"] == "folder"]
    with pd.option_context("display.max_rows", 200, "display.width", 140):
        print(
            folders.drop(columns="level").to_string(index=False, float_format=lambda v: f"{v:.3f}")
        )
    n_err = int(cells["error"].notna().sum())
    n_cells = int(is_red_cell(cells).sum())
    n_counted = int(counted_cells(cells).sum())
    reviewed = summary.loc[(summary["level"] == "field") & (summary["review"] != ""), "review"]
    per_field = f"; {1000 * np.mean(seconds):.0f} ms per field" if seconds else ""
    print(
        f"{n_cells} red cells in {cells['image'].nunique()} fields, {n_counted} counted (the "
        f"others cut by the edge, fragments or clumps: see the quality column), "
        f"{n_err} error rows"
        + "".join(f"; {n} fields for {why}" for why, n in reviewed.value_counts().items())
        + f"; run {run_id}{per_field}",
        file=sys.stderr,
    )
    if not n_cells:
        return fail("no red cell found in any field; the error column says why")
    return 1 if n_err else 0
