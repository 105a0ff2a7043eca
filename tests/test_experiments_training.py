"""Neuron-restricted fine-tuning (dkn.finetune), the evolvability and complexity experiments, and the
offline Gemma model's missing-package error.  Tiny random models only: seconds on a CPU."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from dkn import evaluate
from dkn.datasets import Fact
from dkn.experiments.runner import Context, make_params, write_report
from dkn.finetune import fresh_copy, neuron_masks, train_neurons
from dkn.neurons import Neuron

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on 2 cores

PAIRS = [("the capital of france is", "paris"), ("the capital of germany is", "berlin"), ("the sky is", "blue")]
NEURONS = [Neuron(0, 3), Neuron(1, 7), Neuron(2, 5), Neuron(2, 6)]


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _facts() -> list[Fact]:
    rows = [
        ("france", "paris", "the capital of {} is", "the capital city of {} is"),
        ("germany", "berlin", "the capital of {} is", "the capital city of {} is"),
        ("italy", "rome", "the capital of {} is", "the capital city of {} is"),
        ("spain", "madrid", "the capital of {} is", "in {} the capital is"),
        ("sky", "blue", "the {} is", "the color of the {} is"),
        ("grass", "green", "the {} is", "the color of the {} is"),
    ]
    return [Fact(f"t/{s}", s, "r", (a,), tuple(t.format(s) for t in ts), "user") for s, a, *ts in rows]


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_only_the_chosen_neurons_slices_change(family):
    lm = tiny_model(family)
    before = _state(lm)
    result = train_neurons(lm, PAIRS, NEURONS, steps=4, lr=1e-2, seed=0)
    after = _state(lm)
    masks = neuron_masks(lm, NEURONS)
    expected = {
        "gpt2": {"mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight"},
        "llama": {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"},
        "opt": {"fc1.weight", "fc1.bias", "fc2.weight"},
    }[family]
    assert {re.sub(r"^.*?\.\d+\.", "", k) for k in masks} == expected
    for name, value in before.items():
        if name not in masks:
            assert torch.equal(value, after[name]), f"{name} changed"
            continue
        mask = masks[name]
        assert torch.equal(value[~mask], after[name][~mask]), f"{name}: entries outside the neurons changed"
        assert not torch.equal(value[mask], after[name][mask]), f"{name}: the neurons' slices did not train"
    assert result.losses[-1] < result.losses[0]
    d = lm.config.hidden_size
    per_neuron = {"gpt2": 2 * d + 1, "llama": 3 * d, "opt": 2 * d + 1}[family]
    assert result.n_params == len(NEURONS) * per_neuron


def test_llama_slices_are_gate_up_rows_and_down_column():
    lm = tiny_model("llama")
    masks = neuron_masks(lm, [Neuron(1, 7)])
    gate, up, down = (masks[f"model.layers.1.mlp.{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj"))
    assert gate[7].all() and gate.sum() == gate.shape[1] and torch.equal(gate, up)
    assert down[:, 7].all() and down.sum() == down.shape[0]


def test_all_weights_change_everything_trainable():
    lm = tiny_model("gpt2")
    before = _state(lm)
    result = train_neurons(lm, PAIRS, None, steps=3, lr=1e-2)
    after = _state(lm)
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    changed = {n for n in trainable if not torch.equal(before[n], after[n])}
    # position embeddings beyond the prompts' length and unused token rows get no gradient; every tensor moves
    assert changed == trainable
    assert result.n_neurons is None and result.n_params == sum(p.numel() for p in lm.model.parameters())
    assert all(p.requires_grad for p in lm.model.parameters()) and not lm.model.training


def test_fresh_copy_is_independent():
    lm = tiny_model("llama")
    before = _state(lm)
    copy = fresh_copy(lm)
    train_neurons(copy, PAIRS, NEURONS, steps=2, lr=1e-2)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert copy.fingerprint != lm.fingerprint


def test_evolvability_end_to_end(store, tmp_path, monkeypatch):
    from dkn.experiments import evolvability

    lm = tiny_model("llama")
    original = _state(lm)
    starts = []
    real_train = evolvability.train_neurons

    def spy(copy, facts, neurons, **kw):
        starts.append(_state(copy))
        assert copy.model is not lm.model
        return real_train(copy, facts, neurons, **kw)

    monkeypatch.setattr(evolvability, "train_neurons", spy)
    params = evolvability.Params(
        n_new=3,
        n_old=2,
        steps=8,
        lrs=(1e-9, 5e-2),
        seeds=3,
        conditions=("knowledge neurons", "random matched", "all"),
        neurons=evolvability.ConditionParams(max_prompts=1, random_seeds=0, max_neurons=10, held_out=False),
    )
    ctx = Context(lm, store, "evo-test", seed=0)
    report = evolvability.run(ctx, _facts(), params, None)
    assert report.summary["original_weights_untouched"]
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in original.items())
    # per condition: the two-rate sweep on seed 0, then seeds 1 and 2 at the chosen rate (seed 0 reused)
    trained = [
        c
        for c in params.conditions
        if not report.tables["evolvability_runs"].query("condition == @c")["skipped"].astype(bool).any()
    ]
    assert len(starts) == len(trained) * 4 and len(trained) >= 2
    for state in starts:  # every run started from the original
        assert all(torch.equal(state[k], original[k]) for k in original)
    sweep = report.tables["evolvability_lr_sweep"]
    assert set(sweep["lr"]) == {1e-9, 5e-2} and sweep.groupby("condition")["chosen"].sum().eq(1).all()
    assert report.summary["chosen_lr"]["all"] == 5e-2  # a rate of 1e-9 learns nothing: never chosen
    runs = report.tables["evolvability_runs"]
    assert (runs[runs["condition"].isin(trained)].groupby("condition")["seed"].nunique() == 3).all()
    assert set(runs.loc[runs["condition"] == "random matched", "layers"]) != {""}
    table = report.tables["evolvability"]
    assert set(table["metric"]) == {"Q_new", "Q_old", "Q_au"} and "none" in set(table["condition"])
    assert report.summary["n_new"] >= 1
    trained_rows = table[table["condition"] != "none"]
    assert (trained_rows["seeds"] == 3).all() and trained_rows["lr"].notna().all()
    q_au = table[table["metric"] == "Q_au"]
    assert (q_au["facts"] == report.summary["n_new"]).all()  # the bootstrap resamples facts, not prompts
    none = table[(table.condition == "none") & (table.metric == "Q_new")]["accuracy_%"].item()
    assert none == 0.0  # new facts are the unknown ones
    write_report(
        tmp_path / "out",
        report,
        {
            "experiment": "evolvability",
            "model_label": lm.label,
            "command": "x",
            "fingerprint": lm.fingerprint,
            "dataset": "t",
            "limit": None,
            "seed": 0,
            "version": "t",
            "date": "t",
        },
    )
    assert (tmp_path / "out" / "evolvability_wide.csv").exists()
    # resumable: a second run takes everything from the store
    ctx2 = Context(lm, store, "evo-test", seed=0)
    evolvability.run(ctx2, _facts(), params, None)
    assert ctx2.computed == 0


def test_evolvability_fact_walk_reports_facts_found_not_one_line_per_check(store, monkeypatch):
    """The walk for new (unanswered, with a paraphrase) and old (answered) facts prints one progress line
    per fact it takes, counting towards n_new + n_old (it printed "known: 1/1" for every fact checked)."""
    from dkn.experiments import evolvability

    facts = _facts()
    known = {facts[0].id, facts[1].id, facts[2].id}
    monkeypatch.setattr(
        evaluate,  # the "known" step (dkn.experiments.runner.known_records) asks it
        "answers_correctly",
        lambda lm, prompt, answers: next(f for f in facts if f.prompt == prompt).id in known,
    )
    lines = []
    ctx = Context(tiny_model("llama"), store, "evo-walk", seed=0, progress=lambda *a: lines.append(a))
    new, old = evolvability.new_and_old_facts(ctx, facts, 2, 1)
    assert len(new) == 2 and len(old) == 1
    assert {f.id for f in old} <= known and not {f.id for f in new} & known
    assert [done for _, done, _ in lines] == [1, 2, 3]
    assert {(step, total) for step, _, total in lines} == {("new and old facts found", 3)}


def test_complexity_on_two_tiny_models(store, tmp_path, monkeypatch):
    from dkn.experiments import complexity

    folders = _saved_tiny_models(tmp_path, ("gpt2", "llama"))
    monkeypatch.setattr(evaluate, "answers_correctly", lambda lm, prompt, answers: True)  # random models know nothing
    from dkn.models import load_model

    ctx = Context(load_model(folders[0], device="cpu"), store, "cx-test", seed=0)
    params = complexity.Params(
        models=tuple(folders), neurons=complexity.ConditionParams(max_prompts=2, random_seeds=0, max_neurons=12)
    )
    report = complexity.run(ctx, _facts(), params, 3)
    table = report.tables["complexity"]
    assert list(table["model"]) == folders and (table["facts"] == 3).all()
    # what each model computed counts for the run: its stage timings and items (they were lost with the
    # per-model contexts, so a full run reported "nothing computed in this process")
    assert ctx.stages.calls["attribution"] == 6 and ctx.stages.calls["clustering + subset grid"] == 6
    assert ctx.computed >= 6
    assert {
        "mean_dkn_neurons",
        "mean_bdc_size",
        "degeneracy_rate_%",
        "mean_redundancy",
        "mean_excess_over_largest",
        "mean_dkn_neurons_ci_low",
        "mean_layer_span_share",
    } <= set(table.columns)
    assert "mean_degeneracy_index" not in table.columns  # the additive-rewarding index is not called degeneracy
    assert (table["mean_dkn_neurons_ci_low"] <= table["mean_dkn_neurons"]).all()
    assert (table["mean_dkn_neurons"] <= table["mean_dkn_neurons_ci_high"]).all()
    assert report.summary["n_facts"] == 3
    # paired: the second model minus the first on the same facts, one row per measure
    paired = report.tables["complexity_paired"]
    assert set(paired["measure"]) == set(complexity.PAIRED_MEASURES) and (paired["n"] <= 3).all()
    by_fact = {name: {r["fact"]: r["n_dkn"] for r in records} for name, records in _complexity_records(report)}
    diffs = [by_fact[folders[1]][f] - by_fact[folders[0]][f] for f in by_fact[folders[0]]]
    row = paired[paired["measure"] == "n_dkn"].iloc[0]
    assert row["mean"] == pytest.approx(np.mean(diffs)) and row["comparison"] == f"{folders[1]} - {folders[0]}"
    # the figure: one bar chart per metric in a grid of 3 columns, short readable titles (they overlapped
    # as six raw column names in one row)
    fig = complexity._figure(table)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == list(complexity.FIGURE_METRICS.values()) and max(map(len, titles)) <= 30
    assert {t.xaxis for t in fig.data} == {"x", *(f"x{i}" for i in range(2, len(titles) + 1))}
    assert len({round(a.y, 3) for a in fig.layout.annotations}) == 2  # two rows of titles


def _saved_tiny_models(folder, families) -> list[str]:
    """One tiny random model per family saved as a folder (what load_model takes as a model name)."""
    out = []
    for family in families:
        lm = tiny_model(family)
        lm.model.save_pretrained(folder / family, safe_serialization=True)
        lm.tokenizer.save_pretrained(folder / family)
        out.append(str(folder / family))
    return out


def _complexity_records(report):
    """(model, per-fact records) from a complexity report's summary: its paired rows are checked against them."""
    return [(m["model"], report.summary["records"][m["model"]]) for m in report.summary["models"]]


