"""The engines (core.inference.engines): ONNX and torch agree; an engine gives a batch's
buffers back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import core.inference.engines
from core.data.images import decode_image
from core.data.sources import iter_sources


def test_onnx_and_torch_agree_within_1e4(cells_dir, tiny_model):
    images = np.stack([decode_image(s.read(), size=128) for s in iter_sources([cells_dir])])
    onnx = core.inference.engines.load_engine(tiny_model, "onnx")(images)
    torch_ = core.inference.engines.load_engine(tiny_model, "torch")(images)
    assert onnx.shape == torch_.shape == (len(images),)
    assert np.abs(onnx - torch_).max() < 1e-4


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# slow: a 256-image batch grows the process by over 100 MB to see it given back (4 s)
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_release_memory_gives_back_the_batch_buffers_and_scores_the_same(tiny_model):
    """The arena keeps a big batch's buffers for the next one (faster); a server gives them
    back after each job with release_memory()."""
    from dashboard.reaper import trim_heap

    engine = core.inference.engines.load_engine(tiny_model, "onnx")
    images = np.random.default_rng(0).integers(0, 256, (256, 128, 128, 3), dtype=np.uint8)
    trim_heap()  # what earlier tests freed is given back now, not counted as this one's
    before = _rss_mb()
    expected = engine(images)
    trim_heap()
    grown = _rss_mb() - before
    engine.release_memory()
    trim_heap()
    given_back = before + grown - _rss_mb()
    assert grown > 100 and given_back > grown / 2, (grown, given_back)
    np.testing.assert_array_equal(engine(images), expected)


def test_every_engine_applies_the_contracts_temperature(cells_dir, tiny_model, tmp_path):
    import shutil

    from core.schema.calibration import rescale
    from core.schema.contract import read_card, write_card

    hot = tmp_path / "calibrated"
    shutil.copytree(tiny_model, hot)
    card = read_card(hot)
    card["contract"]["temperature"] = 0.25
    write_card(hot, card)

    images = np.stack([decode_image(s.read(), size=128) for s in iter_sources([cells_dir])])
    raw = core.inference.engines.load_engine(tiny_model, "torch")(images)
    expected = rescale(raw, 0.25)
    assert np.abs(expected - raw).max() > 0.01  # the temperature makes a visible difference
    for engine in ("torch", "onnx"):
        got = core.inference.engines.load_engine(hot, engine)(images)
        np.testing.assert_allclose(got, expected, atol=1e-4)
