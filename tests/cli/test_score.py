from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import core.inference.engines
import core.inference.pipeline
from core import cli
from core.data.images import decode_image
from core.data.sources import iter_sources
from core.inference.store import ResultStore
from core.schema.results import RESULT_COLUMNS


def _cli(*argv) -> int:
    return cli.main(["score", *(str(a) for a in argv)])


def test_cli_writes_one_row_per_image_with_the_columns(cells_dir, tiny_model, tmp_path):
    out, summary = tmp_path / "r.csv", tmp_path / "s.csv"
    rc = _cli(
        cells_dir,
        "--weights",
        tiny_model,
        "--out",
        out,
        "--summary",
        summary,
        "--store",
        tmp_path / "st.sqlite",
        "--no-progress",
    )
    assert rc == 0
    df = pd.read_csv(out)
    assert list(df.columns) == [*RESULT_COLUMNS, "review"]
    assert (df["quality"] == "ok").all()  # real cells pass the gate (image checks here)
    assert len(df) == len(list(cells_dir.rglob("*.png")))
    assert df["prob_parasitized"].between(0, 1).all() and df["error"].isna().all()
    assert set(df["label"]) == {"Parasitized", "Uninfected"}
    assert set(df["prediction"]) <= {"Parasitized", "Uninfected"}
    assert (df["case_id"].str.match(r"^C\d+$")).all()
    s = pd.read_csv(summary)
    assert set(s["group"]) == set(df["case_id"]) and s["scored"].sum() == len(df)
    assert {"parasitemia", "ci_low", "ci_high", "mean_prob", "likely_infected"} <= set(s.columns)


def test_onnx_and_torch_agree_within_1e4(cells_dir, tiny_model):
    images = np.stack([decode_image(s.read(), size=128) for s in iter_sources([cells_dir])])
    onnx = core.inference.engines.load_engine(tiny_model, "onnx")(images)
    torch_ = core.inference.engines.load_engine(tiny_model, "torch")(images)
    assert onnx.shape == torch_.shape == (len(images),)
    assert np.abs(onnx - torch_).max() < 1e-4


def _bad_folder(cells_dir, root):
    good = sorted(cells_dir.rglob("*.png"))[:10]
    for i, f in enumerate(good):
        shutil.copy(f, root / f"{i}_{f.name}")
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("I am not an image")
    data = good[0].read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "anim.gif").write_bytes(b"GIF89a....")
    buf = io.BytesIO()
    Image.new("L", (300, 200), 128).save(buf, "JPEG")
    (root / "grey_big.jpg").write_bytes(buf.getvalue())
    (root / "a").mkdir()
    (root / "b").mkdir()
    # the same name in two folders, other bytes than any file above (same bytes: a duplicate)
    more = sorted(cells_dir.rglob("*.png"))[10:12]
    shutil.copy(more[0], root / "a" / "cell_1.png")
    shutil.copy(more[1], root / "b" / "cell_1.png")
    return 10 + 1 + 2  # good files that must be scored


def test_bad_files_are_error_rows_and_everything_else_is_scored(cells_dir, tiny_model, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    n_good = _bad_folder(cells_dir, root)
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
        "--batch-size",
        "4",
    )
    assert rc == 1  # some errors
    df = pd.read_csv(out).set_index("path")
    assert len(df) == n_good + 4
    errors = df["error"].dropna()
    assert {p.rsplit("/", 1)[-1] for p in errors.index} == {
        "zero.png",
        "text.png",
        "truncated.png",
        "anim.gif",
    }
    assert "empty" in errors[str(root / "zero.png")]
    assert "unsupported format .gif" in errors[str(root / "anim.gif")]
    assert df.loc[errors.index, "prob_parasitized"].isna().all()
    assert df["prob_parasitized"].notna().sum() == n_good
    assert str(root / "a" / "cell_1.png") in df.index and str(root / "b" / "cell_1.png") in df.index


