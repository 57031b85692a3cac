"""Score: upload cells (or reopen a stored run), call them at a threshold, filter and look at
them, read the parasitemia per patient or folder, and download the results and a report."""

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.sources import Upload
from core.evaluation.report import render_report, report_info
from core.inference.store import RUN_FIELDS, SCORE, RunInfo, StoreError, inputs_summary
from core.schema.contract import ModelFolder, WeightsError
from core.schema.metrics import group_names, group_of, parasitemia_summary
from core.schema.results import (
    DUPLICATE_KIND,
    ERROR_KIND,
    NOT_COUNTED_KIND,
    REVIEW_BAND,
    ROW_KINDS,
    UNCERTAIN_KIND,
    RunCounts,
    at_threshold,
    row_kinds,
    run_counts,
)
from core.schema.screening import Screening
from dashboard import images, resources, spool, state, text, widgets

FLAGGED, NOT_FLAGGED = text.BRAND, "#9aa5b1"  # parasitemia bars: likely infected or not
THUMBNAILS = 300  # rows of the results table given a thumbnail
ZIP_IT = "Zip a folder of more than a few hundred files first"
TABLE_COLUMNS = [
    "path",
    "prediction",
    "prob_parasitized",
    "review",
    "error",
    "duplicate_of",
    "case_id",
    "label",
]


@dataclass(frozen=True)
class Filters:
    """Which result rows the table lists: rows of these kinds (ROW_KINDS) whose
    P(Parasitized) lies in [low, high] (rows without one, errors and duplicates, pass)."""

    kinds: list[str]
    low: float
    high: float


# --- runs: open, delete (callbacks, run before the page) -----------------------------------


def open_run(run_id: str, cell: str | None = None) -> None:
    """Put a stored run of this page on show (its images too when it scored files of this
    machine). Raises StoreError if there is no such run, or another page made it."""
    info = resources.store().run(run_id, page=SCORE)
    st.session_state.update(
        results=resources.store().results(run_id),
        run_id=run_id,
        sources={},
        run_on_disk=info.kind == "files",
        score_cell=cell,
        score_spooled=[],
    )
    spool.prune(p for _, p in st.session_state["score_uploads"])


def delete_run(run_id: str) -> None:
    resources.store().delete_run(run_id)
    state.forget_run(run_id)


# --- inputs ------------------------------------------------------------------------------


def uploads_ui() -> tuple[list[Upload], bool]:
    """The files to score, as (name, bytes or the file on disk holding them), and whether to
    score them now (Score pressed, or samples handed over from the Home page). What the
    uploaders deliver is written to disk at once and they are drawn empty again."""
    limit = st.get_option("server.maxUploadSize")
    st.caption(
        f"Upload cell images, a whole folder, or zips of them, up to {limit:,} MB a file. "
        f"**{ZIP_IT}**: the folder uploader sends each file on its own (a thousand files take "
        "about a minute, as one zip a second or two) and fails above about 1,000."
    )
    generation = st.session_state["score_uploader"]
    left, right = st.columns(2)
    files = left.file_uploader(
        "Images or zips",
        type=images.UPLOAD_TYPES,
        accept_multiple_files=True,
        key=f"score_files_{generation}",
    )
    folder_files = right.file_uploader(
        "A whole folder",
        accept_multiple_files="directory",
        key=f"score_folder_{generation}",
        help=f"{ZIP_IT}: a zip arrives in one piece, a folder file by file.",
    )
    arrived = [*(files or []), *(folder_files or [])]
    if arrived:  # kept on disk, out of the server's memory; the uploaders forget them
        st.session_state["score_uploads"] = [
            *st.session_state["score_uploads"],
            *spool.keep(arrived),
        ]
        st.session_state["score_uploader"] = generation + 1
        st.rerun()
    items = list(st.session_state["score_uploads"])
    if items:
        u1, u2 = st.columns([4, 1], vertical_alignment="center")
        u1.caption(f"Ready to score: {upload_summary(items)}.")
        u2.button("Clear uploads", on_click=clear_uploads)
    pending = st.session_state.pop("pending_items", None)
    if pending and not items:
        items = pending
        st.info(f"{len(items)} sample cells from the Home page.")
    pressed = st.button("Score", type="primary", disabled=not items)
    return items, pressed or bool(pending and items == pending)


