"""Facts compared: which knowledge neurons belong to a fact, and which turn up for every fact (generic)."""

import pandas as pd
import streamlit as st

from dkn import figures
from dkn.compare import kn_overlap
from ui import state, widgets
from ui.widgets import guard

DEFAULT_FACTS = (
    "builtin/capital/France",
    "builtin/capital/Japan",
    "builtin/landmark_city/the Eiffel Tower",
    "builtin/landmark_city/the Colosseum",
    "builtin/person_country/Albert Einstein",
)

st.title("Facts compared")
st.markdown(
    "The same few neurons can top the attribution of unrelated facts. Compare the knowledge neurons of "
    "several facts (same attribution settings as on the Explore page): neurons shared by most facts are "
    "**generic**, not about any one fact; they are flagged in every neuron table."
)

lm = widgets.require_model()
settings = state.current_settings()
facts = state.get_builtin_facts()
by_id = {f.id: f for f in facts}
current = state.current_fact()
default = [i for i in DEFAULT_FACTS if i in by_id] or [f.id for f in facts[:5]]
if current.fact_id in by_id and current.fact_id not in default:
    default = [current.fact_id] + default
chosen = st.multiselect(
    "Facts",
    list(by_id),
    default=st.session_state.get("compare_facts", default),
    format_func=lambda i: f"{by_id[i].prompt} → {by_id[i].answer}",
    key="w_compare_facts",
)
st.session_state["compare_facts"] = chosen
min_share = st.slider(
    "Generic: a knowledge neuron of at least this share of the facts",
    0.3,
    1.0,
    float(st.session_state.get("generic_share", 0.5)),
    0.05,
    key="w_generic_share",
)
st.session_state["generic_share"] = min_share

choices = {i: state.builtin_choice(i) for i in chosen}
kns = {i: state.fact_kn(lm, c, settings) for i, c in choices.items()}
missing = [i for i, kn in kns.items() if kn is None]
if missing:
    st.info(
        f"{widgets.count(len(missing), 'fact')} of {len(chosen)} not attributed yet with these settings "
        f"({', '.join(by_id[i].prompt for i in missing[:4])}{' ...' if len(missing) > 4 else ''}).",
        icon=":material/info:",
    )
    if st.button(
        f"Attribute the {widgets.count(len(missing), 'missing fact')}",
        key="compare_run",
        icon=":material/play_arrow:",
        type="primary",
    ):
        with guard("Attribution"):

            def work(update):
                for k, i in enumerate(missing):
                    kns[i] = state.fact_kn(
                        lm,
                        choices[i],
                        settings,
                        compute=True,
                        progress=lambda f, t, k=k: update((k + f) / len(missing), t),
                    )

            widgets.run_with_progress("Attributing", work, cancel_key="cancel_compare")
            st.rerun()
    if st.session_state.pop("cancelled_cancel_compare", False):
        st.info("Cancelled: the facts finished so far are stored.", icon=":material/cancel:")

ready = {f"{by_id[i].prompt} → {by_id[i].answer}": kn.neurons for i, kn in kns.items() if kn is not None}
if len(ready) < 2:
    st.warning("Choose at least 2 facts whose knowledge neurons are known to compare them.")
    st.stop()
with guard("Comparing"):
    ov = kn_overlap(ready)
    st.session_state["generic_neurons"] = {
        "fingerprint": lm.fingerprint,  # the flags are about this model's neurons
        "neurons": set(ov.generic(min_share)),
        "facts_of": ov.facts_of,
        "n_facts": len(ready),
        "share": min_share,
    }
    generic = ov.generic(min_share)
    st.metric(
        "Generic knowledge neurons",
        len(generic),
        help=f"Knowledge neurons of at least {min_share:.0%} of the {len(ready)} facts (and of 2 or more).",
    )
    widgets.show_figure(
        figures.overlap_matrix(
            ov.facts,
            ov.shared,
            ov.jaccard,
            title=f"Knowledge neurons shared by each pair of facts <br><sup>{state.summary(lm)['label']}</sup>",
        ),
        "facts-overlap",
        pd.DataFrame(ov.shared, index=ov.facts, columns=ov.facts).reset_index(),
        key="fig_overlap",
        caption="Numbers: knowledge neurons each pair shares (diagonal: the fact's own count); colour: Jaccard index.",
    )
    widgets.show_table(
        pd.DataFrame(ov.table(min_share)),
        "facts-kn-share",
        key="tab_share",
        caption="Per knowledge neuron: the share of the compared facts it belongs to.",
        column_config={
            "share": st.column_config.ProgressColumn("share of facts", format="percent", min_value=0.0, max_value=1.0)
        },
    )
