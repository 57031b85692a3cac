"""Label audit: which development cells are most likely mislabelled, from out-of-fold predictions.

    malaria audit --oof weights/default/oof_predictions.csv \
        --out weights/default/label_audit.csv

Confident learning (Northcutt, Jiang & Chuang, JAIR 2021), written out for two classes rather
than taken from cleanlab (AGPL-3.0). Every probability must come from a model that never saw
the cell's patient (out-of-fold), or the model's memory of a wrong label hides it.

- Per class, the threshold is the mean predicted probability of that class among the cells
  given that label: how sure the model is, on average, of the cells it agrees with.
- A cell is a **suspect** when the probability of its given label is below its class's
  threshold and the probability of the other class is at or above the other class's threshold
  (the off-diagonal of the confident joint). The other class is its ``suggested_label``.
- ``score`` is the probability of the suggested label (1 minus the self-confidence; for two
  classes the normalised margin ranks identically); ``rank`` 1 is the most likely mislabelled.

An analyst reviews the suspects (the dashboard's Audit page) and records a decision per cell in
a decisions file (``path, case_id, label, decision`` with ``keep``, ``relabel`` or
``exclude``), which ``malaria train --relabel FILE`` reads with ``read_decisions``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema.export import restore, write_csv
from core.schema.labels import CLASSES, PARASITIZED, UNINFECTED

PREDICTION_COLUMNS = ("path", "case_id", "label", "prob_parasitized")
AUDIT_COLUMNS = PREDICTION_COLUMNS + ("suggested_label", "score", "rank")
DECISION_COLUMNS = ("path", "case_id", "label", "decision")
DECISIONS = ("keep", "relabel", "exclude")


class AuditError(ValueError):
    """Predictions or a decisions file that cannot be used; the message says what and where."""


def _rows(index: Sequence[int], limit: int = 5) -> str:
    """CSV line numbers (header is line 1) of the first ``limit`` DataFrame rows in ``index``."""
    lines = [str(int(i) + 2) for i in list(index)[:limit]]
    more = f" and {len(index) - limit} more" if len(index) > limit else ""
    return ", ".join(lines) + more


def _missing_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AuditError(
            f"{what} lacks the column(s) {', '.join(missing)}; expected "
            f"{', '.join(columns)}, found {', '.join(map(str, df.columns)) or 'none'}"
        )


def check_predictions(df: pd.DataFrame, *, what: str = "the predictions") -> pd.DataFrame:
    """``df`` (columns ``path, case_id, label, prob_parasitized``, one row per cell) checked for
    the audit: returned with those columns only, ``prob_parasitized`` as float64.

    Raises AuditError for a missing column, no rows, a label other than ``Parasitized`` or
    ``Uninfected``, only one class, a probability that is missing, not a number or outside
    [0, 1], or a path listed twice.
    """
    _missing_columns(df, PREDICTION_COLUMNS, what)
    if df.empty:
        raise AuditError(f"{what} has no rows: nothing to audit")
    df = df.loc[:, list(PREDICTION_COLUMNS)].reset_index(drop=True)
    bad = df.index[~df["label"].isin(CLASSES)]
    if len(bad):
        raise AuditError(
            f"{what}: label must be {' or '.join(CLASSES)}; line(s) {_rows(bad)} "
            f"hold {df.loc[bad[0], 'label']!r}"
        )
    prob = pd.to_numeric(df["prob_parasitized"], errors="coerce").astype("float64")
    bad = df.index[~(np.isfinite(prob) & prob.between(0.0, 1.0))]
    if len(bad):
        raise AuditError(
            f"{what}: prob_parasitized must be a probability in [0, 1]; line(s) "
            f"{_rows(bad)} hold {df.loc[bad[0], 'prob_parasitized']!r} (a failed or "
            "missing prediction cannot be audited)"
        )
    dup = df.index[df["path"].duplicated()]
    if len(dup):
        raise AuditError(
            f"{what}: path {df.loc[dup[0], 'path']!r} is listed more than once "
            f"(line(s) {_rows(dup)}); give each cell one out-of-fold prediction"
        )
    present = set(df["label"])
    if len(present) < 2:
        raise AuditError(
            f"{what} holds only {present.pop()} cells: the audit compares the "
            "classes and needs cells given each label"
        )
    return df.assign(prob_parasitized=prob)


def _class_probs(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(probability of the given label, probability of the other class), each float64 (n,)."""
    p = df["prob_parasitized"].to_numpy(dtype=np.float64)
    parasitized = (df["label"] == PARASITIZED).to_numpy()
    given = np.where(parasitized, p, 1.0 - p)
    return given, 1.0 - given


