"""Class activation maps (pytorch-grad-cam), any stage of the network, scored for where they
point and for faithfulness.

    malaria explain INPUT... [--method hirescam] [--layer features.6]
                           [--target predicted|parasitized|uninfected] --out DIR

With no method or layer given, ``explain`` draws HiResCAM at the model's target layer (the
16x16 stage of MobileNetV2), chosen by how often its peak lands on the stained parasite on the
shipped model's validation patients (``malaria check heatmaps --split val`` measures
every method x stage; the README has the tables). The 4x4 last stage, Grad-CAM's usual choice,
almost never finds it.

Per map:
- ``peak_on_stain``: whether the map's peak falls on the parasite that the stain-based
  locator (``core.explain.locate``) finds in the cell; None when the locator finds none.
  ``points_at_parasite``, the check, judges it for the Parasitized class's map only.
- ``mass_in_cell``: share of the map's mass on the cell rather than the black background.
- ``road``: ROAD combined score, in units of the target class's softmax probability: mean
  confidence change when the least relevant pixels are removed minus when the most relevant
  are removed, halved (noisy linear imputation at 20, 40, 60, 80 %). Higher means the map points
  at pixels the model really uses. It says nothing of *what* those pixels are: a map can be
  faithful and still light the background, which is what the pointing result is for.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from torch import nn

from core.data.images import resize_rgb
from core.explain.heatmap import (
    DEFAULT_METHOD,
    FUSE,
    METHOD_NAMES,
    SLOW_METHODS,
    TARGETS,
    Explanation,
    overlay,
)
from core.explain.locate import Stain, locate, mass_inside, points_at
from core.nets.model import LoadedModel, normalize, positive_probability
from core.schema.contract import ModelContract
from core.schema.labels import predicted_class

METHODS = dict(
    zip(
        METHOD_NAMES,
        (GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, EigenCAM, ScoreCAM, AblationCAM),
    )
)
ROAD_PERCENTILES = (20, 40, 60, 80)


class _PredictedTarget:
    """The logit of the class the model calls at ``threshold``, decided from the same forward
    pass the CAM differentiates (no extra pass to find the prediction first)."""

    def __init__(self, contract: ModelContract) -> None:
        self.contract = contract

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        positive = self.contract.positive_index
        p = float(positive_probability(logits.detach(), self.contract))
        return logits[positive if p >= self.contract.threshold else 1 - positive]


def explainable(loaded: LoadedModel) -> nn.Module:
    """A copy of the model safe for hooks: in-place activations (ReLU6) made out-of-place."""
    net = copy.deepcopy(loaded.model).eval()
    for m in net.modules():
        if hasattr(m, "inplace"):
            setattr(m, "inplace", False)  # noqa: B010 (typed as Tensor | Module)
    return net


def _resize_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float32 in [0, 1]; ``size`` is (W, H) as PIL wants it."""
    if cam.shape[::-1] != size:
        cam = np.asarray(
            Image.fromarray(cam.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR)
        )
    return np.clip(np.nan_to_num(cam, nan=0.0), 0, 1).astype(np.float32)


def _pointing(heatmap: np.ndarray, stain: Stain) -> bool | None:
    """None when there is nothing to point at, or the map is flat (no peak to speak of)."""
    if not stain.found or heatmap.max() <= 0:
        return None
    return points_at(heatmap, stain.parasite)


