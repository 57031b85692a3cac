"""Finding, decoding, labelling and splitting cell images.

Images come from files, folders (recursive) or ``.zip`` archives in the NIH layout: a labelled
image sits under a directory named ``Parasitized`` or ``Uninfected`` (any case, any depth).
The slide case (one case = one patient) is parsed from the file name: ``C100P61ThinF_...`` is
``C100``.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

CLASSES = ("Parasitized", "Uninfected")  # folder names of the NIH layout, index order of the model
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
# Image files we recognise but do not accept: they get an error row instead of being skipped.
UNSUPPORTED_SUFFIXES = frozenset({".gif", ".heic", ".heif", ".svg", ".jp2", ".ico", ".psd",
                                  ".dng", ".raw", ".avif"})
MAX_MEMBER_BYTES = 64 * 2**20  # a cell image is ~15 kB; a nested zip is read into memory
# Refuse images above this many pixels before decoding: a cell crop is ~200x200; 40 Mpx is a
# whole slide photo already, and guards against decompression bombs.
MAX_PIXELS = 40_000_000
ZIP_SEP = "!"  # "slides.zip!cell_images/Uninfected/x.png" names a zip member

_CASE_RE = re.compile(r"^C(\d+)", re.IGNORECASE)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, not a grey cell
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """An input file that is not a usable image; the message is meant for the user."""


class DataError(ValueError):
    """A data set that cannot be used as asked (no images, one class only, too few cases)."""


def as_posix(key: str) -> PurePosixPath:
    """A source key as one POSIX path: zip separators and backslashes become ``/``."""
    return PurePosixPath(key.replace("\\", "/").replace(ZIP_SEP, "/"))


def file_name(path: str) -> str:
    """The last component of a file path or zip member name (``/`` or ``\\`` separated; a
    ``!`` is part of the name: it only separates zip members in source keys)."""
    return PurePosixPath(path.replace("\\", "/")).name


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
    return CLASSES[0] if prob >= threshold else CLASSES[1]


def label_from_path(path: str) -> str | None:
    """``Parasitized`` or ``Uninfected`` from the nearest parent folder so named, else None."""
    parts = as_posix(path).parts[:-1]
    lowered = {c.lower(): c for c in CLASSES}
    for part in reversed(parts):
        if part.lower() in lowered:
            return lowered[part.lower()]
    return None


# ---------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSource:
    """One image somewhere: a file on disk or a member of a zip. ``path`` is its unique key
    (``archive.zip!member`` for zip members); ``name`` is the file or member name alone, which
    case ids are parsed from (a ``!`` in a file name is then no separator)."""

    path: str
    read: Callable[[], bytes]
    name: str = ""  # empty: the last component of path

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", file_name(self.path))


def _is_hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not re.match(r"^[A-Za-z]:", name)


def _error_source(path: str, message: str, name: str = "") -> ImageSource:
    def read() -> bytes:
        raise ImageError(message)
    return ImageSource(path, read, name)


def _unsupported(path: str, name: str = "") -> ImageSource:
    return _error_source(path, f"unsupported format {PurePosixPath(path).suffix.lower()}; "
                               f"accepted: {', '.join(sorted(IMAGE_SUFFIXES))}", name)


def _open_zip(data: Path | io.BytesIO, path: str, *, depth: int = 0, name: str = ""
              ) -> Iterator[ImageSource]:
    try:
        zf = zipfile.ZipFile(data)
    except Exception as exc:  # BadZipFile, OSError, bad name encodings, ...: one error row
        yield _error_source(path, f"not a readable zip archive: {exc}", name)
        return
    yield from _zip_sources(zf, path, depth=depth)


def _zip_or_note(data: Path | io.BytesIO, path: str, *, depth: int = 0, name: str = ""
                 ) -> Iterator[ImageSource]:
    """The zip's sources, or one error source saying it holds none (so it is not lost)."""
    empty = True
    for source in _open_zip(data, path, depth=depth, name=name):
        empty = False
        yield source
    if empty:
        yield _no_images(path, name)


def _no_images(path: str, name: str = "") -> ImageSource:
    return _error_source(path, "no images in this zip (accepted: "
                               f"{', '.join(sorted(IMAGE_SUFFIXES))})", name)


