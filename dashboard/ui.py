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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from core.data.images import ImageError, decode_image
from core.data.sources import ImageSource, open_source, read_bytes, read_image, sources_from_uploads
from core.explain.heatmap import for_display
from core.inference.store import ResultStore, StoreError
from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder, WeightsError, find_models
from core.schema.files import REPO_ROOT
from core.schema.labels import ZIP_SEP, file_name
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
    return _CONTROL.sub(
        lambda m: chr(0x2421 if m.group() == "\x7f" else 0x2400 + ord(m.group())), escaped
    )


def short_name(name: str, length: int = 30) -> str:
    """``name`` in at most ``length`` characters, its end kept: NIH names differ in their
    last part (``C123P84ThinF_IMG_2015…_cell_197.png``)."""
    if len(name) <= length:
        return name
    head = length // 3
    return f"{name[:head]}…{name[-(length - head - 1) :]}"


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
        "explain_link": None,  # query parameters that reopen the explain_item (run, cell)
        "score_cell": None,  # path of the cell shown large on Score
        "score_thumbs": None,  # (run id, {path: thumbnail data URL}) made for the Score table
        "evaluate_cell": None,  # path of the cell shown large on Evaluate
        "evaluate_items": None,  # the labelled upload on Evaluate, (name, bytes) pairs
        "kept": {},  # widget key -> value, kept while the widget's page is not shown
        "report": None,  # (run id, HTML) of the last report made on Score
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    _memory_reaper()


@st.cache_resource
def _memory_reaper():
    """One thread per server giving back the uploads of sessions whose browser has gone."""
    from streamlit.runtime import Runtime

    from dashboard import reaper

    return reaper.start(lambda: Runtime.instance() if Runtime.exists() else None)


def kept(widget, label: str, *args, key: str, default, allowed=None, **kwargs):
    """``widget(label, *args, key=key, **kwargs)`` (a Streamlit input) whose value survives
    switching to another page and back: Streamlit deletes the state of widgets that a run
    does not draw, so the value is also kept under ``kept`` and given back to the widget when
    its page is drawn again. ``default`` is the first value; a kept value that is not in
    ``allowed`` (for a list: its members that are) falls back to it (another model's layers)."""
    saved = st.session_state["kept"]
    if key not in st.session_state:
        value = saved.get(key, default)
        if allowed is not None:
            if isinstance(value, list):
                value = [v for v in value if v in allowed]
            elif value not in allowed:
                value = default
        st.session_state[key] = value
    saved[key] = value = widget(label, *args, key=key, **kwargs)
    return value


def linked_cell(params: dict[str, str]) -> tuple[str, bytes]:
    """The (name, bytes) of the cell that a page's query parameters name: ``sample`` (a
    bundled sample), ``run`` and ``cell`` (a file scored by a stored run of files on this
    machine) or ``split=test`` and ``cell`` (a test-split cell of the selected model). Only
    files that such a run or split lists are read, never any path a link names.

    Raises LookupError (StoreError included) saying why the cell cannot be shown."""
    cell = params.get("cell", "")
    if "sample" in params:
        samples = dict(sample_items())
        if params["sample"] not in samples:
            raise LookupError(f"no sample cell {params['sample']!r}")
        return params["sample"], samples[params["sample"]]
    if "run" in params:
        info = store().run(params["run"])
        if info.kind != "files":
            raise LookupError(f"run {info.run_id} scored uploads, whose images are not kept")
        listed = set(store().results(info.run_id)["path"])
    elif params.get("split") in ("test", "oof"):
        predictions = current_model().predictions(params["split"])
        listed = set(pd.read_csv(predictions)["path"]) if predictions.is_file() else set()
    else:
        raise LookupError("the link names no sample, run or split")
    if cell not in listed:
        raise LookupError(f"{cell!r} is not a cell of that run or split")
    try:  # a split's paths are relative to the repository, a run's as they were scored
        return cell, (repo_source(cell) if "split" in params else open_source(cell)).read()
    except OSError as exc:
        raise LookupError(f"{cell} cannot be read ({exc})") from None


def open_in_explain(name: str, data: bytes, link: dict[str, str] | None = None) -> None:
    """Show the image ``data`` on the Explain page; ``link`` (query parameters: run and cell)
    lets a reload or a shared link find it again."""
    st.session_state.update(explain_item=(name, data), explain_link=link)
    st.switch_page("views/explain.py", query_params=link)


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
        folder = st.selectbox(
            "Model",
            choices,
            index=index,
            format_func=model_label,
            help="The shipped default, or any trained run folder under weights/ or runs/",
        )
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
                f"sensitivity {est['sensitivity']:.3f} · specificity {est['specificity']:.3f}"
            )
        data = ", ".join(Path(d).name for d in model.card.get("training_data", []))
        if data:
            st.caption(f"Trained on {data}; {len(model.split['train'])} training patients")
        with st.expander("Model card"):
            show_card(model.card)


