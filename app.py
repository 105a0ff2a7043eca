"""The dkn app: find, cluster and switch the knowledge neurons that store a fact.

Run with `make run` (or `streamlit run app.py --server.address localhost`).  The pages only call into
`dkn` (no torch here); the model is loaded once per server process and shared by every session.
"""

import streamlit as st

st.set_page_config(
    page_title="Degenerate Knowledge Neurons",
    page_icon=":material/neurology:",
    layout="wide",
    initial_sidebar_state="expanded",
)

from ui import link, state, widgets  # noqa: E402  (after set_page_config)

PAGES = [
    st.Page("app_pages/explore.py", title="Explore", icon=":material/search:", default=True),
    st.Page("app_pages/degenerate.py", title="Degenerate neurons", icon=":material/hub:"),
    st.Page("app_pages/intervene.py", title="Intervene", icon=":material/tune:"),
    st.Page("app_pages/compare.py", title="Facts compared", icon=":material/compare_arrows:"),
    st.Page("app_pages/experiments.py", title="Experiments", icon=":material/science:"),
]

link.restore()  # a shared link: its state, before any widget is drawn
page = st.navigation(PAGES)
with st.sidebar:
    if st.session_state.get("_url_error"):  # shown until the session ends: the link was only partly read
        st.warning(st.session_state["_url_error"], icon=":material/link_off:")
    lm = widgets.model_picker()
    st.divider()
    share = st.container()  # filled after the page ran (the page decides the fact and the groups)
widgets.reset_figures()
link.write()  # the view as the last run left it (a page may stop early)
page.run()
ws = state.current_workspace(lm, load_cached=False) if lm is not None else None
link.write(ws)
with share:
    link.copy_link_button(ws)
    widgets.export_all_button(lm, ws)
