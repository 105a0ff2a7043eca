"""Explore: pick a fact, see what the model predicts, attribute the answer to every MLP neuron."""

import pandas as pd
import streamlit as st

from dkn import figures
from dkn.neurons import Neuron
from dkn.options import DEFAULT_RULE
from ui import state, widgets
from ui.widgets import guard, pct

SOURCES = ["Built-in facts", "Dataset file", "Type your own"]
METHODS = {"ig": "Integrated gradients", "grad_x_act": "Gradient × activation (fast)", "activation": "Activation only"}

st.title("Explore a fact")
st.markdown(
    "Choose a fact the model knows, check that it predicts the answer, then attribute the answer's "
    "probability to each of the model's MLP neurons. The neurons with the highest scores, across "
    "paraphrases of the prompt, are the fact's **knowledge neurons**."
)

lm = widgets.require_model()
fact = state.current_fact()


def persistent(widget, label, options, pkey, default, **kwargs):
    """A radio/selectbox whose choice survives page switches (widget state is dropped off-page)."""
    current = st.session_state.get(pkey, default)
    index = options.index(current) if current in options else 0
    value = widget(label, options, index=index, key=f"w_{pkey}", **kwargs)
    st.session_state[pkey] = value
    return value


# ------------------------------------------------------------------ 1. the fact
st.header("1 · The fact", divider="gray")
left, right = st.columns([1, 2], gap="large")
with left:
    source = persistent(st.radio, "Where the fact comes from", SOURCES, "fact_source", SOURCES[0])
base = None
with right:
    if source == "Built-in facts":
        facts = state.get_builtin_facts()
        ids = [f.id for f in facts]
        by_id = {f.id: f for f in facts}
        chosen = persistent(
            st.selectbox,
            "Built-in fact",
            ids,
            "builtin_fact",
            fact.fact_id if fact.fact_id in by_id else state.DEFAULT_FACT_ID,
            format_func=lambda i: (
                f"{by_id[i].prompt} → {by_id[i].answer}"
                + ("" if by_id[i].known_by_default else "   (the default model misses it)")
            ),
            help="Hand-written facts, each with paraphrased prompts. ✓ facts are ones the default model answers.",
        )
        f = by_id[chosen]
        base = state.FactChoice(f.prompt, f.answer, f.prompts[1:], f.id)
    elif source == "Dataset file":
        name = st.text_input(
            "Dataset name or file",
            key="dataset_name",
            value=st.session_state.get("dataset_value", ""),
            placeholder="pararel:P36, lre:country_capital_city, or /path/to/my_facts.csv",
            help="A dataset name (builtin, pararel, rome, lre, templama) or a CSV/JSONL file "
            "with columns prompt, answer (paraphrases separated by |).",
        )
        st.session_state["dataset_value"] = name
        if name.strip():
            with guard("Reading the facts"):
                facts = state.get_dataset(name.strip())
                if not facts:
                    st.warning(
                        f"The file holds no usable facts: {state.why_no_facts(name.strip())}", icon=":material/warning:"
                    )
                else:
                    by_id = {f.id: f for f in facts}
                    chosen = persistent(
                        st.selectbox,
                        f"Fact ({len(facts):,} in the file)",
                        list(by_id),
                        "dataset_fact",
                        fact.fact_id,
                        format_func=lambda i: f"{by_id[i].prompt} → {by_id[i].answer}",
                    )
                    f = by_id[chosen]
                    base = state.FactChoice(f.prompt, f.answer, f.prompts[1:], f.id)
        else:
            st.info("Type a dataset name or the path of a facts file.")
        if base is None:  # no fact from this file: never leave the previous fact's results on screen
            st.stop()
    else:
        st.caption("Type a prompt that the answer should complete, e.g. *The Eiffel Tower is in* → *Paris*.")
        st.button(
            "New fact",
            key="new_custom_fact",
            on_click=state.clear_custom_fact,
            icon=":material/note_add:",
            help="Empty the prompt, the answer and the paraphrases.",
        )
        base = state.FactChoice("", "", (), "custom")

