"""Lesson: the story the tool tells a class, in five steps (what the network sees, which
heatmaps find the parasite, where the model fails, why, how it learnt), each a paragraph with
the selected model folder's own figures, a small preview and a link that opens the page that
shows it, set up. A figure the folder lacks is said so in its step."""

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageError, decode_image
from core.data.sources import read_image
from core.explain.heatmap import DEFAULT_METHOD, Explanation, for_display
from core.explain.locate import locate
from core.schema.contract import AUDIT_FILE, HISTORY_FILE, OOF_FILE, ModelFolder
from core.schema.labels import PARASITIZED, UNINFECTED, case_id, file_name, is_parasitized
from core.schema.metrics import binary_metrics, confusion_cell, label_smoothing_floor
from core.training.audit import AuditError, patient_shares, read_audit
from dashboard import images, resources, state, stored, text

PREVIEW = 4  # cells shown in a step's preview


def steps_intro(model: ModelFolder) -> str:
    return (
        "Five steps for a class, each with a link that opens the page that shows it. Every "
        f"figure is read from the files of the model selected in the sidebar "
        f"(**{text.plain(text.model_label(model.path))}**): pick another one there and the "
        "lesson tells its story."
    )


def step(number: int, title: str) -> None:
    st.subheader(f"{number}. {title}", divider="gray")


def cells_row(cells: list[tuple[np.ndarray, str, str]]) -> None:
    """Small images side by side, each with its caption (plain text)."""
    for col, (image, caption, _) in zip(st.columns(PREVIEW + 2), cells):
        col.image(for_display(image, width=192), caption=text.plain(caption), width="stretch")


def repo_cells(rows: pd.DataFrame, what: str, caption) -> list[tuple[np.ndarray, str, str]]:
    """(image, ``caption(row)``, path) of the first PREVIEW ``rows`` (a predictions file
    ``what``'s paths); none, with one warning, when they are not on this machine."""
    rows = rows.head(PREVIEW)
    if images.images_missing(rows["path"].tolist(), what):
        return []
    shown = []
    for row in rows.itertuples():
        try:
            shown.append((read_image(images.repo_source(row.path)), caption(row), row.path))
        except (OSError, ImageError):
            continue  # the preview shows the others; the linked page says why
    return shown


# --- 1. what the network sees --------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=16)
def _map(name: str, layer: str, folder: str, sha256: str, _image: np.ndarray) -> Explanation:
    return resources.explain(
        folder,
        sha256,
        [_image],
        method=DEFAULT_METHOD,
        target=PARASITIZED.lower(),
        layer=layer,
        faithfulness=False,
        stains=[locate(_image)],
    )[0]


def stages(model: ModelFolder) -> list[str]:
    """The last (coarsest) stage of the network, then the stage the tool explains at."""
    layers, default = model.contract.cam_layers, model.contract.target_layer
    return [layers[-1], default] if default != layers[-1] else [layers[0], default]


def pointing_of(check: tuple[pd.DataFrame, dict] | None, method: str, layer: str) -> str | None:
    """The check's pointing of ``method`` at ``layer`` with its interval and count, or None."""
    if check is None:
        return None
    row = check[0][(check[0]["method"] == method) & (check[0]["layer"] == layer)]
    if row.empty:
        return None
    return text.share_text(*row.iloc[0][["pointing", "pointing_low", "pointing_high", "cells"]])


