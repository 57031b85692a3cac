"""Explain: one cell's heatmaps, several methods side by side at one stage of the network, each
checked against where the stain rule finds the parasite, with ROAD and the gate's verdict."""

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import streamlit as st

from core.data.images import ImageError, decode_image
from core.explain.heatmap import (
    DEFAULT_METHOD,
    METHOD_NAMES,
    SLOW_METHODS,
    TARGETS,
    Explanation,
    colour_bar,
    for_display,
    overlay,
)
from core.explain.locate import locate
from core.schema.contract import ModelContract, ModelFolder
from core.schema.labels import PARASITIZED, predicted_class
from core.schema.results import OK, is_counted
from dashboard import images, resources, state, text

HEATMAP_HELP = (
    "A class activation map colours the parts of the image that most raised the score of "
    "the chosen class at one stage of the network. Red means *the network's evidence came "
    "from here*; it is **not** a segmentation of the parasite, and a confident map can "
    "still point at the wrong thing. Two checks sit under every map:\n"
    "- **Points at the parasite?** A colour rule that knows nothing of the network finds "
    "the dark purple Giemsa-stained chromatin in the cell (outlined in white); the check "
    "asks whether the map's hottest pixel falls on it. Only the map for *Parasitized* is "
    "judged (✔ or ✘): evidence for *Uninfected* has no place it must be, so its map is "
    "described (on the dot or away from it) without a mark.\n"
    "- **ROAD** (higher is better) measures how much the model's confidence depends on the "
    "highlighted pixels: it tells whether the model *uses* them, not what they are.\n\n"
    "Late stages are coarse (4x4 cells at 128 px) and light whole quadrants. The default "
    "method and stage were chosen by how often their peak lands on the parasite; the "
    "**Heatmap check** page shows that rate for every method and stage on patients the "
    "model never saw."
)
SOURCES = ["Sample or upload", "A cell from the scored results"]
NO_SAMPLE = "—"
PER_ROW = 4  # panels in a row: the original, then one per method
PAGE = "explain"  # its address: state.show_address

Item = tuple[str, bytes]  # (name, bytes) of the image on show


@dataclass(frozen=True)
class MapOptions:
    """What the maps show: which methods, for which class, at which stage, and how drawn."""

    methods: list[str]
    target: str
    layer: str
    opacity: float
    outline: bool  # the stain rule's parasite outlined on every panel
    road: bool  # ROAD under each map, after the maps


# --- the image on show: callbacks, run before the page --------------------------------------


def _sample_cells() -> dict[str, bytes]:
    return dict(images.sample_items())


def _upload_item() -> Item | None:
    up = st.session_state.get("explain_upload")
    return None if up is None else (up.name, up.getvalue())


def _take_upload() -> None:  # a new upload is shown; removing it takes it off the page
    shown = st.session_state.get("explain_item")
    sample_on_show = shown is not None and shown[0] in _sample_cells()
    st.session_state["explain_item"] = _upload_item() or (shown if sample_on_show else None)
    st.session_state["explain_link"] = None


def _take_sample() -> None:  # a picked sample is shown; "—" goes back to the upload, if any
    pick = st.session_state.get("explain_sample")
    st.session_state["explain_item"] = (
        _upload_item() if pick in (None, NO_SAMPLE) else (pick, _sample_cells()[pick])
    )
    st.session_state["explain_link"] = None


def open_linked_item(samples: dict[str, bytes], model: ModelFolder) -> None:
    """The cell and stage that a link to the page names (``?sample=NAME&layer=features.6``, a
    run's or a split's cell: state.linked_cell), else the cell on show, else the first
    sample: the page is never empty. A bad link is one warning."""
    params = state.followed_link(PAGE)
    layer, layers = params.pop("layer", None), model.contract.cam_layers
    if layer is not None and layer not in layers:
        st.warning(
            f"The layer in this page's link ({text.plain(layer[:60])}) is not a stage of this "
            f"model ({', '.join(layers)}): the layer is left as it was."
        )
    elif layer is not None:
        state.preset("explain_layer", layer)
    if params:
        try:
            st.session_state.update(explain_item=state.linked_cell(params), explain_link=params)
            state.preset("explain_source", SOURCES[0])
        except LookupError as exc:
            st.warning(f"The cell in this page's link cannot be shown: {text.plain(exc)}")
    if st.session_state.get("explain_item") is None and samples:
        st.session_state["explain_item"] = next(iter(samples.items()))


