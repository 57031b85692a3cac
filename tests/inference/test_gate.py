"""The quality gate (core.inference.gate): image checks, the feature verdict and its calibration per
engine, on real cells, generated non-cells and smear fields; old stores gain the quality column."""

from __future__ import annotations

import io
import sqlite3

import numpy as np
import pytest

import core.inference.engines
import core.inference.pipeline
from core.data import noncells
from core.data.images import resize_rgb
from core.evaluation.gate_check import fit_features
from core.inference.gate import (
    CALIBRATION_FILE,
    FeatureModel,
    Gate,
    channel_span,
    image_reasons,
    image_stats,
)
from core.inference.store import ResultStore
from core.schema.contract import (
    DEFAULT_WEIGHTS,
    FILES_KEY,
    GATE_FILES,
    ModelContract,
    ModelFolder,
    WeightsError,
    sha256_file,
    verified_weights,
)
from core.schema.metrics import parasitemia_summary
from core.schema.results import (
    BLANK,
    NO_COLOUR,
    OK,
    OUT_OF_FOCUS,
    RESULT_COLUMNS,
    UNLIKE_TRAINING,
)
from tests.helpers import SHARED_DATA
from tests.helpers import decoded_cells as _cells
from tests.helpers import gaussian_features as _gaussian_features

SMEAR = SHARED_DATA / "smear_dev" / "images"


def _batch(images) -> np.ndarray:
    return np.stack([resize_rgb(img, 128) for _, img in images])


def test_image_stats_are_one_value_per_image_in_range(cells_dir):
    images = _batch(_cells(cells_dir))
    stats = image_stats(images)
    assert set(stats) == {
        "spread",
        "chroma",
        "dark_corners",
        "area",
        "fill",
        "brightness",
        "red_green",
        "blue_green",
        "sharpness",
    }
    for name, values in stats.items():
        assert values.shape == (len(images),) and np.isfinite(values).all(), name
    assert ((stats["area"] > 0) & (stats["area"] <= 1)).all()
    assert ((stats["dark_corners"] >= 0) & (stats["dark_corners"] <= 1)).all()
    with pytest.raises(ValueError, match="RGB"):
        image_stats(images[..., 0])


def test_real_cells_pass_the_image_checks(cells_dir):
    assert image_reasons(image_stats(_batch(_cells(cells_dir)))) == [OK] * 44


def test_a_grey_copy_of_a_cell_is_not_counted_for_want_of_colour(cells_dir):
    images = _batch(_cells(cells_dir))
    grey = np.repeat(images.mean(-1, keepdims=True).round().astype(np.uint8), 3, -1)
    assert image_reasons(image_stats(grey)) == [NO_COLOUR] * len(grey)
    assert image_reasons(image_stats(images)) == [OK] * len(images)  # colour kept: counted


@pytest.mark.parametrize("kind", ["noise", "blank", "gradient", "blurred cell"])
def test_every_generated_non_cell_fails_the_image_checks(kind, cells_dir):
    sets = noncells.non_cells(smear_folder=None, cells=_cells(cells_dir)[:12], seed=1)
    images = sets[kind]
    assert len(images) >= 6
    reasons = image_reasons(image_stats(_batch(images)))
    passed = [name for (name, _), r in zip(images, reasons) if r == OK]
    assert not passed, passed
    if kind == "blank":
        assert set(reasons) == {BLANK}
    if kind == "blurred cell":
        assert set(reasons) == {OUT_OF_FOCUS}


@pytest.mark.skipif(not SMEAR.is_dir(), reason="the smear fields are not on this machine")
def test_whole_smear_fields_and_their_crops_fail_the_image_checks():
    images = noncells.smear_fields(SMEAR, np.random.default_rng(0), crops=1)[:20]
    assert all(r.startswith("not a cell") for r in image_reasons(image_stats(_batch(images))))


def test_calibration_round_trips_and_is_tied_to_its_weights(tmp_path, cells_dir):
    rng = np.random.default_rng(0)
    f, labels = _gaussian_features(500, rng)
    fm = fit_features(f, labels, f, quantile=0.9, weights_sha256="abc", components=8)
    fm.save(tmp_path / CALIBRATION_FILE)
    back = FeatureModel.load(tmp_path / CALIBRATION_FILE)
    assert np.array_equal(back.distance(f), fm.distance(f)) and back.limit == fm.limit
    assert Gate.for_model(_folder(tmp_path, "abc")).features is not None
    other = Gate.for_model(_folder(tmp_path, "not-these-weights"))
    assert other.features is None and "other weights" in other.note
    assert Gate.for_model(_folder(tmp_path / "nowhere", "abc")).features is None
    # a pickled object array is refused, never unpickled
    np.savez(tmp_path / CALIBRATION_FILE, means=np.array([object()], dtype=object))
    with pytest.raises(WeightsError, match="not a quality calibration"):
        Gate.for_model(_folder(tmp_path, "abc"))


def _folder(path, sha256: str) -> ModelFolder:
    """A model folder at ``path`` whose card records the gate files there as they are."""
    files = {n: sha256_file(path / n) for n in GATE_FILES if (path / n).is_file()}
    return ModelFolder(path, {FILES_KEY: files}, ModelContract(), sha256)


