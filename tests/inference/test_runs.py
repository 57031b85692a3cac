"""Managing runs in the result store: names and notes, threshold, delete, a readable inputs
summary, duplicate files counted once, and stores written before these columns existed."""

from __future__ import annotations

import sqlite3

import pytest

import core.inference.engines
import core.inference.pipeline
from core.data.sources import ImageSource
from core.inference.store import ResultStore, StoreError, inputs_summary
from core.schema.labels import CLASSES, predicted_class
from core.schema.metrics import parasitemia_summary
from core.schema.results import RESULT_COLUMNS

# The schema of stores written before runs had names and results had duplicates.
_FIRST_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, started TEXT NOT NULL, finished TEXT,
    inputs TEXT NOT NULL, weights TEXT NOT NULL, weights_sha256 TEXT NOT NULL,
    threshold REAL NOT NULL, engine TEXT NOT NULL, kind TEXT NOT NULL, total INTEGER);
CREATE TABLE results (run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    path TEXT NOT NULL, case_id TEXT NOT NULL, label TEXT, prob_parasitized REAL,
    prediction TEXT, error TEXT, PRIMARY KEY (run_id, path));
INSERT INTO runs VALUES ('old', '2026-11-01T10:00:00+00:00', NULL, '["/data/cells.zip"]', 'w',
    'abc', 0.5, 'onnx', 'files', 2);
INSERT INTO results VALUES ('old', '/data/cells.zip!a.png', 'C1', NULL, 0.7, 'Parasitized', NULL);
INSERT INTO results VALUES ('old', '/data/cells.zip!b.png', 'C1', NULL, NULL, NULL, 'corrupt');
INSERT INTO runs VALUES ('old-smear', '2026-11-01T11:00:00+00:00', NULL, '["/data/f.jpg"]', 'w',
    'abc', 0.5, 'onnx', 'smear', 1);
