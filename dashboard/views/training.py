"""Training: the learning curves of the runs picked (their k-fold runs beside them), why the
training loss sits above the validation loss, the learning-rate range tests, and the cards."""

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.schema.contract import HISTORY_FILE, ModelFolder, WeightsError
from core.schema.metrics import label_smoothing_floor
from dashboard import state, text, widgets

CURVES = (  # history column, subplot (row, col), line dash, what it is
    ("train_loss", (1, 1), "dot", "train"),
    ("val_loss", (1, 1), "solid", "validation"),
    ("train_accuracy", (1, 2), "dot", "train"),
    ("val_accuracy", (1, 2), "solid", "validation"),
    ("val_auc", (2, 1), "solid", "validation"),
    ("lr", (2, 2), "solid", "end of epoch"),
)
AXES = (
    ((1, 1), "cross-entropy loss"),
    ((1, 2), "accuracy"),
    ((2, 1), "AUC"),
    ((2, 2), "learning rate"),
)


def runs_ui() -> list[ModelFolder]:
    """The run folders to compare (those with a training history), opened; st.info and stop
    when there is none to show."""
    runs = [f for f in widgets.model_choices() if (f / HISTORY_FILE).is_file()]
    if not runs:
        st.info(f"No run folder with a {HISTORY_FILE} yet. Train one with `malaria train`.")
        st.stop()
    current = state.current_model().path.resolve()
    picked = st.multiselect(
        "Runs to compare",
        runs,
        format_func=text.model_label,
        default=[current] if current in runs else runs[:1],
    )
    if not picked:
        st.stop()
    opened = []
    for run in picked:
        try:
            opened.append(ModelFolder.open(run))
        except WeightsError as exc:
            st.error(f"{text.plain(text.model_label(run))} cannot be shown: {text.plain(exc)}")
    if not opened:
        st.stop()
    return opened


def add_fold_curves(fig: go.Figure, fold, color: str, name: str) -> None:
    """One k-fold run's curves, thin and pale, behind the final run's."""
    f = pd.read_csv(fold / HISTORY_FILE)
    for col, (row, c), dash, label in (curve for curve in CURVES if curve[0] in f):
        fig.add_trace(
            go.Scatter(
                x=f["epoch"],
                y=f[col],
                mode="lines",
                opacity=0.35,
                line=dict(color=color, dash=dash, width=1),
                name=f"{name} · {fold.name} · {label}",
                legendgroup=f"{name} folds",
                showlegend=False,
            ),
            row=row,
            col=c,
        )


def add_run_curves(fig: go.Figure, model: ModelFolder, color: str) -> None:
    """A run's curves, its fold runs' behind them, and a star on the weights it kept."""
    h = pd.read_csv(model.history)
    name, folds = text.model_label(model.path), model.fold_runs
    for fold in folds:
        add_fold_curves(fig, fold, color, name)
    for col, (row, c), dash, label in CURVES:
        fig.add_trace(
            go.Scatter(
                x=h["epoch"],
                y=h[col],
                mode="lines+markers",
                line=dict(color=color, dash=dash, width=4 if folds else 2),
                name=f"{name} · {label}",
                legendgroup=name,
                showlegend=(row, c) == (1, 1),
            ),
            row=row,
            col=c,
        )
    if folds:  # one legend entry toggles all of them
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                opacity=0.35,
                line=dict(color=color, width=1),
                name=f"{name} · {len(folds)} fold runs",
                legendgroup=f"{name} folds",
            ),
            row=1,
            col=1,
        )
    best, averaged = model.best_epoch, model.averaged_from
    if best is not None:  # the epoch whose weights were kept (or the last one averaged)
        saved = h[h["epoch"] == best]
        fig.add_trace(
            go.Scatter(
                x=saved["epoch"],
                y=saved["val_loss"],
                mode="markers",
                marker=dict(color=color, size=14, symbol="star"),
                name=f"{name} · mean of epochs {averaged}-{best}"
                if averaged
                else f"{name} · saved epoch {best}",
                legendgroup=name,
            ),
            row=1,
            col=1,
        )


