"""The session: every session-state key with its default (set in one place), widget values
kept across pages, the chosen model, and the page address (``?run=...&cell=...``) that
reopens what is on show.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from core.data.sources import open_source
from core.inference.store import SCORE
from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder, WeightsError
from dashboard import resources
from dashboard.images import repo_source, sample_items
from dashboard.text import plain


def init_state() -> None:
    """Every session-state key the pages use, with its default, in one place; counts the run."""
    defaults: dict[str, object] = {
        "model_folder": str(DEFAULT_WEIGHTS),
        "results": None,  # DataFrame of the scoring on show
        "run_id": None,  # its run in the result store
        "run_on_disk": False,  # its paths are files of this machine (a CLI run)
        "sources": {},  # path -> ImageSource for thumbnails and Explain
        "pending_items": None,  # (name, bytes) handed over from Home to Score
        "score_uploads": [],  # (name, file on disk) uploaded on Score, waiting to be scored
        "score_uploader": 0,  # a new number: Score's uploaders drawn empty, under new keys
        "score_spooled": [],  # the files on disk behind the run on show on Score
        "explain_item": None,  # (name, bytes) handed over to Explain
        "cm_cell": None,  # (data source, true class, predicted class) chosen on Evaluate
        "smear": None,  # Smear page: (objects DataFrame, FieldResults, run id, sources)
        "smear_items": None,  # (name, bytes) of fields handed to the Smear page (tests)
        "smear_cell": None,  # the red cell picked on the Smear page (index among red cells)
        "audit_decisions": {},  # path -> {case_id, label, decision} made on Audit, this session
        "audit_note": None,  # what the last save of those decisions said
        "explain_link": None,  # query parameters that reopen the explain_item (run, cell)
        "addresses": {},  # page -> the query parameters it wrote last (show_address)
        "score_cell": None,  # path of the cell shown large on Score
        "score_thumbs": None,  # (run id, {path: thumbnail data URL}) made for the Score table
        "evaluate_cell": None,  # path of the cell shown large on Evaluate
        "evaluate_items": None,  # the labelled upload on Evaluate, (name, bytes) pairs
        "kept": {},  # widget key -> value, kept while the widget's page is not shown
        "drawn": {},  # widget key -> the last run that drew it (see kept)
        "run": 0,  # full runs of this session (fragment reruns are not counted)
        "report": None,  # (run id, HTML) of the last report made on Score
        "scored": {},  # (upload hash, weights sha256, page) -> (results, run id): latest per page
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    st.session_state["run"] += 1


def kept(widget, label: str, *args, key: str, default, allowed=None, **kwargs) -> Any:
    """``widget(label, *args, key=key, **kwargs)`` (a Streamlit input) whose value survives
    switching to another page and back, and runs that stop before drawing it: Streamlit
    drops the browser's state of a widget that a run does not draw, yet can keep its value
    under the key, so the next run that draws it would show its first value (a slider's min)
    while the page reads the kept one, and apply the shown one on the run after. The value
    is kept under ``kept`` and given back to the widget whenever the last run did not draw it
    (a change made in the browser meanwhile says it did). ``default`` is the first value; a
    kept value that is not in ``allowed`` (for a list: its members that are) falls back to it
    (another model's layers). Not for widgets inside fragments, whose reruns are not counted."""
    saved, drawn, run = st.session_state["kept"], st.session_state["drawn"], st.session_state["run"]
    if key not in st.session_state or drawn.get(key) != run - 1:
        value = saved.get(key, default)
        if allowed is not None:
            if isinstance(value, list):
                value = [v for v in value if v in allowed]
            elif value not in allowed:
                value = default
        st.session_state[key] = value
    saved[key] = value = widget(label, *args, key=key, on_change=_changed, args=(key,), **kwargs)
    drawn[key] = run
    return value


def _changed(key: str) -> None:
    """A kept widget changed in the browser, before the run (so before it is counted): the
    browser shows it, and its new value is the one to keep."""
    st.session_state["drawn"][key] = st.session_state["run"]
    st.session_state["kept"][key] = st.session_state[key]


def preset(key: str, value: object) -> None:
    """Give the ``kept`` widget ``key`` the value ``value`` the next time its page draws it."""
    st.session_state["kept"][key] = value
    st.session_state.pop(key, None)


MODEL_PARAM = "model"  # the query parameter naming the sidebar's model, on every page


def page_params() -> dict[str, str]:
    """The page's query parameters but the model's: what the page's own address names."""
    return {k: v for k, v in st.query_params.to_dict().items() if k != MODEL_PARAM}


def set_page_params(params: dict[str, str]) -> None:
    """Make ``params`` the page's query parameters, the model's kept."""
    model = st.query_params.get(MODEL_PARAM)
    st.query_params.from_dict({**params, **({MODEL_PARAM: model} if model else {})})


def followed_link(page: str) -> dict[str, str]:
    """The query parameters of a link that brought this run to ``page`` (a lesson step, a
    shared address, a reload): its own parameters when there are any and they are not the
    ones it wrote last with show_address; {} otherwise (the sidebar, or a rerun)."""
    params = page_params()
    return params if params and params != st.session_state["addresses"].get(page) else {}


def show_address(page: str, params: dict[str, str]) -> None:
    """Make ``params`` ``page``'s query parameters, naming what it shows, and its own: only a
    link that names something else is followed."""
    st.session_state["addresses"][page] = params
    set_page_params(params)


def linked_model(labels: dict[str, str]) -> None:
    """On a session's first run (a reload, a shared link), select the model that the address
    names (``?model=``, as the sidebar labels it) when it is one of ``labels`` (label -> model
    folder, the folders the app lists); st.warning in one line for any other. Afterwards the
    sidebar's choice writes it."""
    name = st.query_params.get(MODEL_PARAM)
    if st.session_state["run"] != 1 or name is None:
        return
    if name in labels:
        st.session_state["model_folder"] = labels[name]
    else:
        st.warning(
            f"The model in this page's link ({plain(name[:120])}) is not one of the model "
            "folders this app lists; the default is selected."
        )


def current_model() -> ModelFolder:
    """The chosen model folder, verified, or st.error + stop if it is unusable."""
    try:
        return ModelFolder.open(st.session_state["model_folder"])
    except WeightsError as exc:
        st.error(
            f"The selected model cannot be loaded: {plain(exc)}. Pick another one in the sidebar."
        )
        st.stop()


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
        info = resources.store().run(params["run"], page=SCORE)
        if info.kind != "files":
            raise LookupError(f"run {info.run_id} scored uploads, whose images are not kept")
        listed = set(resources.store().results(info.run_id)["path"])
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
    st.session_state["addresses"]["explain"] = link or {}  # handed over: not a link to follow
    st.switch_page("views/explain.py", query_params=link)


def forget_run(run_id: str) -> None:
    """After ``run_id`` was deleted from the store: off the page if on show, and out of this
    session's scorings (whose entries name their runs)."""
    if st.session_state["run_id"] == run_id:
        st.session_state.update(results=None, run_id=None, score_cell=None, score_thumbs=None)
        set_page_params({})
    scored = st.session_state["scored"]
    for key in [k for k, (_, run) in scored.items() if run == run_id]:
        del scored[key]
