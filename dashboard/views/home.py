"""Home: what the tool does, and the bundled sample cells to explain or score."""

import streamlit as st

from core.schema.contract import HOLDOUT_WEIGHTS, ModelFolder, WeightsError
from core.schema.labels import case_id, file_name
from dashboard import images, state

INTRO = (
    "This tool looks at single red-blood-cell images and says whether each is **Parasitized** "
    "or **Uninfected**, using a MobileNetV2 fine-tuned on the NIH malaria cell images, its "
    "accuracy measured on patients unseen in training (for the shipped model, by five fold "
    "models of its recipe).\n\n"
    "- **Analysts**: score folders or zips of thousands of cells, read the infection rate "
    "(parasitemia) per patient or slide, export CSVs — on the **Score** page.\n"
    "- **Educators**: follow the **Lesson** page's five steps with a class, or show *why* the "
    "network decides with several heatmap methods side by side on **Explain**; walk through "
    "errors on the clickable confusion matrix of **Evaluate**; show the learning curves on "
    "**Training**.\n\n"
    "Everything runs on this computer; no image leaves it."
)


def samples_caption(samples: list[tuple[str, bytes]]) -> str:
    """Whether the selected model ever saw the samples' patients, in words, and which model
    never did where this one has."""
    model = state.current_model()
    cases = {case_id(file_name(name)) for name, _ in samples}
    if model.held_out(cases):
        return (
            "Cells of this model's test patients, which it never saw in training or in any "
            "choice: explain one, or score them all."
        )
    split = model.split
    if not any(split.values()):
        return (
            "Development cells; this model's card does not say which patients it trained on. "
            "Explain one, or score them all."
        )
    trained = (
        f"this model trained on all {len(split['train'])} development patients, theirs among them"
        if not split["val"] and not split["test"]
        else "this model trained on their patients or chose its epoch on them"
    )
    other = ""
    if HOLDOUT_WEIGHTS.is_dir() and model.path.resolve() != HOLDOUT_WEIGHTS.resolve():
        try:
            holdout = ModelFolder.open(HOLDOUT_WEIGHTS)
            if holdout.held_out(cases):
                other = (
                    " `weights/holdout` (sidebar) never saw them: their patients are among its "
                    f"{len(holdout.split['test'])} test patients."
                )
        except WeightsError:
            pass  # no second model to point to
    return (
        f"Development cells: {trained}, so its calls here are no test.{other} Explain one, or "
        "score them all."
    )


def samples_ui(samples: list[tuple[str, bytes]]) -> None:
    """One column per sample with its Explain button, then Score all; a click hands the
    samples over to that page."""
    cols = st.columns(len(samples) or 1)
    for col, (name, data) in zip(cols, samples):
        with col:
            st.image(data, caption=name.split("/")[1], width="stretch")
            if st.button("Explain", key=f"explain_{name}", width="stretch"):
                st.session_state["explain_item"] = (name, data)
                st.switch_page("views/explain.py")
    if samples and st.button("Score all samples", type="primary"):
        st.session_state["pending_items"] = samples
        st.switch_page("views/score.py")


def home_page() -> None:
    st.title("Malaria screening from thin blood smears")
    st.markdown(INTRO)
    st.subheader("Try it on sample cells")
    samples = images.sample_items()
    st.caption(samples_caption(samples))
    samples_ui(samples)


home_page()
