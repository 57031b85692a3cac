"""`malaria adapt` (core.training.adapt) on fields composed from the fixture cells: a new model
folder with the lab's threshold, gate and leave-one-block-out check; bad input refused first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import cli
from core.schema.contract import ModelFolder, sha256_file
from tests.helpers import BACKGROUND, paste, png

pytestmark = pytest.mark.slow  # it trains


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


def test_adapt_writes_a_checked_model_folder_and_leaves_the_base_alone(lab, tiny_model, tmp_path):
    before = sha256_file(tiny_model / "model.safetensors"), sha256_file(tiny_model / "card.json")
    out = tmp_path / "mylab"
    argv = ["adapt", str(lab / "images"), "--annotations", str(lab / "annotations.json")]
    argv += ["--out", str(out), "--weights", str(tiny_model), "--epochs", "1", "--blocks", "2"]
    assert cli.main(argv) == 0
    model = ModelFolder.open(out)  # complete and verified
    record = model.card["adaptation"]
    assert record["fields"] == 4 and record["blocks"] == ["AA", "BB"]
    assert record["infected_cells"] == 8
    check = record["check"]["blocks"]
    assert set(check) == {"AA", "BB", "all"} and check["all"]["fields"] == 4
    assert 0.5 <= model.contract.threshold < 1
    assert (out / "quality.npz").is_file()
    assert "malaria adapt" in model.card["training_command"]
    assert (
        sha256_file(tiny_model / "model.safetensors"),
        sha256_file(tiny_model / "card.json"),
    ) == before
    assert cli.main(argv) == 2  # the folder exists now: never overwritten


def test_bad_annotations_stop_before_training_and_write_nothing(lab, tiny_model, tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps([{"image_name": "gone.png", "objects": []}]))
    out = tmp_path / "never"
    argv = ["adapt", str(lab / "images"), "--annotations", str(bad), "--out", str(out)]
    assert cli.main([*argv, "--weights", str(tiny_model)]) == 2
    assert not out.exists()
