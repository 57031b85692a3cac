"""Batch scoring: thousands of cells per minute on a CPU, per-patient parasitemia, nothing lost.

    malaria score INPUT... --out results.csv [--summary summary.csv] [--weights DIR]
                  [--threshold T] [--engine onnx-int8|onnx|torch] [--group-by case|folder]
                  [--resume RUN_ID] [--store results.sqlite] [--follow-links]
                  [--ray [local|auto|HOST:PORT] [--ray-actors N]]

INPUT is image files, folders (searched recursively) or zips (nested zips one level deep).
Decoding runs in worker threads while the model runs on the previous batch; results are
committed to the result store batch by batch, so an interrupted run keeps what it scored and
``--resume RUN_ID`` scores only what is missing. ``--ray`` runs the same batches on a Ray
cluster (core.inference.cluster).

Exit status: 0 every image scored; 1 some images gave error rows (all others are scored);
2 bad arguments, missing inputs, unusable weights, an unwritable output, an unusable result
store, or no image scored at all; 130 interrupted (results so far are kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from core.cli.options import (
    add_band,
    add_follow_links,
    add_group_by,
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
    positive_int,
    resumed,
    start_run,
)
from core.data.sources import iter_sources, unique_paths
from core.inference import cluster
from core.inference.engines import ENGINES, load_engine
from core.inference.pipeline import BatchScorer, iter_scored, score_sources
from core.inference.store import ResultStore, StoreError
from core.schema.contract import WeightsError
from core.schema.export import OutputError, write_csv
from core.schema.metrics import parasitemia_summary
from core.schema.results import RESULT_COLUMNS, REVIEW_BAND, review


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="image files, folders or zips")
    add_outputs(
        p, out="CSV of per-image results", summary="CSV of per-case (or per-folder) parasitemia"
    )
    add_weights(p)
    add_threshold(p)
    add_band(
        p,
        help="half-width of the review band around the threshold: scored cells "
        "whose P(Parasitized) lies within it are marked 'uncertain' in the "
        f"review column, for a human (default {REVIEW_BAND})",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        help="default: the model's (onnx-int8 where its card records that int8 "
        "passed the agreement check on the test patients, else onnx)",
    )
    add_group_by(p)
    add_resume(p)
    add_store(p)
    add_follow_links(
        p,
        help="score images that symbolic links in an input folder point to outside "
        "it (DVC, git-annex); by default each such link is an error row",
    )
    p.add_argument("--name", help="a name for the run (the dashboard lists runs by it)")
    p.add_argument("--sample", help="free text: the sample, slide or patient scored")
    p.add_argument("--operator", help="free text: who ran it")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="score on a Ray cluster (an optional extra: requirements-cluster.lock): local "
        "(the default) starts one on this machine for the run; auto, HOST:PORT or "
        "ray://HOST:PORT joins a running one, whose machines see INPUT at the same paths",
    )
    p.add_argument(
        "--ray-actors",
        type=positive_int,
        help="with --ray: scoring actors, one CPU each (default: one per CPU of the cluster)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64)
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except StoreError as exc:  # locked, corrupt, read-only or full: one line, not a traceback
        return fail(str(exc))


def _run(args: argparse.Namespace) -> int:
    if args.ray is not None:  # before anything is scored or stored
        try:
            cluster.check_address(args.ray)
            cluster.require_ray()
        except (ValueError, cluster.ClusterError) as exc:
            return fail(str(exc))
    if not 0 <= args.band <= 0.5:
        return fail(f"--band must be in [0, 0.5], got {args.band}")
    try:
        check_threshold(args.threshold)
        check_outputs(args.out, args.summary)
    except (ValueError, OutputError) as exc:
        return fail(str(exc))
    scorer: BatchScorer = iter_scored
    on = ExitStack()  # with --ray: the cluster, joined before anything is stored
    if args.ray is not None:
        try:
            where = on.enter_context(cluster.connect(args.ray))
        except cluster.ClusterError as exc:
            return fail(str(exc))
        print(f"scoring on a {where}", file=sys.stderr)
        scorer = cluster.RayScorer(actors=args.ray_actors)
    with on, ResultStore(args.store) as store:
        try:
            if args.resume:
                info = store.run(args.resume)
                inputs, threshold = list(info.inputs), info.threshold
                engine = resumed(info, engine=args.engine)
                run_id = info.run_id
            else:
                if not args.inputs:
                    return fail("give at least one INPUT (or --resume RUN_ID)")
                inputs = [str(Path(i).resolve()) for i in args.inputs]
                engine = load_engine(args.weights, args.engine)
                threshold = engine.contract.threshold if args.threshold is None else args.threshold
                run_id = None
            screening = engine.weights.screening  # before any work: a card without one fails
            sources = unique_paths(iter_sources(inputs, follow_links=args.follow_links))
        except (FileNotFoundError, WeightsError, ValueError, StoreError) as exc:
            return fail(str(exc))
        if run_id is None:
            run_id = start_run(
                store,
                engine,
                inputs=inputs,
                threshold=threshold,
                kind="files",
                name=args.name,
                sample=args.sample,
                operator=args.operator,
            )
        store.set_total(run_id, len(sources))
        done = store.done_paths(run_id)
        todo = [s for s in sources if s.path not in done]
        print(
            f"run {run_id}: {len(sources)} images, {len(done)} already stored, "
            f"{len(todo)} to score ({engine.name} engine); quality gate: "
            f"{engine.gate.describe()}",
            file=sys.stderr,
        )
        bar = tqdm(total=len(todo), unit="img", disable=args.no_progress, smoothing=0.1)
        try:
            score_sources(
                todo,
                engine,
                store=store,
                run_id=run_id,
                threshold=threshold,
                collect=False,
                batch_size=args.batch_size,
                progress=lambda d, _t: bar.update(d - bar.n),
                scorer=scorer,
            )
        except cluster.ClusterError as exc:
            bar.close()
            return fail(f"{exc}; results so far are kept: continue with --resume {run_id}")
        except KeyboardInterrupt:
            bar.close()
            return interrupted(store.path, run_id)
        bar.close()
        store.finish(run_id)

        def reviewed() -> Iterator[pd.DataFrame]:
            for chunk in store.iter_results(run_id):
                yield chunk.assign(review=review(chunk, threshold=threshold, band=args.band))

        if args.out:
            try:
                write_csv(args.out, reviewed(), columns=(*RESULT_COLUMNS, "review"))
            except OSError as exc:
                return fail(
                    f"cannot write {args.out} ({exc}); the results are kept in "
                    f"{store.path}: export them again with --resume {run_id} --out FILE"
                )
        summary = parasitemia_summary(reviewed(), group_by=args.group_by, screening=screening)
        n_dup = sum(int(c["duplicate_of"].notna().sum()) for c in store.iter_results(run_id))
    with pd.option_context("display.max_rows", 200, "display.width", 140):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.summary:
        try:
            write_csv(args.summary, summary)
        except OSError as exc:
            return fail(f"cannot write {args.summary} ({exc})")
    n_err, n_scored = int(summary["errors"].sum()), int(summary["scored"].sum())
    n_out, n_unsure = int(summary["not_counted"].sum()), int(summary["uncertain"].sum())
    print(
        f"{n_scored} scored and counted, {n_err} errors, {n_out} not counted (failed the "
        f"quality gate), {n_unsure} uncertain (P(Parasitized) within {args.band:g} of "
        f"{threshold:g}); the last two are listed for review in the review column"
        + (f"; {n_dup} duplicates (same bytes as another file: counted once)" if n_dup else "")
        + f"; run {run_id}"
        + (f"; results in {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    if not n_scored and not n_out:
        return fail("no image could be scored; the error column says why for each input")
    return 1 if n_err else 0
