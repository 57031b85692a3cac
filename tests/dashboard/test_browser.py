"""The main flow in a real browser: Debian's Chromium driven by Playwright."""

from __future__ import annotations

import csv
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from bench.serve import CHROMIUM_ARGS, DRAWN, IDLE, running_app, wait_for_rerun
from core.schema.files import REPO_ROOT

pytestmark = pytest.mark.slow  # a server and Chromium, minutes

ROOT = REPO_ROOT
SHOTS = ROOT / "tests" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(
        "Debian chromium is not installed (apt-get install chromium); "
        "the browser test cannot run here",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {
        "MALARIA_STORE": str(tmp_path_factory.mktemp("store") / "s.sqlite"),
        "MALARIA_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    try:
        with running_app(env, tmp_path_factory.mktemp("log") / "streamlit.log") as (url, _):
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def page(server):
    SHOTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)
        yield pg
        browser.close()


def test_the_first_explain_after_installing_shows_the_model_loading_then_the_maps(
    tmp_path_factory,
):
    """A server with no ONNX cache (as after installing) and Explain as its first request: the
    page says what is loading while the background thread builds the model's graphs, then
    draws the maps. Its own server: the module's has loaded the model by then."""
    env = {
        "MALARIA_STORE": str(tmp_path_factory.mktemp("store") / "s.sqlite"),
        "MALARIA_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    log = tmp_path_factory.mktemp("log") / "streamlit.log"
    with running_app(env, log) as (url, _), playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(f"{url}/explain")
        progress = pg.get_by_test_id("stProgress").filter(has_text="Loading the model…")
        progress.wait_for(timeout=120_000)
        assert re.search(r"scoring engine, step 1 of 2 \(\d+ s", progress.inner_text())
        SHOTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(SHOTS / "explain_loading.png"))
        pg.get_by_text("P(Parasitized)").first.wait_for(timeout=300_000)
        pg.wait_for_function(IDLE, timeout=300_000)
        assert pg.get_by_text("explains", exact=False).count() >= 3  # the three default maps
        assert progress.count() == 0 and pg.get_by_text("Traceback").count() == 0
        browser.close()


def test_a_page_url_opens_directly(server, page):
    """A bookmark or reload of /score as the server's very first request gets the whole app
    (router, sidebar, model card), not the bare page script. Runs first: fresh server."""
    page.goto(f"{server}/score")
    page.get_by_text("Score cells").first.wait_for(timeout=90_000)
    # the sidebar's card: the model's estimate on patients it never saw
    page.get_by_text(re.compile("held-back test patients|out-of-fold")).first.wait_for(
        timeout=90_000
    )
    assert page.get_by_text("Traceback").count() == 0


def test_upload_score_threshold_evaluate_explain(server, page, cells_dir, evaluate_split):
    page.goto(server)
    page.get_by_text("Try it on sample cells").wait_for()
    page.screenshot(path=str(SHOTS / "home.png"), full_page=True)

    page.get_by_role("link", name="Score").click()
    page.get_by_text("Score cells").first.wait_for()
    files = sorted(str(p) for p in cells_dir.rglob("*.png"))
    page.locator("input[type=file]:not([webkitdirectory])").first.set_input_files(files)
    score = page.get_by_role("button", name="Score", exact=True)
    playwright.expect(score).to_be_enabled(timeout=120_000)  # once the upload has arrived
    score.click()
    page.get_by_text("Results · run").wait_for()
    page.get_by_text("Parasitemia", exact=True).wait_for()
    cells = page.get_by_test_id("stMetricValue").first  # the Cells metric
    playwright.expect(cells).to_have_text(str(len(files)), timeout=60_000)
    value = page.get_by_test_id("stSliderThumbValue").first
    assert value.inner_text() == "0.50"
    # One step at a time, each rerun finished before the next: a key pressed while the page
    # reruns (the threshold is saved with the run) can be lost.
    for _ in range(30):
        if value.inner_text() == "0.60":
            break
        page.get_by_role("slider").first.focus()
        page.keyboard.press("ArrowRight")
        wait_for_rerun(page, 60_000)
    playwright.expect(value).to_have_text("0.60")
    page.get_by_test_id("stMain").get_by_test_id("stDataFrame").first.wait_for()
    page.wait_for_function(DRAWN, timeout=60_000)
    page.screenshot(path=str(SHOTS / "score.png"), full_page=True)
    page.wait_for_function(IDLE)
    with page.expect_download() as download:
        page.get_by_role("button", name=f"Download all {len(files)} cells (CSV)").click()
    with open(download.value.path(), newline="") as f:
        cells_csv = list(csv.reader(f))
    assert len(cells_csv) == len(files) + 1
    assert cells_csv[0][-5:] == [
        "run_id",
        "threshold",
        "review_band",
        "scored_with",
        "scored_with_sha256",
    ]
    # the threshold on the slider, the review band beside it, the model
    assert cells_csv[1][-4:-1] == ["0.6", "0.15", "weights/default"]
    assert page.get_by_text("Traceback").count() == 0
    run_id = page.get_by_test_id("stHeading").filter(has_text="Results · run").inner_text()
    run_id = run_id.split("run")[-1].strip()
    page.get_by_test_id("stRadio").filter(has_text="Group by").get_by_text("folder").click()
    wait_for_rerun(page, 60_000)

    # a row picked in the table is shown large, and opens in Explain
    table = page.get_by_test_id("stMain").get_by_test_id("stDataFrame").first
    table.evaluate("e => e.scrollIntoView({block: 'center'})")  # clear of the header
    grid = table.bounding_box()
    page.mouse.click(grid["x"] + 15, grid["y"] + 35 + 18)  # the first row's selection box
    explain = page.get_by_role("button", name="Open in Explain")
    explain.wait_for()
    first = sorted(cells_dir.rglob("*.png"))[0].name
    assert f"cell={first}" in page.url.replace("%2F", "/") and f"run={run_id}" in page.url
    explain.click()
    page.get_by_text("Explain a prediction").wait_for()
    page.get_by_text(f"original · {first}").wait_for()
    assert f"run={run_id}" in page.url

    # back on Score, the settings are as they were left
    page.get_by_test_id("stSidebarNavLink").filter(has_text="Score").click()
    page.get_by_text(f"Results · run {run_id}").wait_for()
    playwright.expect(value).to_have_text("0.60", timeout=60_000)
    group_by = page.get_by_test_id("stRadio").filter(has_text="Group by")
    playwright.expect(group_by.get_by_role("radio", name="folder")).to_be_checked()

    # a reload of the page's own URL (?run=) shows the run again, with its threshold
    page.reload()
    page.get_by_text(f"Results · run {run_id}").wait_for()
    assert page.get_by_text("Traceback").count() == 0
    playwright.expect(cells).to_have_text(str(len(files)), timeout=60_000)
    playwright.expect(value).to_have_text("0.60")  # kept with the run in the store
    page.get_by_text("Past runs").wait_for()
    page.get_by_role("button", name="Open run").click()  # reopening from the list
    page.get_by_text(f"Results · run {run_id}").wait_for()
    playwright.expect(cells).to_have_text(str(len(files)))

    page.get_by_role("link", name="Evaluate").click()
    page.get_by_text("Confusion matrix").wait_for(timeout=300_000)  # slow only on a busy machine
    page.get_by_text("Per patient").wait_for()
    page.wait_for_function(DRAWN, timeout=60_000)
    page.screenshot(path=str(SHOTS / "evaluate.png"), full_page=True)
    main = page.locator("section.stMain, [data-testid=stMain]").first
    assert main.get_by_text("ROC (AUC").count() >= 1
    # a click anywhere in a cell of the matrix, not only at its centre, opens that cell (once
    # the page has finished running: a rerun still under way draws the matrix anew)
    page.wait_for_function(IDLE, timeout=120_000)
    box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6)
    page.get_by_text("True Uninfected, predicted Uninfected").wait_for()
    page.wait_for_function(IDLE)
    box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.08, box["y"] + box["height"] * 0.1)
    page.get_by_text("True Parasitized, predicted Parasitized").wait_for()
    page.get_by_text("each with the Explain page's default map").wait_for()
    page.wait_for_function(DRAWN, timeout=60_000)
    page.screenshot(path=str(SHOTS / "evaluate_gallery.png"), full_page=True)
    # a gallery cell shown large opens in Explain, with a link that names it
    page.wait_for_function(IDLE, timeout=300_000)  # the gallery's maps are drawn
    page.get_by_test_id("stMain").get_by_role("button", name="View large").first.click()
    page.get_by_role("button", name="Open in Explain").click()
    page.get_by_text("Explain a prediction").wait_for()
    page.get_by_text("original · C").wait_for()
    assert f"split={evaluate_split}" in page.url and "cell=" in page.url
    page.get_by_test_id("stMetric").first.wait_for(timeout=300_000)
    page.get_by_test_id("stSelectbox").filter(has_text="Layer").click()
    page.get_by_role("option", name="features.3").click()
    wait_for_rerun(page, 300_000)
    # Evaluate and Explain as they were left
    page.get_by_test_id("stSidebarNavLink").filter(has_text="Evaluate").click()
    page.get_by_text("True Parasitized, predicted Parasitized").wait_for()
    page.get_by_test_id("stSidebarNavLink").filter(has_text="Explain").click()
    page.get_by_text("Explain a prediction").wait_for()
    playwright.expect(page.get_by_role("combobox", name="Layer")).to_have_value("features.3")
    page.get_by_test_id("stSelectbox").filter(has_text="Layer").click()
    page.get_by_role("option", name="features.6").click()
    wait_for_rerun(page, 300_000)

    page.get_by_role("link", name="Audit").click()
    if (ROOT / "weights" / "default" / "label_audit.csv").is_file():
        page.get_by_text("Share of suspects per patient").wait_for()
        page.get_by_text("cells decided").wait_for()
    else:  # the shipped model folder has no audit yet: the page says how it is made
        page.get_by_text("This model folder has no").first.wait_for()
    page.wait_for_function(DRAWN, timeout=120_000)
    page.screenshot(path=str(SHOTS / "audit.png"), full_page=True)
    assert page.get_by_text("Traceback").count() == 0

    page.get_by_role("link", name="Home").click()
    page.get_by_role("button", name="Explain").first.click()  # a sample cell, straight in
    page.get_by_text("Explain a prediction").wait_for()
    page.get_by_test_id("stMetric").first.wait_for(timeout=300_000)  # after every map
    assert page.get_by_test_id("stMetric").first.inner_text().startswith("P(Parasitized)")
    page.get_by_text("peak on the stained parasite").first.wait_for()  # the default map's verdict
    page.wait_for_function(IDLE, timeout=300_000)  # ROAD arrives after the maps
    assert page.get_by_text(re.compile(r"ROAD [+-]\d")).count() == 3
    assert page.get_by_text("ROAD: computing").count() == 0
    page.set_viewport_size({"width": 1400, "height": 1400})  # maps and their verdicts in view
    page.get_by_text("explains").first.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "explain.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})

    page.get_by_test_id("stSidebarNavLink").filter(has_text="Heatmap check").click()
    page.get_by_text("Heatmap check: which explanations find the parasite").wait_for()
    page.get_by_text("Reading.").first.wait_for()
    page.wait_for_function(DRAWN, timeout=60_000)
    page.screenshot(path=str(SHOTS / "heatmap_check.png"), full_page=True)
    assert page.get_by_text("Traceback").count() == 0

    page.get_by_role("link", name="Training").click()
    page.get_by_text("Learning-rate range test").wait_for()
    page.wait_for_function(DRAWN, timeout=60_000)
    page.screenshot(path=str(SHOTS / "training.png"), full_page=True)
    assert page.get_by_text("suggested").count() >= 1  # the LR test's marked suggestion

    page.get_by_role("link", name="Study").click()
    page.get_by_text("Study: which features, which model").wait_for()
    page.wait_for_function(DRAWN, timeout=60_000)
    page.screenshot(path=str(SHOTS / "study.png"), full_page=True)


