"""The images pages show: uploads and the bundled samples as (name, bytes) items, and the image
behind a result row (read from the session's uploads, from this machine's disk, or from the
repository for a model folder's predictions), as arrays or table thumbnails.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from core.data.images import ImageError
from core.data.sources import (
    ImageSource,
    Upload,
    open_source,
    read_image,
    sources_from_uploads,
)
from core.schema.files import REPO_ROOT
from core.schema.labels import ZIP_SEP
from dashboard.text import plain

SAMPLES = Path(__file__).resolve().parent / "samples"
UPLOAD_TYPES = ["png", "jpg", "jpeg", "jpe", "jfif", "tif", "tiff", "bmp", "webp", "zip"]


def items_key(items: Sequence[Upload]) -> str:
    """One hash of uploads (name, and bytes or the file holding them): the same upload gives
    the same key, wherever it is kept."""
    h = hashlib.sha256()
    for name, data in items:
        h.update(name.encode())
        if isinstance(data, Path):
            with open(data, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        else:
            h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def uploaded_items(files) -> list[tuple[str, bytes]]:
    """(name, bytes) of st.file_uploader's files (None or a list)."""
    return [(f.name, f.getvalue()) for f in files or []]


@st.cache_data(show_spinner=False)
def sample_items() -> list[tuple[str, bytes]]:
    """The bundled sample cells as (``samples/<class>/<file>``, bytes), sorted."""
    return [
        (f"samples/{p.parent.name}/{p.name}", p.read_bytes())
        for p in sorted(SAMPLES.rglob("*.png"))
    ]


def sources_for(items: Sequence[Upload]) -> dict[str, ImageSource]:
    """The images of an upload (zips opened), by the path its results name them with."""
    return {s.path: s for s in sources_from_uploads(items)}


def repo_source(path: str) -> ImageSource:
    """The image that a model folder's predictions CSV names. Its paths are relative to the
    repository root (where ``malaria train`` runs), whatever the server's working directory.
    Raises FileNotFoundError."""
    return open_source(str(REPO_ROOT / path))  # an absolute path stays as it is


def images_missing(paths: Sequence[str], what: str) -> bool:
    """Whether the files or zips that ``paths`` (from the predictions CSV ``what``) are read
    from are missing on this machine; if so, one warning says where they are expected."""
    places = {
        (REPO_ROOT / (p if (REPO_ROOT / p).is_file() else p.split(ZIP_SEP, 1)[0])).resolve()
        for p in paths
    }  # a "!" may be part of a file's name
    missing = sorted(p for p in places if not p.is_file())
    if missing:
        st.warning(
            plain(
                f"The cell images are not on this machine: expected "
                f"{', '.join(map(str, missing))} (the paths in {what} are relative to "
                f"the repository, {REPO_ROOT}). Put the data there to see the cells."
            )
        )
    return bool(missing)


def cell_source(path: str, sources: dict[str, ImageSource], *, on_disk: bool) -> ImageSource | None:
    """The image of a result row, or None when it is not at hand.

    ``on_disk``: the run scored files of this machine (CLI), so a path missing from
    ``sources`` may be read from disk; upload names are never looked up on disk.
    """
    try:
        return sources.get(path) or (open_source(path) if on_disk else None)
    except OSError:  # gone from disk
        return None


def image_of(
    path: str, sources: dict[str, ImageSource], *, on_disk: bool, size: int | None = None
) -> np.ndarray | None:
    """A result's image, RGB uint8 (H, W, 3) (resized to ``size`` if given), or None if it
    cannot be read (``on_disk`` as for :func:`cell_source`)."""
    try:
        source = cell_source(path, sources, on_disk=on_disk)
        return None if source is None else read_image(source, size=size)
    except (ImageError, OSError):  # gone from disk, or the error row itself
        return None


def thumbnail(
    path: str, sources: dict[str, ImageSource], *, on_disk: bool, size: int = 48
) -> str | None:
    """A small JPEG data URL for a table cell (a third of a PNG's encoding time and half its
    size at 48 px; colour at full resolution, for small purple dots), or None if the image
    cannot be read."""
    image = image_of(path, sources, on_disk=on_disk, size=size)
    if image is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