def sees_step(model: ModelFolder, check: tuple[pd.DataFrame, dict] | None) -> None:
    step(1, "What the network sees")
    samples = images.sample_items()
    name, data = next(
        (s for s in samples if f"/{PARASITIZED}/" in s[0]), samples[0] if samples else ("", b"")
    )
    if not name:
        st.info("No sample cell is bundled with the dashboard (dashboard/samples/).")
        return
    image, (coarse, fine) = decode_image(data), stages(model)
    maps = {
        layer: _map(name, layer, str(model.path), model.sha256, image) for layer in (coarse, fine)
    }
    seen = "never saw" if model.held_out({case_id(file_name(name))}) else "learnt from"
    figures = {layer: pointing_of(check, DEFAULT_METHOD, layer) for layer in (coarse, fine)}
    st.markdown(
        "A convolutional network reads an image through a stack of stages: the early ones see "
        "small details, the last ones coarse summaries. A heatmap (here "
        f"**{DEFAULT_METHOD}**) colours the parts of the image that raised the network's "
        f"score for *{PARASITIZED}* at one stage: red is where its evidence came from. Below, "
        f"a cell of a patient this model {seen}: at **{coarse}**, the last stage, the map has "
        f"only {maps[coarse].map_size[0]}x{maps[coarse].map_size[1]} squares and lights a "
        f"whole region; at **{fine}**, the stage this tool explains at, it has "
        f"{maps[fine].map_size[0]}x{maps[fine].map_size[1]} and can sit on the dark purple "
        "dot, the parasite's stained chromatin."
        + (
            f" Over many cells (step 2), the map's peak falls on the parasite in "
            f"**{figures[coarse]}** cells at {coarse} and in **{figures[fine]}** at {fine}."
            if figures[coarse] and figures[fine]
            else ""
        )
    )
    cols = st.columns(3)
    cols[0].image(for_display(image, width=256), caption=text.plain(file_name(name)))
    for col, layer in zip(cols[1:], (coarse, fine)):
        e = maps[layer]
        col.image(
            for_display(e.overlay, width=256),
            caption=f"{DEFAULT_METHOD} at {layer} · {e.map_size[0]}x{e.map_size[1]} map · "
            f"{text.POINTING[e.points_at_parasite]}",
        )
        col.page_link(
            "views/explain.py",
            label=f"Open in Explain at {layer}",
            query_params={"sample": name, "layer": layer},
            icon=":material/visibility:",
        )


# --- 2. which methods find the parasite ----------------------------------------------------


def pointing_chart(rows: pd.DataFrame) -> go.Figure:
    """Pointing per method (best on top), each with its 95% interval, its share and count
    beside its name."""
    rows = rows.sort_values("pointing")
    fig = go.Figure(
        go.Bar(
            x=rows["pointing"],
            y=[
                f"{m}  {p:.1%} of {n:,}"
                for m, p, n in zip(rows["method"], rows["pointing"], rows["cells"])
            ],
            orientation="h",
            marker_color=[text.BRAND if d else "#1f77b4" for d in rows["default"]],
            error_x=dict(
                type="data",
                symmetric=False,
                array=rows["pointing_high"] - rows["pointing"],
                arrayminus=rows["pointing"] - rows["pointing_low"],
            ),
            hoverinfo="skip",
        )
    )
    fig.update_layout(
        height=60 + 28 * len(rows),
        margin=dict(t=10, b=10),
        xaxis=dict(range=[0, 1.02], tickformat=".0%", title="peak on the parasite (95% interval)"),
    )
    return fig


def methods_step(model: ModelFolder, check: tuple[pd.DataFrame, dict] | None) -> None:
    step(2, "Which heatmaps find the parasite")
    if check is None:
        st.info(
            "This model folder has no heatmap check, so this step has no figures: make it with "
            f"`{stored.check_command(model)}`."
        )
        return
    table, summary = check
    fine = model.contract.target_layer
    at = table[(table["layer"] == fine) & ~table["few"] & table["pointing"].notna()]
    at = at.sort_values("pointing", ascending=False)
    few = sorted(set(table.loc[table["few"], "method"]))
    if at.empty:
        st.info(f"The heatmap check has no method measured on enough cells at {fine}.")
        return
    best, worst = at.iloc[0], at.iloc[-1]
    shares = {
        r.method: text.share_text(r.pointing, r.pointing_low, r.pointing_high, r.cells)
        for r in at.itertuples()
    }
    st.markdown(
        "There are many recipes for a heatmap, and they disagree. To test them, a colour rule "
        "that knows nothing of the network finds the stained parasite in each cell (in "
        f"{summary['locator_found_parasitized']:.0%} of the {PARASITIZED} cells), and the "
        "check asks: does the map's hottest pixel fall on it? The check ran on the "
        f"{stored.cells_text(summary, model)}. Explaining the class the model predicts, at "
        f"{fine}, **{best.method}** peaks on the parasite in **{shares[best.method]}** "
        f"checked cells, **{worst.method}** in only {shares[worst.method]}. A heatmap that "
        "looks convincing can point at the wrong thing: it is a hypothesis to check, not a "
        "finding."
        + (
            f" ({', '.join(few)} take seconds a cell and were run on too few cells to rank.)"
            if few
            else ""
        )
    )
    st.plotly_chart(pointing_chart(at), width="stretch", config={"displayModeBar": False})
    st.page_link(
        "views/methods.py",
        label="Open the Heatmap check: every method at every stage",
        icon=":material/fact_check:",
    )


