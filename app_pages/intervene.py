"""Intervene: switch groups of knowledge neurons off (or amplify them) and watch the answer change, live."""

import os
import sys
import time

import pandas as pd
import streamlit as st

from dkn import custom_groups, figures
from dkn.neurons import Neuron, check_in_range, parse_neurons
from ui import link, state, widgets
from ui.widgets import guard, pct

MODES = {"last": "answer position", "all": "every position", "weights": "weights"}

st.title("Intervene")
st.markdown(
    "Tick groups or single neurons, choose a factor, and see how the model's answer changes. "
    "Each change costs one batched forward pass; attribution is never recomputed."
)

lm = widgets.require_model()
ws = widgets.require_workspace(lm)
widgets.fact_banner(ws)
clusterer = st.session_state.get("clusterer_value", "ntc")


def pcheck(label: str, key: str, **kwargs) -> bool:
    """A checkbox whose state survives page switches."""
    if key in st.session_state:  # set by this run's widget or a button's callback
        value = st.checkbox(label, key=key, **kwargs)
    else:  # fresh widget (first visit, or back from another page)
        value = st.checkbox(label, value=st.session_state.get(f"p_{key}", False), key=key, **kwargs)
    st.session_state[f"p_{key}"] = value
    return value


def set_checks(keys: list[str], value: bool) -> None:
    for k in keys:
        st.session_state[f"p_{k}"] = value
        st.session_state[k] = value  # allowed in a callback: the widget shows it on this run


with guard("Degeneracy analysis"):
    with st.spinner("Finding the groups..."):
        result = state.get_degeneracy(lm, ws, clusterer)


def choice_keys(result) -> list[str]:
    """Every check box of this page: BDCs, the user's groups, single knowledge neurons."""
    return (
        [f"bdc_{ws.key}_{clusterer}_{i}" for i in range(len(result.candidates))]
        + [f"g_{ws.key}_{i}" for i in range(len(ws.custom_groups))]
        + [f"n_{ws.key}_{n}" for n in ws.kn.neurons]
    )


def selected_groups(result) -> list[tuple[str, tuple[Neuron, ...]]]:
    return state.ticked_groups(ws, clusterer, result.candidates)


def controls_panel(result) -> tuple[tuple[Neuron, ...], float, str]:
    st.subheader("What to switch")
    st.caption(f"Groups found by **{clusterer}** (change it on the Degenerate neurons page).")
    bdc_keys = [f"bdc_{ws.key}_{clusterer}_{i}" for i in range(len(result.candidates))]
    b1, b2 = st.columns(2)
    b1.button(
        "All BDCs", key="all_bdcs", on_click=set_checks, args=(bdc_keys, True), width="stretch", disabled=not bdc_keys
    )
    b2.button(
        "None",
        key="no_bdcs",
        on_click=set_checks,
        args=(choice_keys(result), False),
        width="stretch",
        help="Untick every group and neuron.",
    )
    if not result.candidates:
        st.info("No candidate groups for this fact: tick single neurons or form your own groups below.")
    selected: set[Neuron] = set()
    for i, (c, key) in enumerate(zip(result.candidates, bdc_keys)):
        mark = "passed" if c.passed else "failed"
        if pcheck(
            f"BDC {figures.group_name(i)} · {widgets.count(len(c.members), 'neuron')} · alone "
            f"{widgets.signed_pct(-c.single_drop)} ({mark})",
            key,
            help=" ".join(widgets.neuron_label(n) for n in c.members),
        ):
            selected |= set(c.members)
    for i, g in enumerate(ws.custom_groups):
        if pcheck(
            f"My group {i + 1} · {widgets.count(len(g), 'neuron')}",
            f"g_{ws.key}_{i}",
            help=" ".join(widgets.neuron_label(n) for n in g),
        ):
            selected |= set(g)
    with st.expander(f"Single knowledge neurons ({len(ws.kn.neurons)})"):
        cols = st.columns(2)
        for j, n in enumerate(ws.kn.neurons):
            with cols[j % 2]:
                if pcheck(widgets.neuron_label(n), f"n_{ws.key}_{n}"):
                    selected.add(n)
    factor = st.slider(
        "Factor",
        -1.0,
        3.0,
        float(st.session_state.get("p_factor", 0.0)),
        0.1,
        key="factor",
        help="Multiplies the chosen neurons' activations: 0 suppresses, 1 leaves them, 2 doubles, "
        "negative values reverse them.",
    )
    st.session_state["p_factor"] = factor
    st.caption("0 = suppress · 1 = unchanged · 2–3 = amplify · < 0 = reverse")
    mode_list = list(MODES)
    mode = st.radio(
        "Where",
        mode_list,
        format_func=MODES.get,
        horizontal=True,
        key="mode",
        index=mode_list.index(st.session_state.get("p_mode", "last")),
        help="answer position: scale the activations at the last prompt token only; every position: "
        "at every token; weights: scale the neurons' input and output weights.",
    )
    st.session_state["p_mode"] = mode
    return tuple(sorted(selected)), float(factor), mode


