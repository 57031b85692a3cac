from functools import partial

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageError
from core.data.sources import read_image
from core.explain.heatmap import DEFAULT_METHOD, for_display
from core.inference.store import inputs_summary
from core.schema.labels import CLASSES, file_name, predicted_class
from core.schema.metrics import binary_metrics, curves
from dashboard import ui

MEANING = {  # what each metric says, for students
    "accuracy": "share of all cells called right",
    "sensitivity": "of the truly parasitized cells, the share called parasitized (recall)",
    "specificity": "of the truly uninfected cells, the share called uninfected",
    "ppv": "positive predictive value: of the cells called parasitized, the share that truly "
    "are (precision)",
    "npv": "negative predictive value: of the cells called uninfected, the share that truly are",
    "f1": "harmonic mean of PPV and sensitivity",
    "mcc": "Matthews correlation coefficient, -1 to 1: 0 is chance, 1 perfect; fair even "
    "when one class is much rarer",
    "auc": "area under the ROC curve: the chance that a parasitized cell scores above an "
    "uninfected one (does not depend on the threshold)",
}


def _take_labelled() -> None:  # the upload is kept while other pages are shown
    st.session_state["evaluate_items"] = (
        ui.uploaded_items(st.session_state.get("evaluate_upload")) or None
    )


def _pick_matrix_cell(choice: str) -> None:
    """A click in the confusion matrix, before the page runs (so the matrix is drawn with the
    cell outlined, and no st.rerun() can swallow a sidebar click). A click on the chosen cell
    again deselects it in Plotly: the gallery stays."""
    points = st.session_state["cm"].selection.points
    if points:
        st.session_state["cm_cell"] = (choice, points[0]["y"], points[0]["x"])


st.title("Evaluate")
model = ui.current_model()
folder, sha = model.path, model.sha256

OOF = "Out-of-fold: all development patients"
TEST = "The model's test split (unseen patients)"
SPLITS = {OOF: "oof", TEST: "test"}
prediction_files = {
    label: model.predictions(part)
    for label, part in SPLITS.items()
    if model.predictions(part).is_file()
}
DATA = [*prediction_files, "A labelled upload"]
choice = ui.kept(
    st.radio, "Data", DATA, horizontal=True, key="evaluate_data", default=DATA[0], allowed=DATA
)
sources = {}
if choice in prediction_files:
    preds = pd.read_csv(prediction_files[choice])
    if choice == OOF:
        folds = (
            (f" (the one of the {preds['fold'].nunique()} fold models that held that patient out)")
            if "fold" in preds
            else ""
        )
        st.caption(
            f"Out-of-fold: each of the {len(preds):,} development cells "
            f"({preds['case_id'].nunique()} patients) predicted by a model that never saw "
            f"its patient{folds}. The heatmaps below come from the selected model, which "
            "may have trained on these patients."
        )
    else:
        st.caption(
            f"{len(preds):,} cells from {preds['case_id'].nunique()} patients that were "
            "never used for training or model selection."
        )
else:
    st.file_uploader(
        "A zip (or files) with Parasitized/ and Uninfected/ folders",
        type=ui.UPLOAD_TYPES,
        accept_multiple_files=True,
        key="evaluate_upload",
        on_change=_take_labelled,
    )
    items = st.session_state["evaluate_items"]
    if not items:
        st.info("Upload a labelled set: images under folders named Parasitized and Uninfected.")
        st.stop()
    if not st.session_state.get("evaluate_upload"):
        kept = inputs_summary([n for n, _ in items])
        st.caption(
            f"The labelled upload from before: {ui.plain(kept)}. Upload other files to replace it."
        )
    try:
        scored, _ = ui.score(items)
    except ValueError as exc:
        st.error(str(exc))
        st.stop()
    preds = scored[scored["error"].isna() & scored["label"].notna()]
    if preds["label"].nunique() < 2:
        st.error(
            "The upload needs labelled images of both classes (folders named "
            "Parasitized and Uninfected)."
        )
        st.stop()
    sources = ui.sources_for(items)

