"""The dkn app: find, cluster and switch the knowledge neurons that store a fact.

Run with `make run` (or `streamlit run app.py --server.address localhost`).  The pages only call into
`dkn` (no torch here); the model is loaded once per server process and shared by every session.
"""
import streamlit as st

st.set_page_config(page_title="Degenerate Knowledge Neurons", page_icon=":material/neurology:", layout="wide",
                   initial_sidebar_state="expanded")

from ui import state, widgets  # noqa: E402  (after set_page_config)

PAGES = [
    st.Page("pages/explore.py", title="Explore", icon=":material/search:", default=True),
    st.Page("pages/degenerate.py", title="Degenerate neurons", icon=":material/hub:"),
    st.Page("pages/intervene.py", title="Intervene", icon=":material/tune:"),
    st.Page("pages/experiments.py", title="Experiments", icon=":material/science:"),
]

page = st.navigation(PAGES)
with st.sidebar:
    lm = widgets.model_picker()
widgets.reset_figures()
page.run()
with st.sidebar:
    st.divider()
    widgets.export_all_button(lm)
