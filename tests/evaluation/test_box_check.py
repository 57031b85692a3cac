"""Another lab's cells cut from their boxes (core.evaluation.box_check, ``malaria check
boxes``): composed fields of NIH fixture cells with their boxes."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from core import cli
from core.data.annotations import read_annotations
from core.evaluation.box_check import box_crops
from tests.helpers import BACKGROUND, paste


def _fields(cells_dir, root):
    """Two fields of two blocks, each with 3 parasitized and 3 uninfected fixture cells boxed,
    a ``difficult`` box and a box running off the field's edge."""
    (root / "images").mkdir(parents=True)
    records = []
    for name, offset in (("PA1717001.JPG", 0), ("PA1718001.JPG", 3)):
        field = np.zeros((300, 700, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
        objects = []
        for kind, folder in (("ring", "Parasitized"), ("red blood cell", "Uninfected")):
            paths = sorted((cells_dir / folder).glob("*.png"))[offset : offset + 3]
            for path in paths:
                i = len(objects)
                cell = np.asarray(Image.open(path).convert("RGB").resize((90, 90)))
                x, y, w, h = paste(field, cell, 10 + 110 * i, 100)
                box = {"x": str(x), "y": str(y), "w": str(w), "h": str(h)}
                objects.append({"type": kind, "bbox": box})
        objects.append({"type": "difficult", "bbox": {"x": "5", "y": "5", "w": "50", "h": "50"}})
        objects.append(
            {"type": "red blood cell", "bbox": {"x": "690", "y": "280", "w": "30", "h": "30"}}
        )
        Image.fromarray(field).save(root / "images" / name, quality=95)
        records.append({"image_name": name, "objects": objects})
    (root / "annotations.json").write_text(json.dumps(records))
    return root


def test_a_box_is_cut_as_the_ellipse_inside_it_black_around(cells_dir, tmp_path):
    root = _fields(cells_dir, tmp_path / "lab")
    field = read_annotations(root / "images", root / "annotations.json")[0]
    image = np.asarray(Image.open(field.path).convert("RGB"))
    crops, infected = box_crops(field, image, size=64)
    # 6 cells and the box at the edge (clipped to its 10x20 px inside the field); difficult left out
    assert crops.shape == (7, 64, 64, 3) and infected.tolist() == [True] * 3 + [False] * 4
    assert crops[:, :4, :4].max() == 0  # the corners are outside the ellipse
    assert crops[:, 28:36, 28:36].min(axis=(1, 2)).max() > 0  # the middle is the cell


def test_check_boxes_reports_per_block_and_writes_its_json(cells_dir, tmp_path, capsys):
    root = _fields(cells_dir, tmp_path / "lab")
    out = tmp_path / "boxes.json"
    assert cli.main(["check", "boxes", "--data", str(root), "--out", str(out)]) == 0
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"PA1717", "PA1718", "all"}
    assert figures["all"]["infected"] == 6 and figures["all"]["uninfected"] == 8
    assert figures["PA1717"]["infected"] == 3
    # the shipped model knows NIH cells: it calls the parasitized ones and not the others
    assert figures["all"]["sensitivity"] >= 0.8 > 0.3 >= figures["all"]["uninfected_called"]
    assert "sensitivity" in capsys.readouterr().out


def test_a_folder_without_annotations_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert cli.main(["check", "boxes", "--data", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