def class_thresholds(df: pd.DataFrame) -> dict[str, float]:
    """Per class, the mean predicted probability of that class among the cells given that
    label (``df`` as ``check_predictions`` returns it)."""
    given, _ = _class_probs(df)
    return {c: float(given[(df["label"] == c).to_numpy()].mean()) for c in CLASSES}


def find_suspects(predictions: pd.DataFrame) -> pd.DataFrame:
    """The cells whose given label is likely wrong, most likely first.

    ``predictions``: out-of-fold predictions (columns ``path, case_id, label,
    prob_parasitized``). Returns one row per suspect with ``AUDIT_COLUMNS``: ``suggested_label``
    the other class, ``score`` in [0, 1] (its probability), ``rank`` from 1 (ties by path).
    Raises AuditError as ``check_predictions`` does.
    """
    df = check_predictions(predictions)
    t = class_thresholds(df)
    given, other = _class_probs(df)
    label = df["label"].to_numpy()
    own_t = np.where(label == PARASITIZED, t[PARASITIZED], t[UNINFECTED])
    other_t = np.where(label == PARASITIZED, t[UNINFECTED], t[PARASITIZED])
    suspect = (given < own_t) & (other >= other_t)
    out = df[suspect].assign(
        suggested_label=np.where(label[suspect] == PARASITIZED, UNINFECTED, PARASITIZED),
        score=other[suspect],
    )
    out = out.sort_values(["score", "path"], ascending=[False, True], kind="stable")
    return out.assign(rank=np.arange(1, len(out) + 1)).reset_index(drop=True)


def patient_shares(predictions: pd.DataFrame, suspects: pd.DataFrame) -> pd.DataFrame:
    """Per patient (``case_id``): ``cells``, ``suspects``, suspects given each label
    (``suspects_parasitized``, ``suspects_uninfected``) and ``share`` = suspects / cells; the
    highest share first. A patient with no suspects has share 0."""
    cells = predictions.groupby("case_id").size().rename("cells")
    by_label = (
        suspects.groupby(["case_id", "label"])
        .size()
        .unstack("label")
        .reindex(columns=list(CLASSES))
        .fillna(0)
        .astype(int)
        .rename(columns={c: f"suspects_{c.lower()}" for c in CLASSES})
    )
    out = pd.concat([cells, by_label], axis=1).fillna(0)
    out = out.astype({c: int for c in out.columns})
    out.insert(1, "suspects", out[[f"suspects_{c.lower()}" for c in CLASSES]].sum(axis=1))
    out["share"] = out["suspects"] / out["cells"]
    out = out.rename_axis("case_id").reset_index()
    return out.sort_values(["share", "case_id"], ascending=[False, True]).reset_index(drop=True)


