"""What a result row is: its columns, why a cell is not counted, and the one rule of what counts.

Each scored image gets ``quality``: OK, or the short reason the quality gate
(core.inference.gate) does not count it. The review band is separate: a counted cell whose
P(Parasitized) lies within ``REVIEW_BAND`` of the threshold is UNCERTAIN, still counted by its
call, and listed for a human. A row's kind (:func:`row_kinds`) and a run's counts
(:func:`run_counts`) follow from these, at the threshold chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from core.schema.labels import CLASSES, PARASITIZED, predicted_class

OK = "ok"
BLANK = "blank"
OUT_OF_FOCUS = "out of focus"
NOT_A_CELL = "not a cell"
UNLIKE_TRAINING = "unlike the training cells"
# R = G = B (a greyscale or single-channel file): the model reads the Giemsa stain's colour, and
# a grey copy of an infected cell passes every other check yet is mostly called Uninfected
NO_COLOUR = "no colour (the stain is needed)"
UNCERTAIN = "uncertain"  # the review band's mark; never a quality value
# Half-width of the review band around the threshold. Chosen on the shipped model's validation
# patients: 2.3% of their cells fall inside, where its accuracy is 0.47 against 0.97 outside.
REVIEW_BAND = 0.15

# What a result row is, as the Score page filters them: its call, or why it has none.
UNCERTAIN_KIND = "Uncertain"  # counted, inside the review band
NOT_COUNTED_KIND = "Not counted"  # scored, but failed the quality gate
DUPLICATE_KIND = "Duplicate"  # the same bytes as an earlier file of the run, counted as it
ERROR_KIND = "Error"  # could not be scored
ROW_KINDS = (*CLASSES, UNCERTAIN_KIND, NOT_COUNTED_KIND, DUPLICATE_KIND, ERROR_KIND)

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
    "quality",  # as in RESULT_COLUMNS: OK, or why the object is not counted
    # a scored red cell: False where the quality gate finds it unlike the cells the model knows
    # (it still counts: a field most of whose cells are is not reported, core.smear.fields)
    "known",
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


def calls(prob: pd.Series, *, threshold: float) -> pd.Series:
    """The class called for each P(Parasitized) at ``threshold`` (:func:`predicted_class`), None
    where there is no probability (error rows, duplicates)."""
    return pd.Series(
        [None if pd.isna(p) else predicted_class(p, threshold) for p in prob],
        index=prob.index,
        dtype=object,
    )


def at_threshold(
    results: pd.DataFrame, *, threshold: float, band: float = REVIEW_BAND
) -> pd.DataFrame:
    """``results`` with ``prediction`` made again at ``threshold`` and the ``review`` column
    (:func:`review`) for that threshold and ``band``. Raises ValueError for a band outside
    [0, 0.5]."""
    called = results.assign(prediction=calls(results["prob_parasitized"], threshold=threshold))
    return called.assign(review=review(called, threshold=threshold, band=band))


def is_duplicate(results: pd.DataFrame) -> pd.Series:
    """Rows of files with the same bytes as another file of the run (``duplicate_of`` set)."""
    return results["duplicate_of"].notna()


def row_kinds(results: pd.DataFrame) -> pd.Series:
    """Each row's kind, one of ROW_KINDS: its call (Parasitized, Uninfected), UNCERTAIN_KIND
    (counted, in the review band), NOT_COUNTED_KIND, DUPLICATE_KIND or ERROR_KIND. ``results``
    as :func:`at_threshold` returns them (``prediction`` and ``review`` at one threshold)."""
    dup = is_duplicate(results)
    return (
        results["prediction"]
        .where(results["review"] != UNCERTAIN, UNCERTAIN_KIND)
        .where(counted(results) | results["error"].notna() | dup, NOT_COUNTED_KIND)
        .where(~dup, DUPLICATE_KIND)
        .fillna(ERROR_KIND)
    )


@dataclass(frozen=True)
class RunCounts:
    """How many rows of a run are of each kind (:func:`run_counts`)."""

    files: int  # every row: scored, error or duplicate
    cells: int  # files, a duplicate counted once (as the file it repeats)
    parasitized: int  # counted cells called Parasitized
    not_counted: int  # scored, but failed the quality gate
    uncertain: int  # counted cells in the review band
    errors: int
    duplicates: int

    @property
    def for_review(self) -> int:
        """Rows a human should look at: not counted, or uncertain."""
        return self.not_counted + self.uncertain


def run_counts(results: pd.DataFrame) -> RunCounts:
    """The counts of :class:`RunCounts` for ``results`` as :func:`at_threshold` returns them."""
    kinds = row_kinds(results)
    ok = counted(results)
    dup = int(is_duplicate(results).sum())
    return RunCounts(
        files=len(results),
        cells=len(results) - dup,
        parasitized=int((ok & (results["prediction"] == PARASITIZED)).sum()),
        not_counted=int((kinds == NOT_COUNTED_KIND).sum()),
        uncertain=int((results["review"] == UNCERTAIN).sum()),
        errors=int(results["error"].notna().sum()),
        duplicates=dup,
    )
