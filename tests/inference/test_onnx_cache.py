"""The signed ONNX export cache (core.inference.onnx_cache): a replaced export is exported
again, never run; without a private key nothing is cached (hostile input, issue 15)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort
import torch

import core.inference.onnx_cache
from core.data.images import decode_image
from core.data.sources import iter_sources
from core.inference.engines import load_engine
from core.nets.model import build_model, default_contract, save_model

# --- 9. the ONNX cache ----------------------------------------------------------------------------


def test_a_replaced_onnx_export_is_exported_again_not_run(tiny_model, cells_dir, tmp_path):
    images = np.stack(
        [decode_image(s.read(), size=128) for s in list(iter_sources([cells_dir]))[:8]]
    )
    genuine = load_engine(tiny_model, "onnx")  # exports and caches the graph
    cached = core.inference.onnx_cache.onnx_path(genuine.sha256, genuine.contract)
    assert cached.is_file()

    torch.manual_seed(123)  # the attacker's graph: another network, same inputs and outputs
    save_model(
        tmp_path / "other", build_model("mobilenet_v2").eval(), default_contract("mobilenet_v2"), {}
    )
    fake = core.inference.onnx_cache.export_onnx(
        tmp_path / "other", tmp_path / "fake.onnx"
    ).read_bytes()
    fake_probs = ort.InferenceSession(fake).run(None, {"images": images})[0]
    cached.write_bytes(fake)
    for beside in cached.parent.glob(cached.stem + ".*"):  # rewrite whatever sits beside it
        if beside != cached:
            beside.write_text(hashlib.sha256(fake).hexdigest())

    reference = load_engine(tiny_model, "torch")(images)
    assert np.abs(fake_probs - reference).max() > 1e-3  # the replacement would be visible
    assert np.abs(load_engine(tiny_model, "onnx")(images) - reference).max() < 1e-4
    assert cached.read_bytes() != fake  # and the cache holds a genuine export again


def test_without_a_private_key_the_export_is_made_afresh_and_not_cached(
    tiny_model, tmp_path, monkeypatch
):
    key = tmp_path / "cache.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)  # readable by others: anyone could sign a graph with it
    monkeypatch.setattr(core.inference.onnx_cache, "KEY_FILE", key)
    monkeypatch.setattr(core.inference.onnx_cache, "CACHE_DIR", tmp_path / "cache")
    assert core.inference.onnx_cache._cache_key() is None
    assert load_engine(tiny_model, "onnx").sha256
    assert not (tmp_path / "cache").exists()
