"""The local result store: every scoring run and every cell result, in one SQLite file.

Results are committed batch by batch as they are computed, so an interrupted run keeps
everything scored so far and can be resumed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from core.schema.export import write_csv
from core.schema.files import REPO_ROOT
from core.schema.labels import PARASITIZED, UNINFECTED
from core.schema.results import RESULT_COLUMNS, SMEAR_COLUMNS, counted_sql

DEFAULT_STORE = REPO_ROOT / "runs" / "results.sqlite"


def default_store_path() -> Path:
    """``$MALARIA_STORE`` if set, else ``runs/results.sqlite`` in the repository."""
    return Path(os.environ.get("MALARIA_STORE") or DEFAULT_STORE)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT,
    inputs TEXT NOT NULL,          -- JSON list of what was asked to be scored
    weights TEXT NOT NULL,         -- model folder
    weights_sha256 TEXT NOT NULL,
    threshold REAL NOT NULL,
    engine TEXT NOT NULL,
    kind TEXT NOT NULL,            -- "files" (paths on this disk) or "upload" (names only)
    total INTEGER                  -- images found when the run (re)started
);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    case_id TEXT NOT NULL,
    label TEXT,
    prob_parasitized REAL,
    prediction TEXT,
    quality TEXT,
    error TEXT,
    PRIMARY KEY (run_id, path)
);
CREATE TABLE IF NOT EXISTS smear_cells (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    image TEXT NOT NULL,           -- the field's path (or upload name)
    n INTEGER NOT NULL,            -- the object's index in its field
    x INTEGER, y INTEGER, w INTEGER, h INTEGER, area INTEGER, edge INTEGER,
    object TEXT,                   -- "red cell", or why the object is not one
    prob_parasitized REAL,
    prediction TEXT,
    error TEXT,
    PRIMARY KEY (run_id, image, n)
);
"""
# Columns added after the tables above were first released, with their SQL types: a store
# written before them gets them when it is opened (its rows keep NULL there).
_ADDED_COLUMNS = {
    # page: the dashboard page whose runs list it (PAGES); NULL in runs stored before it
    "runs": {"name": "TEXT", "sample": "TEXT", "operator": "TEXT", "page": "TEXT"},
    # duplicate_of: the path of the file with the same bytes scored first in the run (this row
    # has no probability of its own and is counted once); sha256: of the file's bytes
    "results": {"quality": "TEXT", "duplicate_of": "TEXT", "sha256": "TEXT"},
    # quality: OK, or why the object is not counted (NULL in smear runs stored before it);
    # known: the quality gate's verdict on a red cell (NULL before it: quality said it then)
    "smear_cells": {"quality": "TEXT", "known": "INTEGER"},
}
RUN_FIELDS = ("name", "sample", "operator")  # free text an analyst gives a run
SCORE, EVALUATE, SMEAR = PAGES = ("score", "evaluate", "smear")  # the pages that make runs


def _page_sql(table: str = "") -> str:
    """A run's page in SQL (``table``: the runs table's alias with its dot): as stored, or
    for a run stored before pages were (NULL) its kind's page: a smear run the Smear page's,
    any other the Score page's (as the command line's runs)."""
    return (
        f"COALESCE({table}page, "
        f"CASE WHEN {table}kind LIKE 'smear%' THEN '{SMEAR}' ELSE '{SCORE}' END)"
    )


LOCK_TIMEOUT = 30.0  # seconds to wait for another process's write before giving up


class StoreError(LookupError):
    """A run that is not in the store, or a store that cannot be used (locked by another
    process, corrupt, read-only, disk full); the message says which, in one line."""


def _fault(path: Path, exc: Exception) -> StoreError:
    """The StoreError for a SQLite (or file system) failure on the store at ``path``."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        why = (
            f"is locked by another process (waited {LOCK_TIMEOUT:.0f} s); try again when "
            "that process has finished"
        )
    elif "readonly" in text or "read-only" in text or "permission" in text:
        why = "cannot be written (read-only file or folder); use --store or $MALARIA_STORE"
    elif "full" in text:
        why = "cannot grow: the disk is full; free space or use --store elsewhere"
    elif "malformed" in text or "not a database" in text or "corrupt" in text:
        why = f"is corrupt ({exc}); move it aside (a new store is then created) or restore a copy"
    else:
        why = f"cannot be used ({exc})"
    return StoreError(f"result store {path} {why}")


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file ``path`` names now; None if it names none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    started: str
    finished: str | None
    inputs: tuple[str, ...]
    weights: str
    weights_sha256: str
    threshold: float
    engine: str
    kind: str
    total: int | None
    name: str | None = None
    sample: str | None = None
    operator: str | None = None
    page: str = SCORE  # the page that made it and lists it (PAGES)

    @property
    def title(self) -> str:
        """The run's name, or a summary of its inputs when it has none."""
        return self.name or inputs_summary(self.inputs)


