"""Adaptation as a background job (core.training.jobs) and the Adapt page that starts it."""

from __future__ import annotations

import io
import json
import time
import zipfile

import pytest

from core.data.annotations import AnnotationError
from core.schema.contract import ModelFolder
from core.training.jobs import adapt_jobs, start_adapt


def _uploads(lab) -> tuple[list[tuple[str, bytes]], bytes]:
    """The lab's fields as one zip upload (in a folder, as a user zips them) and its boxes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in sorted((lab / "images").iterdir()):
            z.write(path, f"my fields/{path.name}")
    return [("fields.zip", buf.getvalue())], (lab / "annotations.json").read_bytes()


@pytest.mark.parametrize(
    "change, error, message",
    [
        ("name", ValueError, "letters, digits"),
        ("missing image", AnnotationError, "AA01.png"),
        ("same name twice", AnnotationError, "two uploaded images are named"),
        ("no images", AnnotationError, "no field images"),
        ("not json", AnnotationError, "^annotations.json is not JSON"),
        ("exists", ValueError, "exists"),
    ],
)
def test_bad_uploads_are_refused_before_anything_starts(
    lab, tiny_model, tmp_path, change, error, message
):
    items, boxes = _uploads(lab)
    name = "my lab!" if change == "name" else "mylab"
    if change == "missing image":
        items = [(p.name, p.read_bytes()) for p in sorted((lab / "images").iterdir())][1:]
    if change == "same name twice":
        items = items + [("AA01.png", (lab / "images" / "AA01.png").read_bytes())]
    if change == "no images":
        items = [("notes.zip", _empty_zip())]
    if change == "not json":
        boxes = b"<xml/>"
    if change == "exists":
        (tmp_path / "adapted" / "mylab").mkdir(parents=True)
    with pytest.raises(error, match=message):
        start_adapt(
            items,
            boxes,
            name=name,
            base=tiny_model,
            jobs_dir=tmp_path / "jobs",
            adapted_dir=tmp_path / "adapted",
        )
    assert adapt_jobs(tmp_path / "jobs") == []  # nothing started, nothing left behind
    assert not list((tmp_path / "jobs").glob("*")) if (tmp_path / "jobs").exists() else True


def _empty_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("README.txt", "no images here")
    return buf.getvalue()


@pytest.mark.slow  # it trains, in a process of its own (about a minute)
def test_a_job_adapts_in_the_background_and_the_page_shows_its_check(
    lab, tiny_model, tmp_path, monkeypatch
):
    import core.training.jobs

    monkeypatch.setattr(core.training.jobs, "JOBS_DIR", tmp_path / "jobs")
    monkeypatch.setattr(core.training.jobs, "ADAPTED_DIR", tmp_path / "adapted")
    items, boxes = _uploads(lab)
    job = start_adapt(items, boxes, name="mylab", base=tiny_model, blocks=2)
    assert job.info["fields"] == 4 and job.state == "running"
    assert adapt_jobs() == [job]
    deadline = time.time() + 600
    while job.state == "running" and time.time() < deadline:
        time.sleep(2)
    assert job.state == "done", job.log(20)
    model = ModelFolder.open(job.out)  # a complete, verified model folder
    assert model.card["adaptation"]["fields"] == 4
    assert job.out == tmp_path / "adapted" / "mylab"

    from streamlit.testing.v1 import AppTest

    from core.schema.files import REPO_ROOT

    monkeypatch.setenv("MALARIA_STORE", str(tmp_path / "store.sqlite"))
    app = AppTest.from_file(str(REPO_ROOT / "dashboard" / "app.py"), default_timeout=120)
    app.run()
    app.switch_page("views/adapt.py").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any("done: choose **mylab**" in s.value for s in app.success)
    [table] = [d.value for d in app.dataframe if "left-out block" in d.value.columns]
    assert list(table["left-out block"]) == ["AA", "BB", "all"]
    assert json.loads((job.folder / "job.json").read_text())["check"] is True
