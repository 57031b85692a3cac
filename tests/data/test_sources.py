"""Finding images (core.data.sources): files, folders, zips and uploads; unreadable folders,
FIFOs, links and lying zips (hostile input, issue 15); a source rebuilt from its record (as
Ray ships it) reads the same."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import struct
import tracemalloc
import zipfile

import pandas as pd
import pytest
from PIL import Image

from core.data.images import ImageError, decode_image
from core.data.sources import from_record, iter_sources, read_bytes, sources_from_uploads, to_record
from tests.helpers import encode as _encode
from tests.helpers import listed_sources as _sources
from tests.helpers import score_cli as _cli

# Names added by issue 15 are imported inside the tests that use them, so that this file also
# runs against the code before the fix (each test then fails on its own assertion).


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


def test_zip_root_members_and_corrupt_members(cells_dir, tiny_model, tmp_path):
    files = sorted(cells_dir.rglob("*.png"))[:3]
    path = tmp_path / "flat.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, f.name)  # at the zip's root, no folders
    data = bytearray(path.read_bytes())
    # flip a byte inside the last member's compressed data: its CRC check must fail
    with zipfile.ZipFile(path) as z:
        info = z.infolist()[-1]
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "r.csv"
    rc = _cli(
        path,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
    )
    df = pd.read_csv(out)
    assert rc == 1 and len(df) == 3
    assert list(df["case_id"]) == [re.match(r"C\d+", f.name).group() for f in files]
    assert df["error"].notna().sum() == 1 and df["prob_parasitized"].notna().sum() == 2


def test_a_source_rebuilt_from_its_record_reads_the_same_bytes_or_error(mixed_inputs):
    sources = _sources(mixed_inputs)
    assert any("#2" in s.path for s in sources)  # slides.zip listed twice: renamed
    assert any(s.path.endswith("inner.zip!Uninfected/" + s.name) for s in sources)
    for src in sources:
        record = to_record(src)
        assert record["data"] is None  # files and members are read where they are scored
        again = from_record(record)
        assert (again.path, again.name) == (src.path, src.name)
        try:
            expected: bytes | str = read_bytes(src)
        except ImageError as exc:
            expected = str(exc)
        try:
            got: bytes | str = read_bytes(again)
        except ImageError as exc:
            got = str(exc)
        assert got == expected, src.path


# --- 2. unreadable folders and FIFOs (hostile input, issue 15) ------------------------------------


def _cells_in_folders(cells_dir, root, folders=("a", "b", "c"), per=8):
    files = sorted(cells_dir.rglob("*.png"))
    for i, name in enumerate(folders):
        (root / name).mkdir(parents=True)
        for f in files[i * per : (i + 1) * per]:
            (root / name / f.name).write_bytes(f.read_bytes())
    return root


def test_an_unreadable_subfolder_is_an_error_row_not_silence(
    cells_dir, tiny_model, tmp_path, monkeypatch
):
    root = _cells_in_folders(cells_dir, tmp_path / "cells")
    blocked = root / "b"
    real_scandir = os.scandir

    def scandir(path="."):  # what chmod 000 does for a non-root user (root reads anything)
        if os.path.abspath(path) == str(blocked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "r.csv"
    rc = _cli(
        root,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
    )
    df = pd.read_csv(out)
    assert rc == 1
    assert df["prob_parasitized"].notna().sum() == 16
    [row] = df[df["error"].notna()].itertuples()
    assert row.path == str(blocked) and "cannot read this folder" in row.error


def test_an_unreadable_subfolder_for_real(cells_dir, tiny_model, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads folders whatever their mode; the scandir test above covers it")
    root = _cells_in_folders(cells_dir, tmp_path / "cells")
    (root / "b").chmod(0)
    try:
        rc = _cli(
            root,
            "--weights",
            tiny_model,
            "--out",
            tmp_path / "r.csv",
            "--store",
            tmp_path / "s.sqlite",
            "--no-progress",
        )
    finally:
        (root / "b").chmod(0o755)
    df = pd.read_csv(tmp_path / "r.csv")
    assert rc == 1 and df["error"].notna().sum() == 1


def test_a_fifo_as_input_or_in_a_folder_is_an_error_row(cells_dir, tiny_model, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    out = tmp_path / "r.csv"
    rc = _cli(
        fifo,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
    )
    assert rc == 2  # nothing scored
    df = pd.read_csv(out)
    assert len(df) == 1 and "not a regular file" in df["error"][0]

    root = _cells_in_folders(cells_dir, tmp_path / "cells", folders=("a",), per=3)
    os.mkfifo(root / "a" / "stream.png")  # would block a reader forever
    rc = _cli(
        root,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
    )
    df = pd.read_csv(out)
    assert rc == 1 and len(df) == 4
    assert "not a regular file" in df.set_index("path").loc[str(root / "a" / "stream.png"), "error"]


# --- 11. links out of the input folder ------------------------------------------------------------


def _linked_folder(cells_dir, tmp_path):
    store = _cells_in_folders(cells_dir, tmp_path / "annex", folders=("objects",), per=6)
    root = tmp_path / "data"
    root.mkdir()
    for f in sorted((store / "objects").iterdir()):
        (root / f.name).symlink_to(f)  # how DVC, git-annex and many pipelines keep data
    return root


def test_a_folder_of_links_is_error_rows_that_say_so_and_exits_non_zero(
    cells_dir, tiny_model, tmp_path
):
    root = _linked_folder(cells_dir, tmp_path)
    out = tmp_path / "r.csv"
    rc = _cli(
        root,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
    )
    assert rc != 0
    df = pd.read_csv(out)
    assert len(df) == 6 and df["prob_parasitized"].isna().all()
    assert df["error"].str.contains("outside the input folder").all()
    assert df["error"].str.contains("--follow-links").all()


def test_follow_links_scores_what_the_links_point_to(cells_dir, tiny_model, tmp_path):
    root = _linked_folder(cells_dir, tmp_path)
    (root / "more").symlink_to(tmp_path / "annex", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # walked once, not forever
    out = tmp_path / "r.csv"
    rc = _cli(
        root,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--store",
        tmp_path / "s.sqlite",
        "--no-progress",
        "--follow-links",
    )
    df = pd.read_csv(out)
    assert rc == 0 and len(df) == 12 and df["error"].isna().all()


def test_training_data_behind_links_stops_training_or_is_followed_on_request(cells_dir, tmp_path):
    from core import cli
    from core.data.sources import load_array
    from core.data.splits import labelled_samples

    cache = tmp_path / "cache"
    shutil.copytree(cells_dir, cache)
    root = tmp_path / "data"
    for f in sorted(cache.rglob("*.png")):
        link = root / f.relative_to(cache)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    samples, sources = labelled_samples([root])
    with pytest.raises(ImageError, match="not followed.*--follow-links"):
        load_array([sources[s.path] for s in samples], size=32)
    samples, sources = labelled_samples([root], follow_links=True)
    assert (
        load_array([sources[s.path] for s in samples], size=32).shape[0]
        == len(samples)
        == len(list(cells_dir.rglob("*.png")))
    )
    assert cli.parse(["train", "--data", "d", "--out", "o", "--follow-links"]).follow_links


# --- 5. zip members whose size header lies --------------------------------------------------------


def _lying_zip(path, *, real_mb=100, declared=20_000):
    """A zip of one member that inflates to ``real_mb`` MiB while its headers say ``declared``
    bytes."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z,
        z.open("cells/C1P1_cell_1.png", "w") as f,
    ):
        block = b"\0" * 2**20
        for _ in range(real_mb):
            f.write(block)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 22, declared)  # local header: uncompressed size
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, declared)  # central directory: the one read
    path.write_bytes(bytes(data))
    return path


