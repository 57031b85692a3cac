"""What a result row is: its columns, why a cell is not counted, and the one rule of what counts.

Each scored image gets ``quality``: OK, or the short reason the quality gate
(core.inference.gate) does not count it. The review band is separate: a counted cell whose
P(Parasitized) lies within ``REVIEW_BAND`` of the threshold is UNCERTAIN, still counted by its
call, and listed for a human.
"""

from __future__ import annotations

import pandas as pd

OK = "ok"
BLANK = "blank"
OUT_OF_FOCUS = "out of focus"
NOT_A_CELL = "not a cell"
UNLIKE_TRAINING = "unlike the training cells"
UNCERTAIN = "uncertain"  # the review band's mark; never a quality value
# Half-width of the review band around the threshold. Chosen on the shipped model's validation
# patients: 2.3% of their cells fall inside, where its accuracy is 0.47 against 0.97 outside.
REVIEW_BAND = 0.15

# quality: "ok" or why the image is not counted (core.inference.gate); NULL in runs scored before it
RESULT_COLUMNS = (
    "path",
    "case_id",
    "label",
    "prob_parasitized",
    "prediction",
    "quality",
    "error",
    "duplicate_of",
)
# smear mode (core.smear.fields): one row per object found in a field, or one error row per field
SMEAR_COLUMNS = (
    "image",
    "x",
    "y",
    "w",
    "h",
    "area",
    "edge",
    "object",
    "prob_parasitized",
    "prediction",
    "error",
)


def counted_sql(quality: str) -> str:
    """:func:`is_counted` as an SQL condition on the column ``quality`` (the store's summaries)."""
    return f"({quality} IS NULL OR {quality} = '{OK}')"


def is_counted(quality: pd.Series) -> pd.Series:
    """Rows whose quality lets them count: OK, or unknown (results stored before the gate)."""
    return quality.isna() | (quality == OK)


def counted(results: pd.DataFrame) -> pd.Series:
    """Result rows that count in parasitemia: scored (no error) and passing the gate."""
    quality = results["quality"] if "quality" in results else pd.Series(None, results.index)
    return results["error"].isna() & results["prob_parasitized"].notna() & is_counted(quality)


def review(results: pd.DataFrame, *, threshold: float, band: float = REVIEW_BAND) -> pd.Series:
    """Why each result row needs a human: its quality reason (not counted), UNCERTAIN (counted,
    but P(Parasitized) within ``band`` of ``threshold``), or "" (nothing to review; error rows
    too: their ``error`` says why). Raises ValueError for a band outside [0, 0.5]."""
    if not 0 <= band <= 0.5:
        raise ValueError(f"the review band must be in [0, 0.5], got {band}")
    prob = results["prob_parasitized"].astype(float)
    ok = counted(results)
    out = pd.Series("", index=results.index, dtype=object)
    out[ok & ((prob - threshold).abs() < band)] = UNCERTAIN
    failed = results["error"].isna() & prob.notna() & ~ok
    if failed.any():  # only where there is a quality column
        out[failed] = results.loc[failed, "quality"]
    return out
