"""Fact-checking with the neurons a relation's facts share.

Per relation (the first `max_relations` relations with at least `min_facts` facts the model
answers; `limit` facts in all, spread evenly over them), the facts are split, seeded, into
train / validation / test.  From the training facts (dkn.experiments.conditions, in-sample
on their own prompts: train and test are different facts):

- "candidate groups" / "knowledge neurons" / "degenerate components": neurons in that set for at
  least `share` (default half) of the training facts;
- "KN subset": random subsets of the shared knowledge neurons, as many as the shared candidate
  groups, one per seed;
- "random matched": as many non-shared neurons as the shared candidate groups, each in the same
  layer as and of similar mean activation (over the training prompts) to one of them, per seed.

A statement is a prompt plus a candidate answer: the fact's answer (true) or a wrong one
(TempLAMA's wrong facts through `fact.wrong_answers`, else another fact's answer from the same
relation, seeded).  Its score for a condition is the mean integrated-gradients attribution of
the condition's shared neurons for that candidate, averaged over the candidate's tokens
(`combine="mean"`: per token, so long candidates are not favoured).  A statement is judged
true when its score is above a threshold chosen on the validation statements (maximum F1),
pooled over relations by default (`threshold_scope="pooled"`: one threshold from every
relation's validation facts, not from 1-2 facts per relation); precision, recall and F1 are
measured on the test statements, with 95% bootstrap CIs over test facts.

Baselines: "ask": the model is asked f"{prompt} {candidate}. True or false? The statement is"
and says true when P(" true") > P(" false"); "ask (calibrated)": log P(true) - log P(false)
against a validation threshold; "answer probability": mean log P of the candidate's tokens
after the prompt, against a validation threshold; "always true".  The report says plainly
whether the neurons beat the answer probability, and how closely their score tracks it
(Spearman correlation on the test statements).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from dkn.attribution import attribute
from dkn.cache import make_key
from dkn.datasets import DatasetError
from dkn.experiments.conditions import (
    GROUPS,
    KN,
    SEEDED,
    SET_CONDITIONS,
    ConditionParams,
    activation_matched_sets,
    bootstrap_groups,
    default_attribution,
    jsonable,
    kn_subsets,
    mean_activations,
    neuron_conditions,
    to_neurons,
)
from dkn.experiments.runner import Context, Report, known_facts
from dkn.experiments.timing import stage
from dkn.interventions import intervene_many

NAME = "fact_checking"
NEURON_CONDITIONS = SET_CONDITIONS
FIXED = tuple(c for c in SET_CONDITIONS if c not in SEEDED)
BASELINES = ("ask", "ask (calibrated)", "answer probability", "always true")
ASK = "{prompt} {candidate}. True or false? The statement is"


@dataclass(frozen=True)
class Params:
    conditions: ConditionParams = field(default_factory=lambda: ConditionParams(held_out=False))
    max_prompts: int = 3  # prompts per training fact for its knowledge neurons (overrides conditions')
    threshold_scope: str = "pooled"  # "pooled": one threshold per condition from all validation facts; "relation"
    max_relations: int = 5
    min_facts: int = 3  # a relation needs train, validation and test facts
    train_share: float = 0.4  # per relation: share of facts for training, validation; the rest is test
    validation_share: float = 0.3
    share: float = 0.5  # a neuron is shared when in >= share of the training facts' sets
    n_wrong: int = 1  # wrong statements per fact
    max_checked: int = 100  # facts checked per relation for "the model answers it" (TempLAMA has thousands)
    include_unknown: bool = False  # tests/diagnostics: skip the "model answers it" filter
    bootstrap: int = 1000


# -- choosing and splitting facts ----------------------------------------------------------------------
def choose_relations(ctx: Context, facts, limit: int | None, params: Params) -> OrderedDict[str, list]:
    by_rel: OrderedDict[str, list] = OrderedDict()
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    per_rel = None if limit is None else max(params.min_facts, math.ceil(limit / params.max_relations))
    chosen: OrderedDict[str, list] = OrderedDict()
    for rel, rel_facts in by_rel.items():
        if len(rel_facts) < params.min_facts:
            continue
        if params.include_unknown:
            kept = rel_facts[:per_rel] if per_rel else list(rel_facts)
        else:
            try:
                kept = known_facts(ctx, rel_facts[: params.max_checked], per_rel)
            except DatasetError:
                continue
        if len(kept) >= params.min_facts:
            chosen[rel] = kept
            if len(chosen) >= params.max_relations:
                break
    if not chosen:
        raise DatasetError(
            f"fact checking needs at least {params.min_facts} facts the model answers in one relation "
            "(for train, validation and test); this dataset has none: choose another dataset or model"
        )
    return chosen


def split(rel: str, facts: list, params: Params, seed: int) -> dict[str, list]:
    order = list(facts)
    random.Random(f"{seed}|split|{rel}").shuffle(order)
    n = len(order)
    n_train = max(1, round(n * params.train_share))
    n_val = max(1, round(n * params.validation_share))
    n_train = min(n_train, n - n_val - 1)
    return {"train": order[:n_train], "validation": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def wrong_candidates(fact, pool: list[str], n: int, seed: int) -> list[str]:
    """TempLAMA-style wrong answers if the fact has them, else other answers of its relation (seeded)."""
    if fact.wrong_answers:
        return list(fact.wrong_answers[:n])
    own = {a.strip().lower() for a in fact.answers}
    others = sorted({a for a in pool if a.strip().lower() not in own})
    return random.Random(f"{seed}|wrong|{fact.id}").sample(others, min(n, len(others)))


# -- shared neurons ------------------------------------------------------------------------------------
def relation_sets(ctx: Context, train: list, records: list[dict], params: Params) -> dict:
    """The shared neuron sets of one relation (see the module docstring)."""
    shared = {c: shared_neurons(records, c, params.share) for c in FIXED}
    groups, kns = to_neurons(shared[GROUPS]), to_neurons(shared[KN])
    exclude = {tuple(n) for c in FIXED for n in shared[c]}
    seed, seeds = 1000 * ctx.seed, params.conditions.random_seeds
    with stage(ctx, "activations"):
        acts = mean_activations(ctx.lm, [q for f in train for q in f.prompts[: params.max_prompts]])
    seeded = {
        "KN subset": kn_subsets(kns, len(groups), seeds, seed),
        "random matched": activation_matched_sets(groups, exclude, acts, seeds, seed, params.conditions.match_pool),
    }
    return {**shared, **{c: [[list(n) for n in s] for s in v] for c, v in seeded.items()}}


def shared_neurons(records: list[dict], key: str, share: float) -> list[list[int]]:
    counts = Counter(tuple(n) for r in records for n in {tuple(x) for x in r["sets"][key]})
    need = share * len(records)
    return [list(n) for n in sorted(n for n, c in counts.items() if c >= need)] if records else []


# -- statements ----------------------------------------------------------------------------------------
def mean_score(scores: np.ndarray, neurons) -> float | None:
    if not neurons:
        return None
    return float(np.mean([scores[l, i] for l, i in neurons]))


def statement_record(ctx: Context, item: dict, sets: dict, params: Params) -> dict:
    prompt, candidate = item["prompt"], item["candidate"]
    with stage(ctx, "attribution"):
        attr = attribute(ctx.lm, prompt, candidate, statement_attribution(ctx.lm, params), store=ctx.store)
    scores = {
        c: [mean_score(attr.scores, x) for x in sets[c]] if c in SEEDED else mean_score(attr.scores, sets[c])
        for c in NEURON_CONDITIONS
    }
    question = ASK.format(prompt=prompt, candidate=candidate)
    try:
        p_true, _ = intervene_many(ctx.lm, question, "true", [], 1.0, "last")
        p_false, _ = intervene_many(ctx.lm, question, "false", [], 1.0, "last")
    except ValueError:  # a tokenizer without "true"/"false" (tiny test models): no ask baseline
        p_true = p_false = None
    logp = float(np.mean(np.log(np.maximum(attr.token_probs, 1e-30))))
    return jsonable({**item, "scores": scores, "p_true": p_true, "p_false": p_false, "answer_logprob": logp})


def statement_attribution(lm, params: Params):
    """The family-default attribution, averaged over the candidate's tokens (per-token scores)."""
    return replace(default_attribution(lm, params.conditions.attribution), combine="mean")