y = (preds["label"] == CLASSES[0]).to_numpy().astype(int)
p = preds["prob_parasitized"].to_numpy()
threshold = ui.kept(
    st.slider,
    "Decision threshold on P(Parasitized)",
    0.0,
    1.0,
    step=0.01,
    key=f"evaluate_threshold_{sha[:12]}",  # each model starts at its own
    default=float(model.contract.threshold),
)
m = binary_metrics(y, p, threshold=threshold)
pred_label = np.array([predicted_class(v, threshold) for v in p])

left, right = st.columns([1, 1])
with left:
    st.subheader("Confusion matrix")
    counts = [[m["tp"], m["fn"]], [m["fp"], m["tn"]]]  # rows: true P, U; cols: pred P, U
    fig = go.Figure(
        go.Heatmap(
            z=counts,
            x=list(CLASSES),
            y=list(CLASSES),
            showscale=False,
            colorscale="Blues",
            text=counts,
            texttemplate="%{text}",
            textfont_size=22,
            hoverinfo="skip",
        )
    )
    # Invisible markers at the cell centres make the matrix clickable; with no hover distance
    # limit a click anywhere picks the nearest centre, i.e. the cell under the pointer.
    fig.add_trace(
        go.Scatter(
            x=[c for _ in CLASSES for c in CLASSES],
            y=[r for r in CLASSES for _ in CLASSES],
            mode="markers",
            marker=dict(size=1, opacity=0),
            hoverinfo="none",
        )
    )
    chosen = st.session_state.get("cm_cell")
    if chosen and chosen[0] == choice:
        col, row = CLASSES.index(chosen[2]), CLASSES.index(chosen[1])
        fig.add_shape(
            type="rect",
            x0=col - 0.5,
            x1=col + 0.5,
            y0=row - 0.5,
            y1=row + 0.5,
            line=dict(color=ui.BRAND, width=5),
        )
    fig.update_layout(
        xaxis_title="predicted",
        yaxis_title="true",
        height=380,
        yaxis_autorange="reversed",
        margin=dict(t=10, b=10),
        showlegend=False,
        hovermode="closest",
        hoverdistance=-1,
        dragmode=False,
    )
    st.plotly_chart(
        fig,
        on_select=partial(_pick_matrix_cell, choice),
        selection_mode="points",
        key="cm",
        width="stretch",
        config={"displayModeBar": False},
    )
with right:
    st.subheader("Metrics")
    table = {
        k: m[k]
        for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "mcc", "auc")
    }
    st.dataframe(
        pd.DataFrame({"metric": table.keys(), "value": table.values()}),
        hide_index=True,
        width="stretch",
        column_config={"value": st.column_config.NumberColumn(format="%.4f")},
    )
    st.caption("  \n".join(f"**{k}**: {MEANING[k]}" for k in table))

