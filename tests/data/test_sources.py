"""Hostile input, built in a temporary folder: tampered cards, injected names, torn exports,
faulty stores, lying zips, links. Each test fails on the code before issue 15 was fixed."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import struct
import tracemalloc
import zipfile

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from PIL import Image
from streamlit import config
from streamlit.web.server.starlette.starlette_websocket import is_host_allowed

import core.cli.score
import core.inference.onnx_cache
import core.inference.store
from core import cli
from core.data.images import ImageError, decode_image
from core.data.sources import iter_sources
from core.inference.engines import load_engine
from core.inference.store import ResultStore
from core.nets.model import build_model, default_contract, load_model, save_model
from core.schema.contract import ModelContract, WeightsError, read_card
from tests.helpers import REPO

# Names added by issue 15 are imported inside the tests that use them, so that this file also
# runs against the code before the fix (each test then fails on its own assertion).


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_contract(folder, **changes):
    card = json.loads((folder / "card.json").read_text())
    card["contract"].update(changes)
    (folder / "card.json").write_text(json.dumps(card))


# --- 1. the card's contract ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"classes": ["Uninfected", "Parasitized"]}, "invalid model contract"),
        ({"classes": ["Parasitized", "Uninfected", "Other"]}, "invalid model contract"),
        ({"threshold": 5}, "invalid model contract"),
        ({"threshold": -1}, "invalid model contract"),
        ({"input_size": 0}, "invalid model contract"),
        ({"threshold": 0.9}, "does not match its contract_sha256"),  # valid, but not what was saved
    ],
)
def test_a_tampered_contract_is_refused_on_load(tiny_model, tmp_path, changes, message):
    folder = _copy_model(tiny_model, tmp_path / "m")
    _edit_contract(folder, **changes)
    with pytest.raises(WeightsError, match=message):
        load_model(folder)
    with pytest.raises(WeightsError, match=message):
        load_engine(folder, "onnx")


def test_a_card_without_contract_hash_is_refused_until_sealed(tiny_model, tmp_path):
    from core import cli

    folder = _copy_model(tiny_model, tmp_path / "m")
    card = json.loads((folder / "card.json").read_text())
    del card["contract_sha256"]
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="malaria seal"):
        load_model(folder)
    assert cli.main(["seal", str(folder)]) == 0
    assert load_model(folder).contract.threshold == card["contract"]["threshold"]


def test_the_shipped_cards_are_sealed():
    from core.schema.contract import DEFAULT_WEIGHTS, contract_sha256, find_models

    for folder in find_models(DEFAULT_WEIGHTS.parent):
        card = read_card(folder)
        assert card["contract_sha256"] == contract_sha256(
            ModelContract.from_json(card["contract"]), card["sha256"]
        )


def test_contract_values_are_validated_on_construction():
    from core.schema.contract import ContractError

    with pytest.raises(ContractError, match="classes"):
        ModelContract(classes=("Uninfected", "Parasitized"))
    with pytest.raises(ContractError, match="threshold"):
        ModelContract(threshold=float("nan"))
    with pytest.raises(ContractError, match="input_size"):
        ModelContract(input_size=4096)
    with pytest.raises(ContractError, match="std"):
        ModelContract(std=(0.2, 0.0, 0.2))


# --- 3. CSV injection and split rows ------------------------------------------------------------


def _cli(*argv) -> int:
    return cli.main(["score", *(str(a) for a in argv)])


INJECTED = [
    '=HYPERLINK("x.invalid").png',
    "+1.png",
    "-1.png",
    "@SUM(1).png",
    "cr\rsplit.png",
    "lf\nsplit.png",
    "plain.png",
]


def _injected_folder(cells_dir, root):
    data = sorted(cells_dir.rglob("*.png"))[0].read_bytes()
    root.mkdir()
    for name in INJECTED:
        (root / name).write_bytes(data)
    return root


def test_exports_neutralise_formulas_and_keep_control_characters_inside_cells(
    cells_dir, tiny_model, tmp_path
):
    root = _injected_folder(cells_dir, tmp_path / "in")
    out, summary = tmp_path / "r.csv", tmp_path / "s.csv"
    assert (
        _cli(
            root,
            "--weights",
            tiny_model,
            "--out",
            out,
            "--summary",
            summary,
            "--group-by",
            "folder",
            "--store",
            tmp_path / "st.sqlite",
            "--no-progress",
        )
        == 0
    )
    df = pd.read_csv(out)
    assert len(df) == len(INJECTED)  # no row split by a carriage return or a line feed
    names = [p.rsplit("/", 1)[-1] for p in df["path"]]
    assert sorted(names) == sorted(INJECTED)  # absolute paths: nothing to neutralise here
    assert df["prob_parasitized"].dtype.kind == "f"  # numbers stay numeric
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == len(INJECTED) + 1
    for row in rows[1:]:
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)


def test_exporting_an_uploaded_run_neutralises_formula_names(tmp_path):
    with ResultStore(tmp_path / "st.sqlite") as store:
        run = store.new_run(
            inputs=["=x.png"],
            weights="w",
            weights_sha256="0" * 64,
            threshold=0.5,
            engine="onnx",
            kind="upload",
        )
        store.add_results(
            run,
            [
                {
                    "path": name,
                    "case_id": "?" + name,
                    "label": None,
                    "prob_parasitized": 0.5,
                    "prediction": "Parasitized",
                    "error": None,
                }
                for name in (
                    "=1+1.png",
                    "+x.png",
                    "-x.png",
                    "@x.png",
                    "\tx.png",
                    "\rx.png",
                    "ok.png",
                )
            ],
        )
        store.export_csv(run, tmp_path / "r.csv")
    df = pd.read_csv(tmp_path / "r.csv")
    assert len(df) == 7
    assert sorted(df["path"]) == sorted(
        ["'=1+1.png", "'+x.png", "'-x.png", "'@x.png", "'\tx.png", "'\rx.png", "ok.png"]
    )
    assert df["prob_parasitized"].tolist() == [0.5] * 7


def test_the_download_csv_helper_neutralises_text_and_keeps_numbers():
    from core.schema.export import to_csv_text

    df = pd.DataFrame(
        {
            "path": ["=cmd|' /C calc'!A0", "-2+3", "ok\r.png", "\tx"],
            "prob_parasitized": [0.25, -1.0, None, 1.0],
            "n": [1, -2, 3, 4],
        }
    )
    back = pd.read_csv(io.StringIO(to_csv_text(df)))
    assert list(back["path"]) == ["'=cmd|' /C calc'!A0", "'-2+3", "ok\r.png", "'\tx"]
    assert back["prob_parasitized"].tolist()[:2] == [0.25, -1.0]
    assert back["n"].tolist() == [1, -2, 3, 4]


# --- 4. torn exports and output paths -----------------------------------------------------------


def _disk_full_after_half(monkeypatch):
    """Make every DataFrame.to_csv write half its text, then fail as a full disk does."""
    real = pd.DataFrame.to_csv

    def half_then_enospc(self, path_or_buf=None, *args, **kwargs):
        text = real(self, None, *args, **kwargs)
        if isinstance(path_or_buf, (str, bytes)) or hasattr(path_or_buf, "__fspath__"):
            with open(path_or_buf, "w") as f:
                f.write(text[: len(text) // 2])
        elif path_or_buf is not None:
            path_or_buf.write(text[: len(text) // 2])
        else:
            return text
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_enospc)


@pytest.mark.parametrize("option", ["--out", "--summary"])
def test_a_failed_export_keeps_the_previous_file(
    cells_dir, tiny_model, tmp_path, monkeypatch, option
):
    target = tmp_path / "export.csv"
    target.write_text("the good export\n")
    _disk_full_after_half(monkeypatch)
    rc = _cli(
        cells_dir,
        "--weights",
        tiny_model,
        option,
        target,
        "--store",
        tmp_path / "st.sqlite",
        "--no-progress",
    )
    assert rc == 2
    assert target.read_text() == "the good export\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


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


# --- 8. store faults ----------------------------------------------------------------------------


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


# --- 2. unreadable folders, FIFOs, empty folders ------------------------------------------------


def _cells_in_folders(cells_dir, root, folders=("a", "b", "c"), per=8):
    files = sorted(cells_dir.rglob("*.png"))
    for i, name in enumerate(folders):
        (root / name).mkdir(parents=True)
        for f in files[i * per : (i + 1) * per]:
            (root / name / f.name).write_bytes(f.read_bytes())
    return root


def test_an_unreadable_subfolder_is_an_error_row_not_silence(
    cells_dir, tiny_model, tmp_path, monkeypatch
):
    root = _cells_in_folders(cells_dir, tmp_path / "cells")
    blocked = root / "b"
    real_scandir = os.scandir

    def scandir(path="."):  # what chmod 000 does for a non-root user (root reads anything)
        if os.path.abspath(path) == str(blocked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
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
    )
    df = pd.read_csv(out)
    assert rc == 1
    assert df["prob_parasitized"].notna().sum() == 16
    [row] = df[df["error"].notna()].itertuples()
    assert row.path == str(blocked) and "cannot read this folder" in row.error


def test_an_unreadable_subfolder_for_real(cells_dir, tiny_model, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads folders whatever their mode; the scandir test above covers it")
    root = _cells_in_folders(cells_dir, tmp_path / "cells")
    (root / "b").chmod(0)
    try:
        rc = _cli(
            root,
            "--weights",
            tiny_model,
            "--out",
            tmp_path / "r.csv",
            "--store",
            tmp_path / "s.sqlite",
            "--no-progress",
        )
    finally:
        (root / "b").chmod(0o755)
    df = pd.read_csv(tmp_path / "r.csv")
    assert rc == 1 and df["error"].notna().sum() == 1


def test_a_fifo_as_input_or_in_a_folder_is_an_error_row(cells_dir, tiny_model, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    out = tmp_path / "r.csv"
    rc = _cli(
        fifo,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
    )
    assert rc == 2  # nothing scored
    df = pd.read_csv(out)
    assert len(df) == 1 and "not a regular file" in df["error"][0]

    root = _cells_in_folders(cells_dir, tmp_path / "cells", folders=("a",), per=3)
    os.mkfifo(root / "a" / "stream.png")  # would block a reader forever
    rc = _cli(
        root,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
    )
    df = pd.read_csv(out)
    assert rc == 1 and len(df) == 4
    assert "not a regular file" in df.set_index("path").loc[str(root / "a" / "stream.png"), "error"]


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


# --- 11. links out of the input folder ------------------------------------------------------------


def _linked_folder(cells_dir, tmp_path):
    store = _cells_in_folders(cells_dir, tmp_path / "annex", folders=("objects",), per=6)
    root = tmp_path / "data"
    root.mkdir()
    for f in sorted((store / "objects").iterdir()):
        (root / f.name).symlink_to(f)  # how DVC, git-annex and many pipelines keep data
    return root


def test_a_folder_of_links_is_error_rows_that_say_so_and_exits_non_zero(
    cells_dir, tiny_model, tmp_path
):
    root = _linked_folder(cells_dir, tmp_path)
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
    )
    assert rc != 0
    df = pd.read_csv(out)
    assert len(df) == 6 and df["prob_parasitized"].isna().all()
    assert df["error"].str.contains("outside the input folder").all()
    assert df["error"].str.contains("--follow-links").all()


def test_follow_links_scores_what_the_links_point_to(cells_dir, tiny_model, tmp_path):
    root = _linked_folder(cells_dir, tmp_path)
    (root / "more").symlink_to(tmp_path / "annex", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # walked once, not forever
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
        "--follow-links",
    )
    df = pd.read_csv(out)
    assert rc == 0 and len(df) == 12 and df["error"].isna().all()


# --- 5. zip members whose size header lies --------------------------------------------------------


def _lying_zip(path, *, real_mb=100, declared=20_000):
    """A zip of one member that inflates to ``real_mb`` MiB while its headers say ``declared``
    bytes."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z,
        z.open("cells/C1P1_cell_1.png", "w") as f,
    ):
        block = b"\0" * 2**20
        for _ in range(real_mb):
            f.write(block)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 22, declared)  # local header: uncompressed size
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, declared)  # central directory: the one read
    path.write_bytes(bytes(data))
    return path