def effect_panel(result, selected_t: tuple[Neuron, ...], factor: float, mode: str) -> None:
    st.subheader("Effect on the answer")
    with guard("Intervention"):
        r = state.get_intervention(lm, ws, selected_t, factor, mode)
        m = st.columns(3)
        m[0].metric("P(answer) before", pct(r.prob_before))
        m[1].metric(
            "P(answer) after", pct(r.prob_after), delta=widgets.signed_pct(r.relative_change), delta_color="normal"
        )
        m[2].metric("Neurons switched", f"{len(selected_t)}", help=f"× {factor:g}, {MODES[mode]}")
        if not selected_t:
            st.caption("Nothing ticked yet: before and after are the same.")
        fig = state.cached_figure(
            "intervention",
            figures.intervention_bars,
            r.top_before,
            r.top_after,
            answer_tokens=ws.main.answer_tokens[:1],
            title=widgets.titled(
                f"Top next tokens, {widgets.count(len(selected_t), 'neuron')} × {factor:g} ({MODES[mode]})", lm, ws
            ),
        )
        widgets.show_figure(
            fig,
            "intervention",
            figures.token_table(r.top_before, r.top_after),
            key="fig_intervention",
            caption="Orange: the answer's first token.",
        )

        if st.toggle(
            "Per-prompt effects",
            key="per_prompt",
            value=bool(st.session_state.get("p_per_prompt")),
            help="P and rank of the answer on every prompt of the fact, before and after, the logit margin "
            "to the runner-up, and the KL divergence from the unedited model (beside a random "
            "control's).",
        ):
            st.session_state["p_per_prompt"] = True
            effects = state.get_edit_effects(lm, ws, selected_t, factor, mode)
            broken = [e for e in effects if e.broken]
            if broken:
                st.warning(
                    f"The edit breaks the output on {widgets.count(len(broken), 'prompt')}: the top token "
                    f"becomes {broken[0].top_after!r}, outside the unedited top 10, and the KL "
                    f"({broken[0].kl:.2f} nats) is far above a random control's ({broken[0].kl_random:.2f}).",
                    icon=":material/warning:",
                )
            widgets.show_table(
                pd.DataFrame(
                    [
                        {
                            "prompt": e.prompt,
                            "P before": e.p_before,
                            "P after": e.p_after,
                            "rank before": e.rank_before,
                            "rank after": e.rank_after,
                            "margin before": e.margin_before,
                            "margin after": e.margin_after,
                            "KL": e.kl,
                            "KL random": e.kl_random,
                            "top after": repr(e.top_after),
                            "broken": e.broken,
                        }
                        for e in effects
                    ]
                ),
                "per-prompt-effects",
                key="tab_effects",
                caption="Rank, margin (answer logit minus the best other token's) and KL at the first answer "
                "position; P over the whole answer.",
                column_config={c: st.column_config.NumberColumn(format="percent") for c in ("P before", "P after")}
                | {c: st.column_config.NumberColumn(format="%+.2f") for c in ("margin before", "margin after")}
                | {c: st.column_config.NumberColumn(format="%.3f") for c in ("KL", "KL random")},
            )
        else:
            st.session_state["p_per_prompt"] = False

        rc = ws.random_control
        same = rc is not None and (rc.factor, rc.mode, ws.random_control_for) == (factor, mode, selected_t)
        c1, c2 = st.columns([1, 2])
        if c1.button(
            "Random control",
            key="random_control",
            disabled=not selected_t,
            icon=":material/casino:",
            help="Switch as many random neurons, in the same layers, the same way (5 seeds).",
        ):
            seed = st.session_state.get("random_seed", 0)
            st.session_state["random_seed"] = seed + 5
            with state.exclusive(lm):
                ws.random_control = rc = custom_groups.random_control(
                    lm, ws.fact.prompt, ws.fact.answer, selected_t, factor, mode, exclude=ws.kn.neurons, seed=seed
                )
            ws.random_control_for = selected_t
            same = True
        if same:
            values = {"unchanged": r.prob_before, "chosen neurons": r.prob_after, "random neurons": rc.mean}
            c2.caption(
                f"Random neurons: P = {pct(rc.mean)} ± {pct(rc.std)} over {len(rc.probs)} seeds, "
                f"vs {pct(r.prob_after)} for the chosen ones."
            )
            widgets.show_figure(
                figures.probability_bars(
                    values,
                    widgets.titled("P(answer): chosen vs random neurons", lm, ws),
                    errors={"random neurons": rc.std},
                ),
                "random-control",
                [{"condition": k, "p_answer": v} for k, v in values.items()],
                key="fig_random",
            )
        dose_panel(result, mode)


