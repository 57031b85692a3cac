"""Finding cell images: files, folders (recursive) and ``.zip`` archives (nested too), or
uploaded (name, bytes) pairs, as ``ImageSource``s read on demand.

What cannot be read is never skipped silently: it becomes a source whose ``read`` raises
ImageError, so it shows up as an error row beside the images that were scored.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from core.data.images import ImageError, decode_image
from core.schema.files import cpu_count
from core.schema.labels import ZIP_SEP, as_posix, file_name

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".tif", ".tiff", ".bmp", ".webp"}
)
# The first bytes of image files: a file with another suffix (or none) that starts so is an
# image all the same, scored by its content (core.data.images reads the format from the bytes)
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF8", b"RIFF")
# Image files we recognise but do not accept: they get an error row instead of being skipped.
UNSUPPORTED_SUFFIXES = frozenset(
    {".gif", ".heic", ".heif", ".svg", ".jp2", ".ico", ".psd", ".dng", ".raw", ".avif"}
)
MAX_MEMBER_BYTES = 64 * 2**20  # a cell image is ~15 kB; a nested zip is read into memory
# One uploaded file: its name (a folder upload's with its folder) and its bytes, or the file on
# this machine that they were written to (a server keeps big uploads on disk, not in memory).
Upload = tuple[str, bytes | Path]


@dataclass(frozen=True)
class ImageSource:
    """One image somewhere: a file on disk or a member of a zip. ``path`` is its unique key
    (``archive.zip!member`` for zip members); ``name`` is the file or member name alone, which
    case ids are parsed from (a ``!`` in a file name is then no separator)."""

    path: str
    read: Callable[[], bytes]
    name: str = ""  # empty: the last component of path
    # Where another process can read it again (``reader``): the file, then the zip members
    # leading to it. Empty for what only this process holds: uploads and error sources.
    origin: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", file_name(self.path))


def _is_hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not re.match(r"^[A-Za-z]:", name)


def looks_like_image(head: bytes) -> bool:
    """Whether a file's first bytes (at least 12) are those of an image format (GIF too: it is
    then refused by name, not skipped)."""
    return head.startswith(_MAGIC) and (not head.startswith(b"RIFF") or head[8:12] == b"WEBP")


def _file_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(12)
    except OSError:
        return b""


def _member_head(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with zf.open(info) as f:
            return f.read(12)
    except Exception:  # a corrupt member is read (and reported) only if it is an image
        return b""


def _error_source(path: str, message: str, name: str = "") -> ImageSource:
    def read() -> bytes:
        raise ImageError(message)

    return ImageSource(path, read, name)


def _unsupported(path: str, name: str = "") -> ImageSource:
    return _error_source(
        path,
        f"unsupported format {PurePosixPath(path).suffix.lower()}; "
        f"accepted: {', '.join(sorted(IMAGE_SUFFIXES))}",
        name,
    )


def _open_zip(
    data: Path | io.BytesIO,
    path: str,
    *,
    depth: int = 0,
    name: str = "",
    origin: tuple[str, ...] = (),
) -> Iterator[ImageSource]:
    try:
        zf = zipfile.ZipFile(data)
    except Exception as exc:  # BadZipFile, OSError, bad name encodings, ...: one error row
        yield _error_source(path, f"not a readable zip archive: {exc}", name)
        return
    yield from _zip_sources(zf, path, depth=depth, origin=origin)


def _zip_or_note(
    data: Path | io.BytesIO,
    path: str,
    *,
    depth: int = 0,
    name: str = "",
    origin: tuple[str, ...] = (),
) -> Iterator[ImageSource]:
    """The zip's sources, or one error source saying it holds none (so it is not lost).
    ``origin``: the zip's own (ImageSource.origin), () for one only this process holds."""
    empty = True
    for source in _open_zip(data, path, depth=depth, name=name, origin=origin):
        empty = False
        yield source
    if empty:
        yield _no_images(path, name)


def _no_images(path: str, name: str = "") -> ImageSource:
    return _error_source(
        path, f"no images in this zip (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})", name
    )


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
                    raise ImageError(
                        f"zip member inflates to more than "
                        f"{MAX_MEMBER_BYTES / 2**20:.0f} MiB; refusing it"
                    )
    except ImageError:
        raise
    except Exception as exc:  # bad CRC, corrupt deflate stream, encryption, a lying header
        raise ImageError(f"cannot read zip member: {exc}") from None
    return bytes(out)


