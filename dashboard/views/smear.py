import hashlib
from functools import partial

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageError
from core.data.sources import read_image
from core.explain.heatmap import DEFAULT_METHOD, for_display, overlay
from core.inference.store import StoreError
from core.schema.export import to_csv_text
from core.schema.labels import CLASSES, predicted_class
from core.smear.fields import RED_CELL, crop_cells, draw_overlay, field_summary, score_uploads
from dashboard import ui


def _pick_cell(field_key: str) -> None:
    """A click on a cell of the field, before the page runs (no st.rerun() that could swallow
    a sidebar click made meanwhile)."""
    points = st.session_state[field_key].selection.points
    if points and points[0].get("customdata") is not None:
        st.session_state["smear_cell"] = int(np.ravel(points[0]["customdata"])[0])


st.title("Smear fields")
model = ui.current_model()
folder, sha = model.path, model.sha256
st.caption(
    "Upload whole fields of view of a Giemsa thin smear (camera images, or a zip of "
    "them). Every red cell is found, cut out with its background blacked out as in the "
    "training crops, and scored; white cells, platelets, debris and clumps are outlined "
    "in grey and never counted."
)
files = st.file_uploader(
    "Fields or zips", type=ui.UPLOAD_TYPES, accept_multiple_files=True, key="smear_upload"
)
items = ui.uploaded_items(files) or st.session_state.get("smear_items") or []


