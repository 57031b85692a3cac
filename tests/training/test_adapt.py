"""`malaria adapt` (core.training.adapt) on fields composed from the fixture cells: a new model
folder with the lab's threshold, gate and leave-one-block-out check; bad input refused first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import cli
from core.schema.contract import ModelFolder, sha256_file
from core.schema.labels import UNINFECTED_INDEX
from core.training.adapt import _unseen_threshold, lab_threshold

pytestmark = pytest.mark.slow  # it trains


def test_adapt_writes_a_checked_model_folder_and_leaves_the_base_alone(lab, tiny_model, tmp_path):
    before = sha256_file(tiny_model / "model.safetensors"), sha256_file(tiny_model / "card.json")
    out = tmp_path / "mylab"
    argv = ["adapt", str(lab / "images"), "--annotations", str(lab / "annotations.json")]
    argv += ["--out", str(out), "--weights", str(tiny_model), "--epochs", "1", "--blocks", "2"]
    assert cli.main([*argv, "--stain", "0.1"]) == 0
    model = ModelFolder.open(out)  # complete and verified
    record = model.card["adaptation"]
    assert record["fields"] == 4 and record["blocks"] == ["AA", "BB"]
    assert record["infected_cells"] == 8 and record["config"]["stain"] == 0.1
    check = record["check"]["blocks"]
    assert set(check) == {"AA", "BB", "all"} and check["all"]["fields"] == 4
    boxes = record["check"]["boxes"]  # the left-out blocks' cells cut from their boxes
    assert set(boxes) == {"AA", "BB", "all"} and boxes["all"]["infected"] == 8
    assert 0.1 <= model.contract.threshold < 1
    # each block measured at the threshold of the other, the model at least the pooled one's
    assert set(record["check"]["thresholds"]) == {"AA", "BB"}
    assert model.contract.threshold == record["unseen_threshold"] >= 0.1
    assert (out / "quality.npz").is_file()
    assert "malaria adapt" in model.card["training_command"]
    assert (
        sha256_file(tiny_model / "model.safetensors"),
        sha256_file(tiny_model / "card.json"),
    ) == before
    assert cli.main(argv) == 2  # the folder exists now: never overwritten


def test_bad_annotations_stop_before_training_and_write_nothing(lab, tiny_model, tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps([{"image_name": "gone.png", "objects": []}]))
    out = tmp_path / "never"
    argv = ["adapt", str(lab / "images"), "--annotations", str(bad), "--out", str(out)]
    assert cli.main([*argv, "--weights", str(tiny_model)]) == 2
    assert not out.exists()
    good = ["adapt", str(lab / "images"), "--annotations", str(lab / "annotations.json")]
    assert cli.main([*good, "--out", str(out), "--stain", "1.5"]) == 2
    assert not out.exists()


def test_the_unseen_threshold_calls_at_most_the_share_asked_of_the_blocks_pooled():
    rng = np.random.default_rng(0)
    neg = [rng.uniform(0, 0.9, 300), rng.uniform(0, 0.6, 700)]  # one block scored higher
    scored = [(p, np.full(len(p), UNINFECTED_INDEX)) for p in neg]
    t = _unseen_threshold(scored, 0.01)
    pooled = np.concatenate(neg)
    assert (pooled >= t).mean() <= 0.01 < (pooled >= t - 0.02).mean()
    low = [(rng.uniform(0, 0.2, 1000), np.full(1000, UNINFECTED_INDEX))]
    assert 0.19 < _unseen_threshold(low, 0.01) < 0.21  # below the fitted cells' floor of 0.5
    assert lab_threshold(*low[0], max_false_share=0.01) == 0.5  # a fit's own cells: not below
    assert _unseen_threshold([], 0.01) == 0.5  # no block left out: nothing to set it on
