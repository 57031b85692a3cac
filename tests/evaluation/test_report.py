"""The per-patient HTML report (core.evaluation.report)."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from core import cli
from core.evaluation import report
from core.inference.store import ResultStore
from core.schema.results import OK
from core.schema.screening import Screening

INFO = report.ReportInfo(
    run_id="r1",
    model="weights/default",
    sha256="ab" * 32,
    threshold=0.5,
    screening=Screening(cutoff=0.05),
    band=0.15,
    gate="image checks",
)
EVIL = "<img src=x onerror=alert(1)>.png"


def _results() -> pd.DataFrame:
    rows = [
        ("C1_a.png", "C1", 0.95, OK, None),
        ("C1_b.png", "C1", 0.60, OK, None),
        ("C1_c.png", "C1", 0.05, OK, None),
        ("C1_d.png", "C1", 0.30, "blank", None),
        ("C1_e.png", "C1", None, None, "corrupt"),
        (f"C2_{EVIL}", "C2", 0.02, OK, None),
    ]
    return pd.DataFrame(
        [
            {
                "path": p,
                "case_id": c,
                "label": None,
                "prob_parasitized": pr,
                "prediction": None,
                "quality": q,
                "error": e,
            }
            for p, c, pr, q, e in rows
        ]
    )


def _pixels(path: str) -> np.ndarray:
    return np.full((40, 50, 3), 100 + len(path), np.uint8)


def test_the_report_states_every_figure_per_patient():
    seen = []

    def heat(images):
        seen.append(len(images))
        return [np.zeros_like(i) for i in images]

    text = report.render_report(
        _results(),
        INFO,
        read=_pixels,
        heatmaps=heat,
        gallery=2,
        now=datetime(2026, 11, 26, 12, 0, tzinfo=UTC),
    )
    c1 = text[text.index("<h2>C1</h2>") : text.index("<h2>C2")]
    # 5 images: 3 counted, 1 error, 1 not counted; 1 of 3 called Parasitized at 0.5... plus 0.6
    assert "5 images: 3 counted, 1 errors (unreadable), 1 not counted by the quality gate" in c1
    assert "(blank: 1)" in c1
    assert "<b>66.67%</b> (2 of 3 counted cells called Parasitized)" in c1
    assert re.search(r"95% Wilson interval 20\.77% to 93\.85%", c1)  # scipy's Wilson for 2/3
    assert "1 counted cells with P(Parasitized) within 0.15 of the threshold 0.5" in c1
    assert "likely infected" in c1 and "wholly above 5.00%" in c1
    assert INFO.sha256 in c1 and "weights/default" in c1 and "2026-11-26 12:00 UTC" in c1
    assert "The 2 most suspicious counted cells" in c1
    assert c1.index("C1_<wbr>a.png") < c1.index("C1_<wbr>b.png")  # highest P first
    assert "Cells for review (2)" in c1  # the blank one and the uncertain one
    assert "<td>blank</td><td>0.300</td><td>not counted</td>" in c1  # not called Uninfected
    assert "<td>uncertain</td><td>0.600</td><td>Parasitized</td>" in c1
    assert seen == [2, 1]  # heatmaps drawn for each gallery: 2 for C1, 1 for C2
    assert text.count("data:image/png;base64,") == 2 * 3
    data = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(data)[:4] == b"\x89PNG"  # embedded, self-contained
    assert "not flagged" in text[text.index("<h2>C2") :]


def test_names_are_escaped_and_unknown_patients_refused():
    text = report.render_report(_results(), INFO, read=_pixels)
    assert EVIL not in text and "&lt;img src=x onerror=alert(1)&gt;.png" in text
    assert "No images" in report.render_report(_results(), INFO)  # no reader: says why
    only = report.render_report(_results(), INFO, groups=["C2"])
    assert "<h2>C2" in only and "<h2>C1</h2>" not in only
    with pytest.raises(ValueError, match="C7"):
        report.render_report(_results(), INFO, groups=["C7"])


def test_cli_writes_a_report_of_a_scored_run(cells_dir, tiny_model, tmp_path):
    store_path = tmp_path / "st.sqlite"
    rc = cli.main(
        ["score", str(cells_dir), "--weights", str(tiny_model), "--store", str(store_path)]
        + ["--no-progress"]
    )
    assert rc == 0
    with ResultStore(store_path) as store:
        run_id = store.list_runs().iloc[0]["run_id"]
    out = tmp_path / "report.html"
    args = cli.parse(
        [
            "report",
            run_id,
            "--out",
            str(out),
            "--store",
            str(store_path),
            "--case",
            "C96",
            "--gallery",
            "3",
        ]
    )
    assert args.run(args) == 0
    text = out.read_text()
    assert "<h2>C96</h2>" in text and "<h2>C123</h2>" not in text
    assert text.count("data:image/png;base64,") == 6  # 3 cells and their 3 heatmaps
    assert "image checks only" in text  # the tiny model has no calibration
    bad = cli.parse(["report", "no-such-run", "--out", str(out), "--store", str(store_path)])
    assert bad.run(bad) == 2


def test_a_negative_gallery_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="0 or more"):
        report.render_report(_results(), INFO, gallery=-3)
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["report", "r1", "--out", str(tmp_path / "r.html"), "--gallery", "-3"])
    assert exit_.value.code == 2 and "at least 0" in capsys.readouterr().err


def _model_with_cutoff(tiny_model, folder, cutoff: float):
    import json
    import shutil

    from core.schema.contract import seal_card

    shutil.copytree(tiny_model, folder)
    card = json.loads((folder / "card.json").read_text())
    card["screening"]["cutoff"] = cutoff
    (folder / "card.json").write_text(json.dumps(card))
    seal_card(folder, force=True)
    return folder


def test_the_report_of_a_run_takes_every_number_from_the_runs_own_model(
    cells_dir, tiny_model, tmp_path
):
    from core.schema.contract import WeightsError

    other = _model_with_cutoff(tiny_model, tmp_path / "other", 0.4783)
    store_path = tmp_path / "st.sqlite"
    argv = ["score", str(cells_dir), "--weights", str(other), "--store", str(store_path)]
    assert cli.main([*argv, "--no-progress", "--name", "ward 3", "--operator", "A. N."]) == 0
    with ResultStore(store_path) as store:
        run = store.run(store.list_runs().iloc[0]["run_id"])
        results = store.results(run.run_id)
    info = report.report_info(run)
    assert info.screening.cutoff == 0.4783 and info.sha256 == run.weights_sha256
    assert (info.name, info.sample, info.operator) == ("ward 3", None, "A. N.")
    text = report.render_report(results, info)
    head, *pages = text.split("<section>")[1:]  # the cover, then one page per patient
    assert "ward 3" in head and "A. N." in head and "above 47.83%" in head
    cover = head[head.index("<table class=cover>") :]
    assert cover.count("<tr>") == 1 + results["case_id"].nunique()  # every patient of the run
    assert len(pages) == results["case_id"].nunique()
    assert all("above 47.83%" in page and "ward 3" in page for page in pages)
    # the model folder now holds other weights: refused, not reported with them
    (other / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[::-1])
    with pytest.raises(WeightsError):
        report.report_info(run)


def test_long_gallery_names_can_wrap_at_their_parts():
    long = "C100P61ThinF_IMG_20150918_144104_cell_162.png"
    rows = _results().assign(path=lambda d: d["path"].where(d["path"] != "C1_a.png", long))
    text = report.render_report(rows, INFO, read=_pixels, gallery=1)
    assert "C100P61ThinF_<wbr>IMG_<wbr>20150918_<wbr>" in text
    assert "overflow-wrap: anywhere" in text
