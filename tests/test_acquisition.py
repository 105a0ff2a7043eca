"""Experiment 1 (degeneracy of acquisition) end to end on a tiny model: table, resume, P consistency."""

from __future__ import annotations

import pandas as pd
import pytest
from tiny_models import tiny_model

from dkn.cache import ResultStore
from dkn.datasets import Fact
from dkn.experiments import acquisition
from dkn.experiments.runner import Context
from dkn.interventions import intervene_many

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on 2 cores

FACTS = [
    Fact(f"t/{i}", s, "capital", (a,), (f"the capital of {s} is", f"the city of {s} is"), "user")
    for i, (s, a) in enumerate([("france", "paris"), ("germany", "berlin"), ("italy", "rome")])
]


@pytest.fixture
def context(tmp_path, monkeypatch):
    monkeypatch.setattr(acquisition, "known_facts", lambda ctx, facts, limit: facts[:limit])  # tiny models know nothing
    return Context(tiny_model("gpt2"), ResultStore(tmp_path / "store.sqlite"), "run-1")


def test_acquisition_runs_and_resumes(context):
    params = acquisition.Params(max_prompts=2, t=0.05)
    report = acquisition.run(context, FACTS, params, limit=3)
    assert report.summary["n_facts"] == 3 and context.computed == 3
    summary = report.tables["acquisition_summary"]
    assert list(summary["method"]) == list(acquisition.CLUSTERER_NAMES)
    assert (summary["facts"] == 3).all()
    by_bdcs = report.tables["acquisition_by_bdcs"]
    assert set(by_bdcs["method"]) == set(acquisition.CLUSTERER_NAMES)
    for method in acquisition.CLUSTERER_NAMES:  # every fact counted once per method
        assert by_bdcs[by_bdcs["method"] == method]["facts"].sum() == 3

    again = acquisition.run(context, FACTS, params, limit=3)  # resumed: nothing recomputed
    assert context.computed == 3
    for name, table in report.tables.items():  # NaN where a method found < 2 groups
        pd.testing.assert_frame_equal(again.tables[name], table)


def test_recorded_probability_is_the_models(context):
    record = acquisition.fact_record(context, FACTS[0], acquisition.Params(max_prompts=2, t=0.05))
    prob, _ = intervene_many(context.lm, FACTS[0].prompts[0], FACTS[0].answer, [], 0.0)
    assert record["prob"] == pytest.approx(prob, rel=1e-6)
    assert set(record["methods"]) == set(acquisition.CLUSTERER_NAMES)


def test_selection_is_held_out_and_drops_are_log_ratios(context, monkeypatch):
    seen = []
    real = acquisition.find_knowledge_neurons
    monkeypatch.setattr(
        acquisition,
        "find_knowledge_neurons",
        lambda lm, prompts, *a, **k: seen.append(list(prompts)) or real(lm, prompts, *a, **k),
    )
    params = acquisition.Params(max_prompts=2, t=0.05, clusterers=("ntc",))
    record = acquisition.fact_record(context, FACTS[0], params)
    assert seen == [[FACTS[0].prompts[1]]] and record["held_out"]  # selected without prompts[0]
    prob, _ = intervene_many(context.lm, FACTS[0].prompts[0], FACTS[0].answer, [], 0.0)
    assert record["prob"] == pytest.approx(prob, rel=1e-6)  # ... and tested on it
    m = record["methods"]["ntc"]
    assert m["union_log_drop"] == pytest.approx(acquisition.log_drop(record["prob"], m["union_drop"]))
    single = Fact("t/one", "spain", "capital", ("madrid",), ("the capital of spain is",), "user")
    assert not acquisition.fact_record(context, single, params)["held_out"]  # no paraphrase: in-sample, flagged
    summary = acquisition.summary_table([record], ("ntc",))
    assert {"proper_median_log_drop", "all_median_log_drop", "all_%_of_median"} <= set(summary.columns)