def upload_summary(items: list[Upload]) -> str:
    """How many files, how big, and the first names, for the line above Score."""
    names = sorted({name.split("/")[0] for name, _ in items})
    shown = ", ".join(text.plain(n) for n in names[:3]) + (" …" if len(names) > 3 else "")
    return f"{len(items):,} file(s), {spool.size(items) / 2**20:,.1f} MB ({shown})"


def clear_uploads() -> None:
    st.session_state["score_uploads"] = []
    spool.prune(st.session_state["score_spooled"])


def describe_ui(info: RunInfo) -> None:
    """A form that names the run on show (name, sample, operator) in the store."""
    with (
        st.expander("Name this run: sample, operator"),
        st.form(f"describe_{info.run_id}", border=False),
    ):
        fields = {
            f: st.text_input(
                f.capitalize(),
                getattr(info, f) or "",
                placeholder=(inputs_summary(info.inputs) if f == "name" else "free text"),
            )
            for f in RUN_FIELDS
        }
        if st.form_submit_button("Save"):
            resources.store().describe_run(info.run_id, **fields)
            st.rerun()


def threshold_ui(info: RunInfo) -> tuple[float, float]:
    """(decision threshold, review band half-width); the threshold is kept with the run."""
    t1, t2 = st.columns([3, 1])
    band = state.kept(
        t2.number_input,
        "Review band ±",
        0.0,
        0.5,
        step=0.01,
        key="score_review_band",
        default=REVIEW_BAND,
        help="Counted cells whose P(Parasitized) lies within this distance of the "
        "threshold are marked uncertain and listed for a human. They still "
        "count by their call.",
    )
    threshold = t1.slider(
        "Decision threshold on P(Parasitized)",
        0.0,
        1.0,
        float(info.threshold),
        0.01,
        key=f"threshold_{info.run_id}",
        help="Kept with the run: it starts where this run was last left. "
        "Cells at or above it are called Parasitized; moving it "
        "re-labels every cell at once. The shaded strip below is the "
        "review band.",
    )
    if threshold != info.threshold:  # reopened, reloaded or exported, the run keeps it
        resources.store().set_threshold(info.run_id, threshold)
    return threshold, band


def filters_ui() -> Filters:
    f1, f2 = st.columns(2)
    kinds = list(ROW_KINDS)
    picked = state.kept(
        f1.multiselect, "Prediction", kinds, key="score_kinds", default=kinds, allowed=kinds
    )
    low, high = state.kept(
        f2.slider,
        "Confidence band: P(Parasitized)",
        0.0,
        1.0,
        step=0.01,
        key="score_band",
        default=(0.0, 1.0),
        help="Applies to scored cells; error rows have no probability.",
    )
    return Filters(picked, low, high)


def group_by_ui() -> str:
    return state.kept(
        st.radio,
        "Group by",
        ["case", "folder"],
        horizontal=True,
        key="score_group_by",
        default="case",
        allowed=["case", "folder"],
        help="Case: the patient id parsed from the file name (C100...); files "
        "without one form the group '(no case id)'. Folder: the folder "
        "each image came from.",
    )


# --- drawing -----------------------------------------------------------------------------


def run_header(info: RunInfo, files: int) -> None:
    st.subheader(f"Results · run `{info.run_id}`")
    st.caption(
        f"**{text.plain(info.title)}**"
        + "".join(
            f" · {f} {text.plain(getattr(info, f))}" for f in RUN_FIELDS[1:] if getattr(info, f)
        )
        + f" · scored {text.minutes(info.started)} UTC with "
        f"{text.plain(text.model_label(info.weights))} (sha256 `{info.weights_sha256[:10]}`) "
        f"on the **{info.engine}** engine, {files:,} files."
    )


