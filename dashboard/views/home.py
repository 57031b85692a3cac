import streamlit as st

from core.schema.labels import case_id
from dashboard import ui

st.title("Malaria screening from thin blood smears")
st.markdown(
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

st.subheader("Try it on sample cells")
samples = ui.sample_items()
if {case_id(name.split("/")[-1]) for name, _ in samples} <= set(ui.current_model().split["test"]):
    st.caption("Cells from patients held out of training: explain one, or score them all.")
else:
    st.caption(
        "Cells from the development patients, which this model trained on (pick `holdout` in "
        "the sidebar for a model that never saw them): explain one, or score them all."
    )
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
