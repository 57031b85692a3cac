"""Annotated fields of view: the boxed cells of a lab's smear fields, read and checked.

The format is that of the IML set (``smear_dev/annotations.json``): a JSON list with one object
per image, ``{"image_name": "PA171730.JPG", "objects": [{"type": "red blood cell", "bbox":
{"x": "176", "y": "250", "w": "82", "h": "78"}}, ...]}``; ``x, y`` the box's top-left corner and
``w, h`` its size in pixels (numbers or numeric strings). ``type`` is ``red blood cell``, an
infected cell's stage (``ring``, ``trophozoite``, ``schizont``, ``gametocyte``) or
``difficult``. Every infected cell of a field is expected to be boxed; red cells may not all be.

A cell boxed twice (two boxes with IoU >= 0.5: the IML set boxes 3 of the 124 infected cells
of ``smear_dev`` once more as a red blood cell) keeps one box, an infected stage before
``difficult`` before ``red blood cell``: what the annotator saw in that cell.

Everything wrong with a file is an AnnotationError whose message names the image and the box,
raised before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

UNINFECTED_BOX = "red blood cell"
INFECTED_STAGES = ("ring", "trophozoite", "schizont", "gametocyte")
DIFFICULT = "difficult"
BOX_TYPES = (UNINFECTED_BOX, *INFECTED_STAGES, DIFFICULT)


class AnnotationError(ValueError):
    """An annotation file, or a field it names, that cannot be used; the message says why."""


@dataclass(frozen=True)
class Box:
    kind: str  # one of BOX_TYPES
    x: float
    y: float
    w: float
    h: float

    @property
    def infected(self) -> bool:
        return self.kind in INFECTED_STAGES

    @property
    def xywh(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.w, self.h)


@dataclass(frozen=True)
class AnnotatedField:
    path: Path
    boxes: tuple[Box, ...]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def parasitemia(self) -> float:
        """Infected boxes over the boxes that are not ``difficult``: the field's parasitemia as
        its annotator saw it (NaN without boxes)."""
        counted = [b for b in self.boxes if b.kind != DIFFICULT]
        return sum(b.infected for b in counted) / len(counted) if counted else float("nan")


SAME_CELL = 0.5  # IoU of two boxes of one cell


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), boxes as x, y, w, h:
    float (N, M)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    y1 = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def one_box_per_cell(boxes: tuple[Box, ...]) -> tuple[Box, ...]:
    """``boxes`` without those that box a cell another box already names (IoU >= SAME_CELL),
    an infected stage kept before ``difficult`` before ``red blood cell``; in their order."""
    rank = {k: (0 if k in INFECTED_STAGES else 1 if k == DIFFICULT else 2) for k in BOX_TYPES}
    order = sorted(range(len(boxes)), key=lambda i: rank[boxes[i].kind])
    xywh = np.array([b.xywh for b in boxes], float).reshape(-1, 4)
    iou = box_iou(xywh, xywh)
    kept: list[int] = []
    for i in order:
        if not any(iou[i, j] >= SAME_CELL for j in kept):
            kept.append(i)
    return tuple(boxes[i] for i in sorted(kept))


def _number(value: object, what: str) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AnnotationError(f"{what}: {value!r} is not a number") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise AnnotationError(f"{what}: {value!r} is not a finite number")
    return x


def _box(obj: object, where: str, size: tuple[int, int]) -> Box:
    if not isinstance(obj, dict) or not isinstance(obj.get("bbox"), dict):
        raise AnnotationError(f"{where}: expected {{'type': ..., 'bbox': {{x, y, w, h}}}}")
    kind = obj.get("type")
    if kind not in BOX_TYPES:
        raise AnnotationError(f"{where}: unknown type {kind!r} (known: {', '.join(BOX_TYPES)})")
    bbox = obj["bbox"]
    missing = [k for k in "xywh" if k not in bbox]
    if missing:
        raise AnnotationError(f"{where}: bbox lacks {', '.join(missing)}")
    x, y, w, h = (_number(bbox[k], f"{where}, bbox {k}") for k in "xywh")
    if w <= 0 or h <= 0:
        raise AnnotationError(f"{where}: bbox of size {w:g}x{h:g}")
    W, H = size
    if x >= W or y >= H or x + w <= 0 or y + h <= 0:
        raise AnnotationError(
            f"{where}: bbox ({x:g}, {y:g}, {w:g}, {h:g}) outside the {W}x{H} image"
        )
    return Box(str(kind), x, y, w, h)


def read_annotations(folder: Path | str, annotations: Path | str) -> list[AnnotatedField]:
    """The annotated fields of ``annotations`` whose images are in ``folder``, by image name.
    Boxes that reach a few pixels past the border (the IML tool pads them) are kept as they are;
    a cell boxed twice keeps one box (``one_box_per_cell``).
    Raises AnnotationError for a file that is not this format, an image it names that is not in
    ``folder`` or not readable, a box of unknown type or outside its image, or no field."""
    folder, annotations = Path(folder), Path(annotations)
    if not folder.is_dir():
        raise AnnotationError(f"{folder} is not a folder of field images")
    try:
        entries = json.loads(annotations.read_text())
    except OSError as exc:
        raise AnnotationError(f"cannot read {annotations}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise AnnotationError(f"{annotations} is not JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise AnnotationError(
            f"{annotations}: expected a non-empty list of {{'image_name': ..., 'objects': [...]}}"
        )
    fields, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image_name"), str):
            raise AnnotationError(f"{annotations}, entry {i}: no image_name")
        name, objects = entry["image_name"], entry.get("objects")
        if not isinstance(objects, list):
            raise AnnotationError(f"{annotations}, {name}: objects is not a list")
        if Path(name).name != name or name in seen:
            raise AnnotationError(f"{annotations}, {name}: not a plain, unique file name")
        seen.add(name)
        path = folder / name
        try:
            with Image.open(path) as img:
                size = img.size
        except FileNotFoundError:
            raise AnnotationError(f"{annotations} names {name}, which is not in {folder}") from None
        except (OSError, UnidentifiedImageError) as exc:
            raise AnnotationError(f"{path}: not a readable image ({exc})") from None
        boxes = tuple(_box(o, f"{name}, object {j}", size) for j, o in enumerate(objects))
        fields.append(AnnotatedField(path, one_box_per_cell(boxes)))
    return sorted(fields, key=lambda f: f.name)


def block_of(name: str, prefix: int) -> str:
    """The block of shots a field belongs to: the first ``prefix`` characters of its name
    (``PA171730.JPG`` -> ``PA1717`` with 6: a camera's shot numbers come in runs)."""
    return name[:prefix]
