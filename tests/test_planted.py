"""Planted ground truth (dkn.planted): the constructions are what they claim, and the analysis finds them.

Every claim is measured here through dkn.interventions, independently of the drops the constructions
record about themselves.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from dkn.attribution import AttributionParams, attribute
from dkn.degeneracy import DegeneracyParams, analyse
from dkn.interventions import intervene_many
from dkn.neurons import Neuron
from dkn.planted import (
    TINY_FAMILIES,
    PlantedFact,
    PlantParams,
    plant_default,
    read_manifest,
    satisfies_kind,
    tiny_planted_model,
)
from dkn.selection import coarse_neurons

pytestmark = pytest.mark.usefixtures("one_thread")


def drops(lm, fact: PlantedFact, sets) -> np.ndarray:
    prob, probs = intervene_many(lm, fact.prompt, fact.answer, sets, 0.0)
    return (prob - probs) / prob


def jaccard(a, b) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("n_groups", [2, 3])
def test_a_fact_stored_in_disjoint_groups_survives_each_and_dies_with_all(family, n_groups):
    pm = tiny_planted_model(family, "degenerate", n_groups, seed=1)
    lm, fact = pm.lm, pm.facts[0]
    assert len(fact.groups) == n_groups and len(set(fact.neurons)) == len(fact.neurons)  # disjoint
    layers = [{n.layer for n in g} for g in fact.groups]
    assert all(not (a & b) for i, a in enumerate(layers) for b in layers[i + 1 :])  # different layers
    single = drops(lm, fact, list(fact.groups))
    assert np.all(np.abs(single) < 0.05), single
    everything = drops(lm, fact, [fact.neurons])[0]
    assert everything > 0.8
    # every pair of groups off (for three): the remaining group still carries the fact
    if n_groups == 3:
        pairs = [fact.groups[0] + fact.groups[1], fact.groups[1] + fact.groups[2]]
        assert np.all(drops(lm, fact, pairs) < 0.05)
    # as many random other neurons off, in the same layers: nothing happens
    rng = np.random.default_rng(0)
    others = [
        Neuron(n.layer, int(i))
        for n in fact.neurons
        for i in rng.choice([j for j in range(lm.d_mlp) if Neuron(n.layer, j) not in fact.neurons], 1)
    ]
    assert abs(drops(lm, fact, [others])[0]) < 0.05
    assert fact.verified and fact.drops["all"] == pytest.approx(everything, abs=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_single_pathway_control_needs_every_member(family):
    pm = tiny_planted_model(family, "single", seed=1)
    lm, fact = pm.lm, pm.facts[0]
    (group,) = fact.groups
    assert drops(lm, fact, [group])[0] > 0.8
    assert np.all(drops(lm, fact, [(n,) for n in group]) > 0.5)  # a chain: each member is needed
    assert fact.verified


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_additive_control_needs_each_group(family):
    pm = tiny_planted_model(family, "additive", 2, seed=1)
    lm, fact = pm.lm, pm.facts[0]
    single = drops(lm, fact, list(fact.groups))
    assert np.all(single > 0.15), single
    assert drops(lm, fact, [fact.neurons])[0] > 0.8
    assert not satisfies_kind("degenerate", list(single), 0.9)


def test_bad_planted_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown planted kind"):
        tiny_planted_model("llama", "twice")
    with pytest.raises(ValueError, match="2 or 3 groups"):
        tiny_planted_model("llama", "degenerate", 1)
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_planted_model("opt", "single")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ntc_finds_the_planted_groups_and_no_degeneracy_on_the_controls(family):
    """Given the planted neurons, NTC recovers every planted group (Jaccard 1) and calls the fact degenerate;
    on the single-pathway and additive controls it says not degenerate."""
    params = DegeneracyParams(clusterer="ntc", random_seeds=1)
    for n_groups in (2, 3):
        fact_model = tiny_planted_model(family, "degenerate", n_groups, seed=0)
        fact = fact_model.facts[0]
        r = analyse(fact_model.lm, fact.prompt, fact.answer, fact.neurons, params=params)
        assert r.degenerate, r.verdict
        assert all(max(jaccard(g, c) for c in r.dkn) == 1.0 for g in fact.groups)
    for kind in ("single", "additive"):
        control = tiny_planted_model(family, kind, 2, seed=0)
        fact = control.facts[0]
        r = analyse(control.lm, fact.prompt, fact.answer, fact.neurons, params=params)
        assert not r.degenerate, (kind, r.verdict)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_shared_carrier_feeds_every_group_and_is_needed_by_all(family):
    """carrier=True: one neuron in layer 0, in no group, whose suppression alone removes the fact while each
    group can still go; integrated gradients ranks it first and the planted groups below the coarse threshold
    (the case that ends naive backup rounds at once).  Without a carrier the construction is unchanged."""
    pm = tiny_planted_model(family, "degenerate", 2, carrier=True, seed=0)
    lm, fact = pm.lm, pm.facts[0]
    (carrier,) = fact.carriers
    assert carrier.layer == 0 and carrier not in fact.neurons and min(n.layer for n in fact.neurons) == 1
    assert fact.verified and fact.drops["carriers"] > 0.3 and max(fact.drops["A"], fact.drops["B"]) < 0.05
    assert drops(lm, fact, [(carrier,)])[0] > 0.3
    scores = attribute(lm, fact.prompt, fact.answer).scores
    assert coarse_neurons(scores, 0.2) == [carrier]
    plain = tiny_planted_model(family, "degenerate", 2, seed=0)
    assert plain.facts[0].carriers == () and plain.lm.n_layers == lm.n_layers - 1


def test_manifest_round_trip(tmp_path):
    fact = PlantedFact(
        "p", "a", "degenerate", ((Neuron(1, 2), Neuron(2, 3)), (Neuron(5, 6),)), {"A": 0.01}, carriers=(Neuron(0, 4),)
    )
    (tmp_path / "manifest.json").write_text(json.dumps({"facts": [fact.as_json()]}))
    assert read_manifest(tmp_path) == (fact,)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="rebuild it"):
        read_manifest(tmp_path)


# -- the planting machinery (neuron-restricted fine-tuning), on a tiny LLaMA with one pathway -----------------
UNRELATED = [
    ("the sky was blue and", "the"),
    ("new york and london", "and"),
    ("the sun and the moon", "and"),
    ("the king and the queen", "of"),
    ("red and green and", "blue"),
    ("a city in spain", "and"),
]


# one degenerate fact planted into a tiny base in 80 steps
TINY_PLANTING = dict(n_degenerate=1, n_single=0, n_additive=0, b_per_layer=2, steps=80, lr=3e-2, attribution_steps=5)


def _plant_tiny(kl_weight: float, **overrides):
    base = tiny_planted_model("llama", "single", extra_layers=4, seed=2)
    fact = base.facts[0]
    params = PlantParams(**overrides, **TINY_PLANTING, kl_weight=kl_weight, n_unrelated=4, n_heldout=2)
    return (
        base,
        fact,
        plant_default(base.lm, params, facts=[(fact.prompt, fact.answer)] + UNRELATED, log=lambda m: None),
    )


def test_planting_a_second_pathway_makes_a_single_pathway_fact_degenerate():
    """plant_default's machinery on a tiny base whose fact has one pathway (A, a chain in layers 0-1): it trains
    a disjoint group B in distant layers so that each pathway off leaves P (< 5%) and both off remove it; the
    KL term keeps held-out unrelated prompts close to the base model (and without it they drift)."""
    base, fact, pm = _plant_tiny(kl_weight=5.0)
    (planted,) = pm.facts
    a, b = planted.groups
    assert set(a) == set(fact.groups[0])  # A: the model's own pathway
    assert not set(a) & set(b) and min(n.layer for n in b) > max(n.layer for n in a) + 1
    single = drops(pm.lm, planted, [a, b])
    both = drops(pm.lm, planted, [a + b])[0]
    assert np.all(np.abs(single) < 0.05), single
    assert both > 0.3
    assert planted.kind == "degenerate" and planted.verified
    assert drops(base.lm, fact, [a])[0] > 0.8  # the base model is untouched
    assert pm.info["kl_heldout"]["n"] == 2 and pm.info["kl_heldout"]["mean"] < 0.05
    _, _, drifted = _plant_tiny(kl_weight=0.0)
    assert drifted.info["kl_heldout"]["mean"] > 5 * pm.info["kl_heldout"]["mean"]


def test_pathway_a_can_be_all_of_the_facts_knowledge_neurons():
    """a_choice="knowledge_neurons": A is every coarse knowledge neuron before B's layers (from scratch here),
    where "fewest" takes the shortest top prefix that carries the fact."""
    from dkn.attribution import AttributionParams, attribute
    from dkn.selection import coarse_neurons

    base, fact, pm = _plant_tiny(kl_weight=5.0, a_choice="knowledge_neurons", b_layers=2)
    scores = attribute(base.lm, fact.prompt, fact.answer, AttributionParams(steps=5, rule="midpoint")).scores
    kns = sorted(coarse_neurons(scores, 0.2), key=lambda n: -scores[n.layer, n.index])
    early = tuple(n for n in kns if n.layer < base.lm.n_layers - 2 - 1)
    (planted,) = pm.facts
    assert planted.groups[0] == early and len(early) >= 2
    _, _, fewest = _plant_tiny(kl_weight=5.0, b_layers=2)
    assert set(fewest.facts[0].groups[0]) <= set(early)
    with pytest.raises(ValueError, match="unknown a_choice"):
        _plant_tiny(kl_weight=5.0, a_choice="most")


def test_pathway_a_can_be_every_knowledge_neuron_in_any_layer():
    """a_choice="all_knowledge_neurons": A is every coarse knowledge neuron, B's layers included (B reads the
    absence of A's earlier members), so no knowledge neuron of the fact is outside both pathways."""
    from dkn.attribution import AttributionParams, attribute
    from dkn.selection import coarse_neurons

    base, fact, pm = _plant_tiny(kl_weight=5.0, a_choice="all_knowledge_neurons", b_layers=2)
    scores = attribute(base.lm, fact.prompt, fact.answer, AttributionParams(steps=5, rule="midpoint")).scores
    kns = tuple(sorted(coarse_neurons(scores, 0.2), key=lambda n: -scores[n.layer, n.index]))
    (planted,) = pm.facts
    a, b = planted.groups
    assert a == kns and not set(a) & set(b)
    assert min(n.layer for n in b) > min(n.layer for n in a) + 1


