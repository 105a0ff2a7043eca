"""dkn.prediction: each answer token's probability and rank, by token id, on a tiny random llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from dkn.interventions import intervene
from dkn.prediction import answer_token_ranks
from dkn.query import make_query

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def test_multi_token_answer_each_token_ranked(lm):
    answer = "paris france"
    query = make_query(lm, PROMPT, answer)
    assert query.n_answer_tokens >= 2
    ranks = answer_token_ranks(lm, PROMPT, answer)
    assert [r.token_id for r in ranks] == [s.target for s in query.steps]
    assert "".join(r.token for r in ranks).strip() == "".join(query.answer_tokens).strip()
    # the product of the token probabilities is the answer's probability used everywhere else
    assert np.prod([r.prob for r in ranks]) == pytest.approx(
        intervene(lm, PROMPT, answer, (), 1.0).prob_before, rel=1e-4
    )
    for step, r in zip(query.steps, ranks):  # rank against the full distribution, independently computed
        with torch.no_grad():
            dist = lm.model(input_ids=torch.tensor([step.input_ids])).logits[0, step.position].softmax(-1)
        order = torch.argsort(dist, descending=True).tolist()
        assert order.index(step.target) + 1 == r.rank


def test_edit_effects_on_every_prompt(lm):
    from dkn.neurons import Neuron
    from dkn.prediction import edit_effects

    prompts = [PROMPT, "the capital city of france is"]
    neurons = [Neuron(0, 1), Neuron(1, 2), Neuron(2, 3)]
    for mode in ("last", "all", "weights"):
        effects = edit_effects(lm, prompts, "paris", neurons, 0.0, mode)
        assert [e.prompt for e in effects] == prompts
        for e in effects:
            # P after is the library's own intervention, rank after agrees with it
            assert e.p_after == pytest.approx(intervene(lm, e.prompt, "paris", neurons, 0.0, mode).prob_after, rel=1e-4)
            assert e.rank_before == answer_token_ranks(lm, e.prompt, "paris")[0].rank
            assert e.kl >= 0 and e.kl_random >= 0
            assert (e.margin_before > 0) == (e.rank_before == 1)
    unchanged = edit_effects(lm, prompts, "paris", neurons, 1.0, "last")  # factor 1 changes nothing
    for e in unchanged:
        assert e.kl == pytest.approx(0.0, abs=1e-6) and e.rank_after == e.rank_before and not e.broken
        assert e.margin_after == pytest.approx(e.margin_before, abs=1e-4)


def test_a_wrecking_edit_is_flagged_broken(lm):
    """Planted: amplifying every neuron of every layer 50-fold wrecks the output; the same edit at factor 1.05
    does not (the control)."""
    from dkn.neurons import Neuron
    from dkn.prediction import edit_effects

    everything = [Neuron(layer, i) for layer in range(lm.n_layers) for i in range(lm.d_mlp)]
    wrecked = edit_effects(lm, [PROMPT], "paris", everything, 50.0, "all", top_k=3)[0]
    assert wrecked.kl > 1.0 and wrecked.broken
    gentle = edit_effects(lm, [PROMPT], "paris", everything, 1.05, "all", top_k=3)[0]
    assert not gentle.broken and gentle.kl < wrecked.kl
