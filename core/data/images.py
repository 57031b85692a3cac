"""Decoding cell images: bytes -> RGB ``uint8`` arrays, at the model's size when asked.

Every failure (empty, corrupt, truncated, oversized, unsupported) is an ImageError whose message
is meant for the user; callers turn it into an error row.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

# Refuse images above this many pixels before decoding: a cell crop is ~200x200; 40 Mpx is a
# whole slide photo already, and guards against decompression bombs.
MAX_PIXELS = 40_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, not a grey cell
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow only warns between MAX_IMAGE_PIXELS and twice that, and refuses above it naming twice the
# limit (80,000,000): one limit, MAX_PIXELS, refused before decoding with one message. Set once
# for the process: warnings.catch_warnings() is not thread-safe, and images decode in threads.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An input file that is not a usable image; the message is meant for the user."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16-bit and float are scaled to 8 bit, alpha is laid on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 0.0
        scale = (
            255.0 / (65535.0 if hi > 255 else 255.0) if img.mode != "F" else 255.0 / max(hi, 1e-6)
        )
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
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
# Chunks (or text-chunk keywords, stored uncompressed) that make Pillow's result differ from
# the pixel data as stored: an orientation (EXIF, ImageMagick's raw EXIF profile, XMP's
# tiff:Orientation) Pillow turns the image by, or an animation whose default image Pillow shows.
_PNG_PILLOW_ONLY = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp", b"acTL")


def _plain_png(data: bytes) -> bool:
    """An 8-bit RGB PNG, whole (it ends with its IEND chunk), within the pixel limit, with
    nothing that turns or animates it: what the NIH cells and most microscope exports are.
    Any other image, and any file that only looks like one, takes Pillow's path."""
    return (
        len(data) > 45
        and data[:8] == _PNG_SIGNATURE
        and data[12:16] == b"IHDR"
        and data[24:26] == b"\x08\x02"  # bit depth 8, colour type 2 (RGB)
        and int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big") <= MAX_PIXELS
        and data.endswith(_PNG_END)
        and not any(marker in data for marker in _PNG_PILLOW_ONLY)
    )


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """OpenCV's libpng for a :func:`_plain_png`: the same pixels as Pillow (PNG is lossless)
    in 0.5-0.8x its time (make bench), without holding the GIL; None where it fails, so that
    Pillow's path says why. libpng is laxer about ancillary chunks (it drops a text chunk with a
    bad checksum, which Pillow refuses) and writes its warnings and errors to stderr itself."""
    import cv2  # a dependency already (core.explain.heatmap); imported on first use

    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _too_large(size: str = "") -> str:
    return f"image {size}is above the {MAX_PIXELS:,} px limit (a cell crop is ~200x200 px)"


# What Pillow may find in a file, whatever its name says (MPO: a camera's JPEG with a preview)
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "TIFF", "BMP", "WEBP"})


def decode_image(data: bytes, *, size: int | None = None) -> np.ndarray:
    """Decode image bytes to RGB ``uint8`` of shape (H, W, 3), resized to (size, size) if given.

    Resizing does not keep the aspect ratio, as in the NIH 128x128 copy the model learnt from.
    Raises ImageError with a readable message for empty, corrupt, truncated, oversized or
    unsupported data.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if _plain_png(data) and (pixels := _decode_plain_png(data)) is not None:
        return pixels if not size else resize_rgb(pixels, size)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            img: Image.Image = opened
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(_too_large(f"{w}x{h} px "))
            if img.format not in ACCEPTED_FORMATS:  # sniffed from the bytes, not the name
                raise ImageError(
                    f"unsupported format {img.format} (read from the file's content, whatever "
                    f"its name); accepted: {', '.join(sorted(ACCEPTED_FORMATS - {'MPO'}))}"
                )
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":  # page 1 alone could hide a cell on page 2
                raise ImageError(
                    f"a {img.format} of {frames} pages or frames: only single images are "
                    "scored; save each page as its own file"
                )
            if size and img.format == "JPEG":
                img.draft("RGB", (size, size))  # decode JPEG at reduced scale: much faster
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                img = ImageOps.exif_transpose(img)  # as cameras and viewers show the cell
            rgb = _to_rgb(img)
            if size and rgb.size != (size, size):  # as resize_rgb, without two array copies
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(_too_large()) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or unsupported format)") from None
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageError(f"corrupt or truncated image: {exc}") from None
