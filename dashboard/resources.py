"""What the server holds once for every session (``st.cache_resource``): the result store, the
scoring engines and the explainers, one per weights hash, the thread that loads a model's into
them in the background (the sidebar's default from the server's first page on: its engine at
once, its explainer when a page asks for it or once no scoring has run for ``IDLE_S``), and the
thread that gives back the memory of departed sessions; and the jobs run with them (scoring
uploads, heatmaps, the quality gate's verdict).

PyTorch and Grad-CAM are imported inside the functions that draw heatmaps, by the background
load or the first page that draws one, never when a page module is imported (ONNX Runtime
waits for the first engine in core).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

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
from core.schema.contract import ModelFolder, WeightsError
from dashboard import reaper, spool
from dashboard.images import items_key
from dashboard.text import plain


@st.cache_resource
def memory_reaper() -> threading.Thread:
    """One thread per server giving back the uploads of sessions whose browser has gone."""
    return reaper.start(
        lambda: Runtime.instance() if Runtime.exists() else None, spool=spool.server_folder()
    )


_LOG = logging.getLogger(__name__)
ENGINE, EXPLAINER = "the scoring engine", "PyTorch and the explainer"  # in the order loaded


class _Scoring:
    """How many scoring jobs run on this server now, and since when none has: the background
    load of an explainer waits for a quiet moment rather than take the cores from a scoring
    (importing PyTorch beside the first scoring after a start made it twice as slow)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._since = time.monotonic()  # the server's start counts as the last activity

    @contextmanager
    def job(self) -> Iterator[None]:
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self._since = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the last scoring job ended; 0 while one runs."""
        with self._lock:
            return 0.0 if self._running else time.monotonic() - self._since


SCORING = _Scoring()
POLL_S = 0.25  # how often the loading progress is redrawn and the quiet checked
IDLE_S = 8.0  # quiet seconds after which an explainer nobody asked for yet is loaded


@dataclass
class Loading:
    """One model's engine and explainer loading in the background (``loading``): how many of
    the steps are ``done``, in order, since when the step under way ``started``, the thread
    doing it, and whether a page ``wanted`` the explainer (it loads at once then, instead of
    at a quiet moment)."""

    steps: tuple[str, ...] = (ENGINE, EXPLAINER)
    done: int = 0
    started: float = field(default_factory=time.monotonic)  # of the step under way
    thread: threading.Thread = field(default_factory=threading.Thread, repr=False)  # unstarted
    wanted: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait_for_quiet(self) -> None:
        """Return once a page wants the explainer or no scoring has run for IDLE_S seconds."""
        while not self.wanted.wait(POLL_S) and SCORING.idle_s() < IDLE_S:
            pass

    def waiting_for(self, steps: int) -> bool:
        """Whether the first ``steps`` steps are still loading (False once the thread ended,
        loaded or failed)."""
        return self.done < steps and self.thread.is_alive()


def _load_steps(folder: str, sha256: str) -> tuple[Callable[[], object], ...]:
    return (lambda: engine(folder, sha256), lambda: _explainer(folder, sha256))


@st.cache_resource(show_spinner=False, max_entries=4)
def loading(folder: str, sha256: str) -> Loading:
    """Load the model's scoring engine, then (at a quiet moment, see ``Loading``) its
    explainer, into their caches in a background thread, once per model and server: a page
    that needs them waits on it (``wait_for_model``) instead of loading them a second time.
    One thread, not one per step: two threads importing PyTorch at once can see each other's
    half-imported modules."""
    load = Loading()

    def run() -> None:
        try:
            for i, step in enumerate(_load_steps(folder, sha256)):
                if load.steps[i] == EXPLAINER:
                    load.wait_for_quiet()
                load.started = time.monotonic()
                step()
                load.done += 1
                _LOG.info(
                    "%s of %s loaded in %.1f s",
                    load.steps[i],
                    folder,
                    time.monotonic() - load.started,
                )
        except Exception:  # the page that needs the model loads it again and says why
            _LOG.exception("loading the model %s in the background failed", folder)

    load.thread = threading.Thread(target=run, name="load-model", daemon=True)
    load.thread.start()
    return load


@st.cache_resource(show_spinner=False)
def load_in_background(folder: str) -> Loading | None:
    """Once per server: start loading the model in ``folder`` (see ``loading``); None for
    weights that cannot be opened (the pages that need them say why)."""
    try:
        model = ModelFolder.open(folder)
    except WeightsError:
        return None
    return loading(str(model.path), model.sha256)


def wait_for_model(model: ModelFolder, *, explainer: bool = True) -> None:
    """Return once ``model``'s scoring engine (and, with ``explainer``, its explainer) are
    loaded, starting the background loading if nothing started it; meanwhile a progress bar
    says what is loading and for how long. st.error (one line) and stop where it cannot be
    loaded."""
    folder, sha = str(model.path), model.sha256
    load = loading(folder, sha)
    if explainer:
        load.wanted.set()
    steps = len(load.steps) if explainer else load.steps.index(ENGINE) + 1
    if load.waiting_for(steps):
        bar = st.progress(0.0)
        while load.waiting_for(steps):
            done = min(load.done, steps - 1)  # the thread moves on meanwhile
            first_build = "; a model's first start also builds its ONNX graphs, once"
            bar.progress(
                done / steps,
                text=f"Loading the model… {load.steps[done]}, step {done + 1} of {steps} "
                f"({time.monotonic() - load.started:.0f} s"
                f"{first_build if load.steps[done] == ENGINE else ''})",
            )
            load.thread.join(POLL_S)
        bar.empty()
    try:  # loaded: cache hits; after a failure in the background, this page tries again
        for step in _load_steps(folder, sha)[:steps]:
            step()
    except Exception as exc:  # whatever stopped it, one line here; the traceback in the log
        _LOG.exception("loading the model %s failed", folder)
        st.error(f"The model cannot be loaded: {plain(exc)}. Pick another one in the sidebar.")
        st.stop()


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
        with SCORING.job():
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
    import torch  # why: PyTorch only for heatmaps

    from core.explain.cams import explainable  # why: PyTorch and Grad-CAM only for heatmaps
    from core.nets.model import load_model  # why: PyTorch only for heatmaps

    # One thread for the maps, as TorchEngine scores: on a 2-core machine busy with another
    # job, PyTorch's two OpenMP threads waiting on each other stalled a 0.04 s map for 3.6 s.
    torch.set_num_threads(1)
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
    wait_for_model(model, explainer=False)
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
