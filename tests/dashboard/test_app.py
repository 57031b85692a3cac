"""The dashboard from its entrypoint, page by page, with Streamlit's AppTest (no browser)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.schema.files import REPO_ROOT
from tests.helpers import BACKGROUND
from tests.helpers import cell_images as _cell_images
from tests.helpers import paste as _paste
from tests.helpers import png as _png

pytestmark = pytest.mark.slow  # Streamlit AppTest: the whole app runs for each page

ROOT = REPO_ROOT
APP = str(ROOT / "dashboard" / "app.py")
PAGES = (
    "views/home.py",
    "views/lesson.py",
    "views/score.py",
    "views/smear.py",
    "views/adapt.py",
    "views/explain.py",
    "views/methods.py",
    "views/evaluate.py",
    "views/audit.py",
    "views/training.py",
    "views/study.py",
)


@pytest.fixture
def app(tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("MALARIA_STORE", str(tmp_path / "store.sqlite"))
    import dashboard.resources

    dashboard.resources.store.clear()
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception
    return at


def _values(trace: dict, axis: str = "y") -> list[float]:
    """A Plotly trace's finite values along ``axis``: a list in the chart's JSON, or a typed
    array (``{"dtype", "bdata"}``, base64) where the figure was given NumPy data."""
    import base64

    data = trace.get(axis, [])
    if isinstance(data, dict):
        data = np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"]).tolist()
    return [float(v) for v in data if v is not None and np.isfinite(float(v))]


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error] + [str(x.value) for x in at.exception]


def test_every_page_renders_without_exception(app):
    assert [s.label for s in app.selectbox][:1] == ["Model"]  # the sidebar's model picker
    assert "weights/study/runs/small_cnn" in app.sidebar.selectbox[0].options
    assert any(e.label == "Model card" for e in app.expander)
    for page in PAGES:
        app.switch_page(page).run()
        assert not _errors(app), (page, _errors(app))
    app.sidebar.selectbox[0].set_value(ROOT / "weights/study/runs/small_cnn").run()
    assert app.session_state["model_folder"].endswith("small_cnn")
    for page in PAGES:  # a model from the study, from scratch, with its own layers
        app.switch_page(page).run()
        assert not _errors(app), ("small_cnn", page, _errors(app))


def test_scoring_fixture_cells_shows_results_and_parasitemia(app, cells_dir, monkeypatch):
    items = [
        (f"{p.parent.name}/{p.name}", p.read_bytes()) for p in sorted(cells_dir.rglob("*.png"))
    ]
    items.append(("broken.png", b"not an image"))
    app.session_state["pending_items"] = items
    app.switch_page("views/score.py").run()
    assert not _errors(app), _errors(app)
    results = app.session_state["results"]
    assert len(results) == len(items)
    assert results["error"].notna().sum() == 1
    assert results.set_index("path").loc["broken.png", "error"]
    assert any("Errors" in m.label and m.value == "1" for m in app.metric)
    assert len(app.dataframe) >= 2  # cells and the parasitemia summary
    table = app.dataframe[0].value
    assert len(table) == len(items) and table.set_index("path").loc["broken.png", "error"]
    assert any("scored" in c.value and "weights/default" in c.value for c in app.caption)
    thumbs = table.set_index("path")["thumb"]
    assert all(
        isinstance(t, str) and t.startswith("data:image/jpeg;base64,")
        for t in thumbs.drop("broken.png")
    )
    assert thumbs.isna()["broken.png"]
    import dashboard.images

    made = []
    thumbnail = dashboard.images.thumbnail
    monkeypatch.setattr(
        dashboard.images, "thumbnail", lambda *a, **k: made.append(a) or thumbnail(*a, **k)
    )
    # moving the threshold re-labels without rescoring, and without making thumbnails again
    app.slider[0].set_value(0.99).run()
    assert not _errors(app)
    assert not made and app.dataframe[0].value["thumb"].equals(table["thumb"])
    app.session_state["score_thumbs"] = None  # forgotten: made again, through the same call
    app.run()
    assert len(made) == len(items) - 1
    called = next(m for m in app.metric if m.label == "Called parasitized")
    assert int(called.value.replace(",", "")) == int((results["prob_parasitized"] >= 0.99).sum())
    assert not any("another model" in w.value for w in app.warning)
    # with another model selected, the results on show say they are not its own, on every rerun
    app.sidebar.selectbox[0].set_value(ROOT / "weights/study/runs/small_cnn").run()
    app.run()
    assert not _errors(app), _errors(app)
    assert any("come from another model" in w.value for w in app.warning)


def test_explain_opens_on_a_sample_with_pointing_and_road(app):
    app.switch_page("views/explain.py").run()  # opened directly: a sample is on show
    assert not _errors(app), _errors(app)
    first = app.session_state["explain_item"]
    assert first and first[0].startswith("samples/Parasitized/")
    assert any(m.label == "P(Parasitized)" for m in app.metric)
    assert sum("ROAD" in c.value for c in app.caption) >= 3  # one per default method
    verdicts = [m.value for m in app.markdown if m.value.startswith("explains ")]
    assert len(verdicts) == 3 and "peak on the stained parasite" in verdicts[0]  # the default
    captions = [i.caption for e in app.get("image") for i in e.proto.imgs]
    assert sum("16x16 map" in c for c in captions) == 3  # the stage's own map size, per panel
    # picking another sample in the list shows that one
    other = next((ROOT / "dashboard" / "samples" / "Uninfected").glob("*.png"))
    app.selectbox(key="explain_sample").set_value(f"samples/Uninfected/{other.name}").run()
    assert not _errors(app), _errors(app)
    assert app.session_state["explain_item"][0] == f"samples/Uninfected/{other.name}"
    assert sum("ROAD" in c.value for c in app.caption) >= 3


def test_explain_judges_pointing_only_for_the_parasitized_map(app):
    app.switch_page("views/explain.py").run()  # a Parasitized sample: a stained dot is located
    assert any("outlined in white" in c.value for c in app.caption)
    app.selectbox(key="explain_target").set_value("uninfected").run()
    assert not _errors(app), _errors(app)
    verdicts = [m.value for m in app.markdown if m.value.startswith("explains ")]
    assert len(verdicts) == 3 and all("**Uninfected**" in v for v in verdicts)
    assert not any("✘" in v or "✔" in v for v in verdicts)  # no mark: nothing is judged
    assert all("stained dot" in v and "not judged" in v for v in verdicts)
    app.selectbox(key="explain_target").set_value("parasitized").run()
    verdicts = [m.value for m in app.markdown if m.value.startswith("explains ")]
    assert all("✘" in v or "✔" in v for v in verdicts)  # the Parasitized map is judged


def test_explain_shows_the_probability_score_gave_and_names_the_engines(app, cells_dir):
    items = [
        (f"{p.parent.name}/{p.name}", p.read_bytes()) for p in sorted(cells_dir.rglob("*.png"))
    ]
    app.session_state["pending_items"] = items
    app.switch_page("views/score.py").run()
    results = app.session_state["results"].set_index("path")["prob_parasitized"]
    assert any("onnx-int8" in c.value for c in app.caption)  # Score names its engine
    app.switch_page("views/explain.py").run()
    app.radio(key="explain_source").set_value("A cell from the scored results").run()
    # cells where int8 and the PyTorch model differ in the third decimal (0.842 vs 0.915)
    for cell in ("Uninfected/C176P137NThinF_IMG_20151201_121808_cell_24.png", items[0][0]):
        app.selectbox(key="explain_cell").set_value(cell).run()
        assert not _errors(app), _errors(app)
        headline = next(m for m in app.metric if m.label == "P(Parasitized)")
        assert headline.value == f"{results[cell]:.3f}", cell
        engines = next(c.value for c in app.caption if c.value.startswith("by the "))
        assert "**onnx-int8** engine" in engines and "PyTorch model" in engines


def test_home_says_which_model_saw_the_sample_patients(app):
    caption = next(c.value for c in app.caption if c.value.startswith("Development cells"))
    # the shipped model trained on all 100 development patients; holdout tested on these six
    assert "trained on all 100 development patients" in caption and "no test" in caption
    assert "weights/holdout" in caption and "15 test patients" in caption
    readme = (ROOT / "README.md").read_text()
    assert "the shipped model trained on them" in readme and "held-out patients" not in readme
    app.sidebar.selectbox[0].set_value(ROOT / "weights/holdout").run()
    assert any(c.value.startswith("Cells of this model's test patients") for c in app.caption)


def test_study_names_the_model_its_figures_are_of_and_fits_its_tables(app):
    import pandas as pd

    from core.schema.labels import is_parasitized
    from core.schema.metrics import binary_metrics

    app.switch_page("views/study.py").run()
    assert not _errors(app), _errors(app)
    layers, models = (d.value for d in app.main.dataframe)
    assert len(layers.columns) <= 9 and "accuracy_std" not in layers.columns  # mean ± std
    assert layers["accuracy"].str.fullmatch(r"0\.\d{3} ± 0\.\d{3}").all()
    assert len(models.columns) <= 10 and not models["model"].str.contains("shipped").any()
    row = models.set_index("model").loc["MobileNetV2 fine-tuned from ImageNet (weights/holdout)"]
    test = pd.read_csv(ROOT / "weights/holdout/test_predictions.csv")
    m = binary_metrics(is_parasitized(test["label"]), test["prob_parasitized"], threshold=0.5)
    assert row["accuracy"] == pytest.approx(m["accuracy"]) and row["auc"] == pytest.approx(m["auc"])
    assert any("weights/holdout's" in c.value for c in app.caption)


def test_heatmap_check_page_reads_the_models_table(app):
    app.switch_page("views/methods.py").run()
    assert not _errors(app), _errors(app)
    assert len(app.get("plotly_chart")) == 1
    assert any("hirescam at features.6" in m.value for m in app.markdown)
    table = app.dataframe[0].value
    assert {"method", "layer", "pointing", "road", "ms_per_image"} <= set(table.columns)
    assert table["default"].sum() == 1
    # every figure with its count and its Wilson interval; one on a few cells is never first
    from core.schema.proportions import wilson_interval

    assert table["cells"].min() < 50  # the shipped check holds ScoreCAM on 4 cells
    row = table.iloc[0]
    assert row["cells"] >= 50 and table["cells"].lt(50).is_monotonic_increasing  # few: last
    k = round(row["pointing"] * row["cells"])
    assert (row["pointing_low"], row["pointing_high"]) == wilson_interval(k, row["cells"])
    figure = json.loads(app.get("plotly_chart")[0].proto.spec)
    main, grey = figure["data"]
    assert main["y"][0] == row["method"]  # the grid ranks as the table does
    labels = [t for trace in (main, grey) for r in trace["text"] for t in r if t]
    assert len(labels) == len(table) and all("n = " in t and "–" in t for t in labels)
    few = set(table.loc[table["cells"] < 50, "method"])
    assert set(main["y"][-len(few) :]) == few  # the methods measured on few cells: last, grey
    assert all(t for m, r in zip(grey["y"], grey["text"]) if m in few for t in r)


def test_an_empty_upload_is_a_clear_error(app):
    app.session_state["pending_items"] = [("notes.zip", b"PK\x05\x06" + b"\x00" * 18)]
    app.switch_page("views/score.py").run()
    assert not app.exception
    assert any("no images" in e.value for e in app.error)


def test_weights_failing_their_hash_are_a_clear_error(app, tiny_model, tmp_path, monkeypatch):
    import shutil

    import dashboard.widgets
    from core.schema.contract import DEFAULT_WEIGHTS

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_model, tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(
        dashboard.widgets, "model_choices", lambda: [DEFAULT_WEIGHTS.resolve(), tampered.resolve()]
    )
    app.run()
    app.sidebar.selectbox[0].set_value(tampered.resolve()).run()
    app.switch_page("views/score.py").run()
    assert not app.exception
    assert any("does not match its card" in e.value for e in app.error)
    app.sidebar.selectbox[0].set_value(DEFAULT_WEIGHTS.resolve()).run()  # the app stays usable
    assert not _errors(app), _errors(app)
    assert app.title[0].value == "Score cells"


def _unescape(markdown: str) -> str:
    import re

    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown)


HOSTILE = "![p](https:example.invalid).png"  # an image Markdown would fetch from that host


def test_file_names_are_plain_text_on_the_explain_page(app):
    sample = next((ROOT / "dashboard" / "samples" / "Parasitized").glob("*.png"))
    app.session_state["explain_item"] = (f"up/{HOSTILE}", sample.read_bytes())
    app.switch_page("views/explain.py").run()
    assert not _errors(app), _errors(app)
    [caption] = [
        i.proto.imgs[0].caption for i in app.get("image") if "original" in i.proto.imgs[0].caption
    ]
    assert _unescape(caption) == f"original · {HOSTILE}"
    assert "![" not in caption and "](" not in caption and "https:" not in caption
    app.session_state["explain_item"] = (HOSTILE, b"not an image")
    app.run()
    [error] = [e.value for e in app.error]
    assert _unescape(error).startswith(HOSTILE + ": ")
    assert "![" not in error and "](" not in error and "https:" not in error


def test_group_names_are_plain_text_in_the_parasitemia_chart(app, cells_dir):
    import json

    folder = '<a href="https:example.invalid">evil'  # Plotly renders <a href> as a live link
    cells = sorted(cells_dir.rglob("*.png"))[:3]
    app.session_state["pending_items"] = [(f"{folder}/{p.name}", p.read_bytes()) for p in cells]
    app.switch_page("views/score.py").run()
    [group_by] = [r for r in app.radio if r.label == "Group by"]
    group_by.set_value("folder").run()
    assert not _errors(app), _errors(app)
    specs = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    [labels] = [s["data"][0]["x"] for s in specs if s["data"][0]["type"] == "bar"]
    assert labels == ["&lt;a href=&quot;https:example.invalid&quot;&gt;evil"]


def test_a_corrupt_result_store_is_one_clear_error(tmp_path, monkeypatch):
    store = tmp_path / "store.sqlite"
    store.write_bytes(b"not SQLite" * 500)
    monkeypatch.setenv("MALARIA_STORE", str(store))
    import dashboard.resources

    dashboard.resources.store.clear()
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page("views/score.py").run()
    assert not at.exception
    assert any("corrupt" in e.value for e in at.error)
    dashboard.resources.store.clear()


def test_smear_page_finds_scores_and_explains_cells_of_a_field(app, cells_dir):
    field = np.empty((400, 600, 3), np.uint8)
    field[:] = BACKGROUND
    for i, cell in enumerate(_cell_images(cells_dir, 8)):
        _paste(field, cell, 30 + (i % 4) * 140, 40 + (i // 4) * 170)
    app.session_state["smear_items"] = [
        ("slide/field.png", _png(field)),
        ("slide/broken.png", b"not an image"),
    ]
    app.switch_page("views/smear.py").run()
    assert not _errors(app), _errors(app)
    app.button[0].click().run()
    assert not _errors(app), _errors(app)
    cells, results, run_id, _ = app.session_state["smear"]
    assert run_id and list(results) == ["slide/field.png"]
    assert int(next(m for m in app.metric if m.label == "Red cells").value) == 8
    # the tiny model was never adapted to a lab's fields: its cells are counted, no parasitemia
    assert next(m for m in app.metric if m.label == "Parasitemia").value == "–"
    assert any("No parasitemia is given" in w.value for w in app.warning), app.warning
    assert cells["error"].notna().sum() == 1  # the broken field is one error row
    captions = [i.caption for e in app.get("image") for i in e.proto.imgs]
    assert any("explains" in c for c in captions), captions  # the picked cell's heatmap
    # one probability per cell: the heatmap's caption gives the one the cell was scored with
    pick = next(s for s in app.selectbox if s.label == "Cell")
    prob = results["slide/field.png"].prob[pick.value]
    heat = next(c for c in captions if "explains" in c)
    assert f"P(Parasitized) {prob:.3f} by the onnx-int8 engine" in heat, heat
    assert pick.options[pick.index].startswith(f"P(Parasitized) {prob:.3f} (onnx-int8)")
    assert len(app.get("plotly_chart")) == 1  # the field, cells outlined, clickable
    assert len(app.get("download_button")) == 2
    # at the top, before any count: these fields are another lab's than the model's cells
    shown = list(_in_order(app.main))
    note = next(i for i, e in enumerate(shown) if "learnt from the NIH cells alone" in _text(e))
    assert "P\\. falciparum" in _text(shown[note]) and shown[note].type == "warning"
    assert note < min(i for i, e in enumerate(shown) if e.type == "metric")
    summary = next(d.value for d in app.dataframe if "level" in d.value)
    assert list(summary.columns[:4]) == ["level", "group", "review", "likely_infected"]


def _in_order(node):
    """The elements under ``node`` as the page draws them, top to bottom."""
    for child in getattr(node, "children", {}).values():
        yield child
        yield from _in_order(child)


def _text(element) -> str:
    return str(getattr(element, "value", "") or "")


# --- the label audit, out-of-fold predictions and fold runs ----------------------------------


@pytest.fixture
def own_model(app, tiny_model, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny model folder, offered in the sidebar and selected."""
    import shutil

    import dashboard.widgets
    from core.schema.contract import DEFAULT_WEIGHTS

    folder = tmp_path / "audited"
    shutil.copytree(tiny_model, folder)
    monkeypatch.setattr(
        dashboard.widgets, "model_choices", lambda: [DEFAULT_WEIGHTS.resolve(), folder.resolve()]
    )
    app.run()
    app.sidebar.selectbox[0].set_value(folder.resolve()).run()
    return folder


