"""Study: which layer of frozen ImageNet features separates the cells best, and which model
does on the same unseen patients (``malaria study layers|models``)."""

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.schema.files import REPO_ROOT
from dashboard import state, text

STUDY = REPO_ROOT / "weights" / "study"  # where `malaria study` writes by default
LAYERS_CSV, LAYERS_JSON = STUDY / "layers.csv", STUDY / "layers.json"
MODELS_CSV, MODELS_JSON = STUDY / "models.csv", STUDY / "models.json"
METRIC_DIGITS = (  # the study's metrics, with the decimals that tell them apart
    ("accuracy", 3),
    ("auc", 4),
    ("sensitivity", 3),
    ("specificity", 3),
    ("f1", 3),
    ("mcc", 3),
)


def layers_figure(layers: pd.DataFrame, best_row: int) -> go.Figure:
    """Accuracy and AUC per layer (mean ± std over folds), the best layer shaded."""
    fig = go.Figure()
    fig.add_vrect(
        x0=best_row - 0.4,
        x1=best_row + 0.4,
        fillcolor=text.BRAND,
        opacity=0.08,
        line_width=0,
        annotation_text="best layer",
        annotation_position="top",
    )
    for metric, color in (("accuracy", text.BRAND), ("auc", "#1f77b4")):
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
    return fig


def explain_link_ui(module: str) -> None:
    """A button to the best layer's stage on Explain, where the selected model has it."""
    explain_layers = list(state.current_model().contract.cam_layers)
    if module not in explain_layers:
        st.caption(
            f"The best layer's stage ({module}) is not one the selected model's "
            f"heatmaps are drawn at ({', '.join(explain_layers)})."
        )
        return
    if st.button(
        f"Heatmaps at this stage ({module}) of the selected model, on Explain",
        icon=":material/visibility:",
    ):
        state.preset("explain_layer", module)
        st.switch_page("views/explain.py")


def metric_name(metric: str) -> str:
    """``auc`` -> ``AUC``, ``accuracy`` stays: a column's heading."""
    return metric.upper() if len(metric) <= 3 else metric


def layers_table(layers: pd.DataFrame) -> pd.DataFrame:
    """The layer study as a table narrow enough for the page: each metric as mean ± std over
    the folds (AUC to 4 decimals, the others to 3), one column each."""
    table = layers[["layer", "module", "features"]].rename(
        columns={"module": "stage", "features": "channels"}
    )
    for metric, digits in METRIC_DIGITS:
        table[metric_name(metric)] = [
            f"{m:.{digits}f} ± {sd:.{digits}f}"
            for m, sd in zip(layers[metric], layers[f"{metric}_std"])
        ]
    return table


def layers_reading(best: pd.Series, last: pd.Series, cell: dict) -> str:
    """What the layer study says, against a split at random that mixes patients."""
    return (
        f"**Reading.** Used as a frozen feature extractor, MobileNetV2's **{best['layer']}** "
        f"stage gives the best features: accuracy {best['accuracy']:.3f} ± "
        f"{best['accuracy_std']:.3f} and AUC {best['auc']:.4f} across folds of unseen patients, "
        f"against {last['accuracy']:.3f} for the last layer. "
        f"Splitting the same cells at random, so that one patient's cells sit on both sides, "
        f"would have reported {cell['accuracy']:.3f} (AUC {cell['auc']:.4f}): "
        f"{(cell['accuracy'] - best['accuracy']) * 100:+.1f} points of accuracy that come from "
        "recognising patients, not parasites."
    )


def layers_ui() -> None:
    """The layer study; st.info and stop where it has not been run."""
    if not LAYERS_CSV.is_file():
        st.info("No study results yet: run `malaria study layers --data DATA`.")
        st.stop()
    layers, info = pd.read_csv(LAYERS_CSV), json.loads(LAYERS_JSON.read_text())
    st.subheader("Frozen ImageNet features, one linear classifier per layer")
    best_row = layers["accuracy"].idxmax()
    best = layers.loc[best_row]
    st.plotly_chart(layers_figure(layers, best_row), width="stretch")
    table = layers_table(layers)
    st.dataframe(
        table.style.apply(
            lambda r: ["background-color: #f6e3ea" if r.name == best_row else "" for _ in r],
            axis=1,
        ),
        hide_index=True,
        width="stretch",
    )
    explain_link_ui(best["module"])
    st.markdown(layers_reading(best, layers.iloc[-1], info["cell_level_split"]))
    st.caption(info["protocol"])


def models_ui() -> None:
    """The model comparison; st.info and stop where it has not been run."""
    st.subheader("Models compared on the same unseen patients")
    if not MODELS_CSV.is_file():
        st.info("Run `malaria study models --data DATA` to compare models.")
        st.stop()
    models = pd.read_csv(MODELS_CSV)
    st.dataframe(
        models.drop(columns=["folder", "test_cells"], errors="ignore"),
        hide_index=True,
        width="stretch",
        column_config={
            "model": st.column_config.TextColumn("model", width="large"),
            "parameters": st.column_config.NumberColumn("params", format="compact"),
            "mb_on_disk": st.column_config.NumberColumn("MB", format="%.1f"),
            "img_per_s": st.column_config.NumberColumn("img/s", format="%.0f"),
            **{
                m: st.column_config.NumberColumn(metric_name(m), format=f"%.{d}f")
                for m, d in METRIC_DIGITS
            },
        },
    )
    top = models.loc[models["accuracy"].idxmax()]
    st.markdown(
        f"**Reading.** On these test patients **{top['model']}** is the most accurate "
        f"({top['accuracy']:.3f}, AUC {top['auc']:.4f}). Compare size and speed before "
        "choosing: a smaller model may be accurate enough for screening."
    )
    cells = (
        f"{int(models['test_cells'].iloc[0]):,} test cells of " if "test_cells" in models else ""
    )
    st.caption(cells + json.loads(MODELS_JSON.read_text())["protocol"])


def study_page() -> None:
    st.title("Study: which features, which model")
    st.caption(
        "Reproduce with `malaria study layers --data DATA` and "
        "`malaria study models --data DATA` (results land in weights/study/)."
    )
    layers_ui()
    models_ui()


study_page()