# log axes: a labelled tick at each power of ten, unlabelled ones at 2 and 5 between them
LOG_AXIS = dict(
    type="log",
    dtick=1,
    tickformat=".0e",
    showgrid=True,
    minor=dict(dtick="D2", ticks="outside", showgrid=True, gridcolor="#f0f0f0"),
)
_METRICS = (
    "n",
    "cases",
    "accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "mcc",
)


def kept_weights(card: dict) -> str | None:
    """Which weights a training run kept: an epoch and why, or the mean of several epochs."""
    if card.get("config", {}).get("average_from"):
        return card.get("selected_by")
    best = card.get("best_epoch")
    return f"epoch {best} ({card.get('selected_by')})" if best else None


def show_card(card: dict) -> None:
    """A model card as tables a person reads (what the model is, how it scored on each split,
    its contract and training settings), not as raw JSON."""
    split = card.get("split", {})
    screening = card.get("screening", {})
    about = {
        "architecture": card.get("arch"),
        "created": str(card.get("created", ""))[:16].replace("T", " "),
        "weights sha256": card.get("sha256"),
        "kept weights": kept_weights(card),
        "patients (train / validation / test)": " / ".join(
            str(len(split.get(k, []))) for k in ("train", "val", "test")
        )
        if split
        else None,
        "training data": ", ".join(card.get("training_data", [])),
        "screening cutoff": f"{screening['cutoff']:.1%} ({screening.get('method', '')})"
        if "cutoff" in screening
        else None,
        "training command": card.get("training_command"),
    }
    facts = pd.DataFrame({"": list(about), "value": [str(v) for v in about.values()]})
    st.dataframe(facts[[v != "None" for v in facts["value"]]], hide_index=True, width="stretch")
    metrics = pd.DataFrame(
        {name: {k: m.get(k) for k in _METRICS} for name, m in card.get("metrics", {}).items()}
    ).T
    if not metrics.empty:
        st.caption("Metrics per split (test: patients never used for training or selection)")
        st.dataframe(
            metrics,
            width="stretch",
            placeholder="",
            column_config={
                k: st.column_config.NumberColumn(format="%d" if k in ("n", "cases") else "%.4f")
                for k in _METRICS
            },
        )
    settings = {**card.get("contract", {}), **card.get("config", {})}
    if settings:
        st.caption("Contract (what every user of the model reads) and training settings")
        st.dataframe(
            pd.DataFrame({"setting": list(settings), "value": [str(v) for v in settings.values()]}),
            hide_index=True,
            width="stretch",
        )


def preset(key: str, value) -> None:
    """Give the ``kept`` widget ``key`` the value ``value`` the next time its page draws it."""
    st.session_state["kept"][key] = value
    st.session_state.pop(key, None)


def current_model() -> ModelFolder:
    """The chosen model folder, verified, or st.error + stop if it is unusable."""
    try:
        return ModelFolder.open(st.session_state["model_folder"])
    except WeightsError as exc:
        st.error(
            f"The selected model cannot be loaded: {plain(exc)}. Pick another one in the sidebar."
        )
        st.stop()


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def engine(folder: str, sha256: str):
    """The model's default scoring engine (int8 where its card records that it passed the
    agreement check, else fp32 ONNX), one per weights hash (``sha256`` is the cache key). A
    page that scored with it calls ``release_memory()`` after, so the server's memory returns
    after a big upload."""
    from core.inference.engines import load_engine

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
        trim_heap()


@st.cache_resource(show_spinner="Preparing the explainer…", max_entries=2)
def _explainer(folder: str, sha256: str):
    from core.explain.cams import explainable
    from core.nets.model import load_model

    loaded = load_model(folder)
    return loaded, explainable(loaded), threading.Lock()


def explain(folder: str, sha256: str, images, **options):
    """core.explain.cams.explain on the cached network; sessions take turns, since CAM hooks on a
    shared network would mix their activations."""
    from core.explain.cams import explain as run

    loaded, net, lock = _explainer(folder, sha256)
    with lock:
        return run(loaded, images, net=net, **options)


def quality(folder: str, sha256: str, image) -> str:
    """The quality gate's verdict on one RGB uint8 image (H, W, 3), any size: ``ok`` or why
    it would not be counted (core.inference.gate), from the cached scoring engine."""
    from core.data.images import resize_rgb

    eng = engine(folder, sha256)
    batch = resize_rgb(image, eng.contract.input_size)[None]
    return eng.gate(batch, eng.score(batch)[1])[0]


def heatmaps(folder: str, sha256: str):
    """images -> overlays of the default map for the Parasitized class, for reports."""
    from core.evaluation.report import HEATMAP_TARGET

    def run(images):
        maps = explain(folder, sha256, images, target=HEATMAP_TARGET, faithfulness=False)
        return [e.overlay for e in maps]

    return run


def road(folder: str, sha256: str, image, explanation) -> float:
    """core.explain.cams.road_of on the cached network, taking turns as ``explain`` does."""
    from core.explain.cams import road_of

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
    return [
        (f"samples/{p.parent.name}/{p.name}", p.read_bytes())
        for p in sorted(SAMPLES.rglob("*.png"))
    ]


