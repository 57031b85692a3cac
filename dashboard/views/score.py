import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data import CLASSES, predicted_class
from core.metrics import parasitemia_summary
from core.score import screening_cutoff
from dashboard import ui

st.title("Score cells")
folder, card, sha = ui.current_model()
st.caption("Upload cell images, a whole folder, or zips of them. Above about 1,000 files put "
           "them in a zip first: the browser uploader fails with more files than that.")

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
    except ValueError as exc:  # no image in the upload
        st.error(str(exc))
        st.stop()
    st.session_state.update(results=df, run_id=run_id, sources=ui.sources_for(items),
                            run_on_disk=False)

results: pd.DataFrame | None = st.session_state["results"]
if results is None:
    st.info("Nothing scored yet: upload files and press **Score**, or reopen a past run below.")
else:
    st.subheader(f"Results · run `{st.session_state['run_id']}`")
    threshold = st.slider("Decision threshold on P(Parasitized)", 0.0, 1.0,
                          float(card["contract"]["threshold"]), 0.01,
                          help="Cells at or above it are called Parasitized; moving it "
                               "re-labels every cell at once.")
    shown = results.assign(prediction=[None if pd.isna(p) else predicted_class(p, threshold)
                                       for p in results["prob_parasitized"]])
    n_err = int(shown["error"].notna().sum())
    n_par = int((shown["prediction"] == CLASSES[0]).sum())
    a, b, c = st.columns(3)
    a.metric("Cells", f"{len(shown):,}")
    b.metric("Called parasitized", f"{n_par:,}")
    c.metric("Errors", f"{n_err:,}")
    if n_err:
        st.warning(f"{n_err} file(s) could not be scored; their reason is in the error column. "
                   "Every other file was scored.")

    f1, f2, f3 = st.columns([2, 2, 1])
    classes = f1.multiselect("Prediction", list(CLASSES), default=list(CLASSES))
    lo, hi = f2.slider("Confidence band: P(Parasitized)", 0.0, 1.0, (0.0, 1.0), 0.01)
    errors_only = f3.toggle("Errors only")
    if errors_only:
        view = shown[shown["error"].notna()]
    else:
        view = shown[shown["prediction"].isin(classes)
                     & shown["prob_parasitized"].between(lo, hi)]
    sources = st.session_state["sources"]
    limit = 300
    on_disk = st.session_state["run_on_disk"]
    view = view.assign(thumb=[ui.thumbnail(p, sources, on_disk=on_disk)
                              if i < limit and pd.isna(e) else None
                              for i, (p, e) in enumerate(zip(view["path"], view["error"]))])
    st.dataframe(
        view[["thumb", "path", "case_id", "label", "prob_parasitized", "prediction", "error"]],
        hide_index=True, width="stretch", height=420,
        column_config={
            "thumb": st.column_config.ImageColumn("Cell", width="small"),
            "prob_parasitized": st.column_config.ProgressColumn(
                "P(Parasitized)", min_value=0.0, max_value=1.0, format="%.3f"),
        })
    st.caption(f"{len(view):,} rows match the filters"
               + (f"; thumbnails for the first {limit}" if len(view) > limit else ""))

    st.subheader("Parasitemia")
    group_by = st.radio("Group by", ["case", "folder"], horizontal=True,
                        help="Case: the patient id parsed from the file name (C100...). "
                             "Folder: the folder each image came from.")
    cutoff = screening_cutoff(card)
    summary = parasitemia_summary(shown, group_by=group_by, cutoff=cutoff)
    st.caption(f"A group is flagged **likely infected** when the lower end of its 95% interval "
               f"is above {cutoff:.2%}, the rate at which this model calls truly uninfected "
               "cells parasitized (upper bound, validation patients).")
    fig = go.Figure(go.Bar(
        x=summary["group"], y=summary["parasitemia"],
        error_y=dict(type="data", symmetric=False,
                     array=summary["ci_high"] - summary["parasitemia"],
                     arrayminus=summary["parasitemia"] - summary["ci_low"]),
        marker_color=["#8e244d" if f else "#9aa5b1" for f in summary["likely_infected"]],
        hovertemplate="%{x}: %{y:.1%}<extra></extra>"))
    fig.add_hline(y=cutoff, line_dash="dot", annotation_text="screening cutoff")
    fig.update_layout(yaxis_title="parasitemia (parasitized / scored)", yaxis_tickformat=".0%",
                      height=360, margin=dict(t=20, b=20))
    st.plotly_chart(fig, width="stretch")
    st.dataframe(summary, hide_index=True, width="stretch", column_config={
        "parasitemia": st.column_config.NumberColumn(format="percent"),
        "ci_low": st.column_config.NumberColumn("95% CI low", format="percent"),
        "ci_high": st.column_config.NumberColumn("95% CI high", format="percent"),
        "mean_prob": st.column_config.NumberColumn(format="%.3f")})
    d1, d2 = st.columns(2)
    d1.download_button("Download cells (CSV)", shown.to_csv(index=False), "cells.csv",
                       "text/csv")
    d2.download_button("Download summary (CSV)", summary.to_csv(index=False), "summary.csv",
                       "text/csv")

st.subheader("Past runs")
runs = ui.store().list_runs()
if runs.empty:
    st.caption("No runs yet. Every scoring is saved here and survives reloads and restarts.")
else:
    runs = runs.assign(inputs=[", ".join(json.loads(i))[:80] for i in runs["inputs"]],
                       weights_sha256=runs["weights_sha256"].str[:10])
    st.dataframe(runs[["run_id", "started", "inputs", "stored", "parasitized", "errors",
                       "weights_sha256", "engine"]], hide_index=True, width="stretch")
    pick = st.selectbox("Reopen a run", runs["run_id"])
    if st.button("Open run"):
        info = ui.store().run(pick)
        if info.weights_sha256 != sha:
            st.warning(f"Run {pick} was scored with another model (sha256 "
                       f"{info.weights_sha256[:10]}); the threshold and cutoff shown are the "
                       "current model's.")
        st.session_state.update(results=ui.store().results(pick), run_id=pick, sources={},
                                run_on_disk=info.kind == "files")
        st.rerun()
