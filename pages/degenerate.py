"""Degenerate neurons: the knowledge-neuron graph, its persistence barcode, the candidate groups (BDCs) and the test."""
import numpy as np
import pandas as pd
import streamlit as st

from dkn import figures
from dkn.degeneracy import CLUSTERER_NAMES
from dkn.topology import h0_barcode
from ui import state, widgets
from ui.widgets import guard, pct

CLUSTERER_LABELS = {"ntc": "NTC (persistence, recommended)", "ntc_faithful": "NTC as in the authors' script",
                    "hierarchical": "Hierarchical (average linkage)", "dbscan": "DBSCAN", "kmeans": "k-means",
                    "amig": "AMIG pairwise test"}

st.title("Degenerate knowledge neurons")
st.markdown("Some facts are stored **redundantly**: several groups of knowledge neurons (*base degenerate "
            "components*, BDCs) can each be switched off without the model forgetting, but switching all of them "
            "off makes it forget. The groups are found from the weights that connect the knowledge neurons, then "
            "tested by suppressing them.")

lm = widgets.require_model()
ws = widgets.require_workspace(lm)
widgets.fact_banner(ws)

if len(ws.kn.neurons) < 2:
    st.warning(f"Only {len(ws.kn.neurons)} knowledge neuron(s): at least 2 are needed to form groups. Lower the "
               "thresholds t or p on the Explore page.")
    st.stop()

c1, c2 = st.columns([2, 1])
clusterer = c1.selectbox("Clusterer", CLUSTERER_NAMES, format_func=CLUSTERER_LABELS.get, key="clusterer",
                         index=CLUSTERER_NAMES.index(st.session_state.get("clusterer_value", "ntc")))
st.session_state["clusterer_value"] = clusterer
compare = c2.toggle("Compare clusterers side by side", key="compare")


def candidate_table(result) -> pd.DataFrame:
    return pd.DataFrame([{
        "group": f"BDC {figures.group_name(i)}", "neurons": " ".join(widgets.neuron_label(n) for n in c.members),
        "size": len(c.members), "drop alone": c.single_drop, "passed": c.passed,
        "persistence": c.persistence if c.persistence is not None and np.isfinite(c.persistence) else None,
        "why": c.reason} for i, c in enumerate(result.candidates)])


TABLE_CONFIG = {"drop alone": st.column_config.NumberColumn("P drop alone", format="percent",
                                                            help="Relative drop of P(answer) when only this "
                                                                 "group is suppressed"),
                "persistence": st.column_config.NumberColumn(format="%.3g"),
                "passed": st.column_config.CheckboxColumn("passed", help="Can go alone (drop < the low threshold)")}