_READ_CHUNK = 1 << 16  # zipfile inflates at most this much per read() call


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes, inflated in small chunks and never more than MAX_MEMBER_BYTES,
    whatever its header declares (``zf.read`` inflates a whole member in one call, so a header
    that under-states the size cost as much memory as the real size)."""
    if info.file_size > MAX_MEMBER_BYTES:
        raise ImageError(f"zip member is {info.file_size / 2**20:.0f} MiB; refusing to read it")
    out = bytearray()
    try:
        with zf.open(info) as f:
            while chunk := f.read(_READ_CHUNK):
                out += chunk
                if len(out) > MAX_MEMBER_BYTES:
                    raise ImageError(f"zip member inflates to more than "
                                     f"{MAX_MEMBER_BYTES / 2**20:.0f} MiB; refusing it")
    except ImageError:
        raise
    except Exception as exc:  # bad CRC, corrupt deflate stream, encryption, a lying header
        raise ImageError(f"cannot read zip member: {exc}") from None
    return bytes(out)


def _zip_sources(zf: zipfile.ZipFile, prefix: str, *, depth: int = 0) -> Iterator[ImageSource]:
    """Members of an open zip, sorted. Nested zips are opened one level down at most."""
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        name = info.filename
        if info.is_dir() or not _safe_member(name):
            continue
        if _is_hidden(PurePosixPath(name).parts):
            continue
        path = f"{prefix}{ZIP_SEP}{name}"
        member = file_name(name)
        suffix = PurePosixPath(name).suffix.lower()
        if suffix == ".zip" and depth < 1:
            try:
                inner = io.BytesIO(_read_member(zf, info))
            except ImageError as exc:
                yield _error_source(path, str(exc), member)
                continue
            yield from _zip_or_note(inner, path, depth=depth + 1, name=member)
        elif suffix == ".zip":
            yield _error_source(path, "a zip inside a zip inside a zip: only one level of "
                                      "nesting is opened", member)
        elif suffix in IMAGE_SUFFIXES:
            yield ImageSource(path, _member_reader(zf, info), member)
        elif suffix in UNSUPPORTED_SUFFIXES:
            yield _unsupported(path, member)


def _member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    return lambda: _read_member(zf, info)


def _file_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        size = path.stat().st_size
        if size > MAX_MEMBER_BYTES:
            raise ImageError(f"file is {size / 2**20:.0f} MiB; not a cell image")
        return path.read_bytes()
    return read


_FOLLOW_HINT = "not followed (use --follow-links to read what it points to)"


def _scan(folder: Path, top: Path, *, follow_links: bool, seen: set[Path]
          ) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for each regular file under ``folder`` (hidden entries skipped), and
    (path, why) for what cannot be used: an unreadable folder, a link not followed, a FIFO."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as exc:
        yield folder, f"cannot read this folder ({exc.strerror or exc}); its images are missing"
        return
    for entry in entries:
        if _is_hidden([entry.name]):
            continue
        path = Path(entry.path)
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()  # both follow links
            target = path.resolve() if entry.is_symlink() else None
        except (OSError, RuntimeError) as exc:  # a link loop, a vanished entry
            yield path, f"cannot read this entry ({exc})"
            continue
        if target is not None and not (is_dir or is_file):
            yield path, f"broken symbolic link to {target}"
            continue
        if target is not None and not follow_links and not target.is_relative_to(top):
            kind = "a folder" if is_dir else "a file"
            yield path, f"symbolic link to {kind} outside the input folder ({target}): {_FOLLOW_HINT}"
            continue
        if is_dir:
            real = path.resolve()
            if target is not None and not follow_links:
                continue  # a link to a folder inside the input: its images are found there
            if real not in seen:  # a loop of linked folders is walked once
                seen.add(real)
                yield from _scan(path, top, follow_links=follow_links, seen=seen)
        elif is_file:
            yield path, None
        else:
            yield path, "not a regular file (a FIFO, socket or device); not read"


def _folder_sources(root: Path, *, follow_links: bool) -> Iterator[ImageSource]:
    top = root.resolve()
    found = False
    for path, why in sorted(_scan(root, top, follow_links=follow_links, seen={top})):
        suffix = path.suffix.lower()
        if why is not None:
            # a folder or a linked folder always counts; other entries only if images would
            if path.is_dir() or suffix in IMAGE_SUFFIXES | UNSUPPORTED_SUFFIXES | {".zip"}:
                found = True
                yield _error_source(str(path), why)
        elif suffix == ".zip":
            found = True
            yield from _zip_or_note(path, str(path))
        elif suffix in IMAGE_SUFFIXES:
            found = True
            yield ImageSource(str(path), _file_reader(path))
        elif suffix in UNSUPPORTED_SUFFIXES:
            found = True
            yield _unsupported(str(path))
    if not found:
        yield _error_source(str(root), "no images in this folder (accepted: "
                                       f"{', '.join(sorted(IMAGE_SUFFIXES))}, and zips)")


def iter_sources(inputs: Iterable[str | Path], *, follow_links: bool = False
                 ) -> Iterator[ImageSource]:
    """Every image under ``inputs`` (files, folders searched recursively, zips), in sorted order.

    Hidden files, ``__MACOSX`` entries and zip members with absolute or ``..`` paths are
    skipped. Sources whose ``read`` raises ImageError stand for what cannot be scored, so that
    nothing is lost silently: recognised but unsupported image types (GIF, HEIC, ...),
    unreadable zips, folders that cannot be read, an input folder without images, inputs that
    are not regular files (FIFOs, devices), and symbolic links that lead outside the input
    folder unless ``follow_links``. Raises FileNotFoundError for a missing input.
    """
    for item in inputs:
        root = Path(item)
        if not root.exists():
            raise FileNotFoundError(f"input not found: {root}")
        if root.is_dir():
            yield from _folder_sources(root, follow_links=follow_links)
        elif not root.is_file():
            yield _error_source(str(root), "not a regular file or folder (a FIFO, socket or "
                                           "device); not read")
        elif root.suffix.lower() == ".zip":
            yield from _zip_or_note(root, str(root))
        else:
            yield ImageSource(str(root), _file_reader(root))


def sources_from_uploads(items: Iterable[tuple[str, bytes]]) -> list[ImageSource]:
    """Sources for uploaded (name, bytes) pairs: zips are opened, any other file is an image.

    Hidden files and ``__MACOSX`` entries are skipped, as are files without an image-like
    suffix inside folders (READMEs); a lone upload of an unsupported type, or a zip without
    images among other uploads, gets a source whose ``read`` raises ImageError, so it shows up
    as an error row. Nothing but zips without images gives an empty list. Repeated names get
    ``#2``, ``#3`` appended so that no result overwrites another.
    """
    out: list[ImageSource] = []
    empty_zips: list[ImageSource] = []
    for name, data in items:
        parts = as_posix(name).parts
        if _is_hidden(parts):
            continue
        suffix = PurePosixPath(name).suffix.lower()
        if suffix == ".zip":
            found = list(_open_zip(io.BytesIO(data), name))
            out.extend(found)
            if not found:
                empty_zips.append(_no_images(name))
        elif suffix in IMAGE_SUFFIXES:
            out.append(ImageSource(name, lambda data=data: data))
        elif len(parts) == 1 or suffix in UNSUPPORTED_SUFFIXES:
            out.append(_unsupported(name))
    return unique_paths(out + empty_zips) if out else []


def unique_paths(sources: Iterable[ImageSource]) -> list[ImageSource]:
    """``sources`` with repeated paths renamed ``path#2``, ``path#3``, ... (order kept)."""
    seen: dict[str, int] = {}
    out = []
    for src in sources:
        n = seen.get(src.path, 0) + 1
        seen[src.path] = n
        out.append(src if n == 1 else ImageSource(f"{src.path}#{n}", src.read, src.name))
    return out


