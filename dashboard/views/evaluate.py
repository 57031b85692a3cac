"""Evaluate: the model on labelled cells (its out-of-fold or test predictions, or a labelled
upload) at a threshold: a clickable confusion matrix with each cell's images and heatmaps,
the metrics, ROC and precision-recall curves, and the accuracy per patient."""

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageError
from core.data.sources import ImageSource, read_image
from core.explain.heatmap import DEFAULT_METHOD, for_display
from core.inference.store import EVALUATE, inputs_summary
from core.schema.calibration import (
    ECE_BINS,
    cross_fitted,
    expected_calibration_error,
    reliability,
    rescale,
)
from core.schema.contract import ModelFolder
from core.schema.labels import CLASSES, file_name, is_parasitized
from core.schema.metrics import binary_metrics, confusion_cell, curves, per_case
from dashboard import images, resources, state, stored, text, widgets

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
OOF = "Out-of-fold: all development patients"
TEST = "The model's test split (unseen patients)"
UPLOAD = "A labelled upload"
SPLITS = {OOF: "oof", TEST: "test"}
PAGE = "evaluate"  # its address: state.show_address
GALLERY = 12  # cells of a confusion-matrix cell shown, the most confident first


@dataclass(frozen=True)
class Labelled:
    """The labelled predictions on show (path, case_id, label, prob_parasitized), which data
    they are (one of the Data choices), and the images of an upload by path (empty for a
    predictions file, whose paths are read from the repository)."""

    choice: str
    predictions: pd.DataFrame
    sources: dict[str, ImageSource] = field(default_factory=dict)
    file: str = ""  # the predictions file's name, for a warning when its images are missing


# --- callbacks, run before the page --------------------------------------------------------


def _take_labelled() -> None:  # the upload is kept while other pages are shown
    st.session_state["evaluate_items"] = (
        images.uploaded_items(st.session_state.get("evaluate_upload")) or None
    )


def _pick_matrix_cell(choice: str) -> None:
    """A click in the confusion matrix, before the page runs (so the matrix is drawn with the
    cell outlined, and no st.rerun() can swallow a sidebar click). A click on the chosen cell
    again deselects it in Plotly: the gallery stays."""
    points = st.session_state["cm"].selection.points
    if points:
        st.session_state["cm_cell"] = (choice, points[0]["y"], points[0]["x"])


# --- inputs ------------------------------------------------------------------------------


def predictions_caption(preds: pd.DataFrame, *, oof: bool) -> str:
    if not oof:
        return (
            f"{len(preds):,} cells from {preds['case_id'].nunique()} patients that were "
            "never used for training or model selection."
        )
    folds = (
        f" (the one of the {preds['fold'].nunique()} fold models that held that patient out)"
        if "fold" in preds
        else ""
    )
    return (
        f"Out-of-fold: each of the {len(preds):,} development cells "
        f"({preds['case_id'].nunique()} patients) predicted by a model that never saw "
        f"its patient{folds}. The heatmaps below come from the selected model, which "
        "may have trained on these patients."
    )


def labelled_upload_ui(model: ModelFolder) -> tuple[pd.DataFrame, dict[str, ImageSource]]:
    """(the scored labelled cells of an upload, their images); st.info or st.error and stop
    when there is no usable upload."""
    st.file_uploader(
        "A zip (or files) with Parasitized/ and Uninfected/ folders",
        type=images.UPLOAD_TYPES,
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
            f"The labelled upload from before: {text.plain(kept)}. Upload other files to "
            "replace it."
        )
    try:
        scored, _ = resources.score(items, model, page=EVALUATE)
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
    return preds, images.sources_for(items)