if base is not None:
    same = fact.fact_id == base.fact_id
    start = fact if same else base
    c1, c2 = st.columns([3, 1])
    prompt = c1.text_input(
        "Prompt",
        value=start.prompt,
        key=f"prompt_{base.fact_id}",
        help="Ends where the answer starts; no trailing space.",
    )
    answer = c2.text_input("Answer", value=start.answer, key=f"answer_{base.fact_id}")
    # a fixed label and a fixed `expanded`: a label that changes would make a new expander, which collapses
    # and drops the row being typed
    with st.expander("Paraphrases — the knowledge neurons must hold across them", expanded=base.fact_id == "custom"):
        editor_key = f"para_{base.fact_id}_{st.session_state.get('custom_generation', 0)}"
        if editor_key not in st.session_state:  # a fresh editor (first time, or back from another page)
            st.session_state[f"para_init_{editor_key}"] = list(start.paraphrases)
        initial = st.session_state.get(f"para_init_{editor_key}", list(start.paraphrases))
        edited = st.data_editor(
            pd.DataFrame({"paraphrase": initial}, dtype="string"),
            num_rows="dynamic",
            key=editor_key,
            width="stretch",
            hide_index=True,
            column_config={
                "paraphrase": st.column_config.TextColumn(
                    "Paraphrased prompt", help="Same fact, other wording; the answer must follow."
                )
            },
        )
        paraphrases = tuple(str(p).strip() for p in edited["paraphrase"].tolist() if isinstance(p, str) and p.strip())
        st.caption(
            f"{widgets.count(len(paraphrases), 'paraphrase')}: the fact has "
            f"{widgets.count(1 + len(paraphrases), 'prompt')}."
        )
    fact = state.FactChoice(prompt.rstrip(), answer.strip(), paraphrases, base.fact_id)
    state.set_fact(fact)

if not fact.prompt.strip() or not fact.answer.strip():
    st.info("Give a prompt and an answer to continue.", icon=":material/edit:")
    st.stop()

# ------------------------------------------------------------------ 2. the prediction
too_long = state.prompt_length_error(lm, fact)
if too_long:  # before any model call: a huge prompt must not reach attribution or the model
    st.error(f"This prompt cannot be used: {too_long}", icon=":material/error:")
    st.stop()
st.header("2 · What the model predicts", divider="gray")
with guard():
    prob, top = state.model_prediction(lm, lm.fingerprint, fact.prompt, fact.answer)
    tokens = state.answer_tokens(lm, lm.fingerprint, fact.prompt, fact.answer)
    c1, c2 = st.columns([1, 2], gap="large")
    c1.metric(
        f"P({fact.answer!r} | prompt)",
        pct(prob),
        help="Product over the answer's tokens, each conditioned on the prompt and the answer's earlier tokens.",
    )
    first = tokens[0]
    if len(tokens) > 1:
        c1.caption(f"The answer is {len(tokens)} tokens; each is ranked given the prompt and the tokens before it.")
        c1.dataframe(
            pd.DataFrame(
                {
                    "answer token": [repr(t.token) for t in tokens],
                    "probability": [t.prob for t in tokens],
                    "rank": [t.rank for t in tokens],
                }
            ),
            hide_index=True,
            width="stretch",
            key="answer_tokens",
            column_config={"probability": st.column_config.NumberColumn(format="percent")},
        )
    elif first.rank <= len(top):
        c1.caption(f"The answer is the model's **#{first.rank}** guess.")
    else:
        c1.caption(
            f"The answer is the model's #{first.rank:,} guess, not among its top {len(top)} next tokens: "
            "it may not know this fact."
        )
    c2.dataframe(
        pd.DataFrame({"next token": [repr(t) for t, _ in top], "probability": [p for _, p in top]}),
        hide_index=True,
        width="stretch",
        height=230,
        column_config={
            "probability": st.column_config.ProgressColumn(
                "probability", format="percent", min_value=0.0, max_value=1.0
            )
        },
    )

