"""Option groups and messages that several commands share, written once.

Exit codes are part of the contract of every command: 0 ok, 1 some inputs failed (error rows;
everything else was done), 2 bad arguments, input, weights, output or store, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.inference.engines import Engine, load_engine
from core.inference.store import ResultStore, RunInfo
from core.schema.contract import DEFAULT_WEIGHTS, WeightsError
from core.schema.export import OutputError, check_output
from core.schema.results import REVIEW_BAND

OK, FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130


def fail(message: str) -> int:
    """Print ``message`` as one line on stderr; the exit code for bad input."""
    print(f"error: {message}", file=sys.stderr)
    return BAD_INPUT


def interrupted(store_path: Path, run_id: str) -> int:
    """Say where an interrupted run's results are and how to go on; the exit code."""
    print(
        f"\ninterrupted: results so far are kept in {store_path}; continue with --resume {run_id}",
        file=sys.stderr,
    )
    return INTERRUPTED


def _at_least(low: int):
    def parse(value: str) -> int:
        n = int(value)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n

    return parse


positive_int = _at_least(1)
count = _at_least(0)  # how many of something, none allowed


def add_weights(p: argparse.ArgumentParser, *, help: str = "model folder") -> None:
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help=help)


def add_annotated_fields(p: argparse.ArgumentParser) -> None:
    """--data (a folder in smear_dev's layout), --weights and --blocks, for the checks on
    annotated fields."""
    p.add_argument(
        "--data", type=Path, required=True, help="folder with images/ and annotations.json"
    )
    add_weights(p)
    p.add_argument(
        "--blocks",
        type=int,
        default=6,
        help="characters of a field's name that name its block of shots (figures per block)",
    )


def add_threshold(p: argparse.ArgumentParser, *, help: str | None = None) -> None:
    p.add_argument(
        "--threshold",
        type=float,
        help=help or "decision threshold on P(Parasitized); default: the model's",
    )


def add_band(p: argparse.ArgumentParser, *, help: str = "review band half-width") -> None:
    p.add_argument("--band", type=float, default=REVIEW_BAND, help=help)


def add_group_by(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-by", choices=("case", "folder"), default="case")


def add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        type=Path,
        help="result store (SQLite); default $MALARIA_STORE or runs/results.sqlite",
    )


def add_resume(p: argparse.ArgumentParser, *, what: str = "images") -> None:
    p.add_argument("--resume", metavar="RUN_ID", help=f"score only the {what} RUN_ID is missing")


def add_outputs(p: argparse.ArgumentParser, *, out: str, summary: str) -> None:
    """--out and --summary: the two CSVs of a scoring run."""
    p.add_argument("--out", type=Path, help=out)
    p.add_argument("--summary", type=Path, help=summary)


def add_follow_links(p: argparse.ArgumentParser, *, help: str) -> None:
    p.add_argument("--follow-links", action="store_true", help=help)


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_threshold(threshold: float | None) -> None:
    """Raises ValueError for a threshold outside [0, 1]."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")


def check_outputs(out: Path | None, summary: Path | None) -> None:
    """Before any work: a typo in --out must not cost the whole run. Raises OutputError."""
    for path in (out, summary):
        if path:
            check_output(path)
    if out and summary and out.resolve() == summary.resolve():
        raise OutputError("--out and --summary name the same file")


def resumed(info: RunInfo, *, engine: str | None = None, threads: int | None = None) -> Engine:
    """The engine a stored run goes on with: its own weights (and engine, unless ``engine``).
    Raises WeightsError if the weights at that path are no longer those it was scored with."""
    loaded = load_engine(info.weights, engine or info.engine, threads=threads)
    if loaded.sha256 != info.weights_sha256:
        raise WeightsError(
            f"run {info.run_id} was scored with weights {info.weights_sha256[:12]}..., "
            f"{info.weights} now holds {loaded.sha256[:12]}...; start a new run instead"
        )
    return loaded


def start_run(
    store: ResultStore,
    engine: Engine,
    *,
    inputs: Sequence[str],
    threshold: float,
    kind: str,
    **fields: str | None,
) -> str:
    """A new run of ``kind`` in ``store`` for ``inputs`` scored with ``engine`` at ``threshold``
    (``fields``: its name, sample and operator); its run id."""
    return store.new_run(
        inputs=inputs,
        weights=str(engine.folder.resolve()),
        weights_sha256=engine.sha256,
        threshold=threshold,
        engine=engine.name,
        kind=kind,
        **fields,
    )


def print_table(columns: dict[str, dict], keys: Sequence[str], *, head: str = "") -> None:
    """Figures as a table on stdout: one row per key, one column per entry of ``columns``
    (e.g. a block of shots), integers as they are and the rest with 3 decimals."""
    width = max(len(k) for k in keys) + 2
    print(f"{head:{width}}" + "".join(f"{c:>9}" for c in columns))
    for k in keys:
        vals = [columns[c][k] for c in columns]
        print(
            f"{k:{width}}"
            + "".join(f"{v:>9}" if isinstance(v, int) else f"{v:>9.3f}" for v in vals)
        )