@functools.lru_cache(maxsize=4)
def _cached_zip(path: str, mtime_ns: int, size: int) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)  # keyed by mtime and size: a replaced zip is reopened


def open_source(key: str) -> ImageSource:
    """The source named by a result's ``path``: a file, or ``archive.zip!member`` (nested zips
    as ``a.zip!b.zip!member``). Raises FileNotFoundError if it no longer exists.
    """
    parts = key.split(ZIP_SEP)
    if len(parts) == 1 or Path(key).is_file():  # a "!" may be part of a file's name
        path = Path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{key} not found")
        return ImageSource(key, _file_reader(path))
    if not Path(parts[0]).is_file():
        raise FileNotFoundError(f"{parts[0]} not found")
    st = Path(parts[0]).stat()
    zf = _cached_zip(str(Path(parts[0]).resolve()), st.st_mtime_ns, st.st_size)
    try:
        for inner in parts[1:-1]:
            zf = zipfile.ZipFile(io.BytesIO(_read_member(zf, zf.getinfo(inner))))
        info = zf.getinfo(parts[-1])
    except (KeyError, zipfile.BadZipFile, ImageError):
        raise FileNotFoundError(f"{key} not found in its zip") from None
    return ImageSource(key, _member_reader(zf, info), file_name(parts[-1]))


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16-bit and float are scaled to 8 bit, alpha is laid on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0) if img.mode != "F" else 255.0 / max(hi, 1e-6)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB one


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (size, size, 3), bilinear, aspect ratio not kept (as the NIH copy)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def decode_image(data: bytes, *, size: int | None = None) -> np.ndarray:
    """Decode image bytes to RGB ``uint8`` of shape (H, W, 3), resized to (size, size) if given.

    Resizing does not keep the aspect ratio, as in the NIH 128x128 copy the model learnt from.
    Raises ImageError with a readable message for empty, corrupt, truncated, oversized or
    unsupported data.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"image is {w}x{h} px, above the {MAX_PIXELS:,} px limit")
            if size and img.format == "JPEG":
                img.draft("RGB", (size, size))  # decode JPEG at reduced scale: much faster
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                img = ImageOps.exif_transpose(img)  # as cameras and viewers show the cell
            rgb = _to_rgb(img)
            if size and rgb.size != (size, size):  # as resize_rgb, without two array copies
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or unsupported format)") from None
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def read_image(src: ImageSource, *, size: int | None = None) -> np.ndarray:
    """Read and decode one source; any failure (I/O, zip, decoding) is an ImageError."""
    try:
        data = src.read()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot read file: {exc}") from None
    return decode_image(data, size=size)


# ---------------------------------------------------------------------------------------------
# Labelled sets and splits
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    path: str
    case_id: str
    label: int  # index into CLASSES


def labelled_samples(inputs: Iterable[str | Path], *, follow_links: bool = False
                     ) -> tuple[list[Sample], dict[str, ImageSource]]:
    """Labelled images under ``inputs`` and a path -> source map to read them.

    Images outside a ``Parasitized``/``Uninfected`` folder are ignored; ``follow_links`` as in
    ``iter_sources`` (a link not followed is a source that fails to read, so training stops
    and names it). Raises DataError if no labelled image is found or only one class is present.
    """
    samples, sources = [], {}
    for src in iter_sources(inputs, follow_links=follow_links):
        label = label_from_path(src.path)
        if label is None:
            continue
        samples.append(Sample(src.path, case_id(src.name), CLASSES.index(label)))
        sources[src.path] = src
    if not samples:
        raise DataError(f"no images under a Parasitized/ or Uninfected/ folder in {list(inputs)}")
    if len({s.label for s in samples}) < 2:
        raise DataError("only one class found; training needs Parasitized and Uninfected images")
    return samples, sources


@dataclass(frozen=True)
class Split:
    """Which cases are in which part. No case is in two parts."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int

    def part_of(self, case: str) -> str:
        for name in ("train", "val", "test"):
            if case in getattr(self, name):
                return name
        raise KeyError(case)

    def to_json(self) -> dict:
        return {"seed": self.seed, "train": list(self.train), "val": list(self.val),
                "test": list(self.test)}

    @classmethod
    def from_json(cls, d: dict) -> Split:
        return cls(tuple(d["train"]), tuple(d["val"]), tuple(d["test"]), int(d["seed"]))


