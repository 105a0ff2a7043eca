"""Robustness, suppression side: do the neurons make the answer robust to a perturbed query?

Per fact the model answers: its neuron conditions (dkn.experiments.conditions: selected on
paraphrases, measured on the held-out prompts[0]), seeded perturbations of that prompt
(dkn.experiments.perturb: by default ones that keep the question answerable, a typo, a filler
word, a synonym; the paper's replace / add / delete with `kinds=replace,add,delete`), and
P(answer) on the normal and each perturbed prompt with each condition's neurons suppressed
(factor 0), in two modes: "last" (activation values at the answer position, the paper's
"values") and "weights" (see dkn.interventions).

The measure, per fact, perturbation, mode and condition c (bounded: no division by a tiny P):

    r_c = log P_normal,c - log P_perturbed,c          (P floored at 1e-30)

P_x,c = P(answer) on prompt x with c's neurons suppressed ("none": nothing suppressed; seeded
conditions: r averaged over the seeds).  Positive: the perturbation lowers P(answer).  If c's
neurons carry the robustness, suppressing them makes the perturbation hurt more: the paired
difference r_c - r_none (same fact) is positive.  Reported: medians over facts with seeded 95%
bootstrap intervals (resampling facts), and, for reading beside the paper, the relative change
that the median log ratio stands for, 100 * (1 - exp(-median r_c)) (always finite, at most 100).
The perturbation's own cost is r_none and the share of perturbed prompts still answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from dkn.evaluate import answers_correctly
from dkn.experiments.conditions import (
    CONDITIONS,
    NONE,
    SEEDED,
    SET_CONDITIONS,
    ConditionParams,
    bootstrap_facts,
    by_condition,
    ci_figure,
    condition_sets,
    condition_value,
    jsonable,
    log_ratio,
    neuron_conditions,
    percent_from_log,
    select_facts,
    set_sizes,
)
from dkn.experiments.perturb import KINDS, PAPER_KINDS, check_kinds, perturb_all
from dkn.experiments.runner import Context, Report
from dkn.experiments.timing import stage
from dkn.interventions import intervene_many

NAME = "robustness"
# answer-probability change in %, perturbed vs normal query, under suppression: (DKN, KN, random, none)
PAPER = {
    ("gpt2", "last"): {"replace": (47, 32, 11, 2.6), "add": (30, 22, 3, 5), "delete": (39, 33, 8, -2)},
    ("gpt2", "weights"): {"replace": (38, 22, 2, 3), "add": (19, 18, 5, 4), "delete": (34, 29, 4, 4)},
    ("llama2", "last"): {"replace": (77, 44, 5, 1.76), "add": (12, 16, 3, 0.88), "delete": (65, 50, 4, 3.5)},
    ("llama2", "weights"): {"replace": (45, 22, 2, 3), "add": (18, 11, 3.9, 2), "delete": (77, 33, 3.8, 4.4)},
}
# our condition -> the paper's column (the paper's "DKN" is our candidate groups in practice)
PAPER_COLUMN = {"candidate groups": 0, "knowledge neurons": 1, "random matched": 2, "none": 3}


@dataclass(frozen=True)
class Params:
    conditions: ConditionParams = field(default_factory=ConditionParams)
    max_prompts: int = 3  # selection paraphrases per fact (overrides conditions')
    modes: tuple[str, ...] = ("last", "weights")
    kinds: tuple[str, ...] = KINDS  # PAPER_KINDS for the paper's meaning-changing perturbations
    protect_subject: bool = True
    include_unknown: bool = False  # tests/diagnostics: skip the "model answers it" filter
    bootstrap: int = 2000


def perturbations(ctx: Context, fact, prompt: str, params) -> dict:
    protect = [fact.subject] if params.protect_subject and fact.subject else []
    return perturb_all(prompt, seed=f"{ctx.seed}|{fact.id}", protect=protect, answers=fact.answers, kinds=params.kinds)


def suppressed_probs(ctx: Context, prompt: str, answer: str, labels, sets, mode: str) -> dict:
    """{condition: P, seeded condition: [P per seed], "none": P}, None for an empty set."""
    p0, probs = intervene_many(ctx.lm, prompt, answer, sets, 0.0, mode)
    values = [float(p) if len(s) else None for p, s in zip(probs, sets)]
    return by_condition(labels, values, float(p0))


def fact_record(ctx: Context, fact, params: Params) -> dict:
    cond = neuron_conditions(ctx, fact, params.conditions)
    labels, sets = condition_sets(cond)
    prompt = cond["evaluation_prompt"]
    prompts = perturbations(ctx, fact, prompt, params)
    with stage(ctx, "interventions"):
        probs = {"normal": {m: suppressed_probs(ctx, prompt, fact.answer, labels, sets, m) for m in params.modes}}
        correct = {}
        for kind, perturbed in prompts.items():
            if perturbed is None:
                continue
            probs[kind] = {m: suppressed_probs(ctx, perturbed, fact.answer, labels, sets, m) for m in params.modes}
            correct[kind] = answers_correctly(ctx.lm, perturbed, fact.answers)
    return jsonable(
        {
            "fact": fact.id,
            "relation": fact.relation,
            "prompt": prompt,
            "perturbed": prompts,
            "perturbed_correct": correct,
            "probs": probs,
            "n": set_sizes(cond),
            "n_kn": cond["n_kn"],
            "selection_prompts": cond["selection_prompts"],
            "jaccard": cond["jaccard"],
            "baseline": cond["baseline"],
            "degenerate": cond["degenerate"],
            "capped": cond["capped"],
        }
    )


def fact_log_ratios(record: dict, kind: str, mode: str) -> dict:
    """condition -> r = log P_normal - log P_perturbed for one fact (seeded: mean over seeds)."""
    if kind not in record["probs"]:
        return dict.fromkeys(CONDITIONS)
    normal, pert = record["probs"]["normal"][mode], record["probs"][kind][mode]
    out = {}
    for c in CONDITIONS:
        if c in SEEDED:
            out[c] = condition_value({c: [log_ratio(a, b) for a, b in zip(normal[c], pert[c])]}, c)
        else:
            out[c] = log_ratio(normal[c], pert[c])
    return out


def answered_records(ctx: Context, name: str, facts, params, limit: int | None, fact_record) -> tuple:
    """(params with their `max_prompts` passed to the selection and their kinds checked, the records
    `fact_record(ctx, fact, params)` of the facts the model answers, failed ones dropped): the first stage
    of robustness and of enhancement."""
    params = replace(
        params, conditions=replace(params.conditions, max_prompts=params.max_prompts), kinds=check_kinds(params.kinds)
    )
    facts = select_facts(ctx, facts, limit, params.include_unknown, params.conditions)
    records = ctx.each(name, [(f.id, f) for f in facts], lambda f: fact_record(ctx, f, params))
    return params, [r for r in records if "error" not in r]


def run(ctx: Context, facts, params: Params, limit: int | None) -> Report:
    params, records = answered_records(ctx, NAME, facts, params, limit, fact_record)
    table = robustness_table(records, params, ctx.seed)
    cost = perturbation_cost_table(records, params, ctx.seed)
    suppression = suppression_table(records, params, ctx.seed)
    summary = {
        "n_facts": len(records),
        "table": table.to_dict("records"),
        "perturbation_cost": cost.to_dict("records"),
        "strict_dkn_facts": sum(r["degenerate"] for r in records),
        "facts_without_groups": sum(r["n"]["candidate groups"] == 0 for r in records),
        "mean_selection_jaccard": _mean([r["jaccard"] for r in records]),
    }
    figure = ci_figure(
        table,
        "perturbation",
        "Robustness (suppression): log P_normal - log P_perturbed, minus none",
        "median paired log ratio (95% CI over facts)",
        y="minus_none_median",
        low="minus_none_ci_low",
        high="minus_none_ci_high",
    )
    return Report(
        jsonable(summary),
        tables={"robustness": table, "perturbation_cost": cost, "suppression_effect": suppression},
        figures={"robustness": figure},
        markdown=_markdown(records, table, cost, params),
    )


def robustness_table(records: list[dict], params: Params, seed: int) -> pd.DataFrame:
    rows = []
    for kind in params.kinds:
        for mode in params.modes:
            per_fact = [fact_log_ratios(r, kind, mode) for r in records]
            for c in CONDITIONS:
                stats = bootstrap_facts([f[c] for f in per_fact], params.bootstrap, seed)
                paired = bootstrap_facts(
                    [None if f[c] is None or f[NONE] is None else f[c] - f[NONE] for f in per_fact],
                    params.bootstrap,
                    seed,
                )
                row = {
                    "perturbation": kind,
                    "mode": mode,
                    "condition": c,
                    "facts": stats["n"],
                    "median_log_ratio": stats["median"],
                    "median_ci_low": stats["median_ci_low"],
                    "median_ci_high": stats["median_ci_high"],
                    "minus_none_median": paired["median"],
                    "minus_none_ci_low": paired["median_ci_low"],
                    "minus_none_ci_high": paired["median_ci_high"],
                    "change_%_of_median": percent_from_log(stats["median"]),
                }
                for model in ("gpt2", "llama2"):
                    paper = PAPER.get((model, mode), {}).get(kind)
                    i = PAPER_COLUMN.get(c)
                    row[f"paper_{model}_%"] = float(paper[i]) if paper and i is not None else np.nan
                rows.append(row)
    return pd.DataFrame(rows)


def perturbation_cost_table(records: list[dict], params: Params, seed: int) -> pd.DataFrame:
    """What each perturbation alone costs (nothing suppressed): r_none and the share still answered."""
    rows = []
    for kind in params.kinds:
        for mode in params.modes[:1]:  # "none" is the same row in every mode
            stats = bootstrap_facts([fact_log_ratios(r, kind, mode)[NONE] for r in records], params.bootstrap, seed)
            answered = [float(r["perturbed_correct"][kind]) for r in records if kind in r["perturbed_correct"]]
            rows.append(
                {
                    "perturbation": kind,
                    "facts": stats["n"],
                    "median_log_ratio": stats["median"],
                    "median_ci_low": stats["median_ci_low"],
                    "median_ci_high": stats["median_ci_high"],
                    "change_%_of_median": percent_from_log(stats["median"]),
                    "still_answered_%": 100 * _mean(answered),
                }
            )
    return pd.DataFrame(rows)


def suppression_table(records: list[dict], params: Params, seed: int) -> pd.DataFrame:
    """Context: how much suppressing each condition lowers P(answer) on the normal prompt
    (log P_none - log P_c, median over facts) and how many neurons it has."""
    rows = []
    for mode in params.modes:
        for c in SET_CONDITIONS:
            drops = []
            for r in records:
                p = r["probs"]["normal"][mode]
                drops.append(
                    condition_value(
                        {c: [log_ratio(p[NONE], v) for v in p[c]]} if c in SEEDED else {c: log_ratio(p[NONE], p[c])}, c
                    )
                )
            stats = bootstrap_facts(drops, params.bootstrap, seed)
            rows.append(
                {
                    "mode": mode,
                    "condition": c,
                    "facts": stats["n"],
                    "median_log_drop": stats["median"],
                    "median_ci_low": stats["median_ci_low"],
                    "median_ci_high": stats["median_ci_high"],
                    "drop_%_of_median": percent_from_log(stats["median"]),
                    "mean_neurons": _mean([r["n"][c] for r in records if r["n"][c]]),
                }
            )
    return pd.DataFrame(rows)


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def conditions_text(records: list[dict], params: ConditionParams) -> str:
    """The shared paragraph saying what each condition is, how neurons were selected and on what."""
    n = len(records)
    strict = sum(bool(r.get("degenerate")) for r in records)
    capped = sum(bool(r.get("capped")) for r in records)
    baselines = sorted({r["baseline"] for r in records if r.get("baseline")})
    jac = _mean([r.get("jaccard") for r in records])
    where = (
        "selected on up to {k} paraphrase(s) (prompts[1:]) and measured on the held-out first prompt"
        if params.held_out
        else "selected and measured on the same prompts (in-sample: held_out=false)"
    )
    cap = (
        "every refined knowledge neuron went into the NTC graph"
        if params.max_neurons is None
        else f"the strongest {params.max_neurons} knowledge neurons went into the NTC graph ({capped} of {n} facts "
        "had more and were clipped)"
    )
    return (
        f"**Conditions.** Neurons were {where.format(k=params.max_prompts)}; {cap}; integrated-gradients baseline: "
        f"{', '.join(baselines) or 'n/a'} (the family default: AMIG after a post-MLP norm, zero otherwise). "
        f"`degenerate components`: the strict DKN, only for facts that pass the degeneracy test ({strict} of {n}); "
        "`candidate groups`: all members of the NTC candidate groups (what the paper's scripts call DKN); "
        "`knowledge neurons`: all refined KNs (t = 0.2, p = 0.5); `KN subset`: random KNs, as many as the "
        f"candidate groups ({params.random_seeds} seeds); `random matched`: as many non-KN neurons, each in the same "
        f"layer as and among the {params.match_pool} nearest by mean activation to a candidate-group neuron "
        f"({params.random_seeds} seeds); `none`: nothing changed. Selection stability: mean pairwise Jaccard of "
        f"the per-paraphrase coarse KN sets = {jac:.2f}.\n"
    )


def _markdown(records: list[dict], table: pd.DataFrame, cost: pd.DataFrame, params: Params) -> str:
    n = len(records)
    kinds = ", ".join(params.kinds)
    paper_kinds = set(params.kinds) <= set(PAPER_KINDS)
    lines = [
        f"Facts the model answers: {n}. Perturbations of the evaluation prompt (seeded; the last word and the "
        f"subject's words are kept): {kinds}"
        + (" (the paper's meaning-changing kinds)." if paper_kinds else " (the question stays answerable)."),
        "",
        (
            "**Measure.** Per fact, perturbation, mode and condition c: `r_c = log P_normal,c - log P_perturbed,c`, "
            "P(answer) measured with c's neurons suppressed (`last`: activations at the answer position set to 0, the "
            "paper's *values*; `weights`: see dkn.interventions) on both prompts, floored at 1e-30. Positive: the "
            "perturbation lowers P(answer). `minus_none_median`: median over facts of the paired `r_c - r_none`; it is "
            "above 0 when suppressing c makes the perturbation hurt more (c carries robustness). Medians with seeded "
            "95% bootstrap intervals over facts; seeded conditions are averaged over their seeds per fact. "
            "`change_%_of_median` = 100 * (1 - exp(-median r_c)): the paper's relative change that the median log "
            "ratio stands for (finite, at most 100); the old per-fact ratio 100 * (P_n - P_p) / P_n is not averaged "
            "any more (it divides by P ~ 1e-3 after suppression and exploded)."
        ),
        "",
        conditions_text(records, params.conditions),
        (
            "The paper's numbers (GPT-2 and LLaMA2-7b, from the authors' plotting scripts, their DKN / KN / random / "
            "none beside our candidate groups / knowledge neurons / random matched / none) are relative changes of "
            "the mean, on the paper's perturbations; compare orderings, not magnitudes.\n"
        ),
        "**Each perturbation's own cost** (nothing suppressed): "
        + "; ".join(
            f"{r['perturbation']}: median r {r['median_log_ratio']:.3f} "
            f"[{r['median_ci_low']:.3f}, {r['median_ci_high']:.3f}] ({r['change_%_of_median']:.1f}% of P), "
            f"still answered {r['still_answered_%']:.0f}%"
            for r in cost.to_dict("records")
            if r["facts"]
        )
        + ".\n",
    ]
    key = table[table["mode"] == params.modes[0]]
    for kind in params.kinds:
        cells = key[(key["perturbation"] == kind) & (key["condition"] != NONE)]
        text = ", ".join(
            f"{r['condition']} {r['minus_none_median']:.3f} [{r['minus_none_ci_low']:.3f}, "
            f"{r['minus_none_ci_high']:.3f}]"
            for r in cells.to_dict("records")
            if r["facts"]
        )
        lines.append(f"- {kind} ({params.modes[0]}), median r_c - r_none: {text or 'no data'}")
    return "\n".join(lines) + "\n"
