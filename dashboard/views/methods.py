"""Heatmap check: how often each method, at each stage of the network, peaks on the parasite
the stain rule locates (``malaria check heatmaps``), the Explain page's default outlined."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.schema.contract import ModelFolder
from core.schema.proportions import wilson_interval
from dashboard import state, stored, text

GREY = "#ececec"  # the background of figures on too few cells
SHARE = ("pointing", "pointing_low", "pointing_high", "cells")  # share_text's arguments


def read_check(model: ModelFolder) -> tuple[pd.DataFrame, dict]:
    """(one row per method and stage, the check's summary); st.info and stop without one."""
    check = stored.heatmap_check(model)
    if check is None:
        st.info(
            f"This model has no heatmap check yet. Compute it (tens of minutes on a CPU) with "
            f"`{stored.check_command(model)}`"
        )
        st.stop()
    return check


def stale_ui(summary: dict, model: ModelFolder) -> None:
    """Warnings when the check was made for another default stage or other weights."""
    made_at, layer = summary["default"]["layer"], model.contract.target_layer
    if made_at != layer:
        st.warning(
            f"This check was computed when the model's default stage was {made_at}; it "
            f"is {layer} now: recompute it with `{stored.check_command(model)}`."
        )
    if summary.get("model_sha256") != model.sha256:
        st.warning(
            "This check was computed for other weights than the model's current ones: "
            f"recompute it with `{stored.check_command(model)}`."
        )


def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Best pointing first, among the figures on enough cells; the few-cell ones after."""
    return table.sort_values(["few", "pointing"], ascending=[True, False], na_position="last")


def pointing_grid(table: pd.DataFrame, method: str, layer: str) -> go.Figure:
    """Pointing per method (best first) and stage (fine to coarse), each cell with its interval
    and count; figures on too few cells in grey, ranked after the others; the default outlined."""
    layers = list(dict.fromkeys(table["layer"]))
    best = table["pointing"].where(~table["few"]).groupby(table["method"]).max()
    methods = best.sort_values(ascending=False, na_position="last").index.tolist()

    def grid(column: str) -> pd.DataFrame:
        return table.pivot(index="method", columns="layer", values=column).loc[methods, layers]

    share, few = grid("pointing"), grid("few").astype(bool)
    low, high, cells = grid("pointing_low"), grid("pointing_high"), grid("cells")
    at = [
        [(share.at[m, x], low.at[m, x], high.at[m, x], cells.at[m, x]) for x in layers]
        for m in methods
    ]
    labels = [
        [
            f"flat maps<br>n = {n:,}"
            if p != p
            else f"<b>{p:.0%}</b><br>{lo:.0%}–{hi:.0%}<br>n = {n:,}"
            for p, lo, hi, n in row
        ]
        for row in at
    ]
    hover = [[text.share_text(*cell) for cell in row] for row in at]
    sizes = table.drop_duplicates("layer").set_index("layer")["map_size"]
    common = dict(
        x=[f"{name}<br>{sizes[name]}" for name in layers],
        y=methods,
        texttemplate="%{text}",
        customdata=hover,
        hovertemplate="%{y} at %{x}: peak on the parasite in %{customdata} cells<extra></extra>",
        hoverongaps=False,
    )
    fig = go.Figure(
        [
            go.Heatmap(
                z=share.where(~few).to_numpy(dtype=float),
                zmin=0,
                zmax=1,
                colorscale="Blues",
                textfont_size=12,
                colorbar=dict(title="pointing"),
                text=np.where(few, "", labels),
                **common,
            ),
            go.Heatmap(  # too few cells: grey, whatever the share
                z=few.where(few).to_numpy(dtype=float),
                colorscale=[[0, GREY], [1, GREY]],
                showscale=False,
                textfont=dict(size=12, color="#8a8a8a"),
                text=np.where(few, labels, ""),
                **common,
            ),
        ]
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
        yaxis_autorange="reversed",  # the best method on top
        height=620,
        margin=dict(t=10, b=10),
    )
    return fig


def reading_text(table: pd.DataFrame, summary: dict) -> str:
    """What the grid says: the default's pointing, against Grad-CAM at the last stage, each
    with its 95% interval and count."""
    default, n = summary["default"], summary["cells_checked"]
    last_layer = list(dict.fromkeys(table["layer"]))[-1]
    last = table[(table["method"] == "gradcam") & (table["layer"] == last_layer)]
    ci = wilson_interval(round(default["pointing"] * n), n)
    return (
        "**Reading.** The outlined cell is what the Explain page shows first: "
        f"**{default['method']} at {default['layer']}**. Explaining the class the model "
        "*predicts* (so a missed parasite gets a map for 'Uninfected'), its peak lands on the "
        f"parasite in **{text.share_text(default['pointing'], *ci, n)}** checked cells."
        + (
            ""
            if last.empty
            else f" Grad-CAM at the last stage ({last.iloc[0]['map_size']}), the usual choice, "
            f"does in {text.share_text(*last.iloc[0][list(SHARE)])}"
            f" with a ROAD of {last.iloc[0]['road']:+.2f}: "
            "ROAD tells whether the model uses the highlighted pixels, not whether they are the "
            "parasite."
        )
    )


def check_table(table: pd.DataFrame) -> None:
    """The table, ranked as the grid is; rows on too few cells in grey."""
    shown = ranked(table)
    grey = shown.style.apply(
        lambda row: [f"color: #8a8a8a; background-color: {GREY}" if row["few"] else ""] * len(row),
        axis=1,
    )
    st.dataframe(
        grey,
        hide_index=True,
        width="stretch",
        column_order=[
            "method",
            "layer",
            "map_size",
            "pointing",
            "pointing_low",
            "pointing_high",
            "cells",
            "few",
            "mass_in_cell",
            "road",
            "road_cells",
            "ms_per_image",
            "default",
        ],
        column_config={
            "pointing": st.column_config.ProgressColumn(
                "pointing", format="percent", min_value=0, max_value=1
            ),
            "pointing_low": st.column_config.NumberColumn("95% CI low", format="percent"),
            "pointing_high": st.column_config.NumberColumn("95% CI high", format="percent"),
            "cells": st.column_config.NumberColumn("cells (pointing)"),
            "few": st.column_config.CheckboxColumn(
                f"under {stored.MIN_CELLS} cells",
                help="Too few cells to rank: shown greyed, ranked last",
            ),
            "mass_in_cell": st.column_config.NumberColumn("map on the cell", format="percent"),
            "road": st.column_config.NumberColumn("ROAD", format="%+.3f"),
            "road_cells": st.column_config.NumberColumn("cells (ROAD)"),
            "ms_per_image": st.column_config.NumberColumn("ms / image", format="%.0f"),
            "default": st.column_config.CheckboxColumn("Explain's default"),
        },
    )


def methods_page() -> None:
    st.title("Heatmap check: which explanations find the parasite")
    model = state.current_model()
    table, summary = read_check(model)
    method, layer = summary["default"]["method"], model.contract.target_layer
    stale_ui(summary, model)
    st.markdown(
        "Every method at every stage of the network, on the "
        f"{stored.cells_text(summary, model)}. A colour rule that knows nothing of the "
        "network locates the stained parasite "
        f"(it finds one in {summary['locator_found_parasitized']:.0%} of Parasitized and "
        f"{summary['locator_found_uninfected']:.0%} of Uninfected cells); the "
        f"{summary['cells_checked']:,} cells where it does are the ones checked. **Pointing** is "
        "the share of maps whose hottest pixel falls on that parasite "
        f"(within {summary['pointing_tolerance_px_at_128']} px at 128 px)."
    )
    st.plotly_chart(pointing_grid(table, method, layer), width="stretch")
    st.markdown(reading_text(table, summary))
    check_table(table)
    st.caption(
        f"Recompute with `{stored.check_command(model)}`. ROAD costs about half a second a map, so "
        "it is averaged over fewer cells; maps slower than 0.1 s an image (ScoreCAM, "
        "AblationCAM) are measured on fewer cells too: each row says how many. Intervals are "
        f"95% Wilson intervals; a figure on fewer than {stored.MIN_CELLS} cells is greyed and "
        "ranked after every other, whatever its share."
    )


methods_page()
