"""Experiment 6, complexity: how many DKNs a model has and how they are built, per model.

Facts: those every compared model answers (top-1 = first answer token after the
first prompt), in dataset order, up to `limit`, so all models are measured on the
same facts.  With `models=()` only the loaded model is measured (on the facts it
answers).  Models are loaded one at a time with `load_model` and freed between.

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
- degeneracy index DI = (union drop - largest single drop) / union drop, mean over
  facts with >= 2 groups (1: no group matters alone, all together do).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dkn.cache import make_key
from dkn.datasets import DatasetError
from dkn.degeneracy import analyse
from dkn.evaluate import answers_correctly
from dkn.experiments.conditions import ConditionParams, default_attribution, jsonable
from dkn.experiments.runner import Context, Report, known_facts
from dkn.experiments.timing import stage
from dkn.models import load_model, model_summary
from dkn.selection import find_knowledge_neurons

NAME = "complexity"


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
    summary = {"n_facts": len(chosen), "facts": [f.id for f in chosen], "models": table.to_dict("records")}
    return Report(
        jsonable(summary),
        tables={"complexity": table, "complexity_layers": layers},
        figures={"complexity": _figure(table), "complexity_layers": _layer_figure(layers)},
        markdown=_markdown(len(chosen), table, params),
    )


def shared_known_facts(ctx: Context, facts, limit, models) -> list:
    """Facts that every model answers, in dataset order, up to `limit`.  Each model checks only the facts
    that the models before it answer; the last one stops at `limit`."""
    chosen = list(facts)
    for i, name in enumerate(models):
        last = i == len(models) - 1
        kept = []
        with _model_context(ctx, name) as sub:
            for fact in chosen:
                [record] = sub.each(
                    "known", [(fact.id, fact)], lambda f: {"known": answers_correctly(sub.lm, f.prompt, f.answers)}
                )
                if record.get("known"):
                    kept.append(fact)
                    if last and limit is not None and len(kept) >= limit:
                        break
        chosen = kept
    if not chosen:
        raise DatasetError(f"no fact of this dataset is answered by all of {', '.join(models)}")
    return chosen[:limit]


class _model_context:
    """A Context for model `name`: the loaded one when it is that model, else loaded now and freed on exit."""

    def __init__(self, ctx: Context, name: str):
        self.ctx, self.name, self.sub = ctx, name, None

    def __enter__(self) -> Context:
        ctx = self.ctx
        lm = ctx.lm if self.name == ctx.lm.name else load_model(self.name, device=ctx.lm.device)
        run_id = make_key(parent=ctx.run_id, model=lm.name, fingerprint=lm.fingerprint)[:16]
        self.sub = Context(lm, ctx.store, run_id, ctx.seed, ctx.progress)
        return self.sub

    def __exit__(self, *exc) -> None:
        if self.sub is not None and self.sub.lm is not self.ctx.lm:
            self.ctx.computed += self.sub.computed
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
            "degeneracy_index": r.degeneracy_index,
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
                "dkn_per_M_neurons": _mean(n_dkn) / info["n_neurons"] * 1e6 if n_dkn else np.nan,
                "mean_bdcs": _mean([r["n_bdcs"] for r in records]),
                "mean_bdc_size": _mean(sizes),
                "max_bdc_size": max(sizes) if sizes else np.nan,
                "mean_dkn_layers": _mean([len(set(r["dkn_layers"])) for r in records if r["dkn_layers"]]),
                "mean_layer_span_share": _mean(spans),
                "facts_with_>=2_bdcs": len(grouped),
                "degeneracy_rate_%": 100 * _mean([float(r["degenerate"]) for r in records]),
                "mean_degeneracy_index": _mean([r["degeneracy_index"] for r in grouped]),
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
    return float(np.mean(values)) if len(values) else np.nan


#: the per-model bars of the report: table column -> subplot title (short enough not to overlap)
FIGURE_METRICS = {
    "mean_dkn_neurons": "DKN neurons per fact",
    "mean_bdcs": "groups (BDCs) per fact",
    "mean_bdc_size": "neurons per group",
    "degeneracy_rate_%": "degenerate facts (%)",
    "mean_degeneracy_index": "degeneracy index",
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
        fig.add_bar(x=table["model"], y=table[m], showlegend=False, row=i // cols + 1, col=i % cols + 1)
    fig.update_annotations(font_size=13)
    fig.update_layout(title="DKN complexity per model (same facts)", template="plotly_white", height=300 * rows + 120)
    return fig


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
        "alone and together by > 30%). The paper reports only that DKNs grow more numerous and complex with "
        "model size (GPT-2 vs LLaMA2-7b), without a table to compare with.\n"
    )
