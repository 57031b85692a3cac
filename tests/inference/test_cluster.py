"""Scoring on a Ray cluster (core.inference.cluster) gives what the local path gives: one small
local cluster for the whole session, started only by the tests that need it."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

import core.inference.cluster
import core.inference.engines
import core.inference.pipeline
from core.inference.store import ResultStore
from core.schema.results import RESULT_COLUMNS
from tests.helpers import listed_sources as _sources
from tests.helpers import score_cli as _cli

pytestmark = pytest.mark.slow  # every test here starts (or shares) a local Ray cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the session (about 5 s to start and stop)."""
    ray = pytest.importorskip(
        "ray", reason="the cluster extra: pip install -r requirements-cluster.lock"
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


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
