"""The streaming scoring pipeline: sources -> batches of result rows, nothing lost.

Decoding runs in worker threads while the model runs on the previous batch; a file that cannot
be read or decoded becomes an error row, never a stopped run; files with the same bytes are
counted once. Results go to the result store batch by batch (core.inference.store), so an
interrupted run keeps what it scored.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from core.data.images import ImageError, decode_image
from core.data.sources import (
    ImageSource,
    Upload,
    read_bytes,
    sources_from_uploads,
)
from core.inference.engines import Engine, load_engine
from core.inference.store import ResultStore
from core.schema.contract import (
    DEFAULT_WEIGHTS,
)
from core.schema.files import cpu_count
from core.schema.labels import ZIP_SEP, case_id, label_from_path, predicted_class
from core.schema.results import RESULT_COLUMNS

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class _Decoded:
    sources: tuple[ImageSource, ...]
    images: np.ndarray  # uint8 (k, S, S, 3) for the sources that decoded
    ok: tuple[int, ...]  # index into sources of each decoded image
    errors: dict[int, str]
    digests: dict[int, str]  # sha256 of the bytes of each source that could be read


def _decode_batch(sources: Sequence[ImageSource], size: int) -> _Decoded:
    images, ok, errors, digests = [], [], {}, {}
    for i, src in enumerate(sources):
        try:
            data = read_bytes(src)
            digests[i] = hashlib.sha256(data).hexdigest()
            images.append(decode_image(data, size=size))
            ok.append(i)
        except ImageError as exc:
            errors[i] = str(exc)
    arr = np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)
    return _Decoded(tuple(sources), arr, tuple(ok), errors, digests)


def _rows(
    decoded: _Decoded, prob: np.ndarray, quality: Sequence[str], threshold: float
) -> list[dict]:
    rows = []
    probs = dict(zip(decoded.ok, zip(prob.tolist(), quality)))
    for i, src in enumerate(decoded.sources):
        p, q = probs.get(i, (None, None))
        rows.append(
            {
                "path": src.path,
                "case_id": case_id(src.name),
                "label": label_from_path(src.path),
                "prob_parasitized": p,
                "prediction": None if p is None else predicted_class(p, threshold),
                "quality": q,
                "error": decoded.errors.get(i),
                "duplicate_of": None,
                "sha256": decoded.digests.get(i),
            }
        )
    return rows


def mark_duplicates(rows: list[dict], seen: dict[str, str]) -> None:
    """Rows whose file has the same bytes as one already in ``seen`` (sha256 -> path, updated
    with the new files) become duplicates of it, in place: ``duplicate_of`` names the first,
    and they keep no probability or prediction, so the file is counted once."""
    for row in rows:
        digest = row.get("sha256")
        if digest is None or row["error"] is not None:
            continue
        first = seen.setdefault(digest, row["path"])
        if first != row["path"]:
            row.update(duplicate_of=first, prob_parasitized=None, prediction=None)


def score_batch(sources: Sequence[ImageSource], engine: Engine, threshold: float) -> list[dict]:
    """Read, decode and score one batch: one row per source (RESULT_COLUMNS and ``sha256``),
    in order, duplicates not yet marked (:func:`mark_duplicates`). What runs in each of
    iter_scored's threads, and in each actor of a cluster (core.inference.cluster)."""
    decoded = _decode_batch(sources, engine.contract.input_size)
    if not decoded.ok:
        return _rows(decoded, np.empty(0, np.float32), [], threshold)
    prob, features = engine.score(decoded.images)
    return _rows(decoded, prob, engine.gate(decoded.images, features), threshold)


