"""CSV exports (core.schema.export) from malaria score, the result store and the download
helper: formulas neutralised, no row split by a control character, never a torn file
(hostile input, issue 15)."""

from __future__ import annotations

import csv
import errno
import io

import pandas as pd
import pytest

from core.inference.store import ResultStore
from tests.helpers import score_cli as _cli

# Names added by issue 15 are imported inside the tests that use them, so that this file also
# runs against the code before the fix (each test then fails on its own assertion).


# --- 3. CSV injection and split rows --------------------------------------------------------------


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


# --- 4. torn exports ------------------------------------------------------------------------------


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