def test_a_lying_zip_member_is_inflated_in_bounded_memory(tmp_path):
    [src] = iter_sources([_lying_zip(tmp_path / "bomb.zip")])
    tracemalloc.start()
    try:
        with pytest.raises(ImageError):
            src.read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"reading one member peaked at {peak / 2**20:.0f} MiB"


# --- 10. EXIF orientation and "!" in names ------------------------------------------------------


def test_exif_orientation_is_applied():
    pixels = np.zeros((60, 100, 3), np.uint8)
    pixels[:, :50] = (200, 30, 30)  # red left half, blue right half: rotation shows
    pixels[:, 50:] = (30, 30, 200)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    assert out.shape == (100, 60, 3)  # portrait, as a viewer shows it
    top, bottom = out[:40].reshape(-1, 3).mean(0), out[-40:].reshape(-1, 3).mean(0)
    assert top[0] > top[2] + 100 and bottom[2] > bottom[0] + 100  # red on top after the turn
    resized = decode_image(buf.getvalue(), size=32)  # the JPEG draft path too
    assert resized[:8].reshape(-1, 3).mean(0)[0] > resized[-8:].reshape(-1, 3).mean(0)[0] + 100


def test_case_ids_come_from_the_member_name_only(cells_dir, tiny_model, tmp_path):
    data = sorted(cells_dir.rglob("*.png"))[0].read_bytes()
    root = tmp_path / "in"
    root.mkdir()
    (root / "a!b.png").write_bytes(data)
    (root / "C7P1!x_cell_1.png").write_bytes(data)
    with zipfile.ZipFile(root / "slides.zip", "w") as z:
        z.writestr("C12P3_cell_1.png", data)  # at the zip's root
        z.writestr("x!C9.png", data)
    out = tmp_path / "r.csv"
    assert (
        _cli(
            root,
            "--weights",
            tiny_model,
            "--out",
            out,
            "--store",
            tmp_path / "s.sqlite",
            "--no-progress",
        )
        == 0
    )
    ids = dict(
        zip([p.rsplit("/", 1)[-1] for p in pd.read_csv(out)["path"]], pd.read_csv(out)["case_id"])
    )
    assert ids == {
        "a!b.png": "?a!b",
        "C7P1!x_cell_1.png": "C7",
        "slides.zip!C12P3_cell_1.png": "C12",
        "slides.zip!x!C9.png": "?x!C9",
    }


