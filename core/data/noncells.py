"""Images that are not single-cell crops, made at run time, for measuring the quality gate.

    malaria check gate   (uses them; nothing here is written to the repository)

Six kinds, each a list of (name, RGB uint8 image (H, W, 3) of any size):

- ``noise``: uniform, Gaussian, salt-and-pepper and smooth (low-frequency) colour noise;
- ``blank``: flat black, white and colours, some with faint noise;
- ``gradient``: linear and radial ramps between random colours (a radial ramp from a bright
  centre to black edges is the hardest: a round bright blob on a dark background);
- ``photo``: photographs shipped with installed packages (matplotlib's sample data, and
  scikit-image's if it is installed) and their crops, plus synthetic scenes of random shapes
  over smooth backgrounds;
- ``smear field``: whole thin-smear fields of view and crops of several cells from them
  (``smear_dev/images``, read where they lie, never copied: other lab, light background);
- ``blurred cell``: real development cells blurred far beyond the training augmentation
  (Gaussian sigma 2-5 px at 128 px; training blurs up to 1 px);
- ``look-alike``: what the image statistics alone cannot tell from a cell: flat and textured
  discs and ellipses of cell colours on black, with or without a purple dot, and two real cells
  side by side in one image.

Every image is drawn from a seeded generator: the same call gives the same set.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Named = tuple[str, np.ndarray]
KINDS = ("noise", "blank", "gradient", "photo", "smear field", "blurred cell", "look-alike")
BLUR_SIGMAS = (2.0, 3.0, 4.0, 5.0)  # px at 128 px; training blurs up to 1 px


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(64, 640)), int(rng.integers(64, 640))


def noise(rng: np.random.Generator, n: int = 40) -> list[Named]:
    out = []
    for i in range(n):
        h, w = _size(rng)
        kind = i % 4
        img: np.ndarray
        if kind == 0:
            img = rng.integers(0, 256, (h, w, 3))
        elif kind == 1:
            img = rng.normal(rng.uniform(40, 215, 3), rng.uniform(10, 60), (h, w, 3))
        elif kind == 2:
            img = np.where(
                rng.random((h, w, 1)) < rng.uniform(0.05, 0.5), 255.0, rng.uniform(0, 255, 3)
            ) * np.ones((1, 1, 3))
        else:  # smooth blobs: noise at a coarse grid, upsampled
            small = rng.integers(0, 256, (int(rng.integers(3, 12)),) * 2 + (3,)).astype(np.uint8)
            img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
        out.append((f"noise_{i}", np.clip(img, 0, 255).astype(np.uint8)))
    return out


def blank(rng: np.random.Generator, n: int = 30) -> list[Named]:
    fixed = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (20, 20, 20), (235, 235, 235)]
    out = []
    for i in range(n):
        h, w = _size(rng)
        colour = np.array(fixed[i] if i < len(fixed) else rng.integers(0, 256, 3), np.float32)
        img = np.broadcast_to(colour, (h, w, 3)).copy()
        if i % 2:
            img += rng.normal(0, 3, img.shape)
        out.append((f"blank_{i}", np.clip(img, 0, 255).astype(np.uint8)))
    return out


def gradient(rng: np.random.Generator, n: int = 40) -> list[Named]:
    out = []
    for i in range(n):
        h, w = _size(rng)
        a, b = (
            rng.integers(0, 256, 3).astype(np.float32),
            rng.integers(0, 256, 3).astype(np.float32),
        )
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        if i % 2:  # radial: centre colour a, edges b; every fourth has black edges
            if i % 4 == 1:
                b = np.zeros(3, np.float32)
            t = np.hypot((y - h / 2) / (h / 2), (x - w / 2) / (w / 2)).clip(0, 1)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            t = x * np.cos(angle) + y * np.sin(angle)
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        img = a * (1 - t[..., None]) + b * t[..., None]
        out.append((f"gradient_{i}", img.astype(np.uint8)))
    return out


def _packaged_photos() -> list[tuple[str, Path]]:
    """Colour photographs that installed packages ship (none are downloaded)."""
    found = []
    try:
        import matplotlib

        sample = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if sample.is_file():
            found.append(("matplotlib_grace_hopper", sample))
    except ImportError:
        pass
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        for name in (
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "rocket.jpg",
            "motorcycle_left.png",
            "retina.jpg",
            "hubble_deep_field.jpg",
            "ihc.png",
            "color.png",
            "camera.png",
            "coins.png",
            "moon.png",
            "brick.png",
            "grass.png",
            "gravel.png",
        ):
            if (data / name).is_file():
                found.append((f"skimage_{Path(name).stem}", data / name))
    except ImportError:
        pass
    return found


def _crops(name: str, img: np.ndarray, rng: np.random.Generator, n: int) -> list[Named]:
    """The whole image and ``n`` random square crops of 1/6 to 1/2 of its shorter side."""
    out = [(name, img)]
    h, w = img.shape[:2]
    for j in range(n):
        side = int(rng.integers(min(h, w) // 6, min(h, w) // 2 + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append((f"{name}_crop{j}", img[y : y + side, x : x + side]))
    return out


def photos(rng: np.random.Generator, *, synthetic: int = 30, crops: int = 4) -> list[Named]:
    out = []
    for name, path in _packaged_photos():
        img = np.asarray(Image.open(path).convert("RGB"))
        out += _crops(name, img, rng, crops)
    for i in range(synthetic):  # random shapes over a smooth background
        h, w = _size(rng)
        small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        canvas = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 15))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = [
                x0,
                y0,
                x0 + int(rng.integers(8, w // 2 + 9)),
                y0 + int(rng.integers(8, h // 2 + 9)),
            ]
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))
        out.append((f"scene_{i}", np.asarray(canvas)))
    return out


def smear_fields(folder: Path | None, rng: np.random.Generator, *, crops: int = 3) -> list[Named]:
    """Each field of view under ``folder`` (JPEGs) and ``crops`` random crops of it; empty
    when the folder is not there."""
    if folder is None or not Path(folder).is_dir():
        return []
    out = []
    for path in sorted(Path(folder).glob("*.[jJ][pP][gG]")):
        img = np.asarray(Image.open(path).convert("RGB"))
        out += _crops(f"smear_{path.stem}", img, rng, crops)
    return out


def blurred(cells: Sequence[Named], rng: np.random.Generator) -> list[Named]:
    """Each cell (RGB uint8 at 128 px) blurred with a Gaussian of a sigma from BLUR_SIGMAS."""
    out = []
    for name, img in cells:
        sigma = float(rng.choice(BLUR_SIGMAS))
        scale = min(img.shape[:2]) / 128
        soft = Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma * scale))
        out.append((f"blurred_s{sigma:g}_{name}", np.asarray(soft)))
    return out


def look_alikes(cells: Sequence[Named], rng: np.random.Generator, n: int = 40) -> list[Named]:
    """Discs of cell colours on black (half textured, half with a dark purple dot), and pairs
    of ``cells`` (RGB uint8) side by side."""
    out = []
    for i in range(n):
        side = int(rng.integers(96, 220))
        img = Image.new("RGB", (side, side))
        draw = ImageDraw.Draw(img)
        pink = (
            int(rng.integers(170, 230)),
            int(rng.integers(110, 170)),
            int(rng.integers(140, 200)),
        )
        m = int(side * rng.uniform(0.02, 0.12))
        draw.ellipse([m, int(m * rng.uniform(1, 3)), side - m, side - m], fill=pink)
        if i % 2:
            r = int(side * rng.uniform(0.04, 0.1))
            cx, cy = (int(c) for c in rng.integers(side // 3, 2 * side // 3, 2))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(90, 40, 110))
        arr = np.asarray(img).astype(np.float32)
        if i % 4 >= 2:
            arr = np.where(arr.max(-1, keepdims=True) > 0, arr + rng.normal(0, 8, arr.shape), 0)
        out.append((f"disc_{i}", np.clip(arr, 0, 255).astype(np.uint8)))
    for j in range(0, len(cells) - 1, 2):
        out.append((f"pair_{j}", np.concatenate([cells[j][1], cells[j + 1][1]], axis=1)))
    return out


def non_cells(
    *, smear_folder: Path | None, cells: Sequence[Named] = (), seed: int = 0
) -> dict[str, list[Named]]:
    """Every kind of KINDS -> its images; ``cells`` (real cells, RGB uint8 at 128 px) are
    blurred for ``blurred cell`` and paired for ``look-alike``."""
    rng = np.random.default_rng(seed)
    return {
        "noise": noise(rng),
        "blank": blank(rng),
        "gradient": gradient(rng),
        "photo": photos(rng),
        "smear field": smear_fields(smear_folder, rng),
        "blurred cell": blurred(cells, rng),
        "look-alike": look_alikes(cells, rng),
    }


def as_png(images: Sequence[Named]) -> Iterator[tuple[str, bytes]]:
    """(name.png, PNG bytes) for each image: what an upload of them would hand the scorer."""
    for name, img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        yield f"{name}.png", buf.getvalue()