def test_a_lying_zip_member_is_inflated_in_bounded_memory(tmp_path):
    [src] = iter_sources([_lying_zip(tmp_path / "bomb.zip")])
    tracemalloc.start()
    try:
        with pytest.raises(ImageError):
            src.read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"reading one member peaked at {peak / 2**20:.0f} MiB"


# --- nothing silently skipped or reinterpreted (issue 28) -----------------------------------------


def test_jfif_jpe_and_extensionless_images_get_a_row_and_text_files_none(tmp_path, cells_dir):
    cell = Image.open(next(cells_dir.rglob("*.png"))).convert("RGB")
    jpeg = _encode(cell, "JPEG")
    for name in ("a.jfif", "b.jpe", "c_no_suffix", "d.dat"):
        (tmp_path / name).write_bytes(jpeg)
    (tmp_path / "e_png_no_suffix").write_bytes(_encode(cell, "PNG"))
    (tmp_path / "README").write_text("notes about the slide")
    rows = {os.path.basename(s.path): s for s in iter_sources([tmp_path])}
    assert set(rows) == {"a.jfif", "b.jpe", "c_no_suffix", "d.dat", "e_png_no_suffix"}
    for src in rows.values():
        assert decode_image(read_bytes(src), size=128).shape == (128, 128, 3)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cells/x_no_suffix", jpeg)
        zf.writestr("cells/notes.txt", "text")
    assert [s.name for s in sources_from_uploads([("z.zip", buf.getvalue())])] == ["x_no_suffix"]
    assert [s.name for s in sources_from_uploads([("y", jpeg), ("f/n.txt", b"x")])] == ["y"]