# ------------------------------------------------------------------ 3. attribution
st.header("3 · Attribution", divider="gray")
settings = state.current_settings()
with st.expander("Settings", icon=":material/settings:"):
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox(
        "Method", list(METHODS), index=list(METHODS).index(settings.method), format_func=METHODS.get, key="set_method"
    )
    adaptive = DEFAULT_RULE == "adaptive"  # its step count is the first level's intervals: even
    steps = c2.slider(
        "Integration intervals (first level)" if adaptive else "Integration steps",
        2 if adaptive else 4,
        48 if adaptive else 50,
        settings.steps,
        step=2 if adaptive else 1,
        key="set_steps",
        disabled=method != "ig",
        help=(
            "Intervals every layer starts with; layers whose estimated error is larger get more "
            "(dkn.integration, rule 'adaptive')."
            if adaptive
            else "More steps: more exact integrated gradients, proportionally slower."
        ),
    )
    baseline = c3.selectbox(
        "Baseline",
        ["zero", "amig"],
        index=["zero", "amig"].index(settings.baseline),
        key="set_baseline",
        help="zero: Dai et al.; amig: Chen et al.'s mean over prompts with one token replaced by end-of-text.",
    )
    c1, c2, c3 = st.columns(3)
    t = c1.slider(
        "Coarse threshold t",
        0.05,
        0.9,
        settings.t,
        0.05,
        key="set_t",
        help="A neuron is coarse in a prompt when its score exceeds t × the prompt's largest score.",
    )
    p = c2.slider(
        "Refined share p",
        0.0,
        0.9,
        settings.p,
        0.1,
        key="set_p",
        help="A knowledge neuron is coarse in more than this share of the prompts.",
    )
    n_max = max(1, len(fact.prompts))
    # keyed by the number of prompts, and written to the settings only when the user changes it: a fact
    # with one prompt must not pin "Prompts to use" to 1 for the paraphrases typed next or the facts after
    c3.number_input(
        "Prompts to use",
        1,
        n_max,
        min(settings.max_prompts, n_max),
        key=f"set_max_prompts_{n_max}",
        on_change=state.keep_max_prompts,
        args=(f"set_max_prompts_{n_max}",),
        help="The prompt plus this many minus one paraphrases; each costs one attribution.",
    )
    state.set_settings(
        state.Settings(method, int(steps), baseline, float(t), float(p), state.current_settings().max_prompts)
    )

settings = state.current_settings()
n_prompts = min(settings.max_prompts, len(fact.prompts))
ws = None
with guard():
    ws = state.current_workspace(lm)
    label = f"Run attribution on {n_prompts} prompt{'s' if n_prompts > 1 else ''}" if ws is None else "Attribution done"
    run = st.button(
        label,
        type="primary",
        key="run_attribution",
        disabled=ws is not None,
        icon=":material/play_arrow:",
        help="Results are cached on disk: a fact you ran before appears at once.",
    )
    if run and ws is None:
        ws = widgets.run_with_progress(
            "Attributing", lambda progress: state.run_attribution(lm, progress), cancel_key="cancel_attribution"
        )
    if ws is None and st.session_state.pop("cancelled_cancel_attribution", False):
        st.info("Attribution cancelled: nothing was stored for the unfinished prompt.", icon=":material/cancel:")
    if ws is None:
        st.caption("About 10 s per prompt for the default model on a CPU. Cached results appear at once.")

if ws is None:
    st.stop()

if ws.cached:
    st.success(
        f"Loaded from the cache at once (first computed in {sum(a.seconds for a in ws.attributions):.1f} s).",
        icon=":material/bolt:",
    )
else:
    st.success(f"Computed in {ws.seconds:.1f} s and stored in the cache.", icon=":material/check_circle:")

