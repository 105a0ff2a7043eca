"""The real default model (SmolLM2-135M-Instruct): the fact the app opens with behaves as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkn.attribution import AttributionParams, _clean_activations, attribute
from dkn.integration import integration_points
from dkn.interventions import intervene
from dkn.neurons import Neuron
from dkn.query import make_query
from dkn.rows import RowJob, one_layer_grads

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_thread")]

PROMPT, ANSWER = "The capital of France is", "Paris"
PARAMS = AttributionParams(rule="trapezoid", steps=10)  # fixed points: the tests below compare layers


@pytest.fixture(scope="module")
def ig(default_lm):
    return attribute(default_lm, PROMPT, ANSWER, PARAMS)


@pytest.fixture(scope="module")
def top10(ig):
    return [n for n, _ in ig.top(10)]


def test_probability_and_top_token(default_lm, ig):
    lm = default_lm
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        dist = lm.model(input_ids=ids).logits[0, -1].float().softmax(-1)
    paris = lm.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert len(paris) == 1
    p = float(dist[paris[0]])
    assert 0.6 < p < 0.9
    assert lm.tokenizer.decode([int(dist.argmax())]) == " Paris"
    assert ig.prob == pytest.approx(p, rel=1e-4)
    assert ig.answer == " Paris" and ig.answer_tokens == (" Paris",)
    assert ig.scores.shape == (30, 1536) and np.isfinite(ig.scores).all()


def test_suppressing_the_top_neurons_removes_the_answer(default_lm, top10):
    result = intervene(default_lm, PROMPT, ANSWER, top10, 0.0, "last")
    assert 0.6 < result.prob_before < 0.9
    assert result.relative_change < -0.8
    assert result.top_before[0][0] == " Paris"


def test_amplifying_the_top_neurons_raises_the_answer(default_lm, top10):
    result = intervene(default_lm, PROMPT, ANSWER, top10, 2.0, "last")
    assert result.prob_after > result.prob_before


def test_random_neurons_in_the_same_layers_do_little(default_lm, top10):
    rng = np.random.default_rng(1234)
    chosen = set(top10)
    random = []
    for n in top10:
        while True:
            candidate = Neuron(n.layer, int(rng.integers(default_lm.d_mlp)))
            if candidate not in chosen:
                break
        chosen.add(candidate)
        random.append(candidate)
    assert sorted(n.layer for n in random) == sorted(n.layer for n in top10)
    result = intervene(default_lm, PROMPT, ANSWER, random, 0.0, "last")
    assert abs(result.relative_change) < 0.1


def test_fast_path_matches_the_reference_for_two_layers(default_lm, ig, top10):
    """The full reference loop takes minutes on this model; recompute two layers (the top neuron's and
    layer 0, or layer 29 if the top neuron is in layer 0) with the plain per-layer helper."""
    lm = default_lm
    (step,) = make_query(lm, PROMPT, ANSWER).steps
    ids = torch.tensor([step.input_ids])
    acts, prob = _clean_activations(lm, ids, step, PARAMS.site)
    assert prob == pytest.approx(ig.prob, rel=1e-5)
    base = torch.zeros_like(acts)
    alphas, weights = integration_points(PARAMS.rule, PARAMS.steps)
    first = top10[0].layer
    for layer in (first, 0 if first != 0 else lm.n_layers - 1):
        grads = one_layer_grads(RowJob(lm, ids, step, PARAMS.site, acts, base), alphas, weights, layer)
        reference = (acts[layer] * grads).numpy()
        fast = ig.scores[layer]
        assert np.corrcoef(fast, reference)[0, 1] >= 0.9999, layer
        assert np.abs(fast - reference).max() <= 1e-3 * np.abs(reference).max(), layer


def test_adaptive_rule_refines_the_sharp_layer_and_beats_the_peer_rule(default_lm):
    """On this fact the integrand's sharp features sit in layer 0 (the massive-activation layer): the
    adaptive rule spends its extra points there and nowhere else, and is closer to a 128-interval trapezoid
    than the knowledge-neurons peer's 20 evenly spaced points, with fewer rows."""
    reference = attribute(default_lm, PROMPT, ANSWER, AttributionParams(steps=128, rule="trapezoid")).scores
    adaptive = attribute(default_lm, PROMPT, ANSWER, AttributionParams(steps=6, rule="adaptive"))
    peer = attribute(default_lm, PROMPT, ANSWER, AttributionParams(steps=20, rule="linspace")).scores
    (intervals,) = adaptive.extra["intervals"]
    assert intervals[0] > 6 and intervals[1:].count(6) >= 27, intervals
    assert np.mean(intervals) < 19  # the peer's rows per layer
    error = lambda s: np.abs(s - reference)
    assert error(adaptive.scores).max() < error(peer).max()
    assert error(adaptive.scores).mean() < error(peer).mean()
