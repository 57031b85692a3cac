"""The int8 engine: calibrated on training patients only, cached and signed like the fp32
export, and (for the shipped model) making the same calls as fp32 on the fixture cells."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

import core.evaluation.int8_check
import core.inference.onnx_cache
import core.inference.quantize
from core import cli
from core.data.images import decode_image
from core.data.sources import iter_sources
from core.data.splits import Split
from core.inference.engines import load_engine
from core.nets.model import build_model, default_contract, save_model
from core.schema.contract import DEFAULT_WEIGHTS, WeightsError, read_card
from core.schema.files import write_json
from core.schema.labels import case_id


@pytest.fixture(scope="module")
def fixture_images(cells_dir):
    sources = list(iter_sources([cells_dir]))
    labels = np.array([s.path.split("/")[-2] == "Parasitized" for s in sources], dtype=int)
    return np.stack([decode_image(s.read(), size=128) for s in sources]), labels, sources


@pytest.fixture(scope="module")
def int8_model(tiny_model, cells_dir, tmp_path_factory):
    """The tiny model with a split of the fixture patients and a calibration set of its
    training patients' cells."""
    folder = tmp_path_factory.mktemp("int8_model")
    for f in tiny_model.iterdir():
        shutil.copy(f, folder / f.name)
    cases = sorted({case_id(s.name) for s in iter_sources([cells_dir])})
    split = Split(train=tuple(cases[:4]), val=(cases[4],), test=(cases[5],), seed=0)
    card = read_card(folder)
    write_json(folder / "card.json", {**card, "split": split.to_json()})
    sources = core.evaluation.int8_check.pick_calibration(
        list(iter_sources([cells_dir])), split, n=16
    )
    core.evaluation.int8_check.write_calibration(folder, sources, split, seed=0)
    return folder


def test_calibration_cells_come_from_training_patients_only(int8_model):
    card = read_card(int8_model)
    rec = core.inference.quantize.calibration_set(card)
    split = Split.from_json(card["split"])
    assert rec.cells == 16 and rec.part == "train" and set(rec.cases) <= set(split.train)
    images, _ = core.inference.quantize.calibration_images(int8_model, card, size=128)
    assert images.shape == (16, 128, 128, 3) and images.dtype == np.uint8
    assert card["int8"]["method"] == core.inference.quantize.METHOD