with guard("Degeneracy analysis"):
    with st.spinner(f"Clustering with {clusterer} and suppressing every subset of groups..."):
        result = state.get_degeneracy(lm, ws, clusterer)

    (st.success if result.degenerate else st.warning)(result.verdict.capitalize() + ".",
                                                      icon=":material/hub:")
    m = st.columns(5)
    m[0].metric("Candidate groups", len(result.candidates), help="Groups of ≥ 2 connected knowledge neurons.")
    m[1].metric("Passed", sum(c.passed for c in result.candidates),
                help=f"Suppressing the group alone lowers P by less than {result.params.threshold_low:.0%}.")
    m[2].metric("All suppressed", f"{-result.union_drop:+.1%}", help="Relative drop of P(answer) when every "
                "candidate group is suppressed at once.")
    m[3].metric("Degeneracy index", f"{result.degeneracy_index:.2f}", help="(union drop − largest single drop) / "
                "union drop: 1 = no group matters alone but all do together; 0 = one group explains it all.")
    rc = result.random_control
    m[4].metric("Random control", f"{-rc['mean']:+.1%}", help=f"As many random neurons in the same layers "
                f"suppressed, mean ± {rc['std']:.1%} over {rc['n']} seeds.")
    st.caption(f"How the groups combine: **{result.combination}** (redundant: together they remove more than "
               "their single drops add up to; additive: about the sum; each necessary: less than the sum).")

    if result.graph is not None:
        fig = figures.kn_graph(result.graph, result.bdcs, result.kn_scores, passed=[c.passed for c in result.candidates],
                               title="Knowledge-neuron graph (layers left to right)")
        widgets.show_figure(fig, f"kn-graph-{clusterer}", figures.edge_table(result.graph), key="fig_graph",
                            caption="Nodes: knowledge neurons (size: attribution score), coloured by group. Edges: "
                                    "how strongly one neuron's output feeds the next layer's neuron through the "
                                    "weights (width: |strength|; blue solid excites, red dashed inhibits; layers "
                                    "up to 3 apart are bridged through the neurons between).")
        labels = None
        bars = h0_barcode(result.graph.distance)
        labels = [" ".join(widgets.neuron_label(result.graph.neurons[i]) for i in b.members) for b in bars]
        index_of = {n: i for i, n in enumerate(result.graph.neurons)}
        highlight = [[index_of[n] for n in g] for g in result.bdcs]
        widgets.show_figure(figures.barcode(bars, labels, highlight=highlight,
                                            title="Persistence barcode: when groups form and merge"),
                            f"barcode-{clusterer}", figures.bar_table(bars, labels), key="fig_barcode",
                            caption="Grow the distance threshold from 0: every neuron starts alone; a bar ends "
                                    "when it merges into an older one (each bar is labelled with the neurons that "
                                    "die there). Long bars are well-separated groups; bars that never end are "
                                    "separate components. Coloured: the BDCs.")

    st.subheader("Candidate groups")
    if result.candidates:
        widgets.show_table(candidate_table(result), f"bdcs-{clusterer}", key="tab_bdcs", column_config=TABLE_CONFIG,
                           caption=f"A group passes when suppressing it alone lowers P(answer) by less than "
                                   f"{result.params.threshold_low:.0%}; the fact is degenerate when ≥ 2 groups "
                                   f"pass and suppressing all of them lowers P by more than "
                                   f"{result.params.threshold_high:.0%}.")
        failed = [(i, c) for i, c in enumerate(result.candidates) if not c.passed]
        if failed:
            st.markdown("**Failed the test:**\n" + "\n".join(
                f"- BDC {figures.group_name(i)} ({len(c.members)} neurons): {c.reason}" for i, c in failed))
        sub = [(s, result.prob * (1 - d)) for s, d in result.subset_drops]
        st.markdown(f"Suppressing single groups and unions: "
                    + "; ".join(f"{'+'.join(figures.group_name(i) for i in s)} → {pct(p)}" for s, p in sub[:12]))
    else:
        st.info("The clusterer found no group of 2 or more connected knowledge neurons. Try another clusterer.")

if compare:
    st.header("Clusterers side by side", divider="gray")
    chosen = st.multiselect("Clusterers", CLUSTERER_NAMES, default=["ntc", "hierarchical", "dbscan"],
                            format_func=CLUSTERER_LABELS.get, key="compare_list", max_selections=4)
    cols = st.columns(max(1, len(chosen)))
    for col, name in zip(cols, chosen):
        with col, guard(name):
            with st.spinner(f"{name}..."):
                r = state.get_degeneracy(lm, ws, name)
            st.markdown(f"#### {CLUSTERER_LABELS[name]}")
            (st.success if r.degenerate else st.warning)(r.verdict.capitalize())
            st.caption(f"{len(r.candidates)} groups · all suppressed {-r.union_drop:+.1%} · DI "
                       f"{r.degeneracy_index:.2f} · {r.combination}")
            if r.graph is not None:
                f = figures.kn_graph(r.graph, r.bdcs, r.kn_scores, passed=[c.passed for c in r.candidates],
                                     title=name)
                f.update_layout(height=380, showlegend=False)
                widgets.show_figure(f, f"kn-graph-{name}", key=f"fig_cmp_{name}")
            if r.candidates:
                st.dataframe(candidate_table(r)[["group", "size", "drop alone", "passed"]], hide_index=True,
                             width="stretch", column_config=TABLE_CONFIG)

st.page_link("pages/intervene.py", label="Next: switch the groups off and on", icon=":material/arrow_forward:")
