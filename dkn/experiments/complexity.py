"""Experiment 6, complexity: how many DKNs a model has and how they are built, per model.

Facts: those every compared model answers (top-1 = first answer token after the
first prompt), in dataset order, up to `limit`, so all models are measured on the
same facts.  With `models=()` only the loaded model is measured (on the facts it
answers).  The models are loaded together with `load_model` for the "answered by
every model" check (fact by fact, so it stops at `limit`), then measured one at a
time and freed between.

Per fact, with the shared condition settings (dkn.experiments.conditions:
refined knowledge neurons over up to 3 prompts, every one of them into the NTC
graph unless `max_neurons` caps it, which the report then counts; the
integrated-gradients baseline is each model family's default, AMIG for families
with a post-MLP norm such as Gemma 2/3, zero otherwise, and is stated per model):
the NTC candidate groups (BDCs) and the degeneracy test.
Per model:
- DKN neurons: members of the NTC groups per fact (count, and per million neurons
  of the model, since models differ in size);
- BDCs per fact and BDC size (neurons per group);
- layer spread: distinct layers of a fact's DKN neurons, and their span
  (max - min layer) as a share of the model's depth;
- degeneracy rate: share of facts that pass the strict test (>= 2 groups each
  dropping P by < threshold_low alone, together by > threshold_high);
- redundancy R = (U - sum of single-group drops) / U over facts with >= 2 groups
  (> 0 redundant, ~0 additive, < 0 each group necessary; dkn.degeneracy), with the
  old "degeneracy index" (U - largest single drop) / U kept as
  `mean_excess_over_largest`: it gives k additive groups 1 - 1/k, so it is no
  redundancy measure;
- means with 95% bootstrap intervals over facts, and a paired table: each later
  model minus the first on the same facts (DKN neurons, groups, group size, layers).
"""

from __future__ import annotations

import gc
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dkn.cache import make_key
from dkn.datasets import DatasetError
from dkn.degeneracy import analyse
from dkn.experiments.conditions import (
    ConditionParams,
    bootstrap_facts,
    bootstrap_mean,
    default_attribution,
    jsonable,
)
from dkn.experiments.runner import Context, Report, known_facts, known_records
from dkn.experiments.timing import stage, times_of
from dkn.models import load_model, model_summary
from dkn.selection import find_knowledge_neurons

NAME = "complexity"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    models: tuple[str, ...] = ()  # (): the loaded model only; else load_model names ("default", "gemma3-270m")
    max_checked: int = 2000  # facts checked for "answered by every model" (in dataset order)
    neurons: ConditionParams = field(default_factory=lambda: ConditionParams(random_seeds=0, held_out=False))

    @classmethod
    def full(cls) -> Params:
        return cls(models=("default", "gemma3-270m"))


def run(ctx: Context, facts, params: Params, limit: int | None) -> Report:
    if not params.models:
        chosen = known_facts(ctx, facts, limit)
        per_model = {ctx.lm.name: (model_summary(ctx.lm), measure(ctx, chosen, params))}
    else:
        chosen = shared_known_facts(ctx, facts[: params.max_checked], limit, params.models)
        per_model = {}
        for name in params.models:
            with _model_context(ctx, name) as sub:
                per_model[name] = (model_summary(sub.lm), measure(sub, chosen, params))
    table = complexity_table(per_model)
    layers = layer_table(per_model)
    paired = paired_table(per_model)
    summary = {
        "n_facts": len(chosen),
        "facts": [f.id for f in chosen],
        "models": table.to_dict("records"),
        "paired": paired.to_dict("records"),
        "records": {name: records for name, (_, records) in per_model.items()},
    }
    return Report(
        jsonable(summary),
        tables={"complexity": table, "complexity_layers": layers}
        | ({"complexity_paired": paired} if len(paired) else {}),
        figures={"complexity": _figure(table), "complexity_layers": _layer_figure(layers)},
        markdown=_markdown(len(chosen), table, params),
    )


