"""What a cell image's name and a probability say: its class, its case (patient), its call.

Images come from files, folders (recursive) or ``.zip`` archives in the NIH layout: a labelled
image sits under a directory named ``Parasitized`` or ``Uninfected`` (any case, any depth).
The slide case (one case = one patient) is parsed from the file name: ``C100P61ThinF_...`` is
``C100``.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import numpy as np

CLASSES = ("Parasitized", "Uninfected")  # folder names of the NIH layout, index order of the model
PARASITIZED, UNINFECTED = CLASSES  # the positive class, and the other: spelled only here
PARASITIZED_INDEX = CLASSES.index(PARASITIZED)  # a sample's integer label when it is Parasitized
UNINFECTED_INDEX = CLASSES.index(UNINFECTED)
ZIP_SEP = "!"  # "slides.zip!cell_images/Uninfected/x.png" names a zip member

_CASE_RE = re.compile(r"^C(\d+)", re.IGNORECASE)


def is_parasitized(labels) -> np.ndarray:
    """1 where a label (class name) is Parasitized, else 0: the positive class as ints."""
    return (np.asarray(labels, dtype=object) == PARASITIZED).astype(int)


def as_posix(key: str) -> PurePosixPath:
    """A source key as one POSIX path: zip separators become ``/``. A backslash is part of a
    name (a Linux file may hold one), never a separator: zip members written with Windows
    separators are given ``/`` where they are found (core.data.sources)."""
    return PurePosixPath(key.replace(ZIP_SEP, "/"))


def file_name(path: str) -> str:
    """The last component of a file path or zip member name (``/`` separated; a ``\\`` or a
    ``!`` is part of the name: ``!`` only separates zip members in source keys)."""
    return PurePosixPath(path).name


def case_id(name: str) -> str:
    """Case id parsed from a file or member name: ``C100P61ThinF_IMG_x_cell_1.png`` -> ``C100``.

    Pass the image's own name (``ImageSource.name``), not a ``zip!member`` key. Names that do
    not start with ``C<digits>`` get ``?<stem>``, their own case, so an unparsed image is never
    merged with a patient (parasitemia summaries pool them as ``(no case id)``, never flagged).
    """
    base = file_name(name)
    m = _CASE_RE.match(base)
    if m:
        return f"C{int(m.group(1))}"
    return f"?{PurePosixPath(base).stem}"


def predicted_class(prob: float, threshold: float) -> str:
    """The class called for P(Parasitized) = ``prob`` at ``threshold`` (ties go to Parasitized)."""
    return PARASITIZED if prob >= threshold else UNINFECTED


def label_from_path(path: str) -> str | None:
    """``Parasitized`` or ``Uninfected`` from the nearest parent folder so named, else None."""
    parts = as_posix(path).parts[:-1]
    lowered = {c.lower(): c for c in CLASSES}
    for part in reversed(parts):
        if part.lower() in lowered:
            return lowered[part.lower()]
    return None
