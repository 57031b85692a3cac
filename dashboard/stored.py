"""The figures a model folder stores that several pages read: its heatmap check and its
labelled predictions. A missing file is None, for the page to say so in its own words."""

from __future__ import annotations

import json

import pandas as pd

from core.schema.calibration import rescale
from core.schema.contract import ModelFolder
from core.schema.proportions import wilson_interval
from dashboard import text

MIN_CELLS = 50  # a pointing on fewer cells is too uncertain to rank (4 of 4 is 51-100%)


def check_command(model: ModelFolder) -> str:
    """The command that (re)computes the model's heatmap check."""
    return f"malaria check heatmaps --weights {text.model_label(model.path)}" + (
        "" if model.split["test"] else " --split oof"
    )


def cells_text(summary: dict, model: ModelFolder) -> str:
    """Which cells the check ran on, and (for a model trained on every patient) where the
    default map points on the patients its fold models never saw."""
    if summary["split"] != "oof":
        return (
            f"**{summary['parasitized_cells']:,} Parasitized cells of {summary['cases']} test "
            "patients** the model never saw in training"
        )
    unseen = model.heatmap_estimate
    return (
        f"**{summary['parasitized_cells']:,} Parasitized development cells of "
        f"{summary['cases']} patients**: this model was trained on every patient, so these are "
        "cells it learnt"
        + (
            f" (the same recipe's {unseen.folds} fold models, each on the patients it never "
            f"saw: the default map peaks on the parasite in **{unseen.pointing:.1%}** of "
            f"{unseen.cells:,} cells)"
            if unseen
            else ""
        )
    )


def with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """The check's table with each pointing's 95% Wilson interval (``pointing_low``,
    ``pointing_high``) and ``few``: measured on fewer than MIN_CELLS cells, so shown greyed
    and never ranked first. The table keeps shares, so the count of hits is rounded from one."""
    hits = (table["pointing"] * table["cells"]).round()
    nan = (float("nan"), float("nan"))
    ci = [wilson_interval(int(k), int(n)) if k == k else nan for k, n in zip(hits, table["cells"])]
    return table.assign(
        pointing_low=[lo for lo, _ in ci],
        pointing_high=[hi for _, hi in ci],
        few=table["cells"] < MIN_CELLS,
    )


def heatmap_check(model: ModelFolder) -> tuple[pd.DataFrame, dict] | None:
    """(one row per method and stage, with_intervals and ``default``: the Explain page's
    default method at the model's stage; the check's summary), or None when the model folder
    has no heatmap check."""
    table_path, summary_path = model.explain_check()
    if not table_path.is_file() or not summary_path.is_file():
        return None
    table, summary = with_intervals(pd.read_csv(table_path)), json.loads(summary_path.read_text())
    # the method is code's (core.explain); the stage is the model's
    method, layer = summary["default"]["method"], model.contract.target_layer
    return table.assign(default=(table["method"] == method) & (table["layer"] == layer)), summary


def predictions(model: ModelFolder, part: str) -> pd.DataFrame:
    """The model folder's labelled predictions of ``part`` (``oof``, ``test``: path, case_id,
    label, prob_parasitized, ...) on the model's calibrated scale (they are saved as the
    networks said, at temperature 1). Raises FileNotFoundError when the folder has none."""
    preds = pd.read_csv(model.predictions(part))
    preds["prob_parasitized"] = rescale(preds["prob_parasitized"], model.contract.temperature)
    return preds