"""


def _run(store: ResultStore, probs: list[float | None], **fields) -> str:
    run_id = store.new_run(
        inputs=["x"], weights="w", weights_sha256="0" * 64, threshold=0.5, engine="onnx", **fields
    )
    store.add_results(
        run_id,
        [
            {
                "path": f"c{i}.png",
                "case_id": "C1",
                "label": None,
                "prob_parasitized": p,
                "prediction": None if p is None else predicted_class(p, 0.5),
                "error": "corrupt" if p is None else None,
            }
            for i, p in enumerate(probs)
        ],
    )
    return run_id


def test_a_store_from_before_gets_the_new_columns_and_keeps_its_runs(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(_FIRST_SCHEMA)
    with ResultStore(path) as store:
        info = store.run("old")
        assert (info.name, info.sample, info.operator) == (None, None, None)
        assert info.title == "cells.zip"  # no name: what it scored
        results = store.results("old")
        assert list(results.columns) == list(RESULT_COLUMNS)
        assert results["duplicate_of"].isna().all() and len(results) == 2
        runs = store.list_runs()
        counts = runs.loc[0, ["stored", "errors", "duplicates", "parasitized"]]
        assert counts.tolist() == [2, 1, 0, 1]
        # runs stored before pages were: a cell run is the Score page's, a smear run the Smear's
        assert runs["run_id"].tolist() == ["old"] and info.page == "score"
        assert store.run("old-smear").page == "smear"
        assert store.list_runs(page="smear")["run_id"].tolist() == ["old-smear"]
        assert store.list_runs(page="evaluate").empty
        store.describe_run("old", name="Slide 4", sample="patient 17", operator="AB")
    with ResultStore(path) as store:  # opening it again migrates nothing twice
        info = store.run("old")
        assert (info.name, info.sample, info.operator, info.title) == (
            "Slide 4",
            "patient 17",
            "AB",
            "Slide 4",
        )


def test_a_run_is_listed_by_the_page_that_made_it(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        score = _run(store, [0.9])
        evaluate = _run(store, [0.2], page="evaluate")
        assert store.run(evaluate).page == "evaluate" and store.run(score).page == "score"
        assert store.list_runs()["run_id"].tolist() == [score]
        assert store.list_runs(page="evaluate")["run_id"].tolist() == [evaluate]
        with pytest.raises(ValueError, match="a run's page is one of"):
            _run(store, [0.2], page="audit")


def test_names_notes_threshold_and_delete(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        keep = _run(store, [0.2, 0.9], name="  keep me ", operator="AB")
        gone = _run(store, [0.55, 0.45, None])
        info = store.run(keep)
        assert (info.name, info.sample, info.operator) == ("keep me", None, "AB")
        store.describe_run(keep, name="", sample="smear 3")  # blank clears a field
        info = store.run(keep)
        assert (info.name, info.sample, info.operator) == (None, "smear 3", None)

        store.set_threshold(gone, 0.5)
        assert store.results(gone)["prediction"].fillna("").tolist() == [CLASSES[0], CLASSES[1], ""]
        store.set_threshold(gone, 0.4)  # a threshold kept with the run re-labels its cells
        assert store.run(gone).threshold == 0.4
        assert store.results(gone)["prediction"].fillna("").tolist() == [CLASSES[0], CLASSES[0], ""]
        assert store.results(keep)["prediction"].tolist() == [CLASSES[1], CLASSES[0]]
        with pytest.raises(ValueError, match="threshold"):
            store.set_threshold(gone, 1.5)

        store.delete_run(gone)
        with pytest.raises(StoreError, match="no run"):
            store.run(gone)
        assert store.list_runs()["run_id"].tolist() == [keep]
        assert store._db.execute(
            "SELECT COUNT(*) FROM results WHERE run_id = ?", (gone,)
        ).fetchone() == (0,)
        assert len(store.results(keep)) == 2
        with pytest.raises(StoreError, match="no run"):
            store.delete_run(gone)


def test_inputs_summary_names_what_was_scored_in_a_few_words():
    assert inputs_summary(["/data/2026/slides/cells.zip"]) == "cells.zip"
    assert inputs_summary(["/data/a", "/data/b.zip"]) == "a, b.zip"
    folder = [f"Parasitized/{i}.png" for i in range(16)] + ["Uninfected/x.png"]
    assert inputs_summary(folder) == "Parasitized/ (16 files), Uninfected/ (1 file)"
    assert inputs_summary([f"{i}.png" for i in range(1, 8)]) == "1.png, 2.png, 3.png and 4 more"


def test_the_same_file_twice_is_scored_once_and_counted_once(cells_dir, tiny_model, tmp_path):
    files = sorted(cells_dir.rglob("*.png"))[:3]
    items = [(f.name, f.read_bytes()) for f in files] + [
        ("copy.png", files[1].read_bytes()),
        (files[0].name, files[0].read_bytes()),
    ]
    with ResultStore(tmp_path / "s.sqlite") as store:
        df, run_id = core.inference.pipeline.score_uploads(items, weights=tiny_model, store=store)
        stored = store.results(run_id).set_index("path")
        assert store.list_runs().loc[0, "duplicates"] == 2
    dup = df.set_index("path")
    assert dup.loc["copy.png", "duplicate_of"] == files[1].name
    assert dup.loc[f"{files[0].name}#2", "duplicate_of"] == files[0].name
    assert dup.loc[["copy.png", f"{files[0].name}#2"], "prob_parasitized"].isna().all()
    assert dup.loc[[f.name for f in files], "prob_parasitized"].between(0, 1).all()
    assert dup.loc[[f.name for f in files], "duplicate_of"].isna().all()
    assert stored.loc["copy.png", "duplicate_of"] == files[1].name
    summary = parasitemia_summary(df)
    assert summary["cells"].sum() == 3 and summary["scored"].sum() == 3


def test_a_resumed_run_knows_the_files_it_stored_before(cells_dir, tiny_model, tmp_path):
    engine = core.inference.engines.load_engine(tiny_model)
    files = sorted(cells_dir.rglob("*.png"))[:2]

    def source(name, f):
        return ImageSource(name, f.read_bytes)

    with ResultStore(tmp_path / "s.sqlite") as store:
        run_id = store.new_run(
            inputs=["x"], weights="w", weights_sha256="0" * 64, threshold=0.5, engine="onnx"
        )
        core.inference.pipeline.score_sources(
            [source("a.png", files[0])], engine, store=store, run_id=run_id
        )
        later = core.inference.pipeline.score_sources(
            [source("b.png", files[1]), source("again.png", files[0])],
            engine,
            store=store,
            run_id=run_id,
        )
    assert later["duplicate_of"].fillna("").tolist() == ["", "a.png"]


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced"])
def test_a_store_deleted_moved_or_replaced_under_it_takes_no_more_writes(tmp_path, how):
    path = tmp_path / "s.sqlite"
    store = ResultStore(path)
    run_id = _run(store, [0.9])
    if how == "deleted":
        path.unlink()
    elif how == "moved":
        path.rename(tmp_path / "elsewhere.sqlite")
    else:  # a backup restored over it while it is open
        with ResultStore(tmp_path / "backup.sqlite"):
            pass
        (tmp_path / "backup.sqlite").replace(path)
    with pytest.raises(StoreError, match="deleted or moved|replaced by another file"):
        store.add_results(run_id, [])
    with pytest.raises(StoreError, match="-wal and -shm"):
        store.finish(run_id)
    store.close()
    if how == "replaced":  # the restored backup is left as it was: no run of the other file
        with ResultStore(path) as restored:
            assert restored.list_runs().empty
    if how == "moved":  # the moved store holds the run, whose rows were in the -wal at the path
        with ResultStore(tmp_path / "elsewhere.sqlite") as moved:
            assert len(moved.results(run_id)) == 1
