"""Case ids and labels (core.schema.labels), from file names, folders and zip members."""

from __future__ import annotations

import zipfile

import pandas as pd
import pytest

from core.schema.labels import case_id, label_from_path
from tests.helpers import score_cli as _cli


@pytest.mark.parametrize(
    "name, expected",
    [
        ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "C100"),
        ("C68P29N_ThinF_IMG_20150819_133236_cell_1.png", "C68"),
        ("C51AP12thinF_IMG_20150724_152006_cell_2.png", "C51"),
        ("C39P4thinF_original_IMG_20150622_105102_cell_9.png", "C39"),
        ("C1_thinF_IMG_20150604_104722_cell_15.png", "C1"),
        ("C208ThinF_IMG_20151112_143210_cell_3.png", "C208"),
        ("C59P20thinF_IMG_20150803_112802_cell_4.png", "C59"),
        ("C132P93ThinF_IMG_20151004_151945_cell_1.png", "C132"),
        ("C6NThinF_IMG_20150609_122233_cell_8.png", "C6"),
        ("C80P41ThinF_IMG_20150817_110520_cell_202.png", "C80"),
        ("C33P1thinF_IMG_20150619_114756a_cell_179.png", "C33"),
        ("C182P143NThinF_IMG_20151201_171950_cell_97.png", "C182"),
        ("C97P58ThinF_IMG_20150917_145555_cell_52.png", "C97"),
        ("C117P78ThinF_IMG_20150930_214511_cell_13.png", "C117"),
        ("C038thin_Original_Motic_cell_1.png", "C38"),
        ("c12p3thin_OriginalOlympusCX41_x.png", "C12"),
        ("cell_images/Parasitized/C100P61ThinF_x.png", "C100"),
        ("zip.zip!cell_images/Uninfected/C5P1_x.png", "C5"),
    ],
)
def test_case_id_parses_every_variant(name, expected):
    assert case_id(name) == expected


def test_unparsable_names_get_their_own_group():
    a, b = case_id("cell_1.png"), case_id("folder/IMG_0002.png")
    assert a.startswith("?") and b.startswith("?") and a != b
    assert not a.startswith("C")


def test_label_from_any_depth_case_insensitive():
    assert label_from_path("a/b/PARASITIZED/x.png") == "Parasitized"
    assert label_from_path("z.zip!cell_images/uninfected/x.png") == "Uninfected"
    assert label_from_path("a/b/x.png") is None
    assert label_from_path("Parasitized.png") is None


# --- 10. "!" in names (hostile input, issue 15) ---------------------------------------------------


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
