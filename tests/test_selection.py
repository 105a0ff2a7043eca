"""dkn.selection on hand-made score maps."""

from __future__ import annotations

import numpy as np
import pytest

from dkn.neurons import Neuron
from dkn.selection import coarse_neurons, generic_pushout, refine


def grid(values: dict[tuple[int, int], float], shape=(3, 5), fill=0.0) -> np.ndarray:
    scores = np.full(shape, fill, dtype=np.float32)
    for (layer, index), v in values.items():
        scores[layer, index] = v
    return scores


def test_coarse_threshold_is_strict_and_relative_to_the_global_max():
    scores = grid({(0, 1): 10.0, (1, 2): 2.0, (2, 3): 2.0001, (2, 4): -50.0, (1, 0): 5.0})
    # t * max = 2.0: exactly 2.0 is not above it, 2.0001 is; the large negative score never counts
    assert set(coarse_neurons(scores, t=0.2)) == {Neuron(0, 1), Neuron(2, 3), Neuron(1, 0)}
    assert set(coarse_neurons(scores, t=0.5)) == {Neuron(0, 1)}  # 5.0 is not > 5.0
    assert set(coarse_neurons(scores, t=0.49)) == {Neuron(0, 1), Neuron(1, 0)}
    assert coarse_neurons(scores, t=1.0) == []  # nothing exceeds the max
    assert set(coarse_neurons(scores, t=0.0)) == {Neuron(0, 1), Neuron(1, 2), Neuron(2, 3), Neuron(1, 0)}
    assert all(isinstance(n.layer, int) and isinstance(n.index, int) for n in coarse_neurons(scores))


def test_coarse_without_positive_scores_is_empty():
    assert coarse_neurons(grid({}, fill=-1.0)) == []
    assert coarse_neurons(grid({})) == []
    assert coarse_neurons(grid({(1, 1): -0.1})) == []


@pytest.mark.parametrize("t", [-0.1, 1.5])
def test_coarse_rejects_bad_threshold(t):
    with pytest.raises(ValueError, match="threshold t"):
        coarse_neurons(grid({(0, 0): 1.0}), t=t)


def test_refine_share_p_is_strict():
    # (0, 0) coarse in 3 of 4 prompts, (1, 1) in 2 of 4, (2, 2) in 1 of 4
    maps = [
        grid({(0, 0): 10, (1, 1): 9, (2, 2): 8}),
        grid({(0, 0): 10, (1, 1): 9}),
        grid({(0, 0): 10}),
        grid({(2, 4): 10}),
    ]
    kns = refine(maps, t=0.2, p=0.5)  # needs > 2 of 4
    assert kns.neurons == (Neuron(0, 0),)
    assert kns.counts == (3,)
    assert kns.n_prompts == 4 and kns.t == 0.2 and kns.p == 0.5
    assert kns.scores == pytest.approx((7.5,))  # the mean over all four prompts
    kns = refine(maps, t=0.2, p=0.25)  # > 1 of 4
    assert set(kns.neurons) == {Neuron(0, 0), Neuron(1, 1)}
    kns = refine(maps, t=0.2, p=0.0)  # > 0: any coarse neuron
    assert set(kns.neurons) == {Neuron(0, 0), Neuron(1, 1), Neuron(2, 2), Neuron(2, 4)}


def test_refine_single_prompt_gives_its_coarse_neurons():
    scores = grid({(0, 1): 4.0, (2, 2): 1.0, (1, 3): 0.5})
    kns = refine([scores], t=0.2, p=0.5)
    assert set(kns.neurons) == set(coarse_neurons(scores, 0.2)) == {Neuron(0, 1), Neuron(2, 2)}


def test_refine_orders_by_mean_score():
    maps = [
        grid({(0, 0): 10, (1, 1): 9, (2, 2): 8}),
        grid({(0, 0): 1, (1, 1): 9, (2, 2): 10}),
        grid({(0, 0): 2, (1, 1): 3, (2, 2): 10}),
    ]
    # every prompt's max is 10, t = 0.05 keeps all three everywhere; means 13/3, 7, 28/3
    kns = refine(maps, t=0.05, p=0.5)
    assert kns.neurons == (Neuron(2, 2), Neuron(1, 1), Neuron(0, 0))
    assert kns.scores == pytest.approx((28 / 3, 7.0, 13 / 3))
    assert kns.counts == (3, 3, 3)
    assert kns.as_records() == [
        {"layer": 2, "neuron": 2, "score": pytest.approx(28 / 3), "count": 3},
        {"layer": 1, "neuron": 1, "score": pytest.approx(7.0), "count": 3},
        {"layer": 0, "neuron": 0, "score": pytest.approx(13 / 3), "count": 3},
    ]


