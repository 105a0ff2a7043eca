"""What the robustness, enhancement, fact-checking, evolvability and complexity experiments share:
the neuron conditions, held-out prompts, bounded measures and fact-clustered statistics.

Conditions, per fact, named for what they are:

- "degenerate components": the union of the fact's DKN (`DegeneracyResult.dkn`), only when it
  passes the strict degeneracy test (small models rarely do: then the set is empty and the
  condition's rows are missing, never filled in with something else);
- "candidate groups": the members of every NTC candidate group (BDC) of the fact's knowledge
  neurons, passed or not (what older reports called "DKN");
- "knowledge neurons": the refined knowledge neurons (`find_knowledge_neurons`, t = 0.2, p = 0.5);
- "KN subset": random subsets of the knowledge neurons of the same size as "candidate groups",
  one per seed: "candidate groups beats KN" means something only if it also beats this;
- "random matched": as many neurons as "candidate groups", none a knowledge neuron, each in the
  same layer as and of similar mean activation to one of them (drawn among the `match_pool`
  nearest by mean activation over the selection prompts), one set per seed;
- "none": nothing changed.

Held-out evaluation: by default neurons are selected on paraphrases `prompts[1:1+max_prompts]`
and measured on `prompts[0]` (the prompt the "known" filter checked), so selection and test
never share a prompt; facts without a paraphrase are skipped.  Selection stability: the mean
pairwise Jaccard index of the per-paraphrase (coarse) knowledge-neuron sets.

Attribution baseline: per family (`default_attribution`): AMIG where the MLP output goes
through its own norm (Gemma 2/3: zero-baseline IG puts everything in the first step there),
zero elsewhere; an explicit `attribution` overrides it.

Measures: a log ratio of probabilities (bounded below by the 1e-30 floor, never a division by
a tiny P), summarised by medians with fact-clustered bootstrap intervals; `percent_from_log`
turns a median log ratio back into the paper's relative change (always finite).  Records are
JSON-native (lists, floats, str keys, None for NaN) because `Context.each` stores exact JSON.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dkn.attribution import AttributionParams, attribute
from dkn.degeneracy import DegeneracyParams, analyse
from dkn.experiments.timing import stage
from dkn.hooks import record_neurons
from dkn.jsonsafe import jsonable
from dkn.neurons import Neuron
from dkn.query import first_answer_tokens as first_tokens  # noqa: F401  (re-exported)
from dkn.selection import coarse_neurons, find_knowledge_neurons

DEGENERATE, GROUPS, KN, KN_SUBSET, RANDOM, NONE = (
    "degenerate components",
    "candidate groups",
    "knowledge neurons",
    "KN subset",
    "random matched",
    "none",
)
CONDITIONS = (DEGENERATE, GROUPS, KN, KN_SUBSET, RANDOM, NONE)
SET_CONDITIONS = CONDITIONS[:-1]  # the ones with neurons
SEEDED = (KN_SUBSET, RANDOM)  # one set per seed
LOG_FLOOR = 1e-30  # P below this counts as this (log P >= -69)


@dataclass(frozen=True)
class ConditionParams:
    max_prompts: int = 3  # selection paraphrases per fact
    held_out: bool = True  # select on paraphrases, measure on prompts[0]
    t: float = 0.2
    p: float = 0.5
    max_neurons: int | None = None  # None: every refined neuron goes into the NTC graph; else the strongest
    random_seeds: int = 3
    match_pool: int = 10  # random matched: drawn among this many nearest by mean activation
    degeneracy: DegeneracyParams = field(default_factory=lambda: DegeneracyParams(clusterer="ntc", random_seeds=0))
    attribution: AttributionParams | None = None  # None: the family's default (`default_attribution`)


# -- prompts, baseline ---------------------------------------------------------------------------------
def prompt_split(fact, params: ConditionParams) -> tuple[list[str], str]:
    """(selection prompts, evaluation prompt): held out by default, the same prompt when not."""
    if not params.held_out:
        return list(fact.prompts[: params.max_prompts]), fact.prompts[0]
    if len(fact.prompts) < 2:
        raise ValueError(
            f"fact {fact.id!r} has one prompt: held-out evaluation needs a paraphrase to select on "
            "(set held_out=false to select and measure on the same prompt)"
        )
    return list(fact.prompts[1 : 1 + params.max_prompts]), fact.prompts[0]


def has_post_mlp_norm(lm) -> bool:
    """Does each block normalise its MLP output (the family's `post_mlp_norm` module exists)?"""
    path = lm.family.post_mlp_norm
    if not path:
        return False
    try:
        lm.blocks[0].get_submodule(path)
    except AttributeError:
        return False
    return True


def default_attribution(lm, params: AttributionParams | None = None) -> AttributionParams:
    """`params` when given, else the family default: AMIG baseline after a post-MLP norm, zero otherwise."""
    if params is not None:
        return params
    return AttributionParams(baseline="amig" if has_post_mlp_norm(lm) else "zero")


# -- the conditions ------------------------------------------------------------------------------------
def neuron_conditions(ctx, fact, params: ConditionParams) -> dict:
    """JSON record: {"sets": {condition: [[layer, index], ...] or one such list per seed}, "kn_scores",
    "selection_prompts", "evaluation_prompt", "n_kn", "capped", "n_bdcs", "degenerate", "union_drop",
    "jaccard", "baseline"}."""
    selection, evaluation = prompt_split(fact, params)
    attribution = default_attribution(ctx.lm, params.attribution)
    if params.degeneracy.clusterer != "ntc":
        raise ValueError("the candidate-groups condition uses NTC groups: degeneracy.clusterer must be 'ntc'")
    with stage(ctx, "attribution"):
        kns = find_knowledge_neurons(
            ctx.lm, selection, fact.answer, attribution, t=params.t, p=params.p, store=ctx.store
        )
        jac = selection_jaccard(ctx, selection, fact.answer, attribution, params.t)
    cap = params.max_neurons
    neurons, scores = kns.neurons[:cap], kns.scores[:cap]
    with stage(ctx, "clustering + subset grid"):
        result = analyse(ctx.lm, selection[0], fact.answer, neurons, scores, params.degeneracy)
    groups = sorted({n for c in result.candidates for n in c.members})
    strict = sorted({n for g in result.dkn for n in g}) if result.degenerate else []
    seed = 1000 * ctx.seed
    with stage(ctx, "activations"):
        acts = mean_activations(ctx.lm, selection)
    sets = {
        DEGENERATE: strict,
        GROUPS: groups,
        KN: list(kns.neurons),
        KN_SUBSET: kn_subsets(kns.neurons, len(groups), params.random_seeds, seed),
        RANDOM: activation_matched_sets(groups, set(kns.neurons), acts, params.random_seeds, seed, params.match_pool),
    }
    return jsonable(
        {
            "sets": {c: _pairs(s) if c not in SEEDED else [_pairs(x) for x in s] for c, s in sets.items()},
            "kn_scores": list(kns.scores),
            "selection_prompts": selection,
            "evaluation_prompt": evaluation,
            "n_kn": len(kns.neurons),
            "capped": cap is not None and len(kns.neurons) > cap,
            "n_bdcs": len(result.candidates),
            "degenerate": bool(result.degenerate),
            "union_drop": result.union_drop,
            "jaccard": jac,
            "baseline": attribution.baseline,
        }
    )


def _pairs(neurons) -> list[list[int]]:
    return [[int(n[0]), int(n[1])] for n in neurons]


def kn_subsets(kns: Sequence[Neuron], size: int, n_seeds: int, seed: int) -> list[tuple[Neuron, ...]]:
    """Per seed, `size` knowledge neurons drawn without replacement (sorted); [] when there are none."""
    if not kns or size == 0:
        return []
    size = min(size, len(kns))
    out = []
    for s in range(n_seeds):
        rng = np.random.default_rng(seed + 101 + s)
        out.append(tuple(sorted(kns[int(i)] for i in rng.choice(len(kns), size=size, replace=False))))
    return out


def activation_matched_sets(
    target: Sequence[Neuron], exclude: set, acts: np.ndarray, n_seeds: int, seed: int, pool: int = 10
) -> list[tuple[Neuron, ...]]:
    """Per seed, one neuron per target neuron: same layer, not in `exclude` nor already drawn, drawn
    uniformly among the `pool` whose mean activation (acts: [n_layers, d_mlp]) is nearest to the target's."""
    if not target:
        return []
    excluded = {tuple(n) for n in exclude}
    out = []
    for s in range(n_seeds):
        rng = np.random.default_rng(seed + 202 + s)
        chosen: set[tuple[int, int]] = set()
        for n in sorted(target):
            layer = acts[n.layer]  # [d_mlp]
            order = np.argsort(np.abs(layer - layer[n.index]), kind="stable")
            free = [int(i) for i in order if (n.layer, int(i)) not in excluded and (n.layer, int(i)) not in chosen]
            if not free:
                continue
            pick = free[int(rng.integers(0, min(pool, len(free))))]
            chosen.add((n.layer, pick))
        out.append(tuple(Neuron(l, i) for l, i in sorted(chosen)))
    return out


@torch.inference_mode()
def mean_activations(lm, prompts: Sequence[str]) -> np.ndarray:
    """[n_layers, d_mlp] mean neuron activation over every position of `prompts`."""
    total = np.zeros((lm.n_layers, lm.d_mlp))
    count = 0
    for prompt in prompts:
        ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)  # [1, T]
        with record_neurons(lm) as rec:
            lm.model(input_ids=ids)
        hidden = torch.stack([rec[l][0] for l in range(lm.n_layers)]).float()  # [L, T, d_mlp]
        total += hidden.sum(1).cpu().numpy()
        count += hidden.shape[1]
    return total / max(count, 1)