def test_shared_known_facts_stops_at_the_limit_and_checks_the_second_model_only_when_the_first_answers(
    store, tmp_path, monkeypatch
):
    """The walk goes fact by fact through every model: with a limit it stops once enough facts are shared
    (it used to check the whole dataset, up to 2000 facts, on the first model before the second began)."""
    from dkn.experiments import complexity
    from dkn.models import load_model

    folders = _saved_tiny_models(tmp_path, ("gpt2", "llama"))
    facts = _facts()
    first_knows = {facts[0].id, facts[2].id}  # the first model answers facts 0 and 2, the second every fact
    checks = []

    def answers(lm, prompt, answers):
        fact = next(f for f in facts if f.prompt == prompt)
        checks.append((lm.name, fact.id))
        return lm.name != folders[0] or fact.id in first_knows

    monkeypatch.setattr(evaluate, "answers_correctly", answers)
    lines = []
    ctx = Context(load_model(folders[0], device="cpu"), store, "cx-known", seed=0, progress=lambda *a: lines.append(a))
    chosen = complexity.shared_known_facts(ctx, facts, 1, folders)
    assert [f.id for f in chosen] == [facts[0].id]
    assert checks == [(folders[0], facts[0].id), (folders[1], facts[0].id)]  # stopped at the limit
    assert lines == [("facts all 2 models answer", 1, 1)]
    checks.clear()
    chosen = complexity.shared_known_facts(ctx, facts, None, folders)
    assert [f.id for f in chosen] == [facts[0].id, facts[2].id]
    assert (folders[1], facts[1].id) not in checks  # the first model missed it: the second never checks it
    with pytest.raises(complexity.DatasetError, match="answered by all of"):
        complexity.shared_known_facts(ctx, facts[1:2], None, folders)