options = list(range(len(ws.prompts))) + (["mean"] if len(ws.prompts) > 1 else [])
shown = st.selectbox(
    "Scores of",
    options,
    key="heat_prompt",
    format_func=lambda o: "mean over all prompts" if o == "mean" else f"prompt {o + 1}: {ws.prompts[o]}",
)
scores = ws.mean_scores() if shown == "mean" else ws.attributions[shown].scores
fig = figures.attribution_heatmap(
    scores,
    highlight=ws.kn.neurons,
    title=widgets.titled("Attribution score of every MLP neuron (circles: knowledge neurons)", lm, ws),
)
event = widgets.show_figure(
    fig,
    "attribution-heatmap",
    figures.heatmap_table(scores),
    key="fig_heatmap",
    on_select="rerun",
    caption="Each row is a layer, each column one neuron of its MLP. Red: the neuron "
    "raises the answer's probability; blue: lowers it. Drag to zoom, double-click "
    "to reset; click or box-select neurons to add them to your own group.",
)
picked = []
for pt in event.selection.points if event and getattr(event, "selection", None) else []:
    x, y = pt.get("x"), pt.get("y")
    if x is not None and y is not None:
        picked.append(Neuron(int(y), int(x)))
if picked:
    picked = sorted(set(picked))
    c1, c2 = st.columns([3, 1])
    c1.write(
        "Selected: " + ", ".join(widgets.neuron_label(n) for n in picked[:30]) + (" ..." if len(picked) > 30 else "")
    )
    if c2.button("Add as my group", key="group_from_heatmap", icon=":material/add:"):
        ws.custom_groups.append(tuple(picked[:64]))
        st.toast(f"Group of {len(picked[:64])} neurons added: test it on the Intervene page.")

layers = figures.layer_table(scores, settings.t)
widgets.show_figure(
    figures.layer_summary(scores, settings.t, title=widgets.titled("Attribution per layer", lm, ws)),
    "layer-summary",
    layers,
    key="fig_layers",
    caption="Where the fact lives: the positive attribution of each layer, and its strongest neuron.",
)

# ------------------------------------------------------------------ 4. knowledge neurons
st.header("4 · Knowledge neurons", divider="gray")
kn = ws.kn
st.markdown(
    f"**{len(kn.neurons)}** neurons score above t = {kn.t:.2f} × the maximum in more than "
    f"p = {kn.p:.0%} of the {kn.n_prompts} prompt{'s' if kn.n_prompts > 1 else ''}."
)
if not kn.neurons:
    st.warning("No knowledge neurons: lower t or p in the settings, or use fewer paraphrases.")
    st.stop()


def generic_knockout_panel(generic_set: set) -> None:
    """The selection without the generic neurons (Dai et al.'s negative examples) and its knockout."""
    shared = [n for n in kn.neurons if n in generic_set]
    with st.expander(f"Without the generic neurons ({widgets.count(len(shared), 'generic knowledge neuron')})"):
        if not generic_set:
            st.caption("Compare facts on the Facts compared page first: it decides which neurons are generic.")
            return
        ko = state.get_generic_knockout(lm, ws, frozenset(generic_set))
        m = st.columns(3)
        for col, (label, p) in zip(
            m,
            (
                ("All knowledge neurons off", ko.all_kn),
                ("Fact-specific off", ko.specific),
                ("Generic off", ko.generic_only),
            ),
        ):
            col.metric(label, pct(p), delta=widgets.signed_pct(-ko.drop(p)), delta_color="normal")
        values = {
            "unchanged": ko.prob,
            "all KNs off": ko.all_kn,
            "fact-specific off": ko.specific,
            "generic off": ko.generic_only,
        }
        widgets.show_figure(
            figures.probability_bars(values, widgets.titled("Knockout with and without the generic neurons", lm, ws)),
            "generic-knockout",
            ko.table(),
            key="fig_generic_knockout",
            caption="Suppressed (factor 0) at the answer position. Dropping the generic neurons from the "
            "selection keeps the fact-specific ones; if their knockout still removes the answer, the fact "
            "is stored in them, not in the neurons every fact shares.",
        )