def test_a_noise_image_is_review_not_counted_and_the_report_downloads(
    server, page, cells_dir, tmp_path
):
    """The quality gate, the review band and the report, as an analyst meets them."""
    import numpy as np
    from PIL import Image

    noise = tmp_path / "C96_noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(
        noise
    )
    cells = sorted(str(p) for p in cells_dir.rglob("C96*.png"))
    page.goto(f"{server}/score")
    page.get_by_text("Score cells").first.wait_for()
    uploader = page.get_by_test_id("stFileUploader").filter(has_text="Images or zips")
    uploader.locator("input[type=file]").set_input_files(cells + [str(noise)])
    score = page.get_by_role("button", name="Score", exact=True)
    playwright.expect(score).to_be_enabled(timeout=120_000)
    score.click()
    page.get_by_text("Results · run").wait_for()
    values = page.get_by_test_id("stMetricValue")
    playwright.expect(values.nth(0)).to_have_text(str(len(cells) + 1), timeout=60_000)
    page.get_by_text("1 image(s) do not look like a single cell crop").wait_for()
    page.get_by_text("review band").first.wait_for()  # drawn on the threshold's scale
    assert int(values.nth(2).inner_text()) >= 1  # For review: the noise image at least
    page.get_by_text("Results · run").scroll_into_view_if_needed()
    page.wait_for_function(DRAWN, timeout=60_000)
    page.screenshot(path=str(SHOTS / "score_review.png"), full_page=True)
    page.get_by_role("button", name="Make report").click()
    download_button = page.get_by_role("button", name="Download report (HTML)")
    download_button.wait_for(timeout=180_000)
    page.wait_for_function(IDLE)
    with page.expect_download() as download:
        download_button.click()
    text = Path(download.value.path()).read_text()
    assert "<h2>C96</h2>" in text and "C96_noise.png" in text and "not a cell" in text
    assert text.count("data:image/png;base64,") >= 2  # a cell and its heatmap, embedded
    assert page.get_by_text("Traceback").count() == 0


