"""Experiment 5, evolvability: learning new facts through DKN neurons only.

Facts: a seeded shuffle of the dataset is walked once; facts the model does NOT
answer (top-1 is not the first answer token after the first prompt) and that have
at least one paraphrase become the new facts (up to `limit`, else `n_new`); facts
it answers become the old facts (up to `n_old`, default as many as new ones).
Every condition uses these same facts.

Neurons, found on the model before any training, per new fact (the shared
definitions of dkn.experiments.conditions), then unioned over the new facts:
- "DKN": members of the NTC candidate groups of the fact's knowledge neurons;
- "KN": all refined knowledge neurons;
- "random": as many neurons as the DKN union, in the same layers, none a KN;
- "all": every weight.
By default the neurons are attributed on the training prompt only (`max_prompts=1`),
so that the paraphrases used for Q_au stay unseen by both training and selection.

Training: each condition starts from a fresh deep copy of the original weights
(the authors' scripts trained the DKN model for "only KN" and "only random");
Adam on the condition's weights (dkn.finetune: the neurons' input and output
weight vectors, every other entry bit-identical), same steps, lr and seed for all,
on the first prompt of each new fact.  Measured (top-1 = first answer token):
- Q_new: the new facts' training prompts;
- Q_old: the old facts' first prompts (all 100% before training, by selection);
- Q_au: the new facts' other prompts (paraphrases never trained on).
"none" is the model before training.  95% bootstrap intervals over prompts.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dkn.cache import make_key
from dkn.datasets import DatasetError
from dkn.degeneracy import random_matched_sets
from dkn.evaluate import answers_correctly, answers_correctly_many
from dkn.experiments.conditions import ConditionParams, bootstrap_mean, jsonable, neuron_conditions, to_neurons
from dkn.experiments.runner import Context, Report
from dkn.finetune import fresh_copy, train_neurons
from dkn.models import fingerprint
from dkn.neurons import Neuron

NAME = "evolvability"
TRAINED = ("DKN", "KN", "random", "all")
CONDITIONS = ("none",) + TRAINED
METRICS = ("Q_new", "Q_old", "Q_au")
# Section 6 of the method notes (the authors' plotting scripts): only-DKN, only-KN, only-random, all.
PAPER = {
    "GPT-2": {"Q_new": (88, 83, 43, 93), "Q_old": (83, 86, 71, 49), "Q_au": (86, 82, 38, 91)},
    "LLaMA2-7b": {"Q_new": (98, 95, 78, 99), "Q_old": (93, 91, 88, 66), "Q_au": (97, 92, 71, 99)},
}


@dataclass(frozen=True)
class Params:
    n_new: int = 60                    # new facts when no limit is given (a limit overrides it)
    n_old: int | None = None           # old facts for Q_old; None: as many as new facts
    conditions: tuple[str, ...] = TRAINED
    steps: int = 20                    # optimiser steps of `batch_size` facts: 20 x 12 = 4 epochs over 60
    lr: float = 1e-3
    batch_size: int | None = 12        # None: all new facts in every step
    neurons: ConditionParams = field(default_factory=lambda: ConditionParams(max_prompts=1, random_seeds=0))

    @classmethod
    def full(cls) -> "Params":
        """GPU-size settings: more facts and steps, minibatches."""
        return cls(n_new=300, steps=300, lr=5e-4, batch_size=32)


def run(ctx: Context, facts, params: Params, limit: int | None) -> Report:
    unknown = [c for c in params.conditions if c not in TRAINED]
    if unknown:
        raise ValueError(f"unknown conditions {unknown}: use some of {', '.join(TRAINED)}")
    new, old = new_and_old_facts(ctx, facts, limit or params.n_new, params.n_old)
    records = ctx.each("neurons", [(f.id, f) for f in new], lambda f: neuron_conditions(ctx, f, params.neurons))
    usable = [(f, r) for f, r in zip(new, records) if "error" not in r]
    if not usable:
        raise DatasetError("no new fact could be attributed")
    new = [f for f, _ in usable]
    sets = neuron_union(ctx, [r for _, r in usable])
    before = fingerprint(ctx.lm.model)
    chosen = make_key(new=[f.id for f in new], old=[f.id for f in old])[:12]   # the run id leaves out the limit
    results = {"none": ctx.each("evaluate", [(f"none:{chosen}", None)], lambda _: evaluate(ctx.lm, new, old))[0]}
    for condition in params.conditions:
        [results[condition]] = ctx.each("train", [(f"{condition}:{chosen}", condition)],
                                        lambda c: train_and_evaluate(ctx, new, old, sets.get(c), params))
    untouched = fingerprint(ctx.lm.model) == before
    table = accuracy_table(results, ctx.seed)
    runs = runs_table(results, sets)
    summary = {"n_new": len(new), "n_old": len(old), "original_weights_untouched": untouched,
               "new_facts": [f.id for f in new], "old_facts": [f.id for f in old],
               "accuracy": table.to_dict("records"), "runs": runs.to_dict("records")}
    return Report(jsonable(summary), tables={"evolvability": table, "evolvability_wide": wide_table(table),
                                             "evolvability_runs": runs},
                  figures={"evolvability": _figure(table)}, markdown=_markdown(table, runs, len(new), len(old),
                                                                               params, untouched))


def new_and_old_facts(ctx: Context, facts, n_new: int, n_old: int | None):
    """(new facts, old facts): a seeded shuffle walked once; unknown facts with >= 2 prompts are new,
    known ones old.  Known-checks share the "known" step with `known_facts`."""
    n_old = n_new if n_old is None else n_old
    order = np.random.default_rng(ctx.seed).permutation(len(facts))
    new, old = [], []
    for i in order:
        fact = facts[int(i)]
        if len(new) >= n_new and len(old) >= n_old:
            break
        [record] = ctx.each("known", [(fact.id, fact)],
                            lambda f: {"known": answers_correctly(ctx.lm, f.prompt, f.answers)})
        if "error" in record:
            continue
        if record["known"]:
            if len(old) < n_old:
                old.append(fact)
        elif len(new) < n_new and len(fact.prompts) >= 2:
            new.append(fact)
    if not new:
        raise DatasetError("the model already answers every fact of this dataset (with a paraphrase): "
                           "evolvability needs facts it does not know")
    return new, old


def neuron_union(ctx: Context, records: list[dict]) -> dict[str, list[Neuron] | None]:
    """Condition -> neurons to train (None: every weight), unioned over the new facts."""
    kn = sorted({n for r in records for n in to_neurons(r["KN"])})
    dkn = sorted({n for r in records for n in to_neurons(r["DKN"])})
    [random] = random_matched_sets(ctx.lm, dkn, set(kn), 1, seed=1000 * ctx.seed + 7) or [()]
    return {"DKN": dkn, "KN": kn, "random": sorted(random), "all": None}


def evaluate(lm, new, old) -> dict:
    """0/1 per prompt: Q_new (new facts' first prompts), Q_au (their paraphrases), Q_old (old facts)."""
    groups = {"Q_new": [(f.prompt, f.answers) for f in new],
              "Q_au": [(p, f.answers) for f in new for p in f.prompts[1:]],
              "Q_old": [(f.prompt, f.answers) for f in old]}
    return {k: [int(x) for x in answers_correctly_many(lm, items)] for k, items in groups.items()}


def train_and_evaluate(ctx: Context, new, old, neurons, params: Params) -> dict:
    if neurons is not None and not neurons:
        return {"skipped": "no neurons in this condition", "n_neurons": 0}
    start = time.perf_counter()
    copy = fresh_copy(ctx.lm)                         # every condition starts from the original weights
    try:
        trained = train_neurons(copy, new, neurons, steps=params.steps, lr=params.lr, seed=ctx.seed,
                                batch_size=params.batch_size)
        scores = evaluate(copy, new, old)
    finally:
        del copy
        gc.collect()
    return jsonable({**scores, "losses": list(trained.losses), "n_params": trained.n_params,
                     "n_neurons": trained.n_neurons, "train_seconds": trained.seconds,
                     "seconds": time.perf_counter() - start})


def accuracy_table(results: dict, seed: int = 0) -> pd.DataFrame:
    rows = []
    for condition in CONDITIONS:
        r = results.get(condition)
        if r is None or "skipped" in r or "error" in r:
            continue
        for metric in METRICS:
            b = bootstrap_mean(r[metric], seed=seed)
            i = TRAINED.index(condition) if condition in TRAINED else None
            rows.append({"metric": metric, "condition": condition, "n": b["n"],
                         "accuracy_%": 100 * b["mean"], "ci_low_%": 100 * b["ci_low"], "ci_high_%": 100 * b["ci_high"],
                         "paper_gpt2_%": PAPER["GPT-2"][metric][i] if i is not None else np.nan,
                         "paper_llama2_%": PAPER["LLaMA2-7b"][metric][i] if i is not None else np.nan})
    return pd.DataFrame(rows)


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout: one row per metric, 'ours (GPT-2 paper / LLaMA2 paper)' per condition."""
    rows = []
    for metric, t in table.groupby("metric", sort=False):
        row = {"metric": metric}
        for r in t.to_dict("records"):
            cell = f"{r['accuracy_%']:.0f}"
            if not np.isnan(r["paper_gpt2_%"]):
                cell += f" ({r['paper_gpt2_%']:.0f} / {r['paper_llama2_%']:.0f})"
            row[r["condition"]] = cell
        rows.append(row)
    return pd.DataFrame(rows)


def runs_table(results: dict, sets: dict) -> pd.DataFrame:
    rows = []
    for condition in TRAINED:
        r = results.get(condition)
        if r is None:
            continue
        rows.append({"condition": condition, "n_neurons": r.get("n_neurons"), "trained_weights": r.get("n_params"),
                     "first_loss": r["losses"][0] if r.get("losses") else np.nan,
                     "final_loss": r["losses"][-1] if r.get("losses") else np.nan,
                     "train_seconds": r.get("train_seconds", np.nan), "skipped": r.get("skipped", ""),
                     "layers": _layer_range(sets.get(condition))})
    return pd.DataFrame(rows)


def _layer_range(neurons) -> str:
    if neurons is None:
        return "all"
    layers = sorted({n.layer for n in neurons})
    return f"{layers[0]}-{layers[-1]} ({len(layers)} layers)" if layers else ""


def _figure(table: pd.DataFrame):
    import plotly.express as px

    t = table.copy()
    t["err_plus"], t["err_minus"] = t["ci_high_%"] - t["accuracy_%"], t["accuracy_%"] - t["ci_low_%"]
    fig = px.bar(t, x="metric", y="accuracy_%", color="condition", barmode="group", error_y="err_plus",
                 error_y_minus="err_minus", template="plotly_white", category_orders={"condition": list(CONDITIONS)},
                 title="Evolvability: top-1 accuracy after fine-tuning only these weights")
    fig.update_yaxes(title_text="accuracy (%)", range=[0, 100])
    return fig


def _markdown(table, runs, n_new, n_old, params: Params, untouched: bool) -> str:
    return (f"New facts (the model did not answer them): {n_new}; old facts (it did): {n_old}. Each condition "
            f"was fine-tuned from a fresh copy of the original weights ({params.steps} Adam steps, lr {params.lr}, "
            f"batch {params.batch_size or 'all'}) on the new facts' first prompts, updating only its neurons' "
            "input and output weight vectors (\"all\": every weight). Q_new: accuracy on those prompts; Q_old: on "
            "the old facts (100% before training); Q_au: on the new facts' paraphrases, never trained on. "
            "Top-1 = the first answer token. Neurons were attributed on the untrained model "
            f"({params.neurons.max_prompts} prompt(s) per fact). Original weights untouched after the run: "
            f"{untouched}. The wide table shows ours (paper GPT-2 / paper LLaMA2-7b); the paper's fine-tuning "
            "scripts trained the DKN model for 'only KN' and 'only random', so those two paper columns are not a "
            "clean comparison.\n")