def _audited(folder: Path, cells_dir: Path, flipped: set[str]) -> None:
    """Out-of-fold predictions of the fixture cells (paths relative to the repository, as
    malaria train writes them), confidently against the label for ``flipped``, and their audit."""
    import pandas as pd

    from core import cli
    from core.schema.labels import case_id

    rows = []
    for png in sorted(cells_dir.rglob("*.png")):
        label = png.parent.name
        sure = 0.02 if png.name in flipped else 0.95
        prob = sure if label == "Parasitized" else 1 - sure
        rows.append((str(png.relative_to(ROOT)), case_id(png.name), label, prob, 0))
    pd.DataFrame(rows, columns=["path", "case_id", "label", "prob_parasitized", "fold"]).to_csv(
        folder / "oof_predictions.csv", index=False
    )
    assert (
        cli.main(
            ["audit", "--oof", str(folder / "oof_predictions.csv")]
            + ["--out", str(folder / "label_audit.csv")]
        )
        == 0
    )


def test_audit_page_records_decisions_that_survive_reruns_and_saves_them(app, own_model, cells_dir):
    from core.training.audit import read_decisions

    flipped = {
        "C145P106ThinF_IMG_20151016_154719_cell_155.png",  # given Parasitized
        "C208ThinF_IMG_20151029_151017_cell_110.png",  # given Uninfected
        "C208ThinF_IMG_20151029_155411_cell_108.png",
    }
    _audited(own_model, cells_dir, flipped)
    # a decision on file from an earlier session, for a cell this session leaves alone
    (own_model / "label_decisions.csv").write_text(
        "path,case_id,label,decision\nelsewhere.png,C1,Uninfected,exclude\n"
    )
    app.switch_page("views/audit.py").run()
    assert not _errors(app), _errors(app)
    assert any("3 suspects" in m.value for m in app.markdown)
    assert len(app.get("plotly_chart")) == 1  # the per-patient share
    spec = __import__("json").loads(app.get("plotly_chart")[0].proto.spec)
    assert spec["data"][0]["x"][0] == "C208"  # 2 of its 6 cells: the highest share
    decisions = [r for r in app.radio if r.key and r.key.startswith("audit:")]
    assert len(decisions) == 3 and all(r.value is None for r in decisions)
    captions = [c.value for c in app.caption if c.value.startswith("\\#")]
    assert len(captions) == 3 and "1 · C145 · given Parasitized" in captions[0]  # ties by path
    assert len(app.get("image")) == 6  # each cell and its heatmap
    target = next(r for r in decisions if "C145P106" in r.key)
    target.set_value("relabel").run()
    assert not _errors(app), _errors(app)
    # filtered away and back, and after another page, the choice is still there
    [given] = [r for r in app.radio if r.label == "Given label"]
    given.set_value("Uninfected").run()
    assert len([r for r in app.radio if r.key and r.key.startswith("audit:")]) == 2
    app.switch_page("views/evaluate.py").run()
    app.switch_page("views/audit.py").run()
    [given] = [r for r in app.radio if r.label == "Given label"]
    given.set_value("All").run()
    target = next(r for r in app.radio if r.key and "C145P106" in r.key)
    assert target.value == "relabel"
    assert any("1 not yet saved" in m.value for m in app.markdown)
    [save] = [b for b in app.button if b.label.startswith("Save to")]
    save.click().run()
    assert not _errors(app), _errors(app)
    assert any("holds 2 decisions" in s.value for s in app.success)
    path = "tests/fixtures/cells/Parasitized/C145P106ThinF_IMG_20151016_154719_cell_155.png"
    assert read_decisions(own_model / "label_decisions.csv") == {
        path: "relabel",
        "elsewhere.png": "exclude",
    }
    assert any("0 not yet saved" in m.value for m in app.markdown)