if chosen and chosen[0] == choice:
    _, true_cls, pred_cls = chosen
    mask = (preds["label"] == true_cls).to_numpy() & (pred_label == pred_cls)
    cell = preds[mask].assign(distance=np.abs(p[mask] - threshold))
    cell = cell.sort_values("distance", ascending=False).head(12)
    st.subheader(f"True {true_cls}, predicted {pred_cls}: {int(mask.sum())} cells")
    st.caption(
        f"The {len(cell)} most confident, each with the Explain page's default map "
        f"({DEFAULT_METHOD} at {model.contract.target_layer}) for the predicted "
        "class; ✔/✘: its peak on/off the parasite located by the stain rule. Moving "
        "the threshold moves cells between the matrix's cells."
    )
    missing = not sources and ui.images_missing(
        cell["path"].tolist(), prediction_files[choice].name
    )
    images, names, probs = [], [], []
    shown = [] if missing else list(zip(cell["path"], cell["prob_parasitized"]))
    for path, prob in shown:
        try:
            images.append(read_image(sources.get(path) or ui.repo_source(path)))
            names.append(path)
            probs.append(prob)
        except (OSError, ImageError) as exc:
            st.caption(ui.plain(f"{path.rsplit('/', 1)[-1]}: cannot show ({exc})"))
    if images:
        exps = ui.explain(str(folder), sha, images, faithfulness=False, target=pred_cls.lower())
        viewer = st.container()  # the cell picked in the gallery, large, above it
        cols = st.columns(6)
        marks = {True: " · ✔", False: " · ✘", None: ""}
        for i, (img, e, name, prob) in enumerate(zip(images, exps, names, probs)):
            with cols[i % 6]:
                st.image(for_display(img, width=192), width="stretch")
                st.image(
                    for_display(e.overlay, width=192),
                    width="stretch",
                    caption=f"{ui.plain(ui.short_name(file_name(name)))} · "
                    f"p={prob:.3f}{marks[e.points_at_parasite]}",
                )
                if st.button("View large", key=f"view_{name}", icon=":material/zoom_in:"):
                    st.session_state["evaluate_cell"] = name
        picked = st.session_state["evaluate_cell"]
        if picked in names:
            e, prob = exps[names.index(picked)], probs[names.index(picked)]
            with viewer:
                ui.cell_view(
                    picked,
                    sources.get(picked) or ui.repo_source(picked),
                    state_key="evaluate_cell",
                    also=[(for_display(e.overlay), f"{DEFAULT_METHOD} for {pred_cls}")],
                    link={"split": SPLITS[choice], "cell": picked} if not sources else None,
                    details=f"true **{true_cls}**, predicted **{pred_cls}**  \n"
                    f"P(Parasitized) {prob:.3f} at threshold "
                    f"{threshold:.2f}  \ncase "
                    + ui.plain(cell.set_index("path").at[picked, "case_id"]),
                )
else:
    st.caption("Click a cell of the matrix to see its images with their heatmaps.")

roc, pr = curves(y, p)
c1, c2 = st.columns(2)
op_fpr, op_tpr = 1 - m["specificity"], m["sensitivity"]
fig = go.Figure(
    go.Scatter(
        x=roc["fpr"],
        y=roc["tpr"],
        mode="lines",
        name="ROC",
        customdata=roc["threshold"],
        hovertemplate="FPR %{x:.3f}, TPR %{y:.3f}, t=%{customdata:.3f}",
    )
)
fig.add_trace(
    go.Scatter(
        x=[op_fpr],
        y=[op_tpr],
        mode="markers",
        name="threshold",
        marker=dict(size=12, color=ui.BRAND),
    )
)
fig.update_layout(
    title=f"ROC (AUC {m['auc']:.4f})",
    xaxis_title="false positive rate",
    yaxis_title="sensitivity",
    height=360,
    margin=dict(t=40, b=10),
)
c1.plotly_chart(fig, width="stretch")
fig = go.Figure(
    go.Scatter(
        x=pr["recall"],
        y=pr["precision"],
        mode="lines",
        name="PR",
        customdata=pr["threshold"],
        hovertemplate="recall %{x:.3f}, precision %{y:.3f}, t=%{customdata:.3f}",
    )
)
fig.add_trace(
    go.Scatter(
        x=[m["sensitivity"]],
        y=[m["ppv"]],
        mode="markers",
        name="threshold",
        marker=dict(size=12, color=ui.BRAND),
    )
)
fig.update_layout(
    title="Precision-recall",
    xaxis_title="recall (sensitivity)",
    yaxis_title="precision (PPV)",
    height=360,
    margin=dict(t=40, b=10),
)
c2.plotly_chart(fig, width="stretch")

st.subheader("Per patient")
per_case = (
    preds.assign(
        correct=(pred_label == preds["label"]),
        called=pred_label == CLASSES[0],
        parasitized=preds["label"] == CLASSES[0],
    )
    .groupby("case_id")
    .agg(
        cells=("path", "size"),
        accuracy=("correct", "mean"),
        true_parasitized=("parasitized", "sum"),
        called_parasitized=("called", "sum"),
        mean_prob=("prob_parasitized", "mean"),
    )
    .reset_index()
    .sort_values("accuracy")
)
st.dataframe(
    per_case,
    hide_index=True,
    width="stretch",
    column_config={
        "accuracy": st.column_config.NumberColumn(format="%.3f"),
        "mean_prob": st.column_config.NumberColumn(format="%.3f"),
    },
)
