"""Fixtures of the training tests: a lab's annotated fields composed from the fixture cells."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import BACKGROUND, paste, png


def _cells(cells_dir, label: str, n: int) -> list[np.ndarray]:
    from PIL import Image

    paths = sorted((cells_dir / label).glob("C123P84*.png"))
    return [
        np.asarray(Image.open(paths[i % len(paths)]).convert("RGB").resize((90, 90)))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def lab(cells_dir, tmp_path_factory):
    """Two blocks of two fields, each 10 boxed cells, 2 of them infected."""
    root = tmp_path_factory.mktemp("lab")
    (root / "images").mkdir()
    infected, healthy = _cells(cells_dir, "Parasitized", 8), _cells(cells_dir, "Uninfected", 32)
    entries = []
    for k, name in enumerate(["AA01.png", "AA02.png", "BB01.png", "BB02.png"]):
        field = np.empty((400, 600, 3), np.uint8)
        field[:] = BACKGROUND
        objects = []
        for i in range(10):
            cell = infected[2 * k + i] if i < 2 else healthy[8 * k + i - 2]
            x, y, w, h = paste(field, cell, 30 + (i % 5) * 110, 40 + (i // 5) * 160)
            kind = "ring" if i < 2 else "red blood cell"
            box = {"x": int(x), "y": int(y), "w": int(w), "h": int(h)}
            objects.append({"type": kind, "bbox": box})
        (root / "images" / name).write_bytes(png(field))
        entries.append({"image_name": name, "objects": objects})
    (root / "annotations.json").write_text(json.dumps(entries))
    return root
