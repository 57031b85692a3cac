import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import ui

st.title("Heatmap check: which explanations find the parasite")
model = ui.current_model()
folder, sha = model.path, model.sha256
table_path, summary_path = model.explain_check()
command = f"malaria check heatmaps --weights {ui.model_label(folder)}" + (
    "" if model.split["test"] else " --split oof"
)
if not table_path.is_file() or not summary_path.is_file():
    st.info(
        f"This model has no heatmap check yet. Compute it (tens of minutes on a CPU) with "
        f"`{command}`"
    )
    st.stop()
table = pd.read_csv(table_path)
summary = json.loads(summary_path.read_text())
d = summary["default"]  # the method is code's (core.explain); the stage is the model's
d_method, d_layer = d["method"], model.contract.target_layer
table["default"] = (table["method"] == d_method) & (table["layer"] == d_layer)
if d["layer"] != d_layer:
    st.warning(
        f"This check was computed when the model's default stage was {d['layer']}; it "
        f"is {d_layer} now: recompute it with `{command}`."
    )
if summary.get("model_sha256") != sha:
    st.warning(
        "This check was computed for other weights than the model's current ones: "
        f"recompute it with `{command}`."
    )

unseen = model.card.get("estimate", {}).get("heatmap")
cells = (
    f"**{summary['parasitized_cells']:,} Parasitized cells of {summary['cases']} test "
    "patients** the model never saw in training"
    if summary["split"] != "oof"
    else f"**{summary['parasitized_cells']:,} Parasitized development cells of "
    f"{summary['cases']} patients**: this model was trained on every patient, so these are "
    "cells it learnt"
    + (
        f" (the same recipe's {len(unseen['per_fold'])} fold models, each on the patients "
        f"it never saw: the default map peaks on the parasite in **{unseen['pointing']:.1%}** "
        f"of {unseen['cells']:,} cells)"
        if unseen
        else ""
    )
)
st.markdown(
    f"Every method at every stage of the network, on the {cells}. A colour rule that knows "
    "nothing of the network locates the stained parasite "
    f"(it finds one in {summary['locator_found_parasitized']:.0%} of Parasitized and "
    f"{summary['locator_found_uninfected']:.0%} of Uninfected cells); the "
    f"{summary['cells_checked']:,} cells where it does are the ones checked. **Pointing** is "
    "the share of maps whose hottest pixel falls on that parasite "
    f"(within {summary['pointing_tolerance_px_at_128']} px at 128 px)."
)

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
if d_method in methods and d_layer in layers:
    fig.add_shape(
        type="rect",
        x0=layers.index(d_layer) - 0.5,
        x1=layers.index(d_layer) + 0.5,
        y0=methods.index(d_method) - 0.5,
        y1=methods.index(d_method) + 0.5,
        line=dict(color=ui.BRAND, width=4),
    )
fig.update_layout(
    xaxis_title="network stage (fine → coarse) and its map size",
    yaxis_title="method",
    height=420,
    margin=dict(t=10, b=10),
)
st.plotly_chart(fig, width="stretch")
last = table[(table["method"] == "gradcam") & (table["layer"] == layers[-1])]
st.markdown(
    f"**Reading.** The outlined cell is what the Explain page shows first: **{d['method']} at "
    f"{d['layer']}**. Explaining the class the model *predicts* (so a missed parasite gets a "
    f"map for 'Uninfected'), its peak lands on the parasite in **{d['pointing']:.1%}** of the "
    "checked cells."
    + (
        ""
        if last.empty
        else f" Grad-CAM at the last stage ({last.iloc[0]['map_size']}), the usual choice, does in "
        f"{last.iloc[0]['pointing']:.1%} with a ROAD of {last.iloc[0]['road']:+.2f}: ROAD tells "
        "whether the model uses the highlighted pixels, not whether they are the parasite."
    )
)
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
st.caption(
    f"Recompute with `{summary['command']}`. ROAD costs about half a second a map, so "
    "it is averaged over fewer cells; maps slower than 0.1 s an image (ScoreCAM, "
    "AblationCAM) are measured on fewer cells too: each row says how many."
)
