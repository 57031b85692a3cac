"""Widgets several pages draw: the sidebar's model picker, a model card as tables, one cell
shown large, and tables offered as CSV downloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core.data.images import ImageError, decode_image
from core.data.sources import ImageSource, read_bytes
from core.explain.heatmap import for_display
from core.schema.contract import DEFAULT_WEIGHTS, ModelFolder, WeightsError, find_models
from core.schema.export import to_csv_text
from core.schema.files import REPO_ROOT
from core.schema.labels import file_name
from dashboard.state import open_in_explain
from dashboard.text import minutes, model_label, plain

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
    current = Path(st.session_state["model_folder"]).resolve()
    index = choices.index(current) if current in choices else 0
    with st.sidebar:
        folder = st.selectbox(
            "Model",
            choices,
            index=index,
            format_func=model_label,
            help="The shipped default, or any trained run folder under weights/ or runs/",
        )
        st.session_state["model_folder"] = str(folder)
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
        data = ", ".join(Path(d).name for d in model.training_data)
        if data:
            st.caption(f"Trained on {data}; {len(model.split['train'])} training patients")
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