def band_strip(prob: pd.Series, threshold: float, band: float) -> go.Figure:
    """The scored cells' P(Parasitized) as a histogram under the threshold slider, with the
    threshold and the review band drawn on the same 0-1 scale."""
    fig = go.Figure(
        go.Histogram(
            x=prob.dropna(),
            xbins=dict(start=0, end=1, size=0.02),
            marker_color="#9aa5b1",
            hovertemplate="%{y} cells<extra></extra>",
        )
    )
    fig.add_vrect(
        x0=max(0.0, threshold - band),
        x1=min(1.0, threshold + band),
        fillcolor="#e8a33d",
        opacity=0.3,
        line_width=0,
        annotation_text="review band",
        annotation_position="top left",
    )
    fig.add_vline(x=threshold, line_color=text.BRAND, annotation_text="threshold")
    fig.update_layout(
        height=130,
        margin=dict(t=20, b=10, l=10, r=10),
        xaxis_range=[0, 1],
        yaxis=dict(type="log", title="cells (log)", showticklabels=False),
        showlegend=False,
        bargap=0.05,
    )
    return fig


def counts_ui(counts: RunCounts, model: ModelFolder) -> None:
    """The run's counts as metrics, and what its errors, duplicates and uncounted cells mean."""
    a, b, c, d, e = st.columns(5)
    a.metric(
        "Cells",
        f"{counts.cells:,}",
        help="Files scored or given an error row; duplicates are counted once",
    )
    b.metric("Called parasitized", f"{counts.parasitized:,}", help="Counted cells only")
    c.metric(
        "For review",
        f"{counts.for_review:,}",
        help=f"{counts.not_counted:,} not counted by the quality gate (not a cell, blank, out "
        f"of focus...) and {counts.uncertain:,} uncertain (inside the review band)",
    )
    d.metric("Errors", f"{counts.errors:,}")
    e.metric(
        "Duplicates",
        f"{counts.duplicates:,}",
        help="Files with the same bytes as another file of "
        "this run: scored and counted once, as that file",
    )
    if counts.errors:
        st.warning(
            f"{counts.errors} file(s) could not be scored; each is a row with its reason in the "
            f"error column (pick only **{ERROR_KIND}** under Prediction to list them). Every "
            "other file was scored."
        )
    if counts.duplicates:
        st.info(
            f"{counts.duplicates} file(s) have the same bytes as another file of this run: each "
            "was scored and counted once, as the file named under *duplicate of* (pick only "
            f"**{DUPLICATE_KIND}** under Prediction to list them)."
        )
    if counts.not_counted:
        gate = resources.engine(str(model.path), model.sha256).gate.describe()
        st.warning(
            f"{counts.not_counted:,} image(s) do not look like a single cell crop the model "
            "knows (review column: the reason) and are **not counted** in parasitemia or "
            f"flags; pick **{NOT_COUNTED_KIND}** under Prediction to list them. Quality gate: "
            f"{text.plain(gate)}."
        )


