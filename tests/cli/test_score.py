"""`malaria score` (core.cli.score): the files it writes, error rows, interruption and resume,
and exit 2 for bad arguments, output paths and result stores."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import core.cli.score
import core.inference.engines
import core.inference.pipeline
import core.inference.store
from core.data.sources import iter_sources
from core.inference.store import ResultStore
from core.schema.results import BLANK, OK, RESULT_COLUMNS, UNCERTAIN
from tests.helpers import score_cli as _cli


def test_cli_writes_one_row_per_image_with_the_columns(cells_dir, tiny_model, tmp_path):
    out, summary = tmp_path / "r.csv", tmp_path / "s.csv"
    rc = _cli(
        cells_dir,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--summary",
        summary,
        "--store",
        tmp_path / "st.sqlite",
        "--no-progress",
    )
    assert rc == 0
    df = pd.read_csv(out)
    assert list(df.columns) == [*RESULT_COLUMNS, "review"]
    assert (df["quality"] == "ok").all()  # real cells pass the gate (image checks here)
    assert len(df) == len(list(cells_dir.rglob("*.png")))
    assert df["prob_parasitized"].between(0, 1).all() and df["error"].isna().all()
    assert set(df["label"]) == {"Parasitized", "Uninfected"}
    assert set(df["prediction"]) <= {"Parasitized", "Uninfected"}
    assert (df["case_id"].str.match(r"^C\d+$")).all()
    s = pd.read_csv(summary)
    assert set(s["group"]) == set(df["case_id"]) and s["scored"].sum() == len(df)
    assert {"parasitemia", "ci_low", "ci_high", "mean_prob", "likely_infected"} <= set(s.columns)


def _bad_folder(cells_dir, root):
    good = sorted(cells_dir.rglob("*.png"))[:10]
    for i, f in enumerate(good):
        shutil.copy(f, root / f"{i}_{f.name}")
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("I am not an image")
    data = good[0].read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "anim.gif").write_bytes(b"GIF89a....")
    buf = io.BytesIO()
    Image.new("L", (300, 200), 128).save(buf, "JPEG")
    (root / "grey_big.jpg").write_bytes(buf.getvalue())
    (root / "a").mkdir()
    (root / "b").mkdir()
    # the same name in two folders, other bytes than any file above (same bytes: a duplicate)
    more = sorted(cells_dir.rglob("*.png"))[10:12]
    shutil.copy(more[0], root / "a" / "cell_1.png")
    shutil.copy(more[1], root / "b" / "cell_1.png")
    return 10 + 1 + 2  # good files that must be scored


def test_bad_files_are_error_rows_and_everything_else_is_scored(cells_dir, tiny_model, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    n_good = _bad_folder(cells_dir, root)
    out = tmp_path / "r.csv"
    rc = _cli(
        root,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
        "--batch-size",
        "4",
    )
    assert rc == 1  # some errors
    df = pd.read_csv(out).set_index("path")
    assert len(df) == n_good + 4
    errors = df["error"].dropna()
    assert {p.rsplit("/", 1)[-1] for p in errors.index} == {
        "zero.png",
        "text.png",
        "truncated.png",
        "anim.gif",
    }
    assert "empty" in errors[str(root / "zero.png")]
    assert "unsupported format .gif" in errors[str(root / "anim.gif")]
    assert df.loc[errors.index, "prob_parasitized"].isna().all()
    assert df["prob_parasitized"].notna().sum() == n_good
    assert str(root / "a" / "cell_1.png") in df.index and str(root / "b" / "cell_1.png") in df.index


def test_interrupted_run_keeps_results_and_resume_scores_only_the_rest(
    cells_dir, tiny_model, tmp_path, monkeypatch
):
    store_path = tmp_path / "s.sqlite"
    paths = [s.path for s in iter_sources([cells_dir.resolve()])]
    fatal = paths[16]  # the first image of the third batch of 8
    real = core.inference.engines.OnnxEngine.score
    real_decode = core.inference.pipeline._decode_batch

    def decode_and_die(sources, size):
        if any(s.path == fatal for s in sources):
            raise KeyboardInterrupt
        return real_decode(sources, size)

    monkeypatch.setattr(core.inference.pipeline, "_decode_batch", decode_and_die)
    rc = _cli(
        cells_dir,
        "--weights",
        tiny_model,
        "--store",
        store_path,
        "--no-progress",
        "--batch-size",
        "8",
    )
    assert rc == 130
    with ResultStore(store_path) as store:
        run = store.list_runs().iloc[0]
        assert run["stored"] == 16 and run["finished"] is None  # batches 1 and 2, in order
        first = store.results(run["run_id"]).set_index("path")
    assert set(first.index) == set(paths[:16])
    monkeypatch.setattr(core.inference.pipeline, "_decode_batch", real_decode)
    counted = []

    def counting(self, images):
        counted.append(len(images))
        return real(self, images)

    monkeypatch.setattr(core.inference.engines.OnnxEngine, "score", counting)
    out = tmp_path / "r.csv"
    rc = _cli(
        "--resume",
        run["run_id"],
        "--store",
        store_path,
        "--out",
        out,
        "--no-progress",
        "--batch-size",
        "8",
    )
    assert rc == 0
    n = len(list(cells_dir.rglob("*.png")))
    df = pd.read_csv(out).set_index("path")
    assert len(df) == n and df["error"].isna().all()
    assert sum(counted) == n - 16  # only the images missing from the store were scored
    pd.testing.assert_series_equal(
        df.loc[first.index, "prob_parasitized"],
        first["prob_parasitized"],
        check_exact=False,
        rtol=1e-6,
    )
    with ResultStore(store_path) as store:
        assert store.list_runs().iloc[0]["finished"] is not None
        assert store.export_csv(run["run_id"], tmp_path / "again.csv") == n


def test_missing_input_bad_weights_and_unknown_run_exit_2(tmp_path, tiny_model, cells_dir):
    assert _cli(tmp_path / "nope", "--weights", tiny_model, "--store", tmp_path / "s") == 2
    assert _cli(cells_dir, "--weights", tmp_path, "--store", tmp_path / "s") == 2
    assert _cli("--resume", "no-such-run", "--store", tmp_path / "s") == 2
    with pytest.raises(SystemExit):
        _cli(cells_dir, "--batch-size", "0")


# --- output paths (hostile input, issue 15) -------------------------------------------------------


@pytest.mark.parametrize("where", ["missing/r.csv", "a_folder"])
def test_an_unwritable_output_fails_before_scoring(
    cells_dir, tiny_model, tmp_path, monkeypatch, where
):
    (tmp_path / "a_folder").mkdir()

    def no_scoring(*args, **kwargs):
        raise AssertionError("scoring started before the output path was checked")

    monkeypatch.setattr(core.cli.score, "score_sources", no_scoring)
    rc = _cli(
        cells_dir,
        "--weights",
        tiny_model,
        "--out",
        tmp_path / where,
        "--store",
        tmp_path / "st.sqlite",
        "--no-progress",
    )
    assert rc == 2


def test_a_read_only_output_folder_fails_before_scoring(cells_dir, tiny_model, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the missing-folder case covers the check")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = _cli(
            cells_dir,
            "--weights",
            tiny_model,
            "--out",
            ro / "r.csv",
            "--store",
            tmp_path / "st.sqlite",
            "--no-progress",
        )
    finally:
        ro.chmod(0o755)
    assert rc == 2


# --- 8. store faults (hostile input, issue 15) ----------------------------------------------------


def _store_with_rows(path, n=3000):
    with ResultStore(path) as store:
        run = store.new_run(
            inputs=["x"], weights="w", weights_sha256="0" * 64, threshold=0.5, engine="onnx"
        )
        store.add_results(
            run,
            [
                {
                    "path": f"cell_{i:05d}_{'x' * 60}.png",
                    "case_id": "?x",
                    "label": None,
                    "prob_parasitized": 0.5,
                    "prediction": "Parasitized",
                    "error": None,
                }
                for i in range(n)
            ],
        )
    return path


def test_a_store_corrupted_mid_file_is_refused_with_one_line(
    cells_dir, tiny_model, tmp_path, capsys
):
    path = _store_with_rows(tmp_path / "st.sqlite")
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    data[10 * page : 12 * page] = b"\xa5" * (2 * page)  # two pages of the results table
    path.write_bytes(bytes(data))
    rc = _cli(cells_dir, "--weights", tiny_model, "--store", path, "--no-progress")
    err = capsys.readouterr().err
    assert rc == 2
    assert "corrupt" in err and "Traceback" not in err
    with sqlite3.connect(path) as db:  # and it took no new run
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_a_file_that_is_not_a_store_is_one_line_and_exit_2(cells_dir, tiny_model, tmp_path, capsys):
    path = tmp_path / "st.sqlite"
    path.write_bytes(b"this is not SQLite at all" * 200)
    assert _cli(cells_dir, "--weights", tiny_model, "--store", path, "--no-progress") == 2
    assert "corrupt" in capsys.readouterr().err


def test_a_locked_store_is_one_line_and_exit_2(
    cells_dir, tiny_model, tmp_path, monkeypatch, capsys
):
    path = _store_with_rows(tmp_path / "st.sqlite", n=10)
    monkeypatch.setattr(core.inference.store, "LOCK_TIMEOUT", 0.2, raising=False)  # old code: 30 s
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than we wait
    try:
        rc = _cli(cells_dir, "--weights", tiny_model, "--store", path, "--no-progress")
    finally:
        holder.rollback()
        holder.close()
    assert rc == 2
    assert "locked" in capsys.readouterr().err


def test_a_full_disk_under_the_store_is_one_line_and_exit_2(
    cells_dir, tiny_model, tmp_path, monkeypatch, capsys
):

    class FullStore(ResultStore):  # SQLite's own "database or disk is full", at its first write
        def new_run(self, **kwargs):
            n = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count = {n}")
            return super().new_run(**kwargs)

        def add_results(self, run_id, rows):
            super().add_results(run_id, [dict(r, error="x" * 100_000) for r in rows])

    monkeypatch.setattr(core.cli.score, "ResultStore", FullStore)
    rc = _cli(
        cells_dir, "--weights", tiny_model, "--store", tmp_path / "st.sqlite", "--no-progress"
    )
    assert rc == 2
    assert "disk is full" in capsys.readouterr().err


def test_a_read_only_store_is_one_line_and_exit_2(cells_dir, tiny_model, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip(
            "root writes into read-only files; the locked, corrupt and full cases "
            "cover the same path"
        )
    path = _store_with_rows(tmp_path / "st.sqlite", n=10)
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        rc = _cli(cells_dir, "--weights", tiny_model, "--store", path, "--no-progress")
    finally:
        tmp_path.chmod(0o755)
    assert rc == 2
    assert "read-only" in capsys.readouterr().err


# --- 2. empty folders (hostile input, issue 15) ---------------------------------------------------


def test_an_empty_folder_is_an_error_and_exit_2(tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no cells here")
    out = tmp_path / "r.csv"
    rc = _cli(
        tmp_path / "empty",
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
    )
    assert rc == 2
    df = pd.read_csv(out)
    assert len(df) == 1 and "no images in this folder" in df["error"][0]
    assert "no image could be scored" in capsys.readouterr().err


# --- the quality gate, duplicates, --ray ----------------------------------------------------------


def test_cli_flags_non_cells_leaves_them_out_and_says_how_many(
    cells_dir, tiny_model, tmp_path, capsys
):
    from PIL import Image

    root = tmp_path / "in"
    root.mkdir()
    for p in sorted(cells_dir.rglob("*.png"))[:6]:
        (root / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (200, 150)).save(root / "black.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(root / "C9_noise.png")
    out, summary = tmp_path / "r.csv", tmp_path / "s.csv"
    rc = _cli(
        root,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--summary",
        summary,
        "--store",
        tmp_path / "st.sqlite",
        "--no-progress",
        "--band",
        "0.2",
    )
    assert rc == 0
    df = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert df.loc[str(root / "black.png"), "quality"] == BLANK
    assert df.loc[str(root / "C9_noise.png"), "review"].startswith("not a cell")
    cells = df.drop(index=[str(root / "black.png"), str(root / "C9_noise.png")])
    assert (cells["quality"] == OK).all()
    band = (cells["prob_parasitized"] - 0.5).abs() < 0.2
    assert ((cells["review"] == UNCERTAIN) == band).all()
    s = pd.read_csv(summary).set_index("group")
    assert s.loc["C9", "not_counted"] == 1 and s.loc["C9", "scored"] == 0
    assert not s.loc["C9", "likely_infected"]
    assert s["uncertain"].sum() == band.sum()
    err = capsys.readouterr().err
    assert "2 not counted (failed the quality gate)" in err
    assert "image checks only" in err  # the tiny model has no calibration: said, not hidden
    assert (
        _cli(root, "--weights", tiny_model, "--band", "0.7", "--store", tmp_path / "st.sqlite") == 2
    )


def test_cli_names_the_run_and_reports_duplicates(cells_dir, tiny_model, tmp_path, capsys):
    folder = tmp_path / "cells"
    shutil.copytree(cells_dir, folder)
    first = sorted(folder.rglob("*.png"))[0]
    shutil.copy(first, first.parent / "zz_copy.png")
    out = tmp_path / "r.csv"
    store = tmp_path / "s.sqlite"
    rc = _cli(
        folder,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        store,
        "--no-progress",
        "--name",
        "Ward 3 smears",
        "--sample",
        "patient 12",
        "--operator",
        "AB",
    )
    assert rc == 0
    df = pd.read_csv(out)
    assert df["duplicate_of"].notna().sum() == 1
    assert df.set_index("path").loc[str(first.parent / "zz_copy.png"), "duplicate_of"] == str(first)
    assert "1 duplicates" in capsys.readouterr().err
    with ResultStore(store) as s:
        info = s.run(s.list_runs().loc[0, "run_id"])
    assert (info.name, info.sample, info.operator) == ("Ward 3 smears", "patient 12", "AB")


def test_without_ray_or_with_a_bad_address_the_cli_exits_2(
    mixed_inputs, tiny_model, tmp_path, monkeypatch, capsys
):
    store = tmp_path / "s.sqlite"
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert _cli(mixed_inputs, "--weights", tiny_model, "--store", store, "--ray") == 2
    err = capsys.readouterr().err
    assert "pip install -r requirements-cluster.lock" in err
    # `--ray cells/`: the input is taken for the address; say so rather than join "cells/"
    assert _cli("--weights", tiny_model, "--store", store, "--ray", mixed_inputs) == 2
    assert "put --ray after the inputs" in capsys.readouterr().err
    assert not store.exists()  # refused before a run was recorded


def test_a_store_deleted_during_a_run_stops_it_with_exit_2_and_keeps_the_csv(
    cells_dir, tiny_model, tmp_path, monkeypatch, capsys
):
    store_path, out = tmp_path / "st.sqlite", tmp_path / "r.csv"
    out.write_text("the CSV of an earlier run\n")
    real = core.inference.pipeline._decode_batch
    batches = []

    def decode_then_delete(sources, size):
        batches.append(1)
        if len(batches) == 2:  # the first batch is being stored: the store goes
            store_path.unlink()
        return real(sources, size)

    monkeypatch.setattr(core.inference.pipeline, "_decode_batch", decode_then_delete)
    rc = _cli(
        cells_dir, "--weights", tiny_model, "--store", store_path, "--out", out,
        "--no-progress", "--batch-size", "8",
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert "was deleted or moved" in err[-1] and err[-1].startswith("error: ")
    assert out.read_text() == "the CSV of an earlier run\n"
