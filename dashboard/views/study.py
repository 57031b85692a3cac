import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import ui

st.title("Study: which features, which model")
st.caption(
    "Reproduce with `malaria study layers --data DATA` and "
    "`malaria study models --data DATA` (results land in weights/study/)."
)
folder = ui.ROOT / "weights" / "study"
layers_csv, layers_json = folder / "layers.csv", folder / "layers.json"
if not layers_csv.is_file():
    st.info("No study results yet: run `malaria study layers --data DATA`.")
    st.stop()
layers, info = pd.read_csv(layers_csv), json.loads(layers_json.read_text())

st.subheader("Frozen ImageNet features, one linear classifier per layer")
best_row = layers["accuracy"].idxmax()
best = layers.loc[best_row]
last = layers.iloc[-1]
fig = go.Figure()
fig.add_vrect(
    x0=best_row - 0.4,
    x1=best_row + 0.4,
    fillcolor=ui.BRAND,
    opacity=0.08,
    line_width=0,
    annotation_text="best layer",
    annotation_position="top",
)
for metric, color in (("accuracy", ui.BRAND), ("auc", "#1f77b4")):
    fig.add_trace(
        go.Scatter(
            x=layers["layer"],
            y=layers[metric],
            mode="lines+markers",
            name=metric,
            line=dict(color=color),
            error_y=dict(type="data", array=layers[f"{metric}_std"]),
        )
    )
fig.update_layout(
    xaxis_title="layer the features are taken from (stage, channels)",
    yaxis_title="patient-grouped cross-validation (mean ± std over folds)",
    height=420,
    margin=dict(t=20, b=10),
)
st.plotly_chart(fig, width="stretch")
st.dataframe(
    layers.style.apply(
        lambda r: ["background-color: #f6e3ea" if r.name == best_row else "" for _ in r], axis=1
    ).format(precision=4),
    hide_index=True,
    width="stretch",
)
explain_layers = list(ui.current_model().contract.cam_layers)
if best["module"] in explain_layers:
    if st.button(
        f"Heatmaps at this stage ({best['module']}) of the selected model, on Explain",
        icon=":material/visibility:",
    ):
        ui.preset("explain_layer", best["module"])
        st.switch_page("views/explain.py")
else:
    st.caption(
        f"The best layer's stage ({best['module']}) is not one the selected model's "
        f"heatmaps are drawn at ({', '.join(explain_layers)})."
    )
cell = info["cell_level_split"]
st.markdown(
    f"**Reading.** Used as a frozen feature extractor, MobileNetV2's **{best['layer']}** "
    f"stage gives the best features: accuracy {best['accuracy']:.3f} ± "
    f"{best['accuracy_std']:.3f} and AUC {best['auc']:.4f} across folds of unseen patients, "
    f"against {last['accuracy']:.3f} for the last layer. "
    f"Splitting the same cells at random, so that one patient's cells sit on both sides, "
    f"would have reported {cell['accuracy']:.3f} (AUC {cell['auc']:.4f}): "
    f"{(cell['accuracy'] - best['accuracy']) * 100:+.1f} points of accuracy that come from "
    "recognising patients, not parasites."
)
st.caption(info["protocol"])

models_csv = folder / "models.csv"
st.subheader("Models compared on the same unseen patients")
if not models_csv.is_file():
    st.info("Run `malaria study models --data DATA` to compare models.")
    st.stop()
models = pd.read_csv(models_csv)
st.dataframe(
    models.drop(columns=["folder"], errors="ignore"),
    hide_index=True,
    width="stretch",
    column_config={
        "mb_on_disk": st.column_config.NumberColumn("MB", format="%.2f"),
        "img_per_s": st.column_config.NumberColumn("CPU img/s", format="%.0f"),
    },
)
top = models.loc[models["accuracy"].idxmax()]
st.markdown(
    f"**Reading.** On these test patients **{top['model']}** is the most accurate "
    f"({top['accuracy']:.3f}, AUC {top['auc']:.4f}). Compare size and speed before "
    "choosing: a smaller model may be accurate enough for screening."
)
st.caption(json.loads((folder / "models.json").read_text())["protocol"])
