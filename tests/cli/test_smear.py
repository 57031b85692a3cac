"""`malaria smear` (core.cli.smear): the files it writes, a broken field, resume, bad arguments."""

from __future__ import annotations

import pandas as pd

from core.schema.results import SMEAR_COLUMNS
from core.smear.fields import RED_CELL
from tests.helpers import png as _png


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
    # the report opens with the fields' lab: the tiny model was never adapted to a lab
    printed = capsys.readouterr()
    report = printed.err.splitlines()
    assert report[1].startswith("This model learnt from the NIH cells alone (P. falciparum")
    assert "red cells in 3 fields" in report[-1] and printed.out  # the table, then the totals
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
    # every red cell is counted or listed as not counted: here the two cut by the left edge
    assert folder["cells"] + folder["not_counted"] == len(red) and folder["not_counted"] == 2
    assert folder["errors"] == 1
    # not adapted to a lab: every field's cells counted and listed, no parasitemia given
    assert folder["review"].startswith("review: the model was not adapted")
    assert folder["parasitemia"] != folder["parasitemia"] and not folder["likely_infected"]
    assert "No parasitemia is given" in printed.err
    assert len(list(overlays.glob("*.png"))) == 2
    with ResultStore(store) as s:
        run_id = s.list_runs(page="smear")["run_id"].iloc[0]
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


def test_fields_that_cannot_be_segmented_are_error_rows_and_resume_finds_them_done(
    composed, tiny_model, tmp_path, capsys
):
    import numpy as np

    from core import cli
    from core.inference.store import ResultStore

    field, truth, _ = composed
    slide = tmp_path / "slide"
    slide.mkdir()
    for name, image in {
        "good.png": field,
        "tiny.png": np.full((3, 3, 3), 200, np.uint8),
        "long.png": np.zeros((3, 10000, 3), np.uint8),
        "crop.png": field[100:111, 200:221].copy(),
    }.items():
        (slide / name).write_bytes(_png(image))
    store, out = str(tmp_path / "s.sqlite"), tmp_path / "cells.csv"
    common = ["--store", store, "--out", str(out), "--no-progress"]
    assert cli.main(["smear", str(slide), "--weights", str(tiny_model), *common]) == 1
    cells = pd.read_csv(out)
    errors = cells[cells["error"].notna()]
    assert sorted(errors["image"].map(lambda p: p.rsplit("/", 1)[-1])) == [
        "crop.png",
        "long.png",
        "tiny.png",
    ]
    assert errors["error"].str.contains("too small").all()
    assert (cells["object"] == RED_CELL).sum() == len(truth)
    capsys.readouterr()
    with ResultStore(store) as s:
        run_id = s.list_runs(page="smear")["run_id"].iloc[0]
    assert cli.main(["smear", "--resume", run_id, *common]) == 1
    assert "0 to segment and score" in capsys.readouterr().err


def test_overlay_names_never_collide():
    from core.cli.smear import overlay_name

    names = {overlay_name(p) for p in ("/d/x_y.JPG", "/d/x/y.JPG", "/d/x y.JPG", "/d/x_y.JPG#2")}
    assert len(names) == 4 and all(n.endswith(".png") and "/" not in n for n in names)