def _zip_sources(
    zf: zipfile.ZipFile, prefix: str, *, depth: int = 0, origin: tuple[str, ...] = ()
) -> Iterator[ImageSource]:
    """Members of an open zip, sorted. Nested zips are opened one level down at most."""
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        name = info.filename.replace("\\", "/")  # Windows tools' separators; "/" by the format
        if info.is_dir() or not _safe_member(name):
            continue
        if _is_hidden(PurePosixPath(name).parts):
            continue
        path = f"{prefix}{ZIP_SEP}{name}"
        member = file_name(name)
        at = (*origin, info.filename) if origin else ()
        suffix = PurePosixPath(name).suffix.lower()
        if suffix == ".zip" and depth < 1:
            try:
                inner = io.BytesIO(_read_member(zf, info))
            except ImageError as exc:
                yield _error_source(path, str(exc), member)
                continue
            yield from _zip_or_note(inner, path, depth=depth + 1, name=member, origin=at)
        elif suffix == ".zip":
            yield _error_source(
                path, "a zip inside a zip inside a zip: only one level of nesting is opened", member
            )
        elif suffix in IMAGE_SUFFIXES or (
            suffix not in UNSUPPORTED_SUFFIXES and looks_like_image(_member_head(zf, info))
        ):
            yield ImageSource(path, _member_reader(zf, info), member, at)
        elif suffix in UNSUPPORTED_SUFFIXES:
            yield _unsupported(path, member)


def _member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    return lambda: _read_member(zf, info)


