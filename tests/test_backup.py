"""dkn.backup: conditional attribution rounds find a second copy of a fact that one attribution misses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_support import fact_argv, save_model_folder
from tiny_models import tiny_model

from dkn.attribution import AttributionParams, attribute
from dkn.backup import attribute_suppressed, suppressed
from dkn.degeneracy import DegeneracyParams, analyse
from dkn.interventions import intervene_many
from dkn.models import wrap_model
from dkn.neurons import Neuron
from dkn.planted import tiny_planted_model
from dkn.query import make_query
from dkn.selection import coarse_neurons

PROMPT, ANSWER = "the capital of france is", "paris"
GROUP_A = (Neuron(0, 0), Neuron(0, 1))  # layer 0, the stronger copy
GROUP_B = (Neuron(1, 2), Neuron(1, 3))  # layer 1, the weaker copy: still enough alone
FAST = AttributionParams(steps=8, rule="trapezoid")  # fixed points: the reference loop checks these


def _stored_twice_in_two_layers(with_b: bool = True):
    """A 2-layer LLaMA-shaped model whose only MLP neurons are two disjoint groups in different layers, each
    reading the last token and writing the answer's unembedding direction; attention writes nothing.
    Integrated gradients scales one layer at a time: with A on, scaling B changes nothing, so B scores a few
    percent of A and is no knowledge neuron, although either group alone keeps P within 2%.  Within a group
    both neurons are needed (one alone, the other group off, loses > 5%): each group is one pathway."""
    lm = tiny_model("llama")
    lm.model.model.layers = lm.model.model.layers[:2]
    lm.model.config.num_hidden_layers = 2
    tok = lm.tokenizer
    last, answer = tok.convert_tokens_to_ids("is"), tok.convert_tokens_to_ids("paris")
    basis = torch.eye(lm.model.config.hidden_size)
    e_last, r_ans = basis[0], basis[1]
    with torch.no_grad():
        emb = lm.model.model.embed_tokens.weight
        emb[:] = 0.05 * torch.randn_like(emb)
        emb[:, :4] = 0
        emb[last] = 3 * e_last
        lm.model.lm_head.weight.zero_()
        lm.model.lm_head.weight[answer] = r_ans
        for layer in lm.model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.zero_()
        for group, strength in ((GROUP_A, 0.2), (GROUP_B, 0.15 if with_b else 0.0)):
            for n in group:
                mlp = lm.model.model.layers[n.layer].mlp
                mlp.gate_proj.weight[n.index] = e_last
                mlp.up_proj.weight[n.index] = e_last
                mlp.down_proj.weight[:, n.index] = strength * r_ans
    return wrap_model(lm.model, tok, name=f"stored-twice-two-layers-{with_b}")


def _knowledge_neurons(lm):
    return coarse_neurons(attribute(lm, PROMPT, ANSWER, FAST).scores, 0.2)


def test_the_planted_model_is_degenerate_and_integrated_gradients_misses_the_weaker_copy():
    lm = _stored_twice_in_two_layers()
    p0, (pa, pb, pab) = intervene_many(lm, PROMPT, ANSWER, [GROUP_A, GROUP_B, GROUP_A + GROUP_B])
    assert (p0 - pa) / p0 < 0.05 and (p0 - pb) / p0 < 0.05 and (p0 - pab) / p0 > 0.9
    assert set(_knowledge_neurons(lm)) == set(GROUP_A)


def test_backup_rounds_find_both_copies_where_ntc_cannot():
    lm = _stored_twice_in_two_layers()
    kns = _knowledge_neurons(lm)
    ntc = analyse(lm, PROMPT, ANSWER, kns, params=DegeneracyParams(random_seeds=1))
    assert not ntc.degenerate
    r = analyse(
        lm, PROMPT, ANSWER, kns, params=DegeneracyParams(clusterer="backup", random_seeds=1, backup_attribution=FAST)
    )
    assert r.degenerate, r.verdict
    assert [set(c.members) for c in r.candidates] == [set(GROUP_A), set(GROUP_B)]
    assert [c.round for c in r.candidates] == [1, 2]
    raw = analyse(
        lm,
        PROMPT,
        ANSWER,
        kns,
        params=DegeneracyParams(clusterer="backup", random_seeds=1, backup_attribution=FAST, backup_pathways=False),
    )
    assert raw.degenerate and [set(c.members) for c in raw.candidates] == [set(GROUP_A), set(GROUP_B)]
    assert [c.round for c in raw.candidates] == [1, 2]
    assert len(r.rounds) == 2 and r.rounds[1].drop_after > 0.3  # stopped when the fact was gone
    assert r.peeling[0] == pytest.approx(r.prob) and r.peeling[1] > 0.95 * r.prob and r.peeling[2] < 0.1 * r.prob
    assert all(c.sufficient for c in r.candidates) and r.redundancy > 0.9
    assert r.as_json()["rounds"][1]["neurons"] == [{"layer": 1, "neuron": 2}, {"layer": 1, "neuron": 3}]


def test_backup_rounds_invent_no_second_copy_for_a_single_pathway():
    lm = _stored_twice_in_two_layers(with_b=False)
    r = analyse(
        lm,
        PROMPT,
        ANSWER,
        _knowledge_neurons(lm),
        params=DegeneracyParams(clusterer="backup", random_seeds=1, backup_attribution=FAST),
    )
    assert len(r.candidates) == 1 and set(r.candidates[0].members) == set(GROUP_A)
    assert not r.degenerate and "single group" in r.verdict
    assert len(r.rounds) == 1 and r.rounds[0].drop_after > 0.9


def test_pathways_split_parallel_carriers_inside_one_round():
    """With stronger neurons each of A's two neurons carries the fact alone (B off, one A neuron loses < 5%):
    they are parallel carriers, so the round that found both is split; B's neurons still need each other."""
    lm = _stored_twice_in_two_layers()
    with torch.no_grad():
        for n in GROUP_A:
            lm.model.model.layers[n.layer].mlp.down_proj.weight[:, n.index] *= 1.5
    kns = _knowledge_neurons(lm)
    r = analyse(
        lm, PROMPT, ANSWER, kns, params=DegeneracyParams(clusterer="backup", random_seeds=1, backup_attribution=FAST)
    )
    assert r.degenerate, r.verdict
    assert [set(c.members) for c in r.candidates] == [{GROUP_A[0]}, {GROUP_A[1]}, set(GROUP_B)]
    assert [c.round for c in r.candidates] == [1, 1, 2]


