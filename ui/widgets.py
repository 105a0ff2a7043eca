"""Widgets shared by the pages: error guard, model picker, figures with their export buttons, export-all."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dkn import export, options
from dkn import neurons as neurons_mod
from dkn.datasets import DatasetError
from dkn.models import DEFAULT_LABEL, DEFAULT_MODEL, PLANTED_MODEL, LoadedModel, ModelLoadError
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


def signed_pct(x: float) -> str:
    """A relative change with its sign, "+0.0%" (never "-0.0%") when it rounds to zero."""
    text = f"{x:+.1%}"
    return "+0.0%" if text in ("-0.0%", "+0.0%") else text


def count(n: int, noun: str) -> str:
    """ "1 neuron", "2 neurons"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def titled(title: str, lm: LoadedModel, ws) -> str:
    """A figure title that names the model and the fact (exported figures stand alone)."""
    return state.figure_title(title, state.summary(lm)["label"], ws.fact)


# ------------------------------------------------------------------ model picker (sidebar)
SOURCES = {
    "Offline default": "default",
    "Hugging Face id": "hub",
    "Local folder": "folder",
    "Planted demo (constructed)": "planted",
}


def model_picker() -> LoadedModel | None:
    st.subheader("Model")
    source = st.radio(
        "Model source",
        list(SOURCES),
        key="model_source",
        horizontal=False,
        help="The default model ships with the project and works offline.",
    )
    if SOURCES[source] == "default":
        st.caption(DEFAULT_LABEL)
        wanted = DEFAULT_MODEL
    elif SOURCES[source] == "planted":
        from dkn.planted import PLANTED_DEFAULT_LABEL

        st.caption(f"{PLANTED_DEFAULT_LABEL}: built on first use (minutes of CPU) under cache/planted/.")
        wanted = PLANTED_MODEL
    else:
        placeholder = "gpt2 or EleutherAI/pythia-160m" if SOURCES[source] == "hub" else "/path/to/saved/model"
        wanted = st.text_input(
            "Hugging Face id" if SOURCES[source] == "hub" else "Folder", key="model_text", placeholder=placeholder
        ).strip()
    device, dtype = placement_picker()
    changed = (wanted, device, dtype) != (state.model_name(), *state.model_placement())
    if st.button(
        "Load model",
        key="load_model",
        disabled=not wanted,
        width="stretch",
        type="primary" if changed else "secondary",
    ):
        st.session_state["model_name"] = wanted
        st.session_state["model_device"], st.session_state["model_dtype"] = device, dtype
    lm = state.current_model()
    if lm is None:
        st.error(f"{st.session_state.get('model_error', 'no model loaded')}", icon=":material/error:")
        if (state.model_name(), *state.model_placement()) != (DEFAULT_MODEL, "auto", "float32"):
            st.button("Back to the default model", key="model_reset", on_click=back_to_default)
        return None
    s = state.summary(lm)
    st.success(f"**{s['label']}**", icon=":material/memory:")
    st.caption(
        f"{fmt_params(s['n_params'])} parameters · {s['family']} · {s['n_layers']} layers × "
        f"{s['d_mlp']:,} neurons = {s['n_neurons']:,} MLP neurons · {s['device']} {s['dtype']} · "
        f"fingerprint `{s['fingerprint']}`"
    )
    if lm.name == PLANTED_MODEL:
        planted_facts()
    return lm


def placement_picker() -> tuple[str, str]:
    """Device and weights' precision for the next Load (the loaded model keeps its own until then)."""
    loaded_device, loaded_dtype = state.model_placement()
    with st.expander("Device and precision", expanded=False):
        device = st.selectbox(
            "Device",
            list(options.DEVICES),
            index=list(options.DEVICES).index(loaded_device) if loaded_device in options.DEVICES else 0,
            key="w_model_device",
            help="auto: a CUDA GPU if there is one, else Apple's MPS, else the CPU.",
        )
        dtype = st.selectbox(
            "Weights",
            list(options.DTYPES),
            index=list(options.DTYPES).index(loaded_dtype) if loaded_dtype in options.DTYPES else 0,
            key="w_model_dtype",
            help="bfloat16 / float16 halve the memory (mainly for a GPU); attribution accumulates in float32 "
            "whatever the weights. Results are cached per model fingerprint, which the precision changes.",
        )
    return device, dtype


def planted_facts() -> None:
    """The planted model's ground truth, so that a user can switch each planted group off on the Intervene page."""
    from dkn.planted import describe_planted

    with st.expander("Planted facts (constructed ground truth)", expanded=False):
        st.caption(
            "Type a group's neurons under Intervene → Your own groups; each group alone off should leave "
            "the fact, all groups off should remove it."
        )
        for line in describe_planted():
            st.markdown(f"- {line}")


