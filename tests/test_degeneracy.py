"""The knowledge-neuron graph and the degeneracy test, on hand-built and real models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from dkn import degeneracy
from dkn.degeneracy import (
    CLUSTERER_NAMES,
    DegeneracyParams,
    analyse,
    combination,
    excess_over_largest,
    grid_subsets,
    moebius_interactions,
    random_matched_sets,
    redundancy,
)
from dkn.graph import build_graph, connection_strengths
from dkn.interventions import intervene_many
from dkn.neurons import Neuron

PROMPT, ANSWER = "the capital of france is", "paris"


# -- the graph ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gpt_neox"])
def test_connection_strength_is_next_layers_input_read_of_this_layers_output(family):
    """w(A, B) must equal what layer l+1's input projection reads when neuron A of layer l outputs 1:
    computed here by calling the modules themselves, whatever their storage layout (Conv1D, Linear)."""
    lm = tiny_model(family)
    sources = [Neuron(0, 1), Neuron(0, 5)]
    targets = [Neuron(1, 2), Neuron(1, 7), Neuron(1, 9)]
    w = connection_strengths(lm, sources, targets, gated_input="gate")
    down, up = lm.down_proj(0), lm.up_projs(1)[0]  # gate_proj for llama
    for a, src in enumerate(sources):
        onehot = torch.zeros(1, lm.d_mlp)
        onehot[0, src.index] = 1.0
        with torch.no_grad():
            written = down(onehot) - down(torch.zeros(1, lm.d_mlp))  # [1, d_model], bias removed
            read = up(written) - up(torch.zeros_like(written))  # [1, d_mlp]
        for b, dst in enumerate(targets):
            assert w[a, b] == pytest.approx(float(read[0, dst.index]), rel=1e-4, abs=1e-6)


def test_gated_inputs_gate_up_and_both():
    lm = tiny_model("llama")
    src, dst = [Neuron(0, 3)], [Neuron(1, 4)]
    gate = connection_strengths(lm, src, dst, "gate")[0, 0]
    up = connection_strengths(lm, src, dst, "up")[0, 0]
    both = connection_strengths(lm, src, dst, "both")[0, 0]
    out = lm.model.model.layers[0].mlp.down_proj.weight[:, 3].detach()
    assert gate == pytest.approx(float(out @ lm.model.model.layers[1].mlp.gate_proj.weight[4].detach()), rel=1e-5)
    assert up == pytest.approx(float(out @ lm.model.model.layers[1].mlp.up_proj.weight[4].detach()), rel=1e-5)
    assert both == pytest.approx(gate + up, rel=1e-5)
    assert gate != pytest.approx(up)


def test_path_rule_on_a_four_layer_example():
    """Distances over gaps of 2 and 3 layers are the cheapest path through one KN per layer between."""
    lm = tiny_model("llama")  # 3 layers
    neurons = [Neuron(0, 0), Neuron(1, 0), Neuron(1, 1), Neuron(2, 0), Neuron(0, 2)]
    g = build_graph(lm, neurons, max_span=3, edge="faithful")
    d = lambda a, b: g.distance[neurons.index(a), neurons.index(b)]
    w01 = connection_strengths(lm, [Neuron(0, 0)], [Neuron(1, 0), Neuron(1, 1)])[0]
    w12 = connection_strengths(lm, [Neuron(1, 0), Neuron(1, 1)], [Neuron(2, 0)])[:, 0]
    assert d(Neuron(0, 0), Neuron(1, 0)) == pytest.approx(1 / abs(w01[0]))
    expected = min(1 / abs(w01[0]) + 1 / abs(w12[0]), 1 / abs(w01[1]) + 1 / abs(w12[1]))
    assert d(Neuron(0, 0), Neuron(2, 0)) == pytest.approx(expected)
    assert d(Neuron(2, 0), Neuron(0, 0)) == d(Neuron(0, 0), Neuron(2, 0))  # symmetric
    assert np.isinf(d(Neuron(0, 0), Neuron(0, 2)))  # same layer
    assert np.isinf(d(Neuron(1, 0), Neuron(1, 1)))
    # with max_span 1 the two-layer gap is unconnected
    assert np.isinf(build_graph(lm, neurons, max_span=1, edge="faithful").distance[0, 3])
    # the sign of a path is the product of its edges' signs
    best = int(np.argmin([1 / abs(w01[0]) + 1 / abs(w12[0]), 1 / abs(w01[1]) + 1 / abs(w12[1])]))
    assert np.sign(g.strength[0, 3]) == np.sign(w01[best]) * np.sign(w12[best])


def test_no_path_when_a_middle_layer_has_no_knowledge_neuron_in_the_faithful_graph():
    lm = tiny_model("gpt2")
    g = build_graph(lm, [Neuron(0, 1), Neuron(2, 1)], max_span=3, edge="faithful")
    assert np.isinf(g.distance[0, 1]) and g.edges() == []


# -- a model that stores its fact twice ----------------------------------------------------------------
def _redundant_model(remove_group_b: bool = False):
    """A 2-layer LLaMA-shaped model whose only active MLP neurons are two disjoint groups A = {(0,0), (1,0)}
    and B = {(0,1), (1,1)}; each writes the answer's unembedding direction strongly enough to carry the
    fact alone.  Attention writes nothing.  Orthogonal residual directions keep the groups unconnected."""
    lm = tiny_model("llama")
    lm.model.model.layers = lm.model.model.layers[:2]
    lm.model.config.num_hidden_layers = 2
    tok = lm.tokenizer
    last, answer = tok.convert_tokens_to_ids("is"), tok.convert_tokens_to_ids("paris")
    d = lm.model.config.hidden_size
    basis = torch.eye(d)
    e_last, r_ans, v_a, v_b = basis[0], basis[1], basis[2], basis[3]
    with torch.no_grad():
        emb = lm.model.model.embed_tokens.weight
        emb[:] = 0.05 * torch.randn_like(emb)
        emb[:, :4] = 0  # keep the four directions for our use
        emb[last] = e_last * 3
        head = lm.model.lm_head.weight
        head[:] = 0.0
        head[answer] = 12 * r_ans
        for layer in lm.model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.zero_()
        for group, (_v_in, v_out) in enumerate([(None, v_a), (None, v_b)]):
            if remove_group_b and group == 1:
                continue
            l0, l1 = lm.model.model.layers
            l0.mlp.gate_proj.weight[group] = 4 * e_last
            l0.mlp.up_proj.weight[group] = 4 * e_last
            l0.mlp.down_proj.weight[:, group] = 2 * r_ans + 2 * v_out
            l1.mlp.gate_proj.weight[group] = 4 * v_out
            l1.mlp.up_proj.weight[group] = 4 * v_out
            l1.mlp.down_proj.weight[:, group] = 2 * r_ans
    from dkn.models import wrap_model

    return wrap_model(lm.model, tok, name=f"redundant-{remove_group_b}")


GROUP_A = (Neuron(0, 0), Neuron(1, 0))
GROUP_B = (Neuron(0, 1), Neuron(1, 1))


def test_a_fact_stored_twice_is_degenerate():
    lm = _redundant_model()
    r = analyse(lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=DegeneracyParams(random_seeds=2))
    assert r.prob > 0.9
    assert sorted(map(sorted, r.bdcs)) == sorted([sorted(GROUP_A), sorted(GROUP_B)])
    assert all(d < 0.05 for d in r.single_drops), r.single_drops
    assert r.union_drop > 0.3
    assert r.degenerate and len(r.dkn) == 2
    assert r.redundancy > 0.9 and r.excess_over_largest > 0.9
    assert r.combination == "redundant"
    assert all(c.sufficient and c.alone_drop < 0.05 for c in r.candidates)  # each copy carries the fact
    assert r.conditions == {
        "two_or_more_groups": True,
        "two_or_more_pass_alone": True,
        "together_remove_fact": True,
        "each_suffices": True,
    }
    (_, da), (_, db), (pair, dab) = r.interactions
    assert pair == (0, 1) and dab == pytest.approx(r.union_drop - da - db) and dab > 0.9


def test_with_one_copy_removed_the_fact_is_not_degenerate():
    lm = _redundant_model(remove_group_b=True)
    r = analyse(lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=DegeneracyParams(random_seeds=2))
    assert not r.degenerate and r.dkn == ()
    assert "not degenerate" in r.verdict or "no candidate group" in r.verdict
    prob, [drop_a] = intervene_many(lm, PROMPT, ANSWER, [GROUP_A], 0.0)
    assert (prob - drop_a) / prob > 0.3  # group A is now necessary


def test_both_thresholds_are_enforced():
    """Groups that are individually harmless but whose union does not remove the fact are not a DKN."""
    lm = _redundant_model()
    strict = DegeneracyParams(threshold_low=0.05, threshold_high=0.9999999, random_seeds=1)
    r = analyse(lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=strict)
    assert all(c.passed for c in r.candidates) and not r.degenerate
    assert "together" in r.verdict


# -- the subset grid and the summary numbers -----------------------------------------------------------
def test_grid_subsets_full_and_reduced():
    assert grid_subsets(0) == []
    assert len(grid_subsets(3)) == 7 and len(grid_subsets(6)) == 63
    seven = grid_subsets(7, max_grid=6)
    assert len(seven) == 7 + 7 + 1 and (0, 1, 2, 3, 4, 5, 6) in seven and (1, 2, 3, 4, 5, 6) in seven


def test_grid_matches_one_by_one_interventions():
    lm = tiny_model("gpt2")
    neurons = [Neuron(l, i) for l in range(3) for i in (1, 4, 9, 20)]
    r = analyse(lm, PROMPT, ANSWER, neurons, params=DegeneracyParams(clusterer="kmeans", random_seeds=1))
    groups = r.bdcs
    for subset, drop in r.subset_drops:
        members = tuple(n for i in subset for n in groups[i])
        p0, [p] = intervene_many(lm, PROMPT, ANSWER, [members], 0.0)
        assert drop == pytest.approx((p0 - p) / p0, abs=1e-6)


def test_excess_over_largest_redundancy_and_combination_rules():
    assert excess_over_largest([0.01, 0.02], 0.9) == pytest.approx((0.9 - 0.02) / 0.9)
    assert excess_over_largest([0.9, 0.1], 0.9) == 0.0
    assert excess_over_largest([], 0.5) == 0.0
    # the old index gave k additive groups 1 - 1/k; R says additive (0)
    assert excess_over_largest([0.2] * 4, 0.8) == pytest.approx(0.75)
    assert redundancy([0.2] * 4, 0.8) == pytest.approx(0.0, abs=1e-12)
    assert redundancy([0.01, 0.02], 0.9) == pytest.approx((0.9 - 0.03) / 0.9)
    assert redundancy([0.9, 0.8], 0.95) == pytest.approx((0.95 - 1.7) / 0.95)
    assert np.isnan(redundancy([0.5], 0.5)) and np.isnan(redundancy([0.1, 0.1], 0.0))
    assert combination([0.01, 0.02], 0.9) == "redundant"
    assert combination([0.3, 0.3], 0.6) == "additive"
    assert combination([0.9, 0.8], 0.95) == "each necessary"
    assert combination([0.01, 0.0], 0.01) == "no effect"
    assert combination([0.5], 0.5) == "n/a"


def test_random_control_matches_layers_and_avoids_knowledge_neurons():
    lm = tiny_model("gpt2")
    neurons = [Neuron(0, 1), Neuron(0, 2), Neuron(2, 5)]
    sets = random_matched_sets(lm, neurons, set(neurons), n_seeds=4, seed=3)
    assert len(sets) == 4 and len(set(sets)) > 1
    for s in sets:
        assert sorted(n.layer for n in s) == [0, 0, 2]
        assert not set(s) & set(neurons)
    assert sets == random_matched_sets(lm, neurons, set(neurons), n_seeds=4, seed=3)


# -- bad input -------------------------------------------------------------------------------------------
def test_fewer_than_two_neurons_gives_a_clear_result():
    lm = tiny_model("gpt2")
    r = analyse(lm, PROMPT, ANSWER, [Neuron(0, 1)])
    assert not r.degenerate and r.candidates == () and "at least 2" in r.verdict


def test_no_connected_pairs_gives_a_clear_result():
    lm = tiny_model("gpt2")
    neurons = [Neuron(0, 1), Neuron(0, 2), Neuron(2, 3)]  # no adjacent layers
    r = analyse(lm, PROMPT, ANSWER, neurons, params=DegeneracyParams(edge="faithful"))
    assert not r.degenerate and r.candidates == () and "no candidate group" in r.verdict
    # the residual stream links layer 0 to layer 2 directly: the static graph connects them
    static = analyse(lm, PROMPT, ANSWER, neurons, params=DegeneracyParams(edge="static", random_seeds=1))
    assert static.graph.edges() and static.candidates


def test_more_bdcs_than_the_grid_allows():
    lm = tiny_model("gpt2")
    neurons = [Neuron(l, i) for l in range(3) for i in range(0, 60, 3)]
    r = analyse(
        lm, PROMPT, ANSWER, neurons, params=DegeneracyParams(clusterer="kmeans", max_grid_bdcs=2, random_seeds=1)
    )
    n = len(r.candidates)
    assert n > 2 and len(r.subset_drops) == 2 * n + 1


def test_unknown_clusterer_is_refused():
    with pytest.raises(ValueError, match="unknown clusterer"):
        DegeneracyParams(clusterer="louvain").validate()


# -- the real default model ------------------------------------------------------------------------------
@pytest.mark.real_model
def test_reported_drops_are_reproduced_by_the_intervention_api(default_lm):
    prompt, answer = "The capital of France is", "Paris"
    from dkn.attribution import attribute

    scores = attribute(default_lm, prompt, answer).top(16)
    neurons = [n for n, _ in scores]
    r = analyse(default_lm, prompt, answer, neurons, params=DegeneracyParams(clusterer="kmeans", random_seeds=2))
    assert r.candidates, "k-means always proposes groups"
    for c in r.candidates:
        p0, [p] = intervene_many(default_lm, prompt, answer, [c.members], 0.0)
        assert c.single_drop == pytest.approx((p0 - p) / p0, abs=1e-5)
    union = [n for c in r.candidates for n in c.members]
    p0, [p] = intervene_many(default_lm, prompt, answer, [union], 0.0)
    assert r.union_drop == pytest.approx((p0 - p) / p0, abs=1e-5)
    assert r.prob == pytest.approx(p0, rel=1e-6)


# -- the defects of issue 8 ----------------------------------------------------------------------------------
def test_amig_uses_its_own_definition_and_finds_the_stored_twice_fact():
    """AMIG: two neurons, each harmless alone, harmful together, are the DKN; its neurons are the components.
    (Before: the pairs were tested as groups that must be harmless alone, so no pair could ever pass.)"""
    lm = _redundant_model()
    r = analyse(lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=DegeneracyParams(clusterer="amig", random_seeds=1))
    assert r.degenerate, r.verdict
    assert len(r.dkn) == 2 and all(len(g) == 1 for g in r.dkn)
    a, b = (g[0] for g in r.dkn)
    assert {a, b} & set(GROUP_A) and {a, b} & set(GROUP_B)  # one neuron of each copy
    assert "AMIG's definition" in r.extra["definition"]


def test_amig_control_one_copy_has_no_pair():
    lm = _redundant_model(remove_group_b=True)
    r = analyse(lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=DegeneracyParams(clusterer="amig", random_seeds=1))
    assert not r.degenerate


def _fixed_groups(monkeypatch, groups):
    """Make analyse() test exactly `groups` (the clusterer is not what these tests are about)."""
    monkeypatch.setattr(degeneracy, "_candidate_groups", lambda *a, **k: (list(groups), []))


DORMANT = [(Neuron(0, i), Neuron(1, i)) for i in range(10, 15)]  # zero weights: switching them off does nothing


def test_union_of_passing_groups_is_evaluated_beyond_the_grid(monkeypatch):
    """8 groups (> 6): the reduced grid holds singles, leave-one-outs and all, but not the union of the passing
    groups; it used to give a NaN drop and "not degenerate"."""
    lm = _redundant_model()
    layer0 = (GROUP_A[0], GROUP_B[0])  # both copies' first halves: fails
    _fixed_groups(monkeypatch, [GROUP_A, GROUP_B, layer0, GROUP_A + GROUP_B] + DORMANT)
    r = analyse(lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=DegeneracyParams(random_seeds=1))
    passing = tuple(i for i, c in enumerate(r.candidates) if c.passed)
    assert passing == (0, 1, 4, 5, 6, 7, 8)
    assert np.isfinite(r.dkn_union_drop) and r.dkn_union_drop > 0.3
    assert r.degenerate and GROUP_A in r.dkn and GROUP_B in r.dkn
    assert r.interactions == ()  # Moebius needs the full grid


def test_a_group_that_raises_p_is_not_harmless():
    """|relative change| < threshold_low: a group whose suppression raises P by 20% fails (signed value kept)."""
    params = DegeneracyParams(random_seeds=0)
    grid = {(0,): -0.2, (1,): 0.01, (2,): 0.02, (0, 1): 0.3, (0, 2): 0.3, (1, 2): 0.5, (0, 1, 2): 0.6}
    groups = [(Neuron(0, 0),), (Neuron(0, 1),), (Neuron(0, 2),)]
    r = degeneracy._assemble("p", "a", 0.5, (), (), None, groups, [], dict(grid), np.array([]), params, (), [])
    assert [c.passed for c in r.candidates] == [False, True, True]
    assert r.candidates[0].single_drop == pytest.approx(-0.2) and "raises" in r.candidates[0].reason
    assert r.dkn == (groups[1], groups[2]) and r.dkn_union_drop == pytest.approx(0.5)


def test_sufficiency_is_reported_and_can_be_required(monkeypatch):
    """Group A split into its two layers: each half can go alone (copy B carries the fact), but the layer-1 half
    left on its own (everything else off) cannot express the fact: it reads what the layer-0 half writes."""
    lm = _redundant_model()
    halves = [(GROUP_A[0],), (GROUP_A[1],), GROUP_B]
    _fixed_groups(monkeypatch, halves)
    loose = analyse(lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=DegeneracyParams(random_seeds=0))
    assert all(c.passed for c in loose.candidates) and loose.degenerate
    assert [c.sufficient for c in loose.candidates] == [True, False, True]
    assert loose.candidates[1].alone_drop > 0.3
    assert not loose.conditions["each_suffices"] and "cannot express" in loose.verdict
    strict = analyse(
        lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=DegeneracyParams(random_seeds=0, require_sufficiency=True)
    )
    assert not strict.degenerate and "cannot express" in strict.verdict


def test_moebius_interactions_by_hand():
    grid = {(0,): 0.1, (1,): 0.2, (2,): 0.0, (0, 1): 0.5, (0, 2): 0.1, (1, 2): 0.3, (0, 1, 2): 0.9}
    m = dict(moebius_interactions(grid, 3))
    assert m[(0,)] == 0.1 and m[(1,)] == 0.2 and m[(2,)] == 0.0
    assert m[(0, 1)] == pytest.approx(0.2) and m[(0, 2)] == pytest.approx(0.0) and m[(1, 2)] == pytest.approx(0.1)
    assert m[(0, 1, 2)] == pytest.approx(0.9 - 0.5 - 0.1 - 0.3 + 0.1 + 0.2 + 0.0)
    assert sum(m.values()) == pytest.approx(grid[(0, 1, 2)])  # dividends add up to v(everything)
    assert moebius_interactions({(0,): 0.1}, 2) == []  # incomplete grid


def test_as_json_carries_the_new_fields():
    lm = _redundant_model()
    r = analyse(lm, PROMPT, ANSWER, GROUP_A + GROUP_B, params=DegeneracyParams(random_seeds=1))
    out = r.as_json()
    for key in (
        "sufficiency",
        "redundancy",
        "interactions",
        "rounds",
        "conditions",
        "alone_drops",
        "edge",
        "excess_over_largest",
    ):
        assert key in out
    assert out["redundancy"] == r.redundancy and len(out["interactions"]) == 3
    assert [s["sufficient"] for s in out["sufficiency"]] == [True, True]
    from dkn.cli import _dumps

    json.loads(_dumps(out))


def test_every_clusterer_name_is_accepted():
    assert {"ntc", "ntc_faithful", "hierarchical", "dbscan", "kmeans", "amig", "backup"} <= set(CLUSTERER_NAMES)
    with pytest.raises(ValueError, match="unknown edge"):
        DegeneracyParams(edge="magic").validate()
