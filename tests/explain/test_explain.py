from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.data.images import decode_image
from core.explain.cams import METHODS, explain, explainable, grid
from core.explain.heatmap import DEFAULT_METHOD, METHOD_NAMES, colour_bar, for_display, overlay
from core.nets.model import load_model
from core.schema.contract import DEFAULT_WEIGHTS


@pytest.fixture(scope="module")
def tiny(tiny_model):
    loaded = load_model(tiny_model)
    return loaded, explainable(loaded)


@pytest.fixture(scope="module")
def cells(cells_dir):
    return {p.name: decode_image(p.read_bytes()) for p in sorted(cells_dir.rglob("*.png"))}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_a_map_in_range_at_the_image_size(tiny, cells, method):
    loaded, net = tiny
    image = next(iter(cells.values()))
    odd = np.asarray(Image.fromarray(image).resize((150, 97)))  # not the model's size
    exps = explain(loaded, [image], method=method, layer="features.13", net=net)
    exps += explain(loaded, [odd], method=method, layer="features.13", net=net, faithfulness=False)
    for e, im in zip(exps, [image, odd]):
        assert e.heatmap.shape == im.shape[:2] and e.heatmap.dtype == np.float32
        assert np.isfinite(e.heatmap).all() and e.heatmap.min() >= 0 and e.heatmap.max() <= 1
        assert e.overlay.shape == im.shape and e.overlay.dtype == np.uint8
        assert 0 <= e.prob_parasitized <= 1 and e.ms > 0
        assert e.map_size == (8, 8)
        assert 0 <= e.mass_in_cell <= 1 and e.peak_on_stain in (True, False, None)
    assert np.isfinite(exps[0].road) and np.isnan(exps[1].road)
    assert exps[0].peak_on_stain is not None  # a Parasitized fixture: a parasite is located


def test_target_class_changes_the_map(tiny, cells):
    loaded, net = tiny
    image = next(iter(cells.values()))
    a = explain(loaded, [image], method="gradcam", target="parasitized", net=net)[0]
    b = explain(loaded, [image], method="gradcam", target="uninfected", net=net)[0]
    assert (a.target, b.target) == ("Parasitized", "Uninfected")
    assert not np.allclose(a.heatmap, b.heatmap, atol=1e-3)


def test_only_the_parasitized_map_is_judged_on_the_stained_dot(tiny, cells):
    loaded, net = tiny
    image = next(iter(cells.values()))  # a Parasitized fixture: a stained dot is located
    a, b = (explain(loaded, [image], target=t, net=net)[0] for t in ("parasitized", "uninfected"))
    assert a.peak_on_stain is not None and b.peak_on_stain is not None
    assert a.points_at_parasite == a.peak_on_stain and b.points_at_parasite is None


def test_layer_choice_changes_the_resolution(tiny, cells):
    loaded, net = tiny
    image = next(iter(cells.values()))
    coarse = explain(loaded, [image], method="layercam", layer="features.18", net=net)[0]
    fine = explain(loaded, [image], method="layercam", layer="features.6", net=net)[0]
    assert coarse.map_size == (4, 4) and fine.map_size == (16, 16)
    assert not np.allclose(coarse.heatmap, fine.heatmap, atol=1e-3)
    with pytest.raises(ValueError, match="unknown layer"):
        explain(loaded, [image], layer="classifier.1", net=net)


def test_fused_stages_give_the_finest_map_size_and_defaults_come_from_the_contract(tiny, cells):
    loaded, net = tiny
    image = next(iter(cells.values()))
    fused = explain(
        loaded,
        [image],
        method="layercam",
        layer="features.6+features.13",
        net=net,
        faithfulness=False,
    )[0]
    assert fused.map_size == (16, 16) and fused.heatmap.max() <= 1
    with pytest.raises(ValueError, match="unknown layer 'features.99'"):
        explain(loaded, [image], layer="features.6+features.99", net=net)
    default = explain(loaded, [image], net=net, faithfulness=False)[0]
    assert (default.method, default.layer) == (DEFAULT_METHOD, loaded.contract.target_layer)
    assert loaded.contract.target_layer == "features.6"  # the 16x16 stage, 1/8 of 128 px


def test_works_with_frozen_weights_inside_no_grad_and_keeps_the_network_unchanged(
    tiny_model, cells
):
    loaded = load_model(tiny_model)
    for p in loaded.model.parameters():
        p.requires_grad_(False)  # a frozen backbone
    net = explainable(loaded)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():  # an inference code path
        e = explain(loaded, list(cells.values())[:2], method="gradcam++", net=net)
    assert all(np.isfinite(x.heatmap).all() and x.heatmap.max() > 0 for x in e)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# slow: 230 explanations to see the RSS stay flat (about 6 s, a tenth of the fast tier)
