"""What the robustness, enhancement and fact-checking experiments share.

The four conditions of the paper, per fact:

- "KN": the refined knowledge neurons: `find_knowledge_neurons` over up to 3 of the fact's
  prompts, default `AttributionParams`, t = 0.2, p = 0.5 (the acquisition experiment's
  settings, so the attribution cache in the ResultStore is shared);
- "DKN": the members of the NTC candidate groups (BDCs) of the strongest `max_neurons`
  knowledge neurons (`analyse(..., DegeneracyParams(clusterer="ntc"))`).  When the fact
  passes the strict degeneracy test, its DKN's groups (`result.dkn`) are used instead;
  small models rarely pass it, so most facts use the NTC groups (recorded as `dkn_source`);
- "random": as many neurons as DKN, in the same layers, none of them a knowledge neuron,
  one set per seed (`random_matched_sets`);
- "none": no neurons.

Records are JSON-native (lists, floats, str keys, None for NaN) because `Context.each`
stores them as exact JSON.  Also: seeded bootstrap confidence intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dkn.attribution import AttributionParams
from dkn.degeneracy import DegeneracyParams, analyse, random_matched_sets
from dkn.jsonsafe import jsonable
from dkn.neurons import Neuron
from dkn.query import first_answer_tokens as first_tokens  # noqa: F401  (re-exported, as above)
from dkn.selection import find_knowledge_neurons

CONDITIONS = ("DKN", "KN", "random", "none")
SET_CONDITIONS = ("DKN", "KN", "random")      # the ones with neurons


@dataclass(frozen=True)
class ConditionParams:
    max_prompts: int = 3
    t: float = 0.2
    p: float = 0.5
    max_neurons: int = 40              # strongest refined neurons that go into the NTC graph (as acquisition)
    random_seeds: int = 3
    degeneracy: DegeneracyParams = field(default_factory=lambda: DegeneracyParams(clusterer="ntc", random_seeds=0))
    attribution: AttributionParams = field(default_factory=AttributionParams)


def neuron_conditions(ctx, fact, params: ConditionParams) -> dict:
    """JSON record: {"KN": [[layer, index], ...], "DKN": [...], "random": [[...] per seed], "dkn_source",
    "n_bdcs", "degenerate", "kn_scores"}."""
    prompts = list(fact.prompts[: params.max_prompts])
    kns = find_knowledge_neurons(ctx.lm, prompts, fact.answer, params.attribution, t=params.t, p=params.p,
                                 store=ctx.store)
    neurons, scores = kns.neurons[: params.max_neurons], kns.scores[: params.max_neurons]
    deg = params.degeneracy
    if deg.clusterer != "ntc":
        raise ValueError("the DKN condition uses NTC groups: degeneracy.clusterer must be 'ntc'")
    result = analyse(ctx.lm, prompts[0], fact.answer, neurons, scores, deg)
    if result.degenerate:
        groups, source = result.dkn, "strict DKN"
    else:
        groups, source = tuple(c.members for c in result.candidates), "NTC groups"
    dkn = sorted({n for g in groups for n in g})
    randoms = random_matched_sets(ctx.lm, dkn, set(kns.neurons), params.random_seeds, seed=1000 * ctx.seed)
    return jsonable({
        "KN": [list(n) for n in kns.neurons], "kn_scores": list(kns.scores),
        "DKN": [list(n) for n in dkn], "random": [[list(n) for n in s] for s in randoms],
        "dkn_source": source if dkn else "none found", "n_bdcs": len(groups),
        "degenerate": bool(result.degenerate), "union_drop": result.union_drop,
    })


def neuron_sets(record: dict) -> tuple[list[str], list[list[Neuron]]]:
    """(labels, neuron sets) to evaluate in one batch: DKN, KN, random#0..; "none" is the unchanged row."""
    labels, sets = ["DKN", "KN"], [to_neurons(record["DKN"]), to_neurons(record["KN"])]
    for i, s in enumerate(record["random"]):
        labels.append(f"random#{i}")
        sets.append(to_neurons(s))
    return labels, sets


def to_neurons(pairs) -> list[Neuron]:
    return [Neuron(int(l), int(i)) for l, i in pairs]


def by_condition(labels: Sequence[str], values: Sequence[Any], none_value: Any) -> dict:
    """{"DKN": v, "KN": v, "random": [v per seed], "none": none_value} from per-set values."""
    out: dict = {"DKN": None, "KN": None, "random": [], "none": none_value}
    for label, v in zip(labels, values):
        if label.startswith("random#"):
            out["random"].append(v)
        else:
            out[label] = v
    return out


def condition_value(entry: dict, condition: str) -> float | None:
    """One number per fact and condition: random is averaged over its seeds (None when absent)."""
    v = entry.get(condition)
    if isinstance(v, list):
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else None
    return v


def bootstrap_mean(values: Sequence[float | None], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean and 95% percentile bootstrap CI over the non-missing values (one per fact); seeded."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return {"n": 0, "mean": np.nan, "ci_low": np.nan, "ci_high": np.nan, "median": np.nan}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    return {"n": int(len(x)), "mean": float(x.mean()), "ci_low": float(np.percentile(means, 2.5)),
            "ci_high": float(np.percentile(means, 97.5)), "median": float(np.median(x))}


def bootstrap_groups(groups: Sequence[Sequence[Any]], stat: Callable[[list], float], n_boot: int = 1000,
                     seed: int = 0) -> dict:
    """stat over all rows, and a 95% CI from resampling the groups (facts) with replacement; seeded."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return {"n": 0, "value": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    rng = np.random.default_rng(seed)
    value = stat([r for g in groups for r in g])
    boots = [stat([r for j in rng.integers(0, len(groups), len(groups)) for r in groups[j]]) for _ in range(n_boot)]
    boots = [b for b in boots if b is not None and math.isfinite(b)]
    return {"n": len(groups), "value": value,
            "ci_low": float(np.percentile(boots, 2.5)) if boots else np.nan,
            "ci_high": float(np.percentile(boots, 97.5)) if boots else np.nan}


def select_facts(ctx, facts, limit, include_unknown: bool):
    """The facts to analyse: those the model answers (`known_facts`), or the first `limit` when
    `include_unknown` (tests and diagnostics)."""
    from dkn.experiments.runner import known_facts

    if include_unknown:
        return list(facts[:limit] if limit is not None else facts)
    return known_facts(ctx, facts, limit)


def ci_figure(table, x: str, title: str, yaxis: str, facet: str | None = "mode"):
    """Grouped bars of table["mean"] by condition with 95% CI error bars."""
    import plotly.express as px

    t = table.dropna(subset=["mean"]).copy()
    t["err_plus"] = t["ci_high"] - t["mean"]
    t["err_minus"] = t["mean"] - t["ci_low"]
    fig = px.bar(t, x=x, y="mean", color="condition", barmode="group", facet_col=facet,
                 error_y="err_plus", error_y_minus="err_minus", title=title, template="plotly_white",
                 category_orders={"condition": list(CONDITIONS)})
    fig.update_yaxes(title_text=yaxis)
    return fig
