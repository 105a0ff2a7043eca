"""Widgets shared by the pages: error guard, model picker, figures with their export buttons, export-all."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Callable

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dkn import export
from dkn.datasets import DatasetError
from dkn.models import DEFAULT_LABEL, DEFAULT_MODEL, LoadedModel, ModelLoadError
from dkn.query import QueryError
from ui import state

USER_ERRORS = (ModelLoadError, QueryError, DatasetError, export.ExportError, ValueError)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:60] or "figure"


@contextmanager
def guard(what: str = ""):
    """Show a user error in the page (st.error, with what to do) instead of a traceback."""
    try:
        yield
    except ModelLoadError as err:
        st.error(f"The model could not be loaded: {err}", icon=":material/error:")
    except QueryError as err:
        st.error(f"This prompt/answer cannot be used: {err}", icon=":material/error:")
    except DatasetError as err:
        st.error(f"The facts could not be read: {err}", icon=":material/error:")
    except export.ExportError as err:
        st.error(f"Export failed: {err}", icon=":material/error:")
    except ValueError as err:
        st.error(f"{what + ': ' if what else ''}{err}", icon=":material/error:")


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def pct(x: float) -> str:
    return f"{x:.1%}" if abs(x) >= 0.001 or x == 0 else f"{x:.2e}"


# ------------------------------------------------------------------ model picker (sidebar)
SOURCES = {"Offline default": "default", "Hugging Face id": "hub", "Local folder": "folder"}


def model_picker() -> LoadedModel | None:
    st.subheader("Model")
    source = st.radio("Model source", list(SOURCES), key="model_source", horizontal=False,
                      help="The default model ships with the project and works offline.")
    if SOURCES[source] == "default":
        st.caption(DEFAULT_LABEL)
        wanted = DEFAULT_MODEL
    else:
        placeholder = "gpt2 or EleutherAI/pythia-160m" if SOURCES[source] == "hub" else "/path/to/saved/model"
        wanted = st.text_input("Hugging Face id" if SOURCES[source] == "hub" else "Folder", key="model_text",
                               placeholder=placeholder).strip()
    if st.button("Load model", key="load_model", disabled=not wanted, width="stretch",
                 type="primary" if wanted != state.model_name() else "secondary"):
        st.session_state["model_name"] = wanted
    lm = state.current_model()
    if lm is None:
        st.error(f"{st.session_state.get('model_error', 'no model loaded')}", icon=":material/error:")
        if state.model_name() != DEFAULT_MODEL and st.button("Back to the default model", key="model_reset"):
            st.session_state["model_name"] = DEFAULT_MODEL
            st.rerun()
        return None
    s = state.summary(lm)
    st.success(f"**{s['label']}**", icon=":material/memory:")
    st.caption(f"{fmt_params(s['n_params'])} parameters · {s['family']} · {s['n_layers']} layers × "
               f"{s['d_mlp']:,} neurons = {s['n_neurons']:,} MLP neurons · {s['device']} {s['dtype']} · "
               f"fingerprint `{s['fingerprint']}`")
    return lm


def require_model() -> LoadedModel:
    """The session's model, or an error message and stop."""
    lm = state.current_model()
    if lm is None:
        st.error(f"No model is loaded: {st.session_state.get('model_error', 'pick one in the sidebar')}. "
                 "Pick the offline default or another model in the sidebar.", icon=":material/error:")
        st.stop()
    return lm


def require_workspace(lm: LoadedModel) -> state.Workspace:
    """The current fact's results, or a pointer to the Explore page and stop."""
    with guard():
        ws = state.current_workspace(lm)
        if ws is not None:
            return ws
    fact = state.current_fact()
    st.info(f"No attribution yet for **{fact.prompt} → {fact.answer}**. Run it on the Explore page first.",
            icon=":material/info:")
    st.page_link("pages/explore.py", label="Go to Explore", icon=":material/search:")
    st.stop()


def fact_banner(ws: state.Workspace) -> None:
    n = len(ws.prompts)
    st.markdown(f"**Fact:** {ws.fact.prompt} → **{ws.fact.answer}** &nbsp;·&nbsp; P(answer) = "
                f"**{pct(ws.main.prob)}** &nbsp;·&nbsp; {len(ws.kn.neurons)} knowledge neurons from "
                f"{n} prompt{'s' if n > 1 else ''}")


