import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.evaluation.report import ReportInfo, render_report
from core.inference.store import RUN_FIELDS, StoreError, inputs_summary
from core.schema.export import to_csv_text
from core.schema.labels import CLASSES, predicted_class
from core.schema.metrics import group_of, parasitemia_summary
from core.schema.results import REVIEW_BAND, UNCERTAIN, counted, review
from dashboard import ui

ERROR = "Error"  # the Prediction filter's name for rows that could not be scored
DUPLICATE = "Duplicate"  # ... for files with the same bytes as another file of the run
NOT_COUNTED = "Not counted"  # ... for rows that failed the quality gate
UNCERTAIN_KIND = "Uncertain"  # ... for counted rows inside the review band
FLAGGED, NOT_FLAGGED = ui.BRAND, "#9aa5b1"  # parasitemia bars: likely infected or not


def open_run(run_id: str, cell: str | None = None) -> None:
    """Put a stored run on show (its images too when it scored files of this machine)."""
    info = ui.store().run(run_id)
    st.session_state.update(
        results=ui.store().results(run_id),
        run_id=run_id,
        sources={},
        run_on_disk=info.kind == "files",
        score_cell=cell,
    )


def _delete_run(run_id: str) -> None:
    ui.store().delete_run(run_id)
    ui.forget_run(run_id)


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
    fig.add_vline(x=threshold, line_color=ui.BRAND, annotation_text="threshold")
    fig.update_layout(
        height=130,
        margin=dict(t=20, b=10, l=10, r=10),
        xaxis_range=[0, 1],
        yaxis=dict(type="log", title="cells (log)", showticklabels=False),
        showlegend=False,
        bargap=0.05,
    )
    return fig


def report_ui(
    shown: pd.DataFrame,
    info,
    summary: pd.DataFrame,
    *,
    threshold: float,
    band: float,
    cutoff: float,
    group_by: str,
    sources: dict,
    on_disk: bool,
) -> None:
    """Pick patients and download their printable report (core.evaluation.report)."""
    st.subheader("Report")
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
        same_model = info.weights_sha256 == sha
        report = ReportInfo(
            run_id=info.run_id,
            model=ui.model_label(info.weights),
            sha256=info.weights_sha256,
            threshold=threshold,
            cutoff=cutoff,
            band=band,
            group_by=group_by,
            gate=ui.engine(str(folder), sha).gate.describe() if same_model else "",
        )
        with st.spinner("Drawing the heatmaps…"):
            text = render_report(
                shown,
                report,
                groups=picked,
                read=lambda p: ui.image_of(p, sources, on_disk=on_disk),
                heatmaps=ui.heatmaps(str(folder), sha) if same_model else None,
            )
        st.session_state["report"] = (info.run_id, text)
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


st.title("Score cells")
model = ui.current_model()
folder, sha = model.path, model.sha256
if st.session_state["results"] is None and "run" in st.query_params:  # a reload, or a link
    try:
        open_run(st.query_params["run"], st.query_params.get("cell"))
    except StoreError as exc:
        st.warning(f"The run in this page's link cannot be opened: {ui.plain(exc)}")
st.caption(
    "Upload cell images, a whole folder, or zips of them. Above about 1,000 files put "
    "them in a zip first: the browser uploader fails with more files than that."
)

left, right = st.columns(2)
files = left.file_uploader("Images or zips", type=ui.UPLOAD_TYPES, accept_multiple_files=True)
folder_files = right.file_uploader("A whole folder", accept_multiple_files="directory")
items = ui.uploaded_items(files) + ui.uploaded_items(folder_files)
pending = st.session_state.pop("pending_items", None)
if pending and not items:
    items = pending
    st.info(f"{len(items)} sample cells from the Home page.")

if st.button("Score", type="primary", disabled=not items) or (pending and items == pending):
    try:
        df, run_id = ui.score(items)
    except (ValueError, StoreError) as exc:  # no image in the upload; a store gone bad
        st.error(ui.plain(exc))
        st.stop()
    st.session_state.update(
        results=df, run_id=run_id, sources=ui.sources_for(items), run_on_disk=False, score_cell=None
    )