def test_the_format_is_read_from_the_content_not_the_name(tmp_path, cells_dir):
    cell = Image.open(next(cells_dir.rglob("*.png"))).convert("RGB")
    as_png = tmp_path / "gif_named.png"
    as_png.write_bytes(_encode(cell, "GIF"))
    (tmp_path / "jpeg_named.png").write_bytes(_encode(cell, "JPEG"))
    (tmp_path / "gif_no_suffix").write_bytes(_encode(cell, "GIF"))
    by_name = {os.path.basename(s.path): s for s in iter_sources([tmp_path])}
    assert set(by_name) == {"gif_named.png", "jpeg_named.png", "gif_no_suffix"}
    for name in ("gif_named.png", "gif_no_suffix"):
        with pytest.raises(ImageError, match="unsupported format GIF"):
            decode_image(read_bytes(by_name[name]))
    assert decode_image(read_bytes(by_name["jpeg_named.png"])).shape[-1] == 3  # by content


def test_a_multi_page_tiff_is_an_explicit_error_not_its_first_page(cells_dir):
    blank = Image.new("RGB", (64, 64))
    cell = Image.open(next(cells_dir.rglob("*.png"))).convert("RGB")
    tiff = _encode(blank, "TIFF", save_all=True, append_images=[cell])
    with pytest.raises(ImageError, match="of 2 pages"):
        decode_image(tiff)
    assert decode_image(_encode(cell, "TIFF")).shape[-1] == 3  # one page: scored


def test_a_backslash_in_a_linux_file_name_is_part_of_the_name(tmp_path, cells_dir):
    from core.schema.metrics import group_of

    folder = tmp_path / "ward 3"
    folder.mkdir()
    name = "C96\\slide\\cell.png"  # one file whose name holds backslashes
    shutil.copy(next(cells_dir.rglob("*.png")), folder / name)
    [src] = iter_sources([folder])
    assert src.name == name and src.path == str(folder / name)
    assert group_of(src.path, "folder", "C96") == str(folder)


def test_uploads_kept_on_disk_are_read_from_there_under_their_upload_names(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("Parasitized/C3_x.png", _png())
    (tmp_path / "tmp1").write_bytes(buf.getvalue())
    (tmp_path / "tmp2").write_bytes(_png())
    (tmp_path / "tmp3").write_bytes(b"hello")
    items = [("b.zip", tmp_path / "tmp1"), ("dir/cell", tmp_path / "tmp2")]
    sources = sources_from_uploads([*items, ("dir/notes.txt", tmp_path / "tmp3")])
    assert [s.path for s in sources] == ["b.zip!Parasitized/C3_x.png", "dir/cell"]
    assert [decode_image(s.read()).shape for s in sources] == [(16, 16, 3)] * 2
    in_memory = sources_from_uploads([(n, p.read_bytes()) for n, p in items])
    assert [s.read() for s in in_memory] == [s.read() for s in sources]
