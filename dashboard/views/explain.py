import hashlib

import streamlit as st

from core.data import ImageError, decode_image, open_source
from core.explain import METHODS, SLOW_METHODS, TARGETS, overlay
from dashboard import ui

st.title("Explain a prediction")
folder, card, sha = ui.current_model()
contract = card["contract"]

with st.expander("What a heatmap shows, and what it does not", expanded=False):
    st.markdown(
        "A class activation map colours the parts of the image that most raised the score of "
        "the chosen class at one stage of the network. Red means *the network's evidence came "
        "from here*; it is **not** a segmentation of the parasite, and a confident map can "
        "still point at the wrong thing. Different methods weigh that evidence differently, so "
        "compare them: the **ROAD** score (higher is better) and the **keep-only drop** (lower "
        "is better) measure how much the model really relies on the highlighted pixels. "
        "Late stages are coarse (4x4 cells at 128 px); earlier stages give finer maps.")
SAMPLE_CELLS = dict(ui.sample_items())  # name -> bytes of the bundled sample cells


def _upload_item() -> tuple[str, bytes] | None:
    up = st.session_state.get("explain_upload")
    return None if up is None else (up.name, up.getvalue())


def _take_upload() -> None:  # a new upload is shown; removing it takes it off the page
    shown = st.session_state.get("explain_item")
    sample_on_show = shown is not None and shown[0] in SAMPLE_CELLS
    st.session_state["explain_item"] = _upload_item() or (shown if sample_on_show else None)


def _take_sample() -> None:  # a picked sample is shown; "—" goes back to the upload, if any
    pick = st.session_state.get("explain_sample")
    st.session_state["explain_item"] = (_upload_item() if pick in (None, "—")
                                        else (pick, SAMPLE_CELLS[pick]))


source = st.radio("Image", ["Sample or upload", "A cell from the scored results"],
                  horizontal=True)
if source == "Sample or upload":  # whichever of the two was used last is shown
    st.file_uploader("Upload one cell image", type=ui.UPLOAD_TYPES[:-1], key="explain_upload",
                     on_change=_take_upload)
    item = st.session_state.get("explain_item")
    names = list(SAMPLE_CELLS)
    st.session_state["explain_sample"] = item[0] if item and item[0] in names else "—"
    st.selectbox("…or a sample cell", ["—"] + names, key="explain_sample",
                 on_change=_take_sample)
else:
    results = st.session_state["results"]
    if results is None:
        st.info("Score some cells first (Score page), then pick one here.")
        st.stop()
    ok = results[results["error"].isna()].set_index("path")
    if ok.empty:
        st.info("No cell of this run could be scored, so there is nothing to explain.")
        st.stop()
    path = st.selectbox(
        "Cell", ok.index,
        format_func=lambda p: f"{p.rsplit('/', 1)[-1]} · case {ok.at[p, 'case_id']} · "
                              f"label {ok.at[p, 'label'] or '?'} · "
                              f"P(Parasitized) {ok.at[p, 'prob_parasitized']:.3f}")
    src = st.session_state["sources"].get(path)
    if src is None and st.session_state["run_on_disk"]:
        try:
            src = open_source(path)
        except OSError:
            src = None
    if src is None:
        st.warning("This run's images are no longer available (an upload reopened from the "
                   "store keeps its results, not its images; or the files moved).")
        st.stop()
    try:
        item = (path, src.read())
    except (OSError, ImageError) as exc:
        st.error(ui.plain(f"{path}: {exc}"))
        st.stop()

if item is None:
    st.info("Pick a sample cell or upload one.")
    st.stop()
try:
    image = decode_image(item[1])
except ImageError as exc:
    st.error(ui.plain(f"{item[0]}: {exc}"))
    st.stop()

c1, c2, c3 = st.columns([3, 1, 1])
methods = c1.multiselect(
    "Methods", list(METHODS), default=["gradcam", "gradcam++", "layercam"],
    help="scorecam and ablationcam perturb the image once per channel: many seconds per image.")
target = c2.selectbox("Explain the class", TARGETS)
layers = contract["cam_layers"]
layer = c3.selectbox("Layer", layers, index=layers.index(contract["target_layer"]),
                     help="Later stages are coarser but more semantic.")
opacity = st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05)
if any(m in SLOW_METHODS for m in methods):
    st.warning("ScoreCAM and AblationCAM run the network hundreds of times per image: "
               "expect tens of seconds on a CPU at the last layer (less at earlier ones).")


@st.cache_data(show_spinner=False, max_entries=256)
def _explain(image_hash: str, method: str, target: str, layer: str, model_sha: str, _image):
    e = ui.explain(str(folder), model_sha, [_image], method=method, target=target, layer=layer)[0]
    return e.heatmap, e.prob_parasitized, e.target, e.road, e.keep_drop, e.ms


key = hashlib.sha256(item[1]).hexdigest()
name = ui.plain(item[0].rsplit("/", 1)[-1])  # captions render Markdown
if not methods:
    st.image(image, caption=name, width=256)
    st.info("Pick at least one method to see its heatmap and the probability.")
    st.stop()
PER_ROW = 4
panels = [None] + methods  # the original first, then one panel per method
for start in range(0, len(panels), PER_ROW):
    for col, method in zip(st.columns(PER_ROW), panels[start:start + PER_ROW]):
        if method is None:
            col.image(image, caption=f"original · {name}", width="stretch")
            continue
        with col, st.spinner(f"{method}…"):
            heat, prob, cls, road, keep, ms = _explain(key, method, target, layer, sha, image)
            col.image(overlay(image, heat, opacity=opacity), caption=method, width="stretch")
            col.caption(f"explains **{cls}** · ROAD {road:+.3f} · keep-only drop {keep:+.3f} · "
                        f"{ms:,.0f} ms")
st.metric("P(Parasitized)", f"{prob:.3f}", help=f"Decision threshold {contract['threshold']:.2f}")
st.caption(f"Map size at this layer is coarser than the image: values are upsampled to "
           f"{image.shape[1]}x{image.shape[0]} px. ROAD: confidence kept when the least "
           "relevant pixels are removed minus when the most relevant are removed (higher = "
           "more faithful). Keep-only drop: confidence lost when only the highlighted region "
           "is kept (lower = the region alone suffices).")