# --- 6. DNS rebinding ---------------------------------------------------------------------------


def test_the_dashboard_accepts_only_localhost_names(monkeypatch):
    monkeypatch.chdir(REPO)  # where `make run` starts it
    try:
        config.get_config_options(force_reparse=True)
        assert not is_host_allowed("evil.example")
        assert not is_host_allowed("evil.example:8501")
        assert not is_host_allowed("localhost.evil.example")
        for host in ("localhost:8501", "127.0.0.1:8501", "[::1]:8501", "localhost"):
            assert is_host_allowed(host), host
    finally:
        config.get_config_options(force_reparse=True)


# --- 9. the ONNX cache --------------------------------------------------------------------------


def test_a_replaced_onnx_export_is_exported_again_not_run(tiny_model, cells_dir, tmp_path):
    images = np.stack(
        [decode_image(s.read(), size=128) for s in list(iter_sources([cells_dir]))[:8]]
    )
    genuine = load_engine(tiny_model, "onnx")  # exports and caches the graph
    cached = core.inference.onnx_cache.onnx_path(genuine.sha256, genuine.contract)
    assert cached.is_file()

    torch.manual_seed(123)  # the attacker's graph: another network, same inputs and outputs
    save_model(
        tmp_path / "other", build_model("mobilenet_v2").eval(), default_contract("mobilenet_v2"), {}
    )
    fake = core.inference.onnx_cache.export_onnx(
        tmp_path / "other", tmp_path / "fake.onnx"
    ).read_bytes()
    fake_probs = ort.InferenceSession(fake).run(None, {"images": images})[0]
    cached.write_bytes(fake)
    for beside in cached.parent.glob(cached.stem + ".*"):  # rewrite whatever sits beside it
        if beside != cached:
            beside.write_text(hashlib.sha256(fake).hexdigest())

    reference = load_engine(tiny_model, "torch")(images)
    assert np.abs(fake_probs - reference).max() > 1e-3  # the replacement would be visible
    assert np.abs(load_engine(tiny_model, "onnx")(images) - reference).max() < 1e-4
    assert cached.read_bytes() != fake  # and the cache holds a genuine export again