def shared_known_facts(ctx: Context, facts, limit, models) -> list:
    """Facts that every model answers, in dataset order, up to `limit`.  All models are loaded at once
    and each fact is checked model by model (the next model only when the previous one answers), so the
    walk stops as soon as `limit` facts are shared instead of checking the whole dataset on the first model."""
    needed = len(facts) if limit is None else min(limit, len(facts))
    chosen, checked = [], 0
    with ExitStack() as stack:
        subs = [stack.enter_context(_model_context(ctx, name)) for name in models]
        for fact in facts:
            checked += 1
            if all(known_records(sub, [fact])[0].get("known") for sub in subs):
                chosen.append(fact)
                if ctx.progress is not None:  # a line per shared fact, so that the ETA counts the misses
                    ctx.progress(f"facts all {len(models)} models answer", len(chosen), needed)
            if len(chosen) >= needed:
                break
        log.info("%d of %d facts checked are answered by %s", len(chosen), checked, ", ".join(models))
    if not chosen:
        raise DatasetError(f"no fact of this dataset is answered by all of {', '.join(models)}")
    return chosen


class _model_context:
    """A Context for model `name`: the loaded one when it is that model, else loaded now and freed on exit."""

    def __init__(self, ctx: Context, name: str):
        self.ctx, self.name, self.sub = ctx, name, None

    def __enter__(self) -> Context:
        ctx = self.ctx
        lm = ctx.lm if self.name == ctx.lm.name else load_model(self.name, device=ctx.lm.device)
        run_id = make_key(parent=ctx.run_id, model=lm.name, fingerprint=lm.fingerprint)[:16]
        self.sub = Context(lm, ctx.store, run_id, ctx.seed, ctx.progress)
        self.sub.stages = times_of(ctx)  # the run's stage timings, whichever model computed them
        return self.sub

    def __exit__(self, *exc) -> None:
        if self.sub is None:
            return
        self.ctx.computed += self.sub.computed
        if self.sub.lm is not self.ctx.lm:
            self.sub.lm = None
            gc.collect()


def measure(ctx: Context, facts, params: Params) -> list[dict]:
    return [
        r
        for r in ctx.each("complexity", [(f.id, f) for f in facts], lambda f: fact_record(ctx, f, params))
        if "error" not in r
    ]


def fact_record(ctx: Context, fact, params: Params) -> dict:
    p = params.neurons
    prompts = list(fact.prompts[: p.max_prompts])
    attribution = default_attribution(ctx.lm, p.attribution)
    with stage(ctx, "attribution"):
        kns = find_knowledge_neurons(ctx.lm, prompts, fact.answer, attribution, t=p.t, p=p.p, store=ctx.store)
    neurons, scores = kns.neurons[: p.max_neurons], kns.scores[: p.max_neurons]
    with stage(ctx, "clustering + subset grid"):
        r = analyse(ctx.lm, prompts[0], fact.answer, neurons, scores, p.degeneracy)
    members = sorted({n for c in r.candidates for n in c.members})
    return jsonable(
        {
            "fact": fact.id,
            "n_kn": len(kns.neurons),
            "n_bdcs": len(r.candidates),
            "bdc_sizes": [len(c.members) for c in r.candidates],
            "dkn_layers": [n.layer for n in members],
            "n_dkn": len(members),
            "degenerate": r.degenerate,
            "n_dkn_strict": sum(len(g) for g in r.dkn),
            "redundancy": r.redundancy,
            "excess_over_largest": r.excess_over_largest,
            "union_drop": r.union_drop,
            "prob": r.prob,
            "baseline": attribution.baseline,
            "capped": p.max_neurons is not None and len(kns.neurons) > p.max_neurons,
        }
    )


