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
    assert np.prod([r.prob for r in ranks]) == pytest.approx(intervene(lm, PROMPT, answer, (), 1.0).prob_before,
                                                             rel=1e-4)
    for step, r in zip(query.steps, ranks):     # rank against the full distribution, independently computed
        with torch.no_grad():
            dist = lm.model(input_ids=torch.tensor([step.input_ids])).logits[0, step.position].softmax(-1)
        order = torch.argsort(dist, descending=True).tolist()
        assert order.index(step.target) + 1 == r.rank