def test_without_a_private_key_the_export_is_made_afresh_and_not_cached(
    tiny_model, tmp_path, monkeypatch
):
    key = tmp_path / "cache.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)  # readable by others: anyone could sign a graph with it
    monkeypatch.setattr(core.inference.onnx_cache, "KEY_FILE", key)
    monkeypatch.setattr(core.inference.onnx_cache, "CACHE_DIR", tmp_path / "cache")
    assert core.inference.onnx_cache._cache_key() is None
    assert load_engine(tiny_model, "onnx").sha256
    assert not (tmp_path / "cache").exists()


def test_training_data_behind_links_stops_training_or_is_followed_on_request(cells_dir, tmp_path):
    from core import cli
    from core.data.sources import load_array
    from core.data.splits import labelled_samples

    cache = tmp_path / "cache"
    shutil.copytree(cells_dir, cache)
    root = tmp_path / "data"
    for f in sorted(cache.rglob("*.png")):
        link = root / f.relative_to(cache)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    samples, sources = labelled_samples([root])
    with pytest.raises(ImageError, match="not followed.*--follow-links"):
        load_array([sources[s.path] for s in samples], size=32)
    samples, sources = labelled_samples([root], follow_links=True)
    assert (
        load_array([sources[s.path] for s in samples], size=32).shape[0]
        == len(samples)
        == len(list(cells_dir.rglob("*.png")))
    )
    assert cli.parse(["train", "--data", "d", "--out", "o", "--follow-links"]).follow_links
