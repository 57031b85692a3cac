from __future__ import annotations

import io
import os
import zipfile

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from core.data import images
from core.data.images import MAX_PIXELS, ImageError, decode_image
from core.data.sources import iter_sources, sources_from_uploads
from core.data.splits import DataError, labelled_samples, split_by_case
from core.schema.labels import case_id, label_from_path


@pytest.mark.parametrize(
    "name, expected",
    [
        ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "C100"),
        ("C68P29N_ThinF_IMG_20150819_133236_cell_1.png", "C68"),
        ("C51AP12thinF_IMG_20150724_152006_cell_2.png", "C51"),
        ("C39P4thinF_original_IMG_20150622_105102_cell_9.png", "C39"),
        ("C1_thinF_IMG_20150604_104722_cell_15.png", "C1"),
        ("C208ThinF_IMG_20151112_143210_cell_3.png", "C208"),
        ("C59P20thinF_IMG_20150803_112802_cell_4.png", "C59"),
        ("C132P93ThinF_IMG_20151004_151945_cell_1.png", "C132"),
        ("C6NThinF_IMG_20150609_122233_cell_8.png", "C6"),
        ("C80P41ThinF_IMG_20150817_110520_cell_202.png", "C80"),
        ("C33P1thinF_IMG_20150619_114756a_cell_179.png", "C33"),
        ("C182P143NThinF_IMG_20151201_171950_cell_97.png", "C182"),
        ("C97P58ThinF_IMG_20150917_145555_cell_52.png", "C97"),
        ("C117P78ThinF_IMG_20150930_214511_cell_13.png", "C117"),
        ("C038thin_Original_Motic_cell_1.png", "C38"),
        ("c12p3thin_OriginalOlympusCX41_x.png", "C12"),
        ("cell_images/Parasitized/C100P61ThinF_x.png", "C100"),
        ("zip.zip!cell_images/Uninfected/C5P1_x.png", "C5"),
    ],
)
def test_case_id_parses_every_variant(name, expected):
    assert case_id(name) == expected


def test_unparsable_names_get_their_own_group():
    a, b = case_id("cell_1.png"), case_id("folder/IMG_0002.png")
    assert a.startswith("?") and b.startswith("?") and a != b
    assert not a.startswith("C")


def test_label_from_any_depth_case_insensitive():
    assert label_from_path("a/b/PARASITIZED/x.png") == "Parasitized"
    assert label_from_path("z.zip!cell_images/uninfected/x.png") == "Uninfected"
    assert label_from_path("a/b/x.png") is None
    assert label_from_path("Parasitized.png") is None


def test_fixture_cells_are_labelled_and_split_by_case(cells_dir):
    samples, sources = labelled_samples([cells_dir])
    assert len(samples) >= 40 and set(sources) == {s.path for s in samples}
    assert {s.label for s in samples} == {0, 1}
    split = split_by_case(samples, seed=3)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert all(parts)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == {s.case_id for s in samples}
    assert split_by_case(samples, seed=3) == split  # seeded


def test_split_keeps_cases_whole_on_a_larger_synthetic_set():
    from core.data.splits import Sample

    samples = [
        Sample(f"C{c}_{i}.png", f"C{c}", (c + i) % 2 if c < 30 else 1)
        for c in range(40)
        for i in range(10)
    ]
    split = split_by_case(samples, seed=0)
    assert len(split.train) + len(split.val) + len(split.test) == 40
    assert len(set(split.train) | set(split.val) | set(split.test)) == 40
    # both kinds of case (infected / healthy) reach the test split
    assert any(int(c[1:]) >= 30 for c in split.test) and any(int(c[1:]) < 30 for c in split.test)


def test_one_class_is_refused(tmp_path):
    (tmp_path / "Uninfected").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "Uninfected" / "C1_a.png")
    with pytest.raises(DataError, match="one class"):
        labelled_samples([tmp_path])


# --- decoding ---------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


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


def test_decompression_bomb_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 100
    bomb = _encode(Image.new("1", (side, side)), "PNG")  # tiny file, huge canvas
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="limit|too large"):
        decode_image(bomb)


# --- finding files ----------------------------------------------------------------------------