def test_backup_without_given_neurons_attributes_its_first_round():
    lm = _stored_twice_in_two_layers()
    r = analyse(
        lm, PROMPT, ANSWER, (), params=DegeneracyParams(clusterer="backup", random_seeds=0, backup_attribution=FAST)
    )
    assert [set(c.members) for c in r.candidates] == [set(GROUP_A), set(GROUP_B)] and r.degenerate


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_backup_holds_out_a_shared_carrier_and_finds_the_pathways_behind_it(family):
    """The prompt's only knowledge neuron is a carrier that feeds both planted groups: suppressing it ends naive
    rounds at once.  The rounds hold it out (listed, kept on), choose again with it pinned, and recover both
    groups; NTC on the knowledge neurons sees one neuron.  The single-pathway control stays not degenerate."""
    pm = tiny_planted_model(family, "degenerate", 2, carrier=True, seed=0)
    fact = pm.facts[0]
    kns = _knowledge_neurons_of(pm)
    assert kns == list(fact.carriers)
    r = analyse(pm.lm, fact.prompt, fact.answer, kns, params=DegeneracyParams(clusterer="backup", random_seeds=1))
    assert r.degenerate, r.verdict
    assert {frozenset(c) for c in r.dkn} == {frozenset(g) for g in fact.groups}
    assert r.rounds[0].carriers == fact.carriers and fact.carriers[0] not in {n for c in r.dkn for n in c}
    assert r.carriers == fact.carriers  # what the CLI and the app list
    assert r.as_json()["rounds"][0]["carriers"] == [{"layer": 0, "neuron": fact.carriers[0].index}]
    assert not analyse(pm.lm, fact.prompt, fact.answer, kns, params=DegeneracyParams(random_seeds=1)).degenerate
    control = tiny_planted_model(family, "single", carrier=True, seed=0)
    cfact = control.facts[0]
    rc = analyse(
        control.lm,
        cfact.prompt,
        cfact.answer,
        _knowledge_neurons_of(control),
        params=DegeneracyParams(clusterer="backup", random_seeds=1),
    )
    assert not rc.degenerate, rc.verdict


