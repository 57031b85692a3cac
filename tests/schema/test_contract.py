"""The model contract and its hash in the card (core.schema.contract): tampered cards are
refused on load until sealed, values are validated, the shipped cards are sealed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from core.inference.engines import load_engine
from core.inference.store import ResultStore
from core.nets.model import load_model
from core.schema.contract import ModelContract, WeightsError, read_card

# Names added by issue 15 are imported inside the tests that use them, so that this file also
# runs against the code before the fix (each test then fails on its own assertion).


# --- 1. the card's contract (hostile input, issue 15) ---------------------------------------------


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_contract(folder, **changes):
    card = json.loads((folder / "card.json").read_text())
    card["contract"].update(changes)
    (folder / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"classes": ["Uninfected", "Parasitized"]}, "invalid model contract"),
        ({"classes": ["Parasitized", "Uninfected", "Other"]}, "invalid model contract"),
        ({"threshold": 5}, "invalid model contract"),
        ({"threshold": -1}, "invalid model contract"),
        ({"input_size": 0}, "invalid model contract"),
        ({"threshold": 0.9}, "does not match its contract_sha256"),  # valid, but not what was saved
    ],
)
def test_a_tampered_contract_is_refused_on_load(tiny_model, tmp_path, changes, message):
    folder = _copy_model(tiny_model, tmp_path / "m")
    _edit_contract(folder, **changes)
    with pytest.raises(WeightsError, match=message):
        load_model(folder)
    with pytest.raises(WeightsError, match=message):
        load_engine(folder, "onnx")


def test_a_card_without_contract_hash_is_refused_until_sealed(tiny_model, tmp_path):
    from core import cli

    folder = _copy_model(tiny_model, tmp_path / "m")
    card = json.loads((folder / "card.json").read_text())
    del card["contract_sha256"]
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="malaria seal"):
        load_model(folder)
    assert cli.main(["seal", str(folder)]) == 0
    assert load_model(folder).contract.threshold == card["contract"]["threshold"]


def test_the_shipped_cards_are_sealed():
    from core.schema.contract import DEFAULT_WEIGHTS, contract_sha256, find_models

    for folder in find_models(DEFAULT_WEIGHTS.parent):
        card = read_card(folder)
        assert card["contract_sha256"] == contract_sha256(card)
        load_engine(folder, "onnx")  # its gate's files match the card too


def test_contract_values_are_validated_on_construction():
    from core.schema.contract import ContractError

    with pytest.raises(ContractError, match="classes"):
        ModelContract(classes=("Uninfected", "Parasitized"))
    with pytest.raises(ContractError, match="threshold"):
        ModelContract(threshold=float("nan"))
    with pytest.raises(ContractError, match="input_size"):
        ModelContract(input_size=4096)
    with pytest.raises(ContractError, match="std"):
        ModelContract(std=(0.2, 0.0, 0.2))


# --- 2. every value that changes a result is sealed (issue 28) ------------------------------------


def _edit_card(folder, edit):
    card = json.loads((folder / "card.json").read_text())
    edit(card)
    (folder / "card.json").write_text(json.dumps(card))


def _gate_model(tiny_model, folder, **changes):
    """A copy of the tiny model with a feature calibration (changed by ``changes``), sealed."""
    import dataclasses

    from core.evaluation.gate_check import fit_features
    from core.inference.gate import CALIBRATION_FILE
    from core.schema.contract import reseal

    _copy_model(tiny_model, folder)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(60, 1280))
    fm = fit_features(f, np.repeat([0, 1], 30), f, quantile=0.9, weights_sha256="x", components=4)
    fm = dataclasses.replace(fm, weights_sha256=read_card(folder)["sha256"])
    fm.save(folder / CALIBRATION_FILE)
    reseal(folder)
    if changes:  # written as a tamperer would: the arrays, past the dataclass's checks
        with np.load(folder / CALIBRATION_FILE) as z:
            arrays = {**dict(z), **changes}
        with open(folder / CALIBRATION_FILE, "wb") as out:
            np.savez(out, **arrays)
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["screening"].update(cutoff=0.99), "does not match its contract_sha256"),
        (lambda c: c["screening"].update(cutoff=float("nan")), "cutoff must be a number"),
        (lambda c: c["screening"].update(cutoff=1.5), "cutoff must be a number"),
        (lambda c: c["screening"].pop("cutoff"), "the interval rule needs cutoff"),
        (lambda c: c.pop("screening"), "does not match its contract_sha256"),
        (lambda c: c.update(int8={"calibration": {"sha256": "0" * 64}}), "contract_sha256"),
        (lambda c: c.update(files_sha256={"quality.npz": "0" * 64}), "contract_sha256"),
    ],
)
def test_a_changed_screening_int8_or_file_hash_is_refused(tiny_model, tmp_path, edit, message):
    folder = _copy_model(tiny_model, tmp_path / "m")
    _edit_card(folder, edit)
    with pytest.raises(WeightsError, match=message):
        load_engine(folder, "onnx")


def test_a_card_without_a_screening_rule_cannot_flag(tiny_model, tmp_path, cells_dir, capsys):
    from core.schema.contract import ModelFolder, seal_card
    from tests.helpers import score_cli

    folder = _copy_model(tiny_model, tmp_path / "m")
    _edit_card(folder, lambda c: c.pop("screening"))
    seal_card(folder, force=True)  # sealed that way: still no cutoff of 0 for it
    with pytest.raises(WeightsError, match="no screening rule"):
        _ = ModelFolder.open(folder).screening
    store = tmp_path / "s.sqlite"
    assert score_cli(cells_dir, "--weights", folder, "--store", store, "--no-progress") == 2
    assert "no screening rule" in capsys.readouterr().err
    with ResultStore(store) as s:
        assert s.list_runs().empty  # refused before any run was stored


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"limit": np.float64(np.inf)}, "limit must be finite"),
        ({"limit": np.float64(np.nan)}, "limit must be finite"),
        ({"limit": np.float64(0.0)}, "limit must be finite and above 0"),
    ],
)
def test_a_gate_limit_that_passes_everything_is_refused(tiny_model, tmp_path, changes, message):
    from core.schema.contract import reseal

    folder = _gate_model(tiny_model, tmp_path / "m", **changes)
    with pytest.raises(WeightsError, match="does not match the sha256"):  # not resealed: hash
        load_engine(folder, "onnx")
    _edit_card(folder, lambda c: c["files_sha256"].pop("quality.npz"))
    with pytest.raises(WeightsError):  # nor laundered by a reseal of a changed card
        reseal(folder)
    from core.schema.contract import seal_card

    seal_card(folder, force=True)  # even sealed as it is, the limit itself is refused
    with pytest.raises(WeightsError, match=message):
        load_engine(folder, "onnx")


def test_a_replaced_or_removed_gate_file_is_refused(tiny_model, tmp_path):
    from core.inference.gate import CALIBRATION_FILE

    folder = _gate_model(tiny_model, tmp_path / "m")
    assert load_engine(folder, "onnx").gate.features is not None
    other = _gate_model(tiny_model, tmp_path / "other", limit=np.float64(3.0))
    shutil.copy(other / CALIBRATION_FILE, folder / CALIBRATION_FILE)
    with pytest.raises(WeightsError, match="does not match the sha256"):
        load_engine(folder, "onnx")
    (folder / CALIBRATION_FILE).unlink()  # no silent fall back to image checks only
    with pytest.raises(WeightsError, match="is missing, but the model card records it"):
        load_engine(folder, "onnx")


def test_seal_refuses_a_sealed_card_without_force(tiny_model, tmp_path, capsys):
    from core import cli

    folder = _copy_model(tiny_model, tmp_path / "m")
    _edit_card(folder, lambda c: c["screening"].update(cutoff=0.2))
    assert cli.main(["seal", str(folder)]) == 2
    assert "sealed already" in capsys.readouterr().err
    with pytest.raises(WeightsError):
        load_engine(folder, "onnx")
    assert cli.main(["seal", "--force", str(folder)]) == 0
    assert read_card(folder)["screening"]["cutoff"] == 0.2


def test_the_sealed_keys_are_one_declared_list():
    from core.schema.contract import SEALED_KEYS, contract_sha256

    card = {key: {"v": 1} for key in SEALED_KEYS}
    base = contract_sha256(card)
    for key in SEALED_KEYS:  # each changes the hash; a key outside the list does not
        assert contract_sha256({**card, key: {"v": 2}}) != base, key
    assert contract_sha256({**card, "created": "later"}) == base


def test_a_model_is_adapted_when_its_card_records_the_adaptation(tiny_model, tmp_path):
    from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder, write_card

    assert not ModelFolder.open(DEFAULT_WEIGHTS).adapted  # the NIH cells alone
    folder = _copy_model(tiny_model, tmp_path / "m")
    write_card(folder, {**read_card(folder), "adaptation": {"fields": 80}})
    assert ModelFolder.open(folder).adapted