def _read_csv(path: Path | str, what: str) -> pd.DataFrame:
    """A CSV as text cells (numbers converted by the caller), the ``'`` that our exports put
    before formula-like cells removed. Raises AuditError if it is missing or not a CSV."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{what} {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise AuditError(f"{what} {path} is empty: not even a header line") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise AuditError(f"{what} {path} is not a readable CSV ({exc})") from None
    return df.apply(lambda col: col.map(restore))


def read_predictions(path: Path | str) -> pd.DataFrame:
    """Out-of-fold (or any labelled) predictions from CSV, checked as ``check_predictions``
    does; other columns (``fold``) are dropped. Raises AuditError."""
    return check_predictions(_read_csv(path, "the predictions file"), what=str(path))


def read_audit(path: Path | str) -> pd.DataFrame:
    """A ``label_audit.csv`` as ``find_suspects`` returns it. Raises AuditError."""
    df = _read_csv(path, "the label audit")
    _missing_columns(df, AUDIT_COLUMNS, str(path))
    return df.astype({"prob_parasitized": float, "score": float, "rank": int})


# --- decisions --------------------------------------------------------------------------------


def check_decisions(df: pd.DataFrame, *, what: str = "the decisions") -> pd.DataFrame:
    """``df`` with ``DECISION_COLUMNS`` checked: every row names a cell (path), its given label
    (``Parasitized`` or ``Uninfected``) and a decision (``keep``, ``relabel`` or ``exclude``, any
    case, spaces ignored); a path listed twice must carry the same decision (the repeat is
    dropped). Returns those columns, decisions in lower case. Raises AuditError saying which
    lines are wrong."""
    _missing_columns(df, DECISION_COLUMNS, what)
    df = df.loc[:, list(DECISION_COLUMNS)].reset_index(drop=True)
    df = df.assign(
        path=df["path"].astype(str), decision=df["decision"].astype(str).str.strip().str.lower()
    )
    bad = df.index[df["path"].str.strip() == ""]
    if len(bad):
        raise AuditError(f"{what}: line(s) {_rows(bad)} have no path")
    bad = df.index[~df["label"].isin(CLASSES)]
    if len(bad):
        raise AuditError(
            f"{what}: label must be the cell's given label, {' or '.join(CLASSES)}; "
            f"line(s) {_rows(bad)} hold {df.loc[bad[0], 'label']!r}"
        )
    bad = df.index[~df["decision"].isin(DECISIONS)]
    if len(bad):
        raise AuditError(
            f"{what}: decision must be one of {', '.join(DECISIONS)}; line(s) "
            f"{_rows(bad)} hold {df.loc[bad[0], 'decision']!r}"
        )
    distinct = df.drop_duplicates()
    clash = distinct.index[distinct["path"].duplicated(keep=False)]
    if len(clash):
        raise AuditError(
            f"{what}: {df.loc[clash[0], 'path']!r} has conflicting rows (line(s) "
            f"{_rows(clash)}); keep one decision per cell"
        )
    return distinct.reset_index(drop=True)


def read_decisions_table(path: Path | str) -> pd.DataFrame:
    """The decisions file at ``path`` as a checked table (``check_decisions``). Raises
    AuditError if it is missing, not a CSV or not valid."""
    return check_decisions(_read_csv(path, "the decisions file"), what=str(path))


def read_decisions(path: Path | str) -> dict[str, str]:
    """``{path: decision}`` from a decisions file (CSV ``path, case_id, label, decision``;
    decision ``keep``, ``relabel`` = train on the other class, or ``exclude`` = leave the cell
    out). Cells not listed keep their label. Raises AuditError with the file and line numbers."""
    table = read_decisions_table(path)
    return dict(zip(table["path"], table["decision"]))


def merge_decisions(existing: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``existing`` with the rows of ``new`` put in: a cell in both takes ``new``'s decision,
    every other cell of either is kept (sorted by path)."""
    new = check_decisions(new, what="the new decisions")
    kept = existing[~existing["path"].isin(new["path"])]
    merged = pd.concat([kept, new], ignore_index=True)
    return merged.sort_values("path", kind="stable").reset_index(drop=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``folder`` so that two savers never interleave their read
    and write (the later one would drop the earlier one's decisions); no lock file is left."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_decisions(path: Path | str, new: pd.DataFrame) -> pd.DataFrame:
    """Merge the decisions in ``new`` (``DECISION_COLUMNS``) into the file at ``path`` and
    write it atomically; cells that ``new`` does not name keep the decision on file. Returns
    the table written. Raises AuditError if the file on disk is not a valid decisions file
    (it is then left as it is), OSError if it cannot be written."""
    path = Path(path)
    with _locked(path.parent):
        existing = (
            read_decisions_table(path)
            if path.exists()
            else pd.DataFrame(columns=list(DECISION_COLUMNS))
        )
        merged = merge_decisions(existing, new)
        write_csv(path, merged)
    return merged


# --- command line -----------------------------------------------------------------------------