def inputs_summary(inputs: Sequence[str], *, limit: int = 3) -> str:
    """What a run was asked to score, in a few words: the file, zip or folder names (not their
    full paths), an uploaded folder as ``name/ (n files)``, at most ``limit`` of them and then
    how many more."""
    groups: dict[str, int] = {}
    for entry in inputs:
        parts = Path(entry).parts
        if Path(entry).is_absolute() or len(parts) < 2:  # a path given on the command line
            groups[Path(entry).name or entry] = 0
        else:  # a file of an uploaded folder: count it under the folder
            key = parts[0] + "/"
            groups[key] = groups.get(key, 0) + 1
    names = [f"{g} ({n:,} file{'s' * (n > 1)})" if n else g for g, n in groups.items()]
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit:,} more"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _locked(method):
    """One thread at a time on the connection; SQLite failures become one-line StoreErrors."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            except (sqlite3.Error, pd.errors.DatabaseError) as exc:
                raise _fault(self.path, exc) from None

    return wrapper


def _writes(method):
    """A method that commits: :func:`_locked`, and first the check that the store's path still
    names the file opened (:meth:`ResultStore.check_file`), so that nothing is written to a
    store deleted, moved or replaced under it (its ``-wal`` would be applied to the new file)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            self.check_file()
            return method(self, *args, **kwargs)

    return _locked(wrapper)


