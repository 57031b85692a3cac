"""Streaming scoring of uploads (core.inference.pipeline)."""

from __future__ import annotations

import io
import zipfile

import pytest

import core.inference.pipeline
from core.inference.store import ResultStore


def test_score_uploads_reports_progress_and_expands_zips(cells_dir, tiny_model, tmp_path):
    files = sorted(cells_dir.rglob("*.png"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in files[:20]:
            z.write(f, f"cell_images/{f.parent.name}/{f.name}")
    items = [("cells.zip", buf.getvalue())] + [(f.name, f.read_bytes()) for f in files[20:]]
    seen = []
    with ResultStore(tmp_path / "s.sqlite") as store:
        df, run_id = core.inference.pipeline.score_uploads(
            items, weights=tiny_model, store=store, progress=lambda d, t: seen.append((d, t))
        )
        assert len(store.results(run_id)) == len(files)
    assert len(df) == len(files) and seen[-1] == (len(files), len(files))
    assert df["label"].iloc[:20].notna().all()  # labels from the zip's folders
    with pytest.raises(ValueError, match="no images"):
        core.inference.pipeline.score_uploads([("notes.zip", _empty_zip())], weights=tiny_model)


def _empty_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "nothing here")
    return buf.getvalue()


def test_grey_and_single_channel_cells_are_scored_but_not_counted(cells_dir, tiny_model):
    from PIL import Image

    from core.schema.metrics import parasitemia_summary
    from core.schema.results import NO_COLOUR, OK, at_threshold

    files = sorted(cells_dir.rglob("*.png"))[:6]
    items = []
    for f in files:
        cell = Image.open(f)
        items.append((f"colour/{f.name}", f.read_bytes()))
        for mode in ("L", "RGB"):  # a single-channel file, and R = G = B in three channels
            buf = io.BytesIO()
            cell.convert("L").convert(mode).save(buf, "PNG")
            items.append((f"grey_{mode}/{f.name}", buf.getvalue()))
    df, _ = core.inference.pipeline.score_uploads(items, weights=tiny_model)
    quality = df.set_index("path")["quality"]
    assert (quality.filter(like="colour/") == OK).all()
    assert (quality.filter(like="grey_") == NO_COLOUR).all() and len(quality) == 18
    summary = parasitemia_summary(at_threshold(df, threshold=0.5), group_by="folder")
    assert summary.set_index("group").loc["grey_L", "scored"] == 0  # none of them counts
