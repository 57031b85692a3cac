"""Annotated fields (core.data.annotations): the IML format read, everything else refused
with a one-line reason before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.data.annotations import AnnotationError, block_of, read_annotations


def _field(folder, name, size=(200, 150)):
    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(folder / name)


def _write(path, entries):
    path.write_text(json.dumps(entries))
    return path


def _box(kind, x, y, w=20, h=20):
    return {"type": kind, "bbox": {"x": str(x), "y": str(y), "w": str(w), "h": str(h)}}


def test_reads_fields_sorted_with_their_parasitemia(tmp_path):
    _field(tmp_path, "B.png")
    _field(tmp_path, "A.png")
    ann = _write(
        tmp_path / "a.json",
        [
            {"image_name": "B.png", "objects": [_box("red blood cell", 10, 10)]},
            {
                "image_name": "A.png",
                "objects": [_box("ring", 0, 0), _box("red blood cell", 50, 50)]
                + [_box("difficult", 90, 90), _box("red blood cell", 195, 5, 10, 10)],
            },
        ],
    )
    fields = read_annotations(tmp_path, ann)
    assert [f.name for f in fields] == ["A.png", "B.png"]
    a = fields[0]
    assert len(a.boxes) == 4 and a.boxes[0].infected and a.boxes[0].xywh == (0, 0, 20, 20)
    assert a.parasitemia == pytest.approx(1 / 3)  # difficult boxes are not counted
    assert fields[1].parasitemia == 0
    assert block_of("PA171730.JPG", 6) == "PA1717"


def test_a_cell_boxed_twice_keeps_one_box_its_infected_stage_first(tmp_path):
    _field(tmp_path, "A.png")
    objects = [
        _box("red blood cell", 10, 10, 40, 40),
        _box("trophozoite", 12, 14, 38, 38),  # the same cell (IoU 0.8): the stage wins
        _box("red blood cell", 60, 60, 40, 40),
        _box("red blood cell", 62, 60, 40, 40),  # a red cell boxed twice: the first kept
        _box("red blood cell", 90, 60, 40, 40),  # its neighbour (IoU 0.14): kept
    ]
    ann = _write(tmp_path / "a.json", [{"image_name": "A.png", "objects": objects}])
    (field,) = read_annotations(tmp_path, ann)
    assert [(b.kind, b.x) for b in field.boxes] == [
        ("trophozoite", 12),
        ("red blood cell", 60),
        ("red blood cell", 90),
    ]
    assert field.parasitemia == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"images": [], "annotations": []}, "expected a non-empty list"),  # COCO-style
        ([], "expected a non-empty list"),
        ([{"objects": []}], "no image_name"),
        ([{"image_name": "missing.png", "objects": []}], "missing.png, which is not in"),
        ([{"image_name": "f.png", "objects": [_box("parasite", 1, 1)]}], "unknown type 'parasite'"),
        ([{"image_name": "f.png", "objects": [_box("ring", 500, 10)]}], "outside the 200x150"),
        ([{"image_name": "f.png", "objects": [_box("ring", "x", 10)]}], "is not a number"),
        ([{"image_name": "f.png", "objects": [_box("ring", 1, 1, 0, 5)]}], "bbox of size"),
        ([{"image_name": "../f.png", "objects": []}], "not a plain, unique file name"),
        ([{"image_name": "f.png", "objects": {}}], "objects is not a list"),
    ],
)
def test_bad_annotations_are_one_line_errors(tmp_path, entries, message):
    _field(tmp_path, "f.png")
    with pytest.raises(AnnotationError, match=message) as exc:
        read_annotations(tmp_path, _write(tmp_path / "a.json", entries))
    assert "\n" not in str(exc.value)


def test_an_unreadable_annotation_file_or_folder(tmp_path):
    with pytest.raises(AnnotationError, match="is not a folder"):
        read_annotations(tmp_path / "nope", tmp_path / "a.json")
    with pytest.raises(AnnotationError, match="cannot read"):
        read_annotations(tmp_path, tmp_path / "a.json")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="is not JSON"):
        read_annotations(tmp_path, tmp_path / "a.json")
