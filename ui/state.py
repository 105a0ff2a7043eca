"""The app's state: the model and result store shared by every session (st.cache_resource), and each
session's workflow (the chosen fact, its settings, and the results computed for it).

Per fact, a `Workspace` holds the attributions of its prompts, the refined knowledge neurons, the
degeneracy analyses (one per clusterer), vocabulary projections and intervention results.  Workspaces are
kept in `st.session_state["workspaces"]`, keyed by everything that changes them, so switching back to a
fact is instant; attributions themselves live on disk in the ResultStore, so a new session (or a restart)
loads them at once.  No torch here: every computation is a call into `dkn`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import streamlit as st

from dkn.attribution import Attribution, AttributionParams, attribution_key
from dkn.cache import ResultStore, default_path
from dkn.custom_groups import DoseResponse, GroupGrid, RandomControl
from dkn.datasets import DatasetError, Fact, builtin_facts, load_dataset
from dkn.degeneracy import DegeneracyParams, DegeneracyResult, analyse
from dkn.figures import group_name
from dkn.interventions import InterventionResult, intervene
from dkn.models import DEFAULT_MODEL, LoadedModel, load_model, model_summary, resolve_device
from dkn.neurons import Neuron, neuron_label
from dkn.prediction import answer_token_ranks
from dkn.query import QueryError, check_prompt_length, make_query
from dkn.selection import KnowledgeNeurons, find_knowledge_neurons

DEFAULT_FACT_ID = "builtin/capital/France"
MAX_PROMPTS_DEFAULT = 3


# ------------------------------------------------------------------ shared by every session
@st.cache_resource(show_spinner="Loading the model (once for every session of this server)...", max_entries=2)
def get_model(name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """One copy per (name, device, dtype) for every session, the last two kept (a model is hundreds of MB
    to many GB): pass a resolved device (see `current_model`), so that "auto" and what it picks share one."""
    return load_model(name, device=device, dtype=dtype)


@st.cache_resource(show_spinner=False)
def _store_at(path: str) -> ResultStore:
    return ResultStore(path)


def get_store() -> ResultStore:
    """The on-disk result store ($DKN_CACHE_DIR/results.sqlite, else cache/results.sqlite)."""
    return _store_at(str(default_path()))


@st.cache_data(show_spinner=False)
def get_builtin_facts() -> list[Fact]:
    return builtin_facts()


@st.cache_data(show_spinner="Reading the facts file...", max_entries=8)
def get_dataset(name_or_path: str, limit: int = 2000) -> list[Fact]:
    return load_dataset(name_or_path, limit=limit)


def exclusive(lm: LoadedModel):
    """One model computation at a time per server process (the model's re-entrant lock).  Every session
    shares the one model, and dkn's fast paths switch the model's attention implementation while they run,
    so two sessions computing at once must not interleave (that raised LookupError 'dkn_shared_prefix')."""
    return lm.lock


# ------------------------------------------------------------------ model choice
def model_name() -> str:
    return st.session_state.setdefault("model_name", DEFAULT_MODEL)


def model_placement() -> tuple[str, str]:
    """(device, dtype) the session's model is loaded with (set by the sidebar's Load button)."""
    return st.session_state.setdefault("model_device", "auto"), st.session_state.setdefault("model_dtype", "float32")


def current_model() -> LoadedModel | None:
    """The loaded model of this session, or None (the error, if any, is in session_state["model_error"])."""
    name = model_name()
    try:
        device, dtype = model_placement()
        lm = get_model(name, str(resolve_device(device)), dtype)
    except Exception as err:  # ModelLoadError, ValueError (unsupported family), OSError...
        st.session_state["model_error"] = f"{err}"
        return None
    st.session_state.pop("model_error", None)
    return lm


def summary(lm: LoadedModel) -> dict:
    return model_summary(lm)


# ------------------------------------------------------------------ the chosen fact
@dataclass(frozen=True)
class FactChoice:
    prompt: str
    answer: str
    paraphrases: tuple[str, ...] = ()
    fact_id: str = "custom"

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) + tuple(p for p in self.paraphrases if p.strip() and p != self.prompt)


def default_fact() -> FactChoice:
    for f in get_builtin_facts():
        if f.id == DEFAULT_FACT_ID:
            return FactChoice(f.prompt, f.answer, f.prompts[1:], f.id)
    return FactChoice("The capital of France is", "Paris", (), "custom")


def current_fact() -> FactChoice:
    if "fact" not in st.session_state:
        st.session_state["fact"] = default_fact()
    return st.session_state["fact"]


def set_fact(choice: FactChoice) -> None:
    st.session_state["fact"] = choice


def clear_custom_fact() -> None:
    """The "New fact" button (a callback, before the widgets are drawn): an empty typed fact, and a fresh
    paraphrase editor, so nothing of the previous typed fact carries over."""
    st.session_state["fact"] = FactChoice("", "", (), "custom")
    st.session_state["prompt_custom"] = ""
    st.session_state["answer_custom"] = ""
    st.session_state["custom_generation"] = st.session_state.get("custom_generation", 0) + 1


def prompt_length_error(lm: LoadedModel, fact: FactChoice) -> str | None:
    """Why one of the fact's prompts is too long for dkn (dkn.query's limit), or None."""
    for prompt in fact.prompts:
        try:
            check_prompt_length(lm, prompt)
        except QueryError as err:
            return str(err)
    return None


def why_no_facts(name_or_path: str) -> str:
    """The first reason a facts file gave no fact (e.g. the column it lacks), from a strict re-read."""
    try:
        load_dataset(name_or_path, limit=1, strict=True)
    except DatasetError as err:
        text = str(err).replace(" (strict mode: fix the row, or load without strict to skip it)", "")
        missing = sorted(set(re.findall(r"missing field '(\w+)'", text)))
        if missing:
            return (
                f"every row lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"(first: {text}). The file needs the columns prompt and answer."
            )
        return text
    return "no row has both a prompt and an answer; the file needs the columns prompt and answer."


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    method: str = "ig"
    steps: int = AttributionParams().steps
    baseline: str = "zero"
    t: float = 0.2  # coarse threshold: share of the maximum score
    p: float = 0.5  # refined: coarse in more than this share of the prompts
    max_prompts: int = MAX_PROMPTS_DEFAULT

    def attribution_params(self) -> AttributionParams:
        return AttributionParams(method=self.method, steps=self.steps, baseline=self.baseline)


def keep_max_prompts(widget_key: str) -> None:
    """The "Prompts to use" callback: the user's choice goes to the settings (only when they change it)."""
    set_settings(replace(current_settings(), max_prompts=int(st.session_state[widget_key])))


