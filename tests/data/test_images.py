"""Decoding images (core.data.images): formats, modes, bad bytes, the OpenCV path for plain
PNGs, decompression bombs and EXIF orientation."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from core.data import images
from core.data.images import MAX_PIXELS, ImageError, decode_image
from tests.helpers import encode as _encode


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP", "WEBP"])
def test_formats_decode_and_resize(fmt):
    img = Image.new("RGB", (150, 97), (200, 30, 90))
    out = decode_image(_encode(img, fmt), size=128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    assert abs(int(out[64, 64, 0]) - 200) < 8 and abs(int(out[64, 64, 1]) - 30) < 8


def test_modes_convert_to_rgb():
    grey = decode_image(_encode(Image.new("L", (20, 20), 77), "PNG"))
    assert grey.shape == (20, 20, 3) and (grey == 77).all()

    pal = Image.new("P", (20, 20))
    pal.putpalette([255, 0, 0] * 256)
    assert (decode_image(_encode(pal, "PNG"))[..., 0] == 255).all()

    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent: laid on white
    assert (decode_image(_encode(rgba, "PNG")) == 255).all()

    deep = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    assert (decode_image(_encode(deep, "PNG")) == 255).all()
    mid = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))
    assert abs(int(decode_image(_encode(mid, "PNG"))[0, 0, 0]) - 128) <= 1

    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red in CMYK
    rgb = decode_image(_encode(cmyk, "JPEG", quality=100))
    assert rgb[10, 10, 0] > 230 and rgb[10, 10, 1] < 30


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not a readable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt|not a readable"),
    ],
)
def test_bad_bytes_raise_readable_errors(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_truncated_png_is_an_error():
    data = _encode(Image.effect_noise((128, 128), 64).convert("RGB"), "PNG")
    with pytest.raises(ImageError, match="corrupt|truncated"):
        decode_image(data[: len(data) // 2])


def test_plain_pngs_take_opencv_with_pillows_pixels_and_errors(monkeypatch):
    rng = np.random.default_rng(0)
    cell = _encode(Image.fromarray(rng.integers(0, 256, (57, 83, 3), np.uint8)), "PNG")
    assert images._plain_png(cell)
    opencv = images._decode_plain_png
    taken = []
    monkeypatch.setattr(images, "_decode_plain_png", lambda data: taken.append(1) or opencv(data))
    fast = {size: decode_image(cell, size=size) for size in (None, 64)}
    assert len(taken) == 2  # OpenCV decoded both
    corrupt = cell[:60] + bytes([cell[60] ^ 0xFF]) + cell[61:]  # inside the pixel data
    assert images._plain_png(corrupt) and opencv(corrupt) is None
    with pytest.raises(ImageError, match="corrupt|truncated|broken"):
        decode_image(corrupt)  # Pillow's path says why
    monkeypatch.setattr(images, "_plain_png", lambda data: False)  # Pillow alone
    for size, got in fast.items():
        assert got.dtype == np.uint8 and np.array_equal(got, decode_image(cell, size=size))
    monkeypatch.undo()

    # what Pillow handles its own way is not plain: alpha on white, 16 bit, palettes, grey,
    # anything that turns the image (EXIF, a raw EXIF profile, XMP) or animates it
    def png_with(**kw) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG", **kw)
        return buf.getvalue()

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    raw_exif, xmp = PngInfo(), PngInfo()
    raw_exif.add_text("Raw profile type exif", "\nexif\n      0\n")
    xmp.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/>')
    deep_rgb = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint16))[1].tobytes()
    for other in (
        _encode(Image.new("RGBA", (8, 8)), "PNG"),
        _encode(Image.new("L", (8, 8)), "PNG"),
        _encode(Image.new("P", (8, 8)), "PNG"),
        _encode(Image.fromarray(np.zeros((8, 8), np.uint16)), "PNG"),
        deep_rgb,
        png_with(exif=exif),
        png_with(pnginfo=raw_exif),
        png_with(pnginfo=xmp),
        png_with(save_all=True, append_images=[Image.new("RGB", (8, 8), "red")]),  # APNG
        cell[:-12],  # no IEND: maybe cut short
    ):
        assert not images._plain_png(other)


@pytest.mark.parametrize("times", [1.2, 2.5])  # Pillow warns up to twice its limit, then refuses
def test_decompression_bomb_refused_before_decoding_at_one_limit(times):
    side = int((times * MAX_PIXELS) ** 0.5)
    bomb = _encode(Image.new("1", (side, side)), "PNG")  # tiny file, huge canvas
    assert len(bomb) < 400_000
    with pytest.raises(ImageError, match=f"above the {MAX_PIXELS:,} px limit") as info:
        decode_image(bomb)
    assert "80,000,000" not in str(info.value)


def test_the_readme_states_the_pixel_limit_of_the_code():
    from tests.helpers import ROOT

    assert f"above {MAX_PIXELS // 1_000_000} megapixels" in (ROOT / "README.md").read_text()


# --- 10. EXIF orientation (hostile input, issue 15) -----------------------------------------------


def test_exif_orientation_is_applied():
    pixels = np.zeros((60, 100, 3), np.uint8)
    pixels[:, :50] = (200, 30, 30)  # red left half, blue right half: rotation shows
    pixels[:, 50:] = (30, 30, 200)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    assert out.shape == (100, 60, 3)  # portrait, as a viewer shows it
    top, bottom = out[:40].reshape(-1, 3).mean(0), out[-40:].reshape(-1, 3).mean(0)
    assert top[0] > top[2] + 100 and bottom[2] > bottom[0] + 100  # red on top after the turn
    resized = decode_image(buf.getvalue(), size=32)  # the JPEG draft path too
    assert resized[:8].reshape(-1, 3).mean(0)[0] > resized[-8:].reshape(-1, 3).mean(0)[0] + 100
