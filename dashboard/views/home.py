"""Home: what the tool does, and the bundled sample cells to explain or score."""

import streamlit as st

from core.schema.labels import case_id, file_name
from dashboard import images, state

INTRO = (
    "This tool looks at single red-blood-cell images and says whether each is **Parasitized** "
    "or **Uninfected**, using a MobileNetV2 fine-tuned on the NIH malaria cell images and "
    "judged on patients it never saw in training.\n\n"
    "- **Analysts**: score folders or zips of thousands of cells, read the infection rate "
    "(parasitemia) per patient or slide, export CSVs — on the **Score** page.\n"
    "- **Educators**: show *why* the network decides with several heatmap methods side by side "
    "on **Explain**; walk through errors on the clickable confusion matrix of **Evaluate**; "
    "show the learning curves on **Training**.\n\n"
    "Everything runs on this computer; no image leaves it."
)


def samples_caption(samples: list[tuple[str, bytes]]) -> str:
    """Whether the selected model never saw the samples' patients, in words."""
    if state.current_model().held_out(case_id(file_name(name)) for name, _ in samples):
        return "Cells from patients held out of training: explain one, or score them all."
    return (
        "Cells from the development patients, which this model trained on (pick `holdout` in "
        "the sidebar for a model that never saw them): explain one, or score them all."
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