with guard():
    generic = widgets.generic_comparison(lm)
    generic_set = widgets.generic_neurons(lm)
    rows = []
    for n, s, c in zip(kn.neurons, kn.scores, kn.counts):
        promoted, _ = state.get_vocab(lm, ws, n)
        rows.append(
            {
                "pick": False,
                "neuron": widgets.neuron_label(n),
                "layer": n.layer,
                "index": n.index,
                "score": s,
                "prompts": f"{c}/{kn.n_prompts}",
                "generic": n in generic_set,
                "promotes": "  ".join(repr(t) for t, _ in promoted[:4]),
            }
        )
    table = pd.DataFrame(rows)
    st.session_state.setdefault("_tables", {})["knowledge-neurons"] = table.drop(columns=["pick"])
    edited = st.data_editor(
        table,
        hide_index=True,
        width="stretch",
        key=f"kn_table_{ws.key}",
        disabled=[c for c in table.columns if c != "pick"],
        column_config={
            "pick": st.column_config.CheckboxColumn("pick", help="Pick neurons to form your own group"),
            "score": st.column_config.NumberColumn("score", format="%.4f"),
            "prompts": st.column_config.TextColumn("coarse in"),
            "generic": st.column_config.CheckboxColumn("generic", help="Also a knowledge neuron of most other facts"),
            "promotes": st.column_config.TextColumn("promotes (vocabulary)"),
        },
    )
    c1, c2, c3 = st.columns([3, 1, 1])
    c1.caption(
        "Score: mean attribution over the prompts. *Promotes*: the tokens whose logits the neuron's "
        "output weights raise most. *Generic*: a knowledge neuron of at least "
        + (
            f"{generic['share']:.0%} of the {generic['n_facts']} facts compared"
            if generic
            else "half the facts compared"
        )
        + " on the Facts compared page"
        + ("" if generic else " (compare facts there to set it)")
        + "."
    )
    chosen = [kn.neurons[i] for i, v in enumerate(edited["pick"].tolist()) if v]
    if c2.button(
        f"Group the {len(chosen)} picked", key="group_from_table", disabled=len(chosen) < 1, icon=":material/group_add:"
    ):
        ws.custom_groups.append(tuple(chosen))
        st.toast(f"Group of {len(chosen)} neurons added: test it on the Intervene page.")
    with c3:
        widgets.export_menu(None, "knowledge-neurons", table.drop(columns=["pick"]), key="tab_kn")

    generic_knockout_panel(generic_set)

    st.subheader("Vocabulary projection")
    st.caption(
        "What a neuron writes, read through the final norm and the unembedding: the next tokens its "
        "output weight vector promotes and demotes (per unit of activation; later layers ignored)."
    )
    neuron = st.selectbox("Neuron", list(kn.neurons), format_func=widgets.neuron_label, key="vocab_neuron")
    promoted, demoted = state.get_vocab(lm, ws, neuron)
    detail = state.get_neuron_detail(lm, ws, neuron)
    d = st.columns(3)
    d[0].metric("Activation at the answer position", f"{detail.activation:+.3f}")
    d[1].metric(
        f"Direct effect on the {detail.answer_token!r} logit",
        f"{detail.direct_effect:+.3f}",
        help=f"activation × {detail.logit_per_unit:+.3f} (the logit change per unit of activation "
        "through the unembedding; later layers ignored)",
    )
    facts_of = generic["facts_of"].get(neuron, ()) if generic else ()
    d[2].metric(
        "Knowledge neuron of",
        widgets.count(len(facts_of), "compared fact") if generic else "—",
        help="Facts compared on the Facts compared page.",
    )
    if facts_of:
        st.caption("Also a knowledge neuron of: " + "; ".join(facts_of))
    c1, c2 = st.columns(2)
    vocab_cfg = {"logit change": st.column_config.NumberColumn(format="%+.3f")}
    for col, title, changes in ((c1, "Promotes", promoted), (c2, "Demotes", demoted)):
        col.markdown(f"**{title}**")
        col.dataframe(
            pd.DataFrame({"token": [repr(t) for t, _ in changes], "logit change": [v for _, v in changes]}),
            hide_index=True,
            width="stretch",
            column_config=vocab_cfg,
        )
    st.session_state.setdefault("_tables", {})[f"vocabulary-{neuron.layer}-{neuron.index}"] = [
        {"direction": "promotes", "token": t, "logit_change": v} for t, v in promoted
    ] + [{"direction": "demotes", "token": t, "logit_change": v} for t, v in demoted]

st.page_link(
    "app_pages/degenerate.py", label="Next: cluster them into degenerate groups", icon=":material/arrow_forward:"
)
