"""The view in the URL: what matters of a session's state lives in st.query_params, so that a link opened in
a fresh browser restores the view (at once when the attributions are cached).

Keys: model; fact (a built-in fact's id) or prompt/answer/para (a typed fact; `para` repeated) or
dataset + fact; method, steps, baseline, t, p, n (attribution settings); clusterer; bdc (ticked candidate
groups, "0,2"), group (one of the user's groups, "L3:N7 L4:N1"; repeated), neurons (ticked single
neurons), factor, mode.  The page is the URL's path (st.navigation).
"""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st

from dkn.models import DEFAULT_MODEL
from dkn.neurons import neuron_label, parse_neurons
from ui import state


def _get(params, key: str, default=None):
    value = params.get(key)
    return default if value in (None, "") else value


def restore() -> None:
    """Once per session, before any widget is drawn: the state named in the URL."""
    if st.session_state.get("_url_restored"):
        return
    st.session_state["_url_restored"] = True
    params = st.query_params
    if not params:
        return
    try:
        _restore(params)
    except (ValueError, KeyError) as err:  # a hand-edited link: keep what could be read
        st.session_state["_url_error"] = f"Part of the link could not be read ({err}); the rest is restored."


def _restore(params) -> None:
    model = _get(params, "model")
    if model and model != DEFAULT_MODEL:
        st.session_state["model_name"] = model
        st.session_state["model_source"] = (
            "Local folder" if "/" in model and model.startswith(("/", ".", "~")) else "Hugging Face id"
        )
        st.session_state["model_text"] = model
    fact_id, prompt = _get(params, "fact"), _get(params, "prompt")
    if prompt is not None:
        fact = state.FactChoice(prompt, _get(params, "answer", ""), tuple(params.get_all("para")), "custom")
        st.session_state.update(fact=fact, fact_source="Type your own")
    elif _get(params, "dataset"):
        dataset = params["dataset"]
        match = next((f for f in state.get_dataset(dataset) if f.id == fact_id), None)
        if match is not None:
            st.session_state.update(
                fact=state.FactChoice(match.prompt, match.answer, match.prompts[1:], match.id),
                fact_source="Dataset file",
                dataset_value=dataset,
                dataset_fact=match.id,
            )
    elif fact_id:
        match = next((f for f in state.get_builtin_facts() if f.id == fact_id), None)
        if match is not None:
            st.session_state.update(
                fact=state.FactChoice(match.prompt, match.answer, match.prompts[1:], match.id),
                fact_source="Built-in facts",
                builtin_fact=match.id,
            )
    s = state.current_settings()
    settings = state.Settings(
        method=_get(params, "method", s.method),
        steps=int(_get(params, "steps", s.steps)),
        baseline=_get(params, "baseline", s.baseline),
        t=float(_get(params, "t", s.t)),
        p=float(_get(params, "p", s.p)),
        max_prompts=int(_get(params, "n", s.max_prompts)),
    )
    settings.attribution_params().validate()  # e.g. an odd step count for the adaptive rule: ValueError
    state.set_settings(settings)
    if _get(params, "clusterer"):
        st.session_state["clusterer_value"] = params["clusterer"]
    if _get(params, "factor") is not None:
        st.session_state["p_factor"] = float(params["factor"])
    if _get(params, "mode"):
        st.session_state["p_mode"] = params["mode"]
    bdc = [int(i) for i in _get(params, "bdc", "").split(",") if i.strip()]
    groups = [tuple(parse_neurons(g.replace(" ", ","))) for g in params.get_all("group") if g.strip()]
    singles = parse_neurons(_get(params, "neurons", "").replace(" ", ","))
    st.session_state["_url_selection"] = {"bdc": bdc, "groups": groups, "neurons": singles}