@st.cache_data(show_spinner=False, max_entries=8)
def _segment_and_score(key: str, folder: str, sha256: str, _items):
    bar = st.progress(0.0, text="Finding and scoring cells…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"{done} of {total} fields")

    with ui.scoring_engine(folder, sha256) as scorer:
        df, results, run_id = score_uploads(_items, scorer, store=ui.store(), progress=progress)
    bar.empty()
    return df, results, run_id


if st.button("Find and score cells", type="primary", disabled=not items):
    try:
        df, results, run_id = _segment_and_score(ui.items_key(items), str(folder), sha, list(items))
    except (ValueError, StoreError) as exc:
        st.error(ui.plain(exc))
        st.stop()
    st.session_state.update(smear=(df, results, run_id, ui.sources_for(items)), smear_cell=None)

if st.session_state.get("smear") is None:
    st.info("Nothing scored yet: upload fields and press **Find and score cells**.")
    st.stop()
cells, results, run_id, sources = st.session_state["smear"]
threshold = st.slider(
    "Decision threshold on P(Parasitized)", 0.0, 1.0, float(model.contract.threshold), 0.01
)
cells = cells.assign(
    prediction=[
        None if pd.isna(p) else predicted_class(p, threshold) for p in cells["prob_parasitized"]
    ]
)
cutoff = model.screening_cutoff
summary = field_summary(cells, cutoff=cutoff)
red = cells[(cells["object"] == RED_CELL) & cells["error"].isna()]
n_par = int((red["prediction"] == CLASSES[0]).sum())
a, b, c, d = st.columns(4)
a.metric("Fields", f"{cells['image'].nunique():,}")
b.metric("Red cells", f"{len(red):,}")
c.metric("Called parasitized", f"{n_par:,}")
d.metric("Parasitemia", f"{n_par / len(red):.2%}" if len(red) else "–")
errors = cells[cells["error"].notna()]
if not errors.empty:
    st.warning(f"{len(errors)} field(s) gave no cells; each is a row with its reason:")
    st.dataframe(errors[["image", "error"]], hide_index=True, width="stretch")

st.subheader("Parasitemia per field and per folder")
st.dataframe(
    summary,
    hide_index=True,
    width="stretch",
    column_config={
        "parasitemia": st.column_config.NumberColumn(format="percent"),
        "ci_low": st.column_config.NumberColumn("95% CI low", format="percent"),
        "ci_high": st.column_config.NumberColumn("95% CI high", format="percent"),
        "mean_prob": st.column_config.NumberColumn(format="%.3f"),
    },
)
provenance = dict(
    run_id=run_id, threshold=threshold, scored_with=ui.model_label(folder), scored_with_sha256=sha
)
d1, d2 = st.columns(2)
d1.download_button(
    f"Download all {len(cells):,} objects (CSV)",
    to_csv_text(cells.assign(**provenance)),
    f"smear_cells_{run_id}.csv",
    "text/csv",
)
d2.download_button(
    "Download the summary (CSV)",
    to_csv_text(summary.assign(screening_cutoff=cutoff, **provenance)),
    f"smear_summary_{run_id}.csv",
    "text/csv",
)

st.subheader("A field")
if not results:
    st.stop()
name = st.selectbox("Field", list(results))  # widget labels are plain text
result = results[name]
try:
    image = read_image(sources[name])
except (KeyError, ImageError) as exc:
    st.error(ui.plain(f"{name}: {exc}"))
    st.stop()
objects = list(result.segmentation.objects)
cell_index = [i for i, o in enumerate(objects) if o.is_cell]  # red cell k -> object index
prob = result.prob
suspects_only = st.toggle(
    "Suspects only", value=False, help="List only the cells at or above the threshold"
)
choices = [k for k in range(len(cell_index)) if not suspects_only or prob[k] >= threshold]
picked = st.session_state.get("smear_cell")
highlight = cell_index[picked] if picked is not None and picked < len(cell_index) else None
view = draw_overlay(image, result.segmentation, prob, highlight=highlight)
centres = [(objects[i].x + objects[i].w / 2, objects[i].y + objects[i].h / 2) for i in cell_index]
fig = go.Figure(go.Image(z=view, hoverinfo="skip"))
fig.add_trace(
    go.Scatter(
        x=[centres[k][0] for k in choices],
        y=[centres[k][1] for k in choices],
        mode="markers",
        customdata=choices,
        marker=dict(size=14, opacity=0.01),
        hovertemplate="P(Parasitized) %{text}<extra></extra>",
        text=[f"{prob[k]:.3f}" for k in choices],
    )
)
fig.update_layout(
    height=560,
    margin=dict(l=0, r=0, t=0, b=0),
    xaxis_visible=False,
    yaxis_visible=False,
    dragmode=False,  # a click: in Plotly's "select" drag mode a click selected nothing
)
field_key = f"field_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
st.plotly_chart(
    fig,
    width="stretch",
    on_select=partial(_pick_cell, field_key),
    selection_mode="points",
    key=field_key,
)
st.caption(
    f"{len(cell_index)} red cells (outline blue → red with P(Parasitized)), "
    f"{len(objects) - len(cell_index)} other objects in grey; "
    f"{1000 * result.seconds:.0f} ms to find and score. Click a cell to see it large."
)
if not choices:
    st.info("No cell of this field is at or above the threshold.")
    st.stop()
order = sorted(choices, key=lambda k: -prob[k])
k = st.selectbox(
    "Cell",
    order,
    index=order.index(picked) if picked in order else 0,
    format_func=lambda k: (
        f"P(Parasitized) {prob[k]:.3f} · at x={objects[cell_index[k]].x}, "
        f"y={objects[cell_index[k]].y}"
        + (" · cut by the edge" if objects[cell_index[k]].edge else "")
    ),
)
st.session_state["smear_cell"] = k
crop = crop_cells(image, [objects[cell_index[k]]], size=model.contract.input_size)[0]
e = ui.explain(str(folder), sha, [crop], method=DEFAULT_METHOD, faithfulness=False)[0]
left, right = st.columns(2)
left.image(for_display(crop), caption="the cell as the model sees it", width=320)
right.image(
    for_display(overlay(crop, e.heatmap)),
    width=320,
    caption=f"{DEFAULT_METHOD} · explains {e.target} · P(Parasitized) {e.prob_parasitized:.3f}",
)
