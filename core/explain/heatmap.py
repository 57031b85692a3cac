"""What a heatmap is and how it is drawn: method names, the Explanation record, overlays.

Light on purpose (NumPy, Pillow, OpenCV): pages that only draw maps or list the methods import
this, not ``core.explain``, which loads PyTorch and pytorch-grad-cam to compute them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from core.schema.labels import PARASITIZED

# The CAM methods of pytorch-grad-cam that ``core.explain`` offers, by name.
METHOD_NAMES = (
    "gradcam",
    "gradcam++",
    "xgradcam",
    "hirescam",
    "layercam",
    "eigencam",
    "scorecam",
    "ablationcam",
)
# Perturbation methods run the network once per channel batch of the target layer.
SLOW_METHODS = frozenset({"scorecam", "ablationcam"})
# The method ``explain`` uses when none is given; see the module docstring for why.
DEFAULT_METHOD = "hirescam"
TARGETS = ("predicted", "parasitized", "uninfected")
FUSE = "+"  # "features.6+features.13": the mean of both stages' normalised maps


@dataclass(frozen=True)
class Explanation:
    """One image's map. Arrays are at the original image's size (H, W)."""

    method: str
    layer: str
    target: str  # the class explained: "Parasitized" or "Uninfected"
    heatmap: np.ndarray  # float32 (H, W) in [0, 1]
    map_size: tuple[int, int]  # the layer's own resolution, before upsampling
    overlay: np.ndarray  # uint8 (H, W, 3), heatmap over the image at 50 % opacity
    prob_parasitized: float  # from the PyTorch forward pass the map differentiates
    peak_on_stain: bool | None  # the peak on the stained dot; None: no dot located, or a flat map
    mass_in_cell: float  # share of the map's mass on the cell, in [0, 1]; NaN for a flat map
    road: float  # NaN when faithfulness was not asked for
    ms: float  # wall time per image of the map itself (faithfulness not included)

    @property
    def points_at_parasite(self) -> bool | None:
        """The pointing check, judged only for the Parasitized explanation: evidence for
        Parasitized should sit on the parasite, while evidence for Uninfected has no place it
        must be (on a stained dot or away from it, neither is a failure). None otherwise."""
        return self.peak_on_stain if self.target == PARASITIZED else None


def overlay(image: np.ndarray, heatmap: np.ndarray, *, opacity: float = 0.5) -> np.ndarray:
    """Heatmap (H, W) in [0, 1] laid over an RGB uint8 image (H, W, 3) -> uint8 (H, W, 3)."""
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    colour = (
        cv2.cvtColor(
            cv2.applyColorMap((255 * heatmap).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB
        ).astype(np.float32)
        / 255
    )
    mixed = opacity * colour + (1 - opacity) * (image.astype(np.float32) / 255)
    return (255 * mixed / np.max(mixed)).astype(np.uint8)


def colour_bar(*, width: int = 256, height: int = 12) -> np.ndarray:
    """The overlay's colour scale, low evidence (left) to high (right): uint8 (height, width, 3)."""
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float32), (height, 1)).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def for_display(
    image: np.ndarray, *, width: int = 384, outline: np.ndarray | None = None
) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) upsampled smoothly (bicubic) to ``width`` px, with the
    boundary of the bool mask ``outline`` (H, W), if given, drawn in white."""
    h, w = image.shape[:2]
    size = (width, max(1, round(width * h / w)))
    big = np.array(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    if outline is not None and outline.any():
        mask = np.asarray(Image.fromarray(outline.astype(np.uint8) * 255).resize(size)) > 127
        big[mask & ~ndimage.binary_erosion(mask, iterations=max(1, width // 192))] = 255
    return big