def test_refine_removes_negatives():
    maps = [grid({(0, 0): 10, (1, 1): 9}), grid({(0, 0): 10, (1, 1): 9})]
    negatives = [
        grid({(1, 1): 5, (0, 4): 1}),  # (1, 1) coarse for an unrelated fact; (0, 4) too
        grid({(0, 0): 10, (2, 2): 1.0}),
    ]  # (0, 0) is 10 but (2,2) = 0.1 * max is not coarse
    kns = refine(maps, t=0.2, p=0.5, negative_maps=negatives[:1])
    assert kns.neurons == (Neuron(0, 0),)
    kns = refine(maps, t=0.2, p=0.5, negative_maps=negatives)
    assert kns.neurons == ()
    below = [grid({(1, 1): 1.0, (2, 3): 10.0})]  # (1, 1) not coarse in the negative map
    assert refine(maps, t=0.2, p=0.5, negative_maps=below).neurons == (Neuron(0, 0), Neuron(1, 1))


def test_refine_argument_errors():
    with pytest.raises(ValueError, match="at least one prompt"):
        refine([])
    with pytest.raises(ValueError, match="share p"):
        refine([grid({(0, 0): 1})], p=1.0)


# -- the generic-neuron blind spot (issue 8 §2) -----------------------------------------------------------
def _facts_with_a_generic_neuron():
    """Three facts: neuron (0, 0) scores 10 on every one; each fact has its own neurons scoring 1.0."""
    own = [{(1, 1): 1.0, (2, 2): 1.0}, {(1, 3): 1.0, (2, 0): 1.0}, {(2, 4): 1.0, (1, 2): 0.9}]
    return [grid({(0, 0): 10.0, **o}) for o in own], own


def test_one_generic_neuron_pushes_the_fact_specific_ones_under_the_threshold():
    maps, own = _facts_with_a_generic_neuron()
    for scores in maps:
        assert coarse_neurons(scores, 0.2) == [Neuron(0, 0)]  # the blind spot, today's rule
    pushed = generic_pushout(maps, t=0.2)
    assert pushed.generic == (Neuron(0, 0),)
    assert pushed.facts_affected == 3 and pushed.mean_lost == 2.0
    assert set(pushed.lost[0]) == {Neuron(1, 1), Neuron(2, 2)}
    # control: without a generic neuron nothing is lost
    clean = generic_pushout([grid(o) for o in own], t=0.2)
    assert clean.generic == () and clean.facts_affected == 0


def test_contrast_with_negative_facts_recovers_the_fact_specific_neurons():
    maps, _ = _facts_with_a_generic_neuron()
    fact, negatives = maps[0], maps[1:]
    dropped = refine([fact], 0.2, 0.5, negatives, negatives="drop")
    assert dropped.neurons == ()  # Dai et al.'s drop removes (0, 0) only
    kns = refine([fact], 0.2, 0.5, negatives, negatives="contrast")
    assert set(kns.neurons) == {Neuron(1, 1), Neuron(2, 2)}
    assert kns.scores == (1.0, 1.0) and kns.mean_scores.shape == fact.shape
    with pytest.raises(ValueError, match="negatives mode"):
        refine([fact], negatives="ignore")


def test_per_layer_threshold_keeps_each_layers_leaders():
    maps, _ = _facts_with_a_generic_neuron()
    assert set(coarse_neurons(maps[0], 0.2, per_layer=True)) == {Neuron(0, 0), Neuron(1, 1), Neuron(2, 2)}
    assert set(refine([maps[0]], 0.2, per_layer=True).neurons) == {Neuron(0, 0), Neuron(1, 1), Neuron(2, 2)}
    assert coarse_neurons(grid({(0, 0): 1.0}, fill=-1.0), 0.2, per_layer=True) == [Neuron(0, 0)]


def test_find_knowledge_neurons_returns_the_per_prompt_attributions_and_the_mean_map():
    from tiny_models import tiny_model

    from dkn.attribution import AttributionParams, attribute
    from dkn.selection import find_knowledge_neurons

    lm = tiny_model("gpt2")
    params = AttributionParams(steps=4)
    prompts = ["the capital of france is", "the city of france is"]
    kns = find_knowledge_neurons(lm, prompts, "paris", params, negative_prompts=[("the sky is", "blue")])
    assert [a.prompt for a in kns.attributions] == prompts and len(kns.negative_attributions) == 1
    direct = [attribute(lm, q, "paris", params).scores for q in prompts]
    assert np.allclose(kns.mean_scores, np.mean(direct, axis=0), atol=1e-6)
    assert kns == refine(direct, 0.2, 0.5, [kns.negative_attributions[0].scores])