def complexity_table(per_model: dict) -> pd.DataFrame:
    rows = []
    for name, (info, records) in per_model.items():
        grouped = [r for r in records if r["n_bdcs"] >= 2]
        sizes = [s for r in records for s in r["bdc_sizes"]]
        spans = [
            (max(r["dkn_layers"]) - min(r["dkn_layers"])) / max(1, info["n_layers"] - 1)
            for r in records
            if r["dkn_layers"]
        ]
        n_dkn = [r["n_dkn"] for r in records]
        redundancy = [r["redundancy"] for r in grouped]
        rows.append(
            {
                "model": name,
                "ig_baseline": ", ".join(sorted({r.get("baseline", "zero") for r in records})),
                "capped_facts": sum(bool(r.get("capped")) for r in records),
                "params_M": info["n_params"] / 1e6,
                "layers": info["n_layers"],
                "d_mlp": info["d_mlp"],
                "facts": len(records),
                "mean_kn": _mean([r["n_kn"] for r in records]),
                "mean_dkn_neurons": _mean(n_dkn),
                **_interval("mean_dkn_neurons", n_dkn),
                "dkn_per_M_neurons": _mean(n_dkn) / info["n_neurons"] * 1e6 if n_dkn else np.nan,
                "mean_bdcs": _mean([r["n_bdcs"] for r in records]),
                **_interval("mean_bdcs", [r["n_bdcs"] for r in records]),
                "mean_bdc_size": _mean(sizes),
                "max_bdc_size": max(sizes) if sizes else np.nan,
                "mean_dkn_layers": _mean([len(set(r["dkn_layers"])) for r in records if r["dkn_layers"]]),
                "mean_layer_span_share": _mean(spans),
                "facts_with_>=2_bdcs": len(grouped),
                "degeneracy_rate_%": 100 * _mean([float(r["degenerate"]) for r in records]),
                "degenerate_facts": sum(bool(r["degenerate"]) for r in records),
                "mean_redundancy": _mean(redundancy),
                **_interval("mean_redundancy", redundancy),
                "mean_excess_over_largest": _mean([r["excess_over_largest"] for r in grouped]),
                "mean_union_drop_%": 100 * _mean([r["union_drop"] for r in grouped]),
            }
        )
    return pd.DataFrame(rows)


def layer_table(per_model: dict) -> pd.DataFrame:
    """Share of each model's DKN neurons per tenth of its depth (depth-normalised layer histogram)."""
    rows = []
    for name, (info, records) in per_model.items():
        layers = np.array([l for r in records for l in r["dkn_layers"]], dtype=float)
        depth = (layers + 0.5) / info["n_layers"]
        counts = np.histogram(depth, bins=10, range=(0, 1))[0] if len(layers) else np.zeros(10)
        for b, c in enumerate(counts):
            rows.append(
                {
                    "model": name,
                    "depth_bin": f"{b / 10:.1f}-{(b + 1) / 10:.1f}",
                    "share_%": 100 * c / max(1, len(layers)),
                }
            )
    return pd.DataFrame(rows)


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if len(values) else np.nan


def _interval(column: str, values) -> dict:
    """95% bootstrap interval of the mean over facts, as `<column>_ci_low` / `<column>_ci_high`."""
    b = bootstrap_mean(values)
    return {f"{column}_ci_low": b["ci_low"], f"{column}_ci_high": b["ci_high"]}


#: per-fact measures compared between models on the same facts (paired)
PAIRED_MEASURES = {
    "n_dkn": lambda r: r["n_dkn"],
    "n_bdcs": lambda r: r["n_bdcs"],
    "mean_bdc_size": lambda r: float(np.mean(r["bdc_sizes"])) if r["bdc_sizes"] else None,
    "dkn_layers": lambda r: len(set(r["dkn_layers"])) if r["dkn_layers"] else None,
}


def paired_table(per_model: dict) -> pd.DataFrame:
    """Each later model minus the first, per fact answered by both (paired), for every PAIRED_MEASURES
    measure: median and mean difference with 95% bootstrap intervals over facts."""
    names = list(per_model)
    if len(names) < 2:
        return pd.DataFrame()
    by_fact = {name: {r["fact"]: r for r in records} for name, (_, records) in per_model.items()}
    base, rows = names[0], []
    for other in names[1:]:
        shared = [f for f in by_fact[base] if f in by_fact[other]]
        for measure, get in PAIRED_MEASURES.items():
            diffs = []
            for f in shared:
                a, b = get(by_fact[base][f]), get(by_fact[other][f])
                diffs.append(None if a is None or b is None else b - a)
            rows.append({"comparison": f"{other} - {base}", "measure": measure, **bootstrap_facts(diffs)})
    return pd.DataFrame(rows)