# --- inputs ------------------------------------------------------------------------------


def source_ui() -> str:
    return state.kept(
        st.radio,
        "Image",
        SOURCES,
        horizontal=True,
        key="explain_source",
        default=SOURCES[0],
        allowed=SOURCES,
    )


def upload_or_sample_ui(samples: dict[str, bytes]) -> tuple[Item | None, dict | None]:
    """(the uploaded or sample image on show, its link): whichever of the two was used last."""
    st.file_uploader(
        "Upload one cell image",
        type=images.UPLOAD_TYPES[:-1],
        key="explain_upload",
        on_change=_take_upload,
    )
    item = st.session_state.get("explain_item")
    names = list(samples)
    st.session_state["explain_sample"] = item[0] if item and item[0] in names else NO_SAMPLE
    st.selectbox(
        "…or a sample cell", [NO_SAMPLE] + names, key="explain_sample", on_change=_take_sample
    )
    return item, st.session_state.get("explain_link")


def scored_cell_ui() -> tuple[Item, dict]:
    """(a cell of the run on show, its link), picked in a list; st.info or st.error and stop
    when there is none to show."""
    results = st.session_state["results"]
    if results is None:
        st.info("Score some cells first (Score page), then pick one here.")
        st.stop()
    ok = results[results["error"].isna()].set_index("path")
    if ok.empty:
        st.info("No cell of this run could be scored, so there is nothing to explain.")
        st.stop()
    quality = ok["quality"] if "quality" in ok else pd.Series(None, ok.index, dtype=object)
    review = quality.where(~is_counted(quality), "")  # why a cell is not counted, or ""
    engine = resources.store().run(st.session_state["run_id"]).engine

    def describe(p: str) -> str:
        return (
            f"{p.rsplit('/', 1)[-1]} · case {ok.at[p, 'case_id']} · "
            f"label {ok.at[p, 'label'] or '?'} · "
            f"P(Parasitized) {ok.at[p, 'prob_parasitized']:.3f} ({engine})"
            + (f" · review: {review[p]}" if review[p] else "")
        )

    link = {"run": st.session_state["run_id"]}
    path = link["cell"] = st.selectbox("Cell", ok.index, format_func=describe, key="explain_cell")
    src = images.cell_source(
        path, st.session_state["sources"], on_disk=st.session_state["run_on_disk"]
    )
    if src is None:
        st.warning(
            "This run's images are no longer available (an upload reopened from the "
            "store keeps its results, not its images; or the files moved)."
        )
        st.stop()
    try:
        return (path, src.read()), link
    except (OSError, ImageError) as exc:
        st.error(text.plain(f"{path}: {exc}"))
        st.stop()


def map_options_ui(contract: ModelContract) -> MapOptions:
    layers = list(contract.cam_layers)
    c1, c2, c3 = st.columns([3, 1, 1])
    methods = state.kept(
        c1.multiselect,
        "Methods",
        list(METHOD_NAMES),
        key="explain_methods",
        default=[DEFAULT_METHOD, "layercam", "gradcam"],
        allowed=METHOD_NAMES,
        help=f"{DEFAULT_METHOD} is the default (see Heatmap check for how often each method "
        "finds the parasite). scorecam and ablationcam perturb the image once per channel: "
        "seconds per image.",
    )
    target = state.kept(
        c2.selectbox,
        "Explain the class",
        TARGETS,
        key="explain_target",
        default=TARGETS[0],
        allowed=TARGETS,
    )
    layer = state.kept(
        c3.selectbox,
        "Layer",
        layers,
        key="explain_layer",
        default=contract.target_layer,
        allowed=layers,
        help="Later stages are coarser (down to 4x4) but more semantic.",
    )
    o1, o2, o3 = st.columns([2, 1, 1])
    opacity = state.kept(
        o1.slider, "Heatmap opacity", 0.0, 1.0, step=0.05, key="explain_opacity", default=0.5
    )
    outline = state.kept(
        o2.toggle,
        "Outline the parasite",
        key="explain_outline",
        default=True,
        help="Where the stain colour rule finds parasite chromatin",
    )
    road = state.kept(
        o3.toggle,
        "ROAD",
        key="explain_road",
        default=True,
        help="About half a second per map, after the maps",
    )
    return MapOptions(methods, target, layer, opacity, outline, road)