def sources_for(items: Sequence[tuple[str, bytes]]) -> dict[str, ImageSource]:
    return {s.path: s for s in sources_from_uploads(items)}


def _score_now(items: Sequence[tuple[str, bytes]], model: ModelFolder) -> tuple[pd.DataFrame, str]:
    from core.inference.pipeline import score_uploads

    bar = st.progress(0.0, text="Scoring…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Scored {done:,} of {total:,} images")

    with scoring_engine(str(model.path), model.sha256) as scorer:
        df, run_id = score_uploads(items, engine=scorer, store=store(), progress=progress)
    bar.empty()
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
    repository root (where ``malaria train`` runs), whatever the server's working directory.
    Raises FileNotFoundError."""
    return open_source(str(ROOT / path))  # an absolute path stays as it is


def images_missing(paths: Sequence[str], what: str) -> bool:
    """Whether the files or zips that ``paths`` (from the predictions CSV ``what``) are read
    from are missing on this machine; if so, one warning says where they are expected."""
    places = {
        (ROOT / (p if (ROOT / p).is_file() else p.split(ZIP_SEP, 1)[0])).resolve() for p in paths
    }  # a "!" may be part of a file's name
    missing = sorted(p for p in places if not p.is_file())
    if missing:
        st.warning(
            plain(
                f"The cell images are not on this machine: expected "
                f"{', '.join(map(str, missing))} (the paths in {what} are relative to "
                f"the repository, {ROOT}). Put the data there to see the cells."
            )
        )
    return bool(missing)


def cell_source(path: str, sources: dict[str, ImageSource], *, on_disk: bool) -> ImageSource | None:
    """The image of a result row, or None when it is not at hand.

    ``on_disk``: the run scored files of this machine (CLI), so a path missing from
    ``sources`` may be read from disk; upload names are never looked up on disk.
    """
    try:
        return sources.get(path) or (open_source(path) if on_disk else None)
    except OSError:  # gone from disk
        return None


def forget_run(run_id: str) -> None:
    """After ``run_id`` was deleted from the store: off the page if on show, and out of this
    session's scorings (whose entries name their runs)."""
    if st.session_state["run_id"] == run_id:
        st.session_state.update(results=None, run_id=None, score_cell=None, score_thumbs=None)
        st.query_params.clear()
    scored = st.session_state.get("scored", {})
    for key in [k for k, (_, run) in scored.items() if run == run_id]:
        del scored[key]


def thumbnail(
    path: str, sources: dict[str, ImageSource], *, on_disk: bool, size: int = 48
) -> str | None:
    """A small JPEG data URL for a table cell (a third of a PNG's encoding time and half its
    size at 48 px; colour at full resolution, for small purple dots), or None if the image
    cannot be read."""
    image = image_of(path, sources, on_disk=on_disk, size=size)
    if image is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def image_of(
    path: str, sources: dict[str, ImageSource], *, on_disk: bool, size: int | None = None
) -> np.ndarray | None:
    """A result's image, RGB uint8 (H, W, 3) (resized to ``size`` if given), or None if it
    cannot be read (``on_disk`` as for :func:`cell_source`)."""
    try:
        source = cell_source(path, sources, on_disk=on_disk)
        return None if source is None else read_image(source, size=size)
    except (ImageError, OSError):  # gone from disk, or the error row itself
        return None


def cell_view(
    path: str,
    source: ImageSource | None,
    *,
    details: str,
    state_key: str,
    link: dict[str, str] | None = None,
    also: Sequence[tuple[np.ndarray, str]] = (),
) -> None:
    """One cell shown large (250-350 px) with ``details`` (Markdown, names escaped by the
    caller), any images in ``also`` as (RGB array, caption) beside it, a button that opens it
    in Explain and one that closes the view by clearing ``st.session_state[state_key]``."""
    with st.container(border=True):
        cols = st.columns([2] * (1 + len(also)) + [3])
        data: bytes | None = None
        try:
            if source is None:
                raise ImageError(
                    "its image is not at hand: a reopened upload keeps its "
                    "results, not its images (or the file moved)"
                )
            data = read_bytes(source)
            cols[0].image(
                for_display(decode_image(data)),  # upsampled smoothly, not blocky
                caption=plain(file_name(path)),
                width="stretch",
            )
        except (ImageError, OSError) as exc:
            data = None
            cols[0].info(plain(f"{file_name(path)}: {exc}"))
        for col, (extra, caption) in zip(cols[1:], also):
            col.image(extra, caption=plain(caption), width="stretch")
        info = cols[-1]
        info.markdown(details)
        info.caption(plain(path))
        if (
            info.button(
                "Open in Explain",
                key=f"{state_key}_explain",
                type="primary",
                disabled=data is None,
                icon=":material/visibility:",
            )
            and data
        ):
            open_in_explain(path, data, link)
        info.button(  # a callback: no st.rerun() that could swallow a sidebar click
            "Close",
            key=f"{state_key}_close",
            on_click=st.session_state.update,
            args=({state_key: None},),
        )