def baseline_scores(r: dict) -> dict:
    if r["p_true"] is None or r["p_false"] is None:
        ratio = None
    else:
        ratio = math.log(max(r["p_true"], 1e-30)) - math.log(max(r["p_false"], 1e-30))
    return {"ask (calibrated)": ratio, "answer probability": r["answer_logprob"]}


# -- thresholds and metrics ----------------------------------------------------------------------------
def best_threshold(scores: list, labels: list) -> float | None:
    """Threshold t (predict true when score > t) with the highest F1 on these statements."""
    pairs = [(s, y) for s, y in zip(scores, labels) if s is not None]
    if not pairs:
        return None
    values = sorted({s for s, _ in pairs})
    candidates = [values[0] - 1.0] + [(a + b) / 2 for a, b in itertools.pairwise(values)] + [values[-1]]
    return max(candidates, key=lambda t: f1([s > t for s, _ in pairs], [y for _, y in pairs]))


def prf(preds: list[bool], labels: list[bool]) -> tuple[float, float, float, float]:
    tp = sum(p and y for p, y in zip(preds, labels))
    fp = sum(p and not y for p, y in zip(preds, labels))
    fn = sum(y and not p for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(p == y for p, y in zip(preds, labels)) / len(labels) if labels else float("nan")
    return precision, recall, f, acc


def f1(preds, labels) -> float:
    return prf(preds, labels)[2]


def predictions(statements: list[dict], thresholds: dict) -> list[dict]:
    """Per test statement: {"fact", "label", "pred": {condition: bool or [bool per seed]}}."""
    rows = []
    for r in statements:
        th = thresholds[r["relation"]]
        pred = {}
        for c in NEURON_CONDITIONS:
            if c in SEEDED:
                pred[c] = [s is not None and t is not None and s > t for s, t in zip(r["scores"][c], th[c])]
            else:
                s, t = r["scores"][c], th[c]
                pred[c] = s is not None and t is not None and s > t
        pred["ask"] = r["p_true"] is not None and r["p_false"] is not None and r["p_true"] > r["p_false"]
        for c, s in baseline_scores(r).items():
            pred[c] = s is not None and th[c] is not None and s > th[c]
        pred["always true"] = True
        rows.append({"fact": r["fact"], "relation": r["relation"], "label": r["label"], "pred": pred})
    return rows


def choose_thresholds(validation: list[dict], n_seeds: int) -> dict:
    """condition -> threshold (seeded conditions: one per seed) with maximum F1 on these validation statements."""
    labels = [r["label"] for r in validation]
    th = {c: best_threshold([r["scores"][c] for r in validation], labels) for c in FIXED}
    for c in SEEDED:
        th[c] = [
            best_threshold([r["scores"][c][k] if k < len(r["scores"][c]) else None for r in validation], labels)
            for k in range(n_seeds)
        ]
    for c in ("ask (calibrated)", "answer probability"):
        th[c] = best_threshold([baseline_scores(r)[c] for r in validation], labels)
    return th


def metric(rows: list[dict], condition: str, which: int) -> float:
    labels = [r["label"] for r in rows]
    first = rows[0]["pred"][condition] if rows else None
    if isinstance(first, list):  # one prediction per random seed; a fact may have fewer seeds (or none)
        n_seeds = max(len(r["pred"][condition]) for r in rows)
        per_seed = []
        for k in range(n_seeds):
            have = [r for r in rows if len(r["pred"][condition]) > k]
            per_seed.append(prf([r["pred"][condition][k] for r in have], [r["label"] for r in have])[which])
        return float(np.mean(per_seed)) if per_seed else float("nan")
    return prf([r["pred"][condition] for r in rows], labels)[which]


# -- the experiment ------------------------------------------------------------------------------------
def run(ctx: Context, facts, params: Params, limit: int | None) -> Report:
    params = replace(params, conditions=replace(params.conditions, max_prompts=params.max_prompts))
    relations = choose_relations(ctx, facts, limit, params)
    pools = {rel: [f.answer for f in facts if f.relation == rel] for rel in relations}
    splits = {rel: split(rel, fs, params, ctx.seed) for rel, fs in relations.items()}
    train = [f for s in splits.values() for f in s["train"]]
    records = ctx.each("conditions", [(f.id, f) for f in train], lambda f: neuron_conditions(ctx, f, params.conditions))
    by_fact = {f.id: r for f, r in zip(train, records) if "error" not in r}
    sets = {
        rel: relation_sets(ctx, s["train"], [by_fact[f.id] for f in s["train"] if f.id in by_fact], params)
        for rel, s in splits.items()
    }

    statements = []
    for rel, s in splits.items():
        items = []
        for part in ("validation", "test"):
            for f in s[part]:
                cands = [(f.answer, True)] + [
                    (w, False) for w in wrong_candidates(f, pools[rel], params.n_wrong, ctx.seed)
                ]
                items += [
                    {"fact": f.id, "relation": rel, "split": part, "prompt": f.prompt, "candidate": c, "label": y}
                    for c, y in cands
                ]
        step = "statements-" + make_key(sets=sets[rel])[:10]  # new shared sets -> new scores
        done = ctx.each(
            step,
            [(f"{i['fact']}|{i['label']}|{i['candidate']}", i) for i in items],
            lambda i, rel=rel: statement_record(ctx, i, sets[rel], params),
        )
        statements += [r for r in done if "error" not in r]

    if params.threshold_scope not in ("pooled", "relation"):
        raise ValueError(f"threshold_scope must be 'pooled' or 'relation', not {params.threshold_scope!r}")
    validation = [r for r in statements if r["split"] == "validation"]
    seeds = params.conditions.random_seeds
    pooled = choose_thresholds(validation, seeds)
    thresholds = {
        rel: pooled
        if params.threshold_scope == "pooled"
        else choose_thresholds([r for r in validation if r["relation"] == rel], seeds)
        for rel in splits
    }
    test = predictions([r for r in statements if r["split"] == "test"], thresholds)
    table = results_table(test, params, ctx.seed)
    rel_table = relation_table(splits, sets, thresholds, statements)
    tracking = score_tracking([r for r in statements if r["split"] == "test"])
    summary = {
        "relations": list(splits),
        "n_test_statements": len(test),
        "n_validation_facts": len({r["fact"] for r in validation}),
        "n_test_true": sum(r["label"] for r in test),
        "table": table.to_dict("records"),
        "spearman_with_answer_probability": tracking,
    }
    return Report(
        jsonable(summary),
        tables={"fact_checking": table, "fact_checking_relations": rel_table},
        figures={"fact_checking": _figure(table)},
        markdown=_markdown(
            table, rel_table, test, [f for fs in relations.values() for f in fs], params, validation, tracking
        ),
    )


def results_table(test: list[dict], params: Params, seed: int) -> pd.DataFrame:
    groups: OrderedDict[str, list] = OrderedDict()
    for r in test:
        groups.setdefault(r["fact"], []).append(r)
    rows = []
    for c in NEURON_CONDITIONS + BASELINES:
        stats = {
            name: bootstrap_groups(list(groups.values()), lambda rs, c=c, k=k: metric(rs, c, k), params.bootstrap, seed)
            for k, name in enumerate(("precision", "recall", "F1", "accuracy"))
        }
        rows.append(
            {
                "condition": c,
                "test_statements": len(test),
                "test_facts": len(groups),
                "precision": stats["precision"]["value"],
                "recall": stats["recall"]["value"],
                "F1": stats["F1"]["value"],
                "F1_ci_low": stats["F1"]["ci_low"],
                "F1_ci_high": stats["F1"]["ci_high"],
                "accuracy": stats["accuracy"]["value"],
            }
        )
    return pd.DataFrame(rows)


def relation_table(splits, sets, thresholds, statements) -> pd.DataFrame:
    rows = []
    for rel, s in splits.items():
        rows.append(
            {
                "relation": rel,
                "train": len(s["train"]),
                "validation": len(s["validation"]),
                "test": len(s["test"]),
                "shared_candidate_groups": len(sets[rel][GROUPS]),
                "shared_KN": len(sets[rel][KN]),
                "shared_degenerate": len(sets[rel]["degenerate components"]),
                "threshold_candidate_groups": thresholds[rel][GROUPS],
                "threshold_KN": thresholds[rel][KN],
                "statements": sum(r["relation"] == rel for r in statements),
            }
        )
    return pd.DataFrame(rows)


def score_tracking(test: list[dict]) -> dict:
    """Spearman correlation of each fixed condition's score with the answer's mean log P, on test statements."""
    from scipy.stats import spearmanr

    out = {}
    for c in FIXED:
        pairs = [(r["scores"][c], r["answer_logprob"]) for r in test if r["scores"][c] is not None]
        if len(pairs) >= 3 and len({a for a, _ in pairs}) > 1 and len({b for _, b in pairs}) > 1:
            out[c] = float(spearmanr(*zip(*pairs)).statistic)
        else:
            out[c] = None
    return out


def _figure(table: pd.DataFrame):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_bar(
        x=table["condition"],
        y=table["F1"],
        name="F1",
        error_y={
            "type": "data",
            "symmetric": False,
            "array": table["F1_ci_high"] - table["F1"],
            "arrayminus": table["F1"] - table["F1_ci_low"],
        },
    )
    fig.add_bar(x=table["condition"], y=table["precision"], name="precision")
    fig.add_bar(x=table["condition"], y=table["recall"], name="recall")
    fig.update_layout(
        barmode="group",
        title="Fact-checking on test statements (F1 with 95% CI over facts)",
        template="plotly_white",
        yaxis_title="score",
    )
    return fig


def wrong_statement_source(chosen, params: Params) -> str:
    """Where the chosen facts' wrong statements come from, in words for the report."""
    with_wrong = sum(bool(f.wrong_answers) for f in chosen)
    if with_wrong:
        return (
            f"TempLAMA wrong facts (fact.wrong_answers) for {with_wrong} of {len(chosen)} facts, else another "
            "fact's answer from the same relation (seeded)"
        )
    return (
        "another fact's answer from the same relation (seeded); no chosen relation has TempLAMA wrong facts "
        f"(a relation needs {params.min_facts} facts the model answers among its first {params.max_checked})"
    )


def _markdown(table, rel_table, test, chosen, params: Params, validation, tracking) -> str:
    """The report; `chosen`: the facts of the chosen relations (where the wrong statements came from)."""
    n_true = sum(r["label"] for r in test)
    wrong_source = wrong_statement_source(chosen, params)
    rows = table.set_index("condition")
    n_val = len({r["fact"] for r in validation})
    scope = (
        "one threshold per condition from the validation statements of every relation pooled"
        if params.threshold_scope == "pooled"
        else "one threshold per relation from its own validation facts"
    )
    lines = [
        (
            f"Relations: {', '.join(rel_table['relation'])}. Test statements: {len(test)} ({n_true} true) over "
            f"{rows['test_facts'].iloc[0] if len(rows) else 0} facts; validation facts: {n_val}. Wrong statements: "
            f"{wrong_source}.\n"
        ),
        (
            "**Method.** Per relation, the facts the model answers were split (seeded) into train / validation / "
            "test. Shared neurons: those in a condition's set for at least half of the training facts (up to "
            f"{params.max_prompts} prompt(s) per training fact); `candidate groups`: members of the NTC candidate "
            "groups; `degenerate components`: strict DKNs (rarely any on small models); `KN subset`: random "
            "shared KNs, as many as the shared candidate groups; `random matched`: as many non-shared neurons, same "
            "layers, similar mean "
            "activation. A statement (prompt + candidate answer) is judged true when the mean integrated-gradients "
            "attribution of those neurons for the candidate, averaged per token (no length bias), is above a threshold "
            f"chosen for maximum F1 on the validation split ({scope}). A relation with no shared neurons judges every "
            "statement false.\n"
        ),
        (
            '**Baselines.** `ask`: the model reads "<prompt> <candidate>. True or false? The statement is" and '
            'we compare P(" true") with P(" false"); `ask (calibrated)`: the log ratio against a validation '
            "threshold; `answer probability`: mean log P of the candidate's tokens against a validation threshold; "
            "`always true`: the trivial classifier (its F1 is the floor to beat).\n"
        ),
        (
            "The paper reports fact-checking precision/recall/F1 for DKN vs baselines, but our reference "
            "(dkn-method.md section 6) gives no numbers for it, so none are shown beside ours.\n"
        ),
    ]
    lines.append(_verdict(rows, tracking) + "\n")
    for c in NEURON_CONDITIONS + BASELINES:
        if c in rows.index:
            r = rows.loc[c]
            lines.append(
                f"- {c}: F1 {r['F1']:.2f} [{r['F1_ci_low']:.2f}, {r['F1_ci_high']:.2f}], "
                f"precision {r['precision']:.2f}, recall {r['recall']:.2f}"
            )
    return "\n".join(lines) + "\n"


def _verdict(rows, tracking: dict) -> str:
    """One plain sentence: does the best neuron condition beat the answer-probability baseline?"""
    neuron = rows.loc[[c for c in NEURON_CONDITIONS if c in rows.index]].dropna(subset=["F1"])
    if "answer probability" not in rows.index or neuron.empty:
        return "**Verdict.** Not enough test statements to compare the neurons with the answer probability."
    best = neuron["F1"].idxmax()
    b, a = neuron.loc[best], rows.loc["answer probability"]
    if b["F1_ci_low"] > a["F1_ci_high"]:
        outcome = "beats"
    elif a["F1_ci_low"] > b["F1_ci_high"]:
        outcome = "loses to"
    else:
        outcome = "is not distinguishable from"
    rho = tracking.get(GROUPS)
    track = (
        f" The candidate-groups score tracks the answer probability (Spearman {rho:.2f} on test statements)."
        if rho is not None
        else ""
    )
    return (
        f"**Verdict.** The best neuron condition ({best}, F1 {b['F1']:.2f} [{b['F1_ci_low']:.2f}, "
        f"{b['F1_ci_high']:.2f}]) {outcome} the answer-probability baseline (F1 {a['F1']:.2f} "
        f"[{a['F1_ci_low']:.2f}, {a['F1_ci_high']:.2f}]); "
        + (
            "the neurons add nothing a plain P(candidate) does not give."
            if outcome != "beats"
            else "the neurons carry information beyond P(candidate)."
        )
        + track
    )