def test_three_pathways_in_one_round_are_split_by_what_carries_the_fact_alone():
    """Three parallel pathways found in one round: no pair of members removes the fact (a third pathway stays
    on), so the parts are the members that keep the fact with the rest of the round off."""
    from dkn.backup import _split

    pm = tiny_planted_model("gpt2", "degenerate", 3, seed=0)
    fact = pm.facts[0]
    params = DegeneracyParams(clusterer="backup")
    parts = _split(pm.lm, fact.prompt, fact.answer, fact.neurons, (), params)
    assert {frozenset(p) for p in parts} == {frozenset(g) for g in fact.groups}


def _knowledge_neurons_of(pm):
    fact = pm.facts[0]
    scores = attribute(pm.lm, fact.prompt, fact.answer).scores
    return sorted(coarse_neurons(scores, 0.2), key=lambda n: -scores[n.layer, n.index])


def test_pinned_neurons_keep_their_clean_activation_on_every_path():
    """dkn.rows.pinned: the scores equal integrated gradients written out by hand with the pinned neurons held at
    their clean values while the rest of their layer is scaled (fast path and reference loop alike); the
    pinned neurons score 0 and their layer-mates' scores change."""
    from dkn.hooks import edit_neurons, record_neurons
    from dkn.rows import pinned

    lm = tiny_model("llama")
    pins = [Neuron(1, 3), Neuron(1, 9)]
    with pinned(pins):
        fast = attribute(lm, PROMPT, ANSWER, FAST, store=None).scores
        loop = attribute(lm, PROMPT, ANSWER, FAST, store=None, reference_loop=True).scores
    plain = attribute(lm, PROMPT, ANSWER, FAST, store=None).scores
    np.testing.assert_allclose(fast, loop, atol=1e-6)
    assert all(fast[n.layer, n.index] == 0 for n in pins)
    assert not np.allclose(fast[1], plain[1], atol=1e-6) and np.allclose(fast[0], plain[0], atol=1e-6)
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    target = lm.tokenizer.convert_tokens_to_ids(ANSWER)
    with torch.no_grad(), record_neurons(lm, [1]) as rec:
        lm.model(input_ids=ids)
    clean = rec[1][0, -1].clone()  # [d_mlp]
    keep = torch.zeros_like(clean, dtype=torch.bool)
    keep[[n.index for n in pins]] = True
    alphas = np.linspace(0, 1, 9)  # trapezoid, 8 intervals: FAST's rule
    weights = np.full(9, 1 / 8)
    weights[[0, -1]] = 1 / 16
    total = torch.zeros_like(clean)
    for alpha, w in zip(alphas, weights):
        leaf = (alpha * clean).clone().requires_grad_(True)

        def edit(h, leaf=leaf):
            h = h.clone()
            h[0, -1] = torch.where(keep, clean, leaf)
            return h

        with edit_neurons(lm, {1: edit}):
            prob = lm.model(input_ids=ids).logits[0, -1].float().softmax(-1)[target]
        (grad,) = torch.autograd.grad(prob, leaf)
        total += w * grad
    np.testing.assert_allclose(fast[1], (clean * total).detach().numpy(), atol=1e-6)