def test_audit_page_without_the_images_says_where_they_are_expected(app, own_model, cells_dir):
    import pandas as pd

    _audited(own_model, cells_dir, {"C208ThinF_IMG_20151029_151017_cell_110.png"})
    audit = pd.read_csv(own_model / "label_audit.csv")
    audit["path"] = "../elsewhere/cells.zip!" + audit["path"]
    audit.to_csv(own_model / "label_audit.csv", index=False)
    app.switch_page("views/audit.py").run()
    assert not _errors(app), _errors(app)
    [warning] = [w.value for w in app.warning]
    assert "elsewhere/cells\\.zip" in warning and "not on this machine" in warning
    assert not app.get("image")


def test_audit_page_without_an_audit_says_how_to_make_one(app, own_model, cells_dir):
    app.switch_page("views/audit.py").run()
    assert not _errors(app), _errors(app)
    assert any("no oof_predictions.csv" in i.value for i in app.info)
    _audited(own_model, cells_dir, set())
    (own_model / "label_audit.csv").unlink()
    app.run()
    assert not _errors(app), _errors(app)
    assert any("malaria audit --oof" in i.value for i in app.info)


def test_evaluate_shows_the_out_of_fold_predictions_first(app, own_model, cells_dir):
    import shutil

    _audited(own_model, cells_dir, set())
    shutil.copy(ROOT / "weights/cv5/folds/fold0/test_predictions.csv", own_model)
    app.switch_page("views/evaluate.py").run()
    assert not _errors(app), _errors(app)
    [data] = [r for r in app.radio if r.label == "Data"]
    assert data.value.startswith("Out-of-fold") and len(data.options) == 3
    assert any(
        "Out-of-fold: each of the 44 development cells (6 patients) predicted by a model "
        "that never saw its patient" in c.value
        for c in app.caption
    )
    accuracy = app.dataframe[0].value.set_index("metric").loc["accuracy", "value"]
    assert accuracy == 1.0
    app.session_state["cm_cell"] = (data.value, "Parasitized", "Parasitized")
    app.run()  # the gallery reads the cells by their repository-relative paths
    assert not _errors(app), _errors(app)
    assert len(app.get("image")) == 2 * 12
    data.set_value(data.options[1]).run()
    assert not _errors(app), _errors(app)
    assert any("2,570 cells from 20 patients" in c.value for c in app.caption)


