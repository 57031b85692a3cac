"""Smear: whole fields of view, every red cell found, scored and counted; one field drawn with
its cells clickable, the picked cell with its heatmap."""

import contextlib
import hashlib
from functools import partial

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageError
from core.data.sources import open_source, read_image
from core.explain.heatmap import DEFAULT_METHOD, for_display, overlay
from core.inference.store import SMEAR, RunInfo, StoreError
from core.schema.contract import ModelFolder, WeightsError
from core.schema.results import calls
from core.smear.fields import (
    FieldError,
    FieldObject,
    FieldResult,
    crop_cells,
    domain_note,
    draw_overlay,
    field_summary,
    restored_field,
    score_uploads,
    smear_totals,
)
from dashboard import images, resources, state, text, widgets


def _pick_cell(field_key: str) -> None:
    """A click on a cell of the field, before the page runs (no st.rerun() that could swallow
    a sidebar click made meanwhile)."""
    points = st.session_state[field_key].selection.points
    if points and points[0].get("customdata") is not None:
        st.session_state["smear_cell"] = int(np.ravel(points[0]["customdata"])[0])


@st.cache_data(show_spinner=False, max_entries=8)
def _segment_and_score(key: str, folder: str, sha256: str, _items):
    bar = st.progress(0.0, text="Finding and scoring cells…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"{done} of {total} fields")

    with resources.scoring_engine(folder, sha256) as scorer:
        df, results, run_id = score_uploads(
            _items, scorer, store=resources.store(), progress=progress
        )
    bar.empty()
    return df, results, run_id


# --- runs: open, delete (callbacks, run before the page) -----------------------------------


def open_run(run_id: str) -> None:
    """Put a stored smear run on show: its objects from the store, and for a run of fields on
    this machine (``malaria smear``) the fields' images, to draw them again. Raises
    StoreError if there is no such run, or another page made it."""
    info = resources.store().run(run_id, page=SMEAR)
    cells = resources.store().smear_rows(run_id)
    sources = {}
    if info.kind == "smear":  # files of this machine; an upload keeps its rows, not its images
        for name in cells["image"].unique():
            with contextlib.suppress(OSError):  # moved since: its rows stay, its drawing goes
                sources[name] = open_source(name)
    st.session_state.update(smear=(cells, {}, run_id, sources), smear_cell=None)


def delete_run(run_id: str) -> None:
    resources.store().delete_run(run_id)
    _segment_and_score.clear()  # its entries name their runs: none may name a deleted one
    shown = st.session_state["smear"]
    if shown is not None and shown[2] == run_id:
        st.session_state.update(smear=None, smear_cell=None)
        st.query_params.pop("run", None)


# --- inputs ------------------------------------------------------------------------------


def fields_ui() -> list[tuple[str, bytes]]:
    """The fields to score, as (name, bytes): uploaded, or handed to the page."""
    st.caption(
        "Upload whole fields of view of a Giemsa thin smear (camera images, or a zip of "
        "them). Every red cell is found, cut out with its background blacked out as in the "
        "training crops, and scored; white cells, platelets, debris and clumps are outlined "
        "in grey and never counted."
    )
    files = st.file_uploader(
        "Fields or zips", type=images.UPLOAD_TYPES, accept_multiple_files=True, key="smear_upload"
    )
    return images.uploaded_items(files) or st.session_state.get("smear_items") or []


def threshold_ui(model: ModelFolder) -> float:
    return st.slider(
        "Decision threshold on P(Parasitized)", 0.0, 1.0, float(model.contract.threshold), 0.01
    )


def suspects_ui() -> bool:
    return st.toggle(
        "Suspects only", value=False, help="List only the cells at or above the threshold"
    )


# --- drawing -----------------------------------------------------------------------------


def run_model(info: RunInfo, model: ModelFolder) -> ModelFolder:
    """The model that scored the run, else (moved or changed since) the sidebar's ``model``."""
    if info.weights_sha256 != model.sha256:
        with contextlib.suppress(WeightsError):
            return ModelFolder.open(info.weights)
    return model


def domain_ui(cells: pd.DataFrame, *, adapted: bool) -> None:
    """At the top: whether these fields come from another lab than the cells that the run's
    model, ``adapted`` or not, learnt from (core.smear.fields.domain_note), in red when no
    parasitemia is given."""
    note = domain_note(smear_totals(cells, adapted=adapted), adapted=adapted)
    if note is not None:
        level, words = note
        {"error": st.error, "warning": st.warning, "info": st.info}[level](
            text.plain(words), icon=":material/public:"
        )


def totals_ui(cells: pd.DataFrame, *, adapted: bool) -> None:
    """Fields, red cells, parasitized and parasitemia over the fields a model ``adapted`` or
    not reports; the fields that gave no cells, with why."""
    totals = smear_totals(cells, adapted=adapted)
    a, b, c, d = st.columns(4)
    a.metric("Fields", f"{totals.fields:,}")
    b.metric("Red cells", f"{totals.red_cells:,}", help="counted: whole, single cells")
    c.metric("Called parasitized", f"{totals.parasitized:,}")
    d.metric("Parasitemia", "–" if totals.parasitemia is None else f"{totals.parasitemia:.2%}")
    st.caption(
        "Counted: whole, single red cells inside the field; the rest (cut by the edge, "
        "fragments, clumps) are drawn grey and listed with their reason in the quality column. "
        "The known column says which cells the quality gate finds unlike the cells the model "
        "knows: a field made mostly of those gets no parasitemia."
    )
    errors = cells[cells["error"].notna()]
    if not errors.empty:
        st.warning(f"{len(errors)} field(s) gave no cells; each is a row with its reason:")
        st.dataframe(errors[["image", "error"]], hide_index=True, width="stretch")


def summary_ui(
    cells: pd.DataFrame, run_id: str, *, model: ModelFolder, threshold: float, adapted: bool
) -> None:
    """Parasitemia per field and per folder (of the fields a model ``adapted`` or not
    reports), and both tables as CSVs."""
    summary = field_summary(cells, adapted=adapted, screening=model.screening)
    st.subheader("Parasitemia per field and per folder")
    first = ["level", "group", "review", "likely_infected"]  # in view beside the group
    st.dataframe(
        summary[first + [c for c in summary if c not in first]],
        hide_index=True,
        width="stretch",
        placeholder="",
        column_config={
            "review": st.column_config.TextColumn(
                width="medium", help="Why a field or folder gets no parasitemia"
            ),
            "likely_infected": st.column_config.CheckboxColumn("Flag"),
            "parasitemia": st.column_config.NumberColumn(format="percent"),
            "ci_low": st.column_config.NumberColumn("95% CI low", format="percent"),
            "ci_high": st.column_config.NumberColumn("95% CI high", format="percent"),
            "mean_prob": st.column_config.NumberColumn(format="%.3f"),
            "flag_p": st.column_config.NumberColumn("flag p-value", format="%.2g"),
            "flag_rule": None,
        },
    )
    st.caption(f"A field or folder is flagged likely infected when {model.screening.describe()}.")
    provenance = widgets.provenance(run_id, threshold, model.path, model.sha256)
    widgets.csv_downloads(
        (
            f"Download all {len(cells):,} objects (CSV)",
            cells.assign(**provenance),
            f"smear_cells_{run_id}.csv",
            None,
        ),
        (
            "Download the summary (CSV)",
            summary.assign(**provenance),
            f"smear_summary_{run_id}.csv",
            None,
        ),
    )


def field_figure(
    view: np.ndarray, centres: list[tuple[float, float]], choices: list[int], prob
) -> go.Figure:
    """The field drawn with its outlines, an invisible marker on each listed red cell to
    click."""
    fig = go.Figure(go.Image(z=view, hoverinfo="skip"))
    fig.add_trace(
        go.Scatter(
            x=[centres[k][0] for k in choices],
            y=[centres[k][1] for k in choices],
            mode="markers",
            customdata=choices,
            marker=dict(size=14, opacity=0.01),
            hovertemplate="P(Parasitized) %{text}<extra></extra>",
            text=[f"{prob[k]:.3f}" for k in choices],
        )
    )
    fig.update_layout(
        height=560,
        margin=dict(l=0, r=0, t=0, b=0),
        xaxis_visible=False,
        yaxis_visible=False,
        dragmode=False,  # a click: in Plotly's "select" drag mode a click selected nothing
    )
    return fig


def cell_label(k: int, prob, red: list[FieldObject], engine: str) -> str:
    return f"P(Parasitized) {prob[k]:.3f} ({engine}) · at x={red[k].x}, y={red[k].y}" + (
        " · cut by the edge" if red[k].edge else ""
    )


def cell_ui(
    image: np.ndarray,
    red: list[FieldObject],
    choices: list[int],
    prob,
    model: ModelFolder,
    engine: str,
) -> None:
    """Pick one of the listed red cells (the clicked one first): the cell as the model sees
    it, and its heatmap. ``prob`` is the scoring engine's (named ``engine``), the map's model
    is PyTorch's."""
    picked = st.session_state.get("smear_cell")
    order = sorted(choices, key=lambda k: -prob[k])
    k = st.selectbox(
        "Cell",
        order,
        index=order.index(picked) if picked in order else 0,
        format_func=lambda k: cell_label(k, prob, red, engine),
    )
    st.session_state["smear_cell"] = k
    crop = crop_cells(image, [red[k]], size=model.contract.input_size)[0]
    resources.wait_for_model(model)
    e = resources.explain(
        str(model.path), model.sha256, [crop], method=DEFAULT_METHOD, faithfulness=False
    )[0]
    left, right = st.columns(2)
    left.image(for_display(crop), caption="the cell as the model sees it", width=320)
    right.image(
        for_display(overlay(crop, e.heatmap)),
        width=320,
        caption=f"{DEFAULT_METHOD} · explains {e.target} · P(Parasitized) {prob[k]:.3f} by "
        f"the {engine} engine (the map's PyTorch model: {e.prob_parasitized:.3f})",
    )


def field_result(
    name: str, cells: pd.DataFrame, results: dict[str, FieldResult], sources: dict
) -> tuple[np.ndarray, FieldResult] | None:
    """The field ``name`` (RGB array) and its result: as scored in this session, or, for a
    reopened run, found again in its image (kept in ``results``); None, said with st.info or
    st.error, when its image is not at hand or changed."""
    if name not in sources:
        st.info(
            "This run's fields are not drawn: a reopened upload keeps its results, not its "
            "images (or the file moved). Its counts and tables above are complete."
        )
        return None
    try:
        image = read_image(sources[name])
        if name not in results:
            results[name] = restored_field(image, cells[cells["image"] == name])
    except (ImageError, FieldError, OSError) as exc:
        st.error(text.plain(f"{name}: {exc}"))
        return None
    return image, results[name]


def field_ui(
    cells: pd.DataFrame,
    results: dict[str, FieldResult],
    sources: dict,
    *,
    model: ModelFolder,
    threshold: float,
    engine: str,
) -> None:
    """One field, picked by name: drawn with its cells clickable, then the picked cell."""
    st.subheader("A field")
    fields = list(cells.loc[cells["error"].isna(), "image"].unique())
    if not fields:
        return
    name = st.selectbox("Field", fields)  # widget labels are plain text
    found = field_result(name, cells, results, sources)
    if found is None:
        return
    image, result = found
    objects = list(result.segmentation.objects)
    cell_index = [i for i, o in enumerate(objects) if o.is_cell]  # red cell k -> object index
    red = [objects[i] for i in cell_index]
    prob = result.prob
    suspects_only = suspects_ui()
    choices = [k for k in range(len(red)) if not suspects_only or prob[k] >= threshold]
    picked = st.session_state.get("smear_cell")
    highlight = cell_index[picked] if picked is not None and picked < len(red) else None
    view = draw_overlay(image, result.segmentation, prob, highlight=highlight)
    centres = [(o.x + o.w / 2, o.y + o.h / 2) for o in red]
    field_key = f"field_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    st.plotly_chart(
        field_figure(view, centres, choices, prob),
        width="stretch",
        on_select=partial(_pick_cell, field_key),
        selection_mode="points",
        key=field_key,
    )
    timing = f"; {1000 * result.seconds:.0f} ms to find and score" if result.seconds else ""
    st.caption(
        f"{len(red)} red cells (outline blue → red with P(Parasitized)), "
        f"{len(objects) - len(red)} other objects in grey{timing}. Click a cell to see it large."
    )
    if not choices:
        st.info("No cell of this field is at or above the threshold.")
        return
    cell_ui(image, red, choices, prob, model, engine)