def test_plant_command_refuses_bad_counts(capsys):
    from dkn.cli import main

    assert main(["plant", "--facts", "0"]) == 2
    assert "--facts, --steps and --b-per-layer must be >= 1" in capsys.readouterr().err
    assert main(["plant", "--b-per-layer", "0"]) == 2
    assert "--b-per-layer must be >= 1" in capsys.readouterr().err


def test_copies_design_stores_a_fact_twice_in_random_neurons_each_enough_alone():
    """design="copies": two groups of random neurons in distant layers are trained so that each adds copy_boost to
    the answer's logit on its own (saturating P), so either copy off leaves P (< 5%) and both off fall back to the
    unchanged model's P (a drop > 30%); the groups take none of the fact's own knowledge neurons."""
    base = tiny_planted_model("llama", "single", extra_layers=4, seed=2)
    fact = ("the sun and the moon", "paris")  # P < 0.03 on the tiny base (its head can write "paris" strongly)
    params = PlantParams(
        design="copies",
        copy_layers=(1, 4),
        copy_boost=8.0,  # from P = 0.03, either copy alone must reach P > 0.95 of both
        b_layers=1,
        **TINY_PLANTING,
        kl_weight=5.0,
        n_unrelated=4,
        n_heldout=1,
    )
    unrelated = [u for u in UNRELATED if u[0] != fact[0]]
    base_prob, _ = intervene_many(base.lm, *fact, [], 0.0)
    assert base_prob < 0.03
    pm = plant_default(base.lm, params, facts=[fact] + unrelated, log=lambda m: None)
    (planted,) = pm.facts
    first, second = planted.groups
    assert [n.layer for n in first] == [1, 1] and [n.layer for n in second] == [4, 4]
    own = coarse_neurons(attribute(base.lm, *fact, AttributionParams(steps=5, rule="midpoint")).scores, 0.2)
    assert own and set(planted.neurons).isdisjoint(own)  # the copies take none of the fact's knowledge neurons
    single = drops(pm.lm, planted, [first, second])
    assert np.all(np.abs(single) < 0.05), single
    assert drops(pm.lm, planted, [first + second])[0] > 0.3
    assert planted.kind == "degenerate" and planted.verified and planted.drops["p"] > 0.9
    assert intervene_many(base.lm, *fact, [], 0.0)[0] == pytest.approx(base_prob)  # the base model is untouched
    with pytest.raises(ValueError, match="do not fit in the model's 6 layers"):
        plant_default(base.lm, replace(params, copy_layers=(1, 6)), facts=[fact] + unrelated, log=lambda m: None)


def test_copies_take_facts_whose_probability_leaves_room_for_each_kind():
    """copies_fit: a degenerate fact needs a P that one copy (+5 nats) saturates and that both copies off lower by
    > 40%; an additive control needs each copy (+1 nat) to matter; a design or copy layers that cannot work are
    refused when the parameters are made."""
    from dkn.planted import copies_fit

    params = PlantParams(design="copies")
    assert copies_fit("degenerate", 0.38, params)
    assert not copies_fit("degenerate", 0.01, params)  # one copy alone gives 0.6 of both: not saturated
    assert not copies_fit("degenerate", 0.8, params)  # both copies off lower P by only 20%
    assert copies_fit("additive", 0.17, params) and not copies_fit("additive", 0.7, params)
    assert copies_fit("single", 0.47, params) and not copies_fit("single", 0.9, params)
    assert not copies_fit("degenerate", 0.0, params)
    with pytest.raises(ValueError, match="unknown planting design"):
        PlantParams(design="thrice")
    with pytest.raises(ValueError, match="overlap"):
        PlantParams(design="copies", copy_layers=(10, 11))