def iter_scored(
    sources: Iterable[ImageSource],
    engine: Engine,
    *,
    threshold: float | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    seen: dict[str, str] | None = None,
) -> Iterator[list[dict]]:
    """Score ``sources`` in batches; yields one list of result rows (RESULT_COLUMNS and the
    ``sha256`` of the file) per batch.

    Each of ``workers`` threads decodes a batch and runs the model on it (both release the
    GIL), so decoding and inference overlap with no hand-off; at most two batches per worker
    are in flight, so memory stays flat whatever the number of images. Batches come out in
    input order. A file that cannot be read or decoded becomes a row with ``error`` set and no
    probability; it never stops the run. A file with the same bytes as an earlier one (or one
    in ``seen``, sha256 -> path) is marked a duplicate of it (:func:`mark_duplicates`).
    """
    threshold = engine.contract.threshold if threshold is None else threshold
    seen = {} if seen is None else seen
    workers = workers or cpu_count()
    it = iter(sources)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque = deque()
    # One batch per core already: BLAS threads under the quality gate's matrix products would
    # oversubscribe the cores (measured: scoring at 0.69x instead of 0.95x; bench.gate).
    blas = threadpool_limits(limits=1, user_api="blas")
    try:
        while True:
            while len(pending) < 2 * workers:
                chunk = tuple(islice(it, batch_size))
                if not chunk:
                    break
                pending.append(pool.submit(score_batch, chunk, engine, threshold))
            if not pending:
                return
            rows = pending.popleft().result()
            mark_duplicates(rows, seen)  # here, in input order: the first copy is the one kept
            yield rows
    finally:  # also on Ctrl-C or an abandoned generator: drop queued batches, don't wait
        pool.shutdown(wait=True, cancel_futures=True)
        blas.restore_original_limits()


# What turns sources into batches of result rows, in input order, duplicates marked against
# ``seen``, called as iter_scored(sources, engine, threshold=, batch_size=, seen=): iter_scored
# on this machine, core.inference.cluster.RayScorer on a Ray cluster.
BatchScorer = Callable[..., Iterator[list[dict]]]


def score_sources(
    sources: Sequence[ImageSource],
    engine: Engine,
    *,
    store: ResultStore | None = None,
    run_id: str | None = None,
    threshold: float | None = None,
    progress: Progress | None = None,
    collect: bool = True,
    batch_size: int = 64,
    scorer: BatchScorer = iter_scored,
) -> pd.DataFrame | None:
    """Score ``sources`` with ``scorer``, saving each batch to ``store`` under ``run_id`` when
    given.

    Returns a DataFrame with RESULT_COLUMNS (one row per source, in input order) when
    ``collect``, else None (the store holds the results). ``progress(done, total)`` is called
    after each batch. Files with the same bytes as one scored before (in this call or, for a
    resumed run, already in the store) are duplicate rows.
    """
    rows: list[dict] = []
    done, total = 0, len(sources)
    seen = store.digests(run_id) if store is not None and run_id is not None else {}
    for batch in scorer(sources, engine, threshold=threshold, batch_size=batch_size, seen=seen):
        if store is not None and run_id is not None:
            store.add_results(run_id, batch)
        if collect:
            rows.extend(batch)
        done += len(batch)
        if progress:
            progress(done, total)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS)) if collect else None


def upload_run(
    items: Iterable[Upload],
    engine: Engine,
    store: ResultStore | None,
    *,
    threshold: float | None = None,
    kind: str,
    page: str | None = None,
) -> tuple[list[ImageSource], str | None]:
    """The sources of an upload and, with a ``store``, the new run (of ``kind``, listed by
    ``page``: ResultStore.new_run) they go to. Raises ValueError if the upload holds no image."""
    sources = sources_from_uploads(items)
    if not sources:
        raise ValueError(
            "no images found in the upload (accepted: PNG, JPEG, TIFF, BMP, WebP, and zips of them)"
        )
    run_id = None
    if store is not None:
        run_id = store.new_run(
            inputs=sorted({s.path.split(ZIP_SEP)[0] for s in sources}),
            weights=str(engine.folder),
            weights_sha256=engine.sha256,
            threshold=engine.contract.threshold if threshold is None else threshold,
            engine=engine.name,
            kind=kind,
            page=page,
        )
        store.set_total(run_id, len(sources))
    return sources, run_id


def score_uploads(
    items: Iterable[Upload],
    *,
    weights: Path | str = DEFAULT_WEIGHTS,
    engine: Engine | None = None,
    store: ResultStore | None = None,
    threshold: float | None = None,
    progress: Progress | None = None,
    page: str | None = None,
) -> tuple[pd.DataFrame, str | None]:
    """Score uploaded files given as (name, bytes or the file holding them); zips are opened
    and their images scored. The run in ``store`` is listed by ``page`` (default: the Score
    page's; ResultStore.new_run).

    Returns (results DataFrame, run id in ``store`` or None). Raises ValueError if the upload
    holds no image.
    """
    engine = engine or load_engine(weights)
    sources, run_id = upload_run(
        items, engine, store, threshold=threshold, kind="upload", page=page
    )
    df = score_sources(
        sources, engine, store=store, run_id=run_id, threshold=threshold, progress=progress
    )
    if store is not None and run_id is not None:
        store.finish(run_id)
    return df, run_id
