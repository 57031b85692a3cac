from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import core.training.study
from core.data.splits import labelled_samples
from core.training.study import MOBILENET_V2_STAGES, extract_features, study_layers

EXPECTED_DIMS = {
    "block1_16ch": 16,
    "block2_24ch": 24,
    "block3_32ch": 32,
    "block4_64ch": 64,
    "block5_96ch": 96,
    "block6_160ch": 160,
    "block7_320ch": 320,
    "last_conv_1280ch": 1280,
}


@pytest.mark.slow
def test_features_have_the_expected_size_per_layer_and_resume_from_cache(
    cells_dir, tmp_path, monkeypatch
):
    samples, sources = labelled_samples([cells_dir])
    feats = extract_features(samples, sources, tmp_path, progress=False)
    assert set(feats) == set(MOBILENET_V2_STAGES)
    for name, x in feats.items():
        assert x.shape == (len(samples), EXPECTED_DIMS[name]) and np.isfinite(x).all()

    def no_decoding(*a, **k):
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(core.training.study, "load_array", no_decoding)
    again = extract_features(samples, sources, tmp_path, progress=False)
    assert all(np.array_equal(again[k], feats[k]) for k in feats)


def test_grouped_folds_never_share_a_case(cells_dir, monkeypatch):
    samples, _ = labelled_samples([cells_dir])
    y = np.array([s.label for s in samples])
    groups = np.array([s.case_id for s in samples])
    seen = []

    class Recording:
        def fit(self, x, y_):
            seen.append({int(v) for v in x[:, 0]})
            return self

        def predict_proba(self, x):
            return np.full((len(x), 2), 0.5)

    monkeypatch.setattr(core.training.study, "_probe", Recording)
    index = np.arange(len(y), dtype=float)[:, None]  # feature = row number, to see the folds
    folds = core.training.study.cross_validate(index, y, groups, folds=3)
    assert len(folds) == len(seen) == 3
    for train_rows in seen:
        test_rows = set(range(len(y))) - train_rows
        assert not {groups[i] for i in train_rows} & {groups[i] for i in test_rows}


@pytest.mark.slow
def test_layer_table_has_every_column(cells_dir, tmp_path):
    table = study_layers([cells_dir], tmp_path, folds=3, progress=False)
    assert list(table["layer"]) == list(MOBILENET_V2_STAGES)
    for col in (
        "features",
        "accuracy",
        "accuracy_std",
        "auc",
        "auc_std",
        "sensitivity",
        "specificity",
        "f1",
        "mcc",
        "seconds",
    ):
        assert col in table.columns
    on_disk = pd.read_csv(tmp_path / "layers.csv")
    assert len(on_disk) == len(MOBILENET_V2_STAGES)
    assert on_disk["accuracy"].between(0, 1).all()
    import json

    info = json.loads((tmp_path / "layers.json").read_text())
    assert info["best_layer"] in MOBILENET_V2_STAGES
    assert 0 <= info["cell_level_split"]["accuracy"] <= 1
    assert info["best_accuracy"] == pytest.approx(table["accuracy"].max())


def test_the_models_study_refuses_a_reference_without_test_patients(cells_dir, tmp_path):
    from core.data.splits import DataError
    from core.schema.contract import DEFAULT_WEIGHTS, HOLDOUT_WEIGHTS
    from core.training.study import study_models

    # the shipped model trained on every patient: its "test" row would be another model's
    with pytest.raises(DataError, match="no test patients.*--reference weights/holdout"):
        study_models([cells_dir], tmp_path, reference=DEFAULT_WEIGHTS, progress=False)
    assert not list(tmp_path.iterdir())  # refused before any work
    import inspect

    assert inspect.signature(study_models).parameters["reference"].default == HOLDOUT_WEIGHTS