def test_the_gate_adds_the_feature_verdict_to_cells_that_pass_the_image_checks(cells_dir):
    images = _batch(_cells(cells_dir)[:4])
    gate = Gate(
        FeatureModel(
            np.zeros((2, 3), np.float32),
            np.eye(3, 2, dtype=np.float32),
            np.ones(2, np.float32),
            1.0,
            2.0,
            0.99,
            "x",
        )
    )
    features = np.array([[0, 0, 0], [5, 0, 0], [0, 0, 5], [1, 1, 0]], np.float32)
    assert gate(images, features) == [OK, UNLIKE_TRAINING, UNLIKE_TRAINING, OK]
    noise = np.random.default_rng(0).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    assert gate(noise, features[:1])[0].startswith("not a cell")  # the image reason first


def test_onnx_and_torch_features_agree(cells_dir, tiny_model):
    images = _batch(_cells(cells_dir))
    p1, f1 = core.inference.engines.load_engine(tiny_model, "onnx").score(images)
    p2, f2 = core.inference.engines.load_engine(tiny_model, "torch").score(images)
    assert f1.shape == f2.shape == (len(images), 1280)
    assert np.abs(p1 - p2).max() < 1e-4 and np.abs(f1 - f2).max() < 1e-3


def test_the_shipped_model_passes_real_cells_and_flags_non_cells(cells_dir):
    engine = core.inference.engines.load_engine(DEFAULT_WEIGHTS, "onnx")
    assert engine.gate.features is not None, engine.gate.note
    assert engine.gate.features.weights_sha256 == verified_weights(DEFAULT_WEIGHTS)[2]
    cells = _batch(_cells(cells_dir))
    assert engine.gate(cells, engine.score(cells)[1]) == [OK] * len(cells)
    # photos include round things on black (a retina, a moon) that pass the image checks:
    # the feature distance catches those
    odd = _batch(
        noncells.noise(np.random.default_rng(0), 8)
        + noncells.gradient(np.random.default_rng(0), 8)
        + noncells.photos(np.random.default_rng(0), synthetic=8)
    )
    verdicts = engine.gate(odd, engine.score(odd)[1])
    assert OK not in verdicts and UNLIKE_TRAINING in verdicts


def test_a_store_from_before_the_gate_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, started TEXT NOT NULL, finished TEXT,
            inputs TEXT NOT NULL, weights TEXT NOT NULL, weights_sha256 TEXT NOT NULL,
            threshold REAL NOT NULL, engine TEXT NOT NULL, kind TEXT NOT NULL, total INTEGER);
        CREATE TABLE results (run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            path TEXT NOT NULL, case_id TEXT NOT NULL, label TEXT, prob_parasitized REAL,
            prediction TEXT, error TEXT, PRIMARY KEY (run_id, path));
        INSERT INTO runs VALUES ('r1', '2026-01-01', NULL, '["x"]', 'w', 'abc', 0.5, 'onnx',
                                 'files', 2);
        INSERT INTO results VALUES ('r1', 'a.png', 'C1', NULL, 0.9, 'Parasitized', NULL);
        INSERT INTO results VALUES ('r1', 'b.png', 'C1', NULL, 0.1, 'Uninfected', NULL);
    """)
    db.commit()
    db.close()
    with ResultStore(path) as store:
        old = store.results("r1")
        assert list(old.columns) == list(RESULT_COLUMNS) and old["quality"].isna().all()
        store.add_results(
            "r1",
            [
                {
                    "path": "c.png",
                    "case_id": "C1",
                    "label": None,
                    "prob_parasitized": 0.2,
                    "prediction": "Uninfected",
                    "quality": "blank",
                    "error": None,
                }
            ],
        )
        runs = store.list_runs().iloc[0]
        assert (runs["stored"], runs["parasitized"], runs["not_counted"]) == (3, 1, 1)
        s = parasitemia_summary(store.results("r1")).iloc[0]
    assert (s["scored"], s["not_counted"], s["parasitized"]) == (2, 1, 1)
    with ResultStore(path):  # opening again: nothing left to migrate
        pass


def test_upload_of_a_noise_image_is_scored_not_counted(tiny_model):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, "PNG")
    df, _ = core.inference.pipeline.score_uploads(
        [("flat.png", buf.getvalue())], weights=tiny_model
    )
    assert df.loc[0, "quality"] == BLANK and 0 <= df.loc[0, "prob_parasitized"] <= 1


def test_each_engine_reads_its_own_feature_calibration(tmp_path):
    """int8 features are not fp32 ones: onnx-int8 uses quality_int8.npz, never quality.npz."""
    from core.inference.gate import INT8_CALIBRATION_FILE, calibration_file

    assert calibration_file("onnx") == calibration_file("torch") == CALIBRATION_FILE
    assert calibration_file("onnx-int8") == INT8_CALIBRATION_FILE != CALIBRATION_FILE
    rng = np.random.default_rng(0)
    fm = fit_features(
        rng.normal(size=(60, 8)),
        np.repeat([0, 1], 30),
        rng.normal(size=(20, 8)),
        quantile=0.99,
        weights_sha256="abc",
    )
    fm.save(tmp_path / CALIBRATION_FILE)
    assert Gate.for_model(_folder(tmp_path, "abc"), "onnx").features is not None
    assert Gate.for_model(_folder(tmp_path, "abc"), "onnx-int8").features is None  # none of its own


def test_channel_span_is_the_brightest_minus_the_darkest_channel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    span = channel_span(images)
    assert span.dtype == np.uint8 and span.shape == (5, 7, 9)
    assert np.array_equal(span, images.max(-1) - images.min(-1))