def dose_panel(result, mode: str) -> None:
    groups = selected_groups(result)
    key = (tuple((name, g) for name, g in groups), mode)
    have = ws.dose is not None and ws.dose_for == key
    if st.button(
        "Dose-response",
        key="dose_response",
        disabled=not groups or have,
        icon=":material/show_chart:",
        help="P(answer) as each ticked group's factor goes from -1 to 3 (17 factors): one batched pass, a "
        "row per group and factor.",
    ):
        with state.exclusive(lm):
            ws.dose = custom_groups.dose_response(lm, ws.fact.prompt, ws.fact.answer, [g for _, g in groups], mode=mode)
        ws.dose_for, have = key, True
    if have:
        names = [name for name, _ in groups]
        widgets.show_figure(
            figures.dose_response(
                ws.dose.factors,
                ws.dose.probs,
                names,
                ws.dose.prob,
                title=widgets.titled(f"Dose-response ({MODES[mode]})", lm, ws),
            ),
            "dose-response",
            ws.dose.table(names),
            key="fig_dose",
            caption="Each line: one ticked group scaled alone; grey: the unchanged model.",
        )


@st.fragment
def intervention_panel() -> None:
    """Only this part reruns when a box, the factor or the mode changes."""
    start = time.perf_counter()
    with guard("Degeneracy analysis"):
        result = state.get_degeneracy(lm, ws, clusterer)
    controls, view = st.columns([1, 2], gap="large")
    with controls:
        selected_t, factor, mode = controls_panel(result)
    with view:
        effect_panel(result, selected_t, factor, mode)
    link.write(ws)  # the URL follows the ticked groups, the factor and the mode
    if os.environ.get("DKN_APP_TIMING"):
        print(f"intervention panel: {time.perf_counter() - start:.3f} s", file=sys.stderr, flush=True)


with guard("Degeneracy analysis"):
    with st.spinner("Finding the groups..."):
        result = state.get_degeneracy(lm, ws, clusterer)