# --- 3. where it fails --------------------------------------------------------------------


def errors_step(model: ModelFolder, part: str | None, preds: pd.DataFrame) -> tuple[set, list]:
    """The step on ``preds``, the model folder's ``part`` predictions; (the paths of the cells
    called wrong, those of the missed cells shown)."""
    step(3, "Where it fails")
    if part is None:
        st.info(
            f"This model folder has no labelled predictions ({OOF_FILE} or "
            "test_predictions.csv), so this step has no figures."
        )
        return set(), []
    threshold = model.contract.threshold
    m = binary_metrics(
        is_parasitized(preds["label"]), preds["prob_parasitized"], threshold=threshold
    )
    missed = confusion_cell(preds, threshold=threshold, true=PARASITIZED, predicted=UNINFECTED)
    alarms = confusion_cell(preds, threshold=threshold, true=UNINFECTED, predicted=PARASITIZED)
    exam = (
        f"each of the {len(preds):,} development cells of {preds['case_id'].nunique()} "
        "patients was predicted by a model that never saw its patient (out of fold: "
        + (f"one of {preds['fold'].nunique()} fold models" if "fold" in preds else "fold models")
        + ")"
        if part == "oof"
        else f"the {len(preds):,} cells of {preds['case_id'].nunique()} test patients were "
        "never used for training or for any choice"
    )
    st.markdown(
        f"An honest exam uses cells the model never saw: here {exam}. At the model's threshold "
        f"({threshold:.2f}) it calls **{m['accuracy']:.1%}** of them right, but it misses "
        f"**{m['fn']:,}** parasitized cells and raises **{m['fp']:,}** false alarms on "
        "uninfected ones. The errors to look at are the confident ones"
        + (
            f": the most confident miss below was given P({PARASITIZED}) = "
            f"**{missed['prob_parasitized'].iloc[0]:.3f}**. What do these cells have in common?"
            if len(missed)
            else "."
        )
    )
    shown = repo_cells(
        missed,
        model.predictions(part).name,
        lambda r: f"labelled {r.label} · p={r.prob_parasitized:.3f}",
    )
    cells_row(shown)
    left, right = st.columns(2)
    for col, (true, predicted, label) in zip(
        (left, right),
        (
            (PARASITIZED, UNINFECTED, "Open the missed parasites in Evaluate"),
            (UNINFECTED, PARASITIZED, "Open the false alarms in Evaluate"),
        ),
    ):
        col.page_link(
            "views/evaluate.py",
            label=label,
            query_params={"data": part, "true": true, "predicted": predicted},
            icon=":material/grid_on:",
        )
    return set(missed["path"]) | set(alarms["path"]), [path for _, _, path in shown]


# --- 4. why: the labels -------------------------------------------------------------------


