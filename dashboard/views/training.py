import json
import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.schema.contract import HISTORY_FILE, fold_runs
from dashboard import ui

st.title("Training")
runs = [f for f in ui.model_choices() if (f / "history.csv").is_file()]
if not runs:
    st.info("No run folder with a history.csv yet. Train one with `malaria train`.")
    st.stop()
current = ui.current_model().path.resolve()
picked = st.multiselect(
    "Runs to compare",
    runs,
    format_func=ui.model_label,
    default=[current] if current in runs else runs[:1],
)
if not picked:
    st.stop()

fig = make_subplots(
    rows=2, cols=2, subplot_titles=("Loss", "Accuracy", "Validation AUC", "Learning rate")
)
palette = ui.PALETTE
cards = {run: json.loads((run / "card.json").read_text()) for run in picked}
CURVES = (
    ("train_loss", (1, 1), "dot", "train"),
    ("val_loss", (1, 1), "solid", "validation"),
    ("train_accuracy", (1, 2), "dot", "train"),
    ("val_accuracy", (1, 2), "solid", "validation"),
    ("val_auc", (2, 1), "solid", "validation"),
    ("lr", (2, 2), "solid", "end of epoch"),
)
any_folds = False
for i, run in enumerate(picked):
    h = pd.read_csv(run / "history.csv")
    color, name = palette[i % len(palette)], ui.model_label(run)
    folds = fold_runs(run)
    any_folds = any_folds or bool(folds)
    for fold in folds:  # thin and pale beside the final run
        f = pd.read_csv(fold / HISTORY_FILE)
        for col, row_col, dash, label in (c for c in CURVES if c[0] in f):
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
                row=row_col[0],
                col=row_col[1],
            )
    for col, row_col, dash, label in CURVES:
        fig.add_trace(
            go.Scatter(
                x=h["epoch"],
                y=h[col],
                mode="lines+markers",
                line=dict(color=color, dash=dash, width=4 if folds else 2),
                name=f"{name} · {label}",
                legendgroup=name,
                showlegend=row_col == (1, 1),
            ),
            row=row_col[0],
            col=row_col[1],
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
    best = cards[run].get("best_epoch")
    averaged = cards[run].get("config", {}).get("average_from")
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
fig.update_xaxes(title_text="epoch")
for (r, c), title in (
    ((1, 1), "cross-entropy loss"),
    ((1, 2), "accuracy"),
    ((2, 1), "AUC"),
    ((2, 2), "learning rate"),
):
    fig.update_yaxes(title_text=title, row=r, col=c)
fig.update_yaxes(**ui.LOG_AXIS, row=2, col=2)
fig.update_layout(height=620, margin=dict(t=40, b=10), hovermode="x unified")
st.plotly_chart(fig, width="stretch")
st.caption(
    "Dotted: training (augmented, measured while learning). Solid: validation patients. "
    "The star marks the weights each run kept: "
    + "; ".join(
        f"{ui.model_label(run)}, {cards[run].get('selected_by', 'lowest validation loss')}"
        for run in picked
    )
    + "."
    + (
        " Thin pale lines: the cross-validation fold runs (each on its own training and "
        "validation patients); bold: the final run."
        if any_folds
        else ""
    )
)


def smoothing_floor(eps: float) -> float:
    """The lowest training loss label smoothing ``eps`` allows with two classes: the entropy
    of the smoothed target (1 - eps/2, eps/2)."""
    q = eps / 2
    return -((1 - q) * math.log(1 - q) + q * math.log(q)) if q > 0 else 0.0


eps = next((e for r in picked if (e := cards[r].get("config", {}).get("label_smoothing"))), None)
st.info(
    "**Why is the training loss above the validation loss?** Not a sign of a problem: the two "
    "are measured differently. The training loss uses **label smoothing**"
    + (
        f" ({eps}: the targets are {1 - eps / 2:.2f}/{eps / 2:.2f}, not 1/0, so it cannot fall "
        f"below {smoothing_floor(eps):.2f} even for a perfect model)"
        if eps
        else ""
    )
    + ", is taken on **augmented** images (flips and rotations, colour jitter, blur) with "
    "dropout on, and is averaged over the epoch while the weights are still improving. The "
    "validation loss is the plain cross-entropy of the finished epoch's model on unchanged "
    "images of other patients.",
    icon=":material/help:",
)

st.subheader("Learning-rate range test")
for run in picked:
    curve, info = run / "lr_find.csv", run / "lr_find.json"
    if not curve.is_file():
        st.caption(f"{ui.model_label(run)}: trained with a fixed learning rate (no range test).")
        continue
    c, s = pd.read_csv(curve), json.loads(info.read_text())
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=c["lr"], y=c["loss"], mode="lines", name="batch loss", line=dict(color="#c7c7c7")
        )
    )
    fig.add_trace(
        go.Scatter(
            x=c["lr"],
            y=c["smoothed_loss"],
            mode="lines",
            name="smoothed loss",
            line=dict(color=ui.BRAND),
        )
    )
    suggested, used = s["suggested_lr"], cards[run].get("config", {}).get("lr")
    fig.add_vline(
        x=suggested,
        line_dash="dash",
        line_color="#1f77b4",
        annotation=dict(text=f"suggested {suggested:.1e}", xanchor="right", font_color="#1f77b4"),
    )
    if used:
        fig.add_vline(
            x=used,
            line_color=ui.BRAND,
            line_width=2,
            annotation=dict(text=f"used {used:.0e}", xanchor="left", font_color=ui.BRAND),
        )
    fig.update_xaxes(**ui.LOG_AXIS, title_text="learning rate (log scale)")
    fig.update_layout(
        title=ui.model_label(run),
        yaxis_title="training loss (per batch)",
        height=340,
        margin=dict(t=40, b=10),
    )
    st.plotly_chart(fig, width="stretch")
    st.caption(
        f"The learning rate grew exponentially per batch; suggestion = {s['method']}."
        + (
            f" This run was trained at {used:.0e}, {used / suggested:.1f}x the "
            "suggestion: a suggestion is a starting point, and the recipes are compared "
            "on validation loss (see the README's model section)."
            if used
            else ""
        )
    )

st.subheader("Model cards")
for run in picked:
    with st.expander(ui.model_label(run)):
        ui.show_card(cards[run])
