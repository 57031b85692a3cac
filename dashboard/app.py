"""Entry point: `streamlit run dashboard/app.py`. A router plus the frame all pages share."""

from pathlib import Path

import streamlit as st

from core.schema.contract import DEFAULT_WEIGHTS
from dashboard import resources, state, widgets

st.set_page_config(page_title="Malaria cell screening", page_icon="🔬", layout="wide")
state.init_state()
resources.memory_reaper()
resources.load_in_background(str(DEFAULT_WEIGHTS.resolve()))  # the sidebar's default
# Not "pages/": Streamlit would then run a page URL (a reload of /score) without this router.
PAGES = Path(__file__).resolve().parent / "views"
page = st.navigation(
    [
        st.Page(PAGES / "home.py", title="Home", icon=":material/home:", default=True),
        st.Page(PAGES / "lesson.py", title="Lesson", icon=":material/school:"),
        st.Page(PAGES / "score.py", title="Score", icon=":material/biotech:"),
        st.Page(PAGES / "smear.py", title="Smear", icon=":material/blur_on:"),
        st.Page(PAGES / "adapt.py", title="Adapt to your lab", icon=":material/tune:"),
        st.Page(PAGES / "explain.py", title="Explain", icon=":material/visibility:"),
        st.Page(PAGES / "methods.py", title="Heatmap check", icon=":material/fact_check:"),
        st.Page(PAGES / "evaluate.py", title="Evaluate", icon=":material/grid_on:"),
        st.Page(PAGES / "audit.py", title="Audit", icon=":material/rule:"),
        st.Page(PAGES / "training.py", title="Training", icon=":material/show_chart:"),
        st.Page(PAGES / "study.py", title="Study", icon=":material/science:"),
    ]
)
widgets.model_sidebar()
page.run()
