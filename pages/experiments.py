"""Experiments: a placeholder until the experiment runner has a page of its own."""
import streamlit as st

st.title("Experiments")
st.markdown("Experiments over many facts (how often facts are degenerate, how the clusterers compare, "
            "robustness checks) run from the command line:")
st.code("python -m dkn experiment ...", language="bash")
st.info("No experiments are listed here yet. Their results will appear on this page.", icon=":material/science:")
