"""Intervene: switch groups of knowledge neurons off (or amplify them) and watch the answer change, live."""
import numpy as np
import pandas as pd
import streamlit as st

from dkn import figures
from dkn.degeneracy import combination, degeneracy_index, grid_subsets, random_matched_sets, relative_drops
from dkn.interventions import intervene_many
from dkn.neurons import Neuron, check_in_range, parse_neurons
from ui import state, widgets
from ui.widgets import guard, pct

MODES = {"last": "answer position", "all": "every position", "weights": "weights"}

st.title("Intervene")
st.markdown("Tick groups or single neurons, choose a factor, and see how the model's answer changes. "
            "Each change costs one batched forward pass; attribution is never recomputed.")

lm = widgets.require_model()
ws = widgets.require_workspace(lm)
widgets.fact_banner(ws)
clusterer = st.session_state.get("clusterer_value", "ntc")


def pcheck(label: str, key: str, **kwargs) -> bool:
    """A checkbox whose state survives page switches."""
    if key in st.session_state:       # set by this run's widget or a button's callback
        value = st.checkbox(label, key=key, **kwargs)
    else:                              # fresh widget (first visit, or back from another page)
        value = st.checkbox(label, value=st.session_state.get(f"p_{key}", False), key=key, **kwargs)
    st.session_state[f"p_{key}"] = value
    return value


def set_checks(keys: list[str], value: bool) -> None:
    for k in keys:
        st.session_state[f"p_{k}"] = value
        st.session_state[k] = value        # allowed in a callback: the widget shows it on this run


with guard("Degeneracy analysis"):
    with st.spinner("Finding the groups..."):
        result = state.get_degeneracy(lm, ws, clusterer)

controls, view = st.columns([1, 2], gap="large")
selected: set[Neuron] = set()
with controls:
    st.subheader("What to switch")
    st.caption(f"Groups found by **{clusterer}** (change it on the Degenerate neurons page).")
    bdc_keys = [f"bdc_{ws.key}_{clusterer}_{i}" for i in range(len(result.candidates))]
    if result.candidates:
        b1, b2 = st.columns(2)
        b1.button("All BDCs", key="all_bdcs", on_click=set_checks, args=(bdc_keys, True), width="stretch")
        b2.button("None", key="no_bdcs", on_click=set_checks,
                  args=(bdc_keys + [f"n_{ws.key}_{n}" for n in ws.kn.neurons]
                        + [f"g_{ws.key}_{i}" for i in range(len(ws.custom_groups))], False), width="stretch")
    else:
        st.info("No candidate groups for this fact: tick single neurons or form your own groups below.")
    for i, (c, key) in enumerate(zip(result.candidates, bdc_keys)):
        mark = "passed" if c.passed else "failed"
        if pcheck(f"BDC {figures.group_name(i)} · {len(c.members)} neurons · alone {-c.single_drop:+.1%} ({mark})",
                  key, help=" ".join(widgets.neuron_label(n) for n in c.members)):
            selected |= set(c.members)
    for i, g in enumerate(ws.custom_groups):
        if pcheck(f"My group {i + 1} · {len(g)} neurons", f"g_{ws.key}_{i}",
                  help=" ".join(widgets.neuron_label(n) for n in g)):
            selected |= set(g)
    with st.expander(f"Single knowledge neurons ({len(ws.kn.neurons)})"):
        cols = st.columns(2)
        for j, n in enumerate(ws.kn.neurons):
            with cols[j % 2]:
                if pcheck(widgets.neuron_label(n), f"n_{ws.key}_{n}"):
                    selected.add(n)
    factor = st.slider("Factor", 0.0, 3.0, float(st.session_state.get("p_factor", 0.0)), 0.1, key="factor",
                       help="Multiplies the chosen neurons' activations: 0 suppresses, 1 leaves them, 2 doubles.")
    st.session_state["p_factor"] = factor
    st.caption("0 = suppress · 1 = unchanged · 2–3 = amplify")
    mode_list = list(MODES)
    mode = st.radio("Where", mode_list, format_func=MODES.get, horizontal=True, key="mode",
                    index=mode_list.index(st.session_state.get("p_mode", "last")),
                    help="answer position: scale the activations at the last prompt token only; every position: "
                         "at every token; weights: scale the neurons' input and output weights.")
    st.session_state["p_mode"] = mode

with view:
    selected_t = tuple(sorted(selected))
    st.subheader("Effect on the answer")
    with guard("Intervention"):
        r = state.get_intervention(lm, ws, selected_t, factor, mode)
        m = st.columns(3)
        m[0].metric("P(answer) before", pct(r.prob_before))
        m[1].metric("P(answer) after", pct(r.prob_after), delta=f"{r.relative_change:+.1%}",
                    delta_color="normal")
        m[2].metric("Neurons switched", f"{len(selected_t)}", help=f"× {factor:g}, {MODES[mode]}")
        if not selected_t:
            st.caption("Nothing ticked yet: before and after are the same.")
        fig = figures.intervention_bars(r.top_before, r.top_after, answer_tokens=ws.main.answer_tokens[:1],
                                        title=f"Top next tokens, {len(selected_t)} neurons × {factor:g} "
                                              f"({MODES[mode]})")
        widgets.show_figure(fig, "intervention", figures.token_table(r.top_before, r.top_after),
                            key="fig_intervention", caption="Orange: the answer's first token.")

        rc = ws.random_control
        same = rc is not None and rc["key"] == (selected_t, factor, mode)
        c1, c2 = st.columns([1, 2])
        if c1.button("Random control", key="random_control", disabled=not selected_t, icon=":material/casino:",
                     help="Switch as many random neurons, in the same layers, the same way (5 seeds)."):
            seed = st.session_state.get("random_seed", 0)
            st.session_state["random_seed"] = seed + 5
            sets = random_matched_sets(lm, selected_t, set(ws.kn.neurons), 5, seed)
            p0, probs = intervene_many(lm, ws.fact.prompt, ws.fact.answer, sets, factor, mode)
            ws.random_control = rc = {"key": (selected_t, factor, mode), "probs": probs.tolist(), "p0": p0}
            same = True
        if same:
            probs = np.asarray(rc["probs"])
            values = {"unchanged": r.prob_before, "chosen neurons": r.prob_after, "random neurons": float(probs.mean())}
            c2.caption(f"Random neurons: P = {pct(float(probs.mean()))} ± {pct(float(probs.std()))} over "
                       f"{len(probs)} seeds, vs {pct(r.prob_after)} for the chosen ones.")
            widgets.show_figure(figures.probability_bars(values, "P(answer): chosen vs random neurons",
                                                         errors={"random neurons": float(probs.std())}),
                                "random-control", [{"condition": k, "p_answer": v} for k, v in values.items()],
                                key="fig_random")

