"""Smear mode on fields composed from the public-domain NIH fixture cells on a light background."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest

from core.data.sources import ImageSource
from core.evaluation.smear_check import match
from core.inference.engines import load_engine
from core.schema.labels import PARASITIZED, UNINFECTED
from core.schema.results import NO_COLOUR, OK, SMEAR_COLUMNS, UNLIKE_TRAINING
from core.smear.fields import (
    CUT_BY_EDGE,
    FRAGMENT,
    NIH_ONLY,
    RED_CELL,
    REVIEW_NOT_ADAPTED,
    REVIEW_UNKNOWN,
    FieldError,
    SegmentConfig,
    SmearTotals,
    _resplit,
    crop_cells,
    domain_note,
    draw_overlay,
    ellipse_crop,
    field_summary,
    iter_fields,
    restored_field,
    score_field,
    segment,
    smear_totals,
)
from tests.helpers import BACKGROUND
from tests.helpers import png as _png


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
    assert segment(np.full((200, 300, 3), BACKGROUND, np.uint8)).objects == ()
    with pytest.raises(FieldError, match="no colour"):  # a grey field: no stain to segment
        segment(np.full((200, 300, 3), 230, np.uint8))


def _sources(fields: dict[str, np.ndarray]) -> list[ImageSource]:
    return [ImageSource(name, (lambda b: lambda: b)(_png(img))) for name, img in fields.items()]


def test_no_field_crashes_the_run_each_failing_one_is_one_error_row(composed, tiny_model):
    field, _, _ = composed
    rng = np.random.default_rng(0)
    bad = {
        "long.png": rng.integers(0, 256, (3, 10000, 3), dtype=np.uint8),
        "noise.png": rng.integers(0, 256, (3, 3, 3), dtype=np.uint8),
        "grey.png": np.repeat(field.mean(-1, keepdims=True).astype(np.uint8), 3, -1),
    }
    for k in range(40):  # 21x11 crops: OpenCV raised on a cell radius of ~8.5e37 in some
        y, x = rng.integers(0, 540 - 11), rng.integers(0, 720 - 21)
        bad[f"crop{k}.png"] = field[y : y + 11, x : x + 21].copy()
    engine = load_engine(tiny_model, "onnx")
    out = list(iter_fields(_sources({**bad, "good.png": field}), engine))
    assert [src.path for src, _, _ in out] == [*bad, "good.png"]
    for src, result, rows in out[:-1]:
        assert result is None and len(rows) == 1 and rows[0]["error"], src.path
    errors = {src.path: rows[0]["error"] for src, _, rows in out}
    assert "too small" in errors["noise.png"] and "too small" in errors["long.png"]
    assert errors["grey.png"] == f"not counted: {NO_COLOUR}"
    assert out[-1][1] is not None and len(out[-1][1].segmentation.cells) > 10


def test_an_unforeseen_failure_in_one_field_is_its_error_row(composed, tiny_model, monkeypatch):
    import cv2

    import core.smear.fields

    field, _, _ = composed
    real = core.smear.fields.segment

    def fails_on_the_first(image, **kw):
        if image.shape[0] == 540 and image[0, 0, 0] == 0:
            raise cv2.error("OpenCV(5.0.0) resize.cpp:4223: error: (-215:Assertion failed)")
        return real(image, **kw)

    monkeypatch.setattr(core.smear.fields, "segment", fails_on_the_first)
    first = field.copy()
    first[0, 0] = 0
    out = list(iter_fields(_sources({"a.png": first, "b.png": field}), load_engine(tiny_model)))
    assert out[0][1] is None and "cannot segment this field (error: " in out[0][2][0]["error"]
    assert out[1][1] is not None


@pytest.mark.parametrize("blob", ["disc", "half"])
def test_one_giant_red_blob_is_not_a_red_cell(blob):
    field = np.empty((960, 1280, 3), np.uint8)
    field[:] = BACKGROUND
    if blob == "disc":  # a 900x900 red disc
        yy, xx = np.mgrid[:960, :1280]
        field[(yy - 480) ** 2 + (xx - 640) ** 2 < 450**2] = (200, 80, 120)
    else:
        field[:, :640] = (200, 80, 120)
    seg = segment(field)
    assert seg.objects and not seg.cells
    assert all("large" in o.kind for o in seg.objects)


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


def test_a_stored_field_is_restored_as_it_was_scored_and_a_changed_one_refused(
    composed, tiny_model
):
    field, _, _ = composed
    result = score_field(field, load_engine(tiny_model, "onnx"))
    rows = pd.DataFrame(result.rows("f.png", 0.5), columns=list(SMEAR_COLUMNS))
    again = restored_field(field, rows)
    assert all(
        (a.x, a.y, a.w, a.h, a.kind) == (b.x, b.y, b.w, b.h, b.kind) and (a.mask == b.mask).all()
        for a, b in zip(again.segmentation.objects, result.segmentation.objects, strict=True)
    )
    np.testing.assert_allclose(again.prob, result.prob, rtol=1e-6)
    np.testing.assert_array_equal(again.unlike, result.unlike)
    with pytest.raises(FieldError, match="not the one the run scored"):
        restored_field(field[:, ::-1].copy(), rows)


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
    summary = field_summary(pd.DataFrame(rows), adapted=True).set_index(["level", "group"])
    a = summary.loc[("field", "slide/a.png")]
    assert (a["cells"], a["other_objects"], a["parasitized"]) == (4, 1, 1)
    assert a["parasitemia"] == 0.25
    assert a["ci_low"] == pytest.approx(0.0456, abs=1e-3)  # Wilson 1/4
    assert a["ci_high"] == pytest.approx(0.6994, abs=1e-3)
    assert summary.loc[("field", "slide/b.png"), "errors"] == 1
    folder = summary.loc[("folder", "slide")]
    assert (folder["cells"], folder["errors"], folder["parasitized"]) == (4, 1, 1)
    # a threshold re-makes the predictions from the probabilities
    low = field_summary(pd.DataFrame(rows), adapted=True, threshold=0.15).set_index(
        ["level", "group"]
    )
    assert low.loc[("field", "slide/a.png"), "parasitized"] == 3


def test_only_whole_single_red_cells_inside_the_field_are_counted(composed, tiny_model):
    from core.inference.engines import load_engine

    field, _, _ = composed
    seg = segment(field)
    edge = [c for c in seg.cells if c.edge]
    assert len(edge) == 1 and edge[0].quality == CUT_BY_EDGE
    assert all(c.quality == OK for c in seg.cells if not c.edge)  # whole, single, inside
    assert all(o.quality == o.kind != OK for o in seg.objects if not o.is_cell)
    result = score_field(field, load_engine(tiny_model, "onnx"))
    rows = pd.DataFrame(result.rows("slide/f.png", 0.5))
    assert list(rows.columns) == list(SMEAR_COLUMNS)
    assert (rows.loc[rows["object"] == RED_CELL, "quality"] == OK).sum() == len(seg.cells) - 1
    assert set(rows.loc[rows["object"] == RED_CELL, "known"]) <= {True, False}
    assert rows.loc[rows["object"] != RED_CELL, "known"].isna().all()
    f = field_summary(rows, adapted=True).iloc[0]
    assert (f["cells"], f["not_counted"], f["review"]) == (len(seg.cells) - 1, 1, "")


def _cells(image: str, qualities: list[str], parasitized: int, unlike: int = 0) -> list[dict]:
    """Red-cell rows: the first ``parasitized`` called so, the last ``unlike`` beyond the gate."""
    rows = []
    for i, q in enumerate(qualities):
        call = PARASITIZED if i < parasitized else UNINFECTED
        rows.append(
            dict.fromkeys(SMEAR_COLUMNS)
            | {"image": image, "object": RED_CELL, "quality": q, "prediction": call}
            | {"prob_parasitized": 0.9 if call == PARASITIZED else 0.1}
            | {"known": i < len(qualities) - unlike}
        )
    return rows


def test_cells_unlike_those_the_model_knows_count_and_decide_whether_a_field_is_reported():
    mostly = _cells("slide/a.png", [OK] * 10, parasitized=1, unlike=7)
    few = _cells("slide/b.png", [OK] * 10, parasitized=2, unlike=2)
    s = field_summary(pd.DataFrame(mostly + few), adapted=True).set_index("group")
    a, b = s.loc["slide/a.png"], s.loc["slide/b.png"]
    assert a["review"] == REVIEW_UNKNOWN and a["unknown_share"] == pytest.approx(0.7)
    assert np.isnan(a["parasitemia"])
    # b's two unlike cells are counted: 2 of its 10 cells called, none left out
    assert b["review"] == "" and b["unknown_share"] == pytest.approx(0.2)
    assert (b["cells"], b["not_counted"], b["parasitemia"]) == (10, 0, pytest.approx(0.2))


def test_a_field_whose_cells_the_model_does_not_know_gets_no_parasitemia():
    unknown = _cells("slide/a.png", [OK] * 3 + [UNLIKE_TRAINING] * 7, parasitized=1)
    known = _cells("slide/b.png", [OK] * 10 + [CUT_BY_EDGE], parasitized=2)
    s = field_summary(pd.DataFrame(unknown + known), adapted=True).set_index("group")
    a, b, slide = s.loc["slide/a.png"], s.loc["slide/b.png"], s.loc["slide"]
    assert a["review"] == REVIEW_UNKNOWN and a["unknown_share"] == pytest.approx(0.7)
    assert np.isnan(a["parasitemia"]) and np.isnan(a["ci_low"]) and not a["likely_infected"]
    assert b["review"] == "" and b["parasitemia"] == pytest.approx(0.2) and b["not_counted"] == 1
    # the slide pools the fields it reports: b's cells only
    assert slide["review"] == "" and slide["cells"] == 10 and slide["parasitemia"] == 0.2
    assert smear_totals(pd.DataFrame(unknown), adapted=True).parasitemia is None
    assert smear_totals(pd.DataFrame(unknown), adapted=True).review
    every = field_summary(pd.DataFrame(unknown), adapted=True).set_index("group").loc["slide"]
    assert every["review"] == REVIEW_UNKNOWN and np.isnan(every["parasitemia"])


def test_a_model_not_adapted_to_a_lab_gives_no_field_a_parasitemia():
    known = _cells("slide/b.png", [OK] * 10 + [CUT_BY_EDGE], parasitized=2)
    only_fragments = _cells("slide/c.png", [FRAGMENT] * 2, parasitized=0)
    s = field_summary(pd.DataFrame(known + only_fragments), adapted=False).set_index("group")
    b, c, slide = s.loc["slide/b.png"], s.loc["slide/c.png"], s.loc["slide"]
    assert b["review"] == REVIEW_NOT_ADAPTED and np.isnan(b["parasitemia"])
    assert b["cells"] == 10 and np.isnan(b["parasitized"]) and not b["likely_infected"]
    assert c["review"] == ""  # no whole red cell: nothing withheld, nothing to report
    assert slide["review"] == REVIEW_NOT_ADAPTED and np.isnan(slide["parasitemia"])
    totals = smear_totals(pd.DataFrame(known), adapted=False)
    assert totals.review and totals.parasitemia is None
    assert smear_totals(pd.DataFrame(known), adapted=True).parasitemia == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("review", "fields_review", "adapted", "level", "says"),
    [
        (True, 4, False, "warning", [NIH_ONLY, "No parasitemia is given", "Adapt it to your lab"]),
        (False, 0, False, "info", [NIH_ONLY]),
        (True, 4, True, "error", ["Another lab's fields: 70% of", "no parasitemia"]),
        (False, 1, True, "warning", ["1 of 4 fields look like another lab's (70%", "adapted"]),
    ],
)
def test_the_domain_note_says_when_fields_are_another_labs(
    review, fields_review, adapted, level, says
):
    totals = SmearTotals(4, 100, 3, 0.7, fields_review, review)
    got, words = domain_note(totals, adapted=adapted)
    assert got == level and all(s in words for s in says), words
    assert "unlike the cells this model was trained or adapted on" in words or not adapted
    assert "P. falciparum" in NIH_ONLY and "nan" not in words


def test_an_adapted_model_that_knows_the_fields_has_no_domain_note():
    assert domain_note(SmearTotals(4, 100, 3, 0.01, 0, False), adapted=True) is None


def test_an_annotated_cell_is_the_ellipse_of_its_box_cut_to_the_image():
    image = np.full((40, 60, 3), 200, np.uint8)
    inside = ellipse_crop(image, (10, 10, 20, 20), size=20)
    assert inside[10, 10].tolist() == [200] * 3  # the centre is kept
    assert inside[0, 0].tolist() == [0] * 3  # the corners are black
    # a box half past the left edge: the ellipse fills the part inside the image
    cut = ellipse_crop(image, (-10, 10, 20, 20), size=10)
    assert cut[5, 5].tolist() == [200] * 3 and cut[5, 0].tolist() == [200] * 3
    assert cut[0, 0].tolist() == [0] * 3 and cut[9, 9].tolist() == [0] * 3


def test_a_clump_the_first_watershed_left_whole_is_split_on_its_shape_and_a_big_cell_is_not():
    r, a0 = 20.0, math.pi * 20.0**2
    yy, xx = np.mgrid[:120, :260]
    labels = np.zeros((120, 260), np.int32)
    for cx in (60, 94, 128):  # three cells in a row, 1.7 radii apart: one blob
        labels[(yy - 60) ** 2 + (xx - cx) ** 2 <= r**2] = 1
    big = (yy - 60) ** 2 + (xx - 210) ** 2 <= 2 * r**2  # an enlarged infected cell, 2 cells' area
    labels[big] = 2
    flat = np.full(labels.shape, 200.0, np.float32)  # no ridges: the shape alone splits it
    out = _resplit(labels.copy(), flat, a0=a0, r=r, config=SegmentConfig(resplit=1.8))
    assert len(np.unique(out[:, :160])) - 1 == 3  # the blob, one object per cell
    assert set(np.unique(out[big]).tolist()) == {2}  # the round big cell stays whole
    assert (out > 0).sum() == (labels > 0).sum()  # no pixel lost or added
    off = SegmentConfig(resplit=math.inf)
    assert np.array_equal(_resplit(labels.copy(), flat, a0=a0, r=r, config=off), labels)


def test_cells_packed_into_one_round_blob_are_cut_where_their_rims_meet():
    r, a0 = 20.0, math.pi * 20.0**2
    yy, xx = np.mgrid[:120, :120]
    blob = (yy - 60) ** 2 + (xx - 60) ** 2 <= (2.2 * r) ** 2  # about 4.8 cells, one centre
    labels = blob.astype(np.int32)
    lightness = np.full(blob.shape, 200.0, np.float32)
    lightness[58:62, :] = lightness[:, 58:62] = 120.0  # four cells' rims, darker where they meet
    split = _resplit(labels.copy(), lightness, a0=a0, r=r, config=SegmentConfig())
    assert len(np.unique(split[blob])) == 4
    flat = np.full(blob.shape, 200.0, np.float32)
    whole = _resplit(labels.copy(), flat, a0=a0, r=r, config=SegmentConfig())
    assert len(np.unique(whole[blob])) == 1


def test_cells_too_pale_in_a_star_are_found_whole_on_their_lightness():
    # grey cells barely redder than the background, their rims red in broken arcs only (as in
    # PA171695): the a* foreground holds the arcs, not the cells
    lab = np.empty((540, 720, 3), np.uint8)
    lab[:] = (235, 126, 134)
    truth = []
    for i in range(12):
        cx, cy = 100 + (i % 4) * 170, 100 + (i // 4) * 170
        cv2.circle(lab, (cx, cy), 36, (175, 128, 130), thickness=-1)
        for start in (0, 120, 240):
            cv2.ellipse(lab, (cx, cy), (34, 34), 0, start, start + 60, (165, 150, 128), 4)
        truth.append((cx - 36, cy - 36, 73, 73))
    field = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    for config, whole in ((SegmentConfig(), 12), (SegmentConfig(pale_radius=0), 0)):
        seg = segment(field, config=config)
        found = np.array([[c.x, c.y, c.w, c.h] for c in seg.cells]).reshape(-1, 4)
        assert len(match(np.array(truth), found)) == whole, config
    assert 30 < segment(field).radius < 40