def _png() -> bytes:
    return _encode(Image.new("RGB", (16, 16), (9, 9, 9)), "PNG")


def test_zip_members_are_safe_and_sensible(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("Uninfected/C2_inner.png", _png())
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("cell_images/Parasitized/C1_a.png", _png())
        z.writestr("cell_images/Parasitized/sub/C1_b.PNG", _png())
        z.writestr("../../evil.png", _png())
        z.writestr("/abs/evil.png", _png())
        z.writestr("__MACOSX/cell_images/._C1_a.png", b"junk")
        z.writestr("cell_images/.hidden.png", _png())
        z.writestr("notes.txt", b"hello")
        z.writestr("anim.gif", b"GIF89a")
        z.writestr("nested.zip", inner.getvalue())
    before = set(os.listdir(tmp_path.parent))
    paths = [s.path for s in iter_sources([path])]
    assert set(os.listdir(tmp_path.parent)) == before  # nothing extracted anywhere
    names = [p.split("!", 1)[1] for p in paths]
    assert "cell_images/Parasitized/C1_a.png" in names
    assert "cell_images/Parasitized/sub/C1_b.PNG" in names
    assert "nested.zip!Uninfected/C2_inner.png" in names
    assert "anim.gif" in names  # an error row, not silently dropped
    assert not any(
        "evil" in n or "MACOSX" in n or "hidden" in n or n.endswith(".txt") for n in names
    )
    by_name = {p.split("!", 1)[1]: s for p, s in zip(paths, iter_sources([path]))}
    with pytest.raises(ImageError, match="unsupported format .gif"):
        by_name["anim.gif"].read()


def test_symlinks_out_of_the_input_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png())
    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.png").write_bytes(_png())
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    sources = list(iter_sources([root]))
    assert [s.path for s in sources] == [str(root / p) for p in ("link.png", "linkdir", "ok.png")]
    for link in sources[:2]:  # each link is an error row that says so, never read
        with pytest.raises(ImageError, match="outside the input folder.*--follow-links"):
            link.read()


def test_missing_input_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_sources([tmp_path / "nope"]))


def test_uploads_expand_zips_and_flag_other_files():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("Parasitized/C3_x.png", _png())
    sources = sources_from_uploads(
        [
            ("a.png", _png()),
            ("b.zip", buf.getvalue()),
            ("c.txt", b"x"),
            ("d.zip", b"not a zip"),
            ("dir/.DS_Store", b"junk"),
            ("dir/readme.txt", b"hi"),
            ("a.png", _png()),
        ]
    )
    assert [s.path for s in sources] == [
        "a.png",
        "b.zip!Parasitized/C3_x.png",
        "c.txt",
        "d.zip",
        "a.png#2",
    ]
    assert decode_image(sources[1].read()).shape == (16, 16, 3)
    for bad in sources[2:4]:
        with pytest.raises(ImageError):
            bad.read()


def test_a_zip_without_images_is_an_error_row_not_lost(tmp_path):
    def zip_of(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
        return buf.getvalue()

    empty, text = zip_of({}), zip_of({"notes.txt": b"hi"})
    outer = zip_of({"inner.zip": empty, "C1_a.png": _png()})
    sources = sources_from_uploads([("a.png", _png()), ("text.zip", text), ("outer.zip", outer)])
    assert [s.path for s in sources] == [
        "a.png",
        "outer.zip!C1_a.png",
        "outer.zip!inner.zip",
        "text.zip",
    ]
    for bad in sources[2:]:
        with pytest.raises(ImageError, match="no images in this zip"):
            bad.read()
    # an upload of nothing but such zips has no source at all: the page says so instead
    assert sources_from_uploads([("empty.zip", empty), ("text.zip", text)]) == []
    deep = zip_of({"l1.zip": zip_of({"l2.zip": zip_of({"C1_a.png": _png()})})})
    [source] = sources_from_uploads([("deep.zip", deep)])
    with pytest.raises(ImageError, match="only one level of nesting"):
        source.read()
    (tmp_path / "empty.zip").write_bytes(empty)
    [source] = iter_sources([tmp_path / "empty.zip"])
    with pytest.raises(ImageError, match="no images in this zip"):
        source.read()
