"""CSV exports that a spreadsheet opens as data, and that a crash or a full disk never tears.

Every CSV a user gets (the CLI's ``--out`` and ``--summary``, the dashboard's downloads) goes
through here:

- text cells starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return get a leading
  ``'`` (OWASP's rule against CSV injection: spreadsheets run such cells as formulas); numbers
  stay numbers;
- every text cell is quoted, so a control character in a file name (a carriage return splits a
  row in many readers) stays inside its cell;
- files are written to a temporary file beside the target and renamed over it only when
  complete, so an interrupted or failed export leaves the previous file as it was.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from core.schema.files import atomic_path

FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")
_QUOTING = csv.QUOTE_NONNUMERIC  # every text cell quoted; numbers as numbers


class OutputError(ValueError):
    """An output path that cannot be written; the message says why."""


def _neutral(value: object) -> object:
    if isinstance(value, str) and value.startswith(FORMULA_LEADS):
        return "'" + value
    return value


def restore(value: object) -> object:
    """A cell as it was before ``neutralise``: the ``'`` put before a formula lead removed
    (for reading our own CSVs back)."""
    if isinstance(value, str) and value[:1] == "'" and value[1:2] in FORMULA_LEADS:
        return value[1:]
    return value


def neutralise(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with formula-leading text cells prefixed by ``'``; numeric and boolean columns
    untouched."""
    text = [
        c
        for c in df.columns
        if pd.api.types.is_object_dtype(df[c]) or pd.api.types.is_string_dtype(df[c])
    ]
    return df.assign(**{str(c): df[c].map(_neutral) for c in text}) if text else df


def to_csv_text(df: pd.DataFrame) -> str:
    """The CSV text of ``df`` (no index), neutralised and quoted: for download buttons."""
    return neutralise(df).to_csv(index=False, quoting=_QUOTING)


def write_csv(
    path: Path,
    frames: pd.DataFrame | Iterable[pd.DataFrame],
    *,
    columns: Sequence[str] | None = None,
) -> int:
    """Write ``frames`` (one DataFrame, or chunks with the same columns) to ``path`` as one
    CSV, atomically; return the number of rows. ``columns`` gives the header when there are no
    chunks at all. Raises OSError (``path`` is then unchanged)."""
    chunks = [frames] if isinstance(frames, pd.DataFrame) else frames
    n, header = 0, True
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:
        for chunk in chunks:
            neutralise(chunk).to_csv(f, header=header, index=False, quoting=_QUOTING)
            n, header = n + len(chunk), False
        if header:  # no chunks at all: the header alone
            pd.DataFrame(columns=list(columns or ())).to_csv(f, index=False, quoting=_QUOTING)
        f.flush()
        os.fsync(f.fileno())  # complete on disk before it replaces the previous file
    return n


def check_output(path: Path) -> None:
    """Raise OutputError unless a file can be written at ``path``: its folder exists and
    accepts a new file, and ``path`` is not a folder. Call it before long work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