# --- cached computations, keyed by the image's hash ----------------------------------------


# A map's key: (image hash, method, target, layer, model folder, weights sha256).
MapKey = tuple[str, str, str, str, str, str]


@st.cache_data(show_spinner=False, max_entries=256)
def _map(key: MapKey, _image, _stain):
    _, method, target, layer, folder, sha = key
    return resources.explain(
        folder,
        sha,
        [_image],
        method=method,
        target=target,
        layer=layer,
        faithfulness=False,
        stains=[_stain],
    )[0]


@st.cache_data(show_spinner=False, max_entries=256)
def _road(key: MapKey, _image, _explanation) -> float:
    _, _, _, _, folder, sha = key
    return resources.road(folder, sha, _image, _explanation)  # from the map drawn: no second pass


@st.cache_data(show_spinner=False, max_entries=256)
def _scored(image_hash: str, model: str, model_sha: str, _item: Item) -> tuple[float, str, str]:
    return resources.score_one(model, model_sha, *_item)


@st.cache_data(show_spinner=False, max_entries=64)
def _stain(image_hash: str, _image):
    return locate(_image)


# --- drawing -----------------------------------------------------------------------------


def verdict(e: Explanation) -> str:
    """One line a student can read about where a map points. Only the Parasitized map is
    judged (✔ or ✘): evidence for Uninfected has no place it must be."""
    on_cell = (
        "a flat map"
        if e.mass_in_cell != e.mass_in_cell
        else f"{e.mass_in_cell:.0%} of the map on the cell"
    )  # NaN: a flat map
    if e.target != PARASITIZED:
        if e.peak_on_stain is None:
            return f"no stained dot in this cell · {on_cell}"
        where = "on the stained dot" if e.peak_on_stain else "away from the stained dot"
        return f"peak {where} · {on_cell} · :gray[not judged for {e.target}]"
    if e.points_at_parasite is None:
        return f"no stained parasite found in this cell to point at · {on_cell}"
    if e.points_at_parasite:
        return f":green[**✔ peak on the stained parasite**] · {on_cell}"
    return f":red[**✘ peak misses the stained parasite**] · {on_cell}"


def maps_ui(
    image: np.ndarray, key: str, name: str, stain, options: MapOptions, model: ModelFolder
) -> tuple[dict, dict]:
    """The original and one panel per method, PER_ROW to a row; (explanation per method, the
    empty slot under each map where its ROAD goes)."""
    outline = stain.parasite if options.outline else None
    folder, sha = str(model.path), model.sha256
    panels = [None, *options.methods]  # the original first, then one panel per method
    road_slots, drawn = {}, {}
    for start in range(0, len(panels), PER_ROW):
        for col, method in zip(st.columns(PER_ROW), panels[start : start + PER_ROW]):
            if method is None:
                col.image(
                    for_display(image, outline=outline),
                    caption=f"original · {name}",
                    width="stretch",
                )
                col.caption(
                    "parasite located by the stain rule: outlined in white"
                    if stain.found
                    else "the stain rule finds no parasite in this cell"
                )
                continue
            with col, st.spinner(f"{method}…"):
                map_key = (key, method, options.target, options.layer, folder, sha)
                e = drawn[method] = _map(map_key, image, stain)
                col.image(
                    for_display(
                        overlay(image, e.heatmap, opacity=options.opacity), outline=outline
                    ),
                    caption=f"{method} · {options.layer} · {e.map_size[0]}x{e.map_size[1]} map · "
                    f"{e.ms:,.0f} ms",
                    width="stretch",
                )
                col.markdown(f"explains **{e.target}** · {verdict(e)}")
                road_slots[method] = col.empty()
                if options.road:
                    road_slots[method].caption("ROAD: computing…")
    return drawn, road_slots