def test_training_page_draws_the_fold_runs_beside_the_final_run(app, own_model):
    import shutil

    # the final run trained on every patient (no validation curve), its folds with one
    shutil.copy(ROOT / "weights/default/history.csv", own_model)
    for k in range(3):
        (own_model / "folds" / f"fold{k}").mkdir(parents=True)
        shutil.copy(
            ROOT / f"weights/default/folds/fold{k}/history.csv",
            own_model / "folds" / f"fold{k}" / "history.csv",
        )
    app.switch_page("views/training.py").run()
    assert not _errors(app), _errors(app)
    figure = json.loads(app.get("plotly_chart")[0].proto.spec)
    traces = figure["data"]

    # every legend entry stands for a line that is drawn
    for t in (t for t in traces if t.get("showlegend", True)):
        assert any(_values(u) for u in traces if u["name"] == t["name"]), t["name"]
    assert not any(t["name"].endswith("audited · validation") for t in traces)
    folds = [t for t in traces if "· fold" in t["name"]]
    assert sum(t["name"].endswith("fold2") and bool(_values(t)) for t in folds) == 6  # 6 curves
    colours = {t["name"]: t["line"]["color"] for t in folds}
    assert len(set(colours.values())) == 3  # each fold its own colour
    entries = [t["name"] for t in folds if t.get("showlegend", True)]
    assert [e.rsplit("/", 1)[-1] for e in sorted(entries)] == [
        f"audited · fold{k}" for k in range(3)
    ]
    final = [t for t in traces if t["name"].endswith("audited · train")]
    assert final and all(t["line"]["width"] > f["line"]["width"] for t in final for f in folds)
    axes = [v for k, v in figure["layout"].items() if k.startswith("xaxis")]
    assert axes and all(a.get("dtick") == 1 for a in axes)  # whole epochs, no 1.5


def test_training_page_fits_the_range_test_to_its_smoothed_loss(app):
    import pandas as pd

    app.switch_page("views/training.py").run()  # the shipped model, whose test has a spike
    assert not _errors(app), _errors(app)
    curve = pd.read_csv(ROOT / "weights/default/lr_find.csv")
    suggested = json.loads((ROOT / "weights/default/lr_find.json").read_text())["suggested_lr"]
    assert curve["loss"].max() > 10 * curve["smoothed_loss"].max()  # the spike
    curves = json.loads(app.get("plotly_chart")[0].proto.spec)["data"]
    star = next(t for t in curves if t["name"] == "weights/default · saved epoch 3")
    assert _values(star)  # on the training loss, as there is no validation loss
    figure = json.loads(app.get("plotly_chart")[1].proto.spec)
    low, high = figure["layout"]["yaxis"]["range"]
    assert low <= curve["smoothed_loss"].min() and curve["smoothed_loss"].max() <= high < 3
    marks = {t["name"].split(":")[0]: t for t in figure["data"] if "diamond" in str(t)}
    assert _values(marks["suggested"], "x") == [suggested] and _values(marks["used"], "x") == [1e-3]
    assert all(low <= _values(t)[0] <= high for t in marks.values())  # on the curve, in view
    why = next(i.value for i in app.info if i.value.startswith("**Why 1e-3"))
    assert "0.130" in why and "0.136" in why and "does not isolate the rate" in why


def _fixture_items(cells_dir, n: int | None = None) -> list[tuple[str, bytes]]:
    return [
        (f"{p.parent.name}/{p.name}", p.read_bytes()) for p in sorted(cells_dir.rglob("*.png"))[:n]
    ]


def _button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def test_settings_survive_switching_pages(app, cells_dir):
    app.session_state["pending_items"] = _fixture_items(cells_dir)
    app.switch_page("views/score.py").run()
    app.slider[0].set_value(0.7).run()
    app.multiselect(key="score_kinds").set_value(["Parasitized"]).run()
    app.radio(key="score_group_by").set_value("folder").run()
    app.switch_page("views/explain.py").run()
    app.selectbox(key="explain_layer").set_value("features.3").run()
    app.multiselect(key="explain_methods").set_value(["hirescam"]).run()
    app.toggle(key="explain_road").set_value(False).run()
    app.switch_page("views/evaluate.py").run()
    app.session_state["evaluate_items"] = _fixture_items(cells_dir)
    app.radio(key="evaluate_data").set_value("A labelled upload").run()
    assert not _errors(app), _errors(app)
    assert any("labelled upload from before" in c.value for c in app.caption)

    app.switch_page("views/home.py").run()
    app.switch_page("views/score.py").run()
    assert app.slider[0].value == 0.7  # the run's threshold, kept with it in the store
    assert app.multiselect(key="score_kinds").value == ["Parasitized"]
    assert app.radio(key="score_group_by").value == "folder"
    app.switch_page("views/explain.py").run()
    assert app.selectbox(key="explain_layer").value == "features.3"
    assert app.multiselect(key="explain_methods").value == ["hirescam"]
    assert app.toggle(key="explain_road").value is False
    assert sum("features.3" in i.caption for e in app.get("image") for i in e.proto.imgs) == 1
    app.switch_page("views/evaluate.py").run()
    assert app.radio(key="evaluate_data").value == "A labelled upload"
    assert any(h.value == "Metrics" for h in app.subheader)  # the kept upload, scored
    assert not _errors(app), _errors(app)


def _cli_run(cells_dir) -> str:
    """A run of files on this disk, scored from the command line into the app's store."""
    from core import cli
    from core.inference.store import ResultStore

    argv = [str(cells_dir), "--no-progress", "--threshold", "0.4", "--name", "ward 3"]
    assert cli.main(["score", *argv]) == 0
    with ResultStore() as store:
        return store.list_runs().loc[0, "run_id"]