@pytest.mark.slow
def test_hooks_are_released_and_memory_stays_flat_over_200_explanations(tiny, cells):
    # A call that kept its hooks' activations would hold >= 130 kB (one 32-channel 32x32 map):
    # 26 MB over 200 calls, well above the allocator's noise.
    loaded, net = tiny
    image = np.asarray(Image.fromarray(next(iter(cells.values()))).resize((64, 64)))
    for _ in range(30):
        explain(loaded, [image], method="gradcam", faithfulness=False, net=net)
    start = _rss_mb()
    for _ in range(200):
        explain(loaded, [image], method="gradcam", faithfulness=False, net=net)
    growth = _rss_mb() - start
    assert growth < 15, f"RSS grew {growth:.0f} MB over 200 explanations"
    assert all(not m._forward_hooks for m in net.modules())


@pytest.mark.skipif(not (DEFAULT_WEIGHTS / "card.json").is_file(), reason="no shipped model")
def test_parasitized_cells_peak_on_the_cell_not_the_background(cells_dir):
    loaded = load_model(DEFAULT_WEIGHTS)
    net = explainable(loaded)
    images = [decode_image(p.read_bytes()) for p in sorted((cells_dir / "Parasitized").glob("*"))]

    def share_on_cell(method: str, layer: str) -> float:
        exps = explain(
            loaded,
            images,
            method=method,
            target="parasitized",
            layer=layer,
            faithfulness=False,
            net=net,
        )
        on_cell = []
        for im, e in zip(images, exps):
            r, c = np.unravel_index(np.argmax(e.heatmap), e.heatmap.shape)
            on_cell.append(int(im[r, c].sum()) > 60)  # NIH crops have a black background
        return sum(on_cell) / len(on_cell)

    # the fine 16x16 LayerCAM map points into the cell for every parasitized fixture; the
    # coarse 8x8 Grad-CAM for most (its upsampled peak can slip past the cell's edge)
    assert share_on_cell("layercam", "features.6") == 1.0
    assert share_on_cell("gradcam", "features.13") > 0.5


def test_grid_and_overlay(tiny, cells):
    loaded, net = tiny
    image = next(iter(cells.values()))
    exps = [
        explain(loaded, [image], method=m, net=net, faithfulness=False)[0]
        for m in ("gradcam", "eigencam")
    ]
    g = grid(image, exps, cell=64)
    assert g.size == (64 * 3, 64 + 18)
    assert overlay(image, exps[0].heatmap, opacity=0.0).shape == image.shape
    with pytest.raises(ValueError):
        overlay(image, exps[0].heatmap, opacity=2)


def test_display_helpers(cells):
    image = next(iter(cells.values()))
    bar = colour_bar(width=100, height=5)
    assert bar.shape == (5, 100, 3) and bar.dtype == np.uint8
    assert bar[0, 0, 2] > bar[0, 0, 0] and bar[0, -1, 0] > bar[0, -1, 2]  # blue to red
    mask = np.zeros(image.shape[:2], bool)
    mask[40:60, 40:60] = True
    big = for_display(image, width=384, outline=mask)
    assert big.shape == (384, 384, 3)
    white = (big == 255).all(-1)
    assert white[120:180, 120:180].any() and not white[150, 150]  # the edge, not the inside
    assert for_display(image[:, :64], width=100).shape == (200, 100, 3)


def test_cli_writes_pointing_and_mass_per_map(tiny_model, cells_dir, tmp_path):
    from core import cli

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    files = [str(p) for p in sorted((cells_dir / "Parasitized").glob("*.png"))[:2]]
    args = cli.parse(
        [
            "explain",
            *files,
            str(broken),
            "--weights",
            str(tiny_model),
            "--out",
            str(tmp_path / "out"),
            "--no-faithfulness",
        ]
    )
    assert args.run(args) == 1  # one error row
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert len(scores) == 3 and scores["error"].notna().sum() == 1
    ok = scores[scores["error"].isna()]
    assert (ok["method"] == DEFAULT_METHOD).all() and (ok["layer"] == "features.6").all()
    assert ok["peak_on_stain"].isin([True, False]).all()  # both cells hold a parasite
    judged = ok["target"] == "Parasitized"  # the map of the predicted class: judged if Parasitized
    assert ok["points_at_parasite"][judged].eq(ok["peak_on_stain"][judged]).all()
    assert ok["points_at_parasite"][~judged].isna().all()
    assert ok["mass_in_cell"].between(0, 1).all() and ok["road"].isna().all()
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_road_of_a_drawn_map_equals_the_road_computed_with_it(tiny, cells):
    from core.explain.cams import road_of

    loaded, net = tiny
    image = next(iter(cells.values()))
    torch.manual_seed(0)  # ROAD's imputation adds noise
    with_road = explain(loaded, [image], method="hirescam", net=net)[0]
    torch.manual_seed(0)
    later = road_of(loaded, image, with_road, net=net)
    assert np.isfinite(later) and later == pytest.approx(with_road.road, abs=1e-6)


def test_the_light_heatmap_module_names_every_method_core_explain_computes():
    assert set(METHOD_NAMES) == set(METHODS)
    image = np.full((8, 8, 3), 120, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[2, 3] = 1.0
    out = overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[2, 3].tolist() != out[6, 6].tolist()  # the hot pixel is drawn differently