#: the per-model bars of the report: table column -> subplot title (short enough not to overlap)
FIGURE_METRICS = {
    "mean_dkn_neurons": "DKN neurons per fact",
    "mean_bdcs": "groups (BDCs) per fact",
    "mean_bdc_size": "neurons per group",
    "degeneracy_rate_%": "degenerate facts (%)",
    "mean_redundancy": "redundancy R (>= 2 groups)",
    "mean_layer_span_share": "layer span (share of depth)",
}


def _figure(table: pd.DataFrame):
    """The metrics as a 2 x 3 grid of bar charts, one bar per model."""
    from plotly.subplots import make_subplots

    cols = 3
    rows = -(-len(FIGURE_METRICS) // cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=list(FIGURE_METRICS.values()),
        vertical_spacing=0.18,
        horizontal_spacing=0.08,
    )
    for i, m in enumerate(FIGURE_METRICS):
        row, col = i // cols + 1, i % cols + 1
        low, high = table.get(f"{m}_ci_low"), table.get(f"{m}_ci_high")
        error = None if low is None else dict(type="data", array=high - table[m], arrayminus=table[m] - low)
        fig.add_bar(
            x=table["model"],
            y=table[m],
            error_y=error,
            text=[f"{v:.3g}" for v in table[m]],
            textposition="outside",
            cliponaxis=False,
            showlegend=False,
            row=row,
            col=col,
        )
        fig.update_yaxes(range=_padded_range(table[m], low, high), row=row, col=col)
    fig.update_annotations(font_size=13)
    fig.update_layout(title="DKN complexity per model (same facts)", template="plotly_white", height=300 * rows + 120)
    return fig


def _padded_range(values, low=None, high=None) -> list[float]:
    """A y range holding 0, the values and their intervals, with room above and below for labels (a bar of
    negative values otherwise ran into the subplot's title, and an all-zero metric got an axis of -1..1)."""
    points = [0.0, *values] + ([*low, *high] if low is not None else [])
    points = [float(v) for v in points if v is not None and np.isfinite(v)]
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    return [lo - 0.2 * span if lo < 0 else 0.0, hi + 0.2 * span if hi > 0 or lo == hi else 0.1 * span]


def _layer_figure(layers: pd.DataFrame):
    import plotly.express as px

    return px.bar(
        layers,
        x="depth_bin",
        y="share_%",
        color="model",
        barmode="group",
        template="plotly_white",
        title="Where DKN neurons sit (share per tenth of the model's depth)",
    )


def _markdown(n: int, table: pd.DataFrame, params: Params) -> str:
    cap = params.neurons.max_neurons
    rows = table.to_dict("records")
    baselines = "; ".join(f"{r['model']}: {r['ig_baseline']}" for r in rows)
    clipped = (
        "no cap: every refined knowledge neuron went into the NTC graph"
        if cap is None
        else f"the strongest {cap} knowledge neurons went into the NTC graph; facts clipped: "
        + "; ".join(f"{r['model']} {r['capped_facts']}" for r in rows)
    )
    return (
        f"Models: {', '.join(r['model'] for r in rows)}; facts: {n} (answered by every model). Per fact, the "
        f"refined knowledge neurons (up to {params.neurons.max_prompts} prompts) were clustered by NTC; the DKN "
        "neurons are the members of its groups (BDCs). Integrated-gradients baseline per model (the family "
        f"default: AMIG where the MLP output has its own norm, e.g. Gemma 2/3, whose zero-baseline IG puts "
        f"everything in the first step; zero otherwise): {baselines}. Neuron cap: {clipped}. "
        "Degeneracy rate: share of facts passing the strict test (>= 2 groups that each lower P by < 5% "
        "alone and together by > 30%). Redundancy R = (union drop - sum of single-group drops) / union drop "
        "over facts with >= 2 groups (> 0 redundant, ~0 additive, < 0 each group necessary); intervals are "
        "95% bootstrap intervals over facts; the paired table gives each later model minus the first on the "
        "same facts. The paper reports only that DKNs grow more numerous and complex with "
        "model size (GPT-2 vs LLaMA2-7b), without a table to compare with.\n"
    )