SMEAR_FIELD = ROOT.parent / "shared" / "data" / "smear_dev" / "images" / "PA171730.JPG"


@pytest.mark.skipif(not SMEAR_FIELD.is_file(), reason="the smear_dev fields are not at hand")
def test_a_cell_clicked_in_a_smear_field_is_shown_large_and_a_link_clicked_next_still_opens(
    server, page
):
    page.goto(f"{server}/smear")
    page.locator("input[type=file]").first.set_input_files(str(SMEAR_FIELD))
    find = page.get_by_role("button", name="Find and score cells")
    playwright.expect(find).to_be_enabled(timeout=60_000)
    find.click()
    page.get_by_text("A field", exact=True).wait_for(timeout=180_000)
    page.wait_for_function(IDLE, timeout=180_000)
    cell = page.get_by_role("combobox", name="Cell")
    before = cell.input_value()
    marker = page.locator(".js-plotly-plot .scatterlayer .point").nth(5)
    marker.scroll_into_view_if_needed()
    box = marker.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tip = page.locator(".js-plotly-plot .hovertext").first.text_content()  # P(Parasitized) 0.xxx
    page.mouse.down()
    page.mouse.up()
    wait_for_rerun(page, 60_000)
    playwright.expect(cell).not_to_have_value(before)
    assert tip.split()[-1] in cell.input_value()  # the clicked cell is the one shown large
    # a click in the field and, at once, a page in the sidebar: the page opens
    marker = page.locator(".js-plotly-plot .scatterlayer .point").nth(9)
    box = marker.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.get_by_test_id("stSidebarNavLink").filter(has_text="Evaluate").click()
    page.get_by_text("Confusion matrix").wait_for(timeout=120_000)
    assert page.get_by_text("Traceback").count() == 0