def back_to_default() -> None:
    """The reset button's callback (before the widgets are drawn): the default model, and the bad name or
    path gone from the sidebar."""
    st.session_state["model_name"] = DEFAULT_MODEL
    st.session_state["model_device"], st.session_state["model_dtype"] = "auto", "float32"
    st.session_state.pop("w_model_device", None)  # the pickers start again from the loaded placement
    st.session_state.pop("w_model_dtype", None)
    st.session_state["model_source"] = next(iter(SOURCES))
    st.session_state["model_text"] = ""
    st.session_state.pop("model_error", None)


def require_model() -> LoadedModel:
    """The session's model, or an error message and stop."""
    lm = state.current_model()
    if lm is None:
        st.error(
            f"No model is loaded: {st.session_state.get('model_error', 'pick one in the sidebar')}. "
            "Pick the offline default or another model in the sidebar.",
            icon=":material/error:",
        )
        st.stop()
    return lm


def require_workspace(lm: LoadedModel) -> state.Workspace:
    """The current fact's results, or a pointer to the Explore page and stop."""
    with guard():
        ws = state.current_workspace(lm)
        if ws is not None:
            return ws
    fact = state.current_fact()
    st.info(
        f"No attribution yet for **{fact.prompt} → {fact.answer}**. Run it on the Explore page first.",
        icon=":material/info:",
    )
    st.page_link("app_pages/explore.py", label="Go to Explore", icon=":material/search:")
    st.stop()


def fact_banner(ws: state.Workspace) -> None:
    n = len(ws.prompts)
    st.markdown(
        f"**Fact:** {ws.fact.prompt} → **{ws.fact.answer}** &nbsp;·&nbsp; P(answer) = "
        f"**{pct(ws.main.prob)}** &nbsp;·&nbsp; {len(ws.kn.neurons)} knowledge neurons from "
        f"{n} prompt{'s' if n > 1 else ''}"
    )


# ------------------------------------------------------------------ figures with exports
def show_figure(
    fig: go.Figure,
    name: str,
    table: Any = None,
    *,
    key: str,
    caption: str = "",
    on_select: str | None = None,
    **chart_kwargs,
):
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
    _caption_and_export(caption, fig, name, table, key)
    return event


def degeneracy_metrics(grid: Any, all_label: str, index_help: str | None = None) -> None:
    """Three metrics of a degeneracy grid (a DegeneracyResult or a custom_groups.GroupGrid): its degeneracy
    index, how its groups combine, and P(answer) with all groups scaled (`all_label`), as a change."""
    m = st.columns(3)
    m[0].metric("Degeneracy index", f"{grid.degeneracy_index:.2f}", help=index_help)
    m[1].metric("Groups combine", grid.combination)
    m[2].metric(
        all_label,
        pct(grid.prob * (1 - grid.union_drop)),
        delta=signed_pct(-grid.union_drop),
        delta_color="normal",
    )


def export_menu(fig: go.Figure | None, name: str, table: Any = None, *, key: str) -> None:
    has_browser = export.browser_available()
    with st.popover("Export", icon=":material/download:", width="content"):
        if fig is not None:
            help_img = None if has_browser else export.MISSING_BROWSER
            image = {"disabled": not has_browser, "help": help_img}
            _download("PNG image", lambda: export.figure_png(fig), name, "png", "image/png", key, **image)
            _download("SVG image", lambda: export.figure_svg(fig), name, "svg", "image/svg+xml", key, **image)
            _download("HTML (interactive)", lambda: export.figure_html(fig), name, "html", "text/html", key)
            if not has_browser:
                st.caption(export.MISSING_BROWSER)
        if table is not None:
            _download("Data as CSV", lambda: export.table_csv(table), name, "csv", "text/csv", key)
            _download("Data as JSON", lambda: export.table_json(table), name, "json", "application/json", key)


def _download(label: str, data, name: str, suffix: str, mime: str, key: str, **options) -> None:
    """One export button: file `name.suffix`, widget key `key_suffix`, the page not rerun on click."""
    st.download_button(
        label, data, f"{name}.{suffix}", mime, key=f"{key}_{suffix}", on_click="ignore", width="stretch", **options
    )


def _caption_and_export(caption: str, fig: go.Figure | None, name: str, table: Any, key: str) -> None:
    """The row under a chart or table: its caption on the left, its export menu on the right."""
    cols = st.columns([3, 1])
    with cols[0]:
        if caption:
            st.caption(caption)
    with cols[1]:
        export_menu(fig, name, table, key=key)


def show_table(table: pd.DataFrame | list[dict], name: str, *, key: str, caption: str = "", **kwargs) -> None:
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    st.session_state.setdefault("_tables", {})[name] = frame
    st.dataframe(frame, hide_index=True, width="stretch", key=key, **kwargs)
    _caption_and_export(caption, None, name, frame, key)


