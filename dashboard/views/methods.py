"""Heatmap check: how often each method, at each stage of the network, peaks on the parasite
the stain rule locates (``malaria check heatmaps``), the Explain page's default outlined."""

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.schema.contract import ModelFolder
from dashboard import state, text


def check_command(model: ModelFolder) -> str:
    """The command that (re)computes the model's heatmap check."""
    return f"malaria check heatmaps --weights {text.model_label(model.path)}" + (
        "" if model.split["test"] else " --split oof"
    )


def read_check(model: ModelFolder) -> tuple[pd.DataFrame, dict]:
    """(one row per method and stage, the check's summary); st.info and stop without one."""
    table_path, summary_path = model.explain_check()
    if not table_path.is_file() or not summary_path.is_file():
        st.info(
            f"This model has no heatmap check yet. Compute it (tens of minutes on a CPU) with "
            f"`{check_command(model)}`"
        )
        st.stop()
    return pd.read_csv(table_path), json.loads(summary_path.read_text())


def stale_ui(summary: dict, model: ModelFolder) -> None:
    """Warnings when the check was made for another default stage or other weights."""
    made_at, layer = summary["default"]["layer"], model.contract.target_layer
    if made_at != layer:
        st.warning(
            f"This check was computed when the model's default stage was {made_at}; it "
            f"is {layer} now: recompute it with `{check_command(model)}`."
        )
    if summary.get("model_sha256") != model.sha256:
        st.warning(
            "This check was computed for other weights than the model's current ones: "
            f"recompute it with `{check_command(model)}`."
        )


def cells_text(summary: dict, model: ModelFolder) -> str:
    """Which cells the check ran on, and (for a model trained on every patient) where the
    default map points on the patients its fold models never saw."""
    if summary["split"] != "oof":
        return (
            f"**{summary['parasitized_cells']:,} Parasitized cells of {summary['cases']} test "
            "patients** the model never saw in training"
        )
    unseen = model.heatmap_estimate
    return (
        f"**{summary['parasitized_cells']:,} Parasitized development cells of "
        f"{summary['cases']} patients**: this model was trained on every patient, so these are "
        "cells it learnt"
        + (
            f" (the same recipe's {unseen.folds} fold models, each on the patients it never "
            f"saw: the default map peaks on the parasite in **{unseen.pointing:.1%}** of "
            f"{unseen.cells:,} cells)"
            if unseen
            else ""
        )
    )


def pointing_grid(table: pd.DataFrame, method: str, layer: str) -> go.Figure:
    """Pointing per method (best first) and stage (fine to coarse), the default outlined."""
    layers = list(dict.fromkeys(table["layer"]))
    methods = table.groupby("method")["pointing"].max().sort_values(ascending=False).index.tolist()
    grid = table.pivot(index="method", columns="layer", values="pointing").loc[methods, layers]
    sizes = table.drop_duplicates("layer").set_index("layer")["map_size"]
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[f"{name}<br>{sizes[name]}" for name in layers],
            y=methods,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            text=grid.map(lambda v: f"{v:.0%}").to_numpy(),
            texttemplate="%{text}",
            textfont_size=15,
            colorbar=dict(title="pointing"),
            hovertemplate="%{y} at %{x}: peak on the parasite in %{z:.1%} of cells<extra></extra>",
        )
    )
    if method in methods and layer in layers:
        fig.add_shape(
            type="rect",
            x0=layers.index(layer) - 0.5,
            x1=layers.index(layer) + 0.5,
            y0=methods.index(method) - 0.5,
            y1=methods.index(method) + 0.5,
            line=dict(color=text.BRAND, width=4),
        )
    fig.update_layout(
        xaxis_title="network stage (fine → coarse) and its map size",
        yaxis_title="method",
        height=420,
        margin=dict(t=10, b=10),
    )
    return fig


def reading_text(table: pd.DataFrame, default: dict) -> str:
    """What the grid says: the default's pointing, against Grad-CAM at the last stage."""
    last_layer = list(dict.fromkeys(table["layer"]))[-1]
    last = table[(table["method"] == "gradcam") & (table["layer"] == last_layer)]
    return (
        "**Reading.** The outlined cell is what the Explain page shows first: "
        f"**{default['method']} at {default['layer']}**. Explaining the class the model "
        "*predicts* (so a missed parasite gets a map for 'Uninfected'), its peak lands on the "
        f"parasite in **{default['pointing']:.1%}** of the checked cells."
        + (
            ""
            if last.empty
            else f" Grad-CAM at the last stage ({last.iloc[0]['map_size']}), the usual choice, "
            f"does in {last.iloc[0]['pointing']:.1%} with a ROAD of {last.iloc[0]['road']:+.2f}: "
            "ROAD tells whether the model uses the highlighted pixels, not whether they are the "
            "parasite."
        )
    )


def check_table(table: pd.DataFrame) -> None:
    st.dataframe(
        table.sort_values("pointing", ascending=False),
        hide_index=True,
        width="stretch",
        column_config={
            "pointing": st.column_config.ProgressColumn(
                "pointing", format="percent", min_value=0, max_value=1
            ),
            "mass_in_cell": st.column_config.NumberColumn("map on the cell", format="percent"),
            "road": st.column_config.NumberColumn("ROAD", format="%+.3f"),
            "cells": st.column_config.NumberColumn("cells (pointing)"),
            "road_cells": st.column_config.NumberColumn("cells (ROAD)"),
            "ms_per_image": st.column_config.NumberColumn("ms / image", format="%.0f"),
            "default": st.column_config.CheckboxColumn("Explain's default"),
        },
    )


def methods_page() -> None:
    st.title("Heatmap check: which explanations find the parasite")
    model = state.current_model()
    table, summary = read_check(model)
    # the method is code's (core.explain); the stage is the model's
    method, layer = summary["default"]["method"], model.contract.target_layer
    table["default"] = (table["method"] == method) & (table["layer"] == layer)
    stale_ui(summary, model)
    st.markdown(
        f"Every method at every stage of the network, on the {cells_text(summary, model)}. A "
        "colour rule that knows nothing of the network locates the stained parasite "
        f"(it finds one in {summary['locator_found_parasitized']:.0%} of Parasitized and "
        f"{summary['locator_found_uninfected']:.0%} of Uninfected cells); the "
        f"{summary['cells_checked']:,} cells where it does are the ones checked. **Pointing** is "
        "the share of maps whose hottest pixel falls on that parasite "
        f"(within {summary['pointing_tolerance_px_at_128']} px at 128 px)."
    )
    st.plotly_chart(pointing_grid(table, method, layer), width="stretch")
    st.markdown(reading_text(table, summary["default"]))
    check_table(table)
    st.caption(
        f"Recompute with `{summary['command']}`. ROAD costs about half a second a map, so "
        "it is averaged over fewer cells; maps slower than 0.1 s an image (ScoreCAM, "
        "AblationCAM) are measured on fewer cells too: each row says how many."
    )


methods_page()
