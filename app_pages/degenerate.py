"""Degenerate neurons: the chosen method's groups (BDCs), each group's drop alone and with only it left, the
redundancy R and the interactions, the peeling curve of backup discovery, the graph and the barcode."""

import numpy as np
import pandas as pd
import streamlit as st

from dkn import figures
from dkn.degeneracy import CLUSTERER_NAMES
from dkn.graph import EDGES
from ui import state, widgets
from ui.widgets import guard, pct

CLUSTERER_LABELS = {
    "ntc": "NTC (persistence, recommended graph method)",
    "ntc_faithful": "NTC as in the authors' script",
    "hierarchical": "Hierarchical (average linkage)",
    "dbscan": "DBSCAN",
    "kmeans": "k-means",
    "amig": "AMIG's definition: pairs of neurons",
    "backup": "Backup discovery: attribute, switch off, attribute again",
}
EDGE_LABELS = {
    "static": "Static: weights, norm folded in, residual links and paths",
    "functional": "Functional: on this prompt (activation × gradient)",
    "faithful": "Faithful: the paper's adjacent-layer weights",
}
CONDITION_TEXT = {
    "two_or_more_groups": "the method proposes at least 2 groups",
    "two_or_more_pass_alone": "at least 2 groups can each be switched off alone (P changes by less than {low})",
    "together_remove_fact": "switching all of those off together lowers P by more than {high}",
    "each_suffices": "each of them keeps the fact on its own (with the other groups off P drops by less than {high})",
}

st.title("Degenerate knowledge neurons")
st.markdown(
    "Some facts are stored **redundantly**: several groups of knowledge neurons (*base degenerate "
    "components*, BDCs) can each be switched off without the model forgetting, but switching all of them "
    "off makes it forget. A method proposes the groups (from the weights that connect the knowledge "
    "neurons, from AMIG's pairs, or by backup discovery); suppressing them tests them."
)

lm = widgets.require_model()
ws = widgets.require_workspace(lm)
widgets.fact_banner(ws)

c1, c2, c3 = st.columns([2, 2, 1])
clusterer = c1.selectbox(
    "Clusterer",
    CLUSTERER_NAMES,
    format_func=CLUSTERER_LABELS.get,
    key="clusterer",
    index=CLUSTERER_NAMES.index(st.session_state.get("clusterer_value", "ntc")),
    help="The method that proposes the groups: a graph clusterer, AMIG's pairs, or backup discovery.",
)
st.session_state["clusterer_value"] = clusterer
edge = c2.selectbox(
    "Graph edges",
    EDGES,
    format_func=EDGE_LABELS.get,
    key="edge",
    disabled=clusterer in ("amig", "backup"),
    help="How strongly one knowledge neuron feeds another (used by the graph clusterers).",
)
sufficiency = c3.toggle(
    "Require sufficiency", key="require_sufficiency", help="Also demand that each group, left on alone, keeps the fact."
)
compare = st.toggle("Compare methods side by side", key="compare")

if len(ws.kn.neurons) < 2 and clusterer != "backup":
    st.warning(
        f"Only {len(ws.kn.neurons)} knowledge neuron(s): at least 2 are needed to form groups. Lower the "
        "thresholds t or p on the Explore page, or try backup discovery."
    )
    st.stop()


def analysis(name: str):
    return state.get_degeneracy(lm, ws, name, edge=edge, require_sufficiency=sufficiency)


def candidate_table(result) -> pd.DataFrame:
    generic = widgets.generic_neurons(lm)
    return pd.DataFrame(
        [
            {
                "group": f"BDC {figures.group_name(i)}",
                "neurons": " ".join(widgets.neuron_label(n) for n in c.members),
                "size": len(c.members),
                "generic": " ".join(widgets.neuron_label(n) for n in c.members if n in generic) or "—",
                "drop alone": c.single_drop,
                "drop with only it left": c.alone_drop,
                "passed": c.passed,
                "sufficient": c.sufficient,
                "round": c.round,
                "persistence": c.persistence if c.persistence is not None and np.isfinite(c.persistence) else None,
                "why": c.reason,
            }
            for i, c in enumerate(result.candidates)
        ]
    )