def export_all_button(lm: LoadedModel | None, ws: state.Workspace | None = None) -> None:
    """One zip with every figure of the current fact, whatever pages were visited (the missing ones are built
    from the cached results when the button is clicked), its tables, and a manifest with the intervention
    state and the link that reproduces the view."""
    if lm is None or ws is None:
        st.caption("Export all: run an attribution first.")
        return
    from ui import link

    clusterer = st.session_state.get("clusterer_value", "ntc")
    factor, mode = float(st.session_state.get("p_factor", 0.0)), st.session_state.get("p_mode", "last")
    shown = dict(st.session_state.get("_figures", {}))
    tables = dict(st.session_state.get("_tables", {}))
    result = ws.degeneracy.get(f"{clusterer}/last")
    ticked = state.ticked_neurons(ws, clusterer, result.candidates) if result is not None else ()
    intervention = {
        "neurons": [neuron_label(n) for n in ticked],
        "factor": factor,
        "mode": mode,
        "clusterer": clusterer,
    }
    url = link.share_url(ws)
    summary = state.summary(lm)
    fact = ws.fact

    def build() -> bytes:
        return export_all_zip(lm, ws, shown, tables, intervention, url, summary)

    st.download_button(
        "Export all (zip)",
        build,
        f"dkn-{_slug(fact.prompt)}-{_slug(fact.answer)}.zip",
        "application/zip",
        key="export_all",
        on_click="ignore",
        icon=":material/folder_zip:",
        width="stretch",
        help="Every figure of this fact (PNG, SVG, HTML) and table (CSV, JSON), and a manifest "
        "(model, fingerprint, prompt, answer, method, parameters, intervention, link, version, "
        "date).",
    )


def export_all_zip(
    lm: LoadedModel,
    ws: state.Workspace,
    shown: dict,
    tables: dict,
    intervention: dict,
    url: str,
    summary: dict,
    images: bool | None = None,
) -> bytes:
    """The Export-all zip: every figure of the fact (what the pages drew, and the rest built from the cached
    results), the tables, and a manifest with the intervention state and the link.  No Streamlit calls (it
    runs when the button is clicked)."""
    neurons = tuple(neurons_mod.parse_neurons(",".join(intervention["neurons"])))
    figures, all_tables = state.all_figures(
        lm, ws, intervention["clusterer"], neurons, intervention["factor"], intervention["mode"], summary["label"]
    )
    figures.update(shown)  # what the pages drew wins (same names)
    figures = {k: v if isinstance(v, go.Figure) else go.Figure(v) for k, v in figures.items()}
    all_tables.update(tables)
    fact, settings = ws.fact, ws.settings
    manifest = export.manifest(
        model=summary,
        prompt=fact.prompt,
        answer=fact.answer,
        paraphrases=list(ws.prompts[1:]),
        method=settings.method,
        parameters={
            **ws.main.params.__dict__,
            "t": settings.t,
            "p": settings.p,
            "max_prompts": settings.max_prompts,
            "degeneracy": {k: r.params.__dict__ for k, r in ws.degeneracy.items()},
        },
        p_answer=ws.main.prob,
        knowledge_neurons=[neuron_label(n) for n in ws.kn.neurons],
        intervention=intervention,
        link=url,
    )
    return export.export_zip(figures, all_tables, manifest, images=images)


def reset_figures() -> None:
    """Called at the start of each run: figures and tables are collected afresh per page and fact."""
    key = (state.current_fact(), state.current_settings())
    if st.session_state.get("_figures_for") != key:
        st.session_state["_figures"] = {}
        st.session_state["_tables"] = {}
        st.session_state["_figures_for"] = key


neuron_label = neurons_mod.neuron_label  # "L12:N345" everywhere


def generic_comparison(lm: LoadedModel) -> dict | None:
    """What the Facts compared page found for this model ({"neurons", "facts_of", "n_facts", "share"}), or
    None before facts were compared, or when they were compared on another model."""
    generic = st.session_state.get("generic_neurons")
    return generic if generic and generic.get("fingerprint") == lm.fingerprint else None


def generic_neurons(lm: LoadedModel) -> set:
    """The knowledge neurons flagged generic on the Facts compared page for this model (empty until then)."""
    generic = generic_comparison(lm)
    return set(generic["neurons"]) if generic else set()


def _mark_cancelled(key: str) -> None:
    st.session_state[f"cancelled_{key}"] = True


def run_with_progress(
    label: str, work: Callable[[Callable[[float, str], None]], Any], *, cancel_key: str | None = None
) -> Any:
    """work(update) under a progress bar.  With cancel_key, a Cancel button beside it: clicking it starts a
    new run of the page, which stops this one at its next progress update (results are only stored when
    complete); the new run finds session_state[f"cancelled_{cancel_key}"] set."""
    holder = st.empty()
    if cancel_key:
        holder.button(
            "Cancel",
            key=cancel_key,
            on_click=_mark_cancelled,
            args=(cancel_key,),
            icon=":material/cancel:",
            help="Stop this run; nothing unfinished is stored.",
        )
    bar = st.progress(0.0, text=label)

    def update(frac: float, text: str) -> None:
        text = text if len(text) <= 90 else text[:87] + "..."
        bar.progress(min(1.0, max(0.0, frac)), text=f"{label}: {text} ({frac:.0%})")

    try:
        return work(update)
    finally:
        bar.empty()
        holder.empty()