# ------------------------------------------------------------------ the degeneracy grid
st.header("Degeneracy grid", divider="gray")
with guard("Degeneracy grid"):
    if result.candidates:
        n = len(result.candidates)
        sub = [(s, result.prob * (1 - d)) for s, d in result.subset_drops]
        m = st.columns(3)
        m[0].metric("Degeneracy index", f"{result.degeneracy_index:.2f}",
                    help="(union drop − largest single drop) / union drop")
        m[1].metric("Groups combine", result.combination)
        m[2].metric("All suppressed", pct(result.prob * (1 - result.union_drop)), delta=f"{-result.union_drop:+.1%}",
                    delta_color="normal")
        widgets.show_figure(figures.degeneracy_grid(sub, result.prob, n), f"degeneracy-grid-{clusterer}",
                            figures.grid_table(sub, result.prob), key="fig_grid",
                            caption="Every subset of the groups suppressed (factor 0 at the answer position): the "
                                    "colour strip is P(answer), the dots below say which groups were switched off.")
    else:
        st.info("No groups to put in a grid for this fact and clusterer.")

# ------------------------------------------------------------------ the user's own groups
st.header("Your own groups", divider="gray")
st.caption("Form groups from any neurons — knowledge neurons, neurons picked on the Explore page's heatmap or "
           "table, or typed as LAYER:INDEX — then tick them above or test them together as a grid.")
with st.form("new_group", clear_on_submit=True, border=True):
    c1, c2 = st.columns(2)
    pick = c1.multiselect("Knowledge neurons", list(ws.kn.neurons), format_func=widgets.neuron_label)
    typed = c2.text_input("Other neurons", placeholder="e.g. 12:345, 3:7")
    submitted = st.form_submit_button("Add group", icon=":material/group_add:")
if submitted:
    with guard("New group"):
        group = tuple(sorted(set(pick) | set(parse_neurons(typed))))
        check_in_range(group, lm.n_layers, lm.d_mlp)
        if not group:
            raise ValueError("the group is empty: pick knowledge neurons or type neurons as LAYER:INDEX")
        ws.custom_groups.append(group)
        ws.custom_grid = None
        st.rerun()

if ws.custom_groups:
    rows = [{"group": f"My group {i + 1}", "size": len(g), "neurons": " ".join(widgets.neuron_label(n) for n in g)}
            for i, g in enumerate(ws.custom_groups)]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    c1, c2, _ = st.columns([1, 1, 3])
    if c1.button("Test my groups", key="test_groups", type="primary", icon=":material/grid_on:",
                 help="Suppress every subset of your groups in one batched pass (factor and mode from above)."):
        with guard("Testing groups"):
            groups = ws.custom_groups
            subsets = grid_subsets(len(groups))
            sets = [tuple(n for i in s for n in groups[i]) for s in subsets]
            p0, probs = intervene_many(lm, ws.fact.prompt, ws.fact.answer, sets, factor, mode)
            drops = relative_drops(p0, probs)
            grid = dict(zip(subsets, drops))
            singles = [grid[(i,)] for i in range(len(groups))]
            union = grid[tuple(range(len(groups)))]
            ws.custom_grid = {"p0": p0, "subsets": subsets, "probs": probs.tolist(), "n": len(groups),
                              "di": degeneracy_index(singles, union), "comb": combination(singles, union),
                              "factor": factor, "mode": mode, "union": float(union)}
    if c2.button("Remove all", key="clear_groups"):
        ws.custom_groups.clear()
        ws.custom_grid = None
        st.rerun()
    g = ws.custom_grid
    if g is not None and g["n"] == len(ws.custom_groups):
        names = [f"group {i + 1}" for i in range(g["n"])]
        m = st.columns(3)
        m[0].metric("Degeneracy index", f"{g['di']:.2f}")
        m[1].metric("Groups combine", g["comb"])
        m[2].metric("All switched", pct(g["p0"] * (1 - g["union"])), delta=f"{-g['union']:+.1%}", delta_color="normal")
        sub = list(zip(g["subsets"], g["probs"]))
        widgets.show_figure(figures.degeneracy_grid(sub, g["p0"], g["n"], names=names,
                                                    title=f"Your groups × {g['factor']:g} ({MODES[g['mode']]})"),
                            "my-groups-grid", figures.grid_table(sub, g["p0"], names), key="fig_mygrid")
