"""The experiments' measures, controls and statistics (issue 9): bounded log ratios with fact-bootstrap medians,
size- and activation-matched controls, the per-family attribution baseline, held-out prompts and selection
stability, answerable perturbations, fact-checking thresholds and verdict, stage timings and the ETA."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dkn.attribution import AttributionParams
from dkn.datasets import Fact
from dkn.experiments import acquisition, fact_checking, robustness, timing
from dkn.experiments.conditions import (
    CONDITIONS,
    GROUPS,
    KN,
    NONE,
    RANDOM,
    SEEDED,
    ConditionParams,
    activation_matched_sets,
    bootstrap_facts,
    default_attribution,
    jaccard,
    kn_subsets,
    log_ratio,
    percent_from_log,
    prompt_split,
    selection_jaccard,
)
from dkn.experiments.perturb import FILLERS, KINDS, SYNONYMS, PerturbationError, perturb
from dkn.experiments.runner import Context
from dkn.neurons import Neuron

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on 2 cores


# -- bounded measures ----------------------------------------------------------------------------------
def _record(p_normal: float, p_perturbed: float) -> dict:
    """A robustness record where every condition has the same P on the normal and the perturbed prompt."""
    probs = {c: ([p_normal] * 2 if c in SEEDED else p_normal) for c in CONDITIONS}
    pert = {c: ([p_perturbed] * 2 if c in SEEDED else p_perturbed) for c in CONDITIONS}
    return {
        "probs": {"normal": {"last": probs}, "typo": {"last": pert}},
        "perturbed_correct": {"typo": True},
        "n": dict.fromkeys(CONDITIONS[:-1], 3),
    }


def test_log_ratio_median_stays_bounded_where_the_old_percentage_exploded():
    # nine facts lose 10% of P; one fact has P_normal = 1e-6 after suppression and P_perturbed = 0.5, the case
    # that drove the shipped mean of 100 (P_n - P_p) / P_n to -9929%
    records = [_record(0.5, 0.45) for _ in range(9)] + [_record(1e-6, 0.5)]
    old_mean = np.mean(
        [
            100 * (r["probs"]["normal"]["last"][KN] - r["probs"]["typo"]["last"][KN]) / r["probs"]["normal"]["last"][KN]
            for r in records
        ]
    )
    assert old_mean < -1e6  # what the old measure reported
    params = robustness.Params(modes=("last",), kinds=("typo",), bootstrap=500)
    table = robustness.robustness_table(records, params, seed=0).set_index("condition")
    r = math.log(0.5) - math.log(0.45)
    assert table.loc[KN, "median_log_ratio"] == pytest.approx(r)
    assert table.loc[KN, "change_%_of_median"] == pytest.approx(10.0)
    assert abs(table.loc[KN, "median_ci_low"]) < 1 and abs(table.loc[KN, "median_ci_high"]) < 1
    assert table.loc[KN, "minus_none_median"] == 0  # the same P in every condition: no effect
    assert table.loc[NONE, "facts"] == 10


def test_log_ratio_has_a_floor_and_the_percentage_maps_back():
    assert log_ratio(0.0, 1.0) == pytest.approx(math.log(1e-30))  # P = 0: finite, not -inf
    assert log_ratio(None, 0.5) is None
    assert percent_from_log(math.log(1 / 0.4)) == pytest.approx(60.0)
    assert percent_from_log(0.0) == 0 and math.isnan(percent_from_log(None))
    assert acquisition.log_drop(0.5, 0.5) == pytest.approx(math.log(2))
    assert math.isfinite(acquisition.log_drop(0.5, 1.0))  # P suppressed to 0


def test_fact_bootstrap_median_and_interval():
    values = [0.1] * 19 + [50.0, None]
    b = bootstrap_facts(values, n_boot=500, seed=1)
    assert b["n"] == 20 and b["median"] == pytest.approx(0.1) and b["mean"] > 2
    assert b["median_ci_low"] <= 0.1 <= b["median_ci_high"] < 1
    assert b == bootstrap_facts(values, n_boot=500, seed=1)  # seeded


# -- controls ------------------------------------------------------------------------------------------
def test_kn_subsets_are_size_matched_subsets_of_the_kns():
    kns = [Neuron(l, i) for l in range(3) for i in range(10)]
    subsets = kn_subsets(kns, 7, n_seeds=4, seed=0)
    assert len(subsets) == 4 and len(set(subsets)) > 1
    for s in subsets:
        assert len(s) == 7 == len(set(s)) and set(s) <= set(kns)
    assert kn_subsets(kns, 0, 3, 0) == [] and len(kn_subsets(kns[:2], 5, 1, 0)[0]) == 2


def test_random_matched_follows_layer_and_mean_activation():
    acts = np.tile(np.arange(200, dtype=float), (2, 1))  # [2 layers, 200]: activation = index
    target = [Neuron(0, 180), Neuron(0, 190), Neuron(1, 20)]
    exclude = set(target) | {Neuron(0, 181)}
    sets = activation_matched_sets(target, exclude, acts, n_seeds=20, seed=0, pool=5)
    control = activation_matched_sets(target, exclude, acts, n_seeds=20, seed=0, pool=200)  # layer only
    for s in sets:
        assert sorted(n.layer for n in s) == [0, 0, 1] and not set(s) & exclude and len(set(s)) == 3
    gap = lambda ss: np.mean([min(abs(n.index - t.index) for t in target if t.layer == n.layer) for s in ss for n in s])
    assert gap(sets) <= 6  # drawn among the 5 nearest free neurons
    assert gap(control) > 20  # layer-matched only: far away
    assert len(set(sets)) > 1 and sets == activation_matched_sets(target, exclude, acts, 20, 0, 5)


# -- per-family baseline -------------------------------------------------------------------------------
def test_default_baseline_is_amig_after_a_post_mlp_norm(models):
    assert default_attribution(models("gemma3_text")).baseline == "amig"
    for family in ("llama", "gpt2"):
        assert default_attribution(models(family)).baseline == "zero"
    explicit = default_attribution(models("gemma3_text"), AttributionParams(baseline="zero"))
    assert explicit.baseline == "zero"  # an explicit choice wins


def test_complexity_states_the_baseline_and_the_cap(models, store, monkeypatch):
    from dkn.experiments import complexity

    lm = models("gemma3_text")
    monkeypatch.setattr(complexity, "known_facts", lambda ctx, facts, limit: facts[:limit])
    facts = [Fact("g/0", "france", "r", ("paris",), ("the capital of france is", "the city of france is"), "user")]
    report = complexity.run(Context(lm, store, "cx-gemma"), facts, complexity.Params(), 1)
    table = report.tables["complexity"]
    assert table["ig_baseline"].tolist() == ["amig"] and table["capped_facts"].tolist() == [0]
    assert "AMIG" in report.markdown and "no cap" in report.markdown
    assert complexity.Params().neurons.max_neurons is None  # the 40-neuron cap is lifted


# -- held-out prompts, stability -----------------------------------------------------------------------
def test_selection_and_evaluation_prompts_are_disjoint():
    fact = Fact("x", "france", "r", ("paris",), ("p0", "p1", "p2", "p3"), "user")
    selection, evaluation = prompt_split(fact, ConditionParams(max_prompts=2))
    assert evaluation == "p0" and selection == ["p1", "p2"]
    assert prompt_split(fact, ConditionParams(max_prompts=2, held_out=False)) == (["p0", "p1"], "p0")
    with pytest.raises(ValueError, match="held-out evaluation needs a paraphrase"):
        prompt_split(Fact("y", "s", "r", ("a",), ("only",), "user"), ConditionParams())


def test_selection_jaccard_is_one_for_the_same_prompt_and_lower_for_different_ones(models, store):
    lm = models("gpt2")
    ctx = Context(lm, store, "jaccard")
    params = default_attribution(lm)
    same = selection_jaccard(ctx, ["the capital of france is"] * 2, "paris", params, 0.2)
    other = selection_jaccard(ctx, ["the capital of france is", "the sky is blue and the sea is"], "paris", params, 0.2)
    assert same == 1.0 and 0 <= other < 1
    assert selection_jaccard(ctx, ["one prompt"], "paris", params, 0.2) is None
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3) and jaccard(set(), set()) == 1.0


# -- perturbations -------------------------------------------------------------------------------------
def test_answerable_perturbations_keep_the_question():
    prompt, protect = "The official language of France is", ["France"]
    for seed in range(15):
        typo = perturb(prompt, "typo", seed, protect=protect, answers=["French"])
        changed = [(a, b) for a, b in zip(prompt.split(), typo.split()) if a != b]
        assert len(changed) == 1 and sorted(changed[0][0]) == sorted(changed[0][1])  # two letters swapped
        assert changed[0][0] not in ("France", "is")
        filler = perturb(prompt, "filler", seed, protect=protect)
        extra = set(filler.replace(",", "").lower().split()) - set(prompt.lower().split())
        assert extra and extra <= {w for f in FILLERS for w in f.split()} and filler.endswith(" is")
        synonym = perturb(prompt, "synonym", seed, protect=protect)
        assert synonym != prompt and "France" in synonym and synonym.endswith(" is")
        assert any(SYNONYMS[w] in synonym for w in ("official", "language"))
        assert perturb(prompt, "typo", seed, protect=protect) == typo  # deterministic
    with pytest.raises(PerturbationError, match="synonym"):
        perturb("zz qq is", "synonym", 0)
    with pytest.raises(PerturbationError, match="four letters"):
        perturb("a an is", "typo", 0)
    assert KINDS == ("typo", "filler", "synonym")  # the default


# -- fact checking -------------------------------------------------------------------------------------
def test_fact_checking_scores_per_token_and_pools_validation(models):
    assert fact_checking.statement_attribution(models("gpt2"), fact_checking.Params()).combine == "mean"
    assert fact_checking.Params().threshold_scope == "pooled"
    scores = {c: ([0.0, 0.0] if c in SEEDED else 0.0) for c in fact_checking.NEURON_CONDITIONS}
    val = []
    for rel in ("a", "b", "c"):  # per relation one fact: one true, one false
        for label, s in ((True, 2.0), (False, -1.0)):
            val.append(
                {
                    "relation": rel,
                    "label": label,
                    "scores": {**scores, GROUPS: s + (rel == "c")},
                    "p_true": None,
                    "p_false": None,
                    "answer_logprob": s,
                }
            )
    th = fact_checking.choose_thresholds(val, n_seeds=2)
    preds = [v["scores"][GROUPS] > th[GROUPS] for v in val]
    assert preds == [v["label"] for v in val]  # one pooled threshold separates all relations
    assert len(th[RANDOM]) == 2


def test_fact_checking_verdict_says_when_the_answer_probability_wins():
    rows = pd.DataFrame(
        [
            {"condition": GROUPS, "F1": 0.73, "F1_ci_low": 0.65, "F1_ci_high": 0.80},
            {"condition": KN, "F1": 0.70, "F1_ci_low": 0.6, "F1_ci_high": 0.78},
            {"condition": "answer probability", "F1": 0.97, "F1_ci_low": 0.94, "F1_ci_high": 0.99},
        ]
    ).set_index("condition")
    text = fact_checking._verdict(rows, {GROUPS: 0.8})
    assert "loses to the answer-probability baseline" in text and "0.97" in text and "Spearman 0.80" in text
    rows.loc[GROUPS, ["F1", "F1_ci_low", "F1_ci_high"]] = [0.99, 0.995, 1.0]
    assert "beats" in fact_checking._verdict(rows, {})


# -- timings and ETA -----------------------------------------------------------------------------------
def test_stage_times_and_eta_with_a_fake_clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    class Ctx:
        pass

    ctx = Ctx()
    with timing.stage(ctx, "attribution"):
        now[0] += 30
    with timing.stage(ctx, "training"):
        now[0] += 90
    with timing.stage(ctx, "attribution"):
        now[0] += 10
    assert ctx.stages.as_dict() == {
        "training": {"seconds": 90.0, "calls": 1},
        "attribution": {"seconds": 40.0, "calls": 2},
    }
    assert timing.StageTimes.from_dict(ctx.stages.as_dict()).as_dict() == ctx.stages.as_dict()
    assert "training 90.0 s (69%" in ctx.stages.text()

    lines = []
    progress = timing.EtaProgress(
        out=type("W", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})(), every=0
    )
    progress.previous = now[0]
    for _ in range(3):  # three resumed items: free
        progress("facts", _ + 1, 10)
    for done in range(4, 6):  # two computed items of 20 s each
        now[0] += 20
        progress("facts", done, 10)
    assert progress.eta("facts", 5, 10) == pytest.approx(100.0)  # 5 left x 20 s
    assert any("facts: 5/10" in line and "ETA 1m40s" in line for line in lines)


def test_bad_perturbation_kinds_and_single_prompt_facts(models, store):
    from dkn.experiments.conditions import select_facts
    from dkn.experiments.perturb import check_kinds

    with pytest.raises(ValueError, match="unknown perturbation kinds.*typo"):
        check_kinds(("typo", "shuffle"))
    assert check_kinds(["replace", "add"]) == ("replace", "add")
    facts = [Fact("a", "s", "r", ("x",), ("one",), "user"), Fact("b", "s", "r", ("x",), ("p0", "p1"), "user")]
    ctx = Context(models("gpt2"), store, "select")
    assert [f.id for f in select_facts(ctx, facts, None, True, ConditionParams())] == ["b"]  # held out: needs 2
    assert [f.id for f in select_facts(ctx, facts, None, True, ConditionParams(held_out=False))] == ["a", "b"]


def test_known_facts_reports_answered_facts_of_those_needed(models, store, monkeypatch):
    """The "known" filter checks one fact at a time: its progress counts the facts found of those needed
    (a line per answered fact, so the ETA includes the misses), not "1/1" for every fact checked."""
    from dkn import evaluate
    from dkn.experiments.runner import known_facts

    facts = [Fact(f"t/{i}", f"s{i}", "r", ("paris",), (f"the capital {i} is",), "user") for i in range(9)]
    monkeypatch.setattr(evaluate, "answers_correctly", lambda lm, prompt, answers: int(prompt.split()[2]) % 3 == 0)
    calls = []
    ctx = Context(models("llama"), store, "known-test", seed=0)
    ctx.progress = lambda step, done, total: calls.append((step, done, total))
    chosen = known_facts(ctx, facts, limit=2)
    assert [f.id for f in chosen] == ["t/0", "t/3"]
    assert calls == [("facts the model answers", 1, 2), ("facts the model answers", 2, 2)]
    calls.clear()
    assert [f.id for f in known_facts(ctx, facts, limit=None)] == ["t/0", "t/3", "t/6"]  # resumed from the store
    assert calls == [("facts checked", k, 9) for k in range(1, 10)]  # no limit: every fact is checked


def test_fact_checking_checks_a_bounded_number_of_facts_per_relation(models, store, monkeypatch):
    """A relation the model barely knows (TempLAMA's: thousands of facts) costs at most `max_checked`
    checks, then it is skipped; a known relation is still chosen."""
    from dkn import evaluate

    checked = []

    def answers(lm, prompt, answers):
        checked.append(prompt)
        return prompt.startswith("known")

    monkeypatch.setattr(evaluate, "answers_correctly", answers)
    unknown = [Fact(f"u/{i}", f"s{i}", "rare", ("x",), (f"rare {i} is",), "user") for i in range(500)]
    known = [Fact(f"k/{i}", f"t{i}", "capital", ("y",), (f"known {i} is",), "user") for i in range(6)]
    ctx = Context(models("llama"), store, "fc-bound", seed=0)
    chosen = fact_checking.choose_relations(ctx, unknown + known, 12, fact_checking.Params(max_checked=40))
    assert list(chosen) == ["capital"] and len(chosen["capital"]) == 3  # ceil(12 / 5 relations) facts
    assert sum(p.startswith("rare") for p in checked) == 40


def test_the_report_says_where_the_wrong_statements_come_from():
    """Only the chosen relations' facts count: a dataset with TempLAMA facts whose relations were all skipped
    must not be reported as judged on TempLAMA's wrong facts."""
    params = fact_checking.Params()
    plain = [Fact("p/1", "s", "P36", ("paris",), ("the capital is",), "user")]
    temporal = [Fact("t/1", "s", "P39", ("x",), ("held the post of",), "user", wrong_answers=("y",))]
    assert fact_checking.wrong_statement_source(plain, params).startswith("another fact's answer")
    assert "no chosen relation has TempLAMA" in fact_checking.wrong_statement_source(plain, params)
    assert fact_checking.wrong_statement_source(plain + temporal, params).startswith("TempLAMA wrong facts")
    assert "for 1 of 2 facts" in fact_checking.wrong_statement_source(plain + temporal, params)