def current_settings() -> Settings:
    return st.session_state.setdefault("settings", Settings())


def set_settings(settings: Settings) -> None:
    st.session_state["settings"] = settings


# ------------------------------------------------------------------ the workspace of one fact
@dataclass
class Workspace:
    key: str
    fact: FactChoice
    prompts: tuple[str, ...]
    settings: Settings
    attributions: list[Attribution]
    kn: KnowledgeNeurons
    cached: bool  # every attribution came from the on-disk store
    seconds: float
    degeneracy: dict[str, DegeneracyResult] = field(default_factory=dict)
    vocab: dict[Neuron, tuple] = field(default_factory=dict)
    interventions: dict[tuple, InterventionResult] = field(default_factory=dict)
    custom_groups: list[tuple[Neuron, ...]] = field(default_factory=list)
    custom_grid: GroupGrid | None = None
    random_control: RandomControl | None = None
    random_control_for: tuple[Neuron, ...] = ()
    dose: DoseResponse | None = None
    dose_for: tuple | None = None

    @property
    def main(self) -> Attribution:
        return self.attributions[0]

    def mean_scores(self):
        import numpy as np

        return np.mean(np.stack([a.scores for a in self.attributions]), axis=0)


def workspace_key(lm: LoadedModel, fact: FactChoice, settings: Settings) -> str:
    text = json.dumps(
        {
            "model": lm.name,
            "fp": lm.fingerprint,
            "prompts": fact.prompts[: settings.max_prompts],
            "answer": fact.answer,
            "settings": asdict(settings),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _workspaces() -> dict[str, Workspace]:
    return st.session_state.setdefault("workspaces", {})


def current_workspace(lm: LoadedModel, *, load_cached: bool = True) -> Workspace | None:
    """The current fact's workspace: from this session, else built at once from the store if every
    attribution is on disk (load_cached), else None (attribution has to be run)."""
    fact, settings = current_fact(), current_settings()
    key = workspace_key(lm, fact, settings)
    ws = _workspaces().get(key)
    if ws is None and load_cached and all_cached(lm, fact, settings):
        ws = run_attribution(lm)
    return ws


def all_cached(lm: LoadedModel, fact: FactChoice, settings: Settings) -> bool:
    store, params = get_store(), settings.attribution_params()
    try:
        keys = [
            attribution_key(lm, make_query(lm, p, fact.answer), params) for p in fact.prompts[: settings.max_prompts]
        ]
    except ValueError:
        return False
    return all(store.get(k) is not None for k in keys)  # one indexed row each


def run_attribution(lm: LoadedModel, progress: Callable[[float, str], None] | None = None) -> Workspace:
    """Attribute each prompt of the current fact (cached in the store) and refine the knowledge neurons
    (`dkn.selection.find_knowledge_neurons`); `progress(fraction, label)` names the prompt being attributed."""
    import time

    fact, settings = current_fact(), current_settings()
    prompts = fact.prompts[: settings.max_prompts]
    start = time.perf_counter()
    kn = fact_kn(lm, fact, settings, compute=True, progress=progress)
    if progress is not None:
        progress(1.0, "done")
    results = list(kn.attributions)
    ws = Workspace(
        workspace_key(lm, fact, settings),
        fact,
        prompts,
        settings,
        results,
        kn,
        all(a.cached for a in results),
        time.perf_counter() - start,
    )
    _workspaces()[ws.key] = ws
    return ws


def get_degeneracy(
    lm: LoadedModel, ws: Workspace, clusterer: str = "ntc", mode: str = "last", **options
) -> DegeneracyResult:
    """The degeneracy analysis of the workspace's knowledge neurons (about a second; kept per clusterer and
    options; `options` are further DegeneracyParams fields, e.g. edge="functional")."""
    if clusterer == "backup":  # the rounds attribute again: with the workspace's attribution settings
        options.setdefault("backup_attribution", ws.settings.attribution_params())
    key = f"{clusterer}/{mode}" + "".join(f"/{k}={options[k]}" for k in sorted(options))
    if key not in ws.degeneracy:
        with exclusive(lm):
            ws.degeneracy[key] = analyse(
                lm,
                ws.fact.prompt,
                ws.fact.answer,
                ws.kn.neurons,
                ws.kn.scores,
                DegeneracyParams(clusterer=clusterer, mode=mode, **options),
            )
    return ws.degeneracy[key]


def get_edit_effects(lm: LoadedModel, ws: Workspace, neurons: tuple[Neuron, ...], factor: float, mode: str):
    """dkn.prediction.edit_effects on every prompt of the workspace (kept per setting)."""
    from dkn.prediction import edit_effects

    cache = st.session_state.setdefault("_edit_effects", {})
    key = (ws.key, tuple(sorted(neurons)), round(float(factor), 4), mode)
    if key not in cache:
        if len(cache) > 128:
            cache.clear()
        with exclusive(lm):
            cache[key] = edit_effects(lm, ws.prompts, ws.fact.answer, neurons, factor, mode)
    return cache[key]


def get_generic_knockout(lm: LoadedModel, ws: Workspace, generic: frozenset):
    """dkn.compare.knockout_without_generic for the workspace's knowledge neurons (kept per generic set)."""
    from dkn.compare import knockout_without_generic

    cache = st.session_state.setdefault("_generic_knockouts", {})
    key = (ws.key, tuple(ws.kn.neurons), generic)
    if key not in cache:
        if len(cache) > 32:
            cache.clear()
        with exclusive(lm):
            cache[key] = knockout_without_generic(lm, ws.fact.prompt, ws.fact.answer, ws.kn.neurons, generic)
    return cache[key]


def get_neuron_detail(lm: LoadedModel, ws: Workspace, neuron: Neuron):
    """dkn.compare.neuron_detail on the fact's main prompt (kept per neuron)."""
    from dkn.compare import neuron_detail

    cache = st.session_state.setdefault("_neuron_details", {})
    key = (ws.key, neuron)
    if key not in cache:
        with exclusive(lm):
            cache[key] = neuron_detail(lm, ws.fact.prompt, ws.fact.answer, neuron)
    return cache[key]


def ticked_groups(ws: Workspace, clusterer: str, candidates) -> list[tuple[str, tuple[Neuron, ...]]]:
    """(name, neurons) of every ticked BDC and user group on the Intervene page; the ticked single
    knowledge neurons form one more group."""
    ss = st.session_state
    groups = [
        (f"BDC {group_name(i)}", c.members)
        for i, c in enumerate(candidates)
        if ss.get(f"p_bdc_{ws.key}_{clusterer}_{i}")
    ]
    groups += [(f"My group {i + 1}", g) for i, g in enumerate(ws.custom_groups) if ss.get(f"p_g_{ws.key}_{i}")]
    singles = tuple(n for n in ws.kn.neurons if ss.get(f"p_n_{ws.key}_{n}"))
    if singles:
        groups.append(("single neuron" if len(singles) == 1 else f"{len(singles)} single neurons", singles))
    return groups


def ticked_neurons(ws: Workspace, clusterer: str, candidates) -> tuple[Neuron, ...]:
    return tuple(sorted({n for _, g in ticked_groups(ws, clusterer, candidates) for n in g}))


def get_vocab(lm: LoadedModel, ws: Workspace, neuron: Neuron, k: int = 10):
    from dkn.vocab import project_neuron

    if neuron not in ws.vocab:
        with exclusive(lm):
            ws.vocab[neuron] = project_neuron(lm, neuron, k)
    return ws.vocab[neuron]


def get_intervention(
    lm: LoadedModel, ws: Workspace, neurons: tuple[Neuron, ...], factor: float, mode: str, top_k: int = 10
) -> InterventionResult:
    """Scale `neurons` by `factor`: one forward pass over the cached prefix (kept per setting)."""
    key = (tuple(sorted(neurons)), round(float(factor), 4), mode, top_k)
    if key not in ws.interventions:
        if len(ws.interventions) > 256:
            ws.interventions.clear()
        with exclusive(lm):
            ws.interventions[key] = intervene(lm, ws.fact.prompt, ws.fact.answer, key[0], factor, mode, top_k)
    return ws.interventions[key]


@st.cache_data(show_spinner=False, max_entries=64)
def model_prediction(_lm: LoadedModel, fingerprint: str, prompt: str, answer: str, top_k: int = 10):
    """(P(answer), top next tokens) of the unchanged model; cached per model and fact."""
    with exclusive(_lm):
        r = intervene(_lm, prompt, answer, (), 1.0, "last", top_k)
    return r.prob_before, r.top_before


def cached_figure(name: str, build: Callable, *args, **kwargs):
    """build(*args, **kwargs), remembered per session for the same arguments (a rerun that changes nothing
    does not rebuild the figure)."""
    cache = st.session_state.setdefault("_figure_cache", {})
    key = (name, getattr(build, "__qualname__", repr(build)), repr(args), repr(sorted(kwargs.items())))
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = build(*args, **kwargs)
    return cache[key]


@st.cache_data(show_spinner=False, max_entries=64)
def answer_tokens(_lm: LoadedModel, fingerprint: str, prompt: str, answer: str):
    """Each answer token's probability and rank (dkn.prediction); cached per model and fact."""
    with exclusive(_lm):
        return answer_token_ranks(_lm, prompt, answer)


def figure_title(title: str, model_label: str, fact: FactChoice) -> str:
    """A figure title that names the model and the fact (an exported figure stands alone)."""
    return f"{title}<br><sup>{model_label} · {fact.prompt} → {fact.answer}</sup>"


def all_figures(
    lm: LoadedModel,
    ws: Workspace,
    clusterer: str,
    neurons: tuple[Neuron, ...],
    factor: float,
    mode: str,
    model_label: str,
) -> tuple[dict, dict]:
    """Every figure of the fact, built from the workspace's results (the degeneracy analysis is computed
    if no page asked for it yet): (name -> figure, name -> table).  No Streamlit calls: it runs when the
    Export all button is clicked."""
    from dkn import figures as fg
    from dkn.topology import h0_barcode

    title = lambda t: figure_title(t, model_label, ws.fact)  # noqa: E731
    scores = ws.mean_scores()  # [n_layers, d_mlp]
    figs = {
        "attribution-heatmap": fg.attribution_heatmap(
            scores, highlight=ws.kn.neurons, title=title("Attribution score of every MLP neuron")
        ),
        "layer-summary": fg.layer_summary(scores, ws.settings.t, title=title("Attribution per layer")),
    }
    tables = {"layer-summary": fg.layer_table(scores, ws.settings.t), "knowledge-neurons": ws.kn.as_records()}
    result = get_degeneracy(lm, ws, clusterer)
    if result.graph is not None:
        figs[f"kn-graph-{clusterer}"] = fg.kn_graph(
            result.graph,
            result.bdcs,
            result.kn_scores,
            passed=[c.passed for c in result.candidates],
            title=title("Knowledge-neuron graph"),
        )
        tables[f"kn-graph-{clusterer}"] = fg.edge_table(result.graph)
        bars = h0_barcode(result.graph.distance)
        labels = [" ".join(neuron_label(result.graph.neurons[i]) for i in b.members) for b in bars]
        figs[f"barcode-{clusterer}"] = fg.barcode(bars, labels, title=title("Persistence barcode"))
    if result.candidates:
        sub = [(s, result.prob * (1 - d)) for s, d in result.subset_drops]
        figs[f"degeneracy-grid-{clusterer}"] = fg.degeneracy_grid(
            sub, result.prob, len(result.candidates), title=title("P(answer) with each subset of groups suppressed")
        )
        tables[f"degeneracy-grid-{clusterer}"] = fg.grid_table(sub, result.prob)
    r = get_intervention(lm, ws, neurons, factor, mode)
    figs["intervention"] = fg.intervention_bars(
        r.top_before,
        r.top_after,
        answer_tokens=ws.main.answer_tokens[:1],
        title=title(f"Top next tokens, {len(neurons)} neuron{'' if len(neurons) == 1 else 's'} × {factor:g} ({mode})"),
    )
    tables["intervention"] = fg.token_table(r.top_before, r.top_after)
    return figs, tables


def fact_kn(
    lm: LoadedModel,
    fact: FactChoice,
    settings: Settings,
    *,
    compute: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> KnowledgeNeurons | None:
    """The knowledge neurons of any fact (not the session's current one) under `settings`: from the store,
    or computed when `compute` (each attribution is stored); None when not cached and not computed."""
    if not compute and not all_cached(lm, fact, settings):
        return None
    prompts = fact.prompts[: settings.max_prompts]

    def report(done: int, total: int) -> None:  # progress(fraction, label naming the prompt being attributed)
        if progress is not None and total:
            i = min(done * len(prompts) // total, len(prompts) - 1)
            progress(done / total, f"prompt {i + 1} of {len(prompts)}: {prompts[i][:60]!r}")

    with exclusive(lm):
        return find_knowledge_neurons(
            lm,
            prompts,
            fact.answer,
            settings.attribution_params(),
            t=settings.t,
            p=settings.p,
            store=get_store(),
            progress=report,
        )


def builtin_choice(fact_id: str) -> FactChoice:
    f = next(f for f in get_builtin_facts() if f.id == fact_id)
    return FactChoice(f.prompt, f.answer, f.prompts[1:], f.id)