def curves_figure(models: list[ModelFolder]) -> go.Figure:
    fig = make_subplots(
        rows=2, cols=2, subplot_titles=("Loss", "Accuracy", "Validation AUC", "Learning rate")
    )
    for i, model in enumerate(models):
        add_run_curves(fig, model, text.PALETTE[i % len(text.PALETTE)])
    fig.update_xaxes(title_text="epoch")
    for (r, c), title in AXES:
        fig.update_yaxes(title_text=title, row=r, col=c)
    fig.update_yaxes(**text.LOG_AXIS, row=2, col=2)
    fig.update_layout(height=620, margin=dict(t=40, b=10), hovermode="x unified")
    return fig


def curves_caption(models: list[ModelFolder]) -> str:
    return (
        "Dotted: training (augmented, measured while learning). Solid: validation patients. "
        "The star marks the weights each run kept: "
        + "; ".join(f"{text.model_label(m.path)}, {m.selected_by}" for m in models)
        + "."
        + (
            " Thin pale lines: the cross-validation fold runs (each on its own training and "
            "validation patients); bold: the final run."
            if any(m.fold_runs for m in models)
            else ""
        )
    )


def loss_gap_text(eps: float | None) -> str:
    """Why the training loss sits above the validation loss; ``eps``: the label smoothing."""
    return (
        "**Why is the training loss above the validation loss?** Not a sign of a problem: the "
        "two are measured differently. The training loss uses **label smoothing**"
        + (
            f" ({eps}: the targets are {1 - eps / 2:.2f}/{eps / 2:.2f}, not 1/0, so it cannot "
            f"fall below {label_smoothing_floor(eps):.2f} even for a perfect model)"
            if eps
            else ""
        )
        + ", is taken on **augmented** images (flips and rotations, colour jitter, blur) with "
        "dropout on, and is averaged over the epoch while the weights are still improving. The "
        "validation loss is the plain cross-entropy of the finished epoch's model on unchanged "
        "images of other patients."
    )


def lr_find_figure(model: ModelFolder, curve: pd.DataFrame, suggested: float) -> go.Figure:
    """The range test's batch losses over the learning rate, the suggestion and the rate the
    run was trained at."""
    used = model.learning_rate
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=curve["lr"],
            y=curve["loss"],
            mode="lines",
            name="batch loss",
            line=dict(color="#c7c7c7"),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=curve["lr"],
            y=curve["smoothed_loss"],
            mode="lines",
            name="smoothed loss",
            line=dict(color=text.BRAND),
        )
    )
    fig.add_vline(
        x=suggested,
        line_dash="dash",
        line_color="#1f77b4",
        annotation=dict(text=f"suggested {suggested:.1e}", xanchor="right", font_color="#1f77b4"),
    )
    if used:
        fig.add_vline(
            x=used,
            line_color=text.BRAND,
            line_width=2,
            annotation=dict(text=f"used {used:.0e}", xanchor="left", font_color=text.BRAND),
        )
    fig.update_xaxes(**text.LOG_AXIS, title_text="learning rate (log scale)")
    fig.update_layout(
        title=text.model_label(model.path),
        yaxis_title="training loss (per batch)",
        height=340,
        margin=dict(t=40, b=10),
    )
    return fig


def lr_find_ui(model: ModelFolder) -> None:
    """A run's learning-rate range test, or a line saying it had none."""
    curve_path, summary_path = model.lr_find
    if not curve_path.is_file():
        st.caption(
            f"{text.model_label(model.path)}: trained with a fixed learning rate (no range test)."
        )
        return
    curve, summary = pd.read_csv(curve_path), json.loads(summary_path.read_text())
    suggested, used = summary["suggested_lr"], model.learning_rate
    st.plotly_chart(lr_find_figure(model, curve, suggested), width="stretch")
    st.caption(
        f"The learning rate grew exponentially per batch; suggestion = {summary['method']}."
        + (
            f" This run was trained at {used:.0e}, {used / suggested:.1f}x the "
            "suggestion: a suggestion is a starting point, and the recipes are compared "
            "on validation loss (see the README's model section)."
            if used
            else ""
        )
    )


def training_page() -> None:
    st.title("Training")
    models = runs_ui()
    st.plotly_chart(curves_figure(models), width="stretch")
    st.caption(curves_caption(models))
    eps = next((m.label_smoothing for m in models if m.label_smoothing), None)
    st.info(loss_gap_text(eps), icon=":material/help:")
    st.subheader("Learning-rate range test")
    for model in models:
        lr_find_ui(model)
    st.subheader("Model cards")
    for model in models:
        with st.expander(text.model_label(model.path)):
            widgets.show_card(model)


training_page()
