"""Widgets several pages draw: the sidebar's model picker, a model card as tables, one cell
shown large, and tables offered as CSV downloads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core.data.images import ImageError, decode_image
from core.data.sources import ImageSource, read_bytes
from core.explain.heatmap import for_display
from core.inference.store import SMEAR, RunInfo, StoreError, inputs_summary
from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder, WeightsError, find_models
from core.schema.export import to_csv_text
from core.schema.files import REPO_ROOT
from core.schema.labels import file_name
from dashboard import resources
from dashboard.state import MODEL_PARAM, linked_model, open_in_explain
from dashboard.text import minutes, model_label, plain, trained_on

RUNS_COLUMNS = [  # the Past runs table; those a page's runs have (smear runs: no duplicates)
    "run_id",
    "name",
    "sample",
    "operator",
    "started",
    "inputs",
    "stored",
    "parasitized",
    "not_counted",
    "errors",
    "duplicates",
    "threshold",
    "model",
    "weights_sha256",
    "kind",
]
CARD_METRICS = (
    "n",
    "cases",
    "accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "mcc",
)


def model_choices() -> list[Path]:
    """The model folders to pick from: the shipped default first, then every trained run
    folder under weights/ or runs/."""
    found = find_models(REPO_ROOT / "weights", REPO_ROOT / "runs")
    default = DEFAULT_WEIGHTS.resolve()
    return [default] + [f for f in found if f != default]


def show_card(model: ModelFolder) -> None:
    """A model card as tables a person reads (what the model is, how it scored on each split,
    its contract and training settings), not as raw JSON."""
    split, screening = model.split, model.screening
    about = {
        "architecture": model.arch,
        "created": minutes(model.created),
        "weights sha256": model.sha256,
        "kept weights": model.kept_weights,
        "patients (train / validation / test)": " / ".join(
            str(len(split[k])) for k in ("train", "val", "test")
        )
        if any(split.values())
        else None,
        "training data": ", ".join(model.training_data),
        "screening flag": f"flagged when {screening.describe()} ({screening.method})"
        if screening.method
        else None,
        "temperature": f"{model.contract.temperature:.3f} (probabilities calibrated on "
        "out-of-fold cells)"
        if model.contract.temperature != 1.0
        else None,
        "training command": model.training_command,
    }
    facts = pd.DataFrame({"": list(about), "value": [str(v) for v in about.values()]})
    st.dataframe(facts[[v != "None" for v in facts["value"]]], hide_index=True, width="stretch")
    metrics = pd.DataFrame(
        {name: {k: m.get(k) for k in CARD_METRICS} for name, m in model.metrics.items()}
    ).T
    if not metrics.empty:
        st.caption("Metrics per split (test: patients never used for training or selection)")
        st.dataframe(
            metrics,
            width="stretch",
            placeholder="",
            column_config={
                k: st.column_config.NumberColumn(format="%d" if k in ("n", "cases") else "%.4f")
                for k in CARD_METRICS
            },
        )
    settings = model.settings
    if settings:
        st.caption("Contract (what every user of the model reads) and training settings")
        st.dataframe(
            pd.DataFrame({"setting": list(settings), "value": [str(v) for v in settings.values()]}),
            hide_index=True,
            width="stretch",
        )


def model_sidebar() -> None:
    """Sidebar: pick a model folder and show its card."""
    choices = model_choices()
    with st.sidebar:
        linked_model({model_label(c): str(c) for c in choices})
        current = Path(st.session_state["model_folder"]).resolve()
        index = choices.index(current) if current in choices else 0
        folder = st.selectbox(
            "Model",
            choices,
            index=index,
            format_func=model_label,
            help="The shipped default, or any trained run folder under weights/ or runs/",
        )
        st.session_state["model_folder"] = str(folder)
        if st.query_params.get(MODEL_PARAM) != model_label(folder):  # a reload keeps it
            st.query_params[MODEL_PARAM] = model_label(folder)
        try:
            model = ModelFolder.open(folder)
        except WeightsError as exc:
            st.error(f"This model cannot be used: {plain(exc)}")
            return
        source, est = model.estimate
        st.caption(f"**{model.arch}** · sha256 `{model.sha256[:10]}`")
        if est:
            st.markdown(
                f"On **{plain(source)}** ({est.get('n', '?')} cells)  \n"
                f"accuracy **{est['accuracy']:.3f}** · AUC **{est['auc']:.4f}**  \n"
                f"sensitivity {est['sensitivity']:.3f} · specificity {est['specificity']:.3f}"
            )
        line = trained_on(model)
        if line:
            st.caption(line)
        with st.expander("Model card"):
            show_card(model)


def cell_view(
    path: str,
    source: ImageSource | None,
    *,
    details: str,
    state_key: str,
    link: dict[str, str] | None = None,
    also: Sequence[tuple[np.ndarray, str]] = (),
) -> None:
    """One cell shown large (250-350 px) with ``details`` (Markdown, names escaped by the
    caller), any images in ``also`` as (RGB array, caption) beside it, a button that opens it
    in Explain and one that closes the view by clearing ``st.session_state[state_key]``."""
    with st.container(border=True):
        cols = st.columns([2] * (1 + len(also)) + [3])
        data: bytes | None = None
        try:
            if source is None:
                raise ImageError(
                    "its image is not at hand: a reopened upload keeps its "
                    "results, not its images (or the file moved)"
                )
            data = read_bytes(source)
            cols[0].image(
                for_display(decode_image(data)),  # upsampled smoothly, not blocky
                caption=plain(file_name(path)),
                width="stretch",
            )
        except (ImageError, OSError) as exc:
            data = None
            cols[0].info(plain(f"{file_name(path)}: {exc}"))
        for col, (extra, caption) in zip(cols[1:], also):
            col.image(extra, caption=plain(caption), width="stretch")
        info = cols[-1]
        info.markdown(details)
        info.caption(plain(path))
        if (
            info.button(
                "Open in Explain",
                key=f"{state_key}_explain",
                type="primary",
                disabled=data is None,
                icon=":material/visibility:",
            )
            and data
        ):
            open_in_explain(path, data, link)
        info.button(  # a callback: no st.rerun() that could swallow a sidebar click
            "Close",
            key=f"{state_key}_close",
            on_click=st.session_state.update,
            args=({state_key: None},),
        )


def csv_downloads(*downloads: tuple[str, pd.DataFrame, str, str | None]) -> None:
    """Download buttons side by side, each a table as CSV: (label, table, file name, help)."""
    for col, (label, table, name, help_text) in zip(st.columns(len(downloads)), downloads):
        col.download_button(label, to_csv_text(table), name, "text/csv", help=help_text)


def provenance(
    run_id: str, threshold: float, weights: Path | str, sha256: str, **extra: object
) -> dict[str, object]:
    """The columns every exported row gets: its run, the threshold of its call (then
    ``extra``), and the model that computed its probability."""
    return dict(
        run_id=run_id,
        threshold=threshold,
        **extra,
        scored_with=model_label(weights),
        scored_with_sha256=sha256,
    )


def other_model_warning(info: RunInfo, model: ModelFolder, *, again: str) -> None:
    """st.warning when the run on show was scored with another model than ``model`` (the
    sidebar's); ``again`` names the button that scores with it."""
    if info.weights_sha256 != model.sha256:
        st.warning(
            "These results come from another model than the one selected in the "
            "sidebar; the threshold and screening flag below are the selected model's. "
            f"Upload the files again and press **{again}** to rescore them with it."
        )


def reopen_linked_run(open_run: Callable[[str], None]) -> None:
    """``open_run`` the run that the page's address names (``?run=``), after a reload or
    from a link; st.warning in one line if it cannot be opened."""
    if "run" in st.query_params:
        try:
            open_run(st.query_params["run"])
        except StoreError as exc:
            st.warning(f"The run in this page's link cannot be opened: {plain(exc)}")


def past_runs_ui(
    page: str, *, open_run: Callable[[str], None], delete_run: Callable[[str], None]
) -> None:
    """Every stored run that ``page`` made, to reopen or delete."""
    st.subheader("Past runs")
    runs = resources.store().list_runs(page=page)
    if runs.empty:
        st.caption("No runs yet. Every scoring is saved here and survives reloads and restarts.")
        return
    runs = runs.assign(
        inputs=[inputs_summary(json.loads(i)) for i in runs["inputs"]],
        model=[model_label(w) for w in runs["weights"]],
        weights_sha256=runs["weights_sha256"].str[:10],
        started=[minutes(s) for s in runs["started"]],
    )
    st.dataframe(
        runs[[c for c in RUNS_COLUMNS if c in runs]],
        hide_index=True,
        width="stretch",
        placeholder="",
        column_config={
            "inputs": st.column_config.TextColumn(width="medium"),
            "started": st.column_config.TextColumn("started (UTC)"),
            "stored": st.column_config.NumberColumn("fields" if page == SMEAR else "stored"),
            "threshold": st.column_config.NumberColumn(format="%.2f"),
        },
    )
    unit = "fields" if page == SMEAR else "files"
    labels = {
        r.run_id: f"{r.name or r.inputs} · {r.started} · {r.stored:,} {unit} · {r.run_id}"
        for r in runs.itertuples()
    }
    pick = st.selectbox(
        "Reopen or delete a run",
        list(labels),
        format_func=lambda k: labels[k],
        key=f"past_run_{page}",
    )
    o, x, sure = st.columns([1, 1, 3], vertical_alignment="center")
    # Callbacks, run before the page: a st.rerun() from the page itself would win over a
    # sidebar link clicked while it runs, and that click would be lost.
    o.button("Open run", on_click=open_run, args=(pick,))
    confirmed = sure.checkbox("Yes, delete this run and its results", key=f"sure_{pick}")
    x.button("Delete run", disabled=not confirmed, on_click=delete_run, args=(pick,))
