"""The frame every page shares: session state, the model picker, cached engines and results.

Pages import from here and from ``core``; nothing here knows about tensors or layers.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import re
import string
import threading
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import streamlit as st
from PIL import Image

from core.contract import DEFAULT_WEIGHTS, ModelFolder, WeightsError, find_models
from core.files import REPO_ROOT
from core.images import ImageError, read_image
from core.labels import ZIP_SEP
from core.sources import ImageSource, open_source, sources_from_uploads
from core.store import ResultStore, StoreError
from dashboard.reaper import trim_heap

ROOT = REPO_ROOT
BRAND = "#8e244d"  # the product's colour: Parasitized, the default, the chosen
PALETTE = (BRAND, "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd")  # one colour per compared run
SAMPLES = Path(__file__).resolve().parent / "samples"
UPLOAD_TYPES = ["png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp", "zip"]


# every ASCII punctuation mark but "/", which Markdown gives no meaning alone (paths stay readable)
_MARKDOWN_SPECIAL = re.compile("([" + re.escape(string.punctuation.replace("/", "")) + "])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def plain(text: object) -> str:
    """``text`` (a file name, a path, a message quoting one) shown as typed by the Markdown
    that st.error, st.caption and image captions render: every ASCII punctuation mark is
    backslash-escaped (CommonMark), so no name becomes an image fetched from a URL, a link,
    HTML, a colour directive or formatting; control characters show as their symbols."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))
    return _CONTROL.sub(lambda m: chr(0x2421 if m.group() == "\x7f" else 0x2400 + ord(m.group())),
                        escaped)


def chart_text(values) -> list[str]:
    """Labels for Plotly, which renders <a href>, <b>... in labels: HTML-escaped, shown as
    typed."""
    return [html.escape(str(v)) for v in values]