link.apply_selection(ws, clusterer)  # a shared link's ticked groups, once
intervention_panel()
factor = float(st.session_state.get("p_factor", 0.0))
mode = st.session_state.get("p_mode", "last")

# ------------------------------------------------------------------ the degeneracy grid
st.header("Degeneracy grid", divider="gray")
with guard("Degeneracy grid"):
    if result.candidates:
        n = len(result.candidates)
        sub = [(s, result.prob * (1 - d)) for s, d in result.subset_drops]
        widgets.degeneracy_metrics(
            result, "All suppressed", index_help="(union drop − largest single drop) / union drop"
        )
        widgets.show_figure(
            figures.degeneracy_grid(sub, result.prob, n),
            f"degeneracy-grid-{clusterer}",
            figures.grid_table(sub, result.prob),
            key="fig_grid",
            caption="Every subset of the groups suppressed (factor 0 at the answer position): the "
            "colour strip is P(answer), the dots below say which groups were switched off.",
        )
    else:
        st.info("No groups to put in a grid for this fact and clusterer.")

# ------------------------------------------------------------------ the user's own groups
st.header("Your own groups", divider="gray")
st.caption(
    "Form groups from any neurons — knowledge neurons, neurons picked on the Explore page's heatmap or "
    "table, or typed as LAYER:INDEX — then tick them above or test them together as a grid."
)
if st.session_state.pop("_clear_new_group", False):  # the last group was added: empty the form
    st.session_state["new_group_pick"], st.session_state["new_group_typed"] = [], ""
with st.form("new_group", border=True):  # not cleared on submit: a typo keeps what was typed
    c1, c2 = st.columns(2)
    pick = c1.multiselect(
        "Knowledge neurons", list(ws.kn.neurons), format_func=widgets.neuron_label, key="new_group_pick"
    )
    typed = c2.text_input("Other neurons", placeholder="e.g. L12:N345, 3:7", key="new_group_typed")
    submitted = st.form_submit_button("Add group", icon=":material/group_add:")
if submitted:
    with guard("New group"):
        group = tuple(sorted(set(pick) | set(parse_neurons(typed))))
        check_in_range(group, lm.n_layers, lm.d_mlp)
        if not group:
            raise ValueError("the group is empty: pick knowledge neurons or type neurons as LAYER:INDEX")
        ws.custom_groups.append(group)
        ws.custom_grid = None
        st.session_state["_clear_new_group"] = True
        st.rerun()

if ws.custom_groups:
    rows = [
        {"group": f"My group {i + 1}", "size": len(g), "neurons": " ".join(widgets.neuron_label(n) for n in g)}
        for i, g in enumerate(ws.custom_groups)
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    c1, c2, _ = st.columns([1, 1, 3])
    if c1.button(
        "Test my groups",
        key="test_groups",
        type="primary",
        icon=":material/grid_on:",
        help="Switch every subset of your groups in one batched pass (factor and mode from above).",
    ):
        with guard("Testing groups"):
            with state.exclusive(lm):
                ws.custom_grid = custom_groups.test_groups(
                    lm, ws.fact.prompt, ws.fact.answer, ws.custom_groups, factor, mode
                )
    if c2.button("Remove all", key="clear_groups"):
        ws.custom_groups.clear()
        ws.custom_grid = None
        st.rerun()
    g = ws.custom_grid
    if g is not None and g.n_groups == len(ws.custom_groups):
        names = [f"group {i + 1}" for i in range(g.n_groups)]
        widgets.degeneracy_metrics(g, "All switched")
        widgets.show_figure(
            figures.degeneracy_grid(
                g.subset_probs,
                g.prob,
                g.n_groups,
                names=names,
                title=widgets.titled(f"Your groups × {g.factor:g} ({MODES[g.mode]})", lm, ws),
            ),
            "my-groups-grid",
            figures.grid_table(g.subset_probs, g.prob, names),
            key="fig_mygrid",
        )