def apply_selection(ws, clusterer: str) -> None:
    """On the Intervene page, once the workspace exists: tick what the link named (once per workspace)."""
    pending = st.session_state.get("_url_selection")
    if not pending or st.session_state.get("_url_selection_for") == ws.key:
        return
    st.session_state["_url_selection_for"] = ws.key
    for group in pending["groups"]:
        if group and group not in ws.custom_groups:
            ws.custom_groups.append(group)
    for i in pending["bdc"]:
        st.session_state[f"p_bdc_{ws.key}_{clusterer}_{i}"] = True
    for i, g in enumerate(ws.custom_groups):
        if g in pending["groups"]:
            st.session_state[f"p_g_{ws.key}_{i}"] = True
    for n in pending["neurons"]:
        st.session_state[f"p_n_{ws.key}_{n}"] = True


def view_params(ws=None) -> dict[str, str | list[str]]:
    """The query parameters of the current view."""
    fact, s = state.current_fact(), state.current_settings()
    params: dict[str, str | list[str]] = {}
    if state.model_name() != DEFAULT_MODEL:
        params["model"] = state.model_name()
    source = st.session_state.get("fact_source", "Built-in facts")
    if fact.fact_id == "custom" or source == "Type your own":
        params.update(prompt=fact.prompt, answer=fact.answer)
        if fact.paraphrases:
            params["para"] = list(fact.paraphrases)
    elif source == "Dataset file":
        params.update(dataset=st.session_state.get("dataset_value", ""), fact=fact.fact_id)
    else:
        params["fact"] = fact.fact_id
    params.update(
        method=s.method, steps=str(s.steps), baseline=s.baseline, t=f"{s.t:g}", p=f"{s.p:g}", n=str(s.max_prompts)
    )
    clusterer = st.session_state.get("clusterer_value", "ntc")
    params["clusterer"] = clusterer
    params["factor"] = f"{float(st.session_state.get('p_factor', 0.0)):g}"
    params["mode"] = st.session_state.get("p_mode", "last")
    if ws is not None:
        bdc = [
            k.rsplit("_", 1)[1]
            for k, v in st.session_state.items()
            if isinstance(k, str) and k.startswith(f"p_bdc_{ws.key}_{clusterer}_") and v
        ]
        if bdc:
            params["bdc"] = ",".join(sorted(bdc, key=int))
        groups = [
            " ".join(neuron_label(n) for n in g)
            for i, g in enumerate(ws.custom_groups)
            if st.session_state.get(f"p_g_{ws.key}_{i}")
        ]
        if groups:
            params["group"] = groups
        singles = [neuron_label(n) for n in ws.kn.neurons if st.session_state.get(f"p_n_{ws.key}_{n}")]
        if singles:
            params["neurons"] = " ".join(singles)
    else:
        pending = st.session_state.get("_url_selection") or {}
        if pending.get("bdc"):
            params["bdc"] = ",".join(str(i) for i in pending["bdc"])
        if pending.get("groups"):
            params["group"] = [" ".join(neuron_label(n) for n in g) for g in pending["groups"]]
        if pending.get("neurons"):
            params["neurons"] = " ".join(neuron_label(n) for n in pending["neurons"])
    return params


def write(ws=None) -> None:
    """Put the current view into the browser's URL (only when it changed)."""
    params = view_params(ws)
    current = {
        k: (st.query_params.get_all(k) if isinstance(v, list) else st.query_params.get(k)) for k, v in params.items()
    }
    if current != params or set(st.query_params.keys()) != set(params):
        st.query_params.from_dict(params)


def share_url(ws=None) -> str:
    """The link that reproduces the current view."""
    base = str(getattr(st.context, "url", "") or "").split("?")[0]
    return f"{base}?{urlencode(view_params(ws), doseq=True)}"


def copy_link_button(ws=None) -> None:
    """A "Copy link" popover: the link in a code box (its copy icon puts it on the clipboard)."""
    with st.popover("Copy link", icon=":material/link:", width="stretch"):
        st.caption("Opening this link in any browser restores this view (at once when the results are cached).")
        st.code(share_url(ws), language=None, wrap_lines=True)