def probability_ui(
    scored: tuple[float, str, str], e: Explanation, image: np.ndarray, contract: ModelContract
) -> None:
    """P(Parasitized) by the scoring engine (the one Score gives) with the gate's verdict, the
    PyTorch model's beside it (the maps' own), the colour scale, and how to read the maps."""
    prob, gate, engine = scored
    left, right = st.columns([1, 3])
    left.metric(
        "P(Parasitized)",
        f"{prob:.3f}",
        help=f"Decision threshold {contract.threshold:.2f}",
    )
    left.caption(
        f"by the **{engine}** engine, as Score and its CSV give it"
        + (
            f"; the maps come from the PyTorch model (fp32), which gives {e.prob_parasitized:.3f}"
            if engine != "torch"
            else ""
        )
    )
    if gate != OK:
        left.caption(f"review: {text.plain(gate)} (not counted)")
    right.image(
        colour_bar(width=384), caption="heatmap colour: low evidence (blue) → high (red)", width=384
    )
    st.caption(
        f"Each map is computed at its stage's own resolution (its size is in the caption) "
        f"and upsampled to the image's {image.shape[1]}x{image.shape[0]} px. ROAD: "
        "confidence kept when the least relevant pixels are removed minus when the most "
        "relevant are removed (higher = the model relies on what the map shows)."
    )
    st.page_link(
        "views/methods.py",
        label="Which methods find the parasite, over many cells: Heatmap check",
        icon=":material/fact_check:",
    )


def explain_page() -> None:
    st.title("Explain a prediction")
    model = state.current_model()
    with st.expander("What a heatmap shows, and what it does not", expanded=False):
        st.markdown(HEATMAP_HELP)
    samples = _sample_cells()  # name -> bytes of the bundled sample cells
    open_linked_item(samples, model)
    if source_ui() == SOURCES[0]:
        item, link = upload_or_sample_ui(samples)
    else:
        item, link = scored_cell_ui()
    if item is None:
        state.show_address(PAGE, {})
        st.info("Pick a sample cell or upload one.")
        st.stop()
    options = map_options_ui(model.contract)
    # the address names the cell and stage on show, so a reload or a shared link shows them
    cell = {"sample": item[0]} if item[0] in samples else link
    state.show_address(PAGE, {**cell, "layer": options.layer} if cell else {})
    try:
        image = decode_image(item[1])
    except ImageError as exc:
        st.error(text.plain(f"{item[0]}: {exc}"))
        st.stop()
    if any(m in SLOW_METHODS for m in options.methods):
        st.warning(
            "ScoreCAM and AblationCAM run the network hundreds of times per image: "
            "expect seconds to tens of seconds on a CPU at the last layer."
        )

    key = hashlib.sha256(item[1]).hexdigest()
    name = text.plain(item[0].rsplit("/", 1)[-1])  # captions render Markdown
    resources.wait_for_model(model)
    try:
        scored = _scored(key, str(model.path), model.sha256, item)
    except ImageError as exc:
        st.error(text.plain(f"{item[0]}: {exc}"))
        st.stop()
    gate = scored[1]
    if options.target == "predicted":  # the class the headline probability calls
        options = replace(
            options, target=predicted_class(scored[0], model.contract.threshold).lower()
        )
    if gate != OK:
        st.warning(
            f"**Review: {text.plain(gate)}.** This image does not look like a single "
            "cell crop the model learnt from (quality gate); on Score it would be listed "
            "for review and **not counted**. The maps below show what the network does "
            "with it, not a finding."
        )
    stain = _stain(key, image)
    if not options.methods:
        outline = stain.parasite if options.outline else None
        st.image(for_display(image, outline=outline), caption=name, width=384)
        st.info("Pick at least one method to see its heatmap and the probability.")
        st.stop()
    drawn, road_slots = maps_ui(image, key, name, stain, options, model)
    probability_ui(scored, drawn[options.methods[-1]], image, model.contract)
    if options.road:  # the slow extra arrives after every map is on screen
        for method, slot in road_slots.items():
            map_key = (key, method, options.target, options.layer, str(model.path), model.sha256)
            road = _road(map_key, image, drawn[method])
            slot.caption(f"ROAD {road:+.3f}")


explain_page()