class ResultStore:
    """A SQLite result store; safe to open from several processes (WAL journal) and to share
    between threads (one lock around the connection, as the dashboard's sessions do)."""

    def __init__(self, path: Path | str | None = None) -> None:
        """Open (or create) the store and check its integrity.

        Raises StoreError if it is locked, corrupt, read-only or on a full disk."""
        self.path = Path(path) if path else default_store_path()
        self._lock = threading.RLock()
        before = _identity(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise _fault(self.path, exc) from None
        self._open()
        # The file SQLite opened: named by the path both before and after it was opened (the
        # connection's own descriptor is not reachable from Python, and a second descriptor of
        # ours would, when closed, drop SQLite's POSIX locks on the file).
        self._file = _identity(self.path)
        if before is not None and before != self._file:
            self._db.close()
            raise StoreError(f"result store {self.path} was replaced while it was being opened")

    @_locked
    def _open(self) -> None:
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # a store damaged mid-file must not take new results (it may lose them)
            problems = [r for (r,) in self._db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(
                    "database disk image is malformed: " + "; ".join(problems[:3])
                )
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.Error:
            self._db.close()
            raise

    def _migrate(self) -> None:
        """Add the columns of _ADDED_COLUMNS that this store lacks (it predates them)."""
        for table, columns in _ADDED_COLUMNS.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            with self._db:
                for column, kind in columns.items():
                    if column not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def check_file(self) -> None:
        """Raises StoreError if the store's path no longer names the file this store opened:
        it was deleted, moved or replaced (a backup restored over it) while open. Nothing is
        written then; the message says how to go on."""
        now = _identity(self.path)
        if now == self._file:
            return
        what = "deleted or moved" if now is None else "replaced by another file"
        # Into the file opened (moved: where it is now), so that the -wal left at the path is
        # empty: SQLite neither checkpoints nor deletes the -wal of a moved file on close, and
        # whoever opens the path next would apply it to the file there. It fails only where
        # another process reads that -wal already.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raise StoreError(
            f"result store {self.path} was {what} while this process had it open; nothing more "
            "is written to it (move or restore a store only with nothing open, together with its "
            "-wal and -shm files: docs/scoring.md)"
        )

    @_locked
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_writes
    def new_run(
        self,
        *,
        inputs: Sequence[str],
        weights: str,
        weights_sha256: str,
        threshold: float,
        engine: str,
        kind: str = "files",
        name: str | None = None,
        sample: str | None = None,
        operator: str | None = None,
        page: str | None = None,
    ) -> str:
        """A new run; its id. ``page`` (one of PAGES) lists it: by default the Smear page
        for a smear ``kind``, else the Score page. Raises ValueError for another page."""
        page = page or (SMEAR if kind.startswith("smear") else SCORE)
        if page not in PAGES:
            raise ValueError(f"a run's page is one of {', '.join(PAGES)}, not {page!r}")
        run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with self._db:
            self._db.execute(
                "INSERT INTO runs (run_id, started, inputs, weights, weights_sha256, threshold, "
                "engine, kind, page) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    _now(),
                    json.dumps(list(inputs)),
                    weights,
                    weights_sha256,
                    float(threshold),
                    engine,
                    kind,
                    page,
                ),
            )
        self.describe_run(run_id, name=name, sample=sample, operator=operator)
        return run_id

    @_writes
    def describe_run(
        self,
        run_id: str,
        *,
        name: str | None = None,
        sample: str | None = None,
        operator: str | None = None,
    ) -> None:
        """Set a run's name, sample and operator (free text; blank clears a field)."""
        values = [(v or "").strip() or None for v in (name, sample, operator)]
        with self._db:
            self._db.execute(
                f"UPDATE runs SET {', '.join(f'{f} = ?' for f in RUN_FIELDS)} WHERE run_id = ?",
                (*values, run_id),
            )

    @_writes
    def set_threshold(self, run_id: str, threshold: float) -> None:
        """Make ``threshold`` the run's decision threshold and re-label its stored results with
        it (ties go to Parasitized, as ``core.schema.labels.predicted_class``), in one transaction.

        Raises StoreError for an unknown run, ValueError for a threshold outside [0, 1]."""
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.run(run_id)
        with self._db:
            self._db.execute(
                "UPDATE runs SET threshold = ? WHERE run_id = ?", (float(threshold), run_id)
            )
            self._db.execute(
                "UPDATE results SET prediction = CASE WHEN prob_parasitized >= ? THEN ? ELSE ? "
                "END WHERE run_id = ? AND prob_parasitized IS NOT NULL",
                (float(threshold), PARASITIZED, UNINFECTED, run_id),
            )

    @_writes
    def delete_run(self, run_id: str) -> None:
        """Delete a run and all its results. Raises StoreError for an unknown run."""
        self.run(run_id)
        with self._db:
            self._db.execute("DELETE FROM results WHERE run_id = ?", (run_id,))
            self._db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    @_locked
    def run(self, run_id: str, *, page: str | None = None) -> RunInfo:
        """The run ``run_id``. Raises StoreError if there is none, or, with ``page``, if
        another page made it (that page opens it)."""
        row = self._db.execute(
            "SELECT run_id, started, finished, inputs, weights, weights_sha256,"
            f" threshold, engine, kind, total, name, sample, operator, {_page_sql()} "
            "FROM runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r} in {self.path}")
        info = RunInfo(row[0], row[1], row[2], tuple(json.loads(row[3])), *row[4:])
        if page is not None and info.page != page:
            raise StoreError(
                f"run {run_id} was made on the {info.page.capitalize()} page; open it there"
            )
        return info

    @_writes
    def set_total(self, run_id: str, total: int) -> None:
        with self._db:
            self._db.execute(
                "UPDATE runs SET total = ?, finished = NULL WHERE run_id = ?", (total, run_id)
            )

    @_writes
    def finish(self, run_id: str) -> None:
        with self._db:
            self._db.execute("UPDATE runs SET finished = ? WHERE run_id = ?", (_now(), run_id))

    @_writes
    def add_results(self, run_id: str, rows: Iterable[dict]) -> None:
        """Insert (or replace) result rows with the RESULT_COLUMNS keys (``duplicate_of``
        and ``sha256`` may be absent), in one transaction."""
        columns = (*RESULT_COLUMNS, "sha256")
        with self._db:
            self._db.executemany(
                f"INSERT OR REPLACE INTO results (run_id, {', '.join(columns)}) "
                f"VALUES (?{', ?' * len(columns)})",
                [(run_id, *(r.get(c) for c in columns)) for r in rows],
            )

    @_locked
    def digests(self, run_id: str) -> dict[str, str]:
        """sha256 of the bytes -> path, for the files of ``run_id`` stored so far (not the
        duplicates): what a resumed run checks new files against."""
        return dict(
            self._db.execute(
                "SELECT sha256, path FROM results WHERE run_id = ? AND sha256 IS NOT NULL AND "
                "duplicate_of IS NULL",
                (run_id,),
            )
        )

    @_writes
    def add_smear_rows(self, run_id: str, rows: Sequence[dict]) -> None:
        """Store one field's rows (SMEAR_COLUMNS keys) in one transaction, so a field is
        either wholly stored or missing (and scored again on resume)."""
        with self._db:
            self._db.executemany(
                f"INSERT OR REPLACE INTO smear_cells (run_id, n, {', '.join(SMEAR_COLUMNS)}) "
                f"VALUES (?, ?, {', '.join('?' * len(SMEAR_COLUMNS))})",
                [(run_id, i, *(r[c] for c in SMEAR_COLUMNS)) for i, r in enumerate(rows)],
            )

    @_locked
    def smear_done(self, run_id: str) -> set[str]:
        """Fields of smear run ``run_id`` already stored."""
        return {
            p
            for (p,) in self._db.execute(
                "SELECT DISTINCT image FROM smear_cells WHERE run_id = ?", (run_id,)
            )
        }

    @_locked
    def smear_rows(self, run_id: str) -> pd.DataFrame:
        """The smear run's rows (SMEAR_COLUMNS), field by field in object order."""
        self.run(run_id)
        df = pd.read_sql_query(
            f"SELECT {', '.join(SMEAR_COLUMNS)} FROM smear_cells "
            "WHERE run_id = ? ORDER BY image, n",
            self._db,
            params=(run_id,),
        )
        flags = {c: df[c].map(lambda v: None if pd.isna(v) else bool(v)) for c in ("edge", "known")}
        return df.assign(**flags)

    @_locked
    def done_paths(self, run_id: str) -> set[str]:
        """Paths of ``run_id`` already stored (scored or given an error row)."""
        return {
            p for (p,) in self._db.execute("SELECT path FROM results WHERE run_id = ?", (run_id,))
        }

    @_locked
    def results(self, run_id: str) -> pd.DataFrame:
        self.run(run_id)
        return pd.read_sql_query(
            f"SELECT {', '.join(RESULT_COLUMNS)} FROM results WHERE run_id = ? ORDER BY path",
            self._db,
            params=(run_id,),
        )

    def iter_results(self, run_id: str, *, chunksize: int = 10_000) -> Iterator[pd.DataFrame]:
        """The run's results in chunks, for exports that must not hold everything in memory."""
        self.run(run_id)
        offset = 0
        while True:
            chunk = self._chunk(run_id, chunksize, offset)
            if chunk.empty:
                return
            yield chunk
            offset += len(chunk)

    @_locked
    def _chunk(self, run_id: str, limit: int, offset: int) -> pd.DataFrame:
        return pd.read_sql_query(
            f"SELECT {', '.join(RESULT_COLUMNS)} FROM results "
            "WHERE run_id = ? ORDER BY path LIMIT ? OFFSET ?",
            self._db,
            params=(run_id, limit, offset),
        )

    def export_csv(self, run_id: str, out: Path) -> int:
        """Write the run's results to ``out`` as CSV (atomically, neutralised against formula
        injection: ``core.schema.export``); return the number of rows.

        Raises StoreError (before touching ``out``) for an unknown run, OSError if ``out``
        cannot be written (it is then unchanged)."""
        self.run(run_id)
        return write_csv(out, self.iter_results(run_id), columns=RESULT_COLUMNS)

    @_locked
    def list_runs(self, *, page: str = SCORE) -> pd.DataFrame:
        """One row per run that ``page`` (one of PAGES) made, newest first: ids, dates, name,
        sample, operator, inputs, counts and weights; a text that a run lacks is None (never
        NaN). Cell runs count their ``stored`` rows, errors, duplicates, parasitized and
        not counted; smear runs their ``stored`` fields and errors."""
        runs = pd.read_sql_query(
            "SELECT r.run_id, r.started, r.finished, r.name, r.sample, r.operator, r.inputs, "
            "r.weights, r.weights_sha256, r.threshold, r.engine, r.kind, r.total, "
            + (
                # no parasitized count: the fields under review leave the store's sums wrong
                "COUNT(DISTINCT x.image) AS stored, SUM(x.error IS NOT NULL) AS errors "
                "FROM runs r LEFT JOIN smear_cells x ON x.run_id = r.run_id "
                if page == SMEAR
                else "COUNT(x.path) AS stored, SUM(x.error IS NOT NULL) AS errors, "
                "SUM(x.duplicate_of IS NOT NULL) AS duplicates, "
                f"SUM(x.prediction = ? AND {counted_sql('x.quality')}) AS parasitized, "
                f"SUM(NOT {counted_sql('x.quality')}) AS not_counted "
                "FROM runs r LEFT JOIN results x ON x.run_id = r.run_id "
            )
            + f"WHERE {_page_sql('r.')} = ? "
            "GROUP BY r.run_id ORDER BY r.started DESC, r.run_id DESC",
            self._db,
            params=(page,) if page == SMEAR else (PARASITIZED, page),
        )
        text = ["finished", "name", "sample", "operator"]
        return runs.assign(**{c: runs[c].astype(object).where(runs[c].notna(), None) for c in text})