# ------------------------------------------------------------------ figures with exports
def show_figure(fig: go.Figure, name: str, table: Any = None, *, key: str, caption: str = "",
                on_select: str | None = None, **chart_kwargs):
    """The figure, an optional caption, and an Export menu: PNG, SVG, HTML, and the data as CSV, JSON."""
    figures = st.session_state.setdefault("_figures", {})
    tables = st.session_state.setdefault("_tables", {})
    figures[name] = fig
    if table is not None:
        tables[name] = table
    kwargs = dict(key=key, config={"displaylogo": False, "toImageButtonOptions": {"filename": name}})
    if on_select:
        kwargs.update(on_select=on_select, selection_mode=("points", "box"))
    event = st.plotly_chart(fig, **kwargs, **chart_kwargs)
    cols = st.columns([3, 1])
    with cols[0]:
        if caption:
            st.caption(caption)
    with cols[1]:
        export_menu(fig, name, table, key=key)
    return event


def export_menu(fig: go.Figure | None, name: str, table: Any = None, *, key: str) -> None:
    has_browser = export.browser_available()
    with st.popover("Export", icon=":material/download:", width="content"):
        if fig is not None:
            help_img = None if has_browser else export.MISSING_BROWSER
            st.download_button("PNG image", lambda: export.figure_png(fig), f"{name}.png", "image/png",
                               key=f"{key}_png", on_click="ignore", disabled=not has_browser, help=help_img,
                               width="stretch")
            st.download_button("SVG image", lambda: export.figure_svg(fig), f"{name}.svg", "image/svg+xml",
                               key=f"{key}_svg", on_click="ignore", disabled=not has_browser, help=help_img,
                               width="stretch")
            st.download_button("HTML (interactive)", lambda: export.figure_html(fig), f"{name}.html", "text/html",
                               key=f"{key}_html", on_click="ignore", width="stretch")
            if not has_browser:
                st.caption(export.MISSING_BROWSER)
        if table is not None:
            st.download_button("Data as CSV", lambda: export.table_csv(table), f"{name}.csv", "text/csv",
                               key=f"{key}_csv", on_click="ignore", width="stretch")
            st.download_button("Data as JSON", lambda: export.table_json(table), f"{name}.json",
                               "application/json", key=f"{key}_json", on_click="ignore", width="stretch")


def show_table(table: pd.DataFrame | list[dict], name: str, *, key: str, caption: str = "", **kwargs) -> None:
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    st.session_state.setdefault("_tables", {})[name] = frame
    st.dataframe(frame, hide_index=True, width="stretch", key=key, **kwargs)
    cols = st.columns([3, 1])
    with cols[0]:
        if caption:
            st.caption(caption)
    with cols[1]:
        export_menu(None, name, frame, key=key)


def export_all_button(lm: LoadedModel | None) -> None:
    """One zip with every figure and table shown for the current fact in this session, plus a manifest."""
    ws = state.current_workspace(lm, load_cached=False) if lm is not None else None
    figures = dict(st.session_state.get("_figures", {}))
    tables = dict(st.session_state.get("_tables", {}))
    if ws is None or not figures:
        st.caption("Export all: run an attribution first.")
        return
    fact, settings = ws.fact, ws.settings
    manifest = export.manifest(
        model=state.summary(lm), prompt=fact.prompt, answer=fact.answer, paraphrases=list(ws.prompts[1:]),
        method=settings.method,
        parameters={**ws.main.params.__dict__, "t": settings.t, "p": settings.p, "max_prompts": settings.max_prompts,
                    "degeneracy": {k: r.params.__dict__ for k, r in ws.degeneracy.items()}},
        p_answer=ws.main.prob, knowledge_neurons=[str(n) for n in ws.kn.neurons])
    st.download_button("Export all (zip)", lambda: export.export_zip(figures, tables, manifest),
                       f"dkn-{_slug(fact.prompt)}-{_slug(fact.answer)}.zip", "application/zip",
                       key="export_all", on_click="ignore", icon=":material/folder_zip:", width="stretch",
                       help="Every figure (PNG, SVG, HTML) and table (CSV, JSON) shown for this fact, "
                            "and a manifest (model, fingerprint, prompt, answer, method, parameters, version, date).")


def reset_figures() -> None:
    """Called at the start of each run: figures and tables are collected afresh per page and fact."""
    key = (state.current_fact(), state.current_settings())
    if st.session_state.get("_figures_for") != key:
        st.session_state["_figures"] = {}
        st.session_state["_tables"] = {}
        st.session_state["_figures_for"] = key


def neuron_label(n) -> str:
    return f"L{n.layer}:N{n.index}"


def run_with_progress(label: str, work: Callable[[Callable[[float, str], None]], Any]) -> Any:
    bar = st.progress(0.0, text=label)

    def update(frac: float, text: str) -> None:
        bar.progress(min(1.0, max(0.0, frac)), text=f"{label}: {text} ({frac:.0%})")
    try:
        return work(update)
    finally:
        bar.empty()