def smear_page() -> None:
    st.title("Smear fields")
    model = state.current_model()
    if st.session_state["smear"] is None:  # after a reload, or from a link
        widgets.reopen_linked_run(open_run)
    items = fields_ui()
    if st.button("Find and score cells", type="primary", disabled=not items):
        resources.wait_for_model(model, explainer=False)
        try:
            df, results, run_id = _segment_and_score(
                images.items_key(items), str(model.path), model.sha256, list(items)
            )
        except (ValueError, StoreError) as exc:
            st.error(text.plain(exc))
            st.stop()
        st.session_state.update(
            smear=(df, results, run_id, images.sources_for(items)), smear_cell=None
        )
    if st.session_state["smear"] is None:
        st.info(
            "Nothing scored yet: upload fields and press **Find and score cells**, or reopen "
            "a past run below."
        )
    else:
        run_ui(model)
    widgets.past_runs_ui(SMEAR, open_run=open_run, delete_run=delete_run)


def run_ui(model: ModelFolder) -> None:
    """The smear run on show: totals, summaries and one field with its cells."""
    cells, results, run_id, sources = st.session_state["smear"]
    try:
        info = resources.store().run(run_id)
    except StoreError as exc:  # the store was moved or replaced under a running app
        st.session_state["smear"] = None
        st.error(f"The results on show are gone from the result store ({exc}); score again.")
        st.stop()
    st.query_params.update(run=run_id)
    st.subheader(f"Results · run `{run_id}`")
    st.caption(
        f"**{text.plain(info.title)}** · scored {text.minutes(info.started)} UTC with "
        f"{text.plain(text.model_label(info.weights))}"
    )
    adapted = run_model(info, model).adapted
    domain_ui(cells, adapted=adapted)
    widgets.other_model_warning(info, model, again="Find and score cells")
    threshold = threshold_ui(model)
    cells = cells.assign(prediction=calls(cells["prob_parasitized"], threshold=threshold))
    totals_ui(cells, adapted=adapted)
    summary_ui(cells, run_id, model=model, threshold=threshold, adapted=adapted)
    engine = resources.store().run(run_id).engine  # the engine that gave every P on the page
    field_ui(cells, results, sources, model=model, threshold=threshold, engine=engine)


smear_page()