def follow_link(parts: list[str]) -> None:
    """The data and matrix cell that a link to the page names (``?data=oof&true=Parasitized
    &predicted=Uninfected``: the missed parasites of the out-of-fold predictions), among
    ``parts``, the model folder's predictions; a bad link is one warning."""
    params = state.followed_link(PAGE)
    if not params:
        return
    part, true, predicted = (params.get(k) for k in ("data", "true", "predicted"))
    if part not in parts:
        st.warning(
            f"The data in this page's link ({text.plain(str(part)[:60])}) is not one of this "
            f"model's predictions ({', '.join(parts) or 'none'})."
        )
        return
    choice = next(label for label, p in SPLITS.items() if p == part)
    state.preset("evaluate_data", choice)
    if true is None and predicted is None:
        st.session_state["cm_cell"] = None
    elif true in CLASSES and predicted in CLASSES:
        st.session_state.update(cm_cell=(choice, true, predicted), evaluate_cell=None)
    else:
        st.warning(
            "The matrix cell in this page's link must be given as true= and predicted=, each "
            f"one of {', '.join(CLASSES)}."
        )


def data_ui(model: ModelFolder) -> Labelled:
    """Which labelled predictions to evaluate: the model folder's out-of-fold or test
    predictions (whichever it has), or a labelled upload, scored here."""
    files = {label: model.predictions(part) for label, part in SPLITS.items()}
    files = {label: path for label, path in files.items() if path.is_file()}
    follow_link([SPLITS[label] for label in files])
    choices = [*files, UPLOAD]
    choice = state.kept(
        st.radio,
        "Data",
        choices,
        horizontal=True,
        key="evaluate_data",
        default=choices[0],
        allowed=choices,
    )
    if choice in files:
        preds = stored.predictions(model, SPLITS[choice])
        st.caption(predictions_caption(preds, oof=choice == OOF))
        return Labelled(choice, preds, file=files[choice].name)
    return Labelled(choice, *labelled_upload_ui(model))


def threshold_ui(model: ModelFolder) -> float:
    return state.kept(
        st.slider,
        "Decision threshold on P(Parasitized)",
        0.0,
        1.0,
        step=0.01,
        key=f"evaluate_threshold_{model.sha256[:12]}",  # each model starts at its own
        default=float(model.contract.threshold),
    )


# --- drawing -----------------------------------------------------------------------------


