"""The model contract and its hash in the card (core.schema.contract): tampered cards are
refused on load until sealed, values are validated, the shipped cards are sealed."""

from __future__ import annotations

import json
import shutil

import pytest

from core.inference.engines import load_engine
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
        assert card["contract_sha256"] == contract_sha256(
            ModelContract.from_json(card["contract"]), card["sha256"]
        )


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