results: pd.DataFrame | None = st.session_state["results"]
if results is None:
    st.info("Nothing scored yet: upload files and press **Score**, or reopen a past run below.")
else:
    run_id = st.session_state["run_id"]
    try:
        info = ui.store().run(run_id)
    except StoreError as exc:  # the store was moved or replaced under a running app
        st.session_state.update(results=None, run_id=None)
        st.error(f"The results on show are gone from the result store ({exc}); score again.")
        st.stop()
    st.query_params.update(run=run_id)
    st.subheader(f"Results · run `{run_id}`")
    st.caption(
        f"**{ui.plain(info.title)}**"
        + "".join(
            f" · {f} {ui.plain(getattr(info, f))}" for f in RUN_FIELDS[1:] if getattr(info, f)
        )
        + f" · scored {info.started[:16].replace('T', ' ')} UTC with "
        f"{ui.plain(ui.model_label(info.weights))} (sha256 `{info.weights_sha256[:10]}`), "
        f"{len(results):,} files."
    )
    with (
        st.expander("Name this run: sample, operator"),
        st.form(f"describe_{run_id}", border=False),
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
            ui.store().describe_run(run_id, **fields)
            st.rerun()
    if info.weights_sha256 != sha:
        st.warning(
            "These results come from another model than the one selected in the "
            "sidebar; the threshold and screening cutoff below are the selected model's. "
            "Upload the files again and press **Score** to rescore them with it."
        )
    t1, t2 = st.columns([3, 1])
    band = ui.kept(
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
        key=f"threshold_{run_id}",
        help="Kept with the run: it starts where this run was last left. "
        "Cells at or above it are called Parasitized; moving it "
        "re-labels every cell at once. The shaded strip below is the "
        "review band.",
    )
    if threshold != info.threshold:  # reopened, reloaded or exported, the run keeps it
        ui.store().set_threshold(run_id, threshold)
    called = results.assign(
        prediction=[
            None if pd.isna(p) else predicted_class(p, threshold)
            for p in results["prob_parasitized"]
        ]
    )
    shown = called.assign(review=review(called, threshold=threshold, band=band))
    st.plotly_chart(band_strip(shown["prob_parasitized"], threshold, band), width="stretch")
    ok = counted(shown)
    is_dup = shown["duplicate_of"].notna()
    n_err = int(shown["error"].notna().sum())
    n_dup = int(is_dup.sum())
    n_out = int((shown["error"].isna() & ~ok & ~is_dup).sum())
    n_unsure = int((shown["review"] == UNCERTAIN).sum())
    n_par = int((ok & (shown["prediction"] == CLASSES[0])).sum())
    a, b, c, d, e = st.columns(5)
    a.metric(
        "Cells",
        f"{len(shown) - n_dup:,}",
        help="Files scored or given an error row; duplicates are counted once",
    )
    b.metric("Called parasitized", f"{n_par:,}", help="Counted cells only")
    c.metric(
        "For review",
        f"{n_out + n_unsure:,}",
        help=f"{n_out:,} not counted by the quality gate (not a cell, blank, out of "
        f"focus...) and {n_unsure:,} uncertain (inside the review band)",
    )
    d.metric("Errors", f"{n_err:,}")
    e.metric(
        "Duplicates",
        f"{n_dup:,}",
        help="Files with the same bytes as another file of "
        "this run: scored and counted once, as that file",
    )
    if n_err:
        st.warning(
            f"{n_err} file(s) could not be scored; each is a row with its reason in the "
            "error column (pick only **Error** under Prediction to list them). Every "
            "other file was scored."
        )
    if n_dup:
        st.info(
            f"{n_dup} file(s) have the same bytes as another file of this run: each was "
            "scored and counted once, as the file named under *duplicate of* (pick only "
            "**Duplicate** under Prediction to list them)."
        )

    if n_out:
        st.warning(
            f"{n_out:,} image(s) do not look like a single cell crop the model knows "
            "(review column: the reason) and are **not counted** in parasitemia or "
            f"flags; pick **{NOT_COUNTED}** under Prediction to list them. Quality gate: "
            f"{ui.plain(ui.engine(str(folder), sha).gate.describe())}."
        )

    f1, f2 = st.columns(2)
    kinds = list(CLASSES) + [UNCERTAIN_KIND, NOT_COUNTED, DUPLICATE, ERROR]
    picked = ui.kept(
        f1.multiselect, "Prediction", kinds, key="score_kinds", default=kinds, allowed=kinds
    )
    lo, hi = ui.kept(
        f2.slider,
        "Confidence band: P(Parasitized)",
        0.0,
        1.0,
        step=0.01,
        key="score_band",
        default=(0.0, 1.0),
        help="Applies to scored cells; error rows have no probability.",
    )
    row_kind = (
        shown["prediction"]
        .where(shown["review"] != UNCERTAIN, UNCERTAIN_KIND)
        .where(ok | shown["error"].notna() | is_dup, NOT_COUNTED)
        .where(~is_dup, DUPLICATE)
        .fillna(ERROR)
    )
    view = shown[
        row_kind.isin(picked)
        & (shown["prob_parasitized"].between(lo, hi) | row_kind.isin([ERROR, DUPLICATE]))
    ]
    view = view.assign(
        case_id=[
            group_of(p, "case", c)  # as the parasitemia summary names it
            for p, c in zip(view["path"], view["case_id"])
        ]
    )
    sources = st.session_state["sources"]
    on_disk = st.session_state["run_on_disk"]
    columns = [
        "path",
        "prediction",
        "prob_parasitized",
        "review",
        "error",
        "duplicate_of",
        "case_id",
        "label",
    ]
    limit = 300
    if sources or on_disk:
        # made once per run and session: a moved slider or filter reruns the page, and
        # decoding and encoding 300 cells again took most of such a rerun
        memo = st.session_state["score_thumbs"]
        if memo is None or memo[0] != run_id or len(memo[1]) > 10 * limit:
            memo = st.session_state["score_thumbs"] = (run_id, {})
        thumbs = memo[1]

        def thumb(path: str) -> str | None:
            if path not in thumbs:
                thumbs[path] = ui.thumbnail(path, sources, on_disk=on_disk)
            return thumbs[path]

        view = view.assign(
            thumb=[
                thumb(p) if i < limit and pd.isna(e) else None
                for i, (p, e) in enumerate(zip(view["path"], view["error"]))
            ]
        )
        columns = ["thumb"] + columns
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
    if rows:  # a row picked in the table: shown large below (the pick outlives a page switch)
        st.session_state["score_cell"] = view["path"].iloc[rows[0]]
    st.caption(
        f"{len(view):,} rows match the filters; pick a row (the box at its left) to see "
        "the cell large"
        + (
            f"; thumbnails for the first {limit}"
            if "thumb" in columns and len(view) > limit
            else ""
        )
        + (
            ""
            if "thumb" in columns
            else "; no thumbnails: a reopened upload keeps its results, not its images"
        )
    )
    cell = st.session_state["score_cell"]
    if cell in set(shown["path"]):
        st.query_params.update(cell=cell)
        row = shown.set_index("path").loc[cell]
        facts = [f"**{row['prediction'] or 'not scored'}**"]
        if pd.notna(row["prob_parasitized"]):
            facts.append(
                f"P(Parasitized) {row['prob_parasitized']:.3f} at threshold {threshold:.2f}"
            )
        facts += [f"case {ui.plain(group_of(cell, 'case', row['case_id']))}"]
        facts += [
            f"{k} {ui.plain(row[c])}"
            for k, c in (
                ("label", "label"),
                ("review:", "review"),
                ("error:", "error"),
                ("duplicate of", "duplicate_of"),
            )
            if pd.notna(row[c]) and row[c] != ""
        ]
        ui.cell_view(
            cell,
            ui.cell_source(cell, sources, on_disk=on_disk),
            details="  \n".join(facts),
            state_key="score_cell",
            link={"run": run_id, "cell": cell},
        )
    else:
        st.query_params.pop("cell", None)

    st.subheader("Parasitemia")
    group_by = ui.kept(
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
    cutoff = model.screening_cutoff
    summary = parasitemia_summary(shown, group_by=group_by, cutoff=cutoff)
    st.caption(
        f"A group is flagged **likely infected** when the lower end of its 95% interval "
        f"is above {cutoff:.1%}, the rate at which this model calls truly uninfected "
        "cells parasitized (upper bound, validation patients). Only counted cells "
        "(*scored*) enter it: *not_counted* failed the quality gate; *uncertain* are "
        "counted cells inside the review band."
    )
    fig = go.Figure(
        go.Bar(
            x=ui.chart_text(summary["group"]),
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
    st.plotly_chart(fig, width="stretch")
    percent = ["parasitemia", "ci_low", "ci_high"]  # shown as 12.3%, as everywhere on the page
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
            "likely_infected": st.column_config.TextColumn(
                "Flag",
                help="Likely infected: the 95% interval's lower end is above the screening cutoff",
            ),
        },
    )
    provenance = dict(
        run_id=run_id,
        threshold=threshold,
        review_band=band,
        scored_with=ui.model_label(info.weights),
        scored_with_sha256=info.weights_sha256,
    )
    d1, d2 = st.columns(2)
    d1.download_button(
        f"Download all {len(shown):,} cells (CSV)",
        to_csv_text(shown.assign(**provenance)),
        f"cells_{run_id}.csv",
        "text/csv",
        help="Every row of the run, whatever the filters; the prediction column "
        "follows the threshold above. Each row records the run, that "
        "threshold and the model that computed the probability.",
    )
    d2.download_button(
        "Download summary (CSV)",
        to_csv_text(
            summary.assign(
                screening_cutoff=cutoff, cutoff_from=ui.model_label(folder), **provenance
            )
        ),
        f"summary_{run_id}_{group_by}.csv",
        "text/csv",
    )
    report_ui(
        shown,
        info,
        summary,
        threshold=threshold,
        band=band,
        cutoff=cutoff,
        group_by=group_by,
        sources=sources,
        on_disk=on_disk,
    )

st.subheader("Past runs")
runs = ui.store().list_runs()
if runs.empty:
    st.caption("No runs yet. Every scoring is saved here and survives reloads and restarts.")
else:
    runs = runs.assign(
        inputs=[inputs_summary(json.loads(i)) for i in runs["inputs"]],
        model=[ui.model_label(w) for w in runs["weights"]],
        weights_sha256=runs["weights_sha256"].str[:10],
        started=runs["started"].str[:16].str.replace("T", " "),
    )
    st.dataframe(
        runs[
            [
                "run_id",
                "name",
                "sample",
                "operator",
                "started",
                "inputs",
                "stored",
                "parasitized",
                "not_counted",
                "errors",
                "duplicates",
                "threshold",
                "model",
                "weights_sha256",
                "kind",
            ]
        ],
        hide_index=True,
        width="stretch",
        placeholder="",
        column_config={
            "inputs": st.column_config.TextColumn(width="medium"),
            "started": st.column_config.TextColumn("started (UTC)"),
            "threshold": st.column_config.NumberColumn(format="%.2f"),
        },
    )
    labels = {
        r.run_id: f"{r.name or r.inputs} · {r.started} · {r.stored:,} files · {r.run_id}"
        for r in runs.itertuples()
    }
    pick = st.selectbox("Reopen or delete a run", list(labels), format_func=lambda k: labels[k])
    o, x, sure = st.columns([1, 1, 3], vertical_alignment="center")
    # Callbacks, run before the page: a st.rerun() from the page itself would win over a
    # sidebar link clicked while it runs, and that click would be lost.
    o.button("Open run", on_click=open_run, args=(pick,))
    confirmed = sure.checkbox("Yes, delete this run and its results", key=f"sure_{pick}")
    x.button("Delete run", disabled=not confirmed, on_click=_delete_run, args=(pick,))
