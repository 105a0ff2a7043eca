"""Experiment 5, evolvability: learning new facts through a condition's neurons only.

Facts: a seeded shuffle of the dataset is walked once; facts the model does NOT
answer (top-1 is not the first answer token after the first prompt) and that have
at least one paraphrase become the new facts (up to `limit`, else `n_new`); facts
it answers become the old facts (up to `n_old`, default as many as new ones), split
(seeded) into validation old facts (`validation_share`) and test old facts.

Neurons, found on the model before any training, per new fact (the shared
definitions of dkn.experiments.conditions), then unioned over the new facts:
"degenerate components", "candidate groups", "knowledge neurons", "KN subset"
(random KNs, as many as the candidate groups, per seed), "random matched" (layer-
and activation-matched non-KNs, per seed), and "all": every weight.  Neurons are
attributed on the training prompt only (`max_prompts=1`, in-sample), so that the
paraphrases used for Q_au stay unseen by both training and selection.

Training: each run starts from a fresh deep copy of the original weights; Adam on
the condition's weights (dkn.finetune: the neurons' input and output weight
vectors, every other entry bit-identical), on the first prompt of each new fact.
Per condition, the learning rate is chosen from `lrs` on the validation split with
seed 0 (score: mean of Q_new and Q_old on the validation old facts; ties go to the
smaller rate), then `seeds` training seeds run at that rate (seeded conditions use
their seed-k neuron set for seed k).  Measured (top-1 = first answer token):
- Q_new: the new facts' training prompts;
- Q_old: the test old facts' first prompts (all 100% before training, by selection);
- Q_au: the new facts' other prompts (paraphrases never trained on).
"none" is the model before training.  Accuracies are over every (prompt, seed); the
95% intervals come from a bootstrap clustered by fact (a fact's prompts and seeds
are resampled together); the seed-to-seed standard deviation is reported beside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from dkn.cache import make_key
from dkn.datasets import DatasetError
from dkn.evaluate import answers_correctly_many
from dkn.experiments.conditions import (
    DEGENERATE,
    GROUPS,
    KN,
    KN_SUBSET,
    RANDOM,
    SEEDED,
    ConditionParams,
    bootstrap_groups,
    jsonable,
    neuron_conditions,
    to_neurons,
)
from dkn.experiments.runner import Context, Report, known_records
from dkn.experiments.timing import stage
from dkn.finetune import fresh_copy, train_neurons
from dkn.models import fingerprint
from dkn.neurons import Neuron

NAME = "evolvability"
ALL = "all"
TRAINED = (DEGENERATE, GROUPS, KN, KN_SUBSET, RANDOM, ALL)
CONDITIONS = ("none",) + TRAINED
METRICS = ("Q_new", "Q_old", "Q_au")
# Section 6 of the method notes (the authors' plotting scripts): only-DKN, only-KN, only-random, all.
PAPER = {
    "GPT-2": {"Q_new": (88, 83, 43, 93), "Q_old": (83, 86, 71, 49), "Q_au": (86, 82, 38, 91)},
    "LLaMA2-7b": {"Q_new": (98, 95, 78, 99), "Q_old": (93, 91, 88, 66), "Q_au": (97, 92, 71, 99)},
}
PAPER_COLUMN = {GROUPS: 0, KN: 1, RANDOM: 2, ALL: 3}


@dataclass(frozen=True)
class Params:
    n_new: int = 60  # new facts when no limit is given (a limit overrides it)
    n_old: int | None = None  # old facts for Q_old; None: as many as new facts
    validation_share: float = 0.3  # of the old facts: for choosing the learning rate
    conditions: tuple[str, ...] = TRAINED
    steps: int = 20  # optimiser steps of `batch_size` facts: 20 x 12 = 4 epochs over 60
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # the sweep; each condition gets its best on validation
    seeds: int = 3  # training seeds per condition at the chosen rate
    batch_size: int | None = 12  # None: all new facts in every step
    neurons: ConditionParams = field(default_factory=lambda: ConditionParams(max_prompts=1, held_out=False))

    @classmethod
    def full(cls) -> Params:
        """GPU-size settings: more facts and steps, minibatches."""
        return cls(n_new=300, steps=300, lrs=(1e-4, 3e-4, 1e-3), batch_size=32)

    def validate(self) -> None:
        unknown = [c for c in self.conditions if c not in TRAINED]
        if unknown:
            raise ValueError(f"unknown conditions {unknown}: use some of {', '.join(TRAINED)}")
        if self.seeds < 1 or not self.lrs or any(float(lr) <= 0 for lr in self.lrs):
            raise ValueError("evolvability needs seeds >= 1 and at least one learning rate > 0 (lrs=1e-3,3e-3)")
        if not 0 < self.validation_share < 1:
            raise ValueError("validation_share must be between 0 and 1 (a share of the old facts)")


def run(ctx: Context, facts, params: Params, limit: int | None) -> Report:
    params.validate()
    lrs = sorted(float(lr) for lr in params.lrs)
    new, old = new_and_old_facts(ctx, facts, limit or params.n_new, params.n_old)
    old_val, old_test = split_old(old, params.validation_share, ctx.seed)
    neurons = replace(params.neurons, random_seeds=max(params.seeds, params.neurons.random_seeds))
    records = ctx.each("neurons", [(f.id, f) for f in new], lambda f: neuron_conditions(ctx, f, neurons))
    usable = [(f, r) for f, r in zip(new, records) if "error" not in r]
    if not usable:
        raise DatasetError("no new fact could be attributed")
    new = [f for f, _ in usable]
    sets = neuron_unions([r for _, r in usable], params.seeds)
    before = fingerprint(ctx.lm.model)
    chosen = make_key(new=[f.id for f in new], old=[f.id for f in old])[:12]  # the run id leaves out the limit
    split = (new, old_val, old_test)
    results = {"none": ctx.each("evaluate", [(f"none:{chosen}", None)], lambda _: evaluate(ctx.lm, *split))[0]}

    def train(condition, lr, seed):
        [r] = ctx.each(
            "train",
            [(f"{condition}:{lr:g}:{seed}:{chosen}", condition)],
            lambda c: train_and_evaluate(ctx, split, sets[c][seed], lr, seed, params),
        )
        return r

    sweep, runs, chosen_lr = [], {}, {}
    for condition in params.conditions:
        scores = {}
        for lr in lrs:
            r = train(condition, lr, 0)
            scores[lr] = validation_score(r)
            sweep.append(
                {
                    "condition": condition,
                    "lr": lr,
                    "validation_score": scores[lr],
                    "Q_new": _acc(r, "Q_new"),
                    "Q_old_validation": _acc(r, "Q_old_val"),
                    "final_loss": r["losses"][-1] if r.get("losses") else np.nan,
                    "skipped": r.get("skipped", ""),
                }
            )
        if all(v is None for v in scores.values()):  # skipped (no neurons): nothing to choose or repeat
            chosen_lr[condition], runs[condition] = None, [train(condition, lrs[0], 0)]
            continue
        best = max(lrs, key=lambda lr: (scores[lr] if scores[lr] is not None else -1.0, -lr))
        chosen_lr[condition] = best
        runs[condition] = [train(condition, best, seed) for seed in range(params.seeds)]
    for row in sweep:
        row["chosen"] = row["lr"] == chosen_lr[row["condition"]]
    untouched = fingerprint(ctx.lm.model) == before
    table = accuracy_table(results["none"], runs, new, old_test, chosen_lr, ctx.seed)
    runs_df = runs_table(runs, sets, chosen_lr)
    sweep_df = pd.DataFrame(sweep)
    summary = {
        "n_new": len(new),
        "n_old_validation": len(old_val),
        "n_old_test": len(old_test),
        "original_weights_untouched": untouched,
        "chosen_lr": chosen_lr,
        "seeds": params.seeds,
        "new_facts": [f.id for f in new],
        "old_facts": [f.id for f in old],
        "accuracy": table.to_dict("records"),
        "runs": runs_df.to_dict("records"),
    }
    return Report(
        jsonable(summary),
        tables={
            "evolvability": table,
            "evolvability_wide": wide_table(table),
            "evolvability_lr_sweep": sweep_df,
            "evolvability_runs": runs_df,
        },
        figures={"evolvability": _figure(table)},
        markdown=_markdown(table, len(new), len(old_val), len(old_test), params, chosen_lr, untouched),
    )


def split_old(old: list, share: float, seed: int) -> tuple[list, list]:
    """(validation, test) old facts, seeded; at least one of each when there are two or more."""
    order = list(old)
    np.random.default_rng(seed + 17).shuffle(order)
    n_val = min(max(1, round(share * len(order))), len(order) - 1) if len(order) >= 2 else 0
    return order[:n_val], order[n_val:]


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
        [record] = known_records(ctx, [fact])
        if "error" in record:
            continue
        if record["known"] and len(old) < n_old:
            old.append(fact)
        elif not record["known"] and len(new) < n_new and len(fact.prompts) >= 2:
            new.append(fact)
        else:
            continue
        if ctx.progress is not None:  # a line per fact taken, so that the ETA counts the facts passed over
            ctx.progress("new and old facts found", len(new) + len(old), n_new + n_old)
    if not new:
        raise DatasetError(
            "the model already answers every fact of this dataset (with a paraphrase): "
            "evolvability needs facts it does not know"
        )
    return new, old


def neuron_unions(records: list[dict], seeds: int) -> dict[str, list[list[Neuron] | None]]:
    """Condition -> one neuron set per training seed (None: every weight), unioned over the new facts;
    fixed conditions repeat their one set, seeded ones use their seed-k sets."""
    out: dict[str, list] = {}
    for c in TRAINED:
        if c == ALL:
            out[c] = [None] * seeds
        elif c in SEEDED:
            out[c] = [
                sorted({n for r in records if len(r["sets"][c]) > k for n in to_neurons(r["sets"][c][k])})
                for k in range(seeds)
            ]
        else:
            union = sorted({n for r in records for n in to_neurons(r["sets"][c])})
            out[c] = [union] * seeds
    return out


def evaluate(lm, new, old_val, old_test) -> dict:
    """0/1 per prompt: Q_new (new facts' first prompts), Q_au (their paraphrases), Q_old_val and Q_old (the
    validation and test old facts' first prompts)."""
    groups = {
        "Q_new": [(f.prompt, f.answers) for f in new],
        "Q_au": [(p, f.answers) for f in new for p in f.prompts[1:]],
        "Q_old_val": [(f.prompt, f.answers) for f in old_val],
        "Q_old": [(f.prompt, f.answers) for f in old_test],
    }
    return {k: [int(x) for x in answers_correctly_many(lm, items)] if items else [] for k, items in groups.items()}


def fact_ids(metric: str, new, old_test) -> list[str]:
    """The fact of each prompt of `metric`, in `evaluate`'s order (for the clustered bootstrap)."""
    if metric == "Q_au":
        return [f.id for f in new for _ in f.prompts[1:]]
    return [f.id for f in (new if metric == "Q_new" else old_test)]


def validation_score(r: dict) -> float | None:
    """Mean of Q_new and the validation old facts' accuracy (None for a skipped run)."""
    if "skipped" in r or "error" in r:
        return None
    parts = [np.mean(r[k]) for k in ("Q_new", "Q_old_val") if r.get(k)]
    return float(np.mean(parts)) if parts else None


def _acc(r: dict, key: str) -> float:
    return 100 * float(np.mean(r[key])) if r.get(key) else np.nan


def train_and_evaluate(ctx: Context, split, neurons, lr: float, seed: int, params: Params) -> dict:
    if neurons is not None and not neurons:
        return {"skipped": "no neurons in this condition", "n_neurons": 0}
    start = time.perf_counter()
    copy = fresh_copy(ctx.lm)  # every run starts from the original weights
    try:
        with stage(ctx, "training"):
            trained = train_neurons(
                copy,
                split[0],
                neurons,
                steps=params.steps,
                lr=lr,
                seed=1000 * ctx.seed + seed,
                batch_size=params.batch_size,
            )
        with stage(ctx, "evaluation"):
            scores = evaluate(copy, *split)
    finally:
        del copy  # freed by reference counting (no gc.collect: 2 s a call)
    return jsonable(
        {
            **scores,
            "losses": list(trained.losses),
            "n_params": trained.n_params,
            "lr": lr,
            "seed": seed,
            "n_neurons": trained.n_neurons,
            "train_seconds": trained.seconds,
            "seconds": time.perf_counter() - start,
        }
    )


def accuracy_table(none: dict, runs: dict, new, old_test, chosen_lr: dict, seed: int = 0) -> pd.DataFrame:
    rows = []
    for condition in CONDITIONS:
        done = (
            [none]
            if condition == "none"
            else [r for r in runs.get(condition, []) if "skipped" not in r and "error" not in r]
        )
        if not done:
            continue
        for metric in METRICS:
            ids = fact_ids(metric, new, old_test)
            groups: dict[str, list] = {}
            for r in done:
                for fid, v in zip(ids, r[metric]):
                    groups.setdefault(fid, []).append(v)
            b = bootstrap_groups(list(groups.values()), lambda xs: float(np.mean(xs)), 1000, seed)
            per_seed = [100 * float(np.mean(r[metric])) for r in done if r[metric]]
            i = PAPER_COLUMN.get(condition)
            rows.append(
                {
                    "metric": metric,
                    "condition": condition,
                    "facts": b["n"],
                    "seeds": len(done),
                    "lr": chosen_lr.get(condition) or np.nan,
                    "accuracy_%": 100 * b["value"],
                    "ci_low_%": 100 * b["ci_low"],
                    "ci_high_%": 100 * b["ci_high"],
                    "seed_std_%": float(np.std(per_seed)) if len(per_seed) > 1 else np.nan,
                    "paper_gpt2_%": PAPER["GPT-2"][metric][i] if i is not None else np.nan,
                    "paper_llama2_%": PAPER["LLaMA2-7b"][metric][i] if i is not None else np.nan,
                }
            )
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


def runs_table(runs: dict, sets: dict, chosen_lr: dict) -> pd.DataFrame:
    rows = []
    for condition, rs in runs.items():
        for k, r in enumerate(rs):
            rows.append(
                {
                    "condition": condition,
                    "seed": k,
                    "lr": chosen_lr[condition],
                    "n_neurons": r.get("n_neurons"),
                    "trained_weights": r.get("n_params"),
                    "first_loss": r["losses"][0] if r.get("losses") else np.nan,
                    "final_loss": r["losses"][-1] if r.get("losses") else np.nan,
                    "train_seconds": r.get("train_seconds", np.nan),
                    "skipped": r.get("skipped", ""),
                    "layers": _layer_range(sets[condition][k]),
                }
            )
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
    fig = px.bar(
        t,
        x="metric",
        y="accuracy_%",
        color="condition",
        barmode="group",
        error_y="err_plus",
        error_y_minus="err_minus",
        template="plotly_white",
        category_orders={"condition": list(CONDITIONS)},
        title="Evolvability: top-1 accuracy after fine-tuning only these weights",
    )
    fig.update_yaxes(title_text="accuracy (%)", range=[0, 100])
    return fig


def _markdown(table, n_new, n_val, n_test, params: Params, chosen_lr: dict, untouched: bool) -> str:
    rates = ", ".join(f"{c} {lr:g}" for c, lr in chosen_lr.items() if lr is not None)
    skipped = [c for c, lr in chosen_lr.items() if lr is None]
    rates += f" (skipped, no neurons: {', '.join(skipped)})" if skipped else ""
    return (
        f"New facts (the model did not answer them): {n_new}; old facts (it did): {n_val} for validation, "
        f"{n_test} for test. Each run was fine-tuned from a fresh copy of the original weights ({params.steps} "
        f"Adam steps, batch {params.batch_size or 'all'}) on the new facts' first prompts, updating only its "
        "condition's neurons' input and output weight vectors (\"all\": every weight). Learning rate per "
        f"condition chosen from {', '.join(f'{lr:g}' for lr in sorted(params.lrs))} on the validation split "
        f"(seed 0; mean of Q_new and validation Q_old): {rates}; then {params.seeds} training seeds at that rate. "
        "Q_new: accuracy on the training prompts; Q_old: on the test old facts (100% before training); Q_au: on "
        "the new facts' paraphrases, never trained on. Top-1 = the first answer token. Accuracy over every "
        "(prompt, seed), 95% CI from a bootstrap clustered by fact; `seed_std_%` is the spread over seeds. "
        "Conditions: `candidate groups` (members of the NTC groups, the scripts' DKN), `degenerate components` "
        "(strict DKNs, usually none), `knowledge neurons`, `KN subset` (random KNs as many as the candidate "
        "groups), `random matched` (layer- and activation-matched non-KNs, as many), `all` (every weight). "
        f"Neurons were attributed on the untrained model ({params.neurons.max_prompts} prompt(s) per fact). "
        f"Original weights untouched after the run: {untouched}. The wide table shows ours (paper GPT-2 / paper "
        "LLaMA2-7b); the paper's fine-tuning scripts trained the DKN model for 'only KN' and 'only random', so "
        "those two paper columns are not a clean comparison.\n"
    )
