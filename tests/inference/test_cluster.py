"""Scoring on a Ray cluster (core.inference.cluster) gives what the local path gives: one small
local cluster for the whole session, started only by the tests that need it."""

from __future__ import annotations

import io
import logging
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import core.inference.cluster
import core.inference.engines
import core.inference.pipeline
from core import cli
from core.data.images import ImageError
from core.data.sources import from_record, iter_sources, read_bytes, to_record, unique_paths
from core.inference.store import ResultStore
from core.schema.results import RESULT_COLUMNS


def _cli(*argv) -> int:
    return cli.main(["score", *(str(a) for a in argv)])


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the session (about 5 s to start and stop)."""
    ray = pytest.importorskip(
        "ray", reason="the cluster extra: pip install -r requirements-cluster.lock"
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mixed_inputs(cells_dir, tmp_path_factory) -> Path:
    """Cells in labelled folders, a broken file, a GIF, a large image, a copy of a cell under
    another name, and a zip holding cells, a member with ``!`` in its name and a zip inside it."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(cells_dir, root / "cells")
    cells = sorted(cells_dir.rglob("*.png"))
    (root / "cells" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "cells" / "anim.gif").write_bytes(b"GIF89a")
    # slow to decode, in the first batch: its batch comes back last unless order is kept
    noise = np.random.default_rng(0).integers(0, 256, (3500, 3500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cells" / "A_large_field.png", compress_level=1)
    shutil.copy(cells[3], root / "cells" / "copy_of_a_cell.png")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        for f in cells[:3]:
            z.write(f, f"Uninfected/{f.name}")
    with zipfile.ZipFile(root / "slides.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for f in cells[10:17]:
            z.write(f, f"Parasitized/{f.name}")
        z.write(cells[20], "odd!name.png")
        z.writestr("inner.zip", inner.getvalue())
        z.writestr("empty.png", b"")
    return root


def _sources(root: Path):
    # as malaria score lists them: absolute inputs, repeated paths renamed
    return unique_paths(iter_sources([str(root.resolve()), str((root / "slides.zip").resolve())]))


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


def test_without_ray_or_with_a_bad_address_the_cli_exits_2(
    mixed_inputs, tiny_model, tmp_path, monkeypatch, capsys
):
    store = tmp_path / "s.sqlite"
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert _cli(mixed_inputs, "--weights", tiny_model, "--store", store, "--ray") == 2
    err = capsys.readouterr().err
    assert "pip install -r requirements-cluster.lock" in err
    # `--ray cells/`: the input is taken for the address; say so rather than join "cells/"
    assert _cli("--weights", tiny_model, "--store", store, "--ray", mixed_inputs) == 2
    assert "put --ray after the inputs" in capsys.readouterr().err
    assert not store.exists()  # refused before a run was recorded


def _compare(local: pd.DataFrame, ray: pd.DataFrame) -> None:
    assert list(ray["path"]) == list(local["path"])  # same keys, same order
    for col in ("case_id", "label", "prediction", "quality", "error", "duplicate_of"):
        pd.testing.assert_series_equal(ray[col], local[col], check_dtype=False)
    diff = (ray["prob_parasitized"] - local["prob_parasitized"]).abs()
    assert diff.max() < 1e-6
    assert local["prob_parasitized"].isna().equals(ray["prob_parasitized"].isna())


def test_ray_scores_as_the_local_path(ray_cluster, mixed_inputs, tiny_model):
    sources = _sources(mixed_inputs)
    engine = core.inference.engines.load_engine(tiny_model)
    local = core.inference.pipeline.score_sources(sources, engine, batch_size=8)
    ray = core.inference.pipeline.score_sources(
        sources, engine, batch_size=8, scorer=core.inference.cluster.RayScorer(actors=2)
    )
    assert local is not None and ray is not None
    _compare(local, ray)
    # what the fixture holds shows up, the same way in both
    assert ray["error"].notna().sum() == 4  # broken.png, anim.gif, empty.png twice
    assert ray["duplicate_of"].notna().sum() > 8  # the zip listed twice, the copied cell
    assert ray["prob_parasitized"].notna().sum() >= 44


def test_cli_with_ray_is_interrupted_resumed_and_exports_the_local_csv(
    ray_cluster, mixed_inputs, tiny_model, tmp_path, monkeypatch
):
    local_csv, ray_csv = tmp_path / "local.csv", tmp_path / "ray.csv"
    common = ("--weights", tiny_model, "--no-progress", "--batch-size", 8)
    assert _cli(mixed_inputs, "--out", local_csv, "--store", tmp_path / "l.sqlite", *common) == 1

    store_path = tmp_path / "r.sqlite"
    real_add = ResultStore.add_results
    calls = []

    def add_then_die(self, run_id, rows):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(rows))
        real_add(self, run_id, rows)

    monkeypatch.setattr(ResultStore, "add_results", add_then_die)
    assert _cli(mixed_inputs, "--store", store_path, "--ray", *common) == 130
    monkeypatch.setattr(ResultStore, "add_results", real_add)
    with ResultStore(store_path) as store:
        run = store.list_runs().iloc[0]
        assert run["stored"] == 16 and run["finished"] is None  # the first two batches

    scored = []
    real_call = core.inference.cluster.RayScorer.__call__

    def counting(self, sources, engine, **kw):
        scored.append(len(sources))
        return real_call(self, sources, engine, **kw)

    monkeypatch.setattr(core.inference.cluster.RayScorer, "__call__", counting)
    rc = _cli("--resume", run["run_id"], "--store", store_path, "--out", ray_csv, "--ray", *common)
    assert rc == 1  # error rows, as locally
    local, ray = pd.read_csv(local_csv), pd.read_csv(ray_csv)
    assert scored == [len(local) - 16]  # only what the store was missing
    assert list(ray.columns) == [*RESULT_COLUMNS, "review"]
    _compare(local, ray)
    pd.testing.assert_series_equal(ray["review"], local["review"])
