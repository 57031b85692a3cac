import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.contract import HISTORY_FILE, fold_runs
from dashboard import ui

st.title("Training")
runs = [f for f in ui.model_choices() if (f / "history.csv").is_file()]
if not runs:
    st.info("No run folder with a history.csv yet. Train one with `python -m core.train`.")
    st.stop()
current = ui.current_model().path.resolve()
picked = st.multiselect("Runs to compare", runs, format_func=ui.model_label,
                        default=[current] if current in runs else runs[:1])
if not picked:
    st.stop()

fig = make_subplots(rows=2, cols=2, subplot_titles=("Loss", "Accuracy", "Validation AUC",
                                                    "Learning rate"))
palette = ui.PALETTE
cards = {run: json.loads((run / "card.json").read_text()) for run in picked}
CURVES = (("train_loss", (1, 1), "dot", "train"), ("val_loss", (1, 1), "solid", "validation"),
          ("train_accuracy", (1, 2), "dot", "train"),
          ("val_accuracy", (1, 2), "solid", "validation"),
          ("val_auc", (2, 1), "solid", "validation"), ("lr", (2, 2), "solid", "end of epoch"))
any_folds = False
for i, run in enumerate(picked):
    h = pd.read_csv(run / "history.csv")
    color, name = palette[i % len(palette)], ui.model_label(run)
    folds = fold_runs(run)
    any_folds = any_folds or bool(folds)
    for fold in folds:  # thin and pale beside the final run
        f = pd.read_csv(fold / HISTORY_FILE)
        for col, row_col, dash, label in (c for c in CURVES if c[0] in f):
            fig.add_trace(go.Scatter(x=f["epoch"], y=f[col], mode="lines", opacity=0.35,
                                     line=dict(color=color, dash=dash, width=1),
                                     name=f"{name} · {fold.name} · {label}",
                                     legendgroup=f"{name} folds", showlegend=False),
                          row=row_col[0], col=row_col[1])
    for col, row_col, dash, label in CURVES:
        fig.add_trace(go.Scatter(x=h["epoch"], y=h[col], mode="lines+markers",
                                 line=dict(color=color, dash=dash, width=4 if folds else 2),
                                 name=f"{name} · {label}", legendgroup=name,
                                 showlegend=row_col == (1, 1)),
                      row=row_col[0], col=row_col[1])
    if folds:  # one legend entry toggles all of them
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", opacity=0.35,
                                 line=dict(color=color, width=1),
                                 name=f"{name} · {len(folds)} fold runs",
                                 legendgroup=f"{name} folds"), row=1, col=1)
    best = cards[run].get("best_epoch")
    if best is not None:  # the epoch whose weights were kept
        saved = h[h["epoch"] == best]
        fig.add_trace(go.Scatter(x=saved["epoch"], y=saved["val_loss"], mode="markers",
                                 marker=dict(color=color, size=14, symbol="star"),
                                 name=f"{name} · saved epoch {best}", legendgroup=name),
                      row=1, col=1)
fig.update_xaxes(title_text="epoch")
fig.update_yaxes(type="log", tickformat=".0e", row=2, col=2)
fig.update_layout(height=620, margin=dict(t=40, b=10), hovermode="x unified")
st.plotly_chart(fig, width="stretch")
st.caption("Dotted: training (augmented, measured while learning). Solid: validation patients. "
           "The saved weights are from the epoch with the lowest validation loss (star)."
           + (" Thin pale lines: the cross-validation fold runs (each on its own training and "
              "validation patients); bold: the final run." if any_folds else ""))

st.subheader("Learning-rate range test")
for run in picked:
    curve, info = run / "lr_find.csv", run / "lr_find.json"
    if not curve.is_file():
        st.caption(f"{ui.model_label(run)}: trained with a fixed learning rate (no range test).")
        continue
    c, s = pd.read_csv(curve), json.loads(info.read_text())
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=c["lr"], y=c["loss"], mode="lines", name="batch loss",
                             line=dict(color="#c7c7c7")))
    fig.add_trace(go.Scatter(x=c["lr"], y=c["smoothed_loss"], mode="lines",
                             name="smoothed loss", line=dict(color=ui.BRAND)))
    fig.add_vline(x=s["suggested_lr"], line_dash="dash",
                  annotation_text=f"suggested {s['suggested_lr']:.1e}")
    fig.update_xaxes(type="log", tickformat=".0e", title_text="learning rate")
    fig.update_layout(title=ui.model_label(run), yaxis_title="loss", height=340,
                      margin=dict(t=40, b=10))
    st.plotly_chart(fig, width="stretch")
    st.caption(f"The learning rate grew exponentially per batch; suggestion = {s['method']}.")

st.subheader("Model cards")
for run in picked:
    with st.expander(ui.model_label(run)):
        st.json(cards[run])
