from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import core.evaluation.gate_check
import core.inference.gate
import core.training.train
from core import cli
from core.inference.engines import load_engine
from core.nets.model import build_model, load_model
from core.training import lr_find, train
from core.training.recipe import TrainingError


def _train_args(cells_dir, out, *extra):
    return cli.parse(
        [
            "train",
            "--data",
            str(cells_dir),
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--no-progress",
            *extra,
        ]
    )


def _interrupted_then_resumed(cells_dir, out, monkeypatch, *extra) -> None:
    """Train ``out`` with ``extra``, killed during epoch 2's validation (the checkpoint holds
    epoch 1), then resume it to the end."""
    real_evaluate, calls = core.training.train.evaluate, []

    def evaluate_then_die(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(core.training.train, "evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(_train_args(cells_dir, out, *extra))
    assert len(pd.read_csv(out / "history.csv")) == 1
    monkeypatch.setattr(core.training.train, "evaluate", real_evaluate)
    train.run(_train_args(cells_dir, out, *extra, "--resume"))


@pytest.mark.slow
def test_one_tiny_epoch_writes_history_card_weights_and_predictions(cells_dir, tmp_path):
    out = tmp_path / "run"
    card = train.run(_train_args(cells_dir, out, "--epochs", "1"))
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns[:8]) == [
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_auc",
        "lr",
        "seconds",
    ]
    assert len(history) == 1 and np.isfinite(history["train_loss"]).all()
    on_disk = json.loads((out / "card.json").read_text())
    assert on_disk.keys() == card.keys() and on_disk["sha256"] == card["sha256"]
    assert card["arch"] == "mobilenet_v2" and "malaria train" in card["training_command"]
    assert set(card["metrics"]["test"]) >= {
        "accuracy",
        "auc",
        "sensitivity",
        "specificity",
        "f1",
        "mcc",
    }
    split = json.loads((out / "split.json").read_text())
    assert split == card["split"]
    cases = [set(split[k]) for k in ("train", "val", "test")]
    assert not (cases[0] & cases[1] or cases[0] & cases[2] or cases[1] & cases[2])
    preds = pd.read_csv(out / "test_predictions.csv")
    assert list(preds.columns) == ["path", "case_id", "label", "prob_parasitized"]
    assert set(preds["case_id"]) == cases[2]
    assert preds["prob_parasitized"].between(0, 1).all()
    loaded = load_model(out)
    assert loaded.sha256 == card["sha256"]


@pytest.mark.slow
def test_a_model_trained_at_another_input_size_is_scored_at_that_size(cells_dir, tmp_path):
    out = tmp_path / "run"
    card = train.run(_train_args(cells_dir, out, "--epochs", "1", "--input-size", "64"))
    assert "--input-size 64" in card["training_command"]
    loaded = load_model(out)
    assert loaded.contract.input_size == 64
    assert load_engine(out, "torch")(np.zeros((3, 64, 64, 3), np.uint8)).shape == (3,)


def test_an_input_size_the_networks_cannot_take_is_refused_in_one_line(cells_dir, tmp_path):
    with pytest.raises(TrainingError, match="--input-size must be in"):
        train.run(_train_args(cells_dir, tmp_path / "run", "--input-size", "16"))


@pytest.mark.slow
def test_interrupted_training_resumes_where_it_stopped(cells_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train.run(_train_args(cells_dir, straight, "--epochs", "2"))
    out = tmp_path / "run"
    _interrupted_then_resumed(cells_dir, out, monkeypatch, "--epochs", "2")
    resumed, reference = pd.read_csv(out / "history.csv"), pd.read_csv(straight / "history.csv")
    assert resumed["epoch"].tolist() == [1, 2]
    # same optimiser, schedule and random state: the resumed epoch 2 is the uninterrupted one
    for col in ("train_loss", "val_loss", "lr"):
        assert resumed[col].tolist() == pytest.approx(reference[col].tolist(), rel=1e-4)


@pytest.mark.slow
def test_lr_range_test_leaves_weights_untouched(tmp_path):
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 3, 64, 64)
    y = torch.randint(0, 2, (32,))

    def batches():
        for i in range(0, 32, 8):
            yield x[i : i + 8], y[i : i + 8]

    result = lr_find.lr_range_test(model, batches, num_steps=30, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lrs = np.array(result.lrs)
    assert lrs[0] == pytest.approx(1e-7) and (np.diff(np.log(lrs)) > 0).all()
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, ratios[0])  # exponential growth per batch
    result.save(tmp_path)
    curve = pd.read_csv(tmp_path / "lr_find.csv")
    assert list(curve.columns) == ["lr", "loss", "smoothed_loss"] and len(curve) == len(lrs)
    assert (
        json.loads((tmp_path / "lr_find.json").read_text())["suggested_lr"] == result.suggested_lr
    )


def test_suggestion_is_the_steepest_descent():
    lrs = np.logspace(-7, 0, 100)
    # a loss that falls fastest around 1e-3 and blows up after 1e-1
    x = np.log10(lrs)
    loss = 1 - 0.5 * np.tanh((x + 3) * 2) + np.where(x > -1, (x + 1) * 5, 0)
    assert 3e-4 < lr_find.suggest_lr(lrs, loss) < 3e-3


@pytest.mark.slow
def test_lr_find_cli(cells_dir, tmp_path):
    args = cli.parse(
        [
            "lr-find",
            "--data",
            str(cells_dir),
            "--out",
            str(tmp_path),
            "--steps",
            "12",
            "--batch-size",
            "8",
        ]
    )
    assert args.run(args) == 0
    curve = pd.read_csv(tmp_path / "lr_find.csv")
    assert 2 <= len(curve) <= 12 and curve["lr"].iloc[0] == pytest.approx(1e-7)


@pytest.mark.slow
def test_folds_predict_every_cell_out_of_fold_then_train_the_final_model(cells_dir, tmp_path):
    """Two folds of one small-CNN epoch: each cell predicted once, by the fold that never saw
    its patient; the final model trains on every patient, its card carrying the estimate."""
    from core.training import folds

    out = tmp_path / "r"
    args = cli.parse(
        [
            "folds",
            "--data",
            str(cells_dir),
            "--out",
            str(out),
            "--folds",
            "2",
            "--epochs",
            "1",
            "--arch",
            "small_cnn",
            "--no-pretrained",
            "--lr",
            "1e-3",
            "--batch-size",
            "16",
            "--no-progress",
            "--final",
        ]
    )
    card = folds.run(args)
    oof = pd.read_csv(out / folds.OOF_FILE)
    n_cells = len(list(cells_dir.rglob("*.png")))
    assert len(oof) == oof["path"].nunique() == n_cells
    for k in (0, 1):
        split = json.loads((out / "folds" / f"fold{k}" / "split.json").read_text())
        assert set(oof.loc[oof["fold"] == k, "case_id"]) == set(split["test"])
        assert not set(split["test"]) & set(split["train"] + split["val"])
    estimate = json.loads((out / folds.FOLDS_FILE).read_text())
    assert estimate["cells"] == n_cells and estimate["folds"] == 2
    # each fold model's default heatmap checked on the patients it never saw, then pooled
    checks = [
        json.loads((out / "folds" / f"fold{k}" / "explain_check.json").read_text()) for k in (0, 1)
    ]
    assert [c["split"] for c in checks] == ["test", "test"]
    heatmap = estimate["heatmap"]
    assert heatmap["cells"] == sum(c["cells_checked"] for c in checks) > 0
    hits = sum(c["default"]["pointing"] * c["cells_checked"] for c in checks if c["cells_checked"])
    assert heatmap["pointing"] == pytest.approx(hits / heatmap["cells"])
    assert card["split"]["val"] == [] and card["split"]["test"] == []
    assert len(card["split"]["train"]) == oof["case_id"].nunique()
    assert card["selected_by"].startswith("last epoch")
    assert card["estimate"]["pooled"]["n"] == n_cells
    assert card["estimate"]["heatmap"] == heatmap
    assert "out-of-fold" in card["screening"]["method"]
    assert "malaria folds" in card["training_command"] and "--final" in card["training_command"]
    load_model(out)  # a complete, verified model folder
    from core.schema.contract import find_models

    assert out.resolve() in find_models(out)
    # no patient held out: the gate's limit comes from the fold runs, int8 is checked on the
    # training cells less the calibration cells

    assert cli.main(["calibrate", "int8", str(out), "--data", str(cells_dir), "--cells", "8"]) == 0
    calibrate = ["calibrate", "gate", "--weights", str(out), "--data", str(cells_dir)]
    assert cli.main(calibrate) == 0
    unseen = json.loads((out / core.evaluation.gate_check.FOLDS_CHECK_FILE).read_text())
    assert len(unseen["folds"]) == 2 and unseen["ratio"] > 0
    assert unseen["test_cells"] == n_cells  # each cell once, by a gate built without it
    for name in ("quality.npz", "quality_int8.npz"):
        assert "training cells x" in core.inference.gate.FeatureModel.load(out / name).held_out
    assert cli.main(["check", "int8", str(out), "--data", str(cells_dir)]) == 0
    check = json.loads((out / "card.json").read_text())["int8"]["check"]
    assert check["part"] == "train" and check["cells"] == n_cells - 8 and "note" in check
    for weights in out.glob("folds/fold*/model.safetensors"):
        weights.unlink()  # shipped fold records keep no weights: then they are not offered
    assert find_models(out) == [out.resolve()]
    fold_card = out / "folds" / "fold0" / "card.json"
    before = fold_card.stat().st_mtime_ns
    args.final = False
    folds.run(args)  # a rerun keeps finished folds
    assert fold_card.stat().st_mtime_ns == before


def test_weight_average_is_the_running_mean_of_the_epochs():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = train.RunState(model, opt=None, sched=None, gen=torch.Generator())  # type: ignore[arg-type]
    seen = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model[0].weight.fill_(value)
        model[1].num_batches_tracked.fill_(int(value))
        seen.append(model[0].weight.clone())
        train.update_average(state)
    assert state.averaged == 3
    assert torch.allclose(state.average["0.weight"], torch.stack(seen).mean(0))
    assert "1.num_batches_tracked" not in state.average  # counters are not weights


def test_batch_norm_statistics_are_recomputed_over_the_given_images():
    from core.nets.model import default_contract, normalize

    contract = default_contract("mobilenet_v2")
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    x = torch.randint(0, 256, (50, 8, 8, 3), dtype=torch.uint8)
    train.recompute_batch_norm(model, x, contract, batch_size=16)  # 4 uneven batches
    norm = normalize(x, contract).double()
    bn = model[0]
    assert torch.allclose(bn.running_mean.double(), norm.mean((0, 2, 3)), atol=1e-5)
    # the mean of 4 random batches' variances: within 2% of the images' variance
    assert torch.allclose(bn.running_var.double(), norm.var((0, 2, 3)), rtol=2e-2)
    assert bn.momentum == 0.1 and not model.training


@pytest.mark.slow
def test_averaged_run_keeps_the_mean_and_resumes_to_the_same_weights(
    cells_dir, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    extra = ("--epochs", "2", "--average-from", "1", "--arch", "small_cnn", "--no-pretrained")
    straight = tmp_path / "straight"
    card = train.run(_train_args(cells_dir, straight, *extra))
    assert card["selected_by"].startswith("mean of the weights after epochs 1-2")
    assert "--average-from 1" in card["training_command"]
    kept, averaged = load_file(straight / "model.safetensors"), load_file(straight / train.AVERAGED)
    assert all(torch.equal(kept[k], averaged[k]) for k in averaged)
    assert not all(torch.equal(kept[k], v) for k, v in load_file(straight / train.BEST).items())

    out = tmp_path / "run"  # its checkpoint holds epoch 1's mean when it is killed
    _interrupted_then_resumed(cells_dir, out, monkeypatch, *extra)
    resumed = load_file(out / "model.safetensors")
    for name, value in kept.items():
        assert torch.allclose(resumed[name].double(), value.double(), atol=1e-5), name


@pytest.mark.slow
def test_keep_last_keeps_the_last_epoch_also_when_resumed_after_the_end(cells_dir, tmp_path):
    """--keep-last (the rule of a model trained on every patient, for its fold models) keeps
    the last epoch's weights, not the lowest validation loss's; a finished run resumed (as
    malaria folds does with a final model trained before its folds) keeps them too."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    extra = ("--epochs", "2", "--keep-last", "--arch", "small_cnn", "--no-pretrained")
    card = train.run(_train_args(cells_dir, out, *extra))
    assert card["best_epoch"] == 2 and card["selected_by"].startswith("last epoch (--keep-last")
    assert "--keep-last" in card["training_command"]
    last = torch.load(out / train.CHECKPOINT, weights_only=True)["model"]
    kept = load_file(out / "model.safetensors")
    assert kept.keys() == last.keys() and all(torch.equal(kept[k], last[k]) for k in last)
    train.run(_train_args(cells_dir, out, *extra, "--resume"))
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[k], last[k]) for k in last)
