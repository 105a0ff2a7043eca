"""Robustness, enhancement side: does amplifying the neurons bring a lost answer back?

Per fact the model answers (top-1 = the answer's first token on its held-out first prompt):
the seeded perturbations of robustness (same prompts, same seed; by default ones that keep
the question answerable), and for each perturbed prompt on which the model fails (top-1 is
no longer an answer's first token), each condition's neurons (dkn.experiments.conditions,
selected on paraphrases) amplified (factor 2) in two modes, "last" (activation values at the
answer position: the paper's "values") and "weights" (see dkn.interventions).

Measures, per perturbation, mode and condition, over the failing queries (one per fact and
perturbation, so resampling them resamples facts):

    recovered_% = 100 * (# failing perturbed queries whose top-1 is correct again) / (# failing)

(seeded conditions: per query, the share of seeds that recover it; "none": nothing amplified,
0 by construction, a check), mean with a seeded 95% bootstrap CI; and the bounded gain
g_c = log P_amplified,c - log P_none (P floored at 1e-30), median with a bootstrap CI, with
`P_change_%_of_median` = 100 * (exp(median g_c) - 1) beside it (finite; the old mean relative
change divided by a tiny P and exploded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dkn.experiments.conditions import (
    CONDITIONS,
    NONE,
    SEEDED,
    ConditionParams,
    bootstrap_facts,
    by_condition,
    ci_figure,
    condition_sets,
    condition_value,
    first_tokens,
    jsonable,
    log_ratio,
    neuron_conditions,
    set_sizes,
)
from dkn.experiments.perturb import KINDS
from dkn.experiments.robustness import PAPER_COLUMN, answered_records, conditions_text, perturbations
from dkn.experiments.runner import Context, Report
from dkn.experiments.timing import stage
from dkn.interventions import intervene_many_top1

NAME = "enhancement"
# accuracy (%) on perturbed queries the model failed, after amplifying: (DKN, KN, random)
PAPER = {
    ("gpt2", "last"): {"replace": (11.8, 1.2, 1.33), "add": (10.2, 3.8, 3.0), "delete": (2.11, 0.97, 0.72)},
    ("gpt2", "weights"): {"replace": (14.7, 12.6, 2.1), "add": (12, 9.22, 0.11), "delete": (10.2, 3.55, 1.66)},
    ("llama2", "last"): {"replace": (13.4, 3.55, 2.33), "add": (18.5, 11.22, 0.98), "delete": (19.1, 18.0, 4.3)},
    ("llama2", "weights"): {"replace": (13.1, 12.2, 2.02), "add": (19.6, 11, 3.9), "delete": (18.8, 3.8, 4.4)},
}


@dataclass(frozen=True)
class Params:
    conditions: ConditionParams = field(default_factory=ConditionParams)
    max_prompts: int = 3  # selection paraphrases per fact (overrides conditions')
    factor: float = 2.0
    modes: tuple[str, ...] = ("last", "weights")
    kinds: tuple[str, ...] = KINDS  # PAPER_KINDS for the paper's meaning-changing perturbations
    protect_subject: bool = True
    include_unknown: bool = False  # tests/diagnostics: skip the "model answers it" filter
    bootstrap: int = 2000


def amplified(ctx: Context, prompt: str, answers, labels, sets, factor: float, mode: str) -> dict:
    """{"correct": {condition: bool / [bool per seed]}, "prob": {...}} on `prompt` with each set amplified."""
    firsts = set(first_tokens(ctx.lm, prompt, answers))
    probs, top1 = intervene_many_top1(ctx.lm, prompt, answers[0], sets, factor, mode)
    ok = [bool(t in firsts) if len(s) else None for t, s in zip(top1[1:], sets)]
    ps = [float(p) if len(s) else None for p, s in zip(probs[1:], sets)]
    return {
        "correct": by_condition(labels, ok, bool(top1[0] in firsts)),
        "prob": by_condition(labels, ps, float(probs[0])),
    }


def fact_record(ctx: Context, fact, params: Params) -> dict:
    prompts = perturbations(ctx, fact, fact.prompts[0], params)
    cond = None
    queries = {}
    for kind, prompt in prompts.items():
        if prompt is None:
            continue
        firsts = set(first_tokens(ctx.lm, prompt, fact.answers))
        with stage(ctx, "interventions"):
            probs, top1 = intervene_many_top1(ctx.lm, prompt, fact.answer, [], 1.0, "last")
        entry = {"prompt": prompt, "fails": bool(top1[0] not in firsts), "prob": float(probs[0])}
        if entry["fails"]:
            if cond is None:  # attribution only for facts that fail somewhere
                cond = neuron_conditions(ctx, fact, params.conditions)
                labels, sets = condition_sets(cond)
            with stage(ctx, "interventions"):
                entry["amplified"] = {
                    m: amplified(ctx, prompt, fact.answers, labels, sets, params.factor, m) for m in params.modes
                }
        queries[kind] = entry
    return jsonable(
        {
            "fact": fact.id,
            "relation": fact.relation,
            "prompt": fact.prompts[0],
            "queries": queries,
            "n": set_sizes(cond) if cond else None,
            "jaccard": cond["jaccard"] if cond else None,
            "baseline": cond["baseline"] if cond else None,
            "capped": cond["capped"] if cond else None,
            "degenerate": cond["degenerate"] if cond else None,
        }
    )


def failing(records: list[dict], kind: str) -> list[dict]:
    return [r["queries"][kind] for r in records if r["queries"].get(kind, {}).get("fails")]


def run(ctx: Context, facts, params: Params, limit: int | None) -> Report:
    params, records = answered_records(ctx, NAME, facts, params, limit, fact_record)
    table = enhancement_table(records, params, ctx.seed)
    fails = pd.DataFrame(
        [
            {
                "perturbation": k,
                "facts": len(records),
                "perturbed_queries": sum(k in r["queries"] for r in records),
                "failing": len(failing(records, k)),
            }
            for k in params.kinds
        ]
    )
    summary = {"n_facts": len(records), "failing": fails.to_dict("records"), "table": table.to_dict("records")}
    figure = ci_figure(
        table,
        "perturbation",
        f"Robustness (enhancement): failing perturbed queries answered again after x{params.factor:g}",
        "accuracy recovered, % (95% CI)",
        y="recovered_%",
        low="ci_low",
        high="ci_high",
    )
    return Report(
        jsonable(summary),
        tables={"enhancement": table, "failing_queries": fails},
        figures={"enhancement": figure},
        markdown=_markdown(records, table, fails, params),
    )


def enhancement_table(records: list[dict], params: Params, seed: int) -> pd.DataFrame:
    rows = []
    for kind in params.kinds:
        queries = failing(records, kind)
        for mode in params.modes:
            for c in CONDITIONS:
                correct = [condition_value(q["amplified"][mode]["correct"], c) for q in queries]
                correct = [None if v is None else 100.0 * float(v) for v in correct]
                gain = [query_gain(q["amplified"][mode]["prob"], c) for q in queries]
                acc, g = bootstrap_facts(correct, params.bootstrap, seed), bootstrap_facts(gain, params.bootstrap, seed)
                row = {
                    "perturbation": kind,
                    "mode": mode,
                    "condition": c,
                    "failing_queries": acc["n"],
                    "recovered_%": acc["mean"],
                    "ci_low": acc["ci_low"],
                    "ci_high": acc["ci_high"],
                    "median_log_gain": g["median"],
                    "gain_ci_low": g["median_ci_low"],
                    "gain_ci_high": g["median_ci_high"],
                    "P_change_%_of_median": 100 * math.expm1(g["median"]) if g["n"] else np.nan,
                }
                for model in ("gpt2", "llama2"):
                    paper = PAPER.get((model, mode), {}).get(kind)
                    i = PAPER_COLUMN.get(c)
                    row[f"paper_{model}_%"] = float(paper[i]) if paper and i is not None and i < 3 else np.nan
                rows.append(row)
    return pd.DataFrame(rows)


def query_gain(probs: dict, condition: str) -> float | None:
    """log P(answer) with the condition amplified minus with nothing amplified (seeded: mean over seeds)."""
    if condition in SEEDED:
        return condition_value({condition: [log_ratio(p, probs[NONE]) for p in probs[condition]]}, condition)
    return log_ratio(probs[condition], probs[NONE])


def _markdown(records, table, fails, params: Params) -> str:
    n = len(records)
    with_cond = [r for r in records if r["n"] is not None]
    lines = [
        f"Facts the model answers: {n}. Their held-out first prompts were perturbed as in the robustness experiment "
        f"(same seeds; kinds: {', '.join(params.kinds)}; never the last word or the subject). Failing perturbed "
        "queries (top-1 no longer an answer's first token): "
        + ", ".join(f"{r['perturbation']} {r['failing']}/{r['perturbed_queries']}" for r in fails.to_dict("records"))
        + ".\n",
        (
            f"**Measure.** On each failing query, each condition's neurons were amplified x{params.factor:g} "
            "(`last`: activations at the answer position, the paper's *values*; `weights`: see dkn.interventions); "
            "`recovered_%` = share of failing queries whose top-1 is an answer's first token again (seeded conditions: "
            "share of seeds, per query), mean with a seeded 95% bootstrap CI over failing queries (one per fact). "
            "`median_log_gain` = median of log P_amplified,c - log P_none (bounded; CI by bootstrap over facts); "
            "`P_change_%_of_median` = 100 * (exp(median gain) - 1), the relative change it stands for.\n"
        ),
        conditions_text(with_cond, params.conditions),
        (
            "The paper's accuracies (GPT-2, LLaMA2-7b; their DKN / KN / random beside our candidate groups / knowledge "
            "neurons / random matched, on the paper's perturbations) are beside ours. With few failing queries the "
            "CIs are wide.\n"
        ),
    ]
    for mode in params.modes:
        for kind in params.kinds:
            cells = table[(table["mode"] == mode) & (table["perturbation"] == kind)].to_dict("records")
            text = ", ".join(
                f"{r['condition']} {r['recovered_%']:.1f}% [{r['ci_low']:.1f}, {r['ci_high']:.1f}]"
                for r in cells
                if r["failing_queries"]
            )
            lines.append(f"- {kind} ({mode}): {text or 'no failing queries'}")
    return "\n".join(lines) + "\n"
