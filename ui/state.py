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
from dataclasses import asdict, dataclass, field
from typing import Callable

import streamlit as st

from dkn.attribution import Attribution, AttributionParams, attribute, attribution_key
from dkn.cache import ResultStore, default_path
from dkn.datasets import Fact, builtin_facts, load_dataset
from dkn.degeneracy import DegeneracyParams, DegeneracyResult, analyse
from dkn.interventions import InterventionResult, intervene
from dkn.models import DEFAULT_MODEL, LoadedModel, load_model, model_summary
from dkn.neurons import Neuron
from dkn.query import make_query
from dkn.selection import KnowledgeNeurons, refine

DEFAULT_FACT_ID = "builtin/capital/France"
MAX_PROMPTS_DEFAULT = 3


# ------------------------------------------------------------------ shared by every session
@st.cache_resource(show_spinner="Loading the model (once for every session of this server)...")
def get_model(name: str) -> LoadedModel:
    return load_model(name)


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


# ------------------------------------------------------------------ model choice
def model_name() -> str:
    return st.session_state.setdefault("model_name", DEFAULT_MODEL)


def current_model() -> LoadedModel | None:
    """The loaded model of this session, or None (the error, if any, is in session_state["model_error"])."""
    name = model_name()
    try:
        lm = get_model(name)
    except Exception as err:   # ModelLoadError, ValueError (unsupported family), OSError...
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


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    method: str = "ig"
    steps: int = 20
    baseline: str = "zero"
    t: float = 0.2                    # coarse threshold: share of the maximum score
    p: float = 0.5                    # refined: coarse in more than this share of the prompts
    max_prompts: int = MAX_PROMPTS_DEFAULT

    def attribution_params(self) -> AttributionParams:
        return AttributionParams(method=self.method, steps=self.steps, baseline=self.baseline)


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
    cached: bool                                   # every attribution came from the on-disk store
    seconds: float
    degeneracy: dict[str, DegeneracyResult] = field(default_factory=dict)
    vocab: dict[Neuron, tuple] = field(default_factory=dict)
    interventions: dict[tuple, InterventionResult] = field(default_factory=dict)
    custom_groups: list[tuple[Neuron, ...]] = field(default_factory=list)
    custom_grid: dict | None = None
    random_control: dict | None = None

    @property
    def main(self) -> Attribution:
        return self.attributions[0]

    def mean_scores(self):
        import numpy as np

        return np.mean(np.stack([a.scores for a in self.attributions]), axis=0)


def workspace_key(lm: LoadedModel, fact: FactChoice, settings: Settings) -> str:
    text = json.dumps({"model": lm.name, "fp": lm.fingerprint, "prompts": fact.prompts[: settings.max_prompts],
                       "answer": fact.answer, "settings": asdict(settings)}, sort_keys=True)
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
        keys = [attribution_key(lm, make_query(lm, p, fact.answer), params) for p in fact.prompts[: settings.max_prompts]]
    except ValueError:
        return False
    return all(store.get(k) is not None for k in keys)   # one indexed row each


def run_attribution(lm: LoadedModel, progress: Callable[[float, str], None] | None = None) -> Workspace:
    """Attribute each prompt of the current fact (cached in the store) and refine the knowledge neurons."""
    import time

    fact, settings = current_fact(), current_settings()
    prompts = fact.prompts[: settings.max_prompts]
    params, store = settings.attribution_params(), get_store()
    start = time.perf_counter()
    results = []
    for i, prompt in enumerate(prompts):
        label = f"prompt {i + 1} of {len(prompts)}: {prompt!r}"

        def sub(done: int, total: int, i=i, label=label) -> None:
            if progress is not None and total:
                progress((i + done / total) / len(prompts), label)
        if progress is not None:
            progress(i / len(prompts), label)
        results.append(attribute(lm, prompt, fact.answer, params, store=store, progress=sub))
    if progress is not None:
        progress(1.0, "done")
    kn = refine([a.scores for a in results], settings.t, settings.p)
    ws = Workspace(workspace_key(lm, fact, settings), fact, prompts, settings, results, kn,
                   all(a.cached for a in results), time.perf_counter() - start)
    _workspaces()[ws.key] = ws
    return ws


def get_degeneracy(lm: LoadedModel, ws: Workspace, clusterer: str = "ntc", mode: str = "last") -> DegeneracyResult:
    """The degeneracy analysis of the workspace's knowledge neurons (about a second; kept per clusterer)."""
    key = f"{clusterer}/{mode}"
    if key not in ws.degeneracy:
        ws.degeneracy[key] = analyse(lm, ws.fact.prompt, ws.fact.answer, ws.kn.neurons, ws.kn.scores,
                                     DegeneracyParams(clusterer=clusterer, mode=mode))
    return ws.degeneracy[key]


def get_vocab(lm: LoadedModel, ws: Workspace, neuron: Neuron, k: int = 10):
    from dkn.vocab import project_neuron

    if neuron not in ws.vocab:
        ws.vocab[neuron] = project_neuron(lm, neuron, k)
    return ws.vocab[neuron]


def get_intervention(lm: LoadedModel, ws: Workspace, neurons: tuple[Neuron, ...], factor: float,
                     mode: str, top_k: int = 10) -> InterventionResult:
    """Scale `neurons` by `factor`: one forward pass over the cached prefix (kept per setting)."""
    key = (tuple(sorted(neurons)), round(float(factor), 4), mode, top_k)
    if key not in ws.interventions:
        if len(ws.interventions) > 256:
            ws.interventions.clear()
        ws.interventions[key] = intervene(lm, ws.fact.prompt, ws.fact.answer, key[0], factor, mode, top_k)
    return ws.interventions[key]


@st.cache_data(show_spinner=False, max_entries=64)
def model_prediction(_lm: LoadedModel, fingerprint: str, prompt: str, answer: str, top_k: int = 10):
    """(P(answer), top next tokens) of the unchanged model; cached per model and fact."""
    r = intervene(_lm, prompt, answer, (), 1.0, "last", top_k)
    return r.prob_before, r.top_before