TABLE_CONFIG = {
    "drop alone": st.column_config.NumberColumn(
        "P drop alone", format="percent", help="Relative drop of P(answer) when only this group is suppressed"
    ),
    "drop with only it left": st.column_config.NumberColumn(
        "P drop, only it left",
        format="percent",
        help="Relative drop of P(answer) when every OTHER group is "
        "suppressed: a group that can express the fact on its own keeps this small",
    ),
    "persistence": st.column_config.NumberColumn(format="%.3g"),
    "generic": st.column_config.TextColumn(
        "generic members",
        help="Members that are knowledge neurons of most compared facts (the Facts compared page sets "
        "them; none until facts are compared): a group of generic neurons is not about this fact",
    ),
    "passed": st.column_config.CheckboxColumn("passed", help="Can go alone (|change| < the low threshold)"),
    "sufficient": st.column_config.CheckboxColumn(
        "sufficient", help="Left on alone it keeps the fact (drop < the high threshold)"
    ),
}


def conditions_text(result) -> str:
    low, high = f"{result.params.threshold_low:.0%}", f"{result.params.threshold_high:.0%}"
    lines = []
    for key, text in CONDITION_TEXT.items():
        ok = result.conditions.get(key, False)
        note = "" if key != "each_suffices" or result.params.require_sufficiency else " *(reported, not required)*"
        lines.append(f"- {'✅' if ok else '❌'} {text.format(low=low, high=high)}{note}")
    return "\n".join(lines)


