"""What the server holds once for every session (``st.cache_resource``): the result store, the
scoring engines and the explainers, one per weights hash, and the thread that gives back the
memory of departed sessions; and the jobs run with them (scoring uploads, heatmaps, the quality
gate's verdict).

PyTorch and Grad-CAM are imported inside the functions that draw heatmaps, so a page that only
scores or shows results never loads them (ONNX Runtime waits for the first engine in core).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.runtime import Runtime

from core.data.images import ImageError
from core.data.sources import ImageSource, Upload
from core.evaluation.report import HEATMAP_TARGET
from core.inference.engines import load_engine
from core.inference.pipeline import score_batch, score_uploads
from core.inference.store import SCORE, ResultStore, StoreError
from core.schema.contract import ModelFolder
from dashboard import reaper, spool
from dashboard.images import items_key
from dashboard.text import plain


@st.cache_resource
def memory_reaper() -> threading.Thread:
    """One thread per server giving back the uploads of sessions whose browser has gone."""
    return reaper.start(
        lambda: Runtime.instance() if Runtime.exists() else None, spool=spool.server_folder()
    )


@st.cache_resource
def store() -> ResultStore:
    """The result store; st.error and stop if it cannot be used (a failure is not cached)."""
    try:
        return ResultStore()
    except StoreError as exc:
        st.error(plain(exc))
        st.stop()


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def engine(folder: str, sha256: str):
    """The model's default scoring engine (int8 where its card records that it passed the
    agreement check, else fp32 ONNX), one per weights hash (``sha256`` is the cache key). A
    page that scored with it calls ``release_memory()`` after, so the server's memory returns
    after a big upload."""
    return load_engine(folder)


@contextmanager
def scoring_engine(folder: str, sha256: str) -> Iterator:
    """``engine(folder, sha256)`` for one scoring job; afterwards its batch buffers and the
    decoding threads' freed memory go back to the system, however the job ended."""
    scorer = engine(folder, sha256)
    try:
        yield scorer
    finally:
        scorer.release_memory()
        reaper.trim_heap()


def score_one(folder: str, sha256: str, name: str, data: bytes) -> tuple[float, str, str]:
    """(P(Parasitized), the quality gate's verdict, the engine's name) of one image's bytes, by
    the model's scoring engine, decoded and resized exactly as Score does: the probability
    every page shows for a cell. Raises ImageError for bytes that are no usable image."""
    eng = engine(folder, sha256)
    row = score_batch([ImageSource(name, lambda: data)], eng, eng.contract.threshold)[0]
    if row["error"] is not None:
        raise ImageError(row["error"])
    return row["prob_parasitized"], row["quality"], eng.name


@st.cache_resource(show_spinner="Preparing the explainer…", max_entries=2)
def _explainer(folder: str, sha256: str):
    from core.explain.cams import explainable  # why: PyTorch and Grad-CAM only for heatmaps
    from core.nets.model import load_model  # why: PyTorch only for heatmaps

    loaded = load_model(folder)
    return loaded, explainable(loaded), threading.Lock()


def explain(folder: str, sha256: str, images, **options):
    """core.explain.cams.explain on the cached network; sessions take turns, since CAM hooks on a
    shared network would mix their activations."""
    from core.explain.cams import explain as run  # why: PyTorch and Grad-CAM only for heatmaps

    loaded, net, lock = _explainer(folder, sha256)
    with lock:
        return run(loaded, images, net=net, **options)


def road(folder: str, sha256: str, image, explanation) -> float:
    """core.explain.cams.road_of on the cached network, taking turns as ``explain`` does."""
    from core.explain.cams import road_of  # why: PyTorch and Grad-CAM only for heatmaps

    loaded, net, lock = _explainer(folder, sha256)
    with lock:
        return road_of(loaded, image, explanation, net=net)


def heatmaps(folder: str, sha256: str) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """images -> overlays of the default map for the Parasitized class, for reports."""

    def run(images):
        maps = explain(folder, sha256, images, target=HEATMAP_TARGET, faithfulness=False)
        return [e.overlay for e in maps]

    return run


def _score_now(items: Sequence[Upload], model: ModelFolder, page: str) -> tuple[pd.DataFrame, str]:
    bar = st.progress(0.0, text="Scoring…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Scored {done:,} of {total:,} images")

    with scoring_engine(str(model.path), model.sha256) as scorer:
        df, run_id = score_uploads(
            items, engine=scorer, store=store(), progress=progress, page=page
        )
    bar.empty()
    assert run_id is not None  # a store was given
    return df, run_id


def score(
    items: Sequence[Upload], model: ModelFolder, *, page: str = SCORE
) -> tuple[pd.DataFrame, str]:
    """Score uploads with ``model`` once per (content, model, page) in this session: a rerun
    or a return to the page shows the same run without scoring again. Each scoring is one run
    in the store, listed by ``page`` (a side effect, so it is kept out of st.cache_data); the
    session holds each page's latest result."""
    key = (items_key(items), model.sha256, page)
    scored = st.session_state["scored"]
    if key not in scored:
        for old in [k for k in scored if k[2] == page]:
            del scored[old]
        scored[key] = _score_now(items, model, page)
    return scored[key]