def confusion_matrix(m: dict, chosen: tuple[str, str] | None) -> go.Figure:
    """The confusion counts of ``m`` (binary_metrics), clickable cell by cell; ``chosen``
    (true class, predicted class) outlined."""
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
    if chosen:
        col, row = CLASSES.index(chosen[1]), CLASSES.index(chosen[0])
        fig.add_shape(
            type="rect",
            x0=col - 0.5,
            x1=col + 0.5,
            y0=row - 0.5,
            y1=row + 0.5,
            line=dict(color=text.BRAND, width=5),
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
    return fig


def metrics_table(m: dict) -> None:
    """The threshold's metrics, each with what it says."""
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


def gallery_ui(
    data: Labelled, chosen: tuple[str, str], threshold: float, model: ModelFolder
) -> None:
    """The most confident cells of the chosen confusion-matrix cell, each with the default map
    for the predicted class; one of them large above, on request."""
    true_cls, pred_cls = chosen
    members = confusion_cell(
        data.predictions, threshold=threshold, true=true_cls, predicted=pred_cls
    )
    cell = members.head(GALLERY)
    st.subheader(f"True {true_cls}, predicted {pred_cls}: {len(members)} cells")
    st.caption(
        f"The {len(cell)} most confident, each with the Explain page's default map "
        f"({DEFAULT_METHOD} at {model.contract.target_layer}) for the predicted "
        "class; ✔/✘: its peak on/off the parasite located by the stain rule. Moving "
        "the threshold moves cells between the matrix's cells."
    )
    sources = data.sources
    missing = not sources and images.images_missing(cell["path"].tolist(), data.file)
    pictures, names, probs = [], [], []
    for path, prob in [] if missing else zip(cell["path"], cell["prob_parasitized"]):
        try:
            pictures.append(read_image(sources.get(path) or images.repo_source(path)))
            names.append(path)
            probs.append(prob)
        except (OSError, ImageError) as exc:
            st.caption(text.plain(f"{path.rsplit('/', 1)[-1]}: cannot show ({exc})"))
    if not pictures:
        return
    resources.wait_for_model(model)
    exps = resources.explain(
        str(model.path), model.sha256, pictures, faithfulness=False, target=pred_cls.lower()
    )
    viewer = st.container()  # the cell picked in the gallery, large, above it
    cols = st.columns(6)
    marks = {True: " · ✔", False: " · ✘", None: ""}
    for i, (img, e, name, prob) in enumerate(zip(pictures, exps, names, probs)):
        with cols[i % 6]:
            st.image(for_display(img, width=192), width="stretch")
            st.image(
                for_display(e.overlay, width=192),
                width="stretch",
                caption=f"{text.plain(text.short_name(file_name(name)))} · "
                f"p={prob:.3f}{marks[e.points_at_parasite]}",
            )
            if st.button("View large", key=f"view_{name}", icon=":material/zoom_in:"):
                st.session_state["evaluate_cell"] = name
    picked = st.session_state["evaluate_cell"]
    if picked in names:
        e, prob = exps[names.index(picked)], probs[names.index(picked)]
        with viewer:
            widgets.cell_view(
                picked,
                sources.get(picked) or images.repo_source(picked),
                state_key="evaluate_cell",
                also=[(for_display(e.overlay), f"{DEFAULT_METHOD} for {pred_cls}")],
                link={"split": SPLITS[data.choice], "cell": picked} if not sources else None,
                details=f"true **{true_cls}**, predicted **{pred_cls}**  \n"
                f"P(Parasitized) {prob:.3f} at threshold "
                f"{threshold:.2f}  \ncase "
                + text.plain(cell.set_index("path").at[picked, "case_id"]),
            )


def curve_figure(
    curve: pd.DataFrame,
    x: str,
    y: str,
    *,
    name: str,
    hover: str,
    point: tuple[float, float],
    title: str,
    axes: tuple[str, str],
) -> go.Figure:
    """A curve over the thresholds (``curve``'s columns ``x``, ``y`` and ``threshold``, which
    the hover shows) and the threshold in use, ``point``, as a marker on it."""
    fig = go.Figure(
        go.Scatter(
            x=curve[x],
            y=curve[y],
            mode="lines",
            name=name,
            customdata=curve["threshold"],
            hovertemplate=hover,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[point[0]],
            y=[point[1]],
            mode="markers",
            name="threshold",
            marker=dict(size=12, color=text.BRAND),
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title=axes[0],
        yaxis_title=axes[1],
        height=360,
        margin=dict(t=40, b=10),
    )
    return fig


def curves_ui(y, p, m: dict) -> None:
    """ROC and precision-recall curves, the threshold's point marked on each."""
    roc, pr = curves(y, p)
    c1, c2 = st.columns(2)
    roc_fig = curve_figure(
        roc,
        "fpr",
        "tpr",
        name="ROC",
        hover="FPR %{x:.3f}, TPR %{y:.3f}, t=%{customdata:.3f}",
        point=(1 - m["specificity"], m["sensitivity"]),
        title=f"ROC (AUC {m['auc']:.4f})",
        axes=("false positive rate", "sensitivity"),
    )
    c1.plotly_chart(roc_fig, width="stretch")
    pr_fig = curve_figure(
        pr,
        "recall",
        "precision",
        name="PR",
        hover="recall %{x:.3f}, precision %{y:.3f}, t=%{customdata:.3f}",
        point=(m["sensitivity"], m["ppv"]),
        title="Precision-recall",
        axes=("recall (sensitivity)", "precision (PPV)"),
    )
    c2.plotly_chart(pr_fig, width="stretch")


def reliability_figure(curves: dict[str, tuple[list[dict], float]]) -> go.Figure:
    """Reliability diagram: per bin of P(Parasitized), the share truly parasitized against
    the mean predicted, one trace per name ((bins, ECE) from core.schema.calibration), the
    diagonal where they agree."""
    fig = go.Figure(
        go.Scatter(
            x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), name="perfect"
        )
    )
    for (name, (rows, ece)), color in zip(curves.items(), ("#1f77b4", text.BRAND)):
        fig.add_trace(
            go.Scatter(
                x=[r["predicted"] for r in rows],
                y=[r["observed"] for r in rows],
                customdata=[r["cells"] for r in rows],
                mode="lines+markers",
                name=f"{name}: ECE {ece:.3f}",
                marker=dict(color=color, size=9),
                line=dict(color=color),
                hovertemplate="says %{x:.3f}, is %{y:.3f} (%{customdata:,} cells)<extra></extra>",
            )
        )
    fig.update_layout(
        xaxis_title="mean P(Parasitized) the model says",
        yaxis_title="share truly parasitized",
        xaxis_range=[0, 1],
        yaxis_range=[0, 1],
        height=420,
        margin=dict(t=20, b=10),
        legend=dict(orientation="h", y=1.1, x=0),
    )
    return fig


def calibration_ui(preds: pd.DataFrame, model: ModelFolder) -> None:
    """Does P(Parasitized) mean what it says? The reliability diagram and the expected
    calibration error at temperature 1 (as the network says) and at the model's temperature."""
    st.subheader("Calibration")
    t = model.contract.temperature
    y = np.asarray(is_parasitized(preds["label"]))
    calibrated = preds["prob_parasitized"].to_numpy()
    raw = rescale(calibrated, 1 / t)
    after, note = calibrated, f"at the model's temperature {t:.3f}"
    if t != 1.0 and "fold" in preds:  # out of fold: each fold at the others' temperature
        after = cross_fitted(raw, y, preds["fold"].to_numpy())
        note = "each fold at the temperature fitted on the other folds (the honest figure)"
    shown = {"as the network says (temperature 1)": raw}
    if t != 1.0:
        shown["calibrated"] = after
    figure = reliability_figure(
        {k: (reliability(q, y), expected_calibration_error(q, y)) for k, q in shown.items()}
    )
    st.plotly_chart(figure, width="stretch")
    st.caption(
        f"Each point: the cells whose P(Parasitized) falls in one of {ECE_BINS} bins; on the "
        "dotted line, a cell given 0.8 is parasitized 80% of the time. The expected "
        "calibration error (ECE) is the cells' mean distance from it. "
        + (
            f"Calibrated: {note}; the threshold and review band apply on this scale."
            if t != 1.0
            else "This model is not calibrated (`malaria calibrate probabilities`)."
        )
    )


def per_case_table(preds: pd.DataFrame, threshold: float) -> None:
    st.subheader("Per patient")
    st.dataframe(
        per_case(preds, threshold=threshold),
        hide_index=True,
        width="stretch",
        column_config={
            "accuracy": st.column_config.NumberColumn(format="%.3f"),
            "mean_prob": st.column_config.NumberColumn(format="%.3f"),
        },
    )


def evaluate_page() -> None:
    st.title("Evaluate")
    model = state.current_model()
    data = data_ui(model)
    preds = data.predictions
    y = is_parasitized(preds["label"])
    p = preds["prob_parasitized"].to_numpy()
    threshold = threshold_ui(model)
    m = binary_metrics(y, p, threshold=threshold)

    picked = st.session_state.get("cm_cell")
    chosen = picked[1:] if picked and picked[0] == data.choice else None
    # the address names the data and matrix cell on show (an upload's cannot be named)
    named = {"data": SPLITS.get(data.choice, ""), **dict(zip(("true", "predicted"), chosen or ()))}
    state.show_address(PAGE, named if data.choice in SPLITS else {})
    left, right = st.columns([1, 1])
    with left:
        st.subheader("Confusion matrix")
        st.plotly_chart(
            confusion_matrix(m, chosen),
            on_select=partial(_pick_matrix_cell, data.choice),
            selection_mode="points",
            key="cm",
            width="stretch",
            config={"displayModeBar": False},
        )
    with right:
        metrics_table(m)
    if chosen:
        gallery_ui(data, chosen, threshold, model)
    else:
        st.caption("Click a cell of the matrix to see its images with their heatmaps.")

    curves_ui(y, p, m)
    calibration_ui(preds, model)
    per_case_table(preds, threshold)


evaluate_page()
