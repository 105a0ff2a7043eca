"""dkn.compare: the knowledge-neuron overlap of several facts (a planted generic neuron is flagged, a
fact-specific one is not), and one neuron's detail on a prompt, on a tiny random llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from dkn.compare import kn_overlap, knockout_without_generic, neuron_detail
from dkn.hooks import record_neurons
from dkn.neurons import Neuron
from dkn.query import make_query
from dkn.vocab import neuron_logits

GENERIC, OWN = Neuron(0, 767), Neuron(12, 3)


def test_overlap_flags_the_planted_generic_neuron_only():
    kns = {
        "france": [GENERIC, OWN, Neuron(5, 1)],
        "japan": [GENERIC, Neuron(7, 7)],
        "einstein": [GENERIC, Neuron(5, 1)],
        "eiffel": [Neuron(9, 9)],
    }
    ov = kn_overlap(kns)
    assert ov.share[GENERIC] == pytest.approx(0.75) and ov.share[OWN] == pytest.approx(0.25)
    assert ov.generic() == (GENERIC, Neuron(5, 1))  # in >= half the facts
    assert ov.generic(0.6) == (GENERIC,)
    assert OWN not in ov.generic(0.0)  # one fact alone is never "generic"
    assert ov.shared.tolist()[0] == [3, 1, 2, 0]
    assert ov.jaccard[0, 2] == pytest.approx(2 / 3) and ov.jaccard[0, 3] == 0.0
    assert np.allclose(np.diag(ov.jaccard), 1.0) and (ov.shared == ov.shared.T).all()
    rows = {r["neuron"]: r for r in ov.table()}
    assert rows["L0:N767"]["generic"] and not rows["L12:N3"]["generic"]
    assert rows["L0:N767"]["of"] == "france, japan, einstein"
    with pytest.raises(ValueError, match="at least 2 facts"):
        kn_overlap({"france": [OWN]})


def test_neuron_detail_is_activation_times_logit_change():
    lm = tiny_model("llama")
    prompt, answer, n = "the capital of france is", "paris", Neuron(1, 5)
    d = neuron_detail(lm, prompt, answer, n)
    step = make_query(lm, prompt, answer).steps[0]
    with torch.no_grad(), record_neurons(lm) as rec:
        lm.model(input_ids=torch.tensor([step.input_ids]))
    assert d.activation == pytest.approx(float(rec[1][0, -1, 5]), rel=1e-5)
    assert d.logit_per_unit == pytest.approx(float(neuron_logits(lm, n)[step.target]), rel=1e-5)
    assert d.direct_effect == pytest.approx(d.activation * d.logit_per_unit)
    assert d.answer_token == lm.tokenizer.decode([step.target])
    with pytest.raises(ValueError, match="out of range"):
        neuron_detail(lm, prompt, answer, Neuron(99, 0))


def test_knockout_without_generic_splits_the_set_and_suppresses_each_part():
    from dkn.interventions import intervene

    lm = tiny_model("llama")
    prompt, answer = "the capital of france is", "paris"
    kns = [Neuron(0, 3), Neuron(1, 5), Neuron(2, 7), Neuron(2, 1)]
    generic = [Neuron(1, 5), Neuron(2, 1), Neuron(0, 4)]  # (0, 4) is not a knowledge neuron of this fact
    ko = knockout_without_generic(lm, prompt, answer, kns, generic)
    assert ko.specific_neurons == (Neuron(0, 3), Neuron(2, 7)) and ko.generic_neurons == (Neuron(1, 5), Neuron(2, 1))
    for p, ns in ((ko.all_kn, kns), (ko.specific, ko.specific_neurons), (ko.generic_only, ko.generic_neurons)):
        assert p == pytest.approx(intervene(lm, prompt, answer, ns, 0.0).prob_after, rel=1e-4, abs=1e-9)
    assert ko.prob == pytest.approx(intervene(lm, prompt, answer, [], 1.0).prob_before, rel=1e-5)
    rows = ko.table()
    assert [r["neurons"] for r in rows] == [4, 2, 2]
    assert rows[0]["drop"] == pytest.approx((ko.prob - ko.all_kn) / ko.prob)
    none = knockout_without_generic(lm, prompt, answer, kns, [])  # nothing generic: specific == all
    assert none.specific == pytest.approx(none.all_kn) and none.generic_only == pytest.approx(none.prob, rel=1e-5)
