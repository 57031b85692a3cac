from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.nets.model import build_model, default_contract, save_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CELLS = FIXTURES / "cells"


@pytest.fixture(scope="session")
def cells_dir() -> Path:
    return CELLS


@pytest.fixture(scope="session")
def evaluate_split() -> str:
    """The predictions the Evaluate page opens on for the shipped model: ``oof`` where it has
    out-of-fold predictions, else ``test`` (its held-back patients)."""
    from core.schema.contract import DEFAULT_WEIGHTS, predictions_path

    return "oof" if predictions_path(DEFAULT_WEIGHTS, "oof").is_file() else "test"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised MobileNetV2 saved as a model folder (no network, no training)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    model = build_model("mobilenet_v2").eval()
    save_model(
        folder,
        model,
        default_contract("mobilenet_v2"),
        {
            "training_command": "fixture",
            "metrics": {},
            "screening": {"cutoff": 0.05, "method": "fixture"},
        },
    )
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """ONNX exports go to a per-session temporary cache, never the repo's, signed with a
    per-session key, never the user's."""
    import core.inference.onnx_cache

    monkeypatch.setattr(
        core.inference.onnx_cache, "CACHE_DIR", tmp_path_factory.getbasetemp() / "cache"
    )
    monkeypatch.setattr(
        core.inference.onnx_cache, "KEY_FILE", tmp_path_factory.getbasetemp() / "key" / "k"
    )