def explain(
    loaded: LoadedModel,
    images: Sequence[np.ndarray],
    *,
    method: str | None = None,
    target: str = "predicted",
    layer: str | None = None,
    faithfulness: bool = True,
    net: nn.Module | None = None,
    batch_size: int = 32,
    stains: Sequence[Stain] | None = None,
) -> list[Explanation]:
    """Explain each RGB uint8 image (H, W, 3), any size, with one CAM method.

    ``method`` defaults to DEFAULT_METHOD; ``layer`` is one of ``loaded.contract.cam_layers``
    or several joined by FUSE (default: the contract's target layer); ``target`` is
    "predicted" or a class name. ``net`` is a model from ``explainable`` to reuse across calls;
    ``stains`` the images' ``core.explain.locate.locate`` results when the caller has them already.
    ``faithfulness`` adds ROAD, about half a second per image on a CPU.
    Raises ValueError for an unknown method, target or layer.
    """
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    c = loaded.contract
    layer = layer or c.target_layer
    stages = layer.split(FUSE)
    unknown = [s for s in stages if s not in c.cam_layers]
    if unknown:
        raise ValueError(
            f"unknown layer {unknown[0]!r}; this model offers "
            f"{', '.join(c.cam_layers)} (fuse stages with {FUSE!r})"
        )
    net = net or explainable(loaded)
    for p in net.parameters():
        p.requires_grad_(False)  # gradients are needed w.r.t. activations only
    size = c.input_size
    out: list[Explanation] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        x = normalize(torch.from_numpy(np.stack([resize_rgb(im, size) for im in chunk])), c)
        t0 = time.perf_counter()
        idx: list[int] | None = None
        if target != "predicted":
            idx = [c.classes.index(target.capitalize())] * len(chunk)
        elif method in SLOW_METHODS:  # their targets score perturbed images: fix the class first
            with torch.no_grad():
                pos = positive_probability(net(x), c).tolist()
            idx = [c.classes.index(predicted_class(p, c.threshold)) for p in pos]
        targets = (
            [ClassifierOutputTarget(i) for i in idx]
            if idx is not None
            else [_PredictedTarget(c)] * len(chunk)
        )
        # Not `with cam:` here: BaseCAM.__exit__ swallows IndexError, which would hide a failed
        # map; the hooks are released in `finally` all the same.
        cam = METHODS[method](model=net, target_layers=[net.get_submodule(s) for s in stages])
        try:
            if method in SLOW_METHODS:
                cam.batch_size = 64
            with torch.enable_grad():
                maps = cam(input_tensor=x.clone().requires_grad_(True), targets=targets)
            # the unperturbed forward pass's output
            pos = positive_probability(cam.outputs.detach(), c).tolist()
            map_size = max(tuple(a.shape[-2:]) for a in cam.activations_and_grads.activations)
        finally:
            cam.activations_and_grads.release()
        if idx is None:  # "predicted" follows the decision threshold, as the scoring does
            idx = [c.classes.index(predicted_class(p, c.threshold)) for p in pos]
        ms = (time.perf_counter() - t0) * 1000 / len(chunk)
        maps = np.nan_to_num(maps, nan=0.0).astype(np.float32)
        road = _road(net, x, maps, idx) if faithfulness else [float("nan")] * len(chunk)
        for i, im in enumerate(chunk):
            heat = _resize_map(maps[i], (im.shape[1], im.shape[0]))
            stain = stains[start + i] if stains is not None else locate(im)
            out.append(
                Explanation(
                    method,
                    layer,
                    c.classes[idx[i]],
                    heat,
                    map_size,
                    overlay(im, heat),
                    pos[i],
                    _pointing(heat, stain),
                    mass_inside(heat, stain.cell),
                    float(road[i]),
                    ms,
                )
            )
    return out


def _road(net: nn.Module, x: torch.Tensor, maps: np.ndarray, idx: Sequence[int]) -> list[float]:
    """ROAD of maps (N, h, w) at the input's size for normalised inputs x (N, 3, h, w)."""
    soft = [ClassifierOutputSoftmaxTarget(i) for i in idx]
    with torch.no_grad():
        return np.ravel(
            ROADCombined(percentiles=list(ROAD_PERCENTILES))(x, maps, soft, net)
        ).tolist()


def road_of(
    loaded: LoadedModel,
    image: np.ndarray,
    explanation: Explanation,
    *,
    net: nn.Module | None = None,
) -> float:
    """The ROAD score of a map already drawn (``explanation`` of the RGB uint8 ``image``),
    without computing the map again: what a page calls once the maps are on screen."""
    c = loaded.contract
    x = normalize(torch.from_numpy(resize_rgb(image, c.input_size)[None]), c)
    heat = _resize_map(explanation.heatmap, (c.input_size, c.input_size))
    target = c.classes.index(explanation.target)
    return _road(net or explainable(loaded), x, heat[None], [target])[0]


def grid(image: np.ndarray, explanations: Sequence[Explanation], *, cell: int = 192) -> Image.Image:
    """The original and each method's overlay side by side, each titled, as one PIL image."""
    tiles = [("original", image)] + [
        (f"{e.method} road {e.road:+.2f}", e.overlay) for e in explanations
    ]
    canvas = Image.new("RGB", (cell * len(tiles), cell + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, arr) in enumerate(tiles):
        canvas.paste(Image.fromarray(arr).resize((cell, cell)), (i * cell, 18))
        draw.text((i * cell + 4, 3), title, fill="black")
    return canvas