def test_interrupted_run_keeps_results_and_resume_scores_only_the_rest(
    cells_dir, tiny_model, tmp_path, monkeypatch
):
    store_path = tmp_path / "s.sqlite"
    paths = [s.path for s in iter_sources([cells_dir.resolve()])]
    fatal = paths[16]  # the first image of the third batch of 8
    real = core.inference.engines.OnnxEngine.score
    real_decode = core.inference.pipeline._decode_batch

    def decode_and_die(sources, size):
        if any(s.path == fatal for s in sources):
            raise KeyboardInterrupt
        return real_decode(sources, size)

    monkeypatch.setattr(core.inference.pipeline, "_decode_batch", decode_and_die)
    rc = _cli(
        cells_dir,
        "--weights",
        tiny_model,
        "--store",
        store_path,
        "--no-progress",
        "--batch-size",
        "8",
    )
    assert rc == 130
    with ResultStore(store_path) as store:
        run = store.list_runs().iloc[0]
        assert run["stored"] == 16 and run["finished"] is None  # batches 1 and 2, in order
        first = store.results(run["run_id"]).set_index("path")
    assert set(first.index) == set(paths[:16])
    monkeypatch.setattr(core.inference.pipeline, "_decode_batch", real_decode)
    counted = []

    def counting(self, images):
        counted.append(len(images))
        return real(self, images)

    monkeypatch.setattr(core.inference.engines.OnnxEngine, "score", counting)
    out = tmp_path / "r.csv"
    rc = _cli(
        "--resume",
        run["run_id"],
        "--store",
        store_path,
        "--out",
        out,
        "--no-progress",
        "--batch-size",
        "8",
    )
    assert rc == 0
    n = len(list(cells_dir.rglob("*.png")))
    df = pd.read_csv(out).set_index("path")
    assert len(df) == n and df["error"].isna().all()
    assert sum(counted) == n - 16  # only the images missing from the store were scored
    pd.testing.assert_series_equal(
        df.loc[first.index, "prob_parasitized"],
        first["prob_parasitized"],
        check_exact=False,
        rtol=1e-6,
    )
    with ResultStore(store_path) as store:
        assert store.list_runs().iloc[0]["finished"] is not None
        assert store.export_csv(run["run_id"], tmp_path / "again.csv") == n


def test_missing_input_bad_weights_and_unknown_run_exit_2(tmp_path, tiny_model, cells_dir):
    assert _cli(tmp_path / "nope", "--weights", tiny_model, "--store", tmp_path / "s") == 2
    assert _cli(cells_dir, "--weights", tmp_path, "--store", tmp_path / "s") == 2
    assert _cli("--resume", "no-such-run", "--store", tmp_path / "s") == 2
    with pytest.raises(SystemExit):
        _cli(cells_dir, "--batch-size", "0")


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


def test_score_uploads_reports_progress_and_expands_zips(cells_dir, tiny_model, tmp_path):
    files = sorted(cells_dir.rglob("*.png"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in files[:20]:
            z.write(f, f"cell_images/{f.parent.name}/{f.name}")
    items = [("cells.zip", buf.getvalue())] + [(f.name, f.read_bytes()) for f in files[20:]]
    seen = []
    with ResultStore(tmp_path / "s.sqlite") as store:
        df, run_id = core.inference.pipeline.score_uploads(
            items, weights=tiny_model, store=store, progress=lambda d, t: seen.append((d, t))
        )
        assert len(store.results(run_id)) == len(files)
    assert len(df) == len(files) and seen[-1] == (len(files), len(files))
    assert df["label"].iloc[:20].notna().all()  # labels from the zip's folders
    with pytest.raises(ValueError, match="no images"):
        core.inference.pipeline.score_uploads([("notes.zip", _empty_zip())], weights=tiny_model)


def _empty_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "nothing here")
    return buf.getvalue()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_release_memory_gives_back_the_batch_buffers_and_scores_the_same(tiny_model):
    """The arena keeps a big batch's buffers for the next one (faster); a server gives them
    back after each job with release_memory()."""
    from dashboard.reaper import trim_heap

    engine = core.inference.engines.load_engine(tiny_model, "onnx")
    images = np.random.default_rng(0).integers(0, 256, (256, 128, 128, 3), dtype=np.uint8)
    before = _rss_mb()
    expected = engine(images)
    trim_heap()
    grown = _rss_mb() - before
    engine.release_memory()
    trim_heap()
    given_back = before + grown - _rss_mb()
    assert grown > 100 and given_back > grown / 2, (grown, given_back)
    np.testing.assert_array_equal(engine(images), expected)


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
    reason="needs CPU affinity and two cores to tell the machine's from the process's",
)
def test_cpu_count_is_the_cores_the_process_may_use():
    # taskset or a container's cpuset: one core allowed means one scoring worker, not one per
    # core of the machine (which oversubscribes the allowed core)
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from core.schema.files import cpu_count; print(cpu_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]


def test_cpu_count_without_affinity_is_the_machines(monkeypatch):
    from core.schema.files import cpu_count

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert cpu_count() == (os.cpu_count() or 1)