def selection_jaccard(
    ctx, prompts: Sequence[str], answer: str, attribution: AttributionParams, t: float
) -> float | None:
    """Mean pairwise Jaccard index of the coarse knowledge-neuron sets of each selection prompt (cached
    attributions: no extra cost); None with fewer than two prompts."""
    if len(prompts) < 2:
        return None
    sets = [set(coarse_neurons(attribute(ctx.lm, q, answer, attribution, store=ctx.store).scores, t)) for q in prompts]
    return float(np.mean([jaccard(a, b) for a, b in itertools.combinations(sets, 2)]))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def condition_sets(record: dict) -> tuple[list[str], list[list[Neuron]]]:
    """(labels, neuron sets) to evaluate in one batch; seeded conditions get "name#seed" labels; "none" is the
    unchanged row of the intervention."""
    labels, sets = [], []
    for c in SET_CONDITIONS:
        value = record["sets"][c]
        if c in SEEDED:
            for i, s in enumerate(value):
                labels.append(f"{c}#{i}")
                sets.append(to_neurons(s))
        else:
            labels.append(c)
            sets.append(to_neurons(value))
    return labels, sets


def to_neurons(pairs) -> list[Neuron]:
    return [Neuron(int(l), int(i)) for l, i in pairs]


def by_condition(labels: Sequence[str], values: Sequence[Any], none_value: Any) -> dict:
    """{condition: v, seeded condition: [v per seed], "none": none_value} from per-set values."""
    out: dict = {c: ([] if c in SEEDED else None) for c in SET_CONDITIONS}
    out[NONE] = none_value
    for label, v in zip(labels, values):
        name, _, _ = label.partition("#")
        if name in SEEDED:
            out[name].append(v)
        else:
            out[name] = v
    return out


