"""Adapt: fine-tune the selected model on a few annotated fields of the user's own lab
(``malaria adapt`` as a background job, core.training.jobs), follow it, and find the adapted
model in the sidebar with its leave-one-block-out check."""

import time

import pandas as pd
import streamlit as st

from core.data.annotations import AnnotationError
from core.schema.contract import ModelFolder, WeightsError
from core.training.jobs import ADAPTED_DIR, AdaptJob, adapt_jobs, start_adapt
from dashboard import images, state, text

CHECK_SHOWN = {  # the leave-one-block-out figures, as malaria adapt prints them
    "fields": "fields",
    "reported_share": "fields reported",
    "infected_sensitivity": "infected cells called",
    "false_positive_share_counted": "other counted objects called",
    "parasitemia_mae": "parasitemia error (MAE)",
}


def start_ui(model: ModelFolder) -> None:
    """The uploads, the name, and the button that starts a job."""
    st.caption(
        "Every lab's microscope, camera and stain differ from the NIH slides this model "
        "learnt from. Give it a few fields of your own lab with the cells boxed (the format "
        "of `smear_dev/annotations.json`: one entry per image, each box a `type` — `red blood "
        "cell`, `ring`, `trophozoite`, `schizont`, `gametocyte` or `difficult` — and a `bbox` "
        "of `x, y, w, h`) and it is fine-tuned from the selected model on the CPU, its "
        "threshold and quality gate set for your lab, and written as a new model; the "
        "selected one is left as it is."
    )
    left, right = st.columns(2)
    fields = left.file_uploader(
        "Fields (images or a zip)",
        type=images.UPLOAD_TYPES,
        accept_multiple_files=True,
        key="adapt_fields",
    )
    boxes = right.file_uploader("Their boxes (annotations.json)", type=["json"], key="adapt_boxes")
    name = left.text_input("Name of the adapted model", value="mylab", max_chars=40)
    check = right.toggle(
        "Check it block by block",
        value=True,
        help="Leave one block of shots out at a time (fields named alike, e.g. PA1717..): "
        "fit on the others, measure on it. Several times longer, and the only honest figure.",
    )
    blocks = right.number_input(
        "Characters of a field's file name that name its block of shots",
        min_value=1,
        max_value=40,
        value=6,
        help="Shots taken together look alike (PA1717.. and PA1718.. are two blocks at 6): "
        "the check leaves one block out at a time.",
        disabled=not check,
    )
    st.caption(
        f"From **{text.model_label(model.path)}** into `{text.model_label(ADAPTED_DIR / name)}`."
        " Measured on 80 fields with the check: 10-12 minutes on 2 quiet cores, 15 on busy"
        " ones. It goes on if you close the tab."
    )
    if st.button("Adapt", type="primary", disabled=not (fields and boxes)) and boxes:
        try:
            job = start_adapt(
                images.uploaded_items(fields),
                boxes.getvalue(),
                name=name,
                base=model.path,
                check=check,
                blocks=int(blocks),
            )
        except (AnnotationError, ValueError) as exc:
            st.error(text.plain(exc))
            st.stop()
        st.success(f"Started: {job.info['fields']} fields, into {job.out}.")


def check_table(folder) -> pd.DataFrame | None:
    """The adapted model's leave-one-block-out figures, one row per left-out block; None if
    it was written without the check."""
    try:
        card = ModelFolder.open(folder).card
    except WeightsError:
        return None
    blocks = card.get("adaptation", {}).get("check", {}).get("blocks")
    if not blocks:
        return None
    table = pd.DataFrame(blocks).T.reindex(columns=list(CHECK_SHOWN)).rename(columns=CHECK_SHOWN)
    return table.rename_axis("left-out block").reset_index()


def job_ui(job: AdaptJob) -> None:
    info, job_state = job.info, job.state
    minutes = (time.time() - info["started"]) / 60
    head = f"**{info['name']}** · {info['fields']} fields · from {text.model_label(info['base'])}"
    if job_state == "running":
        st.info(f"{head} · running for {minutes:.0f} min")
        st.code(job.log(6) or "starting…", language=None)
    elif job_state == "done":
        st.success(f"{head} · done: choose **{job.out.name}** in the sidebar's model list.")
        table = check_table(job.out)
        if table is not None:
            st.dataframe(table, hide_index=True, width="stretch")
    else:
        st.error(
            f"{head} · {job_state}: "
            + (text.plain(job.log(1)) or "the process ended without a word")
        )


@st.fragment(run_every=5)
def jobs_ui() -> None:
    """The jobs started from here (or by anyone on this machine), the newest first, redrawn
    every few seconds while one runs."""
    jobs = adapt_jobs()
    if not jobs:
        st.caption("No adaptation started yet.")
        return
    st.subheader("Adaptations")
    for job in jobs[:5]:
        job_ui(job)


def adapt_page() -> None:
    st.title("Adapt to your lab")
    model = state.current_model()
    start_ui(model)
    jobs_ui()


adapt_page()