def _matrix(page) -> list[int]:
    """The confusion matrix's counts as drawn: TP, FN, FP, TN."""
    texts = page.locator(".js-plotly-plot").first.locator("text").all_text_contents()
    return [int(t) for t in texts if t.isdigit()]


def test_the_evaluate_threshold_survives_an_upload_and_a_switch_of_data(
    server, page, cells_dir, tmp_path
):
    """The threshold the user set stays on the slider and in the matrix through a labelled
    upload (whose first run stops before the slider is drawn), a rerun, and back."""
    labelled = tmp_path / "labelled.zip"
    cells = sorted(cells_dir.rglob("*.png"))
    with zipfile.ZipFile(labelled, "w") as z:
        for p in cells:
            z.write(p, f"{p.parent.name}/{p.name}")
    page.goto(f"{server}/evaluate")
    page.get_by_text("Confusion matrix").wait_for()
    page.wait_for_function(IDLE)
    value = page.get_by_test_id("stSliderThumbValue").first
    assert value.inner_text() == "0.50"  # the model's threshold
    for _ in range(30):
        if value.inner_text() == "0.60":
            break
        page.get_by_role("slider").first.focus()
        page.keyboard.press("ArrowRight")
        wait_for_rerun(page, 60_000)
    playwright.expect(value).to_have_text("0.60")
    oof = _matrix(page)

    data = page.get_by_test_id("stRadio").filter(has_text="Data")
    data.get_by_text("A labelled upload").click()
    page.get_by_text("Upload a labelled set").wait_for()
    page.wait_for_function(IDLE)
    page.locator("input[type=file]").first.set_input_files(str(labelled))
    page.get_by_text("Confusion matrix").wait_for()
    page.wait_for_function(IDLE)
    playwright.expect(value).to_have_text("0.60")
    uploaded = _matrix(page)
    assert sum(uploaded) == len(cells)
    box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()  # a rerun
    page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6)
    page.get_by_text("True Uninfected, predicted Uninfected").wait_for()
    page.wait_for_function(IDLE)
    playwright.expect(value).to_have_text("0.60")
    assert _matrix(page) == uploaded

    data.get_by_text(re.compile("^(Out-of-fold|The model's test split)")).click()  # back
    wait_for_rerun(page, 120_000)
    playwright.expect(value).to_have_text("0.60")
    assert _matrix(page) == oof
    assert page.get_by_text("Traceback").count() == 0


