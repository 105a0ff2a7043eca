"""The robustness, enhancement and fact-checking experiments, end to end on a tiny random model.

Facts are built from the tiny vocabulary so that the model answers them (the answer is the
model's own top-1 word), written to a user JSONL file and run through `run_experiment`, so the
loader, the "known" filter, the resumable steps and the report writer are all exercised.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from tiny_models import WORDS, tiny_model

from dkn.datasets import DatasetError
from dkn.experiments import enhancement, fact_checking, robustness, runner
from dkn.experiments.conditions import CONDITIONS, ConditionParams, neuron_conditions
from dkn.experiments.perturb import (
    KINDS,
    PAPER_KINDS,
    PerturbationError,
    perturb,
    perturb_all,
)

SMALL = ConditionParams(max_neurons=10, random_seeds=2)
GROUPS, KN, KN_SUBSET, RANDOM = "candidate groups", "knowledge neurons", "KN subset", "random matched"
PARAMS = {
    "robustness": robustness.Params(conditions=SMALL, bootstrap=200),
    "enhancement": enhancement.Params(conditions=SMALL, bootstrap=200),
    "fact_checking": fact_checking.Params(conditions=SMALL, bootstrap=100, max_relations=3),
}
ITEM_FN = {
    "robustness": (robustness, "fact_record"),
    "enhancement": (enhancement, "fact_record"),
    "fact_checking": (fact_checking, "statement_record"),
}


@pytest.fixture(scope="module")
def lm():
    import torch

    torch.set_num_threads(1)
    return tiny_model("gpt2")


def known_rows(lm, n: int, n_relations: int = 3, seed: int = 0) -> list[dict]:
    """Facts whose answer is the tiny model's top-1 word after the first prompt (so it 'knows' them), with two
    paraphrases to select neurons on (held-out evaluation measures on the first prompt)."""
    from dkn.evaluate import next_token_distribution

    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        words = rng.sample(WORDS, 5)
        prompt = " ".join(words)
        word = lm.tokenizer.decode([int(next_token_distribution(lm, prompt).argmax())]).strip()
        if word in WORDS and word not in words:
            paraphrases = [" ".join(rng.sample(words[:-1], 4) + words[-1:]), " ".join(words[1:])]
            rows.append(
                {
                    "id": f"t/{len(rows)}",
                    "subject": words[1],
                    "relation": f"r{len(rows) % n_relations}",
                    "prompts": [prompt] + paraphrases,
                    "answer": word,
                }
            )
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def no_static_images(monkeypatch):
    monkeypatch.setattr(runner, "_write_static", lambda figure, stem: False)


def run(name, lm, dataset, tmp_path, store, params=None, limit=None):
    return runner.run_experiment(
        name,
        lm,
        dataset,
        limit=limit,
        params=params or PARAMS[name],
        store=store,
        out_dir=tmp_path / "out" / name,
        command="test",
    )


# -- perturbations -------------------------------------------------------------------------------------
def test_paper_perturbations_are_deterministic_and_keep_the_cloze():
    prompts = ["The capital of France is", "Paris is the capital city of", "x y", "The Eiffel Tower is located in"]
    for prompt in prompts:
        for seed in range(20):
            for kind in PAPER_KINDS:
                a = perturb(prompt, kind, seed, protect=["France"], answers=["Paris", "something"])
                assert a == perturb(prompt, kind, seed, protect=["France"], answers=["Paris", "something"])
                assert a.strip() and a != prompt
                words, new = prompt.split(), a.split()
                assert new[-1] == words[-1]  # the cloze still ends where it did
                assert "something" not in new  # placeholder never an answer word
                if "France" in words:
                    assert "France" in new  # the subject is kept
                assert len(new) == len(words) + {"replace": 0, "add": 1, "delete": -1}[kind]
    # different seeds give different perturbations (not always the same word)
    assert len({perturb("a b c d e f g h", "delete", s) for s in range(10)}) > 1


def test_perturbations_never_empty():
    assert perturb("Paris", "add", 0) != ""
    for kind in ("replace", "delete"):
        with pytest.raises(PerturbationError):
            perturb("Paris", kind, 0)  # only the last word: nothing may change
        with pytest.raises(PerturbationError):
            perturb("France is", kind, 0, protect=["France"])
    assert perturb_all("Paris", 0, kinds=PAPER_KINDS) == {
        "replace": None,
        "add": perturb("Paris", "add", 0),
        "delete": None,
    }
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb("a b", "shuffle")


# -- conditions ----------------------------------------------------------------------------------------
def test_conditions_differ_and_are_json(lm, store):
    from dkn.datasets import Fact

    ctx = runner.Context(lm, store, "conditions-test", 0)
    rows = known_rows(lm, 5)
    with_groups = 0
    for row in rows:
        fact = Fact(
            id=row["id"],
            subject=row["subject"],
            relation=row["relation"],
            answers=(row["answer"],),
            prompts=tuple(row["prompts"]),
            source="user",
        )
        record = neuron_conditions(ctx, fact, SMALL)
        assert json.loads(json.dumps(record, allow_nan=False)) == record  # exact JSON
        assert record["evaluation_prompt"] == fact.prompts[0] not in record["selection_prompts"]
        sets = record["sets"]
        kn, groups = {tuple(n) for n in sets[KN]}, {tuple(n) for n in sets[GROUPS]}
        assert groups <= kn  # candidate groups: part of the KNs
        if not groups:
            assert sets[KN_SUBSET] == sets[RANDOM] == []  # nothing to match: no rows
            continue
        with_groups += 1
        assert len(sets[RANDOM]) == len(sets[KN_SUBSET]) == 2
        for s in sets[KN_SUBSET]:  # size-matched subsets of the KNs
            assert len(s) == len(groups) and {tuple(n) for n in s} <= kn
        for s in sets[RANDOM]:
            assert len(s) == len(groups) and not ({tuple(n) for n in s} & kn)
            assert sorted(n[0] for n in s) == sorted(n[0] for n in sets[GROUPS])  # matched by layer
        assert sets[RANDOM][0] != sets[RANDOM][1]
        assert 0 <= record["jaccard"] <= 1 and record["baseline"] == "zero"
    assert with_groups >= 2


# -- end to end ------------------------------------------------------------------------------------------
def test_robustness_end_to_end(lm, tmp_path, store):
    data = write_jsonl(tmp_path / "facts.jsonl", known_rows(lm, 5))
    report, out = run("robustness", lm, data, tmp_path, store)
    assert (out / "report.md").exists() and (out / "robustness.csv").exists() and (out / "robustness.html").exists()
    table = report.tables["robustness"]
    assert set(table["condition"]) == set(CONDITIONS)
    assert set(table["mode"]) == {"last", "weights"} and set(table["perturbation"]) == set(KINDS)
    assert report.summary["n_facts"] == 5
    assert (table.loc[(table["condition"] == "none") & (table["perturbation"] == "filler"), "facts"] == 5).all()
    rows = table[(table["facts"] > 0)]
    assert np.isfinite(rows["median_log_ratio"]).all() and (rows["change_%_of_median"] <= 100).all()
    by = table.set_index(["perturbation", "mode", "condition"])["median_log_ratio"]
    values = [by[("filler", "last", c)] for c in (GROUPS, RANDOM, "none")]
    assert len({round(v, 6) for v in values}) == 3, values  # the conditions really differ
    assert (table.set_index(["condition"]).loc["none", "minus_none_median"] == 0).all()
    cost = report.tables["perturbation_cost"]
    assert list(cost["perturbation"]) == list(KINDS) and cost["still_answered_%"].between(0, 100).all()
    supp = report.tables["suppression_effect"].set_index(["mode", "condition"])
    assert supp.loc[("last", KN), "median_log_drop"] > supp.loc[("last", RANDOM), "median_log_drop"]
    text = (out / "report.md").read_text()
    assert "NTC" in text and "log P_normal" in text and "own cost" in text and "stage timings" in text
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert "attribution" in summary["stage_seconds"] and "interventions" in summary["stage_seconds"]


def test_paper_perturbations_stay_available(lm, tmp_path, store):
    data = write_jsonl(tmp_path / "facts.jsonl", known_rows(lm, 3))
    params = replace(PARAMS["robustness"], kinds=PAPER_KINDS, modes=("last",))
    report, out = run("robustness", lm, data, tmp_path, store, params=params)
    table = report.tables["robustness"]
    assert set(table["perturbation"]) == set(PAPER_KINDS)
    assert table.loc[table["condition"] == GROUPS, "paper_gpt2_%"].notna().all()
    assert "meaning-changing" in (out / "report.md").read_text()


def test_enhancement_end_to_end(lm, tmp_path, store):
    data = write_jsonl(tmp_path / "facts.jsonl", known_rows(lm, 6))
    report, out = run("enhancement", lm, data, tmp_path, store)
    table = report.tables["enhancement"]
    fails = report.tables["failing_queries"]
    assert fails["failing"].sum() > 0
    assert (table[table["condition"] == "none"]["recovered_%"].dropna() == 0).all()  # nothing amplified
    assert (table[table["condition"] == "none"]["median_log_gain"].dropna() == 0).all()
    rows = table[table["failing_queries"] > 0]
    assert ((rows["recovered_%"] >= 0) & (rows["recovered_%"] <= 100)).all()
    assert np.isfinite(rows["median_log_gain"]).all()
    groups = rows[rows["condition"] == GROUPS]["median_log_gain"].to_numpy()
    rnd = rows[rows["condition"] == RANDOM]["median_log_gain"].to_numpy()
    assert not np.allclose(groups, rnd)
    assert (out / "enhancement.csv").exists() and "recovered_%" in (out / "report.md").read_text()


def test_fact_checking_end_to_end(lm, tmp_path, store):
    data = write_jsonl(tmp_path / "facts.jsonl", known_rows(lm, 12))
    report, out = run("fact_checking", lm, data, tmp_path, store)
    table = report.tables["fact_checking"].set_index("condition")
    rels = report.tables["fact_checking_relations"]
    assert (
        len(rels) == 3 and (rels["train"] >= 1).all() and (rels["validation"] >= 1).all() and (rels["test"] >= 1).all()
    )
    assert set(table.index) >= {GROUPS, KN, KN_SUBSET, RANDOM, "ask", "answer probability", "always true"}
    n = report.summary["n_test_statements"]
    assert n > 0 and report.summary["n_test_true"] == n / 2  # one true and one wrong statement per fact
    for c in (GROUPS, KN, RANDOM, "answer probability", "always true"):
        assert 0 <= table.loc[c, "F1"] <= 1 and table.loc[c, "F1_ci_low"] <= table.loc[c, "F1_ci_high"]
    assert table.loc["always true", "recall"] == 1
    assert report.summary["n_validation_facts"] == rels["validation"].sum()
    assert "**Verdict.**" in (out / "report.md").read_text()
    assert (out / "fact_checking.csv").exists()


def test_fact_checking_uses_wrong_answers_and_splits_are_seeded(lm):
    from dkn.datasets import Fact

    fact = Fact(
        id="x",
        subject="s",
        relation="r",
        answers=("paris",),
        prompts=("a b",),
        source="templama",
        wrong_answers=("rome", "berlin"),
    )
    assert fact_checking.wrong_candidates(fact, ["tokyo"], 1, 0) == ["rome"]
    plain = replace(fact, wrong_answers=())
    pool = ["paris", "rome", "tokyo", "Paris"]
    w = fact_checking.wrong_candidates(plain, pool, 1, 0)
    assert w == fact_checking.wrong_candidates(plain, pool, 1, 0) and w[0] in ("rome", "tokyo")
    facts = [replace(fact, id=str(i)) for i in range(10)]
    p = fact_checking.Params()
    a, b = fact_checking.split("r", facts, p, 0), fact_checking.split("r", facts, p, 0)
    assert a == b and sum(map(len, a.values())) == 10 and all(a.values())
    assert not set(map(id, a["train"])) & set(map(id, a["test"]))


# -- resume ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["robustness", "enhancement", "fact_checking"])
def test_resume_after_a_crash_gives_the_same_results(name, lm, tmp_path, monkeypatch):
    from dkn.cache import ResultStore

    n_facts = 12 if name == "fact_checking" else 5
    data = write_jsonl(tmp_path / "facts.jsonl", known_rows(lm, n_facts))
    module, fn_name = ITEM_FN[name]
    original = getattr(module, fn_name)
    calls = []

    def counting(*args, crash_after=None, **kwargs):
        if crash_after is not None and len(calls) >= crash_after:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return original(*args, **kwargs)

    # an uninterrupted run in its own store
    monkeypatch.setattr(module, fn_name, counting)
    full, _ = run(name, lm, data, tmp_path / "a", ResultStore(tmp_path / "a.sqlite"))
    total = len(calls)
    assert total >= 3
    # crash after 2 items, then resume in the same store
    calls.clear()
    store = ResultStore(tmp_path / "b.sqlite")
    monkeypatch.setattr(module, fn_name, lambda *a, **k: counting(*a, crash_after=2, **k))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(name, lm, data, tmp_path / "b", store)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(module, fn_name, counting)
    resumed, _ = run(name, lm, data, tmp_path / "b", store)
    assert len(calls) == total - 2  # finished items were not recomputed
    for key, table in full.tables.items():
        pd.testing.assert_frame_equal(table, resumed.tables[key])
    full.summary.pop("stage_seconds"), resumed.summary.pop("stage_seconds")  # wall times differ, by nature
    assert json.dumps(full.summary, sort_keys=True) == json.dumps(resumed.summary, sort_keys=True)


# -- bad input -------------------------------------------------------------------------------------------
def test_rows_with_missing_fields_are_skipped(lm, tmp_path, store, caplog):
    rows = known_rows(lm, 3)
    broken = [dict(rows[0]), {"id": "no-answer", "prompt": "the sky is"}, {"id": "no-prompt", "answer": "blue"}]
    data = write_jsonl(tmp_path / "facts.jsonl", broken + rows[1:])
    with caplog.at_level("WARNING"):
        report, _ = run("robustness", lm, data, tmp_path, store)
    assert report.summary["n_facts"] == 3
    assert "missing field 'answer'" in caplog.text and "missing field 'prompt'" in caplog.text
    only_bad = write_jsonl(tmp_path / "bad.jsonl", broken[1:])
    with pytest.raises(DatasetError, match="no facts"):
        run("robustness", lm, only_bad, tmp_path, store)


@pytest.mark.parametrize("name", ["robustness", "enhancement", "fact_checking"])
def test_dataset_the_model_does_not_answer(name, lm, tmp_path, store):
    rows = known_rows(lm, 6)
    for r in rows:  # replace each answer by a word the model does not put first
        r["answer"] = next(
            w for w in ("madrid", "tokyo", "grass") if w != r["answer"] and w not in r["prompts"][0].split()
        )
    data = write_jsonl(tmp_path / "unknown.jsonl", rows)
    with pytest.raises(DatasetError, match="answers none|facts the model answers"):
        run(name, lm, data, tmp_path, store)


def test_unknown_experiment_lists_the_names(lm, tmp_path, store):
    with pytest.raises(ValueError, match="robustness.*enhancement.*fact_checking"):
        runner.run_experiment("robustnes", lm, "builtin", store=store, out_dir=tmp_path)
    for name in ("robustness", "enhancement", "fact_checking"):
        module = runner.experiment_module(name)
        assert module.NAME == name and callable(module.run)
        hash(module.Params())  # frozen


def test_a_new_attribution_default_is_a_new_run(lm, monkeypatch):
    """The run id holds the library's attribution defaults: params with attribution=None resumed results of the
    old integration rule after the default changed, as if they were the new one's."""
    from dataclasses import dataclass

    from dkn.attribution import AttributionParams

    params = runner.make_params("robustness")
    before = runner.run_key("robustness", lm, "builtin", 0, params)
    assert runner.run_key("robustness", lm, "builtin", 0, params) == before  # stable: a rerun resumes

    @dataclass(frozen=True)
    class OldDefaults(AttributionParams):
        steps: int = 20
        rule: str = "midpoint"

    monkeypatch.setattr(runner, "AttributionParams", OldDefaults)
    assert runner.run_key("robustness", lm, "builtin", 0, params) != before
