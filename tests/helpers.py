"""Helpers shared by test modules in several folders (fixtures are in conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from core import cli
from core.data.images import decode_image
from core.data.sources import iter_sources, unique_paths

ROOT = Path(__file__).resolve().parent.parent
# the data sets beside the repository (../shared/data), where this machine has them
SHARED_DATA = ROOT.parent / "shared" / "data"

# --- smear fields composed from the fixture cells ----------------------------------------------

BACKGROUND = (222, 232, 224)  # the light greenish grey of a thin smear's glass


def cell_images(cells_dir: Path, n: int) -> list[np.ndarray]:
    """``n`` cells of one patient (one stain, as in a real field), repeated as needed. (The
    palest fixture patients, C176 and C226, are barely redder than this background: their
    cells are not found reliably, a known limit of the a* threshold.)"""
    paths = sorted(cells_dir.rglob("C123P84*.png"))
    return [
        np.asarray(Image.open(paths[i % len(paths)]).convert("RGB").resize((90, 90)))
        for i in range(n)
    ]


def paste(field: np.ndarray, cell: np.ndarray, x: int, y: int) -> tuple[int, int, int, int]:
    """Lay the cell (its black background left out) on the field; returns its true box."""
    h, w = cell.shape[:2]
    H, W = field.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    part = cell[y0 - y : y1 - y, x0 - x : x1 - x]
    mask = part.max(-1) > 40
    field[y0:y1, x0:x1][mask] = part[mask]
    ys, xs = np.nonzero(mask)
    return x0 + xs.min(), y0 + ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


# --- the score command ----------------------------------------------------------------------------


def score_cli(*argv) -> int:
    """`malaria score ARGV...` in this process, every argument as a string: the exit code."""
    return cli.main(["score", *(str(a) for a in argv)])


# --- images ---------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decoded_cells(cells_dir) -> list[tuple[str, np.ndarray]]:
    return [
        (Path(s.path).stem, decode_image(s.read(), size=128)) for s in iter_sources([cells_dir])
    ]


# --- the quality gate's feature model -------------------------------------------------------------


def gaussian_features(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    f = rng.normal(0, 1, (n, 40)) * np.linspace(3, 0.1, 40) + labels[:, None] * 2.0
    return f.astype(np.float32), labels


# --- the Ray path ---------------------------------------------------------------------------------


def listed_sources(root: Path):
    # as malaria score lists them: absolute inputs, repeated paths renamed
    return unique_paths(iter_sources([str(root.resolve()), str((root / "slides.zip").resolve())]))