def _bytes_reader(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _file_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        size = path.stat().st_size
        if size > MAX_MEMBER_BYTES:
            raise ImageError(f"file is {size / 2**20:.0f} MiB; not a cell image")
        return path.read_bytes()

    return read


_FOLLOW_HINT = "not followed (use --follow-links to read what it points to)"


def _scan(
    folder: Path, top: Path, *, follow_links: bool, seen: set[Path]
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
            yield (
                path,
                f"symbolic link to {kind} outside the input folder ({target}): {_FOLLOW_HINT}",
            )
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
            yield from _zip_or_note(path, str(path), origin=(str(path),))
        elif suffix in IMAGE_SUFFIXES or (
            suffix not in UNSUPPORTED_SUFFIXES and looks_like_image(_file_head(path))
        ):
            found = True
            yield ImageSource(str(path), _file_reader(path), origin=(str(path),))
        elif suffix in UNSUPPORTED_SUFFIXES:
            found = True
            yield _unsupported(str(path))
    if not found:
        yield _error_source(
            str(root),
            f"no images in this folder (accepted: {', '.join(sorted(IMAGE_SUFFIXES))}, and zips)",
        )


def iter_sources(
    inputs: Iterable[str | Path], *, follow_links: bool = False
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
            yield _error_source(
                str(root), "not a regular file or folder (a FIFO, socket or device); not read"
            )
        elif root.suffix.lower() == ".zip":
            yield from _zip_or_note(root, str(root), origin=(str(root),))
        else:
            yield ImageSource(str(root), _file_reader(root), origin=(str(root),))


def sources_from_uploads(items: Iterable[Upload]) -> list[ImageSource]:
    """Sources for uploads (:data:`Upload`: name, and bytes or the file holding them): zips
    are opened, any other file is an image. A file is read when its source is, so an upload
    kept on disk is never held in memory whole; the sources are named by the upload's name.

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
            found = list(_open_zip(data if isinstance(data, Path) else io.BytesIO(data), name))
            out.extend(found)
            if not found:
                empty_zips.append(_no_images(name))
        elif suffix in IMAGE_SUFFIXES or (
            suffix not in UNSUPPORTED_SUFFIXES
            and looks_like_image(_file_head(data) if isinstance(data, Path) else data[:12])
        ):
            read = _file_reader(data) if isinstance(data, Path) else _bytes_reader(data)
            out.append(ImageSource(name, read))
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
        out.append(src if n == 1 else dataclasses.replace(src, path=f"{src.path}#{n}"))
    return out


@functools.lru_cache(maxsize=4)
def _cached_zip(path: str, mtime_ns: int, size: int) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)  # keyed by mtime and size: a replaced zip is reopened


@functools.lru_cache(maxsize=4)
def _nested_zip(outer: zipfile.ZipFile, members: tuple[str, ...]) -> zipfile.ZipFile:
    """The zip reached from ``outer`` through ``members`` (zips inside it), inflated once."""
    zf = outer
    for inner in members:
        zf = zipfile.ZipFile(io.BytesIO(_read_member(zf, zf.getinfo(inner))))
    return zf


def _zip_at(chain: Sequence[str]) -> zipfile.ZipFile:
    """The zip file ``chain[0]`` on disk, or a zip inside it (``chain[1:]``), kept open."""
    path = Path(chain[0])
    st = path.stat()
    zf = _cached_zip(str(path.resolve()), st.st_mtime_ns, st.st_size)
    return _nested_zip(zf, tuple(chain[1:])) if len(chain) > 1 else zf


def reader(origin: Sequence[str]) -> Callable[[], bytes]:
    """Reads the source at ``origin`` (``ImageSource.origin``) again, in this process or in
    another one that sees the same files (a cluster's workers): the file, or the member reached
    through the zips named, with the same limits as when it was found. Opening happens on the
    call, so a file gone since becomes an ImageError from ``core.data.sources.read_bytes``."""
    if not origin:
        raise ValueError("this source has no origin (an upload or an error): read it where it is")

    def read() -> bytes:
        if len(origin) == 1:
            return _file_reader(Path(origin[0]))()
        zf = _zip_at(origin[:-1])
        return _read_member(zf, zf.getinfo(origin[-1]))

    return read


def to_record(src: ImageSource) -> dict:
    """The source as plain values (``path``, ``name``, ``origin``, ``data``, ``error``) that
    another process rebuilds it from (:func:`from_record`). A source with an origin is read
    there; one without (an upload in memory, an error source) is read here: ``data`` holds its
    bytes, or ``error`` why it cannot be read."""
    record: dict[str, object] = {"path": src.path, "name": src.name, "origin": list(src.origin)}
    record["data"] = record["error"] = None
    if not src.origin:
        try:
            record["data"] = read_bytes(src)
        except ImageError as exc:
            record["error"] = str(exc)
    return record


def from_record(record: Mapping) -> ImageSource:
    """The source :func:`to_record` described; it reads its file or zip member on demand."""
    path, name, origin = record["path"], record["name"], tuple(record["origin"] or ())
    if origin:
        return ImageSource(path, reader(origin), name, origin)
    if record["error"] is not None:
        return _error_source(path, record["error"], name)
    return ImageSource(path, _bytes_reader(record["data"]), name)


def open_source(key: str) -> ImageSource:
    """The source named by a result's ``path``: a file, or ``archive.zip!member`` (nested zips
    as ``a.zip!b.zip!member``). Raises FileNotFoundError if it no longer exists.
    """
    parts = key.split(ZIP_SEP)
    if len(parts) == 1 or Path(key).is_file():  # a "!" may be part of a file's name
        path = Path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{key} not found")
        return ImageSource(key, _file_reader(path), origin=(key,))
    if not Path(parts[0]).is_file():
        raise FileNotFoundError(f"{parts[0]} not found")
    try:
        zf = _zip_at(parts[:-1])
        info = zf.getinfo(parts[-1])
    except (KeyError, zipfile.BadZipFile, ImageError):
        raise FileNotFoundError(f"{key} not found in its zip") from None
    return ImageSource(key, _member_reader(zf, info), file_name(parts[-1]), tuple(parts))


def read_bytes(src: ImageSource) -> bytes:
    """The bytes of one source; any failure (I/O, zip) is an ImageError."""
    try:
        return src.read()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot read file: {exc}") from None


def read_image(src: ImageSource, *, size: int | None = None) -> np.ndarray:
    """Read and decode one source; any failure (I/O, zip, decoding) is an ImageError."""
    return decode_image(read_bytes(src), size=size)


def load_array(
    sources: Sequence[ImageSource],
    *,
    size: int,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Decode and resize ``sources`` into one ``uint8`` array of shape (N, size, size, 3).

    Decodes in threads (Pillow and OpenCV release the GIL). Raises ImageError naming the file
    if one cannot be decoded: training and study data must be clean.
    """

    def one(src: ImageSource) -> np.ndarray:
        try:
            return read_image(src, size=size)
        except ImageError as exc:
            raise ImageError(f"{src.path}: {exc}") from None

    out = np.empty((len(sources), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers or cpu_count()) as pool:
        for i, arr in enumerate(pool.map(one, sources)):
            out[i] = arr
            if progress:
                progress(1)
    return out