def test_a_link_opens_the_run_and_cell_it_names(app, cells_dir):
    run_id = _cli_run(cells_dir)
    cell = str(sorted(cells_dir.rglob("*.png"))[3])
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(run=run_id, cell=cell)  # as a reload of /score?run=...&cell=...
    at.switch_page("views/score.py").run()
    assert not _errors(at), _errors(at)
    assert at.session_state["run_id"] == run_id and at.slider[0].value == 0.4
    assert any("ward 3" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert table["thumb"].notna().all()  # files of this machine: their images are at hand
    _button(at, "Open in Explain").click().run()  # the large view of the linked cell
    assert not _errors(at), _errors(at)
    assert at.session_state["explain_item"][0] == cell
    assert at.session_state["explain_link"] == {"run": run_id, "cell": cell}

    fresh = AppTest.from_file(APP, default_timeout=180)  # the Explain link, in a new session
    fresh.query_params.update(run=run_id, cell=cell)
    fresh.switch_page("views/explain.py").run()
    assert not _errors(fresh), _errors(fresh)
    assert fresh.session_state["explain_item"][0] == cell
    outside = AppTest.from_file(APP, default_timeout=180)  # a path the run did not score
    outside.query_params.update(run=run_id, cell=str(ROOT / "README.md"))
    outside.switch_page("views/explain.py").run()
    assert not outside.exception
    assert any("not a cell of that run" in w.value for w in outside.warning)
    assert outside.session_state["explain_item"][0].startswith("samples/")


def test_runs_are_named_deduplicated_and_deleted(app, cells_dir):
    items = _fixture_items(cells_dir, 5)
    app.session_state["pending_items"] = items + [("again/copy.png", items[0][1])]
    app.switch_page("views/score.py").run()
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Cells"] == "5" and metrics["Duplicates"] == "1"
    table = app.dataframe[0].value.set_index("path")
    assert table.loc["again/copy.png", "duplicate_of"] == items[0][0]
    assert app.dataframe[1].value["cells"].sum() == 5  # the summary counts the file once
    for field, text in (("Name", "Slide 7"), ("Sample", "patient 12"), ("Operator", "AB")):
        next(t for t in app.text_input if t.label == field).input(text)
    next(b for b in app.button if b.label == "Save").click().run()
    run_id = app.session_state["run_id"]
    assert any("Slide 7" in c.value and "patient 12" in c.value for c in app.caption)
    runs = app.main.dataframe[-1].value
    assert runs.loc[0, "name"] == "Slide 7" and runs.loc[0, "duplicates"] == 1

    assert _button(app, "Delete run").disabled  # not before it is confirmed
    app.checkbox(key=f"sure_{run_id}").check().run()
    _button(app, "Delete run").click().run()
    assert not _errors(app), _errors(app)
    assert app.session_state["results"] is None
    assert any("No runs yet" in c.value for c in app.caption)


def test_an_evaluate_gallery_cell_opens_large_and_in_explain(app, evaluate_split):
    data = {
        "oof": "Out-of-fold: all development patients",
        "test": "The model's test split (unseen patients)",
    }[evaluate_split]
    app.switch_page("views/evaluate.py").run()
    app.session_state["cm_cell"] = (data, "Uninfected", "Parasitized")
    app.run()
    assert not _errors(app), _errors(app)
    _button(app, "View large").click().run()
    picked = app.session_state["evaluate_cell"]
    assert picked and "!" in picked  # a member of the development zip
    _button(app, "Open in Explain").click().run()
    assert not _errors(app), _errors(app)
    assert app.session_state["explain_item"][0] == picked
    assert app.session_state["explain_link"] == {"split": evaluate_split, "cell": picked}


def test_a_noise_image_is_listed_for_review_and_never_counted(app, cells_dir):
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    cells = sorted(cells_dir.rglob("*.png"))[:8]
    items = [(p.name, p.read_bytes()) for p in cells] + [("C96_noise.png", _png(noise))]
    app.session_state["pending_items"] = items
    app.switch_page("views/score.py").run()
    assert not _errors(app), _errors(app)
    table = app.dataframe[0].value.set_index("path")
    assert table.loc["C96_noise.png", "review"].startswith("not a cell")
    assert all(table.drop(index="C96_noise.png")["review"].isin(["", "uncertain"]))
    review = next(m for m in app.metric if m.label == "For review")
    uncertain = int((table["review"] == "uncertain").sum())
    assert int(review.value) == 1 + uncertain
    called = next(m for m in app.metric if m.label == "Called parasitized")
    counted = table.drop(index="C96_noise.png")
    assert int(called.value) == int((counted["prob_parasitized"] >= 0.5).sum())
    assert any("not counted" in w.value for w in app.warning)
    summary = app.dataframe[1].value.set_index("group")
    assert summary.loc["C96", "not_counted"] == 1
    assert summary["scored"].sum() == len(cells)
    # the review band: widened to the whole range, every counted cell is uncertain
    app.number_input[0].set_value(0.5).run()
    table = app.dataframe[0].value.set_index("path")
    assert (table.drop(index="C96_noise.png")["review"] == "uncertain").all()
    assert app.dataframe[1].value["uncertain"].sum() == len(cells)
    # the report of one patient, made and offered for download
    [pick] = [m for m in app.multiselect if m.label.startswith("Patients")]
    pick.set_value(["C96"]).run()
    next(b for b in app.button if b.label == "Make report").click().run()
    assert not _errors(app), _errors(app)
    run_id, text = app.session_state["report"]
    assert run_id == app.session_state["run_id"]
    assert "<h2>C96</h2>" in text and "C96_noise.png" in text and "not a cell" in text


def test_explain_says_when_the_gate_would_not_count_the_image(app):
    import numpy as np

    app.session_state["explain_item"] = ("flat.png", _png(np.full((90, 90, 3), 240, np.uint8)))
    app.switch_page("views/explain.py").run()
    assert not _errors(app), _errors(app)
    assert any("Review: blank" in w.value for w in app.warning)
    sample = next((ROOT / "dashboard" / "samples" / "Parasitized").glob("*.png"))
    app.session_state["explain_item"] = (sample.name, sample.read_bytes())
    app.run()
    assert not any("Review:" in w.value for w in app.warning)


def test_evaluate_shows_the_calibration_before_and_after(app, evaluate_split):
    import json

    from core.schema.contract import ModelFolder

    card = ModelFolder.open().card
    app.switch_page("views/evaluate.py").run()
    assert not _errors(app), _errors(app)
    assert "Calibration" in [s.value for s in app.subheader]
    specs = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    [diagram] = [s for s in specs if "share truly parasitized" in json.dumps(s["layout"])]
    legend = [t.get("name", "") for t in diagram["data"]]
    before, after = card["calibration"]["ece_before"], card["calibration"]["ece_after"]
    assert f"as the network says (temperature 1): ECE {before:.3f}" in legend
    assert f"calibrated: ECE {after:.3f}" in legend  # out of fold: the card's honest figure
    assert any(
        "each fold at the temperature fitted on the other folds" in c.value for c in app.caption
    )


def test_the_report_of_a_reopened_run_uses_the_runs_model_not_the_sidebars(app, cells_dir):
    """A run scored with weights/holdout (interval rule, cutoff 4.78%) reopened while
    weights/default (the calls rule) is selected: the report's rule, flag and model are the
    run's."""
    import html

    from core import cli
    from core.inference.store import ResultStore
    from core.schema.contract import ModelFolder

    holdout = ROOT / "weights" / "holdout"
    argv = [str(cells_dir), "--weights", str(holdout), "--engine", "onnx", "--no-progress"]
    assert cli.main(["score", *argv, "--name", "ward 5", "--sample", "slide 12"]) == 0
    with ResultStore() as store:
        run_id = store.list_runs().loc[0, "run_id"]
    app.query_params.update(run=run_id)
    app.switch_page("views/score.py").run()
    assert not _errors(app), _errors(app)
    assert app.session_state["model_folder"].endswith("weights/default")
    next(b for b in app.button if b.label == "Make report").click().run()
    assert not _errors(app), _errors(app)
    _, text = app.session_state["report"]
    own = ModelFolder.open(holdout).screening
    assert own.rule == "interval" and html.escape(own.describe()) in text
    assert "weights/holdout" in text
    default = ModelFolder.open(ROOT / "weights" / "default").screening
    assert html.escape(default.describe()) not in text
    assert "ward 5" in text and "slide 12" in text


def _zip_of(items: list[tuple[str, bytes]]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in items:
            zf.writestr(name, data)
    return buf.getvalue()


def test_an_upload_is_kept_on_disk_not_in_the_servers_memory(app, cells_dir, tmp_path, monkeypatch):
    """What the uploader delivers is written to the session's folder and Streamlit's copy is
    dropped; scoring and the thumbnails read the files from disk, and a file goes once it is
    neither waiting to be scored nor behind the run on show."""
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager

    import dashboard.spool

    folder = tmp_path / "spool"
    monkeypatch.setattr(dashboard.spool, "session_folder", lambda: folder)
    dropped = []
    remove = MemoryUploadedFileManager.remove_file
    monkeypatch.setattr(
        MemoryUploadedFileManager,
        "remove_file",
        lambda self, session_id, file_id: (
            dropped.append(file_id) or remove(self, session_id, file_id)
        ),
    )
    items = _fixture_items(cells_dir)
    app.switch_page("views/score.py").run()
    assert any("up to 1,024 MB a file" in c.value for c in app.caption)  # the server's cap
    app.file_uploader[0].set_value(("cells.zip", _zip_of(items), "application/zip")).run()
    assert not _errors(app), _errors(app)
    [(name, path)] = app.session_state["score_uploads"]
    assert name == "cells.zip" and path.parent == folder and path.is_file()
    assert len(dropped) == 1  # Streamlit's copy
    assert all(not u.value for u in app.file_uploader)  # drawn empty, under new keys
    assert any("Ready to score: 1 file(s)" in c.value and "cells" in c.value for c in app.caption)
    _button(app, "Score").click().run()
    assert not _errors(app), _errors(app)
    results = app.session_state["results"]
    assert len(results) == len(items) and results["error"].isna().all()
    assert results["path"].str.startswith("cells.zip!").all()  # named by the upload
    assert app.dataframe[0].value["thumb"].str.startswith("data:image/jpeg;base64,").all()
    # a second upload waits beside the first; clearing keeps only what the run on show reads
    app.file_uploader[0].set_value(("more.png", items[0][1], "image/png")).run()
    second = app.session_state["score_uploads"][1][1]
    assert second.is_file() and any("2 file(s)" in c.value for c in app.caption)
    _button(app, "Clear uploads").click().run()
    assert not _errors(app), _errors(app)
    assert app.session_state["score_uploads"] == [] and path.is_file() and not second.exists()
    assert app.dataframe[0].value["thumb"].str.startswith("data:image/jpeg").all()
    # a folder: counted once it has arrived; the page asks for a zip before a big one starts
    assert any(
        "Zip a folder of more than a few hundred files first" in c.value for c in app.caption
    )
    folder_files = [(f"ward/{n}", data, "image/png") for n, data in items[:3]]
    app.file_uploader[1].set_value(folder_files).run()
    assert any("Ready to score: 3 file(s)" in c.value and "ward" in c.value for c in app.caption)
    _button(app, "Clear uploads").click().run()
    _button(app, "Open run").click().run()  # a stored run reopened: no upload behind it
    assert not _errors(app), _errors(app)
    assert not path.exists()


def test_no_nan_in_past_runs_and_the_cell_on_show_says_what_it_is(app, cells_dir):
    """Past runs of named and unnamed runs, an error row and an image the gate does not
    count (a smear field) shown large: each says what it is, never "nan"; the Flag column
    stands beside the group."""
    field = np.full((400, 600, 3), BACKGROUND, np.uint8)
    for i, cell in enumerate(_cell_images(cells_dir, 6)):
        _paste(field, cell, 40 + 180 * (i % 3), 40 + 180 * (i // 3))
    items = _fixture_items(cells_dir, 8)
    app.session_state["pending_items"] = items[:4]
    app.switch_page("views/score.py").run()
    next(t for t in app.text_input if t.label == "Name").input("Slide 7")
    next(b for b in app.button if b.label == "Save").click().run()
    odd = ("field.png", _png(field))
    app.session_state["pending_items"] = items[4:8] + [("broken.png", b"not an image"), odd]
    app.run()
    assert not _errors(app), _errors(app)
    summary = app.dataframe[1].value
    assert list(summary.columns[:2]) == ["group", "likely_infected"]
    runs = app.selectbox(key="past_run_score")
    assert len(runs.options) == 2 and not any("nan" in o for o in runs.options)
    assert runs.options[1].startswith("Slide 7 · ")
    assert runs.options[0].startswith("Parasitized/ (4 files), broken.png")  # what it scored

    def facts() -> str:
        app.run()
        assert not _errors(app), _errors(app)
        return next(m.value for m in app.markdown if "case" in m.value)

    app.session_state["score_cell"] = "broken.png"
    assert facts().startswith("**Error**") and "nan" not in facts()
    app.session_state["score_cell"] = odd[0]
    assert facts().startswith("**Not counted**") and "nan" not in facts()
    app.session_state["score_cell"] = items[4][0]
    assert facts().split("**")[1] in ("Parasitized", "Uninfected")


def test_each_page_lists_its_own_runs_and_a_smear_run_reopens_from_its_link(app, cells_dir):
    """A labelled upload on Evaluate is not a Score run; a smear run is listed on the Smear
    page, and a reload (its ?run= link) shows it again; a Score link to it says where it
    opens."""
    app.switch_page("views/evaluate.py").run()
    app.session_state["evaluate_items"] = _fixture_items(cells_dir)
    app.radio(key="evaluate_data").set_value("A labelled upload").run()
    assert any(h.value == "Metrics" for h in app.subheader)
    app.switch_page("views/score.py").run()
    assert any("No runs yet" in c.value for c in app.caption)  # not the Evaluate upload

    field = np.full((400, 600, 3), BACKGROUND, np.uint8)
    for i, cell in enumerate(_cell_images(cells_dir, 8)):
        _paste(field, cell, 30 + (i % 4) * 140, 40 + (i // 4) * 170)
    app.session_state["smear_items"] = [("slide/field.png", _png(field))]
    app.switch_page("views/smear.py").run()
    _button(app, "Find and score cells").click().run()
    assert not _errors(app), _errors(app)
    run_id = app.session_state["smear"][2]
    assert app.selectbox(key="past_run_smear").options[0].endswith(f"1 fields · {run_id}")

    reloaded = AppTest.from_file(APP, default_timeout=180)
    reloaded.query_params.update(run=run_id)
    reloaded.switch_page("views/smear.py").run()
    assert not _errors(reloaded), _errors(reloaded)
    assert reloaded.session_state["smear"][2] == run_id
    assert next(m for m in reloaded.metric if m.label == "Red cells").value == "8"
    assert any("keeps its results, not its images" in i.value for i in reloaded.info)
    score = AppTest.from_file(APP, default_timeout=180)
    score.query_params.update(run=run_id)
    score.switch_page("views/score.py").run()
    assert not score.exception and score.session_state["results"] is None
    warned = [w.value.replace("\\", "") for w in score.warning]
    assert any("made on the Smear page; open it there" in w for w in warned), warned

    app.checkbox(key=f"sure_{run_id}").check().run()  # deleted, then the same fields again
    _button(app, "Delete run").click().run()
    assert app.session_state["smear"] is None
    _button(app, "Find and score cells").click().run()
    assert not _errors(app), _errors(app)
    assert app.session_state["smear"][2] != run_id


def test_a_smear_run_of_files_on_this_machine_reopens_with_its_fields_drawn(
    app, cells_dir, tmp_path
):
    from core import cli
    from core.inference.store import ResultStore

    field = np.full((400, 600, 3), BACKGROUND, np.uint8)
    for i, cell in enumerate(_cell_images(cells_dir, 8)):
        _paste(field, cell, 30 + (i % 4) * 140, 40 + (i // 4) * 170)
    (tmp_path / "field.png").write_bytes(_png(field))
    assert cli.main(["smear", str(tmp_path / "field.png"), "--no-progress"]) == 0
    with ResultStore() as store:
        run_id = store.list_runs(page="smear").loc[0, "run_id"]
    app.switch_page("views/smear.py").run()
    app.selectbox(key="past_run_smear").set_value(run_id)
    _button(app, "Open run").click().run()
    assert not _errors(app), _errors(app)
    assert next(m for m in app.metric if m.label == "Red cells").value == "8"
    assert len(app.get("plotly_chart")) == 1  # the field, found again in its file
    captions = [i.caption for e in app.get("image") for i in e.proto.imgs]
    assert any("explains" in c for c in captions), captions  # the picked cell's heatmap


def test_the_model_is_in_the_address_and_a_reload_keeps_it(app):
    app.sidebar.selectbox[0].set_value(ROOT / "weights/holdout").run()
    assert app.query_params["model"] == "weights/holdout"
    reloaded = AppTest.from_file(APP, default_timeout=180)
    reloaded.query_params.update(model="weights/holdout")
    reloaded.switch_page("views/score.py").run()
    assert not _errors(reloaded), _errors(reloaded)
    assert reloaded.session_state["model_folder"].endswith("weights/holdout")
    assert reloaded.sidebar.selectbox[0].value.name == "holdout"
    for hostile in ("../../etc", "/etc/passwd", "weights/holdout/../default\n[x](http://a)"):
        other = AppTest.from_file(APP, default_timeout=180)
        other.query_params.update(model=hostile)
        other.run()
        assert not other.exception
        assert other.session_state["model_folder"].endswith("weights/default")
        [warning] = [w.value for w in other.warning]
        assert "is not one of the model folders this app lists" in warning
        assert "\n" not in warning and "](" not in warning


# --- the lesson ------------------------------------------------------------------------------


def _lesson_links(at: AppTest) -> dict[str, tuple[str, dict[str, str]]]:
    """The lesson's links: label -> (page file, query parameters)."""
    from urllib.parse import parse_qsl

    return {
        link.proto.label: (f"views/{link.proto.page}.py", dict(parse_qsl(link.proto.query_string)))
        for link in at.get("page_link")
    }


def _follow(at: AppTest, page: str, params: dict[str, str]) -> AppTest:
    """Open ``page`` as a link with ``params`` does, in the same session."""
    at.query_params.clear()
    at.query_params.update(params)
    return at.switch_page(page).run()


def test_the_lesson_tells_each_step_with_the_model_folders_figures(app):
    import pandas as pd

    from core.schema.calibration import rescale
    from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder
    from core.schema.labels import is_parasitized
    from core.schema.metrics import binary_metrics

    app.switch_page("views/lesson.py").run()
    assert not _errors(app), _errors(app)
    from tests.helpers import SHARED_DATA

    cells_here = (SHARED_DATA / "nih_cells_dev.zip").is_file()  # the previews read the zip
    assert not app.info and (not app.warning or not cells_here)  # the model has every file
    steps = [h.value for h in app.subheader]
    assert steps == [
        "1. What the network sees",
        "2. Which heatmaps find the parasite",
        "3. Where it fails",
        "4. Why: some labels are wrong",
        "5. How it learnt",
    ]
    said = " ".join(m.value for m in app.markdown)
    model = ModelFolder.open(DEFAULT_WEIGHTS)
    check = pd.read_csv(model.explain_check()[0]).set_index(["method", "layer"])
    for layer in ("features.18", "features.6"):  # the last stage against the default
        row = check.loc[("hirescam", layer)]
        assert f"**{row['pointing']:.1%} (" in said and f"of {row['cells']:,}** " in said
    oof = pd.read_csv(model.predictions("oof"))
    p = rescale(oof["prob_parasitized"], model.contract.temperature)
    m = binary_metrics(is_parasitized(oof["label"]), p, threshold=model.contract.threshold)
    assert f"**{m['fn']:,}** parasitized cells and raises **{m['fp']:,}** false alarms" in said
    assert f"each of the {len(oof):,} development cells" in said
    audit = pd.read_csv(model.audit)
    assert f"**{len(audit):,} suspects**" in said
    history = pd.read_csv(model.history)
    assert f"Over its {len(history)} epochs" in said
    assert f"went from {history['train_loss'].iloc[0]:.3f}" in said
    assert "nan" not in said.lower().replace("nant", "")  # never a missing value as "nan"
    captions = [i.caption for e in app.get("image") for i in e.proto.imgs]
    assert sum("hirescam at features" in c for c in captions) == 2  # the two maps
    if cells_here:
        assert sum("labelled Parasitized" in c for c in captions) == 4  # missed, from the zip
        assert sum(c.startswith("suspect \\#") for c in captions) == 4  # labelled Uninfected
    assert set(_lesson_links(app)) >= {
        "Open in Explain at features.18",
        "Open in Explain at features.6",
        "Open the Heatmap check: every method at every stage",
        "Open the missed parasites in Evaluate",
        "Open the Audit: every suspect",
        "Open the Training curves and the range test",
    }


def test_a_lesson_on_a_model_folder_without_its_files_says_so_step_by_step(app, own_model):
    app.switch_page("views/lesson.py").run()
    assert not _errors(app), _errors(app)
    assert len(app.subheader) == 5
    said = [i.value for i in app.info]
    assert len(said) == 4 and all("so this step has no figures" in s for s in said), said
    assert any("malaria check heatmaps --weights" in s for s in said)
    # the maps of step 1 need no file: they are drawn for the model on show
    assert sum("at features" in i.caption for e in app.get("image") for i in e.proto.imgs) == 2


def test_each_lesson_link_opens_its_view_set_up(app):
    from core.schema.labels import PARASITIZED, UNINFECTED

    app.switch_page("views/lesson.py").run()
    links = _lesson_links(app)
    page, params = links["Open in Explain at features.6"]
    assert page == "views/explain.py" and params["layer"] == "features.6"
    app.switch_page("views/explain.py").run()  # the Explain page, set to another stage
    app.selectbox(key="explain_layer").set_value("features.13").run()
    app.selectbox(key="explain_sample").set_value(
        next(o for o in app.selectbox(key="explain_sample").options if "Uninfected" in o)
    ).run()
    _follow(app, *links["Open in Explain at features.6"])
    assert not _errors(app), _errors(app)
    assert app.selectbox(key="explain_layer").value == "features.6"
    assert app.session_state["explain_item"][0] == params["sample"]
    captions = [i.caption for e in app.get("image") for i in e.proto.imgs]
    assert sum("features.6 · 16x16 map" in c for c in captions) == 3
    assert app.query_params["layer"] == "features.6"  # the address names what is on show
    _follow(app, *links["Open in Explain at features.18"])
    assert app.selectbox(key="explain_layer").value == "features.18"
    app.switch_page("views/home.py").run()  # and back by the sidebar: kept, not re-followed
    app.query_params.clear()
    app.switch_page("views/explain.py").run()
    assert app.selectbox(key="explain_layer").value == "features.18"

    page, params = links["Open the missed parasites in Evaluate"]
    _follow(app, page, params)
    assert not _errors(app), _errors(app)
    assert app.radio(key="evaluate_data").value.startswith("Out-of-fold")
    assert app.session_state["cm_cell"][1:] == (PARASITIZED, UNINFECTED)
    assert any(
        h.value.startswith("True Parasitized, predicted Uninfected: ") for h in app.subheader
    )
    _follow(app, *links["Open the false alarms in Evaluate"])
    assert app.session_state["cm_cell"][1:] == (UNINFECTED, PARASITIZED)
    for label, view in (
        ("Open the Heatmap check: every method at every stage", "Heatmap check"),
        ("Open the Audit: every suspect", "Label audit"),
    ):
        _follow(app, *links[label])
        assert not _errors(app), _errors(app)
        assert app.title[0].value.startswith(view)


def test_a_bad_link_to_explain_or_evaluate_is_one_line(app):
    def opened(page: str, params: dict[str, str], said: str) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=180)
        at.query_params.update(params)
        at.switch_page(page).run()
        assert not _errors(at), _errors(at)
        [warning] = [w.value for w in at.warning]
        assert said in warning and "\n" not in warning, warning
        return at

    sample = "samples/Uninfected/C46P7ThinF_IMG_20151130_210843_cell_59.png"
    at = opened("views/explain.py", {"sample": sample, "layer": "features.99"}, "not a stage")
    assert at.selectbox(key="explain_layer").value == "features.6"  # the model's default
    assert at.session_state["explain_item"][0] == sample  # the cell is followed
    at = opened("views/explain.py", {"sample": "x.png", "layer": "features.1"}, "no sample cell")
    assert at.selectbox(key="explain_layer").value == "features.1"  # the stage is followed
    at = opened("views/evaluate.py", {"data": "train"}, "not one of this model's predictions")
    assert at.session_state["cm_cell"] is None
    bad_cell = {"data": "oof", "true": "Sick", "predicted": "Uninfected"}
    at = opened("views/evaluate.py", bad_cell, "true=")
    assert at.session_state["cm_cell"] is None  # the matrix cell refused, the data followed
    assert at.radio(key="evaluate_data").value.startswith("Out-of-fold")


@pytest.fixture
def cold(tmp_path, monkeypatch):
    """dashboard.resources as at a server's first start: no model loaded or loading (and
    this test's loads forgotten after it)."""
    import dashboard.resources as resources

    monkeypatch.setenv("MALARIA_STORE", str(tmp_path / "store.sqlite"))
    caches = (
        resources.store,
        resources.load_in_background,
        resources.loading,
        resources.engine,
        resources._explainer,
    )
    for cache in caches:
        cache.clear()
    yield resources
    for cache in caches:
        cache.clear()


def _default_model():
    from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder

    return ModelFolder.open(DEFAULT_WEIGHTS.resolve())  # the sidebar's default


def test_the_router_loads_the_default_model_once_in_the_background(cold, monkeypatch):
    release, loads = threading.Event(), []
    real = cold.load_engine

    def held(folder, *args, **kwargs):  # the engine's load, held until the test lets it go
        loads.append(str(folder))
        assert release.wait(120)
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(cold, "load_engine", held)
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()  # Home: needs no model, so it does not wait for one
    assert not _errors(at), _errors(at)
    model = _default_model()
    load = cold.loading(str(model.path), model.sha256)
    assert load is cold.load_in_background(str(model.path))  # the router's, not a new one
    assert load.thread.is_alive() and load.done == 0
    release.set()
    at.switch_page("views/explain.py").run()  # waits for that load, then draws the maps
    assert not _errors(at), _errors(at)
    assert any(m.label == "P(Parasitized)" for m in at.metric)
    assert loads == [str(model.path)]  # loaded once, by the background thread
    assert load.done == len(load.steps) and not load.thread.is_alive()
    import torch

    # the maps' PyTorch: one thread (see _explainer). A thread that already ran PyTorch keeps
    # its own count, so ask a new one, as each of Streamlit's script runs is
    threads: list[int] = []
    probe = threading.Thread(target=lambda: threads.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    assert threads == [1]


def test_the_explainer_waits_for_a_page_that_wants_it_or_a_quiet_moment(
    cold, monkeypatch, cells_dir
):
    explainers = []
    real = cold._explainer

    def counted(folder, sha256):
        explainers.append(folder)
        return real(folder, sha256)

    monkeypatch.setattr(cold, "_explainer", counted)
    monkeypatch.setattr(cold, "IDLE_S", 3600.0)  # never quiet enough by itself
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()  # Home
    model = _default_model()
    load = cold.loading(str(model.path), model.sha256)
    deadline = time.monotonic() + 120
    while load.done < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert load.done == 1  # the engine, at once
    at.session_state["pending_items"] = _fixture_items(cells_dir, 3)
    at.switch_page("views/score.py").run()  # a scoring: the explainer keeps out of its way
    assert not _errors(at), _errors(at)
    time.sleep(3 * cold.POLL_S)
    assert explainers == [] and load.done == 1 and load.thread.is_alive()
    at.switch_page("views/explain.py").run()  # a page that draws maps wants it: it loads now
    assert not _errors(at), _errors(at)
    assert any(m.label == "P(Parasitized)" for m in at.metric)
    assert load.done == 2 and explainers[0] == str(model.path)


def test_a_quiet_server_loads_the_explainer_nobody_asked_for(monkeypatch):
    import dashboard.resources as resources

    monkeypatch.setattr(resources, "SCORING", resources._Scoring())
    monkeypatch.setattr(resources, "IDLE_S", 0.3)
    with resources.SCORING.job():
        assert resources.SCORING.idle_s() == 0.0  # busy while a scoring runs
    load = resources.Loading()
    waited = threading.Thread(target=load.wait_for_quiet)
    waited.start()
    waited.join(10)
    assert not waited.is_alive()  # quiet for IDLE_S after the job: the load goes on
    assert resources.SCORING.idle_s() >= 0.3


def test_a_model_that_cannot_be_loaded_is_one_line_on_the_pages_that_need_it(
    cold, monkeypatch, cells_dir
):
    def broken(folder, *args, **kwargs):
        raise RuntimeError("the ONNX export failed: no space left on device")

    monkeypatch.setattr(cold, "load_engine", broken)
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception
    model = _default_model()
    cold.loading(str(model.path), model.sha256).thread.join(120)  # failed in the background
    at.session_state["pending_items"] = _fixture_items(cells_dir, 2)
    for page in ("views/explain.py", "views/score.py"):
        at.switch_page(page).run()
        assert not at.exception, page
        [error] = [_unescape(e.value) for e in at.error]
        assert error.startswith("The model cannot be loaded: the ONNX export failed: no space")
        assert "\n" not in error and "Traceback" not in error
    assert not any(m.label == "P(Parasitized)" for m in at.metric)
