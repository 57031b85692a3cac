"""The dashboard from its entrypoint, page by page, with Streamlit's AppTest (no browser)."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core.files import REPO_ROOT

ROOT = REPO_ROOT
APP = str(ROOT / "dashboard" / "app.py")
PAGES = ("views/home.py", "views/score.py", "views/explain.py", "views/methods.py",
         "views/evaluate.py", "views/training.py", "views/study.py")


@pytest.fixture
def app(tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("MALARIA_STORE", str(tmp_path / "store.sqlite"))
    import dashboard.ui
    dashboard.ui.store.clear()
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception
    return at


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error] + [str(x.value) for x in at.exception]


def test_no_pages_folder_beside_the_entrypoint():
    # Streamlit would run a dashboard/pages/ folder as old-style pages: a first request for
    # /score would then run views without the router (and without the repository on sys.path).
    assert not (ROOT / "dashboard" / "pages").exists(), "pages live in dashboard/views/"


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


def test_scoring_fixture_cells_shows_results_and_parasitemia(app, cells_dir):
    items = [(f"{p.parent.name}/{p.name}", p.read_bytes()) for p in sorted(cells_dir.rglob("*.png"))]
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
    assert any("Scored" in c.value and "weights/default" in c.value for c in app.caption)
    # moving the threshold re-labels without rescoring
    app.slider[0].set_value(0.99).run()
    assert not _errors(app)
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


def test_heatmap_check_page_reads_the_models_table(app):
    app.switch_page("views/methods.py").run()
    assert not _errors(app), _errors(app)
    assert len(app.get("plotly_chart")) == 1
    assert any("hirescam at features.6" in m.value for m in app.markdown)
    table = app.dataframe[0].value
    assert {"method", "layer", "pointing", "road", "ms_per_image"} <= set(table.columns)
    assert table["default"].sum() == 1


def test_an_empty_upload_is_a_clear_error(app):
    app.session_state["pending_items"] = [("notes.zip", b"PK\x05\x06" + b"\x00" * 18)]
    app.switch_page("views/score.py").run()
    assert not app.exception
    assert any("no images" in e.value for e in app.error)


def test_weights_failing_their_hash_are_a_clear_error(app, tiny_model, tmp_path, monkeypatch):
    import shutil

    import dashboard.ui
    from core.contract import DEFAULT_WEIGHTS
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_model, tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(dashboard.ui, "model_choices",
                        lambda: [DEFAULT_WEIGHTS.resolve(), tampered.resolve()])
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
    [caption] = [i.proto.imgs[0].caption for i in app.get("image")
                 if "original" in i.proto.imgs[0].caption]
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
    spec = json.loads(app.get("plotly_chart")[0].proto.spec)
    labels = spec["data"][0]["x"]
    assert labels == ["&lt;a href=&quot;https:example.invalid&quot;&gt;evil"]


def test_a_corrupt_result_store_is_one_clear_error(tmp_path, monkeypatch):
    store = tmp_path / "store.sqlite"
    store.write_bytes(b"not SQLite" * 500)
    monkeypatch.setenv("MALARIA_STORE", str(store))
    import dashboard.ui
    dashboard.ui.store.clear()
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page("views/score.py").run()
    assert not at.exception
    assert any("corrupt" in e.value for e in at.error)
    dashboard.ui.store.clear()