def noise_step(model: ModelFolder, preds: pd.DataFrame | None, errors: set, shown: list) -> None:
    """The step; ``preds`` the out-of-fold predictions (None without), ``errors`` and
    ``shown`` as errors_step gives them on those."""
    step(4, "Why: some labels are wrong")
    if preds is None or not model.audit.is_file():
        st.info(
            f"This model folder has no label audit ({AUDIT_FILE}, made from {OOF_FILE} by "
            "`malaria audit`), so this step has no figures."
        )
        return
    try:
        audit = read_audit(model.audit)
    except AuditError as exc:
        st.warning(f"The label audit cannot be read: {text.plain(exc)}")
        return
    if audit.empty:
        st.markdown("The label audit finds no cell whose label the fold models doubt.")
        return
    given, rank = audit["label"].value_counts(), dict(zip(audit["path"], audit["rank"]))
    ranks = [f"#{rank[p]}" for p in shown if p in rank]
    shares = patient_shares(preds, audit)
    top, among = shares.iloc[0], len(errors & set(audit["path"]))
    st.markdown(
        "Not every error is the network's. People labelled these cells, and people make "
        "mistakes. A label audit (confident learning) lists the cells whose label the fold "
        f"models doubt most: **{len(audit):,} suspects**, {given.get(PARASITIZED, 0):,} "
        f"labelled {PARASITIZED} and {given.get(UNINFECTED, 0):,} labelled {UNINFECTED}. "
        f"{among:,} of them are among the {len(errors):,} errors of step 3"
        + (f" (the missed cells shown there are suspects {', '.join(ranks)})" if ranks else "")
        + f". They are not spread evenly: {(shares['suspects'] > 0).sum()} of the "
        f"{len(shares)} patients have any, and patient {text.plain(top['case_id'])} has "
        f"{top['suspects']} of its {top['cells']} cells among them. "
        + (
            f"Below, the first suspects labelled {UNINFECTED}: look for the purple dot. "
            if given.get(UNINFECTED, 0)
            else ""
        )
        + "Is the model wrong, or the label? On the Audit page a class can decide, cell by "
        "cell, and a relabelled cell trains the next model."
    )
    labelled_uninfected = audit[audit["label"] == UNINFECTED]
    cells_row(
        repo_cells(
            labelled_uninfected,
            AUDIT_FILE,
            lambda r: f"suspect #{r.rank} · labelled {r.label}",
        )
    )
    st.page_link("views/audit.py", label="Open the Audit: every suspect", icon=":material/rule:")


# --- 5. how it learnt ---------------------------------------------------------------------


def training_step(model: ModelFolder) -> None:
    step(5, "How it learnt")
    if not model.history.is_file():
        st.info(f"This model folder has no {HISTORY_FILE}, so this step has no figures.")
        return
    loss = pd.read_csv(model.history)["train_loss"].dropna()
    _, summary_path = model.lr_find
    suggested = (
        json.loads(summary_path.read_text())["suggested_lr"] if summary_path.is_file() else None
    )
    used, eps = model.learning_rate, model.label_smoothing
    st.markdown(
        "Training shows the network labelled cells again and again and nudges its weights to "
        "lower a loss, a measure of how wrong it is; the learning rate sets the size of each "
        "nudge. "
        + (
            "Before training, a range test raised the rate batch by batch and watched the "
            f"loss: it suggested {suggested:.1e}. "
            if suggested
            else "This model folder has no learning-rate range test. "
        )
        + (f"This model was trained at {used:.0e}. " if used else "")
        + (
            f"Over its {len(loss)} epochs (passes over the training cells) the training loss "
            f"went from {loss.iloc[0]:.3f} to {loss.iloc[-1]:.3f}"
            if len(loss)
            else "Its history records no training loss"
        )
        + (
            f"; it never reaches 0, because label smoothing ({eps:g}) puts a floor of "
            f"{label_smoothing_floor(eps):.2f} under it."
            if eps and len(loss)
            else "."
        )
    )
    st.page_link(
        "views/training.py",
        label="Open the Training curves and the range test",
        icon=":material/show_chart:",
    )


def lesson_page() -> None:
    st.title("Lesson: how a network finds malaria, and where it fails")
    model = state.current_model()
    st.markdown(steps_intro(model))
    check = stored.heatmap_check(model)
    part = next((p for p in ("oof", "test") if model.predictions(p).is_file()), None)
    sees_step(model, check)
    methods_step(model, check)
    preds = stored.predictions(model, part) if part else pd.DataFrame()
    errors, shown = errors_step(model, part, preds)
    noise_step(model, preds if part == "oof" else None, errors, shown)  # the audit is out of fold
    training_step(model)


lesson_page()