def init_state() -> None:
    """Every session-state key the pages use, with its default, in one place."""
    defaults: dict[str, object] = {
        "model_folder": str(DEFAULT_WEIGHTS),
        "results": None,  # DataFrame of the scoring on show
        "run_id": None,  # its run in the result store
        "run_on_disk": False,  # its paths are files of this machine (a CLI run)
        "sources": {},  # path -> ImageSource for thumbnails and Explain
        "pending_items": None,  # (name, bytes) handed over from Home to Score
        "explain_item": None,  # (name, bytes) handed over to Explain
        "cm_cell": None,  # (data source, true class, predicted class) chosen on Evaluate
        "smear": None,  # Smear page: (objects DataFrame, FieldResults, run id, sources)
        "smear_items": None,  # (name, bytes) of fields handed to the Smear page (tests)
        "smear_cell": None,  # the red cell picked on the Smear page (index among red cells)
        "audit_decisions": {},  # path -> {case_id, label, decision} made on Audit, this session
        "audit_note": None,  # what the last save of those decisions said
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    _memory_reaper()


@st.cache_resource
def _memory_reaper():
    """One thread per server giving back the uploads of sessions whose browser has gone."""
    from streamlit.runtime import Runtime

    from dashboard import reaper
    return reaper.start(Runtime.instance)


# --- model ------------------------------------------------------------------------------------

def model_choices() -> list[Path]:
    found = find_models(ROOT / "weights", ROOT / "runs")
    default = DEFAULT_WEIGHTS.resolve()
    return [default] + [f for f in found if f != default]


def model_label(folder: Path | str) -> str:
    """A model folder as the sidebar names it: relative to the repository where it can be."""
    folder = Path(folder).resolve()
    try:
        return str(folder.relative_to(ROOT))
    except ValueError:
        return str(folder)


def model_sidebar() -> None:
    """Sidebar: pick a model folder and show its card."""
    choices = model_choices()
    current = Path(st.session_state["model_folder"]).resolve()
    index = choices.index(current) if current in choices else 0
    with st.sidebar:
        folder = st.selectbox("Model", choices, index=index, format_func=model_label,
                              help="The shipped default, or any trained run folder under "
                                   "weights/ or runs/")
        st.session_state["model_folder"] = str(folder)
        try:
            model = ModelFolder.open(folder)
        except WeightsError as exc:
            st.error(f"This model cannot be used: {plain(exc)}")
            return
        source, est = model.estimate
        st.caption(f"**{model.arch}** · sha256 `{model.sha256[:10]}`")
        if est:
            st.markdown(
                f"On **{plain(source)}** ({est.get('n', '?')} cells)  \n"
                f"accuracy **{est['accuracy']:.3f}** · AUC **{est['auc']:.4f}**  \n"
                f"sensitivity {est['sensitivity']:.3f} · specificity {est['specificity']:.3f}")
        data = ", ".join(Path(d).name for d in model.card.get("training_data", []))
        if data:
            st.caption(f"Trained on {data}; {len(model.split['train'])} training patients")
        with st.expander("Model card"):
            st.json(model.card, expanded=False)


def current_model() -> ModelFolder:
    """The chosen model folder, verified, or st.error + stop if it is unusable."""
    try:
        return ModelFolder.open(st.session_state["model_folder"])
    except WeightsError as exc:
        st.error(f"The selected model cannot be loaded: {plain(exc)}. Pick another one in the "
                 "sidebar.")
        st.stop()


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def engine(folder: str, sha256: str):
    """The model's default scoring engine (int8 where its card records that it passed the
    agreement check, else fp32 ONNX), one per weights hash (``sha256`` is the cache key); its
    buffers are freed after each batch, so the server's memory returns after a big upload."""
    from core.score import load_engine
    return load_engine(folder, memory_arena=False)


@st.cache_resource(show_spinner="Preparing the explainer…", max_entries=2)
def _explainer(folder: str, sha256: str):
    from core.explain import explainable
    from core.model import load_model
    loaded = load_model(folder)
    return loaded, explainable(loaded), threading.Lock()


def explain(folder: str, sha256: str, images, **options):
    """core.explain.explain on the cached network; sessions take turns, since CAM hooks on a
    shared network would mix their activations."""
    from core.explain import explain as run
    loaded, net, lock = _explainer(folder, sha256)
    with lock:
        return run(loaded, images, net=net, **options)


def road(folder: str, sha256: str, image, explanation) -> float:
    """core.explain.road_of on the cached network, taking turns as ``explain`` does."""
    from core.explain import road_of
    loaded, net, lock = _explainer(folder, sha256)
    with lock:
        return road_of(loaded, image, explanation, net=net)


@st.cache_resource
def store() -> ResultStore:
    """The result store; st.error and stop if it cannot be used (a failure is not cached)."""
    try:
        return ResultStore()
    except StoreError as exc:
        st.error(plain(exc))
        st.stop()


# --- uploads and images ---------------------------------------------------------------------

def items_key(items: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in items:
        h.update(name.encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def uploaded_items(files) -> list[tuple[str, bytes]]:
    return [(f.name, f.getvalue()) for f in files or []]


@st.cache_data(show_spinner=False)
def sample_items() -> list[tuple[str, bytes]]:
    return [(f"samples/{p.parent.name}/{p.name}", p.read_bytes())
            for p in sorted(SAMPLES.rglob("*.png"))]


def sources_for(items: Sequence[tuple[str, bytes]]) -> dict[str, ImageSource]:
    return {s.path: s for s in sources_from_uploads(items)}


def _score_now(items: Sequence[tuple[str, bytes]], model: ModelFolder
               ) -> tuple[pd.DataFrame, str]:
    from core.score import score_uploads
    bar = st.progress(0.0, text="Scoring…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Scored {done:,} of {total:,} images")

    df, run_id = score_uploads(items, engine=engine(str(model.path), model.sha256),
                               store=store(), progress=progress)
    bar.empty()
    trim_heap()  # the decoding threads' freed buffers, back to the system
    assert run_id is not None  # a store was given
    return df, run_id


def score(items: Sequence[tuple[str, bytes]]) -> tuple[pd.DataFrame, str]:
    """Score uploads once per (content, model) in this session: a rerun or a return to the
    page shows the same run without scoring again. Each scoring is one run in the store (a side
    effect, so it is kept out of st.cache_data); the session holds only its latest result."""
    model = current_model()
    key = (items_key(items), model.sha256)
    scored = st.session_state.setdefault("scored", {})
    if key not in scored:
        scored.clear()
        scored[key] = _score_now(items, model)
    return scored[key]


def repo_source(path: str) -> ImageSource:
    """The image that a model folder's predictions CSV names. Its paths are relative to the
    repository root (where ``core.train`` runs), whatever the server's working directory.
    Raises FileNotFoundError."""
    return open_source(str(ROOT / path))  # an absolute path stays as it is


def images_missing(paths: Sequence[str], what: str) -> bool:
    """Whether the files or zips that ``paths`` (from the predictions CSV ``what``) are read
    from are missing on this machine; if so, one warning says where they are expected."""
    places = {(ROOT / (p if (ROOT / p).is_file() else p.split(ZIP_SEP, 1)[0])).resolve()
              for p in paths}  # a "!" may be part of a file's name
    missing = sorted(p for p in places if not p.is_file())
    if missing:
        st.warning(plain(f"The cell images are not on this machine: expected "
                         f"{', '.join(map(str, missing))} (the paths in {what} are relative to "
                         f"the repository, {ROOT}). Put the data there to see the cells."))
    return bool(missing)


def thumbnail(path: str, sources: dict[str, ImageSource], *, on_disk: bool,
              size: int = 48) -> str | None:
    """A small PNG data URL for a table cell, or None if the image cannot be read.

    ``on_disk``: the run scored files of this machine (CLI), so a path missing from
    ``sources`` may be read from disk; upload names are never looked up on disk.
    """
    try:
        source = sources.get(path) or (open_source(path) if on_disk else None)
        if source is None:
            return None
        img = Image.fromarray(read_image(source, size=size))
    except (ImageError, OSError):  # gone from disk, or the error row itself
        return None
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