def test_int8_graph_is_qdq_per_channel_without_clip_and_records_its_calibration(int8_model):
    engine = load_engine(int8_model, "onnx-int8")
    rec = core.inference.quantize.calibration_set(engine.weights.card)
    path = core.inference.onnx_cache.onnx_path(
        engine.sha256, engine.contract, calibration=rec.cache_key()
    )
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    clips = [n.name for n in model.graph.node if n.op_type == "Clip"]
    assert all("/features.1/" in name for name in clips)  # the others folded into their conv
    props = {p.key: p.value for p in model.metadata_props}
    assert props["quantization"] == core.inference.quantize.METHOD
    assert rec.sha256 in props["calibration"] and "features.1" in props["calibration"]
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    depthwise = [
        n
        for n in model.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert depthwise  # per-channel: a depthwise weight's scale has one value per channel
    weight_dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = [weight_dq[n.input[1]] for n in depthwise if n.input[1] in weight_dq]
    assert quantized and all(scales[dq.input[1]].size > 1 for dq in quantized)
    float_dw = [n for n in depthwise if "/features.1/" in n.name]
    assert float_dw and all(n.input[1] not in weight_dq for n in float_dw)  # kept float


def test_int8_engine_scores_and_tracks_fp32_on_the_tiny_model(int8_model, fixture_images):
    images, _, _ = fixture_images
    int8 = load_engine(int8_model, "onnx-int8")(images)
    fp32 = load_engine(int8_model, "onnx")(images)
    assert int8.shape == fp32.shape == (len(images),) and int8.dtype == np.float32
    assert ((int8 >= 0) & (int8 <= 1)).all()
    assert np.abs(int8 - fp32).max() < 0.05


# slow: a second full-size network exported, and the int8 graph quantised again (3 s)
@pytest.mark.slow
def test_a_replaced_int8_graph_is_quantised_again_not_run(int8_model, fixture_images, tmp_path):
    images = fixture_images[0][:8]
    genuine = load_engine(int8_model, "onnx-int8")
    expected = genuine(images)
    rec = core.inference.quantize.calibration_set(genuine.weights.card)
    cached = core.inference.onnx_cache.onnx_path(
        genuine.sha256, genuine.contract, calibration=rec.cache_key()
    )
    assert cached.is_file() and cached != core.inference.onnx_cache.onnx_path(
        genuine.sha256, genuine.contract
    )
    torch.manual_seed(123)  # the attacker's graph: another network, same inputs and outputs
    save_model(
        tmp_path / "other", build_model("mobilenet_v2").eval(), default_contract("mobilenet_v2"), {}
    )
    fake = core.inference.onnx_cache.export_onnx(
        tmp_path / "other", tmp_path / "fake.onnx"
    ).read_bytes()
    assert (
        np.abs(ort.InferenceSession(fake).run(None, {"images": images})[0] - expected).max() > 1e-3
    )  # the replacement would be visible
    cached.write_bytes(fake)
    np.testing.assert_array_equal(load_engine(int8_model, "onnx-int8")(images), expected)
    assert cached.read_bytes() != fake


def test_a_changed_or_missing_calibration_set_is_refused(int8_model, tmp_path, tiny_model):
    folder = tmp_path / "m"
    shutil.copytree(int8_model, folder)
    (folder / core.inference.quantize.CALIBRATION_FILE).write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(WeightsError, match="does not match its card"):
        core.inference.quantize.calibration_images(folder, read_card(folder), size=128)
    with pytest.raises(WeightsError, match="no int8 calibration set"):
        load_engine(tiny_model, "onnx-int8")


def test_default_engine_is_int8_only_when_the_card_records_a_passed_check(int8_model, tmp_path):
    card = read_card(int8_model)
    assert core.inference.quantize.default_engine(card) == "onnx"  # calibrated, never checked
    assert load_engine(int8_model).name == "onnx"
    checked = {**card, "int8": {**card["int8"], "check": {"passed": True}}}
    assert core.inference.quantize.default_engine(checked) == "onnx-int8"
    assert (
        core.inference.quantize.default_engine(
            {**card, "int8": {**card["int8"], "check": {"passed": False}}}
        )
        == "onnx"
    )
    assert (
        core.inference.quantize.default_engine({"int8": {"check": {"passed": True}}}) == "onnx"
    )  # no cells


def test_cli_scores_with_the_int8_engine_and_records_it(int8_model, cells_dir, tmp_path):
    out = tmp_path / "r.csv"
    rc = cli.main(
        [
            "score",
            str(cells_dir),
            "--weights",
            str(int8_model),
            "--engine",
            "onnx-int8",
            "--out",
            str(out),
            "--store",
            str(tmp_path / "s.sqlite"),
            "--no-progress",
        ]
    )
    assert rc == 0
    df = pd.read_csv(out)
    assert len(df) == len(list(cells_dir.rglob("*.png"))) and df["prob_parasitized"].notna().all()
    from core.inference.store import ResultStore

    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store.list_runs().iloc[0]["engine"] == "onnx-int8"


# --- the shipped model ---------------------------------------------------------------------------


def test_shipped_int8_calls_agree_with_fp32_on_the_fixture_cells(fixture_images):
    """The agreement the default engine rests on, on 44 real cells of 6 patients (the full
    check, on thousands of cells, is recorded in the card by malaria check int8). Eight bits
    move a probability by a few hundredths, so a call may flip only for a cell fp32 scores
    close to the threshold; which one flips depends on the CPU's int8 kernels."""
    images, labels, _ = fixture_images
    fp32 = load_engine(DEFAULT_WEIGHTS, "onnx")(images)
    int8 = load_engine(DEFAULT_WEIGHTS, "onnx-int8")(images)
    card = read_card(DEFAULT_WEIGHTS)
    threshold = card["contract"]["threshold"]
    rec = core.evaluation.int8_check.agreement(fp32, int8, labels, threshold=threshold)
    assert rec["calls_differing"] <= 2, rec  # the card's full check: under 1% of calls
    flipped = (fp32 >= threshold) != (int8 >= threshold)
    assert np.all(np.abs(fp32[flipped] - threshold) < 0.15), fp32[flipped]
    assert np.abs(fp32 - int8).mean() < 0.05 and np.median(np.abs(fp32 - int8)) < 0.02, rec
    check = card["int8"]["check"]
    assert check["passed"] and check["calls_differing"] <= 0.01 * check["cells"], check


def test_shipped_card_records_the_check_and_default_follows_the_rule():
    card = read_card(DEFAULT_WEIGHTS)
    rec = core.inference.quantize.calibration_set(card)
    split = Split.from_json(card["split"])
    assert rec is not None and set(rec.cases) <= set(split.train)
    assert not set(rec.cases) & (set(split.test) | set(split.val))
    check = card["int8"]["check"]
    # a model trained on every patient is checked on its cells less the calibration cells
    part = "test" if split.test else "train"
    assert check["part"] == part and check["patients"] == len(getattr(split, part))
    within = (
        abs(check["accuracy_int8"] - check["accuracy_fp32"])
        <= core.evaluation.int8_check.MAX_ACCURACY_DROP
        and abs(check["auc_int8"] - check["auc_fp32"]) <= core.evaluation.int8_check.MAX_AUC_DROP
    )
    assert check["passed"] == within
    assert core.inference.quantize.default_engine(card) == ("onnx-int8" if within else "onnx")
    assert json.loads(json.dumps(check)) == check  # plain numbers, no NaN


def test_the_int8_graph_takes_the_pixels_straight_into_its_first_convolution(int8_model):
    """No float normalisation over the whole input (a fifth of the int8 time, channels-last):
    the uint8 pixels, framed by the mean colour, go to the first convolution's
    DequantizeLinear with scale 1 and zero point 0."""
    engine = load_engine(int8_model, "onnx-int8")
    model = onnx.load_from_string(engine.graph)
    ops = [n.op_type for n in model.graph.node]
    assert "Div" not in ops and "Sub" not in ops and "Cast" not in ops
    made_by = {out: n for n in model.graph.node for out in n.output}
    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    first = next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and made_by.get(n.input[0], n).op_type == "Max"
    )
    assert values[first.input[1]] == 1 and values[first.input[2]] == 0
    assert values[first.input[2]].dtype == np.uint8


# slow: a full ONNX export of every architecture and of the shipped model (5 s)
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small", "small_cnn", "shipped"])
def test_folding_the_normalisation_keeps_what_the_fp32_graph_computes(
    arch, fixture_images, tmp_path
):
    folder = DEFAULT_WEIGHTS
    if arch != "shipped":  # randomly initialised: every architecture core.nets.model builds
        torch.manual_seed(0)
        folder = tmp_path / arch
        save_model(folder, build_model(arch).eval(), default_contract(arch), {})
    images = fixture_images[0]
    fp32 = core.inference.onnx_cache.export_onnx(folder, tmp_path / "fp32.onnx").read_bytes()
    folded = onnx.load_from_string(fp32)
    core.inference.quantize.fold_normalisation(folded)
    before = ort.InferenceSession(fp32).run(None, {"images": images})
    after = ort.InferenceSession(folded.SerializeToString()).run(None, {"images": images})
    # the mean colour around the cell is rounded to whole pixel levels: nothing else moves
    assert np.abs(after[0] - before[0]).max() < 2e-3
    assert np.abs(after[1] - before[1]).max() < 2e-3 * np.abs(before[1]).max() + 1e-4