def condition_value(entry: dict, condition: str) -> float | None:
    """One number per fact and condition: seeded ones are averaged over their seeds (None when absent)."""
    v = entry.get(condition)
    if isinstance(v, list):
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else None
    return v


def per_seed(entry: dict, condition: str, fn: Callable) -> Any:
    """fn applied to a condition's value, per seed for seeded ones (None stays None)."""
    v = entry.get(condition)
    if isinstance(v, list):
        return [None if x is None else fn(x) for x in v]
    return None if v is None else fn(v)


def set_sizes(record: dict) -> dict[str, int]:
    """Neurons per condition (seeded: the first seed's set)."""
    sizes = {}
    for c in SET_CONDITIONS:
        v = record["sets"][c]
        sizes[c] = len(v[0]) if c in SEEDED and v else (0 if c in SEEDED else len(v))
    return sizes


# -- measures ------------------------------------------------------------------------------------------
def log_p(p: float | None) -> float | None:
    return None if p is None else math.log(max(float(p), LOG_FLOOR))


def log_ratio(a: float | None, b: float | None) -> float | None:
    """log a - log b (probabilities floored at LOG_FLOOR); None when either is missing."""
    if a is None or b is None:
        return None
    return log_p(a) - log_p(b)


def percent_from_log(r: float | None) -> float:
    """The relative change 100 * (P_a - P_b) / P_a that a log ratio r = log P_a - log P_b stands for;
    at most 100, finite for every finite r (NaN for None)."""
    if r is None or not math.isfinite(r):
        return float("nan")
    return 100.0 * -math.expm1(-r)