@pytest.mark.skipif(not SMEAR_FIELD.is_file(), reason="the smear_dev fields are not at hand")
def test_a_reload_keeps_the_model_and_the_smear_run_on_show(server, page):
    """The sidebar's model is in the address through page switches; a reload of the Smear
    page shows its run again, with that model selected."""
    page.goto(f"{server}/smear")
    page.get_by_text("Smear fields").first.wait_for()
    page.wait_for_function(IDLE)
    page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").click()
    page.get_by_role("option", name="weights/holdout").click()
    page.wait_for_url(re.compile(r"model=weights%2Fholdout"))
    wait_for_rerun(page, 60_000)
    page.get_by_test_id("stSidebarNavLink").filter(has_text="Evaluate").click()
    page.get_by_text("Confusion matrix").wait_for()
    page.wait_for_url(re.compile(r"/evaluate\?.*model=weights%2Fholdout"))
    page.get_by_test_id("stSidebarNavLink").filter(has_text="Smear").click()
    page.get_by_text("Smear fields").first.wait_for()
    page.locator("input[type=file]").first.set_input_files(str(SMEAR_FIELD))
    find = page.get_by_role("button", name="Find and score cells")
    playwright.expect(find).to_be_enabled(timeout=60_000)
    find.click()
    page.get_by_text("A field", exact=True).wait_for(timeout=180_000)
    page.wait_for_url(re.compile(r"run=.*model=|model=.*run="))
    run_id = re.search(r"run=([\w-]+)", page.url).group(1)
    cells = page.get_by_test_id("stMetricValue").nth(1).inner_text()  # Red cells

    page.reload()
    page.get_by_text(f"Results · run {run_id}").wait_for(timeout=120_000)
    playwright.expect(page.get_by_test_id("stMetricValue").nth(1)).to_have_text(cells)
    model = page.get_by_role("combobox", name="Model")
    playwright.expect(model).to_have_value("weights/holdout")
    page.get_by_text("keeps its results, not its images").wait_for()  # an upload's fields
    page.get_by_text("Past runs").wait_for()
    assert page.get_by_text("Traceback").count() == 0


def test_a_lesson_link_opens_explain_at_the_stage_it_names(server, page):
    """The Lesson page as a teacher shows it; its first link opens Explain at the network's
    last stage, over a layer the Explain page was showing before."""
    page.goto(f"{server}/explain")
    layer = page.get_by_role("combobox", name="Layer")
    playwright.expect(layer).to_have_value("features.6", timeout=120_000)
    page.wait_for_function(IDLE, timeout=300_000)
    page.get_by_test_id("stSidebarNavLink").filter(has_text="Lesson").click()
    page.get_by_text("5. How it learnt").wait_for(timeout=120_000)
    page.wait_for_function(DRAWN, timeout=120_000)
    page.set_viewport_size({"width": 1400, "height": 3400})  # every step in one picture
    page.screenshot(path=str(SHOTS / "lesson.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.get_by_role("link", name="Open in Explain at features.18").click()
    page.get_by_text("Explain a prediction").wait_for()
    playwright.expect(layer).to_have_value("features.18", timeout=120_000)
    page.get_by_text("features.18 · 4x4 map").first.wait_for(timeout=300_000)
    assert "layer=features.18" in page.url and "sample=" in page.url
    assert page.get_by_text("Traceback").count() == 0