def test_make_params_from_the_command_line():
    p = make_params("complexity", ["models=default,gemma3-270m"])
    assert p.models == ("default", "gemma3-270m")
    p = make_params("evolvability", ["steps=5", "lrs=0.01,0.03", "n_old=none", "seeds=4"])
    assert (p.steps, tuple(map(float, p.lrs)), p.n_old, p.seeds) == (5, (0.01, 0.03), None, 4)
    assert make_params("evolvability", full=True).steps > make_params("evolvability").steps
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        make_params("evolvability", ["nope=1"])


def test_gemma_without_its_package_says_make_gemma(isolated_cache_dir, tmp_path, monkeypatch):
    """No converted folder and no package: the message names `make gemma`.  The models folder is an empty
    tmp one, so the test means the same on a machine where `make gemma` already converted Gemma."""
    from dkn import models, paths

    monkeypatch.setenv(paths.ENV_MODELS, str(tmp_path / "no-models"))

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == models.GEMMA_PACKAGE else real(name, *a)
    )
    with pytest.raises(models.ModelLoadError, match="make gemma"):
        models.load_model("gemma3-270m", device="cpu")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_top1_matches_one_at_a_time(family):
    from dkn.evaluate import answers_correctly, answers_correctly_many

    lm = tiny_model(family)
    items = [(f.prompts[i], f.answers) for f in _facts() for i in range(2)]
    tops = []
    from dkn.evaluate import next_token_distribution

    for prompt, _ in items:  # make some of them "known": ask for the top-1 word
        tops.append((prompt, (lm.tokenizer.decode([int(next_token_distribution(lm, prompt).argmax())]).strip(),)))
    items += [t for t in tops if t[1][0]]
    assert answers_correctly_many(lm, items, batch_size=5) == [answers_correctly(lm, p, a) for p, a in items]
    assert any(answers_correctly_many(lm, items))