def matching(shown: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    """The rows of ``shown`` that ``filters`` let through, their case named as the
    parasitemia summary names it."""
    kinds = row_kinds(shown)
    view = shown[
        kinds.isin(filters.kinds)
        & (
            shown["prob_parasitized"].between(filters.low, filters.high)
            | kinds.isin([ERROR_KIND, DUPLICATE_KIND])
        )
    ]
    return view.assign(case_id=group_names(view, group_by="case"))


def with_thumbnails(view: pd.DataFrame, run_id: str, sources: dict, on_disk: bool) -> pd.DataFrame:
    """``view`` with a ``thumb`` column for its first THUMBNAILS scored rows. Made once per
    run and session: a moved slider or filter reruns the page, and decoding and encoding 300
    cells again took most of such a rerun."""
    memo = st.session_state["score_thumbs"]
    if memo is None or memo[0] != run_id or len(memo[1]) > 10 * THUMBNAILS:
        memo = st.session_state["score_thumbs"] = (run_id, {})
    thumbs = memo[1]

    def thumb(path: str) -> str | None:
        if path not in thumbs:
            thumbs[path] = images.thumbnail(path, sources, on_disk=on_disk)
        return thumbs[path]

    return view.assign(
        thumb=[
            thumb(p) if i < THUMBNAILS and pd.isna(e) else None
            for i, (p, e) in enumerate(zip(view["path"], view["error"]))
        ]
    )


def results_table(view: pd.DataFrame, columns: list[str]) -> str | None:
    """The filtered rows as a table; the path of the row picked in it, if any."""
    table = st.dataframe(
        view[columns],
        hide_index=True,
        width="stretch",
        placeholder="",
        key="score_table",
        on_select="rerun",
        selection_mode="single-row",
        column_config={
            "thumb": st.column_config.ImageColumn("Cell", width="small"),
            "path": st.column_config.TextColumn("File", width="medium"),
            "prob_parasitized": st.column_config.ProgressColumn(
                "P(Parasitized)", min_value=0.0, max_value=1.0, format="%.3f"
            ),
            "error": st.column_config.TextColumn("Error", width="medium"),
            "duplicate_of": st.column_config.TextColumn("Duplicate of", width="medium"),
            "case_id": st.column_config.TextColumn("Case"),
            "review": st.column_config.TextColumn(
                "Review",
                help="Why a human should look: the quality gate's reason (not "
                "counted) or 'uncertain' (inside the review band, counted)",
            ),
        },
    )
    rows = table.selection.rows
    return view["path"].iloc[rows[0]] if rows else None


def table_caption(rows: int, thumbnails: bool) -> str:
    return (
        f"{rows:,} rows match the filters; pick a row (the box at its left) to see the cell large"
        + (f"; thumbnails for the first {THUMBNAILS}" if thumbnails and rows > THUMBNAILS else "")
        + (
            ""
            if thumbnails
            else "; no thumbnails: a reopened upload keeps its results, not its images"
        )
    )


def cell_facts(cell: str, rows: pd.DataFrame, threshold: float) -> str:
    """What the results say of one cell (its row of ``rows``, as :func:`at_threshold` gives
    them), as Markdown lines (names escaped), headed by its kind: its call, or why it has
    none (not counted, error, duplicate)."""
    row = rows.iloc[0]
    kind = row_kinds(rows).iloc[0]
    facts = [f"**{row['prediction'] if kind == UNCERTAIN_KIND else kind}**"]
    if pd.notna(row["prob_parasitized"]):
        facts.append(f"P(Parasitized) {row['prob_parasitized']:.3f} at threshold {threshold:.2f}")
    facts += [f"case {text.plain(group_of(cell, 'case', row['case_id']))}"]
    facts += [
        f"{k} {text.plain(row[c])}"
        for k, c in (
            ("label", "label"),
            ("review:", "review"),
            ("error:", "error"),
            ("duplicate of", "duplicate_of"),
        )
        if pd.notna(row[c]) and row[c] != ""
    ]
    return "  \n".join(facts)


def picked_cell_ui(shown: pd.DataFrame, run_id: str, threshold: float, sources, on_disk) -> None:
    """The cell picked in the table, large, named in the page's address."""
    cell = st.session_state["score_cell"]
    rows = shown[shown["path"] == cell]
    if rows.empty:
        st.query_params.pop("cell", None)
        return
    st.query_params.update(cell=cell)
    widgets.cell_view(
        cell,
        images.cell_source(cell, sources, on_disk=on_disk),
        details=cell_facts(cell, rows, threshold),
        state_key="score_cell",
        link={"run": run_id, "cell": cell},
    )


def parasitemia_chart(summary: pd.DataFrame, screening: Screening) -> go.Figure:
    """Parasitemia per group with its 95% interval, flagged groups in the brand colour, and
    the screening cutoff where the flag's rule has one."""
    fig = go.Figure(
        go.Bar(
            x=text.chart_text(summary["group"]),
            y=summary["parasitemia"],
            showlegend=False,
            error_y=dict(
                type="data",
                symmetric=False,
                array=summary["ci_high"] - summary["parasitemia"],
                arrayminus=summary["parasitemia"] - summary["ci_low"],
            ),
            marker_color=[FLAGGED if f else NOT_FLAGGED for f in summary["likely_infected"]],
            hovertemplate="%{x}: %{y:.1%}<extra></extra>",
        )
    )
    for color, name in ((FLAGGED, "likely infected"), (NOT_FLAGGED, "not flagged")):  # legend
        fig.add_trace(go.Bar(x=[None], y=[None], marker_color=color, name=name))
    cutoff = screening.cutoff if screening.rule == "interval" else 0.0
    if cutoff:
        fig.add_hline(y=cutoff, line_dash="dot", annotation_text="screening cutoff")
    top = summary["ci_high"].max()
    fig.update_layout(
        yaxis_title="parasitemia (parasitized / scored)",
        yaxis_tickformat=".0%",
        yaxis_range=[0, min(1.0, max(top if pd.notna(top) else 1.0, cutoff) * 1.1)],
        xaxis_type="category",
        height=360,
        margin=dict(t=20, b=20),
        legend=dict(orientation="h", y=1.08, x=0),
    )
    return fig


def summary_table(summary: pd.DataFrame) -> None:
    percent = ["parasitemia", "ci_low", "ci_high"]  # shown as 12.3%, as everywhere on the page
    flag_first = ["group", "likely_infected"]  # the flag in view beside its group, not last
    summary = summary[flag_first + [c for c in summary if c not in flag_first]]
    st.dataframe(
        summary.assign(
            **{c: summary[c] * 100 for c in percent},
            likely_infected=summary["likely_infected"].map({True: "⚑ likely infected", False: ""}),
        ),
        hide_index=True,
        width="stretch",
        placeholder="",
        column_config={
            "group": st.column_config.TextColumn(width="medium"),
            "parasitemia": st.column_config.NumberColumn(format="%.1f%%"),
            "ci_low": st.column_config.NumberColumn("95% CI low", format="%.1f%%"),
            "ci_high": st.column_config.NumberColumn("95% CI high", format="%.1f%%"),
            "mean_prob": st.column_config.NumberColumn(format="%.3f"),
            "confident": st.column_config.NumberColumn(
                "confident calls", help="counted cells at the flag's call threshold or above"
            ),
            "flag_p": st.column_config.NumberColumn(
                "flag p-value",
                format="%.2g",
                help="how often a healthy patient's cells give this many confident calls",
            ),
            "likely_infected": st.column_config.TextColumn(
                "Flag", help="Likely infected: see the rule above the table"
            ),
            "flag_rule": None,
        },
    )


def parasitemia_ui(shown: pd.DataFrame, screening: Screening) -> tuple[str, pd.DataFrame]:
    """The parasitemia per group, chart and table; (group by, summary)."""
    st.subheader("Parasitemia")
    group_by = group_by_ui()
    summary = parasitemia_summary(shown, group_by=group_by, screening=screening)
    st.caption(
        f"A group is flagged **likely infected** when {screening.describe()}. "
        "Only counted cells (*scored*) enter it: *not_counted* failed the quality gate; "
        "*uncertain* are counted cells inside the review band."
    )
    st.plotly_chart(parasitemia_chart(summary, screening), width="stretch")
    summary_table(summary)
    return group_by, summary


def downloads_ui(
    shown: pd.DataFrame,
    summary: pd.DataFrame,
    info: RunInfo,
    *,
    model: ModelFolder,
    threshold: float,
    band: float,
    group_by: str,
) -> None:
    """Every row of the run and the summary as CSVs, each row saying how it was made."""
    provenance = widgets.provenance(
        info.run_id, threshold, info.weights, info.weights_sha256, review_band=band
    )
    widgets.csv_downloads(
        (
            f"Download all {len(shown):,} cells (CSV)",
            shown.assign(**provenance),
            f"cells_{info.run_id}.csv",
            "Every row of the run, whatever the filters; the prediction column follows the "
            "threshold above. Each row records the run, that threshold and the model that "
            "computed the probability.",
        ),
        (
            "Download summary (CSV)",
            summary.assign(
                flag_from=text.model_label(model.path),
                **provenance,
            ),
            f"summary_{info.run_id}_{group_by}.csv",
            None,
        ),
    )


def report_ui(
    shown: pd.DataFrame,
    info: RunInfo,
    summary: pd.DataFrame,
    *,
    threshold: float,
    band: float,
    group_by: str,
    sources: dict,
    on_disk: bool,
) -> None:
    """Pick patients and download their printable report (core.evaluation.report): every number
    and heatmap from the run's own model, whichever is selected in the sidebar; refused, with
    the reason, when that model is no longer what the run was scored with."""
    st.subheader("Report")
    try:
        report = report_info(info, threshold=threshold, band=band, group_by=group_by)
    except WeightsError as exc:
        st.warning(f"No report of this run: {text.plain(exc)}")
        return
    groups = list(summary["group"])
    r1, r2 = st.columns([3, 1])
    picked = r1.multiselect(
        "Patients (or folders) in the report",
        groups,
        default=groups[:1] if len(groups) > 20 else groups,
        help="One section per patient: counts, parasitemia with its "
        "interval, the flag, the cells for review and a gallery of "
        "the most suspicious cells with heatmaps.",
    )
    if r2.button("Make report", disabled=not picked):
        with st.spinner("Drawing the heatmaps…"):
            html = render_report(
                shown,
                replace(report, model=text.model_label(info.weights)),
                groups=picked,
                read=lambda p: images.image_of(p, sources, on_disk=on_disk),
                heatmaps=resources.heatmaps(info.weights, info.weights_sha256),
            )
        st.session_state["report"] = (info.run_id, html)
    made = st.session_state.get("report")
    if made and made[0] == info.run_id:
        st.download_button(
            "Download report (HTML)",
            made[1],
            f"report_{info.run_id}.html",
            "text/html",
            type="primary",
            help="Self-contained: open it in a browser to print or save as PDF",
        )


def results_ui(results: pd.DataFrame, model: ModelFolder) -> None:
    """The run on show: its header, threshold, counts, table, picked cell, parasitemia,
    downloads and report."""
    run_id = st.session_state["run_id"]
    try:
        info = resources.store().run(run_id)
    except StoreError as exc:  # the store was moved or replaced under a running app
        st.session_state.update(results=None, run_id=None)
        st.error(f"The results on show are gone from the result store ({exc}); score again.")
        st.stop()
    st.query_params.update(run=run_id)
    run_header(info, len(results))
    describe_ui(info)
    widgets.other_model_warning(info, model, again="Score")
    threshold, band = threshold_ui(info)
    shown = at_threshold(results, threshold=threshold, band=band)
    st.plotly_chart(band_strip(shown["prob_parasitized"], threshold, band), width="stretch")
    counts_ui(run_counts(shown), model)

    view = matching(shown, filters_ui())
    sources = st.session_state["sources"]
    on_disk = st.session_state["run_on_disk"]
    columns = TABLE_COLUMNS
    if sources or on_disk:
        view = with_thumbnails(view, run_id, sources, on_disk)
        columns = ["thumb", *TABLE_COLUMNS]
    picked = results_table(view, columns)
    if picked is not None:  # shown large below (the pick outlives a page switch)
        st.session_state["score_cell"] = picked
    st.caption(table_caption(len(view), "thumb" in columns))
    picked_cell_ui(shown, run_id, threshold, sources, on_disk)

    group_by, summary = parasitemia_ui(shown, model.screening)
    downloads_ui(
        shown, summary, info, model=model, threshold=threshold, band=band, group_by=group_by
    )
    report_ui(
        shown,
        info,
        summary,
        threshold=threshold,
        band=band,
        group_by=group_by,
        sources=sources,
        on_disk=on_disk,
    )


def score_page() -> None:
    st.title("Score cells")
    model = state.current_model()
    if st.session_state["results"] is None:  # after a reload, or from a link
        widgets.reopen_linked_run(lambda run: open_run(run, st.query_params.get("cell")))
    items, start = uploads_ui()
    if start:
        try:
            df, run_id = resources.score(items, model)
        except (ValueError, StoreError) as exc:  # no image in the upload; a store gone bad
            st.error(text.plain(exc))
            st.stop()
        on_disk = [p for _, p in items if isinstance(p, Path)]
        st.session_state.update(
            results=df,
            run_id=run_id,
            sources=images.sources_for(items),
            run_on_disk=False,
            score_cell=None,
            score_spooled=on_disk,
        )
        spool.prune([*on_disk, *(p for _, p in st.session_state["score_uploads"])])
    results = st.session_state["results"]
    if results is None:
        st.info("Nothing scored yet: upload files and press **Score**, or reopen a past run below.")
    else:
        results_ui(results, model)
    widgets.past_runs_ui(SCORE, open_run=open_run, delete_run=delete_run)


score_page()
