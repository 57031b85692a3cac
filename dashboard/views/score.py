import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.export import to_csv_text
from core.labels import CLASSES, predicted_class
from core.metrics import parasitemia_summary
from core.store import StoreError
from dashboard import ui

ERROR = "Error"  # the Prediction filter's name for rows that could not be scored

st.title("Score cells")
model = ui.current_model()
folder, sha = model.path, model.sha256
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
    except (ValueError, StoreError) as exc:  # no image in the upload; a store gone bad
        st.error(ui.plain(exc))
        st.stop()
    st.session_state.update(results=df, run_id=run_id, sources=ui.sources_for(items),
                            run_on_disk=False)

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
    st.subheader(f"Results · run `{run_id}`")
    st.caption(f"Scored {info.started[:16].replace('T', ' ')} UTC with "
               f"{ui.plain(ui.model_label(info.weights))} (sha256 `{info.weights_sha256[:10]}`), "
               f"{len(results):,} files.")
    if info.weights_sha256 != sha:
        st.warning("These results come from another model than the one selected in the "
                   "sidebar; the threshold and screening cutoff below are the selected model's. "
                   "Upload the files again and press **Score** to rescore them with it.")
    threshold = st.slider("Decision threshold on P(Parasitized)", 0.0, 1.0,
                          float(info.threshold), 0.01,
                          help="Starts at the threshold the run was scored with. Cells at or "
                               "above it are called Parasitized; moving it re-labels every "
                               "cell at once.")
    shown = results.assign(prediction=[None if pd.isna(p) else predicted_class(p, threshold)
                                       for p in results["prob_parasitized"]])
    n_err = int(shown["error"].notna().sum())
    n_par = int((shown["prediction"] == CLASSES[0]).sum())
    a, b, c = st.columns(3)
    a.metric("Cells", f"{len(shown):,}")
    b.metric("Called parasitized", f"{n_par:,}")
    c.metric("Errors", f"{n_err:,}")
    if n_err:
        st.warning(f"{n_err} file(s) could not be scored; each is a row with its reason in the "
                   "error column (pick only **Error** under Prediction to list them). Every "
                   "other file was scored.")

    f1, f2 = st.columns(2)
    kinds = list(CLASSES) + [ERROR]
    picked = f1.multiselect("Prediction", kinds, default=kinds)
    lo, hi = f2.slider("Confidence band: P(Parasitized)", 0.0, 1.0, (0.0, 1.0), 0.01,
                       help="Applies to scored cells; error rows have no probability.")
    row_kind = shown["prediction"].fillna(ERROR)
    view = shown[row_kind.isin(picked)
                 & (shown["prob_parasitized"].between(lo, hi) | (row_kind == ERROR))]
    sources = st.session_state["sources"]
    on_disk = st.session_state["run_on_disk"]
    columns = ["path", "case_id", "label", "prob_parasitized", "prediction", "error"]
    limit = 300
    if sources or on_disk:
        view = view.assign(thumb=[ui.thumbnail(p, sources, on_disk=on_disk)
                                  if i < limit and pd.isna(e) else None
                                  for i, (p, e) in enumerate(zip(view["path"], view["error"]))])
        columns = ["thumb"] + columns
    st.dataframe(
        view[columns], hide_index=True, width="stretch", height=420,
        column_config={
            "thumb": st.column_config.ImageColumn("Cell", width="small"),
            "prob_parasitized": st.column_config.ProgressColumn(
                "P(Parasitized)", min_value=0.0, max_value=1.0, format="%.3f"),
        })
    st.caption(f"{len(view):,} rows match the filters"
               + (f"; thumbnails for the first {limit}" if "thumb" in columns
                  and len(view) > limit else "")
               + ("" if "thumb" in columns else "; no thumbnails: a reopened upload keeps its "
                  "results, not its images"))

    st.subheader("Parasitemia")
    group_by = st.radio("Group by", ["case", "folder"], horizontal=True,
                        help="Case: the patient id parsed from the file name (C100...); files "
                             "without one form the group '(no case id)'. Folder: the folder "
                             "each image came from.")
    cutoff = model.screening_cutoff
    summary = parasitemia_summary(shown, group_by=group_by, cutoff=cutoff)
    st.caption(f"A group is flagged **likely infected** when the lower end of its 95% interval "
               f"is above {cutoff:.2%}, the rate at which this model calls truly uninfected "
               "cells parasitized (upper bound, validation patients).")
    fig = go.Figure(go.Bar(
        x=ui.chart_text(summary["group"]), y=summary["parasitemia"],
        error_y=dict(type="data", symmetric=False,
                     array=summary["ci_high"] - summary["parasitemia"],
                     arrayminus=summary["parasitemia"] - summary["ci_low"]),
        marker_color=[ui.BRAND if f else "#9aa5b1" for f in summary["likely_infected"]],
        hovertemplate="%{x}: %{y:.1%}<extra></extra>"))
    fig.add_hline(y=cutoff, line_dash="dot", annotation_text="screening cutoff")
    top = summary["ci_high"].max()
    fig.update_layout(yaxis_title="parasitemia (parasitized / scored)", yaxis_tickformat=".0%",
                      yaxis_range=[0, min(1.0, max(top if pd.notna(top) else 1.0, cutoff) * 1.1)],
                      xaxis_type="category", height=360, margin=dict(t=20, b=20))
    st.plotly_chart(fig, width="stretch")
    st.dataframe(summary, hide_index=True, width="stretch", column_config={
        "group": st.column_config.TextColumn(width="medium"),
        "parasitemia": st.column_config.NumberColumn(format="percent"),
        "ci_low": st.column_config.NumberColumn("95% CI low", format="percent"),
        "ci_high": st.column_config.NumberColumn("95% CI high", format="percent"),
        "mean_prob": st.column_config.NumberColumn(format="%.3f")})
    provenance = dict(run_id=run_id, threshold=threshold,
                      scored_with=ui.model_label(info.weights),
                      scored_with_sha256=info.weights_sha256)
    d1, d2 = st.columns(2)
    d1.download_button(f"Download all {len(shown):,} cells (CSV)",
                       to_csv_text(shown.assign(**provenance)),
                       f"cells_{run_id}.csv", "text/csv",
                       help="Every row of the run, whatever the filters; the prediction column "
                            "follows the threshold above. Each row records the run, that "
                            "threshold and the model that computed the probability.")
    d2.download_button("Download summary (CSV)",
                       to_csv_text(summary.assign(screening_cutoff=cutoff,
                                                  cutoff_from=ui.model_label(folder),
                                                  **provenance)),
                       f"summary_{run_id}_{group_by}.csv", "text/csv")

st.subheader("Past runs")
runs = ui.store().list_runs()
if runs.empty:
    st.caption("No runs yet. Every scoring is saved here and survives reloads and restarts.")
else:
    runs = runs.assign(inputs=[", ".join(json.loads(i))[:80] for i in runs["inputs"]],
                       model=[ui.model_label(w) for w in runs["weights"]],
                       weights_sha256=runs["weights_sha256"].str[:10])
    st.dataframe(runs[["run_id", "started", "inputs", "stored", "parasitized", "errors",
                       "model", "weights_sha256", "kind"]], hide_index=True, width="stretch")
    labels = {r.run_id: f"{r.run_id} · {r.inputs[:50]} · {r.stored:,} files · {r.model}"
              for r in runs.itertuples()}
    pick = st.selectbox("Reopen a run", list(labels), format_func=lambda k: labels[k])
    if st.button("Open run"):
        info = ui.store().run(pick)
        st.session_state.update(results=ui.store().results(pick), run_id=pick, sources={},
                                run_on_disk=info.kind == "files")
        st.rerun()
