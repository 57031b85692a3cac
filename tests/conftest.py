"""Fixtures shared by the test folders.

The tests are grouped by the package of core they test, one folder each (schema, data, nets,
inference, explain, smear, evaluation, training), with tests/cli for what `malaria score` and
`malaria smear` decide themselves (what they write, resume, exit codes) and tests/dashboard for
the app. A test that runs a command to check a lower module's work (a CSV neutralised, an error
row for an unreadable folder) lives with that module. Fixtures used by one folder are in that
folder's conftest.py; helpers shared by several modules in tests/helpers.py. Data: fixtures/.

Tiers: `slow` marks the real browser, the Ray cluster, training (train, folds, lr-find,
study), Streamlit AppTest and a few heavy checks (large memory, full ONNX exports and
quantisation), each saying why; `make test-fast` (-m "not slow") runs the rest.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.nets.model import build_model, default_contract, save_model
from tests.helpers import BACKGROUND
from tests.helpers import cell_images as _cell_images
from tests.helpers import paste as _paste

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CELLS = FIXTURES / "cells"


@pytest.fixture(scope="session")
def cells_dir() -> Path:
    return CELLS


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


# for the sources (data), `malaria score --ray` (cli) and the Ray cluster (inference); once a
# session: no test writes into it
@pytest.fixture(scope="session")
def mixed_inputs(cells_dir, tmp_path_factory) -> Path:
    """Cells in labelled folders, a broken file, a GIF, a large image, a copy of a cell under
    another name, and a zip holding cells, a member with ``!`` in its name and a zip inside it."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(cells_dir, root / "cells")
    cells = sorted(cells_dir.rglob("*.png"))
    (root / "cells" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "cells" / "anim.gif").write_bytes(b"GIF89a")
    # slow to decode, in the first batch: its batch comes back last unless order is kept
    noise = np.random.default_rng(0).integers(0, 256, (3500, 3500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cells" / "A_large_field.png", compress_level=1)
    shutil.copy(cells[3], root / "cells" / "copy_of_a_cell.png")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        for f in cells[:3]:
            z.write(f, f"Uninfected/{f.name}")
    with zipfile.ZipFile(root / "slides.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for f in cells[10:17]:
            z.write(f, f"Parasitized/{f.name}")
        z.write(cells[20], "odd!name.png")
        z.writestr("inner.zip", inner.getvalue())
        z.writestr("empty.png", b"")
    return root


# a smear field for core.smear (smear) and `malaria smear` (cli)
def _disk(field: np.ndarray, cx: int, cy: int, r: int, colour: tuple[int, int, int]) -> None:
    yy, xx = np.ogrid[: field.shape[0], : field.shape[1]]
    field[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


@pytest.fixture(scope="module")
def composed(cells_dir):
    """A 720x540 field: 12 separate cells, 2 pairs of touching cells, one cell cut by the left
    edge, a platelet-sized purple dot and a white-cell-sized dark purple disk."""
    rng = np.random.default_rng(0)
    field = np.empty((540, 720, 3), np.uint8)
    field[:] = BACKGROUND
    field = np.clip(field + rng.normal(0, 2, field.shape), 0, 255).astype(np.uint8)
    cells = _cell_images(cells_dir, 17)
    boxes = []
    for i in range(12):
        boxes.append(_paste(field, cells[i], 40 + (i % 6) * 110, 30 + (i // 6) * 120))
    # two pairs of cells touching along a front of ~20 px
    boxes.append(_paste(field, cells[12], 60, 300))
    boxes.append(_paste(field, cells[13], 138, 300))
    boxes.append(_paste(field, cells[14], 330, 300))
    boxes.append(_paste(field, cells[15], 408, 310))
    edge_box = _paste(field, cells[16], -30, 430)
    boxes.append(edge_box)
    _disk(field, 600, 340, 7, (120, 60, 140))  # platelet
    _disk(field, 620, 460, 60, (90, 30, 110))  # white cell: far larger than a red cell, dark
    return field, np.array(boxes), edge_box