with guard("Degeneracy analysis"):
    spinner = (
        "Attributing again with each round's neurons switched off..."
        if clusterer == "backup"
        else f"Finding groups with {clusterer} and suppressing every subset of them..."
    )
    with st.spinner(spinner):
        result = analysis(clusterer)

    (st.success if result.degenerate else st.warning)(result.verdict.capitalize() + ".", icon=":material/hub:")
    st.markdown("**The conditions of the test:**\n" + conditions_text(result))
    if "definition" in result.extra:
        st.caption(result.extra["definition"] + ".")
    m = st.columns(5)
    m[0].metric("Candidate groups", len(result.candidates), help="The groups the method proposes.")
    m[1].metric(
        "Passed",
        sum(c.passed for c in result.candidates),
        help=f"Suppressing the group alone changes P by less than {result.params.threshold_low:.0%}.",
    )
    m[2].metric(
        "All suppressed",
        f"{-result.union_drop:+.1%}",
        help="Relative change of P(answer) when every candidate group is suppressed at once.",
    )
    m[3].metric(
        "Redundancy R",
        "n/a" if np.isnan(result.redundancy) else f"{result.redundancy:+.2f}",
        help="(all-groups drop − sum of single drops) / all-groups drop: > 0 redundant (the groups stand "
        "in for each other), about 0 additive, < 0 each necessary.",
    )
    rc = result.random_control
    m[4].metric(
        "Random control",
        f"{-rc['mean']:+.1%}",
        help=f"As many random neurons in the same layers suppressed, mean ± {rc['std']:.1%} over {rc['n']} seeds.",
    )
    st.caption(f"How the groups combine: **{result.combination}**.")

    if result.rounds:
        st.subheader("Backup discovery: the peeling curve")
        sizes = [len(r.neurons) for r in result.rounds]
        widgets.show_figure(
            figures.peeling_curve(result.peeling, sizes),
            f"peeling-{clusterer}",
            figures.peeling_table(result.peeling, sizes),
            key="fig_peeling",
            caption="Round 1: the knowledge neurons. Each later round attributes again with every "
            "neuron found so far switched off, and takes the neurons that now carry the "
            "fact (the backups). The curve is P(answer) once each round is switched off "
            "too; it stops when the fact is gone. The rounds are then split into parallel pathways, completed "
            "and pruned (each with the other groups off): each pathway is one candidate group.",
        )
        if result.carriers:
            st.caption(
                "Held out of the first round as necessary carriers (each alone removes the fact; kept on "
                f"throughout, so that the rounds can go on past them): {', '.join(map(str, result.carriers))}."
            )

    st.subheader("Candidate groups")
    if result.candidates:
        widgets.show_table(
            candidate_table(result),
            f"bdcs-{clusterer}",
            key="tab_bdcs",
            column_config=TABLE_CONFIG,
            caption=f"A group passes when suppressing it alone changes P(answer) by less than "
            f"{result.params.threshold_low:.0%}; it is sufficient when, left on alone, P drops "
            f"by less than {result.params.threshold_high:.0%}.",
        )
        widgets.show_figure(
            figures.group_drop_bars(
                result.single_drops, result.alone_drops, result.params.threshold_low, result.params.threshold_high
            ),
            f"group-drops-{clusterer}",
            figures.group_drop_table(result.single_drops, result.alone_drops),
            key="fig_group_drops",
            caption="Orange: P drop with the group switched off (a BDC keeps it between the dotted "
            "low lines). Blue: P drop with only the group left on (a BDC that expresses "
            "the fact on its own stays under the high line).",
        )
        failed = [(i, c) for i, c in enumerate(result.candidates) if not c.passed]
        if failed:
            st.markdown(
                "**Failed the test:**\n"
                + "\n".join(f"- BDC {figures.group_name(i)} ({len(c.members)} neurons): {c.reason}" for i, c in failed)
            )
        if result.interactions:
            st.subheader("Interactions between the groups")
            widgets.show_figure(
                figures.interaction_bars(result.interactions),
                f"interactions-{clusterer}",
                figures.interaction_table(result.interactions),
                key="fig_interactions",
                caption="The Moebius (Harsanyi) interaction of each subset of groups: singles are "
                "their own drop; a positive pair (A+B) removes more together than the two "
                "alone, i.e. they stand in for each other. The bars add up to the drop with "
                "every group suppressed.",
            )
            widgets.show_table(
                pd.DataFrame(figures.interaction_table(result.interactions)),
                f"interaction-table-{clusterer}",
                key="tab_interactions",
                column_config={"interaction": st.column_config.NumberColumn(format="percent")},
            )
        else:
            st.caption(
                f"Interactions need every subset of groups: shown for up to {result.params.max_grid_bdcs} groups."
            )
        sub = [(s, result.prob * (1 - d)) for s, d in result.subset_drops]
        st.markdown(
            "Suppressing single groups and unions: "
            + "; ".join(f"{'+'.join(figures.group_name(i) for i in s)} → {pct(p)}" for s, p in sub[:12])
        )
    else:
        st.info(
            "The method found no candidate group. Try another method (backup discovery attributes again "
            "with the first groups switched off)."
        )

    if result.graph is not None:
        st.subheader("The knowledge-neuron graph")
        same_nodes = result.graph.neurons == result.knowledge_neurons  # backup: the rounds' neurons
        fig = figures.kn_graph(
            result.graph,
            result.bdcs,
            result.kn_scores if same_nodes else None,
            passed=[c.passed for c in result.candidates],
            title=f"Knowledge-neuron graph, {result.graph.edge} edges (layers left to right)",
        )
        widgets.show_figure(
            fig,
            f"kn-graph-{clusterer}",
            figures.edge_table(result.graph),
            key="fig_graph",
            caption="Nodes: neurons, coloured by group. Edges: how strongly one neuron feeds a later "
            "one (width: |strength|; blue solid excites, red dashed inhibits).",
        )
        bar_fig, bar_rows = figures.graph_barcode(
            result.graph, result.bdcs, title="Persistence barcode: when groups form and merge"
        )
        widgets.show_figure(
            bar_fig,
            f"barcode-{clusterer}",
            bar_rows,
            key="fig_barcode",
            caption="Grow the distance threshold from 0: every neuron starts alone; a bar ends "
            "when it merges into an older one. Long bars are well-separated groups; bars "
            "that never end are separate components. Coloured: the BDCs.",
        )

if compare:
    st.header("Methods side by side", divider="gray")
    chosen = st.multiselect(
        "Methods",
        CLUSTERER_NAMES,
        default=["ntc", "hierarchical", "amig"],
        format_func=CLUSTERER_LABELS.get,
        key="compare_list",
        max_selections=4,
    )
    cols = st.columns(max(1, len(chosen)))
    for col, name in zip(cols, chosen):
        with col, guard(name):
            with st.spinner(f"{name}..."):
                r = analysis(name)
            st.markdown(f"#### {CLUSTERER_LABELS[name]}")
            (st.success if r.degenerate else st.warning)(r.verdict.capitalize())
            redundancy = "n/a" if np.isnan(r.redundancy) else f"{r.redundancy:+.2f}"
            st.caption(
                f"{len(r.candidates)} groups · all suppressed {-r.union_drop:+.1%} · R {redundancy} · {r.combination}"
            )
            if r.candidates:
                st.dataframe(
                    candidate_table(r)[["group", "size", "generic", "drop alone", "drop with only it left", "passed"]],
                    hide_index=True,
                    width="stretch",
                    column_config=TABLE_CONFIG,
                )

st.page_link("app_pages/intervene.py", label="Next: switch the groups off and on", icon=":material/arrow_forward:")