def split_by_case(samples: Sequence[Sample], *, val_frac: float = 0.15, test_frac: float = 0.15,
                  seed: int = 0) -> Split:
    """Seeded split of cases into train/val/test, stratified by case kind.

    A case's kind is "infected" if it has any Parasitized cell, else "healthy"; each kind is
    shuffled and cut in the same proportions so every part gets both kinds where possible.
    Raises DataError with fewer than 3 cases.
    """
    infected: dict[str, bool] = {}
    for s in samples:
        infected[s.case_id] = infected.get(s.case_id, False) or s.label == CLASSES.index("Parasitized")
    if len(infected) < 3:
        raise DataError(f"need at least 3 cases to split by case, found {len(infected)}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for kind in (True, False):
        cases = sorted(c for c, inf in infected.items() if inf == kind)
        rng.shuffle(cases)
        n_test = int(round(len(cases) * test_frac))
        n_val = int(round(len(cases) * val_frac))
        parts["test"] += cases[:n_test]
        parts["val"] += cases[n_test:n_test + n_val]
        parts["train"] += cases[n_test + n_val:]
    # tiny sets: make sure every part has at least one case
    for name in ("val", "test"):
        if not parts[name] and len(parts["train"]) > 1:
            parts[name].append(parts["train"].pop())
    return Split(*(tuple(sorted(parts[k])) for k in ("train", "val", "test")), seed=seed)


def load_array(sources: Sequence[ImageSource], *, size: int, workers: int | None = None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Decode and resize ``sources`` into one ``uint8`` array of shape (N, size, size, 3).

    Decodes in threads (PIL releases the GIL). Raises ImageError naming the file if one cannot
    be decoded: training and study data must be clean.
    """
    def one(src: ImageSource) -> np.ndarray:
        try:
            return read_image(src, size=size)
        except ImageError as exc:
            raise ImageError(f"{src.path}: {exc}") from None

    out = np.empty((len(sources), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for i, arr in enumerate(pool.map(one, sources)):
            out[i] = arr
            if progress:
                progress(1)
    return out


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only once the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
