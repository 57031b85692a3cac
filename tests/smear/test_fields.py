"""Smear mode on fields composed from the public-domain NIH fixture cells on a light background."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.evaluation.smear_check import box_iou, field_counts, match
from core.schema.results import SMEAR_COLUMNS
from core.smear.fields import (
    RED_CELL,
    crop_cells,
    draw_overlay,
    field_summary,
    score_field,
    segment,
)
from tests.helpers import BACKGROUND
from tests.helpers import cell_images as _cell_images
from tests.helpers import paste as _paste
from tests.helpers import png as _png


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


def test_segment_finds_every_red_cell_splits_touching_ones_and_marks_the_edge(composed):
    field, truth, edge_box = composed
    seg = segment(field)
    cells = seg.cells
    found = np.array([[c.x, c.y, c.w, c.h] for c in cells])
    matched = match(truth, found)
    assert len(matched) == len(truth), (len(matched), len(truth))  # touching pairs split
    assert len(cells) == len(truth)  # and nothing else taken for a red cell
    edge = cells[matched[len(truth) - 1]]
    assert edge.edge and edge.x == 0
    assert sum(c.edge for c in cells) == 1
    assert 35 < seg.radius < 50  # 90 px cells
    for c in cells:
        assert c.mask.shape == (c.h, c.w) and c.mask.dtype == bool
        assert c.area == int(c.mask.sum()) and 0.5 * math.pi * 35**2 < c.area < 90 * 90


def test_platelets_and_white_cells_are_objects_but_not_red_cells(composed):
    field, _, _ = composed
    others = [o for o in segment(field).objects if not o.is_cell]
    centres = [(o.x + o.w / 2, o.y + o.h / 2) for o in others]
    assert any(abs(x - 620) < 15 and abs(y - 460) < 15 for x, y in centres), centres
    kinds = {o.kind for o in others}
    assert all(k.startswith("not a red cell") for k in kinds)


def test_segment_rejects_non_rgb_and_finds_nothing_in_a_blank_field():
    with pytest.raises(ValueError, match="RGB"):
        segment(np.zeros((50, 50), np.uint8))
    assert segment(np.full((200, 300, 3), 230, np.uint8)).objects == ()


def test_crops_are_black_outside_the_cell_at_the_model_size(composed):
    field, _, _ = composed
    cells = segment(field).cells
    crops = crop_cells(field, cells, size=128)
    assert crops.shape == (len(cells), 128, 128, 3) and crops.dtype == np.uint8
    corners = crops[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.max(-1) == 0).mean() > 0.9  # the round cell leaves its box's corners black
    assert (crops[:, 54:74, 54:74].max(-1) > 40).all()  # the middle is cell


def test_score_field_gives_a_probability_per_red_cell(composed, tiny_model):
    from core.inference.engines import load_engine

    field, truth, _ = composed
    engine = load_engine(tiny_model, "onnx")
    result = score_field(field, engine)
    assert result.prob.shape == (len(result.segmentation.cells),)
    assert np.all((result.prob >= 0) & (result.prob <= 1))
    rows = result.rows("f.png", 0.5)
    assert len(rows) == len(result.segmentation.objects)
    assert set(rows[0]) == set(SMEAR_COLUMNS)
    red = [r for r in rows if r["object"] == RED_CELL]
    assert all(r["prediction"] in ("Parasitized", "Uninfected") for r in red)
    assert all(r["prob_parasitized"] is None for r in rows if r["object"] != RED_CELL)
    image = draw_overlay(field, result.segmentation, result.prob, highlight=0)
    assert image.shape == field.shape and (image != field).any()


def test_field_summary_counts_red_cells_only_with_wilson_intervals():
    rows = [
        {
            "image": "slide/a.png",
            "object": RED_CELL,
            "prob_parasitized": p,
            "prediction": "Parasitized" if p >= 0.5 else "Uninfected",
            "error": None,
        }
        for p in (0.9, 0.1, 0.2, 0.3)
    ]
    rows.append(
        {
            "image": "slide/a.png",
            "object": "not a red cell: small (platelet or debris)",
            "prob_parasitized": None,
            "prediction": None,
            "error": None,
        }
    )
    rows.append(
        {
            "image": "slide/b.png",
            "object": None,
            "prob_parasitized": None,
            "prediction": None,
            "error": "not a readable image",
        }
    )
    summary = field_summary(pd.DataFrame(rows)).set_index(["level", "group"])
    a = summary.loc[("field", "slide/a.png")]
    assert (a["cells"], a["other_objects"], a["parasitized"]) == (4, 1, 1)
    assert a["parasitemia"] == 0.25
    assert a["ci_low"] == pytest.approx(0.0456, abs=1e-3)  # Wilson 1/4
    assert a["ci_high"] == pytest.approx(0.6994, abs=1e-3)
    assert summary.loc[("field", "slide/b.png"), "errors"] == 1
    folder = summary.loc[("folder", "slide")]
    assert (folder["cells"], folder["errors"], folder["parasitized"]) == (4, 1, 1)
    # a threshold re-makes the predictions from the probabilities
    low = field_summary(pd.DataFrame(rows), threshold=0.15).set_index(["level", "group"])
    assert low.loc[("field", "slide/a.png"), "parasitized"] == 3


def test_box_iou_and_matching_by_hand():
    a = np.array([[0, 0, 10, 10], [100, 100, 10, 10]])
    b = np.array([[5, 0, 10, 10], [0, 0, 10, 10], [300, 300, 5, 5]])
    iou = box_iou(a, b)
    assert iou[0, 0] == pytest.approx(50 / 150) and iou[0, 1] == 1.0 and iou[1].max() == 0
    assert match(a, b) == {0: 1}
    boxes = [
        {"type": "ring", "bbox": {"x": "0", "y": "0", "w": "10", "h": "10"}},
        {"type": "red blood cell", "bbox": {"x": "100", "y": "100", "w": "10", "h": "10"}},
    ]
    objects = [
        {"x": 0, "y": 0, "w": 10, "h": 10, "is_cell": True},
        {"x": 200, "y": 0, "w": 10, "h": 10, "is_cell": True},
        {"x": 400, "y": 0, "w": 5, "h": 5, "is_cell": False},
    ]
    c = field_counts(objects, boxes, np.array([0.9, 0.8]), 0.5)
    assert (c["annotated"], c["recalled"], c["infected"], c["infected_called"]) == (2, 1, 1, 1)
    # the unboxed red cell called parasitized counts against us; the debris is not called
    assert (c["not_infected_objects"], c["false_called"], c["boxed_cells"]) == (2, 1, 1)


def test_cli_writes_cells_and_summary_keeps_a_broken_field_and_resumes(
    composed, tiny_model, tmp_path, capsys
):
    from core import cli
    from core.inference.store import ResultStore

    field, truth, _ = composed
    slide = tmp_path / "slide1"
    slide.mkdir()
    (slide / "field1.png").write_bytes(_png(field))
    (slide / "field2.png").write_bytes(_png(field[:, ::-1].copy()))
    (slide / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out, summary, overlays = tmp_path / "cells.csv", tmp_path / "fields.csv", tmp_path / "ov"
    store = tmp_path / "store.sqlite"
    args = [
        "smear",
        str(slide),
        "--out",
        str(out),
        "--summary",
        str(summary),
        "--overlays",
        str(overlays),
        "--weights",
        str(tiny_model),
        "--store",
        str(store),
        "--no-progress",
    ]
    assert cli.main(args) == 1  # one error row
    cells = pd.read_csv(out)
    assert list(cells.columns) == list(SMEAR_COLUMNS)
    broken = cells[cells["image"].str.endswith("broken.jpg")]
    assert len(broken) == 1 and broken["error"].iloc[0]
    red = cells[cells["object"] == RED_CELL]
    assert len(red) == 2 * len(truth)
    assert red["prob_parasitized"].between(0, 1).all()
    table = pd.read_csv(summary)
    assert set(table["level"]) == {"field", "folder"}
    folder = table[table["level"] == "folder"].iloc[0]
    assert folder["cells"] == len(red) and folder["errors"] == 1
    assert len(list(overlays.glob("*.png"))) == 2
    with ResultStore(store) as s:
        run_id = s.list_runs(smear=True)["run_id"].iloc[0]
        before = s.smear_rows(run_id)
        assert s.list_runs().empty  # smear runs are not listed among cell runs
    capsys.readouterr()
    assert (
        cli.main(
            ["smear", "--resume", run_id, "--store", str(store), "--out", str(out), "--no-progress"]
        )
        == 1
    )
    assert "0 to segment and score" in capsys.readouterr().err
    with ResultStore(store) as s:
        pd.testing.assert_frame_equal(s.smear_rows(run_id), before)


def test_cli_refuses_bad_arguments(tmp_path, tiny_model):
    from core import cli

    def main(argv):
        return cli.main(["smear", *argv])

    parse = list
    store = str(tmp_path / "s.sqlite")
    assert main(parse([str(tmp_path / "missing"), "--store", store])) == 2
    assert main(parse([str(tmp_path), "--threshold", "2", "--store", store])) == 2
    assert (
        main(parse([str(tmp_path), "--out", str(tmp_path / "no" / "x.csv"), "--store", store])) == 2
    )