# -- statistics ----------------------------------------------------------------------------------------
def bootstrap_facts(values: Sequence[float | None], n_boot: int = 2000, seed: int = 0) -> dict:
    """Median and mean over the non-missing per-fact values with seeded 95% percentile bootstrap CIs
    (resampling facts, i.e. clustered by fact when each value already summarises one fact)."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return {
            "n": 0,
            "median": np.nan,
            "median_ci_low": np.nan,
            "median_ci_high": np.nan,
            "mean": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
        }
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, len(x), size=(n_boot, len(x)))]  # [n_boot, n]
    medians, means = np.median(draws, 1), draws.mean(1)
    return {
        "n": len(x),
        "median": float(np.median(x)),
        "median_ci_low": float(np.percentile(medians, 2.5)),
        "median_ci_high": float(np.percentile(medians, 97.5)),
        "mean": float(x.mean()),
        "ci_low": float(np.percentile(means, 2.5)),
        "ci_high": float(np.percentile(means, 97.5)),
    }


def bootstrap_mean(values: Sequence[float | None], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean (and median) with a 95% bootstrap CI of the mean over per-fact values; see `bootstrap_facts`."""
    return bootstrap_facts(values, n_boot, seed)


def bootstrap_groups(
    groups: Sequence[Sequence[Any]], stat: Callable[[list], float], n_boot: int = 1000, seed: int = 0
) -> dict:
    """stat over all rows, and a 95% CI from resampling the groups (facts) with replacement; seeded."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return {"n": 0, "value": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    rng = np.random.default_rng(seed)
    value = stat([r for g in groups for r in g])
    boots = [stat([r for j in rng.integers(0, len(groups), len(groups)) for r in groups[j]]) for _ in range(n_boot)]
    boots = [b for b in boots if b is not None and math.isfinite(b)]
    return {
        "n": len(groups),
        "value": value,
        "ci_low": float(np.percentile(boots, 2.5)) if boots else np.nan,
        "ci_high": float(np.percentile(boots, 97.5)) if boots else np.nan,
    }


def select_facts(ctx, facts, limit, include_unknown: bool, params: ConditionParams | None = None):
    """The facts to analyse: those the model answers (`known_facts`), or the first `limit` when
    `include_unknown` (tests and diagnostics).  With held-out evaluation, only facts with a paraphrase."""
    from dkn.experiments.runner import known_facts

    if params is not None and params.held_out:
        facts = [f for f in facts if len(f.prompts) >= 2]
    if include_unknown:
        return list(facts[:limit] if limit is not None else facts)
    return known_facts(ctx, facts, limit)


def with_prompts(params: ConditionParams, max_prompts: int) -> ConditionParams:
    return replace(params, max_prompts=max_prompts)


def ci_figure(
    table,
    x: str,
    title: str,
    yaxis: str,
    y: str = "median",
    low: str = "median_ci_low",
    high: str = "median_ci_high",
    facet: str | None = "mode",
):
    """Grouped bars of table[y] by condition with 95% CI error bars."""
    import plotly.express as px

    t = table.dropna(subset=[y]).copy()
    t["err_plus"] = t[high] - t[y]
    t["err_minus"] = t[y] - t[low]
    fig = px.bar(
        t,
        x=x,
        y=y,
        color="condition",
        barmode="group",
        facet_col=facet,
        error_y="err_plus",
        error_y_minus="err_minus",
        title=title,
        template="plotly_white",
        category_orders={"condition": list(CONDITIONS)},
    )
    fig.update_yaxes(title_text=yaxis)
    return fig
