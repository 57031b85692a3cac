"""The model contract: what a model expects and means, and its card on disk.

Torch-free on purpose: the ONNX scoring path reads cards without importing PyTorch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from core.data import CLASSES

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "default"


class WeightsError(RuntimeError):
    """Weights that cannot be used: missing, tampered, pickled, or not matching the card."""


@dataclass(frozen=True)
class ModelContract:
    """What a model expects and means; saved in the card, read back by every consumer."""

    arch: str = "mobilenet_v2"
    classes: tuple[str, ...] = CLASSES
    input_size: int = 128  # the NIH copy is 128x128; larger buys little on 100-200 px crops
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Named stages for Grad-CAM, fine to coarse; the default target is the coarsest.
    cam_layers: tuple[str, ...] = ()
    target_layer: str = ""
    threshold: float = 0.5  # on P(Parasitized)

    @property
    def positive_index(self) -> int:
        return self.classes.index("Parasitized")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ModelContract:
        d = dict(d)
        for key in ("classes", "mean", "std", "cam_layers"):
            d[key] = tuple(d[key])
        return cls(**d)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(folder: Path | str) -> dict:
    """The card of a model folder. Raises WeightsError if there is none."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise WeightsError(f"no {CARD_FILE} in {folder}: not a model folder")
    try:
        card = json.loads(path.read_text())
        ModelContract.from_json(card["contract"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path} is not a valid model card ({exc!r})") from None
    return card


def verified_weights(folder: Path | str) -> tuple[dict, Path, str]:
    """(card, weights path, sha256) after checking the weights file against its card.

    Raises WeightsError if the card or weights are missing or the sha256 differs.
    """
    card = read_card(folder)
    name = card.get("weights_file", WEIGHTS_FILE)
    if Path(name).name != name:
        raise WeightsError(f"the card's weights_file {name!r} must be a file name in {folder}")
    weights = Path(folder) / name
    if not weights.is_file():
        raise WeightsError(f"weights file {weights} is missing")
    digest = sha256_file(weights)
    if digest != card.get("sha256"):
        raise WeightsError(f"{weights} does not match its card (sha256 {digest[:12]}... vs "
                           f"{str(card.get('sha256'))[:12]}...): the file was changed or replaced; "
                           "refusing to load it")
    return card, weights, digest


def find_models(*roots: Path) -> list[Path]:
    """Model folders (holding a card.json) in ``roots`` or up to three levels under (as
    ``weights/study/runs/small_cnn``), sorted."""
    found: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for depth in range(4):
            for card in root.glob("*/" * depth + CARD_FILE):
                found.add(card.parent.resolve())
    return sorted(found)