def test_attribution_under_suppression_zeroes_the_suppressed_and_matches_the_reference_loop():
    lm = tiny_model("gpt2")
    off = [Neuron(0, 3), Neuron(2, 7), Neuron(2, 8)]
    fast = attribute_suppressed(lm, PROMPT, ANSWER, off, FAST)
    with suppressed(lm, off):
        ref = attribute(lm, PROMPT, ANSWER, FAST, reference_loop=True)
    assert np.allclose(fast.scores, ref.scores, atol=1e-6)
    assert all(fast.scores[n.layer, n.index] == 0 for n in off)
    plain = attribute(lm, PROMPT, ANSWER, FAST)
    assert not np.allclose(plain.scores, fast.scores, atol=1e-6)
    p0, [p_off] = intervene_many(lm, PROMPT, ANSWER, [off], 0.0, "all")
    assert fast.prob == pytest.approx(p_off, rel=1e-5) and plain.prob == pytest.approx(p0, rel=1e-5)
    # the hooks are gone afterwards
    assert attribute(lm, PROMPT, ANSWER, FAST).prob == pytest.approx(p0, rel=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_attribution_suppressed_at_the_answer_position_only(family):
    """mode "last": the neurons are off at the answer position and nowhere else, in the runner's rows as in the
    full-prompt reference loop (the runner's prefix run stays clean), and P is intervene's "last" P."""
    lm = tiny_model(family)
    off = [Neuron(0, 3), Neuron(2, 7), Neuron(2, 8)]
    fast = attribute_suppressed(lm, PROMPT, ANSWER, off, FAST, mode="last")
    everywhere = attribute_suppressed(lm, PROMPT, ANSWER, off, FAST, mode="all")
    positions = [] if family != "bert" else [step.position for step in make_query(lm, PROMPT, ANSWER).steps]
    with suppressed(lm, off, mode="last", positions=positions):
        ref = attribute(lm, PROMPT, ANSWER, FAST, reference_loop=True)
    np.testing.assert_allclose(fast.scores, ref.scores, atol=1e-6)
    assert all(fast.scores[n.layer, n.index] == 0 for n in off)
    _, [p_last] = intervene_many(lm, PROMPT, ANSWER, [off], 0.0, "last")
    _, [p_all] = intervene_many(lm, PROMPT, ANSWER, [off], 0.0, "all")
    assert fast.prob == pytest.approx(p_last, rel=1e-5) and everywhere.prob == pytest.approx(p_all, rel=1e-5)
    assert abs(p_last - p_all) > 1e-4  # the two modes differ on this model: the test can tell them apart
    with pytest.raises(ValueError, match="unknown suppression mode"):
        with suppressed(lm, off, mode="first"):
            pass


def test_runners_kept_for_live_interventions_never_cross_a_suppression():
    """A runner bakes the active hooks into its prefix and clean capture: inside `suppressed`, interventions
    neither reuse the clean runner kept from before nor leave a suppressed one behind."""
    lm = _stored_twice_in_two_layers()
    p0, _ = intervene_many(lm, PROMPT, ANSWER, [], 0.0, "last")  # keeps a clean runner
    with suppressed(lm, GROUP_A + GROUP_B, mode="last"):
        p_inside, _ = intervene_many(lm, PROMPT, ANSWER, [], 0.0, "last")
    _, [p_off] = intervene_many(lm, PROMPT, ANSWER, [GROUP_A + GROUP_B], 0.0, "last")
    assert p_inside == pytest.approx(p_off, rel=1e-5) and p_off < 0.5 * p0
    assert intervene_many(lm, PROMPT, ANSWER, [], 0.0, "last")[0] == pytest.approx(p0, rel=1e-6)


def test_answer_position_suppression_of_a_masked_multi_token_answer_is_refused():
    lm = tiny_model("bert")
    with pytest.raises(ValueError, match="one-token answer"):
        attribute_suppressed(lm, PROMPT, "paris france", [Neuron(0, 3)], FAST, mode="last")
    assert attribute_suppressed(lm, PROMPT, "paris france", [Neuron(0, 3)], FAST, mode="all").scores[0, 3] == 0


def test_bad_backup_settings_are_refused():
    with pytest.raises(ValueError, match="backup_rounds"):
        DegeneracyParams(clusterer="backup", backup_rounds=0).validate()


def test_cli_dkn_json_carries_rounds_sufficiency_redundancy_and_interactions(tmp_path, capsys):
    import json

    from dkn.cli import main

    folder = save_model_folder(_stored_twice_in_two_layers(), tmp_path / "planted")
    argv = fact_argv("dkn", folder, PROMPT, ANSWER, "--clusterer", "backup", "--json", "--no-cache", "--steps", "8")
    capsys.readouterr()
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clusterer"] == "backup" and out["degenerate"] is True
    assert len(out["rounds"]) == 2 and out["rounds"][1]["prob_after"] < 0.1 * out["prob"]
    assert [s["sufficient"] for s in out["sufficiency"]] == [True, True]
    assert out["redundancy"] > 0.9 and [i["subset"] for i in out["interactions"]] == [[0], [1], [0, 1]]
    assert out["conditions"]["together_remove_fact"] is True and out["edge"] == "static"
    assert main(argv[:-6] + ["--clusterer", "ntc", "--no-cache", "--steps", "8"]) == 0  # the text report
    text = capsys.readouterr().out
    assert "redundancy R" in text and "no candidate group" in text  # IG found one copy only


def test_pathway_drops_are_the_same_in_small_passes(monkeypatch):
    """The singles-and-pairs test runs in passes bounded by the memory budget: the drops do not depend on it."""
    from dkn import backup, interventions

    lm = _stored_twice_in_two_layers()
    sets = [(n,) for n in GROUP_A + GROUP_B] + [(GROUP_A[0], GROUP_B[0]), (GROUP_A[1], GROUP_B[1])]
    whole = backup._drops_with(lm, PROMPT, ANSWER, [GROUP_B[1]], sets, "all")
    monkeypatch.setattr(interventions, "rows_per_pass", lambda lm_, tokens, context: 2)
    small = backup._drops_with(lm, PROMPT, ANSWER, [GROUP_B[1]], sets, "all")
    np.testing.assert_allclose(small, whole, rtol=1e-5, atol=1e-7)
    assert whole.shape == (len(sets),) and np.ptp(whole) > 0.01  # the sets do differ


def test_split_keeps_two_pathways_apart_when_a_cross_pair_is_missed(monkeypatch):
    """Parallel pairs form a bipartite graph whose two sides are the pathways: one cross pair that misses
    the threshold (a1 with b2) must not merge the pathways, as joining every non-parallel pair did."""
    from dkn import backup

    a1, a2, b1, b2 = Neuron(0, 0), Neuron(0, 1), Neuron(1, 2), Neuron(1, 3)
    pair_drop = {(a1, b1): 0.9, (a2, b2): 0.9, (a2, b1): 0.9, (a1, b2): 0.2, (a1, a2): 0.0, (b1, b2): 0.0}

    calls = []

    def drops(lm, prompt, answer, others, sets, mode):
        calls.append(sets)
        if len(calls) > 1:  # _co_carriers: all but one or two members off, never harmless in this world
            return np.full(len(sets), 0.5)
        return np.array([0.01 if len(s) == 1 else pair_drop[s] for s in sets])

    monkeypatch.setattr(backup, "_drops_with", drops)
    params = DegeneracyParams()
    assert backup._split(None, PROMPT, ANSWER, [a1, a2, b1, b2], [], params) == [(a1, a2), (b1, b2)]
    assert len(calls) == 1  # parallel pairs found: no second look
    pair_drop.update({(a1, b1): 0.1, (a2, b2): 0.1, (a2, b1): 0.1})  # no parallel pair, no co-carriers: one part
    calls.clear()
    assert backup._split(None, PROMPT, ANSWER, [a1, a2, b1, b2], [], params) == [(a1, a2, b1, b2)]
    assert len(calls) == 2


def test_pathways_that_share_a_neuron_are_judged_without_suppressing_their_own_member(monkeypatch):
    """Completed parts can share a neuron (u, upstream of both a and b). Whether a part carries the fact once the
    others are off is asked with the others less its own members: suppressing u with 'the other part' would
    remove the fact and drop both parts."""
    from dkn import backup

    a, b, u = Neuron(0, 0), Neuron(0, 1), Neuron(1, 2)

    def drops(lm, prompt, answer, others, sets, mode):  # the fact needs u and one of a, b
        return np.array([1.0 if u in s or (a in s and b in s) else 0.0 for s in sets])

    monkeypatch.setattr(backup, "_drops_with", drops)
    parts = [((a, u), 1), ((b, u), 2)]
    assert backup._carrying(None, PROMPT, ANSWER, parts, DegeneracyParams()) == parts
    # a part that only adds a little (c) goes; then the others are asked again without it
    c = Neuron(2, 3)

    def small(lm, prompt, answer, others, sets, mode):
        return np.array([1.0 if a in s and b in s else 0.1 * (c in s) for s in sets])

    monkeypatch.setattr(backup, "_drops_with", small)
    assert backup._carrying(None, PROMPT, ANSWER, [((a,), 1), ((b,), 2), ((c,), 3)], DegeneracyParams()) == [
        ((a,), 1),
        ((b,), 2),
    ]
