"""Fixtures of the dashboard tests (AppTest and the real browser)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def evaluate_split() -> str:
    """The predictions the Evaluate page opens on for the shipped model: ``oof`` where it has
    out-of-fold predictions, else ``test`` (its held-back patients)."""
    from core.schema.contract import DEFAULT_WEIGHTS, predictions_path

    return "oof" if predictions_path(DEFAULT_WEIGHTS, "oof").is_file() else "test"
