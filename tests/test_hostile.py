"""Hostile input, built in a temporary folder: tampered cards, injected names, torn exports,
faulty stores, lying zips, links. Each test fails on the code before issue 15 was fixed."""
from __future__ import annotations

import json
import shutil

import pytest

from core.contract import ContractError, ModelContract, WeightsError, contract_sha256, read_card
from core.model import load_model
from core.score import load_engine


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_contract(folder, **changes):
    card = json.loads((folder / "card.json").read_text())
    card["contract"].update(changes)
    (folder / "card.json").write_text(json.dumps(card))


# --- 1. the card's contract ---------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"classes": ["Uninfected", "Parasitized"]},
    {"classes": ["Parasitized", "Uninfected", "Other"]},
    {"threshold": 5},
    {"threshold": -1},
    {"input_size": 0},
])
def test_an_invalid_contract_is_refused_on_load(tiny_model, tmp_path, changes):
    folder = _copy_model(tiny_model, tmp_path / "m")
    _edit_contract(folder, **changes)
    with pytest.raises(WeightsError, match="invalid model contract"):
        load_model(folder)
    with pytest.raises(WeightsError, match="invalid model contract"):
        load_engine(folder, "onnx")


def test_a_valid_but_changed_contract_does_not_match_its_hash(tiny_model, tmp_path):
    folder = _copy_model(tiny_model, tmp_path / "m")
    _edit_contract(folder, threshold=0.9)
    with pytest.raises(WeightsError, match="does not match its contract_sha256"):
        read_card(folder)
    with pytest.raises(WeightsError, match="does not match its contract_sha256"):
        load_engine(folder, "onnx")


def test_a_card_without_contract_hash_is_refused_until_sealed(tiny_model, tmp_path):
    from core.contract import main as contract_main
    folder = _copy_model(tiny_model, tmp_path / "m")
    card = json.loads((folder / "card.json").read_text())
    del card["contract_sha256"]
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="core.contract seal"):
        load_model(folder)
    assert contract_main(["seal", str(folder)]) == 0
    assert load_model(folder).contract.threshold == card["contract"]["threshold"]


def test_the_shipped_cards_are_sealed():
    from core.contract import DEFAULT_WEIGHTS, find_models
    for folder in find_models(DEFAULT_WEIGHTS.parent):
        card = read_card(folder)
        assert card["contract_sha256"] == contract_sha256(
            ModelContract.from_json(card["contract"]), card["sha256"])


def test_contract_values_are_validated_on_construction():
    with pytest.raises(ContractError, match="classes"):
        ModelContract(classes=("Uninfected", "Parasitized"))
    with pytest.raises(ContractError, match="threshold"):
        ModelContract(threshold=float("nan"))
    with pytest.raises(ContractError, match="input_size"):
        ModelContract(input_size=4096)
    with pytest.raises(ContractError, match="std"):
        ModelContract(std=(0.2, 0.0, 0.2))
