"""The Streamlit app's helpers (state and widgets).  The app imports `dkn`; `dkn` never imports this."""
